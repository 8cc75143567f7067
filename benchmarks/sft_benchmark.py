"""SFT of the packaged SmolLM2 on the shipped trace corpus, and refusal on AdvBench before vs after.

Runs the real stages (teach --teacher corpus -> filter -> sft) in a run directory, then greedy-decodes the same
AdvBench prompts with the base student and with the student + adapter, both formatted exactly as the sampler does
(render_prompt with the think prefix), and labels every final answer with the refusal judge.

    .venv/bin/python benchmarks/sft_benchmark.py                       # paper hyper-parameters (3 epochs)
    .venv/bin/python benchmarks/sft_benchmark.py --lr 4e-4 --epochs 1 --effective-batch 8   # the adapter we ship
    .venv/bin/python benchmarks/sft_benchmark.py --limit 8 --max-steps 2 --out /tmp/sft-smoke   # smoke test

Last stdout line: JSON with sft_wall_s, tokens_per_s, train_tokens, steps, kept_traces, refusal_base,
refusal_aligned, refusal_ratio, closed_think_aligned, n_prompts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def generate(
    model, tok, prompts: list[str], system: str | None, think: bool, max_new: int, batch: int
) -> list[str]:
    """Greedy, left-padded batches; returns decoded completions (special tokens dropped after the first eos)."""
    from rich.progress import track

    from dalign.models import prompt_ids

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[str] = []
    for i in track(range(0, len(prompts), batch), description="generating", transient=True):
        ids = [prompt_ids(tok, p, system, think_prefix=think)[0] for p in prompts[i : i + batch]]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        with torch.no_grad():
            gen = model.generate(
                input_ids=x, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad
            )
        for row in gen[:, width:].tolist():
            cut = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
            out.append(tok.decode(row[:cut], skip_special_tokens=True))
    return out


def refusal_rate(judge, prompts: list[str], responses: list[str]) -> tuple[float, dict]:
    verdicts = judge.judge(
        [{"prompt": p, "response": r, "answer": None} for p, r in zip(prompts, responses, strict=True)]
    )
    labels = [v["label"] for v in verdicts]
    counts = {k: labels.count(k) for k in ("safe", "unsafe", "error")}
    # refused = judged safe by the refusal judge; errors (empty answers) count as not refused
    return counts["safe"] / len(labels), counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/dalign-sft-bench", help="run dir (adapter lands in OUT/adapter)")
    ap.add_argument("--limit", type=int, default=100, help="AdvBench prompts")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--gen-batch", type=int, default=25)
    ap.add_argument("--lr", type=float, default=1.41e-5)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--effective-batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--judge", default="refusal")
    ap.add_argument("--fresh", action="store_true", help="delete OUT first")
    args = ap.parse_args()
    torch.manual_seed(0)

    from dalign.config import DatasetRef, load_config
    from dalign.data import load_dataset
    from dalign.judge import get_judge
    from dalign.models import load_model, load_pair
    from dalign.rundir import RunDir
    from dalign.teach.stage import run_filter, run_teach
    from dalign.train.sft import run_sft

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    cfg = load_config(
        overrides={
            "name": out.name,
            "runs_dir": str(out.parent),
            "filter": {"judge": args.judge},
            "sft": {
                "learning_rate": args.lr,
                "epochs": args.epochs,
                "max_steps": args.max_steps,
                "max_length": args.max_length,
                "effective_batch_size": args.effective_batch,
            },
        }
    )
    run = RunDir.for_config(cfg)
    teach = run_teach(run)
    filt = run_filter(run)
    print(f"teach: {teach}\nfilter: {filt}", flush=True)

    bench = load_dataset(DatasetRef(name="advbench", limit=args.limit, seed=0))
    prompts = bench["prompt"].tolist()
    judge = get_judge(args.judge)
    system, think = cfg.model.system_prompt, cfg.model.think_prefix

    base_file = out / "gen_base.json"
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        model, tok = load_model(cfg.model.student, device="cpu")
        t0 = time.perf_counter()
        base = generate(model, tok, prompts, system, think, args.max_new_tokens, args.gen_batch)
        print(f"base generation: {time.perf_counter() - t0:.0f} s", flush=True)
        base_file.write_text(json.dumps(base))
        del model
    r_base, c_base = refusal_rate(judge, prompts, base)
    print(f"base refusal rate: {r_base:.2f} {c_base}", flush=True)

    t0 = time.perf_counter()
    sft = run_sft(run)
    wall = time.perf_counter() - t0
    card = json.loads((run.path / "adapter" / "card.json").read_text())
    print(f"sft: {sft} (stage wall {wall:.0f} s)", flush=True)

    pair = load_pair(cfg.model, run.path / "adapter")
    merged = pair.model.merge_and_unload()  # same outputs, no per-layer LoRA overhead while decoding
    t0 = time.perf_counter()
    aligned = generate(merged, pair.tokenizer, prompts, system, think, args.max_new_tokens, args.gen_batch)
    print(f"aligned generation: {time.perf_counter() - t0:.0f} s", flush=True)
    r_al, c_al = refusal_rate(judge, prompts, aligned)
    closed = sum("</think>" in a for a in aligned) / len(aligned)
    (out / "generations.jsonl").write_text(
        "\n".join(
            json.dumps({"prompt": p, "base": b, "aligned": a})
            for p, b, a in zip(prompts, base, aligned, strict=True)
        )
    )
    print(f"aligned refusal rate: {r_al:.2f} {c_al}; closed </think>: {closed:.2f}")
    print(f"ratio aligned/base refusal: {r_al / max(r_base, 1e-9):.2f}x")
    result = {
        "sft_wall_s": card["runtime_s"],
        "tokens_per_s": card["tokens_per_s"],
        "train_tokens": card["tokens"],
        "steps": card["hyperparameters"]["optimizer_steps"],
        "learning_rate": args.lr,
        "epochs": args.epochs,
        "effective_batch": args.effective_batch,
        "kept_traces": filt["kept"],
        "n_prompts": len(prompts),
        "refusal_base": round(r_base, 3),
        "refusal_aligned": round(r_al, 3),
        "refusal_ratio": round(r_al / max(r_base, 1e-9), 2),
        "unsafe_aligned": c_al["unsafe"],
        "closed_think_aligned": round(closed, 3),
        "reused_adapter": bool(sft.get("reused")),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
