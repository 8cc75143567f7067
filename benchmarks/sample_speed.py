"""Sampling throughput of dalign's per-candidate-seeded sampler vs a plain `model.generate(do_sample=True)` loop.

Same model (packaged SmolLM2-135M), same prompts, same batches, same number of new tokens per sequence
(`min_new_tokens = max_new_tokens`, so both do identical model work and the ratio isolates dalign's overhead:
per-row seeded draws, stop handling, bookkeeping). Prompts are the shipped corpus prompts, N=8 candidates each.

    .venv/bin/python benchmarks/sample_speed.py [--new-tokens 64] [--sequences 64]

Each line also gives the achieved GFLOP/s as a share of the bf16 and fp32 matmul peaks measured at the start (MFU).
Last line: JSON with throughput_ratio_b8, throughput_ratio_b32, tokens_per_s_b32, mfu_b32.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalign.models import cpu, load_model, prompt_ids
from dalign.sample.sampler import derive_seed, sample_batch
from dalign.teach.corpus import load_corpus


def plain_generate(model, tok, batch_ids, new_tokens):
    width = max(len(p) for p in batch_ids)
    ids = torch.full((len(batch_ids), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch_ids):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.7,
            top_p=1.0,
            top_k=None,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    return (out.shape[1] - width) * len(batch_ids)


def dalign_generate(model, tok, batch_ids, new_tokens, seeds):
    gens = sample_batch(model, tok, batch_ids, seeds, temperature=0.7, max_new_tokens=new_tokens)
    return sum(len(g.token_ids) for g in gens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=64, help="sequences per batch size and method")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    peaks = cpu.matmul_peaks()
    print(f"matmul peaks: fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    model, tok = load_model("packaged:smollm2-135m-instruct")
    print(f"model dtype {next(model.parameters()).dtype} ({cpu.bf16_reason()})")
    # Equal work: both methods may never sample the stop token, so every row generates exactly --new-tokens.
    model.generation_config.suppress_tokens = [tok.eos_token_id]
    prompts = load_corpus()["prompt"].tolist()[: args.sequences // 8 + 1]
    ids = [prompt_ids(tok, p, think_prefix=True)[0] for p in prompts]
    rows = [(i, c) for i in range(len(ids)) for c in range(8)][: args.sequences]
    result = {}
    for bs in (8, 32):
        batches = [rows[s : s + bs] for s in range(0, len(rows), bs)]
        # warm-up both paths once
        plain_generate(model, tok, [ids[i] for i, _ in batches[0][:2]], 4)
        dalign_generate(model, tok, [ids[i] for i, _ in batches[0][:2]], 4, [1, 2])
        times = {"plain": 0.0, "dalign": 0.0}
        tokens = {"plain": 0, "dalign": 0}
        for b in batches:  # interleave so drift in machine load hits both alike
            b_ids = [ids[i] for i, _ in b]
            t = time.perf_counter()
            tokens["plain"] += plain_generate(model, tok, b_ids, args.new_tokens)
            times["plain"] += time.perf_counter() - t
            t = time.perf_counter()
            seeds = [derive_seed(0, "bench", i, c) for i, c in b]
            tokens["dalign"] += dalign_generate(model, tok, b_ids, args.new_tokens, seeds)
            times["dalign"] += time.perf_counter() - t
        tps = {k: tokens[k] / times[k] for k in times}
        ratio = tps["dalign"] / tps["plain"]
        flops = cpu.generation_flops(model, [len(ids[i]) for i, _ in rows], [args.new_tokens] * len(rows))
        print(
            f"batch {bs}: plain {tps['plain']:.1f} tok/s, dalign {tps['dalign']:.1f} tok/s, ratio {ratio:.3f}; "
            f"dalign {cpu.mfu(flops, times['dalign'], peaks)}"
        )
        result[f"mfu_b{bs}"] = round(flops / times["dalign"] / 1e9 / peaks["bfloat16"], 4)
        result[f"throughput_ratio_b{bs}"] = round(ratio, 3)
        result[f"tokens_per_s_b{bs}"] = round(tps["dalign"], 1)
        result[f"plain_tokens_per_s_b{bs}"] = round(tps["plain"], 1)
    result.update(
        new_tokens=args.new_tokens,
        sequences=args.sequences,
        threads=torch.get_num_threads(),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        peak_gflops_fp32=round(peaks["float32"], 1),
        peak_gflops_bf16=round(peaks["bfloat16"], 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
