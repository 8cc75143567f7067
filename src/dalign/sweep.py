"""`dalign sweep SWEEP.yaml`: a grid of runs (teachers x students x seeds, or any config keys) and their aggregate.

Runs share what they can through a stage cache keyed by stage identity (`pipeline.stage_deps`: the config fields a
stage declares plus the content hashes of the artifacts it reads), as DVC's run cache does: when a run reaches a
stage that another run of the sweep already computed under the same identity, the committed outputs are copied in
instead of recomputed. One teacher's traces and filtered traces serve every student; a student trained once on
them serves every later stage that does not differ. Nothing is shared that the identity does not prove equal.

The aggregate is read from each run's results.json: the paper's Table 1 as means over runs (pairs) with 95 %
bootstrap CIs over runs, a per-run table, and a heat map of relative ASR drops (runs x selectors).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dalign.config import ConfigError, RunConfig, _set_path, config_hash, deep_merge, load_config


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Sweep name; runs live in <runs_dir>/<name>/<run label>.")
    runs_dir: str = Field("runs", description="Where the sweep's folder is made.")
    base: str | None = Field(
        None, description="Run config every run starts from (a file or a packaged name)."
    )
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides applied to every run.")
    grid: dict[str, list[Any]] = Field(
        description="Dotted config key -> values; the sweep runs the cartesian product, in key order."
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Short names of grid keys in run labels, e.g. {model.student: student}.",
    )
    share: bool = Field(True, description="Reuse stage outputs across runs whose stage identity is equal.")


@dataclass
class SweepRun:
    label: str
    assignment: dict[str, Any]
    config: RunConfig

    @property
    def path(self) -> Path:
        return self.config.run_dir


def load_sweep(path: str | Path) -> SweepConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        return SweepConfig.model_validate(data)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    except ValidationError as e:
        lines = [f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()]
        raise ConfigError(f"invalid sweep file {p}:\n  " + "\n  ".join(lines)) from None


def _short(value: Any) -> str:
    """A filesystem-safe short form of a grid value: the last path component of a model spec, etc."""
    text = str(value).rstrip("/")
    text = re.split(r"[:/]", text)[-1] or text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:40] or "x"


def _nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        _set_path(out, dotted, value)
    return out


def expand(sweep: SweepConfig) -> list[SweepRun]:
    """Every run of the grid with its resolved config (validated now, so a bad grid fails before any work)."""
    from dalign.cli import resolve_config_path

    if not sweep.grid or any(not isinstance(v, list) or not v for v in sweep.grid.values()):
        raise ConfigError("sweep.grid needs at least one key, each with a non-empty list of values")
    base = resolve_config_path(Path(sweep.base)) if sweep.base else None
    keys = list(sweep.grid)
    runs: list[SweepRun] = []
    seen: set[str] = set()
    for values in itertools.product(*(sweep.grid[k] for k in keys)):
        assignment = dict(zip(keys, values, strict=True))
        label = "_".join(
            f"{sweep.labels.get(k, k.split('.')[-1])}={_short(v)}" for k, v in assignment.items()
        )
        if label in seen:  # two values with the same short form
            label += "-" + config_hash(assignment)[:6]
        seen.add(label)
        overrides = deep_merge(_nested(sweep.set), _nested(assignment))
        overrides.update(runs_dir=str(Path(sweep.runs_dir) / sweep.name), name=label)
        try:
            cfg = load_config(base, overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep run {label}: {e}") from None
        runs.append(SweepRun(label, assignment, cfg))
    return runs


# ---- what runs share ----------------------------------------------------------------------------------------
def _maker(artifact: str, cfg: RunConfig) -> str | None:
    """The stage of this run that makes an artifact ('aligned' = the adapter the run scores)."""
    from dalign.pipeline import PIPELINE

    if artifact == "aligned":
        if cfg.model.adapter:
            return None
        return (
            "grpo" if "grpo" in cfg.stages and cfg.grpo.enabled else ("sft" if "sft" in cfg.stages else None)
        )
    return next((s.name for s in PIPELINE.values() if artifact in s.outputs), None)


def symbolic_identity(cfg: RunConfig, stage: str, _memo: dict | None = None) -> str:
    """A stage's identity predicted before anything runs: its declared config fields plus the predicted identity
    of the stages that make its inputs (an input from outside the run counts by its path). Two runs with equal
    symbolic identities get equal real identities, so the plan can say what will be shared."""
    from dalign.pipeline import PIPELINE, config_fields

    memo = {} if _memo is None else _memo
    if stage in memo:
        return memo[stage]
    st = PIPELINE[stage]
    inputs = {}
    for inp in st.inputs:
        maker = _maker(inp, cfg)
        inputs[inp] = (
            symbolic_identity(cfg, maker, memo)
            if maker
            else (cfg.model.adapter if inp == "aligned" else None)
        )
    memo[stage] = config_hash({"config": config_fields(cfg, st.config), "inputs": inputs})
    return memo[stage]


def sharing_plan(runs: list[SweepRun]) -> dict[str, list[list[str]]]:
    """stage -> groups (of >= 2 run labels) that will share that stage's outputs."""
    from dalign.pipeline import PIPELINE

    out: dict[str, list[list[str]]] = {}
    for stage in PIPELINE:
        if stage == "report":
            continue  # per run by definition
        groups: dict[str, list[str]] = {}
        for r in runs:
            if stage in r.config.stages and PIPELINE[stage].enabled(r.config):
                groups.setdefault(symbolic_identity(r.config, stage), []).append(r.label)
        shared = [g for g in groups.values() if len(g) > 1]
        if shared:
            out[stage] = shared
    return out


class StageCache:
    """Committed stage outputs of a sweep, under <sweep dir>/.cache/<stage>/<identity>/ (a copy per entry)."""

    def __init__(self, root: Path):
        self.root = root

    def _entry(self, run, stage: str) -> Path:
        from dalign.pipeline import stage_deps

        return self.root / stage / config_hash(stage_deps(run, stage))

    @staticmethod
    def _paths(run, stage: str) -> list[tuple[str, Path]]:
        from dalign.pipeline import PIPELINE

        return [(o, Path(run.artifact(o).path)) for o in PIPELINE[stage].outputs]

    @staticmethod
    def shares(stage: str) -> bool:
        """Derived stages (the report) are cheap and per run: never cached."""
        from dalign.pipeline import PIPELINE

        return not PIPELINE[stage].derived

    def restore(self, run, stage: str) -> str | None:
        """Copy a cached, complete output set into the run; returns the run that made it, None when none."""
        if not self.shares(stage):
            return None
        entry = self._entry(run, stage)
        if not (entry / "DONE").is_file():
            return None
        run.path.mkdir(parents=True, exist_ok=True)
        for name, dest in self._paths(run, stage):
            src = entry / name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            if src.is_dir():
                shutil.copytree(src, dest, copy_function=_link_or_copy)
        return (entry / "DONE").read_text(encoding="utf-8")

    def put(self, run, stage: str) -> None:
        if not self.shares(stage):
            return
        entry = self._entry(run, stage)
        if (entry / "DONE").is_file():
            return
        tmp = entry.with_name(f".{entry.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, src in self._paths(run, stage):
            if src.is_dir():
                shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns(".*.tmp", ".lock"))
        (tmp / "DONE").write_text(str(run.path), encoding="utf-8")  # the run that made it, for the record
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links where the file system allows (artifacts are never modified in place), else a copy."""
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---- the aggregate --------------------------------------------------------------------------------------------
def _mean_ci(values: list[float], n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean over runs with a 95 % percentile-bootstrap CI over runs (NaN values left out)."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(v.mean()), float(lo), float(hi)


def aggregate(runs: list[SweepRun], n_boot: int = 1000, seed: int = 0) -> dict:
    """Table 1 over the sweep's runs, from their results.json: per (kind, benchmark, selector) the mean rate and
    mean relative drop with CIs over runs, and the per-run values behind them."""
    per_run: dict[str, dict] = {}
    missing = []
    for r in runs:
        path = r.path / "results.json"
        if not path.is_file():
            missing.append(r.label)
            continue
        res = json.loads(path.read_text(encoding="utf-8"))
        per_run[r.label] = {
            kind: {
                bench: {
                    sel: {
                        "value": blk["selectors"][sel].get("value"),
                        "relative_drop": blk["selectors"][sel].get("relative_drop"),
                    }
                    for sel in _report_order(blk)
                }
                for bench, blk in res.get(kind, {}).items()
            }
            for kind in ("safety", "utility")
        }
        # the compared models (sample.models): each model's single-sample rate per benchmark
        per_run[r.label]["models"] = {
            bench: {"kind": blk["kind"], "models": {m: row.get("value") for m, row in blk["models"].items()}}
            for bench, blk in (res.get("models") or {}).items()
        }
    table: dict[str, dict] = {"safety": {}, "utility": {}}
    for kind in table:
        benches = sorted({b for pr in per_run.values() for b in pr[kind]})
        for bench in benches:
            sels = list(dict.fromkeys(s for pr in per_run.values() for s in pr[kind].get(bench, {})))
            table[kind][bench] = {}
            for sel in sels:
                vals = [v for pr in per_run.values() if (v := pr[kind].get(bench, {}).get(sel)) is not None]
                m, lo, hi = _mean_ci([_num(v["value"]) for v in vals], n_boot, seed)
                dm, dlo, dhi = _mean_ci([_num(v["relative_drop"]) for v in vals], n_boot, seed)
                table[kind][bench][sel] = {
                    "runs": len(vals),
                    "value": m,
                    "value_ci": [lo, hi],
                    "relative_drop": dm,
                    "relative_drop_ci": [dlo, dhi],
                }
    models: dict[str, dict] = {}
    for pr in per_run.values():
        for bench, blk in pr["models"].items():
            entry = models.setdefault(bench, {"kind": blk["kind"], "models": {}})
            for m, v in blk["models"].items():
                entry["models"].setdefault(m, []).append(_num(v))
    for entry in models.values():
        for m, vals in entry["models"].items():
            mean, lo, hi = _mean_ci(vals, n_boot, seed)
            entry["models"][m] = {"runs": len(vals), "value": mean, "ci": [lo, hi]}
    return {
        "runs": [r.label for r in runs],
        "missing": missing,
        "table": table,
        "models": models,
        "per_run": per_run,
    }


def _report_order(blk: dict) -> list[str]:
    """A benchmark's selectors as its report lists them (`order`), then the per-layer ones by layer number."""
    sels = blk.get("selectors", {})
    first = [s for s in blk.get("order", []) if s in sels]

    def by_layer(sel: str) -> tuple:
        name, _, layer = sel.rpartition("@")
        return (name, int(layer) if layer.isdigit() else -1, sel)

    return first + sorted((s for s in sels if s not in first), key=by_layer)


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(c: list[float]) -> str:
    return f"[{_pct(c[0])}, {_pct(c[1])}]"


def write_aggregate(sweep_dir: Path, agg: dict) -> list[Path]:
    """sweep.json, sweep.md and figures/sweep-heatmap.png in the sweep's folder."""
    from dalign.rundir import atomic_write_text

    sweep_dir.mkdir(parents=True, exist_ok=True)
    from dalign.report.stage import jsonable

    atomic_write_text(sweep_dir / "sweep.json", json.dumps(jsonable(agg), indent=2, allow_nan=False))
    lines = [f"# Sweep aggregate ({len(agg['per_run'])} of {len(agg['runs'])} runs have results)", ""]
    if agg["missing"]:
        lines += [f"Runs without results.json (left out): {', '.join(agg['missing'])}", ""]
    for kind, what in (("safety", "ASR"), ("utility", "accuracy")):
        for bench, sels in agg["table"][kind].items():
            lines += [
                f"## {bench}: mean {what} % and mean relative drop % over runs, 95 % CI over runs",
                "",
                f"| selector | runs | {what} % [CI] | relative drop % [CI] |",
                "|---|---:|---|---|",
            ]
            for sel, d in sels.items():
                lines.append(
                    f"| {sel} | {d['runs']} | {_pct(d['value'])} {_ci(d['value_ci'])} | "
                    f"{_pct(d['relative_drop'])} {_ci(d['relative_drop_ci'])} |"
                )
            lines.append("")
    lines += _models_lines(agg)
    lines += ["## Per run: ASR % (relative drop %)", ""]
    for label, pr in agg["per_run"].items():
        cells = [
            f"{b}/{s}: {_pct(d['value'])} ({_pct(d['relative_drop'])})"
            for b, sels in pr["safety"].items()
            for s, d in sels.items()
        ]
        lines.append(f"- **{label}**: " + "; ".join(cells))
    atomic_write_text(sweep_dir / "sweep.md", "\n".join(lines) + "\n")
    written = [sweep_dir / "sweep.json", sweep_dir / "sweep.md"]
    figs = [_heatmap(sweep_dir / "figures" / "sweep-heatmap.png", agg)]
    if agg["models"]:
        from dalign.report.figures import models_figure

        figs.append(
            models_figure(
                agg["models"],
                sweep_dir / "figures" / "sweep-models.png",
                title="Models compared: single-sample rate, mean over runs (95 % CI over runs)",
            )
        )
    return written + [f for f in figs if f]


def _models_lines(agg: dict) -> list[str]:
    """The alignment gap over the sweep: per benchmark, each compared model's mean single-sample rate."""
    from dalign.report.figures import MODEL_ORDER

    if not agg["models"]:
        return []
    names = [m for m in MODEL_ORDER if any(m in b["models"] for b in agg["models"].values())]
    lines = [
        "## Models compared: single-sample rate % (candidate 0, same prompts and seeds), mean over runs "
        "[95 % CI over runs]",
        "",
        "| benchmark | kind | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for bench, b in agg["models"].items():
        cells = [f"{_pct(d['value'])} {_ci(d['ci'])}" if (d := b["models"].get(m)) else "—" for m in names]
        lines.append(f"| {bench} | {b['kind']} | " + " | ".join(cells) + " |")
    lines += ["", "Per run:", ""]
    for label, pr in agg["per_run"].items():
        cells = [
            f"{bench} "
            + ", ".join(f"{m} {_pct(_num(blk['models'].get(m)))}" for m in names if m in blk["models"])
            for bench, blk in pr["models"].items()
        ]
        lines.append(f"- **{label}**: " + "; ".join(cells))
    return lines + [""]


def _heatmap(path: Path, agg: dict) -> Path | None:
    """Runs x selectors, relative ASR drop, one panel per safety benchmark."""
    benches = list(agg["table"]["safety"])
    labels = list(agg["per_run"])
    if not benches or not labels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(benches), figsize=(4 + 3.2 * len(benches), 1.5 + 0.45 * len(labels)), squeeze=False
    )
    for ax, bench in zip(axes[0], benches, strict=True):
        sels = [s for s in agg["table"]["safety"][bench] if s != "single"]
        m = np.array(
            [
                [
                    _num(agg["per_run"][lab]["safety"].get(bench, {}).get(s, {}).get("relative_drop"))
                    for s in sels
                ]
                for lab in labels
            ]
        )
        im = ax.imshow(100 * m, cmap="RdBu", vmin=-100, vmax=100, aspect="auto")
        ax.set_xticks(range(len(sels)), sels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{bench}: relative ASR drop %", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


# ---- the driver -------------------------------------------------------------------------------------------------
def run_sweep(sweep: SweepConfig, dry_run: bool = False, force: bool = False, console=None) -> dict:
    """Run every run of the grid in order (each resumes where it stopped), sharing stage outputs through the
    cache, then write the aggregate. `dry_run` lists the runs and what they will share, and changes nothing."""
    import time

    from rich.console import Console
    from rich.table import Table

    from dalign.runner import run_pipeline

    console = console or Console()
    runs = expand(sweep)
    sweep_dir = Path(sweep.runs_dir) / sweep.name
    shared = sharing_plan(runs) if sweep.share else {}
    table = Table("run", *sweep.grid, title=f"sweep {sweep.name}: {len(runs)} runs in {sweep_dir}")
    for r in runs:
        table.add_row(r.label, *(str(v) for v in r.assignment.values()))
    console.print(table)
    for stage, groups in shared.items():
        console.print(f"[dim]{stage}: shared by {' | '.join(', '.join(g) for g in groups)}[/]")
    summary = {"runs": [r.label for r in runs], "shared": shared}
    if dry_run:
        return summary
    cache = StageCache(sweep_dir / ".cache") if sweep.share else None
    walls = {}
    for i, r in enumerate(runs, 1):
        console.rule(f"[bold]sweep run {i}/{len(runs)}: {r.label}")
        t0 = time.perf_counter()
        run_pipeline(r.config, force=force, console=console, cache=cache)
        walls[r.label] = time.perf_counter() - t0
    agg = aggregate(runs)
    files = write_aggregate(sweep_dir, agg)
    console.print(f"\nSweep aggregate: {', '.join(str(f) for f in files)}")
    return {**summary, "wall_s": walls, "files": [str(f) for f in files]}
