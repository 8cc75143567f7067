"""fp32 (yesterday's path) vs the new default, one run, same inputs: LoRA SFT, sampling and scoring with the
packaged SmolLM2-135M, each with its MFU. The new default's dtype is what `model.dtype: auto` picks here: bf16 on
AMX / AVX-512 BF16 CPUs, fp32 elsewhere (there bf16 is emulated, hundreds of times slower); `--new-dtype` forces it.
On an fp32 machine the comparison measures the new paths alone (kernels, batches, merging, slices).

- SFT: one epoch of the real `train_sft` over `--sft-examples` shipped corpus traces (LoRA r 32 on all linear
  layers, micro-batch 4 = one step). Baseline, yesterday's path: fp32 weights and compute, random micro-batches,
  stock kernels. New default: length-grouped micro-batches, the CPU kernels of `dalign.train.cpu`, and on bf16 a
  bf16 frozen base under bf16 autocast with fp32 LoRA master weights.
- Sampling: `--prompts` corpus prompts x 8 candidates of the student with a random non-zero LoRA, exactly
  `--new-tokens` new tokens each (the stop token is suppressed, so both do the same work), dalign's sampler.
  Baseline, yesterday's stage: fp32, the adapter applied at every step (PEFT), batches of 32, every row running
  its own prefill. New default: the adapter merged (`sample.merge_adapter`), batches of `--batch` (the stage's
  `sample.batch_size`, 128), a prompt's prefill run once for its 8 candidates (`sample.share_prompt`). The
  decode loop itself (reserved KV cache, grouped compaction) is the same for both.
- Scoring: the candidates of BOTH sampling runs (2 x prompts x 8, e.g. 256), latent similarity at every layer + KL,
  prefix sharing, with a random non-zero LoRA (aligned != base). Baseline, yesterday's path: fp32, the log-softmax
  over whole LM-head chunks. New default: cache-sized slices, and on bf16 an fp32 residual with the base and the
  aligned side in one paired pass that shares the base's rounding (`dalign.score.paired`); a third arm runs the
  new default with the two sides apart (`score.paired: false`). Accuracy of the new default vs fp32 on the same
  candidates: max |score difference|, Spearman rank correlation per column, and the share of identical choices
  (per prompt, per selector: every layer's argmin and KL's argmax), with how many are near ties and the fp32
  regret of the flips (`score_agreement.compare`, which also runs on a finished run's own candidates and adapter).
- Components, in the new default's dtype, each alone against its stock setting: the scorer's log-softmax in
  `SOFTMAX_ROWS`-row slices vs whole LM-head chunks (KL only, a quarter of the scored candidates), and TRL's fused
  LM head under `head_tiles` (tiles, folds, backward) vs TRL's own (forward + backward, 1,100 positions).

The CPU may be shared: the two arms alternate (ABAB) so load drift hits both alike; matmul peaks (the MFU
denominators) are measured once at the start, in the same process.

    .venv/bin/python benchmarks/cpu_speed.py [--sft-examples 48] [--prompts 16] [--new-tokens 64] [--quick]

Last line: JSON with new_dtype, sft_speedup, sample_speedup, score_speedup, sft_mfu_bf16, sample_tokens_per_s,
score_max_abs_err, choice_agreement (and more: softmax_slice_speedup, head_tiles_speedup, ...). With an fp32 new
default the new arm's keys end in `_fp32_new` instead of `_bf16`, and its MFU is over the fp32 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from score_agreement import compare, summarise  # this folder: the script's own sys.path entry

from dalign.config import LoraConfig, ModelConfig, SFTConfig
from dalign.models import cpu, load_model, load_pair, prompt_ids
from dalign.models.loading import pick_dtype
from dalign.sample.sampler import derive_seed, sample_batch
from dalign.score import engine
from dalign.score.engine import ScoreEngine, ScoreRow
from dalign.teach.corpus import load_corpus

SPEC = "packaged:smollm2-135m-instruct"
ARMS = ("float32", "new")  # yesterday's path (fp32) and the new default
# scoring adds "apart": the new default with `score.paired: false` (the two sides in two passes)
SCORE_ARMS = (*ARMS, "apart")
# the new arm's dtype; main() sets it from --new-dtype (default: what `model.dtype: auto` picks on this CPU)
NEW_DTYPE = "float32"


def dtype_of(arm: str) -> str:
    return "float32" if arm == "float32" else NEW_DTYPE


def sft_runs(rows: list[dict], n_examples: int, rounds: int, out: Path) -> dict:
    """Both arms train one epoch on the same `n_examples` corpus traces (a seeded sample), so they see the same
    tokens; the baseline is yesterday's path: fp32, random micro-batches, stock kernels."""
    from dalign.train.sft import build_examples, train_sft

    pick = np.random.default_rng(0).choice(len(rows), size=min(n_examples, len(rows)), replace=False)
    rows = [rows[i] for i in sorted(pick)]
    base = dict(
        lora=LoraConfig(r=32, alpha=64, dropout=0.05),
        learning_rate=2e-4,
        epochs=1,
        effective_batch_size=4,
        per_device_batch_size=4,
        max_length=768,
    )
    arms = {
        "float32": (SFTConfig(**base, group_by_length=False), False),
        "new": (SFTConfig(**base), True),  # the defaults: group_by_length, fast kernels
    }
    res = {d: {"tokens": 0.0, "seconds": 0.0} for d in ARMS}
    for r in range(rounds):
        for d in ARMS:  # ABAB
            cfg, fast = arms[d]
            card = train_sft(
                SPEC,
                rows,
                out / f"sft-{d}-{r}",
                cfg,
                ModelConfig(student=SPEC, dtype=dtype_of(d)),
                progress=False,
                fast_kernels=fast,
            )
            res[d]["tokens"] += card["tokens"]
            res[d]["seconds"] += card["runtime_s"]
            print(f"  sft {d} round {r}: {card['tokens']:.0f} tokens in {card['runtime_s']:.1f} s")
    model, tok = load_model(SPEC, dtype="float32", device="cpu")
    ex, _ = build_examples(tok, rows, None, True, base["max_length"])
    lens = np.array([len(e["input_ids"]) for e in ex], dtype=float)
    # attention: (T+1)/2 keys per query on average, token-weighted over the examples
    per_token = cpu.forward_flops(model, 1, float((lens * (lens + 1) / 2).sum() / lens.sum()))
    # Backward through frozen weights needs input gradients only (as many FLOPs as the forward); LoRA's own
    # weight gradients are < 1 %: forward + backward ~ 2 forwards.
    return {"res": res, "flops_per_token": 2 * per_token}


def sample_runs(models: dict, tok, ids: list[list[int]], new_tokens: int, batches: dict) -> dict:
    """Every (prompt, candidate) through both models; ABAB by groups of the larger batch so load drift hits both."""
    work = [(i, c) for i in range(len(ids)) for c in range(8)]
    out = {d: {"gens": [], "seconds": 0.0, "tokens": 0, "prefills": []} for d in ARMS}
    group = max(batches.values())
    for g in range(0, len(work), group):
        for d in ARMS:
            for s in range(g, min(g + group, len(work)), batches[d]):
                chunk = work[s : min(s + batches[d], g + group)]
                seeds = [derive_seed(0, "cpu_speed", i, c) for i, c in chunk]
                share = d != "float32"  # yesterday's path ran every row's prefill
                t = time.perf_counter()
                gens = sample_batch(
                    models[d],
                    tok,
                    [ids[i] for i, _ in chunk],
                    seeds,
                    max_new_tokens=new_tokens,
                    share_prompt=share,
                )
                out[d]["seconds"] += time.perf_counter() - t
                out[d]["tokens"] += sum(len(x.token_ids) for x in gens)
                out[d]["gens"] += [(i, c, x.token_ids) for (i, c), x in zip(chunk, gens, strict=True)]
                out[d]["prefills"] += sorted({i for i, _ in chunk}) if share else [i for i, _ in chunk]
            print(f"  sample {d}: {out[d]['tokens']} tokens so far, {out[d]['seconds']:.1f} s")
    return out


def make_adapter(dest: Path) -> None:
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    model, _ = load_model(SPEC, dtype="float32", device="cpu")
    torch.manual_seed(0)
    peft = get_peft_model(model, PeftLora(r=32, lora_alpha=64, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # PEFT starts B at 0 (aligned == base); a trained adapter is not
    peft.save_pretrained(dest)
    (dest / "card.json").write_text(json.dumps({"base_model": SPEC}))


def score_runs(adapter: Path, rows: list[ScoreRow], parts: int) -> dict:
    pairs = {d: load_pair(ModelConfig(student=SPEC, dtype=dtype_of(d), device="cpu"), adapter) for d in ARMS}
    engines = {
        d: ScoreEngine(pairs[d], ["latent_similarity", "kl"], "all", 16, share_prompt=True) for d in ARMS
    }
    engines["apart"] = ScoreEngine(pairs["new"], ["latent_similarity", "kl"], "all", 16, True, paired=False)
    # yesterday's path took the log-softmax over whole LM-head chunks; the new default in cache-sized slices
    slices = {"float32": engine.LOGIT_CHUNK, "new": engine.SOFTMAX_ROWS, "apart": engine.SOFTMAX_ROWS}
    chunks = np.array_split(np.arange(len(rows)), parts)  # whole prompts stay together: rows are grouped
    got = {d: {} for d in SCORE_ARMS}
    secs = dict.fromkeys(SCORE_ARMS, 0.0)
    for k, idx in enumerate(chunks):
        for d in SCORE_ARMS:  # ABCABC
            t = time.perf_counter()
            with mock.patch.object(engine, "SOFTMAX_ROWS", slices[d]):
                vals = engines[d].score([rows[i] for i in idx])
            secs[d] += time.perf_counter() - t
            for col, v in vals.items():
                got[d].setdefault(col, []).append(v)
            print(f"  score {d} part {k}: {secs[d]:.1f} s so far")
    got = {d: {c: np.concatenate(v) for c, v in cols.items()} for d, cols in got.items()}
    return {"values": got, "seconds": secs, "model": pairs["float32"].model}  # PEFT model: LoRA counted


def component_runs(adapter: Path, rows: list[ScoreRow], rounds: int = 3) -> dict:
    """Two CPU kernels alone, ABAB, against the stock settings, in the new default's dtype: the scorer's
    log-softmax slices (KL only, `rows`) and TRL's fused LM head in `head_tiles` tiles (forward + backward on 1,100
    positions, under autocast when that dtype is bf16)."""
    from trl.kernels import ChunkedLogProbFunction

    from dalign.train.cpu import head_tiles

    pair = load_pair(ModelConfig(student=SPEC, dtype=NEW_DTYPE, device="cpu"), adapter)
    eng = ScoreEngine(pair, ["kl"], share_prompt=True)
    head = pair.model.get_output_embeddings().weight.detach()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1100, head.shape[1], generator=g).to(
        head.dtype
    )  # as the final norm hands it in training
    targets = torch.randint(0, head.shape[0], (1100,), generator=g)

    def head_pass() -> None:
        import trl.trainer.utils as tu

        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=NEW_DTYPE == "bfloat16"):
            lp = ChunkedLogProbFunction.apply(
                h,
                head,
                None,
                targets,
                1.0,
                tu._CHUNKED_LOGPROB_CHUNK_SIZE,
                None,
                1.0,
                ("log_probs", "entropy", "is_top1"),  # what SFTTrainer asks for
            )[0]
        lp.sum().backward()

    arms = {
        "kl_stock": lambda: mock.patch.object(engine, "SOFTMAX_ROWS", engine.LOGIT_CHUNK),
        "kl_sliced": contextlib.nullcontext,
        "head_stock": contextlib.nullcontext,
        "head_tiles": lambda: head_tiles(pair.model),
    }
    work = {"kl": lambda: eng.score(rows), "head": head_pass}
    secs = dict.fromkeys(arms, 0.0)
    for r in range(rounds + 1):  # round 0 warms up
        for name, ctx in arms.items():
            with ctx():
                t = time.perf_counter()
                work[name.split("_")[0]]()
                if r:
                    secs[name] += time.perf_counter() - t
    return {
        "softmax_slice_speedup": round(secs["kl_stock"] / secs["kl_sliced"], 3),
        "head_tiles_speedup": round(secs["head_stock"] / secs["head_tiles"], 3),
        "seconds": {k: round(v / rounds, 3) for k, v in secs.items()},
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def score_flops(model, rows: list[ScoreRow]) -> float:
    """Both sides (aligned, base): each distinct prompt once, then the responses on its KV cache; the LM head on
    response positions (KL)."""
    prompts = {tuple(r.prompt_ids) for r in rows}
    p_tok = sum(len(p) for p in prompts)
    p_att = sum(len(p) * (len(p) + 1) // 2 for p in prompts)
    r_tok = sum(len(r.response_ids) for r in rows)
    r_att = sum(sum(len(r.prompt_ids) + i + 1 for i in range(len(r.response_ids))) for r in rows)
    return 2 * cpu.forward_flops(model, p_tok + r_tok, p_att + r_att, head_tokens=r_tok)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-examples", type=int, default=48, help="corpus traces per SFT run (one epoch)")
    ap.add_argument("--sft-rounds", type=int, default=2, help="ABAB rounds of SFT")
    ap.add_argument("--prompts", type=int, default=16, help="sampling prompts (x 8 candidates)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128, help="the new default's sampling batch")
    ap.add_argument("--quick", action="store_true", help="a smoke run (8 traces, 2 prompts, 8 tokens)")
    ap.add_argument(
        "--new-dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="the new default's dtype; auto = what `model.dtype: auto` picks here (bf16 only on AMX / AVX-512 BF16)",
    )
    args = ap.parse_args()
    global NEW_DTYPE
    NEW_DTYPE = str(pick_dtype(args.new_dtype, torch.device("cpu"))).removeprefix("torch.")
    # The new arm's keys keep their historical `_bf16` names when it is bf16; an fp32 new default (a CPU without
    # fast bf16) gets `_fp32_new`, and its MFU is over the fp32 peak.
    tag = "bf16" if NEW_DTYPE == "bfloat16" else "fp32_new"
    if args.quick:
        args.sft_examples, args.sft_rounds, args.prompts, args.new_tokens = 8, 1, 2, 8
    t_all = time.perf_counter()
    print(f"cpu: {cpu.describe()}; new default: {NEW_DTYPE}")
    peaks = cpu.matmul_peaks()
    print(f"matmul peaks (2048^2): fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s")

    corpus = load_corpus()
    traces = corpus.rename(columns={"id": "prompt_id"})
    rows = traces[["prompt_id", "prompt", "cot", "answer"]].to_dict("records")
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="dalign-cpu-speed-") as tmp:
        tmp = Path(tmp)
        print("SFT")
        sft = sft_runs(rows, args.sft_examples, args.sft_rounds, tmp)
        tps = {d: sft["res"][d]["tokens"] / sft["res"][d]["seconds"] for d in ARMS}
        sft_mfu = tps["new"] * sft["flops_per_token"] / 1e9 / peaks[NEW_DTYPE]
        for d in ARMS:
            print(f"  sft {d}: {tps[d]:.1f} tokens/s; {cpu.mfu(tps[d] * sft['flops_per_token'], 1.0, peaks)}")
        result.update(
            new_dtype=NEW_DTYPE,
            sft_speedup=round(tps["new"] / tps["float32"], 3),
            sft_tokens_per_s_fp32=round(tps["float32"], 1),
            **{f"sft_tokens_per_s_{tag}": round(tps["new"], 1), f"sft_mfu_{tag}": round(sft_mfu, 4)},
        )
        print(f"  sft speed-up new/fp32: {result['sft_speedup']:.2f}x")

        print("sampling")
        make_adapter(tmp / "adapter")
        pairs = {
            d: load_pair(ModelConfig(student=SPEC, dtype=dtype_of(d), device="cpu"), tmp / "adapter")
            for d in ARMS
        }
        # yesterday: the PEFT model as loaded; now: the adapter merged, as the sample stage does
        models = {"float32": pairs["float32"].model, "new": pairs["new"].model.merge_and_unload()}
        tok = pairs["float32"].tokenizer
        for m in models.values():  # same work for both: every candidate gets exactly --new-tokens
            m.generation_config.suppress_tokens = [tok.eos_token_id]
        prompts = corpus["prompt"].tolist()[: args.prompts]
        ids = [prompt_ids(tok, p, think_prefix=True)[0] for p in prompts]
        for m in models.values():
            sample_batch(m, tok, ids[:2], [1, 2], max_new_tokens=2)  # warm-up
        smp = sample_runs(models, tok, ids, args.new_tokens, {"float32": 32, "new": args.batch})
        # FLOPs of the model itself (the merged one): the unmerged LoRA's extra matmuls are not useful work. The
        # new arm runs a prompt's prefill once per batch it appears in.
        lens = [len(ids[i]) for i, _, _ in smp["float32"]["gens"]]
        new_tokens = [args.new_tokens] * len(lens)
        flops = {
            "float32": cpu.generation_flops(models["new"], lens, new_tokens),
            "new": cpu.generation_flops(
                models["new"], lens, new_tokens, [len(ids[i]) for i in smp["new"]["prefills"]]
            ),
        }
        s_tps = {d: smp[d]["tokens"] / smp[d]["seconds"] for d in ARMS}
        for d in ARMS:
            print(f"  sample {d}: {s_tps[d]:.1f} tokens/s; {cpu.mfu(flops[d], smp[d]['seconds'], peaks)}")
        same_text = np.mean(
            [a[2] == b[2] for a, b in zip(smp["float32"]["gens"], smp["new"]["gens"], strict=True)]
        )
        result.update(
            sample_speedup=round(s_tps["new"] / s_tps["float32"], 3),
            sample_tokens_per_s=round(s_tps["new"], 1),
            sample_tokens_per_s_fp32=round(s_tps["float32"], 1),
            **{f"sample_mfu_{tag}": round(flops["new"] / smp["new"]["seconds"] / 1e9 / peaks[NEW_DTYPE], 4)},
            sample_candidates=len(smp["float32"]["gens"]),
            sample_batch=args.batch,
            sample_same_text_share=round(float(same_text), 3),
        )
        print(
            f"  sample speed-up new/fp32: {result['sample_speedup']:.2f}x (identical texts: {same_text:.0%})"
        )
        del models, pairs

        print("scoring")
        srows, groups = [], []
        for d in ARMS:
            for i, c, toks in smp[d]["gens"]:
                srows.append(ScoreRow(ids[i], toks, (d, i, c)))
                groups.append(i)
        order = np.argsort(groups, kind="stable")  # rows of a prompt together
        srows, groups = [srows[k] for k in order], np.asarray(groups)[order]
        sc = score_runs(tmp / "adapter", srows, parts=2)
        vals = sc["values"]
        rho = min(spearman(vals["new"][c], vals["float32"][c]) for c in vals["float32"])
        agree = summarise(compare(vals["float32"], vals["new"], groups))
        apart = summarise(compare(vals["float32"], vals["apart"], groups))
        sflops = score_flops(sc["model"], srows)
        for d in SCORE_ARMS:
            print(
                f"  score {d}: {len(srows)} candidates in {sc['seconds'][d]:.1f} s; {cpu.mfu(sflops, sc['seconds'][d], peaks)}"
            )
        result.update(
            score_speedup=round(sc["seconds"]["float32"] / sc["seconds"]["new"], 3),
            score_candidates=len(srows),
            score_max_abs_err=agree.pop("max_abs_err"),
            score_min_spearman=round(rho, 4),
            **agree,
            score_speedup_apart=round(sc["seconds"]["float32"] / sc["seconds"]["apart"], 3),
            choice_agreement_apart=apart["choice_agreement"],
            score_max_abs_err_apart=apart["max_abs_err"],
            **{f"score_mfu_{tag}": round(sflops / sc["seconds"]["new"] / 1e9 / peaks[NEW_DTYPE], 4)},
        )
        print(
            f"  score speed-up new/fp32: {result['score_speedup']:.2f}x; max |new - fp32| {result['score_max_abs_err']:.2e}; "
            f"min Spearman {rho:.4f}; identical choices {result['choice_agreement']:.1%} of {result['choices']} "
            f"(near ties {result['near_tie_share']:.0%} of choices, {result['flips_near_tie'] or 0:.0%} of flips; "
            f"mean regret {result['regret_mean']:.3f})"
        )
        print(
            f"  score.paired false: {result['score_speedup_apart']:.2f}x; identical choices "
            f"{result['choice_agreement_apart']:.1%}; max |apart - fp32| {result['score_max_abs_err_apart']:.2e}"
        )

        print(f"components ({NEW_DTYPE}): scorer log-softmax slices, fused LM head tiles")
        comp = component_runs(tmp / "adapter", srows[: len(srows) // 4])
        print(f"  {comp['seconds']} s per pass")
        result.update({k: v for k, v in comp.items() if k != "seconds"})
        print(
            f"  KL in {engine.SOFTMAX_ROWS}-row slices {comp['softmax_slice_speedup']:.2f}x; "
            f"LM head tiles {comp['head_tiles_speedup']:.2f}x"
        )
    result.update(
        peak_gflops_fp32=round(peaks["float32"], 1),
        peak_gflops_bf16=round(peaks["bfloat16"], 1),
        sft_examples=args.sft_examples,
        sft_rounds=args.sft_rounds,
        new_tokens=args.new_tokens,
        threads=torch.get_num_threads(),
        wall_s=round(time.perf_counter() - t_all, 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
