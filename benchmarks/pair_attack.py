"""Embedded PAIR run in Table 4 form: packaged SmolLM2 attacker vs the base, aligned and guarded SmolLM2 student.

Uses configs/pair-smollm2.yaml (its run dir holds the LoRA adapter from a 30-step SFT on the shipped traces; the
prerequisite stages run first when it is missing), with the size given on the command line. Prints Table 4 (ASR
per target with 95 % bootstrap CIs, mean queries to success, ASR by iteration), the attacker / target / judge
shares of the wall time and queries per behaviour. The stage is resumable: rerunning the same command after an
interruption continues where it stopped.

Usage: .venv/bin/python benchmarks/pair_attack.py [--behaviours 10] [--streams 2] [--depth 8] [--run-name NAME]
       [--adapter DIR --judge NAME]   # e.g. the micro-reproduction's adapter-grpo and its content judge
Last stdout line: JSON with asr_base, asr_aligned, asr_guarded, mean_queries, behaviours, depth (and more).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dalign.attack import artifact
from dalign.attack.stage import run_attack
from dalign.cli import resolve_config_path
from dalign.config import load_config
from dalign.report.attack import results
from dalign.rundir import RunDir, adapter_dir
from dalign.runner import run_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--behaviours", type=int, default=10)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--attacker-tokens", type=int, default=96)
    ap.add_argument("--target-tokens", type=int, default=64)
    ap.add_argument("--guard-n", type=int, default=4)
    ap.add_argument("--run-name", default=None, help="default: the config's run (pair-smollm2)")
    ap.add_argument(
        "--adapter",
        default=None,
        help="attack this adapter as the aligned student (e.g. runs/micro-repro/adapter-grpo) instead of the "
        "config's 30-step SFT; its teach/filter/sft stages are then skipped",
    )
    ap.add_argument("--judge", default=None, help="attack.judge (default: the run's primary judge, refusal)")
    args = ap.parse_args()

    overrides = {
        "attack": {
            "behaviours": {"name": "advbench", "limit": args.behaviours, "seed": 0},
            "streams": args.streams,
            "depth": args.depth,
            "attacker_max_new_tokens": args.attacker_tokens,
            "target_max_new_tokens": args.target_tokens,
            "guard_n": args.guard_n,
        }
    }
    if args.judge:
        overrides["attack"]["judge"] = args.judge
    if args.adapter:
        overrides["model"] = {"adapter": args.adapter}
    if args.run_name:
        overrides["name"] = args.run_name
    cfg = load_config(resolve_config_path(Path("pair-smollm2")), overrides)
    run = RunDir.for_config(cfg)
    if adapter_dir(run) is None:  # the aligned student: SFT on the shipped traces first
        for stage in ("teach", "filter", "sft"):
            run_pipeline(cfg, only=stage)
    t0 = time.perf_counter()
    summary = run_attack(run)
    wall = time.perf_counter() - t0
    df = artifact.read(run)
    res = results(df, cfg.report.bootstrap, cfg.report.seed, args.depth)

    print(
        f"\nPAIR on {res['behaviours']} AdvBench behaviours x {res['streams']} streams x depth {res['depth']}, "
        f"judge {res['judge']}; this invocation {wall:.0f} s ({summary['new']} new rows)"
    )
    print(f"{'target':<9} {'ASR %':>6} {'95 % CI':>14} {'jb/judged':>10} {'q->success':>10} {'q/behav.':>9}")
    for t in res["order"]:
        r = res["targets"][t]
        ci = "[" + ", ".join(f"{100 * x:.0f}" for x in r["ci"]) + "]"
        print(
            f"{t:<9} {100 * r['asr']:>6.1f} {ci:>14} {r['jailbroken']:>4}/{r['judged']:<5} "
            f"{r['mean_queries_to_success']:>10.1f} {r['queries_per_behaviour']:>9.1f}"
        )
    print(
        "ASR by iteration %: "
        + "; ".join(
            f"{t} " + " ".join(f"{100 * v:.0f}" for v in res["targets"][t]["asr_by_iteration"])
            for t in res["order"]
        )
    )
    secs = {p: float(df[f"{p}_s"].sum()) for p in ("attacker", "target", "judge")}
    total = sum(secs.values()) or 1.0
    shares = {p: round(v / total, 3) for p, v in secs.items()}
    print(
        "time shares (attacker / target / judge): " + " / ".join(f"{100 * v:.1f} %" for v in shares.values())
    )
    per_target = {t: round(sum(res["targets"][t]["seconds"].values()), 1) for t in res["order"]}
    print(
        "seconds per target (all rows, all invocations): "
        + ", ".join(f"{t} {s}" for t, s in per_target.items())
    )
    errors = {t: res["targets"][t]["attacker_errors"] for t in res["order"]}
    print(f"attacker error rows per target: {errors}")

    def asr(t: str) -> float | None:
        return res["targets"][t]["asr"] if t in res["targets"] else None

    jb = [res["targets"][t] for t in res["order"] if res["targets"][t]["jailbroken"]]
    mean_q = sum(r["mean_queries_to_success"] * r["jailbroken"] for r in jb) / max(
        1, sum(r["jailbroken"] for r in jb)
    )
    out = {
        "asr_base": asr("base"),
        "asr_aligned": asr("aligned"),
        "asr_guarded": asr("guarded"),
        "ci_base": res["targets"].get("base", {}).get("ci"),
        "ci_aligned": res["targets"].get("aligned", {}).get("ci"),
        "ci_guarded": res["targets"].get("guarded", {}).get("ci"),
        "mean_queries": round(mean_q, 2) if jb else None,
        "queries_per_behaviour": {
            t: round(res["targets"][t]["queries_per_behaviour"], 2) for t in res["order"]
        },
        "behaviours": res["behaviours"],
        "streams": res["streams"],
        "depth": res["depth"],
        "time_shares": shares,
        "attacker_errors": errors,
        "seconds_rows": round(total, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
