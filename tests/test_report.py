"""The report stage on hand-made run directories with known ASRs, and on incomplete runs."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dalign.config import load_config
from dalign.report.document import main_table_for_run, main_table_text
from dalign.report.stage import run_report
from dalign.rundir import RunDir

N = 4
# Safety benchmark "harm", 10 eval prompts: labels[prompt][candidate] (U unsafe, S safe, E error).
HARM = {
    "p0": "UUUU",
    "p1": "USUU",
    "p2": "USUU",
    "p3": "USUU",
    "p4": "USUU",
    "p5": "USUS",
    "p6": "SSUU",
    "p7": "SSUU",
    "p8": "SSUU",
    "p9": "SSEU",
}
# Utility benchmark "math", 8 prompts (C correct, W wrong).
MATH = {f"m{i}": ("CWWC" if i < 4 else "WCCW") for i in range(8)}
# Safety benchmark with no unsafe first sample: relative drops are undefined there.
CLEAN = {f"c{i}": "SSUS" for i in range(5)}
# Calibration prompts inside "harm": all unsafe; they must not move any reported number.
CALIB = {f"k{i}": "UUUU" for i in range(5)}
LETTER = {"U": "unsafe", "S": "safe", "E": "error", "C": "correct", "W": "wrong"}


def _config(**extra):
    over = {
        "sample": {
            "n": N,
            "datasets": [
                {"name": "harmbench", "benchmark": "harm"},
                {"name": "asdiv", "benchmark": "math"},
                {"name": "harmbench", "benchmark": "clean"},
            ],
        },
        "report": {"bootstrap": 300, "seed": 3},
        "select": {"default_layer": 2},
        "judge": {"judges": ["refusal", "guard"]},  # refusal is the primary judge of these tables
    }
    over.update(extra)
    return load_config(overrides=over)


def _rows():
    samples, judgments, scores = [], [], []
    sets = [("harm", HARM, "eval", "safety"), ("harm", CALIB, "calibration", "safety")]
    sets += [("math", MATH, "eval", "utility"), ("clean", CLEAN, "eval", "safety")]
    for bench, spec, role, kind in sets:
        for pid, labs in spec.items():
            for c, ch in enumerate(labs):
                samples.append(
                    {
                        "benchmark": bench,
                        "prompt_id": pid,
                        "candidate": c,
                        "prompt": "q",
                        "response": "r",
                        "token_ids": [1, 2, 3],
                        "n_tokens": 10 + c,
                        "finish_reason": "length" if c == 3 else "stop",
                        "seed": c,
                        "role": role,
                        "kind": kind,
                        "answer": None,
                        "category": "x",
                    }
                )
                judgments.append(
                    {
                        "benchmark": bench,
                        "prompt_id": pid,
                        "candidate": c,
                        "judge": "refusal",
                        "label": LETTER[ch],
                    }
                )
                bad = ch in "UW"
                # Layer 2: unsafe candidates look like the base (high similarity) -> argmin picks a safe one.
                # Layer 1: reversed, so its AUROC is below 0.5. kl: uninformative constant-ish values.
                for layer, v in ((1, 0.9 - 0.4 * bad), (2, 0.5 + 0.4 * bad)):
                    scores.append(
                        {
                            "benchmark": bench,
                            "prompt_id": pid,
                            "candidate": c,
                            "metric": "latent_similarity",
                            "layer": layer,
                            "value": v + 0.001 * c,
                        }
                    )
                scores.append(
                    {
                        "benchmark": bench,
                        "prompt_id": pid,
                        "candidate": c,
                        "metric": "kl",
                        "layer": None,
                        "value": 0.1 * c,
                    }
                )
    # A second judge on harm that flips two labels, for Cohen's kappa.
    second = [
        dict(
            j,
            judge="guard",
            label=("safe" if j["label"] == "unsafe" and j["prompt_id"] in ("p0", "p6") else j["label"]),
        )
        for j in judgments
        if j["benchmark"] == "harm"
    ]
    return samples, judgments + second, scores


SKIP = {"p9", "m7", "c4"}  # prompts the calibrated selector "forgot": they show up as missing


def _selection(prompts: dict[str, dict[str, str]]) -> pd.DataFrame:
    """single = 0; perplexity = 1; kl = 2; latent@2 and @calibrated = first safe/correct candidate
    (@calibrated skips the SKIP prompts); oracle-any-safe likewise."""
    rows = []
    for bench, spec in prompts.items():
        for pid, labs in spec.items():
            good = next((i for i, ch in enumerate(labs) if ch in "SC"), 0)
            picks = {
                "single": 0,
                "perplexity": 1,
                "kl": 2,
                "latent_similarity@2": good,
                "oracle-any-safe": good,
            }
            if pid not in SKIP:
                picks["latent_similarity@calibrated"] = good
            rows += [
                {"benchmark": bench, "selector": s, "prompt_id": pid, "chosen_candidate": c}
                for s, c in picks.items()
            ]
    return pd.DataFrame(rows)


def make_run(path: Path, parts=("samples", "judgments", "scores", "selection"), cfg=None) -> RunDir:
    run = RunDir.for_config(cfg or _config(name=path.name, runs_dir=str(path.parent)))
    samples, judgments, scores = _rows()
    tables = {
        "samples": pd.DataFrame(samples),
        "judgments": pd.DataFrame(judgments),
        "scores": pd.DataFrame(scores).astype({"layer": "Int64"}),
        "selection": _selection({"harm": {**HARM, **CALIB}, "math": MATH, "clean": CLEAN}),
    }
    for name in parts:
        run.store(name).write(tables[name])
    (run.path / "adapter").mkdir(exist_ok=True)
    card = {
        "base_model": "packaged:smollm2-135m-instruct",
        "data": "https://example.org/corpus",
        "lora_r": 32,
    }
    (run.path / "adapter" / "card.json").write_text(json.dumps(card))
    m = run.manifest()
    m["stages"]["select"] = {"status": "done", "calibrated_layer": 2, "started": "2026-01-01T00:00:00+00:00"}
    run.manifest_path.write_text(json.dumps(m))
    return run


def strict_json(path: Path) -> dict:
    def no_nan(token):
        raise AssertionError(f"{path} holds {token}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=no_nan)


def recompute_rates(run: RunDir, judge: str = "refusal") -> dict[tuple[str, str], tuple[int, int, int]]:
    """(benchmark, selector) -> (hits, valid, errors) straight from the parquet files, by another route."""
    samples = pd.read_parquet(run.path / "samples.parquet")
    judg = pd.read_parquet(run.path / "judgments.parquet")
    sel = pd.read_parquet(run.path / "selection.parquet")
    eval_ids = set(
        zip(
            samples.loc[samples.role == "eval", "benchmark"],
            samples.loc[samples.role == "eval", "prompt_id"],
            strict=True,
        )
    )
    label = {(r.benchmark, r.prompt_id, r.candidate): r.label for r in judg[judg.judge == judge].itertuples()}
    out: dict = {}
    for r in sel.itertuples():
        if (r.benchmark, r.prompt_id) not in eval_ids:
            continue
        lab = label.get((r.benchmark, r.prompt_id, r.chosen_candidate))
        h, v, e = out.get((r.benchmark, r.selector), (0, 0, 0))
        out[(r.benchmark, r.selector)] = (
            h + (lab in ("unsafe", "correct")),
            v + (lab in ("unsafe", "safe", "correct", "wrong")),
            e + (lab == "error"),
        )
    return out


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[RunDir, dict, dict]:
    run = make_run(tmp_path_factory.mktemp("runs") / "full")
    summary = run_report(run)
    return run, summary, strict_json(run.path / "results.json")


def test_known_asrs(full):
    _, summary, res = full
    assert summary["benchmarks"] == ["clean", "harm", "math"]
    harm = res["safety"]["harm"]
    assert harm["n_prompts"] == 10  # the 5 calibration prompts are not counted
    sel = harm["selectors"]
    assert sel["single"]["value"] == pytest.approx(0.6)
    assert sel["perplexity"]["value"] == pytest.approx(0.1)
    assert sel["perplexity"]["relative_drop"] == pytest.approx((0.6 - 0.1) / 0.6)
    assert (sel["kl"]["hits"], sel["kl"]["valid"], sel["kl"]["errors"]) == (9, 9, 1)
    assert sel["kl"]["value"] == 1.0
    assert sel["kl"]["relative_drop"] == pytest.approx(-2 / 3)
    assert sel["latent_similarity@2"]["value"] == pytest.approx(0.1)  # p0 has no safe candidate
    cal = sel["latent_similarity@calibrated"]
    assert (cal["hits"], cal["valid"], cal["missing"]) == (1, 9, 1)
    assert sel["oracle-any-safe"]["oracle"] is True
    assert harm["order"][:4] == ["single", "perplexity", "kl", "latent_similarity@2"]
    assert harm["order"][-2:] == ["latent_similarity@calibrated", "oracle-any-safe"]
    math_ = res["utility"]["math"]["selectors"]
    assert math_["single"]["value"] == 0.5
    assert math_["latent_similarity@2"]["value"] == 1.0
    assert math_["latent_similarity@2"]["relative_drop"] == pytest.approx(-1.0)  # utility gained


def test_numbers_match_independent_recomputation(full):
    run, _, res = full
    for (bench, selector), (h, v, e) in recompute_rates(run).items():
        kind = "utility" if bench == "math" else "safety"
        r = res[kind][bench]["selectors"][selector]
        assert (r["hits"], r["valid"], r["errors"]) == (h, v, e), (bench, selector)
        if v:
            assert r["value"] == pytest.approx(h / v)
            lo, hi = r["ci"]
            assert lo - 1e-12 <= r["value"] <= hi + 1e-12


def test_zero_single_asr_gives_null_drop_with_note(full):
    _, _, res = full
    clean = res["safety"]["clean"]["selectors"]
    assert clean["single"]["value"] == 0.0
    assert clean["kl"]["value"] == 1.0
    assert clean["kl"]["relative_drop"] is None
    assert "0" in clean["kl"]["drop_note"]


def test_figure5_numbers(full):
    _, _, res = full
    f5 = res["figure5"]["harm"]
    assert f5["n_prompts"] == 10
    assert f5["asr_single"] == pytest.approx(0.6)
    assert f5["asr_majority"] == pytest.approx(0.5)  # p0..p4; p5 has 2 of 4 unsafe
    assert f5["n_failing"] == 6
    assert f5["share_failing_with_safe"] == pytest.approx(5 / 6)
    assert f5["safe_count_hist"] == {"0": 1, "1": 4, "2": 1}


def _brute_oriented_auroc(run: RunDir, layer: int) -> float:
    samples = pd.read_parquet(run.path / "samples.parquet")
    scores = pd.read_parquet(run.path / "scores.parquet")
    judg = pd.read_parquet(run.path / "judgments.parquet")
    judg = judg[(judg.judge == "refusal") & judg.label.isin(["safe", "unsafe"])]
    ev = samples[(samples.role == "eval") & (samples.kind == "safety")][
        ["benchmark", "prompt_id", "candidate"]
    ]
    df = scores[(scores.metric == "latent_similarity") & (scores.layer == layer)].merge(ev).merge(judg)
    safe = df[df.label == "safe"].value.to_numpy()
    unsafe = df[df.label == "unsafe"].value.to_numpy()
    # argmin metric: the selector prefers the lower value, so a "win" is safe < unsafe.
    wins = sum(1.0 if s < u else 0.5 if s == u else 0.0 for s in safe for u in unsafe)
    return wins / (len(safe) * len(unsafe))


def test_auroc_oriented_and_checked_by_brute_force(full):
    run, _, res = full
    pooled = res["auroc"]["(all safety)"]
    assert pooled["latent_similarity@2"]["auroc"] == pytest.approx(_brute_oriented_auroc(run, 2))
    assert pooled["latent_similarity@1"]["auroc"] == pytest.approx(_brute_oriented_auroc(run, 1))
    assert pooled["latent_similarity@2"]["auroc"] > 0.9
    assert pooled["latent_similarity@1"]["auroc"] < 0.1
    assert pooled["latent_similarity@2"]["direction"] == "min"
    assert pooled["kl"]["direction"] == "max"
    assert set(res["auroc"]) == {"harm", "clean", "(all safety)"}


def test_layer_ablation_uses_selection_only(full):
    _, _, res = full
    abl = res["ablation"]["harm"]
    # The report never re-selects: layer 1 was scored but `dalign select` wrote no latent_similarity@1 rows.
    assert set(abl) == {"2"} and abl["2"]["source"] == "selection"
    assert abl["2"]["value"] == pytest.approx(0.1)


def test_judge_agreement_kappa(full):
    _, _, res = full
    (ag,) = res["agreement"]
    assert ag["judges"] == ["guard", "refusal"]
    # Eval rows of harm only: 40 rows, 1 error row left out; guard flips p0's 4 unsafe and p6's 2 unsafe to safe.
    assert ag["n"] == 39 and ag["n_error_excluded"] == 1
    assert ag["agreement"] == pytest.approx(33 / 39)
    refusal_unsafe, guard_unsafe = 25 / 39, 19 / 39
    p_e = refusal_unsafe * guard_unsafe + (1 - refusal_unsafe) * (1 - guard_unsafe)
    assert ag["kappa"] == pytest.approx((33 / 39 - p_e) / (1 - p_e))


def test_files_exist_and_parse(full):
    run, summary, res = full
    for key in ("report", "html", "results"):
        assert Path(summary[key]).is_file()
    md = (run.path / "report.md").read_text()
    assert "Table 1" in md and "Figure 5" in md and "Figure 6" in md and "Layer ablation" in md
    assert "latent_similarity@calibrated (layer 2) †" not in md  # calibrated is not an oracle
    assert "latent_similarity@calibrated (layer 2)" in md
    assert "oracle-any-safe †" in md
    for rel in res["figures"].values():
        png = run.path / rel
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({rel})" in md
    assert set(res["figures"]) >= {
        "safety",
        "utility",
        "figure5",
        "densities",
        "auroc_layers",
        "ablation",
        "lengths",
    }
    html = (run.path / "report.html").read_text()
    assert "https://example.org/corpus" in md  # the adapter card is shown in full in Markdown ...
    assert "example.org/corpus" in html  # ... and in HTML without its URL scheme: nothing to fetch
    assert "http://" not in html and "https://" not in html
    images = [chunk.split('"', 1)[0] for chunk in html.split('src="data:image/png;base64,')[1:]]
    assert len(images) == len(res["figures"])
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in images)
    _check_html_balanced(html)
    assert run.stage_entry("report")["status"] == "done"


class _Balance(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()


def _check_html_balanced(html: str) -> None:
    p = _Balance()
    p.feed(html)
    p.close()
    assert p.stack == []


def test_main_table_text(full):
    run, _, res = full
    text = main_table_text(res)
    assert "| single | 0.0 (ref.) | 60.0 (ref.) |" in text
    assert "| perplexity |" in text and "+83.3 %" in text
    assert main_table_for_run(run.path) == text
    assert "dalign report" in main_table_for_run(run.path / "nowhere")


def test_rerun_is_idempotent_and_drops_stale_figures(full, tmp_path):
    run = make_run(tmp_path / "again")
    first = run_report(run)
    res1 = strict_json(run.path / "results.json")
    # Remove the scores: the AUROC/density figures must disappear, the rest stay identical.
    run.clear(["scores"])
    run_report(run)
    res2 = strict_json(run.path / "results.json")
    assert res2["safety"]["harm"]["selectors"] == res1["safety"]["harm"]["selectors"]
    assert not (run.path / "figures" / "figure6_densities.png").exists()
    assert any("scores" in m for m in res2["missing"])
    assert first["figures"] > len(res2["figures"])


def test_incomplete_runs_do_not_crash(tmp_path):
    # Nothing at all.
    empty = RunDir.for_config(_config(name="empty", runs_dir=str(tmp_path)))
    out = run_report(empty)
    res = strict_json(Path(out["results"]))
    assert len(res["missing"]) == 4 and res["safety"] == {} and res["figures"] == {}
    md = Path(out["report"]).read_text()
    assert "Status" in md and "samples" in md and "No judged benchmark" in md
    # Samples and judgments only: single-sample rates and Figure 5, no selectors beyond `single`.
    part = make_run(tmp_path / "part", parts=("samples", "judgments"))
    res = strict_json(Path(run_report(part)["results"]))
    assert list(res["safety"]["harm"]["selectors"]) == ["single"]
    assert res["safety"]["harm"]["selectors"]["single"]["value"] == pytest.approx(0.6)
    assert res["figure5"]["harm"]["asr_single"] == pytest.approx(0.6)
    assert res["auroc"] == {} and {m.split(":")[0] for m in res["missing"]} == {"scores", "selection"}
    # Judgments and scores without samples or selection: the report never re-selects (only `single` is
    # reported, with a note), and the calibration prompts, which can no longer be told apart, are counted.
    noselect = make_run(tmp_path / "nosel", parts=("judgments", "scores"))
    res = strict_json(Path(run_report(noselect)["results"]))
    sels = res["safety"]["harm"]["selectors"]
    assert set(sels) == {"single"}
    assert res["safety"]["harm"]["n_prompts"] == 15
    assert any("selection.parquet is absent" in n for n in res["notes"])
    assert any("every row is counted" in n for n in res["notes"])


def test_lengths_compare_models_when_present(tmp_path):
    run = make_run(tmp_path / "lens", parts=("judgments",))
    samples, _, _ = _rows()
    df = pd.DataFrame(samples)
    base = df.assign(model="base", n_tokens=df["n_tokens"] * 3)
    run.store("samples").write(pd.concat([df.assign(model="aligned"), base], ignore_index=True))
    res = strict_json(Path(run_report(run)["results"]))
    rows = {(r["benchmark"], r["model"]): r for r in res["lengths"]["rows"]}
    assert res["lengths"]["compare"] is True
    assert rows[("harm", "base")]["mean_tokens"] == pytest.approx(
        3 * rows[("harm", "aligned")]["mean_tokens"]
    )
    assert rows[("harm", "aligned")]["truncated_share"] == pytest.approx(0.25)


def test_unreadable_shard_is_reported_not_raised(tmp_path):
    run = make_run(tmp_path / "bad", parts=("samples", "judgments", "scores"))
    shard = run.store("scores").files()[0]  # a committed shard the disk then damaged
    shard.write_bytes(b"not parquet")
    res = strict_json(Path(run_report(run)["results"]))
    assert any(m.startswith("scores: unreadable") for m in res["missing"])
    assert math.isclose(res["safety"]["harm"]["selectors"]["single"]["value"], 0.6)
    assert np.isfinite(res["safety"]["harm"]["selectors"]["single"]["ci"][0])


def test_all_safe_run_has_undefined_auroc_and_no_layer_figure(tmp_path):
    run = make_run(tmp_path / "safe", parts=("samples", "scores", "selection"))
    _, judgments, _ = _rows()
    safe = [dict(j, label="safe") if j["label"] in ("unsafe", "error") else j for j in judgments]
    run.store("judgments").write(pd.DataFrame(safe))
    res = strict_json(Path(run_report(run)["results"]))
    pooled = res["auroc"]["(all safety)"]["latent_similarity@2"]
    assert pooled["auroc"] is None and pooled["n_unsafe"] == 0 and pooled["within_prompt_pairs"] == 0
    assert "auroc_layers" not in res["figures"]
    assert res["safety"]["harm"]["selectors"]["single"]["value"] == 0.0
    assert res["figure5"]["harm"]["share_failing_with_safe"] is None
