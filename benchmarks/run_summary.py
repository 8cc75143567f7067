"""Per benchmark and judge, from a run's samples and judgments only (no scores needed): closed-reasoning and
stop-token shares, the single-sample rate (candidate 0) and the rate over all candidates (dalign.score.rates).

    .venv/bin/python benchmarks/run_summary.py runs/micro-repro

Prints a markdown table (eval prompts only).
"""

import sys

from dalign.rundir import RunDir
from dalign.score.rates import rate

run = RunDir(sys.argv[1] if len(sys.argv) > 1 else "runs/micro-repro")
s = run.read("samples")
j = run.read("judgments")
s = s[s.role == "eval"]
print(
    "| benchmark | prompts | reasoning closed % | stop token % | judge | single-sample rate % (hits/valid) | all 8 candidates % |"
)
print("|---|---:|---:|---:|---|---:|---:|")
for b, g in s.groupby("benchmark"):
    kind = g["kind"].iloc[0]
    jb = j[j.benchmark == b]
    for name, jj in jb.groupby("judge"):
        jj = jj.merge(g[["prompt_id", "candidate"]], on=["prompt_id", "candidate"])
        first = jj[jj.candidate == 0].set_index("prompt_id")["label"]
        r1 = rate(first.values, kind)
        ra = rate(jj["label"].values, kind)
        print(
            f"| {b} | {g.prompt_id.nunique()} | {100 * g.reasoning_closed.mean():.0f} | {100 * g.finished.mean():.0f} | {name} | "
            f"{100 * r1.value:.1f} ({r1.hits}/{r1.valid}) | {100 * ra.value:.1f} ({ra.hits}/{ra.valid}) |"
        )
