"""Split a teacher's output into its reasoning and its final answer.

Three shapes occur in practice:
- tagged:    "<think> reasoning </think> answer"
- r1:        "reasoning </think> answer" (R1-distilled chat templates put "<think>" in the prompt, so the
             generated text starts inside the thinking block)
- malformed: no "</think>" (generation stopped while thinking), or nothing after it, or no reasoning before it.
A malformed trace has no usable final answer: it is recorded, counted and kept out of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

Shape = Literal["tagged", "r1", "malformed"]


@dataclass(frozen=True)
class ParsedTrace:
    cot: str | None
    answer: str | None
    shape: Shape
    reason: str = ""  # why a trace is malformed; empty otherwise

    @property
    def malformed(self) -> bool:
        return self.shape == "malformed"


def _clean_answer(text: str) -> str:
    # Some teachers echo a stray closing tag or an end-of-turn marker after the answer.
    return text.replace(THINK_CLOSE, "").strip()


def parse_trace(text: str | None) -> ParsedTrace:
    """Parse one teacher output; never raises."""
    if text is None or not text.strip():
        return ParsedTrace(None, None, "malformed", "empty output")
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        if THINK_OPEN in text:
            return ParsedTrace(
                None, None, "malformed", "reasoning never closed with </think> (output cut off?)"
            )
        return ParsedTrace(None, None, "malformed", "no </think>: no separable reasoning and final answer")
    opened = THINK_OPEN in head
    cot = head.split(THINK_OPEN, 1)[1] if opened else head
    cot = cot.strip()
    answer = _clean_answer(tail)
    if not answer:
        return ParsedTrace(None, None, "malformed", "nothing after </think>: no final answer")
    if not cot:
        return ParsedTrace(None, None, "malformed", "empty reasoning before </think>")
    return ParsedTrace(cot, answer, "tagged" if opened else "r1")


def final_answer(text: str) -> str:
    """What the user sees: the text after the last </think>, or the whole text when there is none.

    Same rule as the judges' `final_answer`, so GRPO rewards what evaluation later judges.
    """
    return text.rsplit(THINK_CLOSE, 1)[1].strip() if THINK_CLOSE in text else text.strip()


def format_trace(cot: str, answer: str) -> str:
    """The canonical raw form of a trace, as the corpus teacher emits it."""
    return f"{THINK_OPEN}\n{cot.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"
