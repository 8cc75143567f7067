"""`dalign run`: the config's stages in pipeline order, reusing what is done and resuming what was cut short."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from dalign.config import STAGES, RunConfig
from dalign.pipeline import PIPELINE, plan, run_stage
from dalign.rundir import RunDir, StageMismatch

if TYPE_CHECKING:
    from dalign.sweep import StageCache


def _select_stages(cfg: RunConfig, from_: str | None, only: str | None) -> list[str]:
    for flag, value in (("--from", from_), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ValueError(f"{flag} {value!r} is not a stage; stages are {', '.join(STAGES)}")
    if only:
        return [only]
    stages = list(cfg.stages)
    if from_:
        stages = [s for s in stages if STAGES.index(s) >= STAGES.index(from_)]
    return stages


def _check_order(run: RunDir, stages: list[str]) -> None:
    """Every input a stage reads must exist already or be made by an earlier stage of this run."""
    made: set[str] = set()
    for name in stages:
        stage = PIPELINE[name]
        if not stage.enabled(run.config):
            continue
        for inp in stage.inputs if stage.inputs_required else ():
            if inp == "aligned" or inp in made or run.content(inp) is not None:
                continue
            maker = next(s.name for s in PIPELINE.values() if inp in s.outputs)
            raise ValueError(
                f"stage {name!r} needs {inp!r}, which stage {maker!r} makes, but {maker!r} is not in this run's "
                f"stages and {run.path / inp} does not exist; add {maker!r} to `stages` or run it first"
            )
        made.update(stage.outputs)


def run_pipeline(
    cfg: RunConfig,
    from_: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    console: Console | None = None,
    cache: StageCache | None = None,
) -> dict[str, dict]:
    """`cache` (a sweep's stage cache) supplies outputs another run made under the same stage identity."""
    console = console or Console()
    stages = _select_stages(cfg, from_, only)
    run = RunDir(cfg.run_dir, cfg)  # writes nothing until a stage has validated its inputs
    _check_order(run, stages)

    steps = plan(run, stages)
    table = Table("stage", "action", "why", title=f"plan for {run.path}")
    for name, action, why in steps:
        table.add_row(name, "redo (--force)" if force and action != "skip" else action, why)
    console.print(table)
    if dry_run:
        return {}
    refused = [(n, why) for n, action, why in steps if action == "rerun"]
    if refused and not force:  # refuse before anything runs, so nothing is half-redone
        lines = "; ".join(f"{n}: {why}" for n, why in refused)
        raise StageMismatch(
            f"{run.path}: artifacts were made under another config ({lines}). "
            "`dalign run ... --force` deletes and redoes them (after validating the config); or --set name=<new run>"
        )

    results: dict[str, dict] = {}
    for name in stages:
        # Re-plan now: an earlier stage of this run may have changed this one's inputs.
        _, action, why = plan(run, [name])[0]
        if action == "skip" or (action == "reuse" and not force):
            console.print(f"[dim]{name}: {action} ({why})[/]")
            continue
        if cache is not None and not force and (source := cache.restore(run, name)):
            run.finish(name, shared_from=source)
            console.print(f"[dim]{name}: shared (made by {source})[/]")
            continue
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        results[name] = run_stage(name, run, force=force)
        if cache is not None:
            cache.put(run, name)
        console.print(f"[green]{name}[/] finished in {time.perf_counter() - t0:.1f} s: {results[name]}")
    if "report" in results:
        from dalign.report.document import main_table_for_run

        console.print(main_table_for_run(run.path), markup=False, highlight=False)
        console.print(f"\nReport: {run.path / 'report.md'} and {run.path / 'report.html'}")
    return results
