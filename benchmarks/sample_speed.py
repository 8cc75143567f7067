"""Sampling throughput of dalign's per-candidate-seeded sampler vs a plain `model.generate(do_sample=True)` loop.

Same model (packaged SmolLM2-135M), same prompts, same batches, same number of new tokens per sequence
(`min_new_tokens = max_new_tokens`, so both do identical model work and the ratio isolates dalign's decode loop:
per-row seeded draws, stop handling, bookkeeping, the reserved KV cache, a prompt's prefill shared by its
candidates). A third arm, dalign with `share_prompt=False`, measures what the shared prefill alone is worth and
must give the same texts. Prompts: the shipped corpus prompts (short), or `--dataset NAME` (e.g. `dan`, the long
jailbreak prompts the micro-reproduction samples), N=8 candidates each.

    .venv/bin/python benchmarks/sample_speed.py [--new-tokens 64] [--sequences 64] [--dataset dan]

Each line also gives the achieved GFLOP/s as a share of the bf16 and fp32 matmul peaks measured at the start (MFU).
Last line: JSON with throughput_ratio_b8, throughput_ratio_b32, tokens_per_s_b32, mfu_b32, share_prompt_speedup_b8,
share_prompt_speedup_b32, share_prompt_same_text.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dalign.config import DatasetRef
from dalign.data import load_dataset
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


def dalign_generate(model, tok, batch_ids, new_tokens, seeds, share_prompt=True):
    return sample_batch(
        model, tok, batch_ids, seeds, temperature=0.7, max_new_tokens=new_tokens, share_prompt=share_prompt
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=64, help="sequences per batch size and method")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--dataset", default=None, help="a registered dataset's prompts instead of the corpus's")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    peaks = cpu.matmul_peaks()
    print(f"matmul peaks: fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    model, tok = load_model("packaged:smollm2-135m-instruct")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"model dtype {dtype} ({cpu.bf16_reason()})")
    # Equal work: both methods may never sample the stop token, so every row generates exactly --new-tokens.
    model.generation_config.suppress_tokens = [tok.eos_token_id]
    n_prompts = args.sequences // 8 + 1
    if args.dataset:
        prompts = load_dataset(DatasetRef(name=args.dataset, limit=n_prompts, seed=0))["prompt"].tolist()
    else:
        prompts = load_corpus()["prompt"].tolist()[:n_prompts]
    ids = [prompt_ids(tok, p, think_prefix=True)[0] for p in prompts]
    rows = [(i, c) for i in range(len(ids)) for c in range(8)][: args.sequences]
    lens = [len(ids[i]) for i, _ in rows]
    print(f"{len(rows)} sequences, prompts {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f})")
    result = {}
    same = []
    for bs in (8, 32):
        batches = [rows[s : s + bs] for s in range(0, len(rows), bs)]
        # warm-up every path once
        plain_generate(model, tok, [ids[i] for i, _ in batches[0][:2]], 4)
        dalign_generate(model, tok, [ids[i] for i, _ in batches[0][:2]], 4, [1, 2])
        times = {"plain": 0.0, "dalign": 0.0, "unshared": 0.0}
        tokens = dict.fromkeys(times, 0)
        for b in batches:  # interleave so drift in machine load hits every arm alike
            b_ids = [ids[i] for i, _ in b]
            t = time.perf_counter()
            tokens["plain"] += plain_generate(model, tok, b_ids, args.new_tokens)
            times["plain"] += time.perf_counter() - t
            seeds = [derive_seed(0, "bench", i, c) for i, c in b]
            gens = {}
            for arm in ("dalign", "unshared"):
                t = time.perf_counter()
                gens[arm] = dalign_generate(model, tok, b_ids, args.new_tokens, seeds, arm == "dalign")
                times[arm] += time.perf_counter() - t
                tokens[arm] += sum(len(g.token_ids) for g in gens[arm])
            same += [
                a.token_ids == u.token_ids for a, u in zip(gens["dalign"], gens["unshared"], strict=True)
            ]
        tps = {k: tokens[k] / times[k] for k in times}
        ratio = tps["dalign"] / tps["plain"]
        # executed FLOPs: with sharing, a batch runs each distinct prompt's prefill once
        flops = cpu.generation_flops(
            model,
            lens,
            [args.new_tokens] * len(rows),
            [len(ids[i]) for b in batches for i in {i for i, _ in b}],
        )
        print(
            f"batch {bs}: plain {tps['plain']:.1f} tok/s, dalign {tps['dalign']:.1f} tok/s, ratio {ratio:.3f}; "
            f"dalign without prompt sharing {tps['unshared']:.1f} tok/s (sharing "
            f"{tps['dalign'] / tps['unshared']:.2f}x); dalign {cpu.mfu(flops, times['dalign'], peaks)}"
        )
        # over the peak of the dtype the model runs in (a share of an emulated bf16 peak would mean nothing)
        result[f"mfu_b{bs}"] = round(flops / times["dalign"] / 1e9 / peaks[dtype], 4)
        result[f"throughput_ratio_b{bs}"] = round(ratio, 3)
        result[f"tokens_per_s_b{bs}"] = round(tps["dalign"], 1)
        result[f"plain_tokens_per_s_b{bs}"] = round(tps["plain"], 1)
        result[f"share_prompt_speedup_b{bs}"] = round(tps["dalign"] / tps["unshared"], 3)
    result.update(
        share_prompt_same_text=round(sum(same) / len(same), 4),
        dataset=args.dataset or "corpus",
        mean_prompt_tokens=round(sum(lens) / len(lens), 1),
        new_tokens=args.new_tokens,
        sequences=args.sequences,
        threads=torch.get_num_threads(),
        dtype=dtype,
        peak_gflops_fp32=round(peaks["float32"], 1),
        peak_gflops_bf16=round(peaks["bfloat16"], 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
