"""Exact-overlap check between two prompt collections after text normalisation (training vs evaluation).

Normalisation: Unicode NFKC, lowercase, punctuation removed, whitespace collapsed. Two prompts that differ only
in case, spacing or punctuation therefore count as the same prompt, which is what contamination checks need.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, punctuation stripped (each mark becomes a space), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    # Drop apostrophes inside words ("don't" == "dont"); every other punctuation or symbol mark splits words.
    text = re.sub(r"(?<=\w)['’](?=\w)", "", text)
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class Overlap:
    """One shared prompt: its position in `a`, its position in `b`, and the normalised text."""

    index_a: int
    index_b: int
    text: str


def find_overlap(a: Iterable[str], b: Iterable[str]) -> list[Overlap]:
    """All pairs (i, j) with normalize(a[i]) == normalize(b[j]) and non-empty, ordered by i then j."""
    positions: dict[str, list[int]] = {}
    for j, text in enumerate(b):
        key = normalize(text)
        if key:
            positions.setdefault(key, []).append(j)
    out = []
    for i, text in enumerate(a):
        key = normalize(text)
        for j in positions.get(key, ()) if key else ():
            out.append(Overlap(i, j, key))
    return out


def overlap_summary(a: Iterable[str], b: Iterable[str], name_a: str = "train", name_b: str = "eval") -> dict:
    """Counts for a report: how many prompts of `b` also occur in `a`, with up to 5 examples."""
    b = list(b)
    hits = find_overlap(a, b)
    shared_b = sorted({h.index_b for h in hits})
    return {
        "pairs": len(hits),
        f"{name_b}_contaminated": len(shared_b),
        f"{name_b}_total": len(b),
        "fraction": len(shared_b) / len(b) if b else 0.0,
        "examples": [h.text[:120] for h in hits[:5]],
    }
