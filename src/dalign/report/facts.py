"""Run facts for the report: models, adapter card, datasets, judge, N, seeds, stage timings and versions."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import platform
from datetime import datetime
from pathlib import Path

import pandas as pd

from dalign.config import STAGES
from dalign.rundir import RunDir, adapter_dir


def _duration(entry: dict) -> float | None:
    try:
        start = datetime.fromisoformat(entry["started"])
        end = datetime.fromisoformat(entry["finished"])
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds()


def _adapter_card(run: RunDir, notes: list[str]) -> tuple[str | None, dict | None]:
    try:
        path = adapter_dir(run)
    except Exception as e:  # a config pointing nowhere must not stop the report
        notes.append(f"adapter: {type(e).__name__}: {e}")
        return None, None
    for d in [p for p in (path, run.path / "adapter-grpo", run.path / "adapter") if p is not None]:
        card = Path(d) / "card.json"
        if card.is_file():
            try:
                return str(d), json.loads(card.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                notes.append(f"{card} is not valid JSON ({e}); fix or delete it")
                return str(d), None
    return (str(path) if path else None), None


def _dataset_card(name: str) -> dict:
    """The data package's card of a dataset (origin, licence, size, offline packages); {} when unavailable."""
    if name == "file":
        return {}
    try:
        from dalign.data import dataset_card

        return dataset_card(name)
    except Exception:  # an unknown or unloadable dataset must not stop the report
        return {}


def _versions(manifest: dict) -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for entry in manifest.get("stages", {}).values():
        out.update({k: str(v) for k, v in (entry.get("versions") or {}).items()})
    for pkg in ("numpy", "pandas", "matplotlib"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    if "dalign_version" in manifest:
        out.setdefault("dalign", str(manifest["dalign_version"]))
    return out


def gather(run: RunDir, samples: pd.DataFrame | None, judges_used: dict[str, str]) -> dict:
    """Facts as a JSON-able dict; `notes` lists what could not be read."""
    cfg = run.config
    # The model and sampling the samples were made with, not a later edit of config.yaml.
    made = run.made_with("samples") or cfg
    manifest = run.manifest()
    notes: list[str] = []
    adapter, card = _adapter_card(run, notes)
    stages = []
    for name in STAGES:
        e = manifest.get("stages", {}).get(name)
        if e is None:
            continue
        stages.append(
            {
                "stage": name,
                "status": e.get("status"),
                "started": e.get("started"),
                "finished": e.get("finished"),
                "seconds": _duration(e),
                "rows": e.get("rows"),
                "warnings": e.get("warnings") or [],
                "dtype": e.get("dtype"),  # resolved model.dtype (e.g. bf16 on AMX CPUs), when recorded
            }
        )
    n_seen = None
    if samples is not None and "candidate" in samples.columns and len(samples):
        n_seen = int(samples.groupby(["benchmark", "prompt_id"])["candidate"].nunique().max())
    select = manifest.get("stages", {}).get("select", {})
    return {
        "run_dir": str(run.path),
        "models": made.model.model_dump(mode="json"),
        "adapter_dir": adapter,
        "adapter_card": card,
        "datasets": [
            {**d.model_dump(mode="json"), "label": d.label, "card": _dataset_card(d.name)}
            for d in made.sample.datasets
        ],
        "judge": cfg.judge.model_dump(mode="json"),
        "judges_used": judges_used,
        "n_config": made.sample.n,
        "n_observed": n_seen,
        "sampling": {k: getattr(made.sample, k) for k in ("temperature", "top_p", "max_new_tokens")},
        "seeds": {
            "sample": made.sample.seed,
            "score": cfg.score.seed,
            "sft": cfg.sft.seed,
            "grpo": cfg.grpo.seed,
            "report_bootstrap": cfg.report.seed,
        },
        "bootstrap": cfg.report.bootstrap,
        "default_layer": cfg.select.default_layer,
        "calibrated_layer": select.get("calibrated_layer"),
        "oracle_layers": select.get("oracle_layers"),
        "stages": stages,
        "versions": _versions(manifest),
        "notes": notes,
    }
