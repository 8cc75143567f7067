"""GPU check (run by benchmarks/gpu_check.sh): dalign's sampler, scoring engine and a LoRA training loop on a
random-initialised model of Qwen2.5-1.5B's shape, built here (no weights, nothing downloaded).

    benchmarks/gpu_check.sh                    # CUDA, bf16, the 1.5B shape; < 5 minutes on one GPU
    benchmarks/gpu_check.sh --device cpu       # smoke: the same code path on CPU with a small shape

Prints sampling tokens/s, scoring rows/s, 5 LoRA optimizer steps (peft + AdamW, the paper's LoRA r=32 alpha=64 on
all linear layers) with their tokens/s, peak GPU memory, and the CPU-vs-GPU agreement of every score on a tiny
model (fp32 on both, and bf16 on the GPU). A random model's text is noise: this checks speed, memory and numerics,
not quality. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/tiny.py builds the tiny model

from tiny import make_model, random_lora  # noqa: E402

from dalign.models.pair import ModelPair  # noqa: E402
from dalign.sample.sampler import sample_batch  # noqa: E402
from dalign.score.engine import ScoreEngine, ScoreRow  # noqa: E402

# Qwen2.5-1.5B-Instruct's config.json (public facts: sizes only).
QWEN_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
SMOKE = {
    **QWEN_1_5B,
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
}
METRICS = ["latent_similarity", "kl", "perplexity", "self_certainty"]


class IdTokenizer:
    """The few tokenizer attributes sampling and scoring use, for a model without a real tokenizer."""

    def __init__(self, vocab: int):
        self.eos_token_id = vocab - 1
        self.pad_token_id = vocab - 2


def build(shape: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    conf = Qwen2Config(**shape, bos_token_id=0, eos_token_id=shape["vocab_size"] - 1)
    with torch.device(device):
        model = Qwen2ForCausalLM(conf).to(dtype).eval()
    model.generation_config.eos_token_id = conf.eos_token_id
    return model


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def agreement(device: str) -> dict:
    """Scores of a tiny adapter pair on CPU fp32 vs `device` fp32 and bf16: the largest |difference| per metric."""
    base = make_model("qwen2", 300, layers=4, seed=1)
    pair = ModelPair(model=random_lora(base), tokenizer=IdTokenizer(300))
    g = torch.Generator().manual_seed(0)
    rows = [
        ScoreRow(
            torch.randint(0, 296, (12 + i,), generator=g).tolist(),
            torch.randint(0, 296, (20,), generator=g).tolist(),
        )
        for i in range(16)
    ]

    def scores():
        return ScoreEngine(pair, METRICS, "all", batch_size=8, share_prompt=True).score(rows)

    ref = scores()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        pair.model.to(device=device, dtype=dtype)
        got = scores()
        name = str(dtype).removeprefix("torch.")
        out[name] = {
            f"{m}@{lay}" if lay else m: float(abs(got[(m, lay)] - ref[(m, lay)]).max()) for m, lay in ref
        }
    pair.model.to(device="cpu", dtype=torch.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", default="cuda", help="cuda (the check) or cpu (a smoke run with a small shape)"
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="candidates per prompt (paper: 8)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sft-steps", type=int, default=5)
    ap.add_argument("--sft-batch", type=int, default=4)
    ap.add_argument("--sft-len", type=int, default=1024)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run `benchmarks/gpu_check.sh --device cpu` for the smoke run")
    shape = QWEN_1_5B if cuda else SMOKE
    if not cuda:  # smoke: the code path, not the numbers
        args.prompts, args.n, args.prompt_len, args.max_new_tokens, args.sft_len = 2, 2, 32, 16, 64
    dtype = torch.bfloat16 if cuda else torch.float32
    res: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "shape": "qwen2.5-1.5b" if cuda else "smoke",
    }
    t0 = time.perf_counter()
    model = build(shape, args.device, dtype)
    res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    tok = IdTokenizer(shape["vocab_size"])
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(1, shape["vocab_size"] - 2, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.prompts)
    ]
    work = [p for p in prompts for _ in range(args.n)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    log(f"built {res['params_b']}B params in {res['build_s']} s")
    # sample: every candidate with its own seed, one batch
    sync(args.device)
    t0 = time.perf_counter()
    gens = sample_batch(model, tok, work, list(range(len(work))), max_new_tokens=args.max_new_tokens)
    sync(args.device)
    wall = time.perf_counter() - t0
    new = sum(len(x.token_ids) for x in gens)
    res["sample"] = {"candidates": len(work), "new_tokens": new, "tokens_per_s": round(new / wall, 1)}

    log(f"sampled: {res['sample']}")
    # score: aligned (LoRA) vs base (adapter off), all four metrics at layer 12
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear")
    )
    pair = ModelPair(model=peft.eval(), tokenizer=tok)
    rows = [ScoreRow(p, x.token_ids or [tok.eos_token_id]) for p, x in zip(work, gens, strict=True)]
    engine = ScoreEngine(
        pair, METRICS, [min(12, shape["num_hidden_layers"])], batch_size=16, share_prompt=True
    )
    sync(args.device)
    t0 = time.perf_counter()
    engine.score(rows)
    sync(args.device)
    res["score"] = {"rows": len(rows), "rows_per_s": round(len(rows) / (time.perf_counter() - t0), 2)}

    log(f"scored: {res['score']}")
    # SFT: a few LoRA optimizer steps (weights bf16 on GPU, LoRA params fp32 under autocast)
    peft.train()
    for p in peft.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1.41e-5)
    batch = torch.randint(1, shape["vocab_size"] - 2, (args.sft_batch, args.sft_len), generator=g).to(
        args.device
    )
    losses = []
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.sft_steps):
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=cuda):
            loss = peft(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    sync(args.device)
    wall = time.perf_counter() - t0
    res["sft"] = {
        "steps": args.sft_steps,
        "tokens_per_s": round(args.sft_steps * batch.numel() / wall, 1),
        "loss": losses,
    }
    log(f"trained: {res['sft']}")
    res["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    del peft, model, pair, engine, opt
    res["cpu_vs_device_max_abs_diff"] = agreement(args.device)
    print(json.dumps(res, indent=2))
    fp32 = max(res["cpu_vs_device_max_abs_diff"]["float32"].values())
    print(
        json.dumps(
            {
                "device": res["device"],
                "sample_tokens_per_s": res["sample"]["tokens_per_s"],
                "score_rows_per_s": res["score"]["rows_per_s"],
                "sft_tokens_per_s": res["sft"]["tokens_per_s"],
                "peak_gpu_mem_gb": res["peak_gpu_mem_gb"],
                "score_agreement_fp32_max_abs_diff": fp32,
                "score_agreement_bf16_max_abs_diff": max(
                    res["cpu_vs_device_max_abs_diff"]["bfloat16"].values()
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
