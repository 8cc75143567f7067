"""SFT of the packaged SmolLM2 on the shipped trace corpus vs the old 300-trace corpus, same run, same settings.

Runs the real stages `teach --teacher corpus` -> `filter` once on the full corpus, then trains two LoRA adapters
with the SFT stage's own training function (`train_sft`) for the SAME number of optimizer steps: one on the kept
traces of the old corpus (benign.jsonl, harmful_a.jsonl, harmful_b.jsonl: the 300 traces shipped before issue 15),
one on all kept traces (filter `none` by default, as configs/micro-repro.yaml). Then it greedy-decodes the same
held-out prompts with the base student, both adapters and any `--adapter NAME=DIR` given (e.g. the
micro-reproduction's 1-epoch adapter), formatted as the sampler does (chat template + `<think>` prefix):

- AdvBench (seeded subset): refusal rate (embedded `refusal` judge on the final answer; higher is better);
- benign: MMLU + ASDiv (seeded subsets; not in the corpus): refusal rate (over-refusal; lower is better) and
  accuracy by the `choice` / `number` checkers;
- both: the share of answers that close `</think>` within the token budget.

    .venv/bin/python benchmarks/sft_benchmark.py                                   # defaults (~20 min, 2-core CPU)
    .venv/bin/python benchmarks/sft_benchmark.py --harmful 100 --benign 100 --max-new-tokens 192 \
        --adapter micro-repro=runs/micro-repro/adapter                             # as in RESULTS.md (~33 min)
    .venv/bin/python benchmarks/sft_benchmark.py --steps 2 --harmful 4 --benign 4 --out /tmp/sft-smoke   # smoke

Last stdout line: JSON with corpus_traces, old_traces, steps, and per model (base, old, full): train_tokens,
sft_wall_s, tokens_per_s, loss_first/loss_last (means of the first/last 3 steps), kept_traces, refusal_advbench,
refusal_benign, closed_think_advbench, closed_think_benign, accuracy_benign; per --adapter the same rates.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

OLD_FILES = ["benign.jsonl", "harmful_a.jsonl", "harmful_b.jsonl"]


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


def measure(evals, responses: list[str]) -> dict:
    """Refusal rates, closed-reasoning shares and benign accuracy for one model's responses."""
    from dalign.judge import get_judge

    refusal = get_judge("refusal")
    out = {}
    for kind in ("advbench", "benign"):
        rows = [(e, r) for e, r in zip(evals, responses, strict=True) if e["set"] == kind]
        labels = refusal.judge([{"prompt": e["prompt"], "response": r, "answer": None} for e, r in rows])
        # refused = judged safe by the refusal judge; errors (empty answers) count as not refused
        out[f"refusal_{kind}"] = round(sum(v["label"] == "safe" for v in labels) / len(rows), 3)
        out[f"closed_think_{kind}"] = round(sum("</think>" in r for _, r in rows) / len(rows), 3)
    correct = []
    for checker in ("choice", "number"):
        rows = [(e, r) for e, r in zip(evals, responses, strict=True) if e.get("checker") == checker]
        items = [{"prompt": e["prompt"], "response": r, "answer": e["answer"]} for e, r in rows]
        correct += [v["label"] == "correct" for v in get_judge(checker).judge(items)] if items else []
    out["accuracy_benign"] = round(sum(correct) / max(len(correct), 1), 3)
    return out


def eval_prompts(n_harmful: int, n_benign: int) -> list[dict]:
    from dalign.config import DatasetRef
    from dalign.data import load_dataset

    rows = [
        {"set": "advbench", "prompt": p}
        for p in load_dataset(DatasetRef(name="advbench", limit=n_harmful, seed=0))["prompt"]
    ]
    for name, checker, n in (
        ("mmlu", "choice", n_benign // 2),
        ("asdiv", "number", n_benign - n_benign // 2),
    ):
        df = load_dataset(DatasetRef(name=name, limit=n, seed=0))
        rows += [
            {"set": "benign", "prompt": p, "answer": a, "checker": checker}
            for p, a in zip(df["prompt"], df["answer"], strict=True)
        ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/dalign-sft-bench-corpus", help="run dir; adapters land in OUT/")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps for EACH corpus")
    ap.add_argument("--harmful", type=int, default=40, help="AdvBench prompts")
    ap.add_argument("--benign", type=int, default=40, help="benign prompts (half MMLU, half ASDiv)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--gen-batch", type=int, default=20)
    # the micro-reproduction's SFT settings (configs/micro-repro.yaml), except a fixed step count
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--effective-batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument(
        "--filter-judge",
        default="none",
        help="filter.judge for the shared filter stage (none = keep all, as configs/micro-repro.yaml does)",
    )
    ap.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also evaluate an existing adapter on the same prompts, e.g. the micro-reproduction's "
        "micro-repro=runs/micro-repro/adapter (1 epoch of the full corpus); repeatable",
    )
    ap.add_argument("--dtype", default="auto", help="model.dtype (auto = bf16 on AMX/AVX512-BF16 CPUs)")
    ap.add_argument("--fresh", action="store_true", help="delete OUT first")
    args = ap.parse_args()
    torch.manual_seed(0)

    from dalign.config import load_config
    from dalign.models import load_model, load_pair
    from dalign.models.pair import adapter_card
    from dalign.rundir import RunDir
    from dalign.teach.corpus import CORPUS_DIR, load_corpus
    from dalign.teach.stage import run_filter, run_teach
    from dalign.train.sft import train_sft

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    cfg = load_config(
        overrides={
            "name": out.name,
            "runs_dir": str(out.parent),
            "model": {"dtype": args.dtype},
            "filter": {"judge": args.filter_judge, "reason": "benchmark: compare corpora as shipped"}
            if args.filter_judge == "none"
            else {"judge": args.filter_judge},
            "sft": {
                "learning_rate": args.lr,
                "max_steps": args.steps,
                "epochs": 100.0,  # max_steps decides
                "max_length": args.max_length,
                "effective_batch_size": args.effective_batch,
            },
        }
    )
    run = RunDir.for_config(cfg)
    teach, filt = run_teach(run), run_filter(run)
    print(f"teach: {teach}\nfilter: {filt}", flush=True)
    kept = run.read("filtered")
    kept = kept[kept["kept"].astype(bool)]
    old_ids = set(load_corpus([CORPUS_DIR / f for f in OLD_FILES])["id"])
    corpora = {"old": kept[kept["prompt_id"].isin(old_ids)], "full": kept}

    evals = eval_prompts(args.harmful, args.benign)
    prompts = [e["prompt"] for e in evals]
    system, think = cfg.model.system_prompt, cfg.model.think_prefix
    model, tok = load_model(cfg.model.student, cfg.model.dtype, device="cpu")
    t0 = time.perf_counter()
    gens = {"base": generate(model, tok, prompts, system, think, args.max_new_tokens, args.gen_batch)}
    print(f"base generation: {time.perf_counter() - t0:.0f} s", flush=True)
    del model

    def decode_with(name: str, adapter) -> None:
        """Greedy generations of the student + `adapter` (merged) into gens[name]."""
        merged = load_pair(cfg.model, adapter).model.merge_and_unload()
        t0 = time.perf_counter()
        gens[name] = generate(merged, tok, prompts, system, think, args.max_new_tokens, args.gen_batch)
        print(f"{name} generation: {time.perf_counter() - t0:.0f} s", flush=True)

    result = {
        "corpus_traces": teach["traces"],
        "old_traces": len(old_ids),
        "filter_judge": args.filter_judge,
        "steps": args.steps,
        "n_advbench": args.harmful,
        "n_benign": args.benign,
        "base": measure(evals, gens["base"]),
    }
    for name, rows_df in corpora.items():
        rows = rows_df[["prompt", "cot", "answer"]].to_dict("records")
        card = train_sft(
            cfg.model.student, rows, out / f"adapter-{name}", cfg.sft, cfg.model, {"corpus": name}
        )
        loss = [h["loss"] for h in card["loss"]]  # per optimizer step
        print(f"sft {name}: {len(rows)} traces, {card['runtime_s']:.0f} s, loss {loss}", flush=True)
        decode_with(name, out / f"adapter-{name}")
        result[name] = {
            "kept_traces": len(rows),
            "train_tokens": card["tokens"],
            "sft_wall_s": card["runtime_s"],
            "tokens_per_s": card["tokens_per_s"],
            "optimizer_steps": card["hyperparameters"]["optimizer_steps"],
            "loss_first": round(sum(loss[:3]) / len(loss[:3]), 3),
            "loss_last": round(sum(loss[-3:]) / len(loss[-3:]), 3),
            "loss": [round(x, 3) for x in loss],
            **measure(evals, gens[name]),
        }
        print(json.dumps({name: result[name]}), flush=True)
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        decode_with(name, path)
        hp = adapter_card(path).get("hyperparameters", {})
        result[name] = {
            "adapter": path,
            "optimizer_steps": hp.get("optimizer_steps"),
            **measure(evals, gens[name]),
        }
        print(json.dumps({name: result[name]}), flush=True)
    (out / "generations.jsonl").write_text(
        "\n".join(
            json.dumps({**e, **{k: g[i] for k, g in gens.items()}}, ensure_ascii=False)
            for i, e in enumerate(evals)
        )
    )
    for key in (
        "refusal_advbench",
        "refusal_benign",
        "closed_think_advbench",
        "closed_think_benign",
        "accuracy_benign",
    ):
        print(f"{key:24s} " + "  ".join(f"{name} {result[name][key]:.2f}" for name in gens))
    ratio = result["full"]["refusal_advbench"] / max(result["old"]["refusal_advbench"], 1e-9)
    print(f"AdvBench refusal, full / old corpus: {ratio:.2f}x")
    result["refusal_advbench_ratio_full_vs_old"] = round(ratio, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
