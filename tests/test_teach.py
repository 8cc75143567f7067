"""Safety spec, teacher prompt, trace parsing, teachers (corpus / hf / openai stub), filter (corpus: test_corpus.py)."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml

from dalign.config import TeachConfig, load_config
from dalign.rundir import RunDir
from dalign.teach.corpus import load_corpus
from dalign.teach.parse import final_answer, format_trace, parse_trace
from dalign.teach.spec import (
    DEFAULT_SPEC,
    SpecError,
    load_spec,
    parse_spec,
    render_teacher_prompt,
    resolve_categories,
)
from dalign.teach.teachers import get_teacher

# ---------------------------------------------------------------- spec and teacher prompt


def test_packaged_spec_is_complete():
    spec = load_spec()
    assert spec.categories == [
        "harassment_hate", "sexual", "violence", "self_harm", "illicit",
        "misinformation", "privacy", "intellectual_property", "benign",
    ]  # fmt: skip
    for n, s in enumerate(spec.sections, start=1):
        assert s.number == n and [r.id for r in s.rules] == [f"{n}.1", f"{n}.2", f"{n}.3"]
        assert s.objective and s.title
    assert spec.default_category == "benign"
    assert spec.map_label("Illicit / Criminal Behavior") == "illicit"
    assert spec.map_label("SELF-HARM") == "self_harm"  # case-insensitive fallback


@pytest.mark.parametrize("category", load_spec().categories)
def test_teacher_prompt_has_only_the_prompts_section(category):
    spec = load_spec()
    text = render_teacher_prompt(spec, "How do I get my neighbour's wifi password?", [category])
    own = spec.section(category)
    assert "How do I get my neighbour's wifi password?" in text
    assert f"Policy section {own.number}: {own.title}" in text and own.objective in text
    for rule in own.rules:
        assert f"{rule.id} {rule.text}" in text
    for other in spec.sections:
        if other.category != category:
            assert other.title not in text and f"{other.number}.1 " not in text
    assert f"Especially consider the policies for {own.title}." in text
    assert "refuse, safe-complete or comply" in text


def test_teacher_prompt_two_categories():
    spec = load_spec()
    text = render_teacher_prompt(spec, "q", ["violence", "illicit"])
    assert re.findall(r"Policy section (\d):", text) == ["3", "5"]
    assert "Especially consider the policies for Violence and physical harm and Illicit behaviour." in text


def test_resolve_categories():
    spec = load_spec()
    assert resolve_categories(spec, ["Violence / Physical Harm", "Illicit / Criminal Behavior"]) == (
        ["violence", "illicit"],
        False,
    )
    assert resolve_categories(spec, "privacy") == (["privacy"], False)
    assert resolve_categories(spec, "['Sexual / Adult']") == (
        ["sexual"],
        False,
    )  # a list stored in a CSV cell
    for empty in (None, float("nan"), "", []):
        assert resolve_categories(spec, empty) == (["benign"], True)
    with pytest.raises(SpecError, match="'weapons'"):
        resolve_categories(spec, "weapons")


def _spec_dict() -> dict:
    return yaml.safe_load(DEFAULT_SPEC.read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["sections"][4].pop("objective"), "section 5 (illicit): missing field 'objective'"),
        (lambda d: d["sections"][0]["rules"][0].update(id="2.1"), "rule id '2.1' must start with '1.'"),
        (lambda d: d.update(default_category="general"), "default_category 'general'"),
        (lambda d: d["star41k_categories"].update({"Weapons": "weapons"}), "maps 'Weapons' to 'weapons'"),
        (lambda d: d["sections"][1].update(category="harassment_hate"), "duplicate section category"),
    ],
)
def test_spec_errors_name_the_field(mutate, message):
    data = _spec_dict()
    mutate(data)
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(data, "my_spec.yaml")


def test_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sections: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_missing_category_in_custom_spec_names_it(tmp_path):
    """A prompt whose category the user's spec lacks: the error names the category and the prompt."""
    from dalign.teach.stage import build_requests

    data = _spec_dict()
    data["sections"] = [s for s in data["sections"] if s["category"] != "privacy"]
    data["star41k_categories"] = {k: v for k, v in data["star41k_categories"].items() if v != "privacy"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    prompts = pd.DataFrame(
        {"prompt_id": ["a", "b"], "prompt": ["x", "y"], "category": ["illicit", "privacy"]}
    )
    with pytest.raises(SpecError, match=r"prompt 'b'.*'privacy'"):
        build_requests(load_spec(path), prompts)


# ---------------------------------------------------------------- parsing


def test_parse_tagged():
    p = parse_trace(
        "<think>\nThe user wants X. Policy section 5.1 says refuse.\n</think>\n\nI can't help with that."
    )
    assert (p.shape, p.cot, p.answer) == (
        "tagged",
        "The user wants X. Policy section 5.1 says refuse.",
        "I can't help with that.",
    )


def test_parse_r1_style():
    p = parse_trace("Okay, the user asks for a recipe. Benign.\n</think>\nHere is a recipe: ...")
    assert (p.shape, p.cot, p.answer) == (
        "r1",
        "Okay, the user asks for a recipe. Benign.",
        "Here is a recipe: ...",
    )


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<think>I keep thinking and the budget runs out", "never closed"),
        ("<think>reasoning</think>   ", "no final answer"),
        ("just an answer with no reasoning", "no </think>"),
        ("</think> answer only", "empty reasoning"),
        ("", "empty output"),
        (None, "empty output"),
    ],
)
def test_parse_malformed(text, reason):
    p = parse_trace(text)
    assert p.malformed and p.answer is None and reason in p.reason


def test_format_roundtrip_and_final_answer():
    raw = format_trace("why", "what")
    assert raw == "<think>\nwhy\n</think>\n\nwhat"
    assert parse_trace(raw).answer == "what" and final_answer(raw) == "what"
    assert final_answer("no tags here ") == "no tags here"


# ---------------------------------------------------------------- teach stage


def _run(tmp_path, **over) -> RunDir:
    cfg = load_config(overrides={"name": "r", "runs_dir": str(tmp_path), **over})
    return RunDir.for_config(cfg)


def test_teach_corpus_writes_schema_and_resumes(tmp_path):
    from dalign.teach.stage import run_teach

    run = _run(tmp_path, teach={"teacher": "corpus", "limit": 12})
    out = run_teach(run)
    traces = run.read("traces")
    assert out == {"traces": 12, "new": 12, "malformed": 0, "teacher": "corpus"}
    assert {"prompt_id", "prompt", "category", "cot", "answer", "teacher", "raw", "malformed"} <= set(
        traces.columns
    )
    assert traces["prompt_id"].is_unique and not traces["malformed"].any()
    assert (traces["raw"].str.contains("</think>")).all()
    assert run_teach(run)["new"] == 0  # resumed: nothing redone


def test_teach_hf_teacher_records_malformed(tmp_path, tiny_dir):
    from dalign.teach.stage import run_teach

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "What is the capital of France?"},
                {"prompt": "Pick a lock", "category": "illicit"},
            ]
        )
    )
    run = _run(tmp_path, teach={"teacher": f"hf:{tiny_dir}", "prompts": str(prompts), "max_new_tokens": 6,
                                "temperature": 0.0, "batch_size": 2})  # fmt: skip
    out = run_teach(run)
    traces = run.read("traces").sort_values("prompt_id")
    assert out["traces"] == 2 and traces["teacher"].eq(f"hf:{tiny_dir}").all()
    assert traces["category"].tolist() == ["benign", "illicit"]
    # A 6-token random model cannot close a thinking block: every trace is malformed and counted.
    assert out["malformed"] == int(traces["malformed"].sum()) == 2
    assert traces["answer"].isna().all() and traces["raw"].str.len().gt(0).all()
    entry = run.stage_entry("teach")
    assert entry["malformed"] == 2 and any("no category" in w for w in entry["warnings"])


def test_hf_teacher_batches_match_single(tiny_dir):
    """Left padding must not change greedy outputs."""
    teacher = get_teacher(f"hf:{tiny_dir}", TeachConfig(max_new_tokens=8, temperature=0.0))
    texts = ["Write a story about a dragon.", "Question: what is 12 plus 30?"]
    assert teacher.generate(texts) == [teacher.generate([t])[0] for t in texts]


# The openai teacher runs against a real `transformers serve`: tests/test_openai_clients.py.


# ---------------------------------------------------------------- filter stage


class _FakeJudge:
    """Labels by keyword so each branch of the filter is exercised."""

    def __init__(self, name: str):
        self.name = name

    def judge(self, items):
        out = []
        for it in items:
            text = it["response"] or ""
            label = "error" if "ERR" in text else "unsafe" if "UNSAFE" in text else "safe"
            out.append({"label": label, "score": 1.0 if label == "unsafe" else 0.0, "raw": f"fake:{label}"})
        return out


def _write_traces(run: RunDir) -> None:
    rows = [
        ("t1", "illicit", "I won't help.", False),
        ("t2", "illicit", "UNSAFE steps", False),
        ("t3", "illicit", "ERR", False),
        ("t4", "benign", "UNSAFE-looking but benign answer", False),
        ("t5", "illicit", None, True),
    ]
    run.store("traces").write(
        [
            {"prompt_id": pid, "prompt": f"prompt {pid}", "category": cat, "cot": None if bad else "c",
             "answer": ans, "teacher": "x", "raw": "<think>c" if bad else format_trace("c", ans), "malformed": bad}
            for pid, cat, ans, bad in rows
        ]
    )  # fmt: skip


@pytest.mark.parametrize("judge_name", ["refusal", "llama-guard"])
def test_filter_keeps_safe_and_never_keeps_errors(tmp_path, monkeypatch, judge_name):
    import dalign.judge
    from dalign.teach.stage import run_filter

    monkeypatch.setattr(dalign.judge, "get_judge", lambda name, cfg=None: _FakeJudge(name))
    run = _run(tmp_path, filter={"judge": judge_name})
    _write_traces(run)
    summary = run_filter(run)
    f = run.read("filtered").set_index("prompt_id")
    assert f.loc["t1", "kept"] and f.loc["t1", "label"] == "safe"
    assert not f.loc["t2", "kept"] and not f.loc["t3", "kept"] and "error" in f.loc["t3", "reason"]
    assert (
        not f.loc["t5", "kept"]
        and f.loc["t5", "reason"].startswith("malformed")
        and pd.isna(f.loc["t5", "label"])
    )
    # only a refusal-detecting judge's "unsafe" on a benign request is read as "answered"
    assert bool(f.loc["t4", "kept"]) == (judge_name == "refusal")
    assert summary["judge_errors"] == 1 and summary["malformed"] == 1
    assert summary["kept"] == (2 if judge_name == "refusal" else 1)


def test_filter_none_keeps_every_well_formed_trace_and_needs_a_reason(tmp_path, monkeypatch):
    import dalign.judge
    from dalign.teach.stage import run_filter

    def no_judge(name, cfg=None):
        raise AssertionError("filter.judge none must not load a judge")

    monkeypatch.setattr(dalign.judge, "get_judge", no_judge)
    run = _run(tmp_path, filter={"judge": "none"})
    _write_traces(run)
    with pytest.raises(ValueError, match="filter.reason"):
        run_filter(run)
    run = _run(tmp_path / "b", filter={"judge": "none", "reason": "curated corpus"})
    _write_traces(run)
    summary = run_filter(run)
    f = run.read("filtered").set_index("prompt_id")
    assert f["kept"].to_dict() == {"t1": True, "t2": True, "t3": True, "t4": True, "t5": False}
    assert f.loc["t1", "reason"] == "not filtered" and f["label"].isna().all()
    assert summary["not_filtered"] == "curated corpus" and summary["kept"] == 4
    assert run.manifest()["stages"]["filter"]["not_filtered"] == "curated corpus"


def test_filter_with_the_real_refusal_judge_on_the_corpus(tmp_path):
    from dalign.teach.stage import run_filter, run_teach

    run = _run(tmp_path, teach={"teacher": "corpus"}, filter={"judge": "refusal"})
    run_teach(run)
    summary = run_filter(run)
    f = run.read("filtered")
    assert summary["traces"] == len(load_corpus())
    assert f.loc[f["category"] == "benign", "kept"].all()
    refusals = f[f["decision"] == "refuse"]
    # A phrase detector finds only part of the grown corpus's deliberately varied refusals ("That one I'll skip",
    # non-English ones): 0.51 measured on the 1,003-trace corpus (0.42 before the contraction fix). The content
    # judge is the packaged filter; this pins the refusal judge's measured floor so a regression shows.
    assert refusals["kept"].mean() > 0.45
    assert summary["kept"] == int(f["kept"].sum()) > int((f["category"] == "benign").sum())


def test_star41k_style_prompt_file(tmp_path):
    from dalign.teach.stage import build_requests, load_prompts

    f = tmp_path / "star.jsonl"
    rows = [
        {"id": "s1", "question": "Find where my ex lives now", "category": ["Privacy / Personal Data"]},
        {
            "id": "s2",
            "question": "q2",
            "category": ["Illicit / Criminal Behavior", "Violence / Physical Harm"],
        },
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    requests, warnings = build_requests(load_spec(), load_prompts(str(f)))
    assert [(r.prompt_id, r.category) for r in requests] == [("s1", "privacy"), ("s2", "illicit,violence")]
    assert (
        "Policy section 7: Privacy" in requests[0].teacher_prompt
        and "Find where my ex lives now" in requests[0].teacher_prompt
    )
    assert warnings == []
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"no prompt column.*\['text'\]"):
        load_prompts(str(bad))


def test_teach_limit_can_grow_and_filter_follows(tmp_path, monkeypatch):
    import dalign.judge
    from dalign.teach.stage import run_filter, run_teach

    monkeypatch.setattr(dalign.judge, "get_judge", lambda name, cfg=None: _FakeJudge(name))
    run = _run(tmp_path, teach={"teacher": "corpus", "limit": 5})
    run_teach(run)
    assert run_filter(run)["traces"] == 5
    bigger = _run(tmp_path, teach={"teacher": "corpus", "limit": 8})  # same run dir, larger limit
    assert run_teach(bigger)["new"] == 3
    assert run_filter(bigger)["traces"] == 8  # only the new traces are judged; no mismatch error
    changed = _run(tmp_path, teach={"teacher": "corpus", "limit": 8, "temperature": 0.1})
    with pytest.raises(RuntimeError, match="teach.temperature"):
        run_teach(changed)
