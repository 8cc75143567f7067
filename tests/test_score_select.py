"""Selection on constructed scores and labels: directions, ties/NaN, references, layer calibration vs oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dalign.config import load_config
from dalign.rundir import RunDir
from dalign.score.bestofn import pick
from dalign.score.select import SelectError, choose, run_select


def make_run(tmp_path, **select) -> RunDir:
    return RunDir.for_config(
        load_config(
            overrides={"name": "s", "runs_dir": str(tmp_path), "select": {"default_layer": 2, **select}}
        )
    )


def write(run: RunDir, samples: list[dict], labels: dict, scores: list[tuple]) -> None:
    run.store("samples").write(pd.DataFrame(samples))
    run.store("judgments").write(
        pd.DataFrame(
            [
                {
                    "benchmark": b,
                    "prompt_id": p,
                    "candidate": c,
                    "judge": "refusal",
                    "label": lab,
                    "score": 0.0,
                }
                for (b, p, c), lab in labels.items()
            ]
        )
    )
    df = pd.DataFrame(scores, columns=["benchmark", "prompt_id", "candidate", "metric", "layer", "value"])
    df["layer"] = df["layer"].astype("Int64")
    run.store("scores").write(df)


def sel(run: RunDir, selector: str) -> dict:
    s = run.read("selection")
    s = s[s["selector"] == selector]
    return {
        (b, p): c for b, p, c in s[["benchmark", "prompt_id", "chosen_candidate"]].itertuples(index=False)
    }


def sample_rows(bench: str, pids: list[str], n: int, role: str = "eval", kind: str = "safety") -> list[dict]:
    return [
        {"benchmark": bench, "prompt_id": p, "candidate": c, "role": role, "kind": kind}
        for p in pids
        for c in range(n)
    ]


def test_choose_directions_ties_and_nan():
    df = pd.DataFrame(
        {
            "benchmark": ["b"] * 8,
            "prompt_id": ["x"] * 4 + ["y"] * 4,
            "candidate": [0, 1, 2, 3] * 2,
            "value": [0.5, 0.1, 0.9, 0.1, np.nan, np.nan, np.nan, np.nan],
        }
    )
    lo = choose(df, "argmin").set_index("prompt_id")["chosen_candidate"]
    hi = choose(df, "argmax").set_index("prompt_id")["chosen_candidate"]
    assert lo["x"] == 1  # tie 0.1 at candidates 1 and 3 -> lowest index
    assert hi["x"] == 2
    assert lo["y"] == 0 and hi["y"] == 0  # all NaN -> candidate 0
    df.loc[5, "value"] = -3.0
    assert (
        choose(df, "argmax").set_index("prompt_id")["chosen_candidate"]["y"] == 1
    )  # NaN never beats a value
    assert pick([float("nan"), 2.0, 1.0], "argmin") == 2 and pick([float("nan"), 2.0, 1.0], "argmax") == 1
    with pytest.raises(SelectError):
        choose(df, "max")


def test_metric_selectors_follow_registered_direction(tmp_path):
    run = make_run(tmp_path)
    labels = {("dan", "p0", c): lab for c, lab in enumerate(["unsafe", "safe", "unsafe", "safe"])}
    scores = []
    for c, (lat, kl, ppl, sc) in enumerate(
        [(0.9, 0.1, 5, 0.2), (0.2, 0.3, 9, 0.1), (0.5, 0.8, 2, 0.3), (0.7, 0.2, 4, 0.9)]
    ):
        scores += [
            ("dan", "p0", c, "latent_similarity", 2, lat),
            ("dan", "p0", c, "kl", None, kl),
            ("dan", "p0", c, "perplexity", None, ppl),
            ("dan", "p0", c, "self_certainty", None, sc),
        ]
    write(run, sample_rows("dan", ["p0"], 4), labels, scores)
    out = run_select(run)
    assert sel(run, "latent_similarity@2")[("dan", "p0")] == 1  # argmin
    assert sel(run, "kl")[("dan", "p0")] == 2  # argmax
    assert sel(run, "perplexity")[("dan", "p0")] == 2  # argmin
    assert sel(run, "self_certainty")[("dan", "p0")] == 3  # argmax
    assert sel(run, "single")[("dan", "p0")] == 0
    assert sel(run, "oracle-any-safe")[("dan", "p0")] == 1
    assert sel(run, "majority")[("dan", "p0")] == 0  # 2-2 tie -> candidate 0's label (unsafe) -> candidate 0
    assert out["calibrated_layer"] is None and any("no calibration prompts" in w for w in out["warnings"])


def test_majority_and_any_safe(tmp_path):
    run = make_run(tmp_path)
    labs = ["unsafe", "safe", "safe", "error", "safe"]
    labels = {("wj", "q", c): lab for c, lab in enumerate(labs)}
    labels |= {("wj", "r", c): "unsafe" for c in range(5)}
    scores = [("wj", p, c, "random", None, 0.5) for p in ("q", "r") for c in range(5)]
    write(run, sample_rows("wj", ["q", "r"], 5), labels, scores)
    run_select(run)
    assert sel(run, "majority") == {("wj", "q"): 1, ("wj", "r"): 0}
    assert sel(run, "oracle-any-safe") == {("wj", "q"): 1, ("wj", "r"): 0}


def test_metric_selection_ignores_labels(tmp_path):
    rng = np.random.default_rng(0)
    pids = [f"p{i}" for i in range(6)]
    scores = [("dan", p, c, "latent_similarity", 3, float(rng.random())) for p in pids for c in range(4)]
    picks = []
    for flip in (False, True):
        run = make_run(tmp_path / str(flip))
        labels = {
            ("dan", p, c): ("safe" if (c % 2 == 0) != flip else "unsafe") for p in pids for c in range(4)
        }
        write(run, sample_rows("dan", pids, 4), labels, scores)
        run_select(run)
        picks.append(sel(run, "latent_similarity@3"))
    assert picks[0] == picks[1]


def _calibration_case(tmp_path, **select):
    """Layers 1..3. Calibration: layer 3 picks safe candidates, layer 1 unsafe. Eval: layer 1 is the best.

    Candidate 1 is always safe and candidate 0 unsafe; a layer 'points at' candidate 1 by giving it the lowest
    similarity.
    """
    run = make_run(tmp_path, **select)
    cal, ev, util = ["c0", "c1", "c2"], ["e0", "e1"], ["u0", "u1"]
    samples = sample_rows("dan", cal, 2, role="calibration") + sample_rows("dan", ev, 2)
    samples += sample_rows("gsm", util, 2, role="calibration", kind="utility")
    labels = {("dan", p, c): ("safe" if c == 1 else "unsafe") for p in cal + ev for c in range(2)}
    # Utility: candidate 0 correct, 1 wrong: a layer that picks candidate 1 loses utility.
    labels |= {("gsm", p, c): ("correct" if c == 0 else "wrong") for p in util for c in range(2)}
    good_layer = {"c": 3, "e": 1}
    scores = []
    for p in cal + ev:
        for layer in (1, 2, 3):
            target = 1 if layer == good_layer[p[0]] else 0
            scores += [
                ("dan", p, c, "latent_similarity", layer, 0.1 if c == target else 0.9) for c in range(2)
            ]
    for p in util:
        for layer in (1, 2, 3):
            target = 1 if layer == 3 else 0  # layer 3 hurts utility
            scores += [
                ("gsm", p, c, "latent_similarity", layer, 0.1 if c == target else 0.9) for c in range(2)
            ]
    write(run, samples, labels, scores)
    return run


def test_calibration_picks_layer_on_calibration_prompts_only(tmp_path):
    run = _calibration_case(tmp_path)
    out = run_select(run)
    assert out["calibrated_layer"] == 3
    assert out["oracle_layers"] == {"dan": 1}
    entry = run.stage_entry("select")
    assert entry["calibrated_layer"] == 3
    table = {r["layer"]: r for r in entry["calibration"]["latent_similarity"]["table"]}
    assert table[3]["asr"] == 0.0 and table[1]["asr"] == 1.0 and table[3]["utility_drop"] == 1.0
    assert sel(run, "latent_similarity@calibrated") == {("dan", "e0"): 0, ("dan", "e1"): 0}
    assert sel(run, "latent_similarity@oracle") == {("dan", "e0"): 1, ("dan", "e1"): 1}
    s = run.read("selection")
    assert not s["prompt_id"].str.startswith(("c", "u")).any()  # calibration prompts never in the selection
    assert {"single", "majority", "oracle-any-safe", "latent_similarity@1"} <= set(s["selector"])


def test_utility_constraint_rejects_layer(tmp_path):
    run = _calibration_case(tmp_path, utility_constraint=0.1)
    out = run_select(run)
    assert out["calibrated_layer"] in (1, 2) and out["calibrated_layer"] == 2  # ties -> default layer 2
    table = {r["layer"]: r for r in run.stage_entry("select")["calibration"]["latent_similarity"]["table"]}
    assert not table[3]["allowed"] and table[2]["allowed"]


def test_unknown_selector_and_metric(tmp_path):
    run = make_run(tmp_path, selectors=["latent_similarity@7"])
    write(
        run,
        sample_rows("dan", ["p"], 2),
        {("dan", "p", 0): "safe", ("dan", "p", 1): "unsafe"},
        [("dan", "p", c, "latent_similarity", 2, 0.5) for c in range(2)],
    )
    with pytest.raises(
        SelectError, match=r"selector 'latent_similarity@7' has no scores; scored: latent_similarity@2"
    ):
        run_select(run)
