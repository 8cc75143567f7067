"""What a sweep's stage cache saves: the sweep with sharing vs its runs made independently, measured in one go.

    .venv/bin/python benchmarks/sweep_sharing.py configs/sweep-smollm2.yaml

1. The sweep as written, into its own folder (runs/<name>; it must not exist yet, so the walls are of real work):
   the wall of each run and of the whole sweep, and the stage outputs each run restored from the cache.
2. The same runs again as plain `dalign run`s with no cache, into runs/<name>-independent/<label>. The first run of
   the sweep restores nothing (its cache is empty), so it already is an independent run and is not repeated unless
   `--all-independent` is given; its sweep wall counts as its independent wall.
3. Sharing must not change a number: every repeated run's results.json tables (selectors and the compared models)
   must equal the sweep run's (`equal`).

The load average is sampled every 15 s in each phase and printed with it. The last line is one JSON object with
`runs`, `shared_artifacts`, `sweep_wall_s`, `independent_wall_s` and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from dalign.runner import run_pipeline
from dalign.sweep import expand, load_sweep, run_sweep


class LoadSampler:
    """Load average every `every` seconds in a daemon thread, for the record of what a phase ran under."""

    def __init__(self, every: float = 15.0):
        self.every, self.values, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.values.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        v = self.values or [os.getloadavg()[0]]
        return {"min": round(min(v), 2), "mean": round(sum(v) / len(v), 2), "max": round(max(v), 2)}


def tables(run_dir: Path) -> dict:
    """The numbers sharing must not change: the selector tables and the compared-models table."""
    res = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    return {k: res.get(k) for k in ("safety", "utility", "models")}


def shared_stages(run_dir: Path) -> list[str]:
    stages = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get("stages", {})
    return sorted(name for name, rec in stages.items() if rec.get("shared_from"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="sweep file, e.g. configs/sweep-smollm2.yaml")
    ap.add_argument("--all-independent", action="store_true", help="repeat the first run independently too")
    args = ap.parse_args()

    sweep = load_sweep(args.sweep)
    sweep_dir = Path(sweep.runs_dir) / sweep.name
    alone = sweep.model_copy(update={"name": f"{sweep.name}-independent", "share": False})
    for d in (sweep_dir, Path(alone.runs_dir) / alone.name):
        if d.exists():
            raise SystemExit(
                f"{d} exists: this benchmark times real work, so move it away or delete it first"
            )
    if not sweep.share:
        raise SystemExit(f"{args.sweep}: share is false, so there is nothing to measure")

    t0 = time.perf_counter()
    with LoadSampler() as load_sweep_phase:
        out = run_sweep(sweep)
    sweep_wall = time.perf_counter() - t0
    runs = expand(sweep)
    shared = {r.label: shared_stages(r.path) for r in runs}

    repeat = [r.label for r in (runs if args.all_independent else runs[1:])]
    independent_walls = {runs[0].label: out["wall_s"][runs[0].label]} if not args.all_independent else {}
    equal = {}
    with LoadSampler() as load_alone_phase:
        for r in expand(alone):
            if r.label not in repeat:
                continue
            t1 = time.perf_counter()
            run_pipeline(r.config)
            independent_walls[r.label] = time.perf_counter() - t1
            equal[r.label] = tables(r.path) == tables(sweep_dir / r.label)
    independent_wall = sum(independent_walls.values())

    print(f"\nsweep {sweep.name}: {len(runs)} runs, {sweep_wall:.0f} s (load {load_sweep_phase.summary()})")
    for label, stages in shared.items():
        print(
            f"  {label}: {out['wall_s'][label]:.0f} s in the sweep; restored from the cache: {stages or 'none'}"
        )
    print(f"independent: {independent_wall:.0f} s (load {load_alone_phase.summary()})")
    for label, wall in independent_walls.items():
        how = "its sweep wall (it restored nothing)" if label not in equal else "repeated with no cache"
        print(f"  {label}: {wall:.0f} s, {how}; tables equal to the sweep's: {equal.get(label, 'n/a')}")
    print(f"sharing saves {100 * (1 - sweep_wall / independent_wall):.1f} % of the wall time")
    print(
        json.dumps(
            {
                "runs": len(runs),
                "shared_artifacts": sum(len(s) for s in shared.values()),
                "shared_stages": shared,
                "sweep_wall_s": round(sweep_wall, 1),
                "independent_wall_s": round(independent_wall, 1),
                "saving": round(1 - sweep_wall / independent_wall, 4),
                "run_wall_s": {k: round(v, 1) for k, v in out["wall_s"].items()},
                "independent_run_wall_s": {k: round(v, 1) for k, v in independent_walls.items()},
                "repeated_independently": repeat,
                "equal": all(equal.values()) if equal else None,
                "load_sweep": load_sweep_phase.summary(),
                "load_independent": load_alone_phase.summary(),
            }
        )
    )


if __name__ == "__main__":
    main()
