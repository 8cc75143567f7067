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


def find_contained(a: Iterable[str], b: Iterable[str], min_words: int = 4) -> list[Overlap]:
    """Pairs (i, j) whose normalised texts are equal, or where one contains the other as whole words.

    Containment needs the shorter text to have at least `min_words` words, so "why" inside a long prompt is not a
    match while an AdvBench behaviour embedded in a jailbreak template is. Quadratic in the sizes, which is fine
    for calibration splits against evaluation sets (thousands of prompts).
    """
    keys_b = [(j, f" {k} ") for j, text in enumerate(b) if (k := normalize(text))]
    out = []
    for i, text in enumerate(a):
        ka = normalize(text)
        if not ka:
            continue
        pa, na = f" {ka} ", ka.count(" ") + 1
        for j, pb in keys_b:
            if pa == pb:
                out.append(Overlap(i, j, ka))
                continue
            nb = pb.count(" ") - 1
            if (na >= min_words and nb > na and pa in pb) or (nb >= min_words and na > nb and pb in pa):
                out.append(Overlap(i, j, (ka if na < nb else pb.strip())))
    return out
