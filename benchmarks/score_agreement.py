"""bf16 vs fp32 Best-of-N choices on a finished run's own candidates, scored with its trained adapter.

`cpu_speed.py` measures choice agreement with a random LoRA (B ~ N(0, 0.02)) on 64-token candidates; there the
candidates of a prompt differ in latent similarity by ~1e-3, the size of bf16's own error, so many choices are
coin flips between near-equal candidates. This script asks the question on real inputs: the candidates a run
sampled and the adapter it trained (the score stage's: `model.adapter`, else `<run>/adapter-grpo`, else `<run>/adapter`).
The first `--prompts` prompts of `--benchmark` (all their candidates) are scored three times, same engine
settings as the score stage (latent similarity at every layer + KL, prefix sharing):

- fp32: the reference (the path `model.dtype: float32` takes);
- bf16: the default on AMX / AVX-512 BF16 CPUs (bf16 matmuls, fp32 residual stream, fp64 cosines), the base and
  the aligned side in one paired pass that shares the base's rounding (`dalign.score.paired`);
- bf16 apart: the same, the two sides run in separate passes (the scorer before pairing);
- bf16 weights, fp32 compute: the bf16-loaded model cast back to fp32. It separates rounding the weights (the
  packaged model is a dequantised GGUF, not bf16-exact) from rounding the activations inside the matmuls.

A choice is one (prompt, selector) pick, selectors: every layer's latent similarity and KL, each in its
registered direction (`dalign.score.rates`). Besides the shares of identical choices it reports how close the
fp32 scores of the two picks are: a flip between two candidates whose fp32 scores differ by less than bf16's
error is a tie broken differently, not a worse guard; `regret` is the fp32 score lost by the bf16 pick as a share
of the prompt's fp32 score range (0 = same or equally good pick, 1 = the worst candidate).

    .venv/bin/python benchmarks/score_agreement.py --run runs/micro-repro [--benchmark harmbench] [--prompts 16]

Last line: JSON with choice_agreement, choice_agreement_default_layer, choice_agreement_kl,
choice_agreement_apart, choice_agreement_weights_only, near_tie_share, regret_mean, regret_p95, max_abs_err,
candidates, seconds_fp32, seconds_bf16, seconds_bf16_apart.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dalign.config import ModelConfig, SelectConfig
from dalign.models import load_pair
from dalign.rundir import RunDir, adapter_dir
from dalign.score.engine import ScoreEngine, ScoreRow
from dalign.score.rates import direction, pick

VARIANTS = ("float32", "bfloat16", "bf16_apart", "bf16_weights")


def run_rows(run: RunDir, benchmark: str, n_prompts: int) -> tuple[list[ScoreRow], np.ndarray]:
    s = run.read("samples")
    s = s[s["benchmark"] == benchmark]
    if s.empty:
        have = sorted(run.read("samples")["benchmark"].unique())
        raise SystemExit(f"{run.path}/samples has no rows of benchmark {benchmark!r}; it has {have}")
    keep = sorted(s["prompt_id"].unique())[:n_prompts]
    s = s[s["prompt_id"].isin(keep)].sort_values(["prompt_id", "candidate"])
    rows = [
        ScoreRow(
            list(map(int, r.prompt_token_ids)), list(map(int, r.token_ids)), (r.prompt_id, int(r.candidate))
        )
        for r in s.itertuples()
    ]
    return rows, s["prompt_id"].to_numpy()


def score(variant: str, student: str, adapter: Path, rows: list[ScoreRow], batch: int) -> tuple[dict, float]:
    dtype = "float32" if variant == "float32" else "bfloat16"
    pair = load_pair(ModelConfig(student=student, dtype=dtype, device="cpu"), adapter)
    if variant == "bf16_weights":
        pair.model.float()  # bf16-rounded weights (and LoRA factors), fp32 compute
    eng = ScoreEngine(
        pair, ["latent_similarity", "kl"], "all", batch, share_prompt=True, paired=variant != "bf16_apart"
    )
    t = time.perf_counter()
    vals = eng.score(rows)
    return vals, time.perf_counter() - t


def compare(ref: dict, new: dict, groups: np.ndarray) -> dict:
    """Per column: identical picks, |new - ref| max, and per pick whether the fp32 gap is below that error."""
    picks = {}
    masks = [groups == g for g in np.unique(groups)]
    for col in ref:
        way = direction(col[0])
        sign = 1.0 if way == "argmin" else -1.0
        err = float(np.nanmax(np.abs(new[col] - ref[col])))
        out = []
        for m in masks:
            a, b = ref[col][m], new[col][m]
            i, j = pick(a, way), pick(b, way)
            spread = float(np.nanmax(a) - np.nanmin(a))
            lost = sign * (a[j] - a[i])  # fp32 score given up by the new pick (>= 0)
            # a near tie: the fp32 runner-up is within the column's bf16 error of the best
            order = np.sort(sign * a[~np.isnan(a)])
            near = len(order) > 1 and order[1] - order[0] < err
            out.append((i == j, lost / spread if spread else 0.0, near))
        picks[col] = (err, out)
    return picks


def share(picks: dict, cols) -> float:
    same = [s for c in cols for s, _, _ in picks[c][1]]
    return float(np.mean(same))


def summarise(picks: dict) -> dict:
    """Over all choices of `compare`: identical share and count, max |new - ref|, share of near ties, share of the
    flips that are near ties, regret mean/p95."""
    flips = [n for c in picks for s, _, n in picks[c][1] if not s]
    regrets = np.array([r for c in picks for _, r, _ in picks[c][1]])
    return {
        "choice_agreement": round(share(picks, list(picks)), 4),
        "choices": len(regrets),
        "max_abs_err": round(max(err for err, _ in picks.values()), 6),
        "near_tie_share": round(float(np.mean([n for c in picks for _, _, n in picks[c][1]])), 4),
        "flips_near_tie": round(float(np.mean(flips)), 4) if flips else None,
        "regret_mean": round(float(regrets.mean()), 4),
        "regret_p95": round(float(np.quantile(regrets, 0.95)), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--run", type=Path, required=True, help="a run directory with samples (e.g. runs/micro-repro)"
    )
    ap.add_argument("--benchmark", default="harmbench", help="whose candidates to score")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument(
        "--adapter",
        type=Path,
        help="default: the score stage's (model.adapter, else <run>/adapter-grpo, else <run>/adapter)",
    )
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    run = RunDir(RunDir.existing(args.run))
    adapter = args.adapter or adapter_dir(run)
    if adapter is None:
        raise SystemExit(f"{run.path} has no adapter-grpo/ or adapter/; pass --adapter")
    rows, groups = run_rows(run, args.benchmark, args.prompts)
    print(f"{len(rows)} candidates of {len(np.unique(groups))} {args.benchmark} prompts; adapter {adapter}")

    vals, secs = {}, {}
    for v in VARIANTS:
        vals[v], secs[v] = score(v, run.config.model.student, adapter, rows, args.batch)
        print(f"  {v}: {secs[v]:.1f} s")
    cols = list(vals["float32"])
    picks = {v: compare(vals["float32"], vals[v], groups) for v in VARIANTS[1:]}
    bf = picks["bfloat16"]
    layer = SelectConfig().default_layer
    for c in cols:
        print(f"  {c[0]}@{c[1]}: bf16 identical {share(bf, [c]):.0%}, max |bf16 - fp32| {bf[c][0]:.1e}")
    result = {
        **summarise(bf),
        "choice_agreement_default_layer": round(share(bf, [("latent_similarity", layer)]), 4),
        "choice_agreement_kl": round(share(bf, [c for c in cols if c[0] == "kl"]), 4),
        "choice_agreement_apart": round(share(picks["bf16_apart"], cols), 4),
        "choice_agreement_weights_only": round(share(picks["bf16_weights"], cols), 4),
        "candidates": len(rows),
        "benchmark": args.benchmark,
        "adapter": str(adapter),
        "default_layer": layer,
        "seconds_fp32": round(secs["float32"], 1),
        "seconds_bf16": round(secs["bfloat16"], 1),
        "seconds_bf16_apart": round(secs["bf16_apart"], 1),
    }
    print(
        f"identical choices: bf16 {result['choice_agreement']:.1%} of {result['choices']} "
        f"(layer {layer} {result['choice_agreement_default_layer']:.0%}, KL {result['choice_agreement_kl']:.0%}); "
        f"bf16 in two passes apart {result['choice_agreement_apart']:.1%}; bf16 weights + fp32 compute {result['choice_agreement_weights_only']:.1%}; "
        f"near ties {result['near_tie_share']:.0%} of choices; mean regret {result['regret_mean']:.3f}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
