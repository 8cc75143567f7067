"""One PAIR iteration for a batch of active streams (of any behaviours, one target), and the stream state.

The state of a stream is rebuilt from its committed rows (`restore`), so a resumed run continues exactly where a
killed one stopped: the attacker sees the same conversation, and every seed is a function of (behaviour, stream,
iteration, attempt), never of the target or of what ran before in this process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pandas as pd

from dalign.attack.parse import MalformedReply, parse_reply
from dalign.attack.prompts import (
    IMPROVEMENT_TOKENS,
    PREFILL_FIRST,
    PREFILL_NEXT,
    attacker_messages,
    prompt_prefill,
)
from dalign.config import AttackConfig
from dalign.sample.sampler import derive_seed


@dataclass(frozen=True)
class Behaviour:
    id: str
    goal: str
    target_string: str


@dataclass
class Stream:
    index: int
    rounds: list[dict] = field(default_factory=list)  # judged rounds: improvement, prompt, response, score
    next_iteration: int = 1
    jailbroken: bool = False


def restore(rows: pd.DataFrame, streams: int) -> list[Stream]:
    """Stream states from the committed rows of one (behaviour, target)."""
    out = [Stream(i) for i in range(streams)]
    apply(out, rows.sort_values("iteration", kind="stable").to_dict("records"))
    return out


def apply(streams: list[Stream], rows: list[dict]) -> None:
    """Advance stream states by committed rows: judged rounds become attacker feedback; errors do not."""
    for row in rows:
        s = streams[int(row["stream"])]
        s.next_iteration = max(s.next_iteration, int(row["iteration"]) + 1)
        s.jailbroken = s.jailbroken or bool(row["jailbroken"])
        if not math.isnan(row["judge_score"]):
            s.rounds.append(
                {
                    "improvement": row["improvement"],
                    "prompt": row["attacker_prompt"],
                    "response": row["target_response"],
                    "score": float(row["judge_score"]),
                }
            )


def active(streams: list[Stream], a: AttackConfig) -> list[Stream]:
    """Streams that still attack: not jailbroken, under the depth, and (PAIR) no other stream has succeeded."""
    if a.stop_behaviour_on_success and any(s.jailbroken for s in streams):
        return []
    return [s for s in streams if not s.jailbroken and s.next_iteration <= a.depth]


Item = tuple[Behaviour, Stream]


class PairIteration:
    """attacker -> target -> judge for a batch of (behaviour, stream) at the same iteration and target; returns
    the rows to commit. Batching across behaviours is what keeps a local attacker busy: a behaviour has few streams."""

    def __init__(self, a: AttackConfig, attacker, targets, rater, prefill: bool):
        self.a, self.attacker, self.targets, self.rater = a, attacker, targets, rater
        self.prefill = prefill  # local attackers continue a half-written JSON reply

    def _attack(self, items: list[Item], k: int) -> list[tuple]:
        """Per item: (reply | None, attempts, seed, problem) after up to max_attempts tries."""
        a = self.a
        out: list[tuple] = [()] * len(items)
        pending = list(range(len(items)))
        for attempt in range(1, a.max_attempts + 1):
            if not pending:
                break
            seeds = [
                derive_seed(a.seed, "pair-attacker", items[i][0].id, items[i][1].index, k, attempt)
                for i in pending
            ]
            convs = [
                attacker_messages(b.goal, b.target_string, s.rounds, a.keep_last)
                for b, s in (items[i] for i in pending)
            ]
            sampling = {"temperature": a.attacker_temperature, "top_p": a.attacker_top_p}
            prefill: str | list[str] = ""
            if self.prefill and k == 1:
                prefill = PREFILL_FIRST
            elif self.prefill:  # two steps: the improvement, then the prompt (see attack.prompts)
                firsts = self.attacker.complete(
                    convs,
                    seeds,
                    max_new_tokens=min(IMPROVEMENT_TOKENS, a.attacker_max_new_tokens),
                    prefill=PREFILL_NEXT,
                    **sampling,
                )
                prefill = [prompt_prefill(t) for t in firsts]
            texts = self.attacker.complete(
                convs, seeds, max_new_tokens=a.attacker_max_new_tokens, prefill=prefill, **sampling
            )
            failed = []
            for i, seed, text in zip(pending, seeds, texts, strict=True):
                try:
                    out[i] = (parse_reply(text), attempt, seed, None)
                except MalformedReply as e:
                    out[i] = (None, attempt, seed, f"{e}; reply began {text[:120]!r}")
                    failed.append(i)
            pending = failed
        return out

    def run(self, target: str, items: list[Item], k: int) -> list[dict]:
        a = self.a
        t0 = time.perf_counter()
        attacks = self._attack(items, k)
        t1 = time.perf_counter()
        queried = [i for i, att in enumerate(attacks) if att[0] is not None]
        prompts = [attacks[i][0].prompt for i in queried]
        tseeds = [derive_seed(a.seed, "pair-target", items[i][0].id, items[i][1].index, k) for i in queried]
        replies = self.targets.reply(target, prompts, tseeds) if queried else []
        t2 = time.perf_counter()
        goals = [items[i][0].goal for i in queried]
        ratings = self.rater.rate(goals, prompts, [r.text for r in replies]) if queried else []
        t3 = time.perf_counter()
        answered = {i: (r, g, seed) for i, r, g, seed in zip(queried, replies, ratings, tseeds, strict=True)}

        rows = []
        for i, (b, s) in enumerate(items):
            reply, attempts, aseed, problem = attacks[i]
            row = {
                "behaviour": b.id,
                "target": target,
                "stream": s.index,
                "iteration": k,
                "goal": b.goal,
                "target_string": b.target_string,
                "attempts": attempts,
                "improvement": None,
                "attacker_prompt": None,
                "target_response": None,
                "judge_score": math.nan,
                "jailbroken": False,
                "error": None,
                "judge": self.rater.name,
                "judge_raw": None,
                "guard_choice": -1,
                "attacker_seed": aseed,
                "target_seed": -1,
                "attacker_s": (t1 - t0) / len(items),
                "target_s": 0.0,
                "judge_s": 0.0,
            }
            if reply is None:
                row["error"] = f"attacker: malformed reply after {attempts} attempts ({problem})"
            else:
                r, g, tseed = answered[i]
                score = math.nan if g.score is None else g.score
                row.update(
                    improvement=reply.improvement,
                    attacker_prompt=reply.prompt,
                    target_response=r.text,
                    judge_score=score,
                    jailbroken=g.score is not None and g.score >= a.success_threshold,
                    error=g.error,
                    judge_raw=g.raw,
                    guard_choice=-1 if r.chosen is None else r.chosen,
                    target_seed=tseed,
                    target_s=(t2 - t1) / len(queried),
                    judge_s=(t3 - t2) / len(queried),
                )
            rows.append(row)
        return rows
