"""The shipped trace corpus: deliberative traces written for this project (see corpus/CARD.md).

Each JSONL line holds id, prompt, category, decision, cot, answer. `load_corpus()` validates every line and names
the file and line of any problem; `corpus_card()` summarises sizes, categories, decisions and diversity (the
numbers in corpus/CARD.md come from it).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd

from dalign.data.dedup import normalize
from dalign.teach.spec import Spec, load_spec

CORPUS_DIR = Path(__file__).with_name("corpus")
FIELDS = ["id", "prompt", "category", "decision", "cot", "answer"]
DECISIONS = {"refuse", "safe_complete", "comply"}

# STAR-41K category shares (DESIGN.md §3), for comparing the corpus's harmful mix.
STAR41K_SHARES = {
    "harassment_hate": 0.231,
    "sexual": 0.067,
    "violence": 0.134,
    "self_harm": 0.036,
    "illicit": 0.302,
    "misinformation": 0.107,
    "privacy": 0.089,
    "intellectual_property": 0.034,
}


# Word-count bins of the card's length histograms (upper edges; the last bin is open).
LENGTH_BINS = {
    "prompt": [10, 20, 40, 80, 160],
    "cot": [40, 60, 80, 100, 120, 150],
    "answer": [25, 50, 100, 150, 200],
}


class CorpusError(ValueError):
    pass


def corpus_files(directory: Path = CORPUS_DIR) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def _check_record(rec: object, where: str, categories: set[str]) -> dict:
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        raise CorpusError(f"{where}: missing field(s) {missing}; each line needs {FIELDS}")
    for f in FIELDS:
        if not isinstance(rec[f], str) or not rec[f].strip():
            raise CorpusError(f"{where}: field {f!r} must be a non-empty string")
    if rec["category"] not in categories:
        raise CorpusError(
            f"{where}: category {rec['category']!r} is not a spec category {sorted(categories)}"
        )
    if rec["decision"] not in DECISIONS:
        raise CorpusError(f"{where}: decision {rec['decision']!r} must be one of {sorted(DECISIONS)}")
    return {f: rec[f] for f in FIELDS}


def load_corpus(files: list[Path] | None = None, spec: Spec | None = None) -> pd.DataFrame:
    """All corpus traces as a DataFrame (+ a `file` column); raises CorpusError naming file:line on bad rows."""
    spec = spec or load_spec()
    files = corpus_files() if files is None else files
    if not files:
        raise CorpusError(f"no *.jsonl trace files in {CORPUS_DIR}; reinstall dalign")
    rows, seen = [], {}
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e})") from e
            row = _check_record(rec, where, set(spec.categories))
            if row["id"] in seen:
                raise CorpusError(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
            seen[row["id"]] = where
            rows.append({**row, "file": path.name})
    return pd.DataFrame(rows, columns=[*FIELDS, "file"])


def corpus_hash(df: pd.DataFrame | None = None) -> str:
    """Content hash of the traces, so a grown corpus invalidates runs made with an older one."""
    df = load_corpus() if df is None else df
    h = hashlib.sha256()
    for rec in df.sort_values("id")[FIELDS].itertuples(index=False):
        h.update(json.dumps(list(rec)).encode())
    return h.hexdigest()[:16]


def corpus_card(df: pd.DataFrame | None = None, spec: Spec | None = None) -> dict:
    """Counts for the dataset card: size, per category, per decision, per file, and the harmful mix vs STAR-41K."""
    spec = spec or load_spec()
    df = load_corpus(spec=spec) if df is None else df
    harmful = df[df["category"] != spec.default_category]
    by_cat = Counter(df["category"])
    return {
        "size": len(df),
        "hash": corpus_hash(df),
        "files": dict(Counter(df["file"])) if "file" in df else {},
        "categories": {c: by_cat.get(c, 0) for c in spec.categories},
        "decisions": dict(Counter(df["decision"])),
        "decision_shares": {d: round(n / max(len(df), 1), 3) for d, n in Counter(df["decision"]).items()},
        "category_decisions": {
            c: dict(Counter(df.loc[df["category"] == c, "decision"]))
            for c in spec.categories
            if by_cat.get(c)
        },
        "benign_share": round(1 - len(harmful) / max(len(df), 1), 3),
        "harmful_shares": {c: round(by_cat.get(c, 0) / max(len(harmful), 1), 3) for c in STAR41K_SHARES},
        "star41k_shares": STAR41K_SHARES,
        "mean_words": {
            "prompt": round(df["prompt"].str.split().str.len().mean(), 1),
            "cot": round(df["cot"].str.split().str.len().mean(), 1),
            "answer": round(df["answer"].str.split().str.len().mean(), 1),
        },
        "distinct": {
            f: {"distinct_1": distinct_n(df[f], 1), "distinct_2": distinct_n(df[f], 2)}
            for f in ("prompt", "answer")
        },
        "length_histograms": {f: length_histogram(df[f], edges) for f, edges in LENGTH_BINS.items()},
        "top_openings": {
            "answers": top_openings(df["answer"]),
            "refusals": top_openings(df.loc[df["decision"] == "refuse", "answer"]),
        },
    }


def _words(text: str) -> list[str]:
    return normalize(text).split()


def distinct_n(texts: pd.Series, n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams over all n-grams, pooled over the texts."""
    grams = [tuple(w[i : i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
    return round(len(set(grams)) / max(len(grams), 1), 3)


def length_histogram(texts: pd.Series, edges: list[int]) -> dict[str, int]:
    """Counts of texts per word-count bin, e.g. {'<=10': 3, '11-20': 5, ..., '>160': 0}."""
    labels = [f"<={edges[0]}"] + [f"{lo + 1}-{hi}" for lo, hi in zip(edges, edges[1:], strict=False)]
    counts = dict.fromkeys([*labels, f">{edges[-1]}"], 0)
    keys = list(counts)
    for n in texts.str.split().str.len():
        counts[keys[sum(n > e for e in edges)]] += 1
    return counts


def top_openings(texts: pd.Series, words: int = 3, top: int = 5) -> list[dict]:
    """The most repeated first `words` words (normalised) with count and share: a template shows up here."""
    heads = Counter(" ".join(_words(t)[:words]) for t in texts)
    return [
        {"opening": h, "count": c, "share": round(c / max(len(texts), 1), 3)}
        for h, c in heads.most_common(top)
    ]


def filter_card(judge_name: str, df: pd.DataFrame | None = None, spec: Spec | None = None) -> dict:
    """What the filter stage would keep with `judge_name`: kept counts per category x decision, and why the rest
    were dropped (the stage's own `decide` rule on the judge's verdicts for (prompt, answer))."""
    from dalign.judge import get_judge
    from dalign.teach.stage import decide

    spec = spec or load_spec()
    df = load_corpus(spec=spec) if df is None else df
    rows = [{**r, "malformed": False} for r in df[FIELDS].to_dict("records")]
    verdicts = get_judge(judge_name).judge(
        [{"prompt": r["prompt"], "response": r["answer"], "answer": r["answer"]} for r in rows]
    )
    kept, reasons = Counter(), Counter()
    for r, v in zip(rows, verdicts, strict=True):
        keep, why = decide(r, v, judge_name, spec.default_category, False)
        kept[(r["category"], r["decision"], keep)] += 1
        if not keep:
            reasons[why] += 1
    return {
        "judge": judge_name,
        "kept": sum(n for (_, _, k), n in kept.items() if k),
        "size": len(rows),
        "by_decision": {
            d: {"kept": sum(n for (_, dd, k), n in kept.items() if dd == d and k), "total": n_d}
            for d, n_d in Counter(df["decision"]).items()
        },
        "by_category": {
            c: {"kept": sum(n for (cc, _, k), n in kept.items() if cc == c and k), "total": n_c}
            for c, n_c in Counter(df["category"]).items()
        },
        "dropped_because": dict(reasons.most_common()),
    }


if __name__ == "__main__":  # .venv/bin/python -m dalign.teach.corpus [judge ...]: the card's numbers as JSON
    import sys

    out = {"card": corpus_card()}
    out["filters"] = [filter_card(j) for j in sys.argv[1:]]
    print(json.dumps(out, indent=1, ensure_ascii=False))
