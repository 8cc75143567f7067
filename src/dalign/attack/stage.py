"""`dalign attack pair`: the resumable PAIR stage (writes attacks.parquet in the run directory).

Work is done behaviour by behaviour (all targets of a behaviour before the next one, so a partial run still
compares the targets on the same behaviours), one iteration of all active streams at a time, and each iteration's
rows are committed as one shard before the next starts. On a rerun the committed rows rebuild every stream's
state and the stage continues at the next iteration: nothing is redone, lost or duplicated.
"""

from __future__ import annotations

import time

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from dalign.attack import artifact
from dalign.attack.loop import Behaviour, Item, PairIteration, Stream, active, apply, restore
from dalign.attack.prompts import target_string
from dalign.config import RunConfig
from dalign.progress import Progress
from dalign.rundir import RunDir, adapter_dir


def behaviours(cfg: RunConfig) -> list[Behaviour]:
    from dalign.data import load_dataset

    df = load_dataset(cfg.attack.behaviours)
    if df["kind"].iloc[0] != "safety":
        raise ValueError(
            f"attack.behaviours {cfg.attack.behaviours.name!r} is a utility dataset; use harmful goals"
        )
    return [
        Behaviour(str(r.prompt_id), r.prompt, target_string(r.prompt)) for r in df.itertuples(index=False)
    ]


def attack_extra(run: RunDir) -> dict:
    """Identity beyond the declared config fields (pipeline.PIPELINE["attack"]): the judge actually used."""
    from dalign.attack.rate import default_judge

    return {"judge": run.config.attack.judge or default_judge(run.config)}


def _check_targets(run: RunDir) -> None:
    cfg = run.config
    if adapter_dir(run) is None and cfg.model.base is None:
        raise ValueError(
            "PAIR compares the base and the aligned student, but this run has neither an adapter (model.adapter, "
            f"{run.path}/adapter or adapter-grpo) nor a separate model.base; run `dalign sft` first or set one"
        )
    twice = sorted({t for t in cfg.attack.targets if cfg.attack.targets.count(t) > 1})
    if twice:
        raise ValueError(f"attack.targets lists {twice} twice")
    if "guarded" in cfg.attack.targets:
        from dalign.models.pair import model_depth
        from dalign.score.metrics import get_metric

        depth, layer = model_depth(cfg.model), cfg.attack.guard_layer
        if get_metric(cfg.attack.guard_metric).per_layer and not 1 <= layer <= depth:
            raise ValueError(f"attack.guard_layer {layer} is out of range: the student has layers 1..{depth}")


def run_attack(run: RunDir, force: bool = False) -> dict:
    cfg, a = run.config, run.config.attack
    _check_targets(run)
    goals = behaviours(cfg)
    run.begin("attack", force)
    done = artifact.read(run)
    groups = {key: g for key, g in done.groupby(["behaviour", "target"])} if len(done) else {}
    state = {
        (b.id, t): restore(groups.get((b.id, t), done.iloc[0:0]), a.streams) for b in goals for t in a.targets
    }
    todo = [t for t in a.targets if any(active(state[(b.id, t)], a) for b in goals)]

    written, t0 = 0, time.perf_counter()
    if todo:
        step = _load(run)
        with Progress(
            TextColumn("[bold]attack pair[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ) as bar:
            task = bar.add_task("", total=len(todo) * a.depth)
            for ti, target in enumerate(todo):
                # one iteration of every behaviour's active streams at a time, in batches (one commit each)
                while groups := [(b, g) for b in goals if (g := active(state[(b.id, target)], a))]:
                    k = min(s.next_iteration for _, g in groups for s in g)
                    bar.update(task, description=f"{target}, iteration {k}/{a.depth}")
                    for batch in _batches(groups, k, a.batch_size):
                        rows = step.run(target, batch, k)  # one row per item, in order
                        written += artifact.write(run, rows)  # the commit point
                        for (b, _), row in zip(batch, rows, strict=True):
                            apply(state[(b.id, target)], [row])
                    bar.update(task, completed=ti * a.depth + k)
                bar.update(task, completed=(ti + 1) * a.depth)

    table = artifact.read(run)
    summary = _summary(table)
    run.finish(
        "attack", rows=len(table), new_rows=written, seconds=round(time.perf_counter() - t0, 1), **summary
    )
    return {"rows": len(table), "new": written, **summary}


def _batches(groups: list[tuple[Behaviour, list[Stream]]], k: int, size: int) -> list[list[Item]]:
    """The streams at iteration k, packed into batches of about `size` without splitting a behaviour: its streams
    run together, so a kill between batches cannot change which of them run (stop_behaviour_on_success)."""
    out: list[list[Item]] = [[]]
    for b, streams in groups:
        items = [(b, s) for s in streams if s.next_iteration == k]
        if out[-1] and len(out[-1]) + len(items) > size:
            out.append([])
        out[-1] += items
    return [batch for batch in out if batch]


def _load(run: RunDir) -> PairIteration:
    """Attacker, judge and the target pair (one copy of the student's weights for all three targets)."""
    from dalign.attack.chat import LocalChat, load_chat
    from dalign.attack.rate import load_rater
    from dalign.attack.targets import Targets
    from dalign.models.pair import load_pair

    cfg, a = run.config, run.config.attack
    rater = load_rater(cfg)
    attacker = load_chat(a.attacker, cfg.model, a.attacker_base_url, "the PAIR attacker")
    targets = Targets(load_pair(cfg.model, adapter_dir(run)), cfg)
    return PairIteration(a, attacker, targets, rater, prefill=isinstance(attacker, LocalChat))


def _summary(table: pd.DataFrame) -> dict:
    if table.empty:
        return {"jailbroken": {}, "errors": 0}
    per = table.groupby(["target", "behaviour"])["jailbroken"].any().groupby("target").sum()
    return {
        "jailbroken": {str(t): int(n) for t, n in per.items()},
        "behaviours": int(table["behaviour"].nunique()),
        "errors": int(table["error"].notna().sum()),
    }
