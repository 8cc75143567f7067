"""The report stage: results.json, figures/*.png, report.md and a self-contained report.html in the run dir.

The report is derived from the other artifacts and cheap to redo, so it is always rewritten in full; it never
refuses a run made under another report config (it just replaces the old report). On an incomplete run it
reports what exists and lists what is missing instead of failing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from dalign.attack.artifact import read as read_attacks
from dalign.report import analysis, attack, document, figures
from dalign.report.facts import gather
from dalign.report.inputs import LAYERED, Inputs, load_inputs
from dalign.report.render import to_html, to_markdown
from dalign.rundir import RunDir, atomic_write_text

OUTPUTS = ("report.md", "report.html", "results.json", "figures")
FIGURES = {
    "safety": "table1_safety.png",
    "utility": "table1_utility.png",
    "figure5": "figure5_headroom.png",
    "densities": "figure6_densities.png",
    "auroc_layers": "figure6_auroc_layers.png",
    "ablation": "layer_ablation.png",
    "lengths": "response_length.png",
    "models": "models_alignment_gap.png",
    "attack": attack.FIGURE,
}


Step = Callable[[str], None]


@contextmanager
def _progress() -> Iterator[Step]:
    """A transient spinner on stderr naming the current step (the report takes seconds to a minute)."""
    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("report: {task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("starting", total=None)
        yield lambda what: bar.update(task, description=what)


def jsonable(x: Any) -> Any:
    """NaN/inf → null and numpy scalars → Python, so results.json is strict JSON."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is pd.NA or x is pd.NaT:
        return None
    return x


def _density_keys(values: pd.DataFrame, default_layer: int, calibrated: Any) -> list[str]:
    """Every non-layered metric, plus latent similarity at the default layer (and the calibrated one)."""
    keys = sorted({k for k in values["key"] if "@" not in k})
    latent = sorted(
        {k for k in values["key"] if k.startswith(f"{LAYERED}@")}, key=lambda k: int(k.split("@")[1])
    )
    wanted = [f"{LAYERED}@{default_layer}"]
    if isinstance(calibrated, int):
        wanted.append(f"{LAYERED}@{calibrated}")
    chosen = [k for k in dict.fromkeys(wanted) if k in latent] or latent[
        len(latent) // 2 : len(latent) // 2 + 1
    ]
    return chosen + keys


def _marks(facts: dict) -> dict[str, int]:
    marks = {"default": int(facts["default_layer"])}
    if isinstance(facts.get("calibrated_layer"), int):
        marks["calibrated"] = facts["calibrated_layer"]
    return marks


def _figures(run: RunDir, inp: Inputs, res: dict, values: pd.DataFrame, step: Step) -> dict[str, Path]:
    fig_dir = run.path / "figures"
    for name in FIGURES.values():  # drop our stale figures; leave anything else in the folder alone
        (fig_dir / name).unlink(missing_ok=True)
    pooled = res["auroc"].get("(all safety)") or next(iter(res["auroc"].values()), {})
    single = {
        b: blk["selectors"]["single"]["value"] for k in ("safety", "utility") for b, blk in res[k].items()
    }
    jobs = {
        "safety": lambda p: figures.rates_figure(res["safety"], p, "safety"),
        "utility": lambda p: figures.rates_figure(res["utility"], p, "utility"),
        "figure5": lambda p: figures.headroom_figure(res["figure5"], p),
        "densities": lambda p: figures.density_figure(
            values,
            pooled,
            _density_keys(values, res["facts"]["default_layer"], res["facts"]["calibrated_layer"]),
            p,
        ),
        "auroc_layers": lambda p: figures.auroc_layers_figure(res["auroc"], p),
        "ablation": lambda p: figures.ablation_figure(
            res["ablation"], inp.kinds, single, _marks(res["facts"]), p
        ),
        "lengths": lambda p: figures.lengths_figure(analysis.all_samples(inp), p),
        "models": lambda p: figures.models_figure(res["models"], p),
        "attack": lambda p: attack.figure(res["attack"], p),
    }
    out: dict[str, Path] = {}
    for key, job in jobs.items():
        step(f"figure {FIGURES[key]}")
        try:
            path = job(fig_dir / FIGURES[key])
        except Exception as e:  # one broken figure must not cost the whole report; say which and why
            res["notes"].append(f"figure {FIGURES[key]} failed: {type(e).__name__}: {e}")
            continue
        if path is not None:
            out[key] = path
    return out


def build_results(run: RunDir, step: Step = lambda _: None) -> tuple[Inputs, dict, pd.DataFrame]:
    """All report numbers for a run (what results.json holds, before NaN → null), with the inputs and the
    labelled scores the figures draw."""
    cfg = run.config
    step("reading artifacts")
    inp = load_inputs(run)
    res, labelled = analysis.compute(
        inp, cfg.judge.primary, cfg.report.bootstrap, cfg.report.seed, cfg.select.default_layer, step
    )
    res["missing"] = inp.missing
    res["calibration_prompts_excluded"] = inp.calibration_rows
    res["facts"] = gather(run, inp.samples, res["judges"])
    rep = cfg.report
    res["attack"] = attack.results(read_attacks(run), rep.bootstrap, rep.seed, cfg.attack.depth)
    return inp, res, labelled


def run_report(run: RunDir, force: bool = False) -> dict:
    """Write report.md, report.html, results.json and figures/*.png into the run directory.

    `force` is accepted for the uniform stage signature; the report is always rebuilt from the artifacts.
    Returns a summary: paths, benchmarks covered, and what is missing.
    """
    key = run.begin("report", force=True)  # always rebuilt; it deletes nothing, it overwrites its own files
    with _progress() as step:
        inp, res, labelled = build_results(run, step)
        generated = datetime.now(UTC).isoformat(timespec="seconds")
        res["generated"] = generated
        figs = _figures(run, inp, res, labelled, step)
    res["figures"] = {k: str(p.relative_to(run.path)) for k, p in figs.items()}
    clean = jsonable(res)
    doc = document.build(clean, figs, generated)
    atomic_write_text(run.path / "report.md", to_markdown(doc, run.path))
    atomic_write_text(run.path / "report.html", to_html(doc))
    # results.json last: it carries the identity, so a report cut short is never taken as up to date.
    clean["identity"] = {"key": key, "deps": run.deps("report")}
    atomic_write_text(run.path / "results.json", json.dumps(clean, indent=2, allow_nan=False))
    benches = sorted(res["safety"]) + sorted(res["utility"])
    warnings = [f"missing: {m}" for m in res["missing"]] + res["notes"]
    run.finish("report", rows={"benchmarks": len(benches), "figures": len(figs)}, warnings=warnings)
    return {
        "report": str(run.path / "report.md"),
        "html": str(run.path / "report.html"),
        "results": str(run.path / "results.json"),
        "benchmarks": benches,
        "figures": len(figs),
        "missing": res["missing"],
    }
