"""`dalign run`: the config's stages in pipeline order, reusing what is done and resuming what was cut short."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from dalign.config import STAGES, RunConfig
from dalign.pipeline import PIPELINE, plan, run_stage
from dalign.rundir import RunDir, StageMismatch


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
        for inp in stage.inputs if stage.inputs_required else ():
            have = (run.path / f"{inp}.parquet").is_dir() or (run.path / inp).is_dir()
            if inp not in made and not have:
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
) -> dict[str, dict]:
    console = console or Console()
    stages = _select_stages(cfg, from_, only)
    run = RunDir(cfg.run_dir, cfg) if dry_run else RunDir.for_config(cfg)
    _check_order(run, stages)

    steps = plan(run, stages)
    table = Table("stage", "action", "why", title=f"plan for {run.path}")
    for name, action, why in steps:
        table.add_row(name, action, why)
    console.print(table)
    if dry_run:
        return {}

    results: dict[str, dict] = {}
    for name in stages:
        # Re-plan now: an earlier stage of this run may have changed this one's inputs.
        _, action, why = plan(run, [name])[0]
        if action == "reuse" and not force:
            console.print(f"[dim]{name}: reused ({why})[/]")
            continue
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        try:
            # A stage checks its own fingerprint: a config edit that changes its results is refused there.
            results[name] = run_stage(name, run, force=force)
        except StageMismatch as e:
            raise StageMismatch(
                f"{e}\n(`dalign run ... --force` redoes it; or --set name=<new run>)"
            ) from None
        console.print(f"[green]{name}[/] finished in {time.perf_counter() - t0:.1f} s: {results[name]}")
    if "report" in results:
        from dalign.report.document import main_table_for_run

        console.print(main_table_for_run(run.path), markup=False, highlight=False)
        console.print(f"\nReport: {run.path / 'report.md'} and {run.path / 'report.html'}")
    return results
