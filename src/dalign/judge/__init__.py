"""Judges: label (prompt, response) pairs as safe/unsafe (safety) or correct/wrong (utility), or `error`.

A judge never maps a failure to `safe` or `correct`: anything it cannot decide is labelled `error` with the raw
text kept, and errors are counted in the manifest and in every report.

    judge = get_judge("refusal")
    judge.judge([{"prompt": "...", "response": "...", "answer": None}])  # -> [{"label", "score", "raw"}]
"""

from __future__ import annotations

import importlib
from typing import ClassVar

from dalign.config import JudgeConfig
from dalign.registry import Registry

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SAFETY_LABELS = ("safe", "unsafe", "error")
UTILITY_LABELS = ("correct", "wrong", "error")

# Bump when a judge's rules change, so cached judgments made by the old rules are not reused.
JUDGE_VERSION = "2"  # 2: llama-guard reads the verdict at the template-defined position


class Judge:
    """Base class. Subclasses set `name`, `kind` and implement `judge`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "safety"  # "safety": safe|unsafe|error; "utility": correct|wrong|error
    summary: ClassVar[str] = ""

    def __init__(self, cfg: JudgeConfig | None = None):
        self.cfg = cfg if cfg is not None else JudgeConfig(judges=[self.name])

    def judge(self, items: list[dict]) -> list[dict]:
        """items: dicts with prompt, response, answer (may be None) -> [{label, score (float|None), raw (str)}]."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What determines this judge's verdicts (the cache key part); batch size does not."""
        return {"judge": self.name, "version": JUDGE_VERSION}

    def threshold_or(self, default: float) -> float:
        """This judge's decision threshold: judge.thresholds[name] when set, else the judge's own default."""
        return float(self.cfg.thresholds.get(self.name, default))


JUDGES: Registry[type[Judge]] = Registry("judge")
_MODULES = (
    "dalign.judge.refusal",
    "dalign.judge.content",
    "dalign.judge.checkers",
    "dalign.judge.llama_guard",
    "dalign.judge.rubric",
)


def _ensure_registered() -> None:
    for mod in _MODULES:
        importlib.import_module(mod)


def get_judge(name: str, cfg: JudgeConfig | None = None) -> Judge:
    """A judge instance by registered name (unknown names list the known ones)."""
    _ensure_registered()
    cls = JUDGES.get(name)
    return cls(cfg if cfg is not None else JudgeConfig(judges=[name]))


def final_answer(response: str | None) -> str:
    """The text after the last `</think>` if there is one, else the whole text; stripped."""
    text = "" if response is None else str(response)
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    return text.strip()


def reasoning_closed(response: str | None, think_prefix: bool) -> bool:
    """Does the response hold a final answer outside the reasoning? (`</think>` seen, or no reasoning opened.)"""
    text = "" if response is None else str(response)
    if THINK_CLOSE in text:
        return True
    return not think_prefix and THINK_OPEN not in text


def judge_cli_help() -> str:
    """One line per judge, for `dalign judge --help`."""
    _ensure_registered()
    lines = []
    for name in JUDGES.names():
        cls = JUDGES.get(name)
        lines.append(f"{name:<20} {cls.kind:<8} {cls.summary}")
    return "\n".join(lines)


def result(label: str, score: float | None, raw: str) -> dict:
    return {"label": label, "score": None if score is None else float(score), "raw": str(raw)}


__all__ = ["JUDGES", "Judge", "final_answer", "get_judge", "judge_cli_help", "reasoning_closed", "result"]
