"""Kill-anywhere integrity: for every stage that writes, SIGKILL it at K seeded points, rerun, compare row for row.

    .venv/bin/python benchmarks/resume_integrity.py --kills 5 --seed 0

A tiny local model (tests/tiny.py) runs the whole pipeline once uninterrupted (teach, filter, sft, grpo, sample,
judge, score, select, report): the reference. Then, per stage, a copy of that run without the stage's outputs is
run with `dalign <stage> -r COPY` and SIGKILLed K times, each time after a seeded delay drawn uniformly over the
stage's reference duration (counted from the moment the stage marks itself running, so kills land in its work,
not in Python's start-up); each run resumes what the previous one left. A last run finishes it, and its outputs
are compared with the reference: tables row for row (keys, every column; floats to 1e-5), adapters tensor by
tensor, results.json without timestamps. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import build_tiny, kill_resume_stage, pipeline_config, stage_seconds  # noqa: E402

STAGES = ["teach", "filter", "sft", "grpo", "sample", "judge", "score", "select", "report"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5, help="SIGKILL points per stage (K)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="dalign-resume-"))
    tiny = build_tiny(root / "tiny")
    cfg = pipeline_config(root, tiny, name="reference")
    cfg["stages"] = STAGES
    cfg_file = root / "reference.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    ref = subprocess.run(
        [sys.executable, "-m", "dalign.cli", "run", str(cfg_file)], capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_dir = root / "runs" / "reference"
    print(f"reference run: {time.perf_counter() - t0:.0f} s in {ref_dir}", flush=True)

    rows = []
    for stage in args.stages.split(","):
        span = stage_seconds(ref_dir, stage)
        delays = [rng.uniform(0.0, span) for _ in range(args.kills)]
        t = time.perf_counter()
        r = kill_resume_stage(ref_dir, root / "runs" / f"killed-{stage}", stage, delays)
        r["seconds"] = round(time.perf_counter() - t, 1)
        r["stage_seconds"] = span
        rows.append(r)
        print(
            f"{stage:<8} kills {r['kills']}/{args.kills}  lost {r['rows_lost']}  duplicated {r['rows_duplicated']}  "
            f"equal {r['equal']}  ({r['seconds']} s; stage ~{span:.0f} s)",
            flush=True,
        )

    print()
    print(f"{'stage':<8} {'kills':>5} {'rows lost':>10} {'rows dup':>9} {'artifacts equal':>16}")
    for r in rows:
        print(
            f"{r['stage']:<8} {r['kills']:>5} {r['rows_lost']:>10} {r['rows_duplicated']:>9} {str(r['equal']):>16}"
        )
    summary = {
        "kills": sum(r["kills"] for r in rows),
        "rows_lost": sum(r["rows_lost"] for r in rows),
        "rows_duplicated": sum(r["rows_duplicated"] for r in rows),
        "stages_equal": sum(r["equal"] for r in rows),
        "stages": len(rows),
        "kills_per_stage": {r["stage"]: r["kills"] for r in rows},
        "k": args.kills,
        "seed": args.seed,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
