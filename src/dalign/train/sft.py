"""Stage `sft`: LoRA SFT of the student on the kept traces (TRL SFTTrainer + PEFT), saved to <run>/adapter.

Training format (prompt/completion, loss on the completion only):
  prompt     = render_prompt(tok, prompt, model.system_prompt, think_prefix=model.think_prefix)
               -- the exact string the sampler uses, so it ends with "<think>\\n" by default
  completion = "{cot}\\n</think>\\n\\n{answer}" + eos     ("<think>\\n" is prepended when think_prefix is off)
We tokenize both halves ourselves with `dalign.models.prompt_ids` (the sampler's own function) and hand TRL
`input_ids` + `completion_mask`: the prompt tokens then match inference token for token, with no BPE merge across
the prompt/completion boundary and no second BOS. TRL builds the labels (-100 on the prompt) and truncates.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from pathlib import Path

from dalign.config import ModelConfig, SFTConfig, config_hash
from dalign.models.chat import THINK_CLOSE, THINK_OPEN, PromptTooLong, prompt_ids
from dalign.models.pair import check_adapter_base
from dalign.rundir import RunDir
from dalign.train.common import (
    DEFAULT_THINK_MODE,
    LiveProgress,
    NoTrainingData,
    ThinkMode,
    ensure_think_tokens,
    is_main_process,
    load_student,
    log_series,
    lora_config,
    now,
    output_dir,
    plot_curve,
    precision_flags,
    precision_label,
    reusable,
    rows_hash,
    use_cuda,
    versions,
    world_size,
    write_card,
)
from dalign.train.cpu import frozen_dtype, head_tiles, speed_up

DATA_FIELDS = ("prompt_id", "prompt", "cot", "answer")


def completion_text(cot: str, answer: str, think_prefix: bool) -> str:
    body = f"{cot.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"
    return body if think_prefix else f"{THINK_OPEN}\n{body}"


def build_examples(
    tok, rows: list[dict], system_prompt: str | None, think_prefix: bool, max_length: int
) -> tuple[list[dict], list[str]]:
    """Tokenized examples {input_ids, completion_mask}; long prompts are cut from the left like the sampler does,
    and an example whose completion alone does not fit is dropped (warned), never silently cut mid-answer."""
    examples, dropped, cut = [], [], 0
    for r in rows:
        c_ids = tok(completion_text(r["cot"], r["answer"], think_prefix), add_special_tokens=False)[
            "input_ids"
        ]
        c_ids = c_ids + [tok.eos_token_id]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PromptTooLong)
                p_ids, truncated = prompt_ids(
                    tok, r["prompt"], system_prompt, think_prefix, max_length - len(c_ids)
                )
            del caught
        except ValueError:
            dropped.append(str(r.get("prompt_id")))
            continue
        cut += truncated
        examples.append({"input_ids": p_ids + c_ids, "completion_mask": [0] * len(p_ids) + [1] * len(c_ids)})
    notes = []
    if dropped:
        notes.append(
            f"{len(dropped)} trace(s) longer than sft.max_length={max_length} dropped: {dropped[:5]}"
        )
    if cut:
        notes.append(f"{cut} prompt(s) cut from the left to fit sft.max_length={max_length}")
    return examples, notes


def batch_plan(cfg: SFTConfig, n_examples: int) -> tuple[int, int]:
    """(micro batch, gradient accumulation) giving cfg.effective_batch_size across all processes."""
    micro = max(1, min(cfg.per_device_batch_size, cfg.effective_batch_size, n_examples))
    accum = max(1, round(cfg.effective_batch_size / (micro * world_size())))
    return micro, accum


def train_sft(
    student: str,
    rows: list[dict],
    dest: Path,
    sft: SFTConfig,
    model_cfg: ModelConfig | None = None,
    fp: dict | None = None,
    think_mode: ThinkMode = DEFAULT_THINK_MODE,
    progress: bool = True,
    fast_kernels: bool = True,
) -> dict:
    """Train a LoRA adapter on (prompt, cot, answer) rows and write it atomically to `dest`; returns its card.

    `fast_kernels=False` keeps the stock path (fp32 frozen base, SDPA, nn.Dropout): the benchmarks' baseline."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    model_cfg = model_cfg or ModelConfig(student=student)
    if not rows:
        raise NoTrainingData("no training rows")
    flags = precision_flags(model_cfg.dtype)
    frozen = frozen_dtype(flags) if fast_kernels else "float32"
    model, tok = load_student(student, model_cfg.trust_remote_code, frozen)
    new_ids = ensure_think_tokens(model, tok, think_mode)
    if new_ids and frozen != "float32":  # the embeddings are trained too: they need fp32 master weights
        model, frozen = model.float(), "float32"
    examples, notes = build_examples(
        tok, rows, model_cfg.system_prompt, model_cfg.think_prefix, sft.max_length
    )
    if not examples:
        raise NoTrainingData(
            f"every trace is longer than sft.max_length={sft.max_length}: nothing to train on"
        )
    micro, accum = batch_plan(sft, len(examples))
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    model.config.use_cache = False  # the KV cache is useless while training and warns with checkpointing

    with output_dir(dest) as tmp:
        args = TrlSFTConfig(
            output_dir=str(tmp / "_trainer"),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum,
            num_train_epochs=sft.epochs,
            max_steps=sft.max_steps,
            learning_rate=sft.learning_rate,
            optim="adamw_torch",
            max_length=sft.max_length,
            completion_only_loss=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=sft.seed,
            data_seed=sft.seed,
            activation_checkpointing=use_cuda(),  # saves GPU memory; on CPU it only costs time
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=not use_cuda(),
            train_sampling_strategy="group_by_length" if sft.group_by_length else "random",
            **flags,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(examples),
            processing_class=tok,
            peft_config=lora_config(sft.lora, model, train_embeddings=bool(new_ids)),
            callbacks=[LiveProgress("SFT", "loss")] if progress else None,
        )
        trainer.remove_callback(PrinterCallback)
        if fast_kernels:
            speed_up(trainer.model, autocast=flags["bf16"] or flags["fp16"])
        t0 = time.perf_counter()
        with head_tiles(trainer.model) if fast_kernels else contextlib.nullcontext():
            result = trainer.train()
        wall = time.perf_counter() - t0
        history = trainer.state.log_history
        losses = log_series(history, "loss")
        seen = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
        tokens = float(seen) if seen is not None else n_tokens * trainer.state.epoch
        trainer.accelerator.wait_for_everyone()
        if is_main_process():
            trainer.model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        plot_curve(losses, "loss", tmp / "loss.png", f"SFT loss ({Path(student).name})")
        card = {
            "stage": "sft",
            "base_model": student,
            "trainer": "trl.SFTTrainer + peft LoRA",
            "created": now(),
            "data": {
                "n_traces": len(rows),
                "n_examples": len(examples),
                "data_hash": rows_hash(rows, DATA_FIELDS),
                "tokens_per_epoch": n_tokens,
            },
            "format": {
                "prompt": "render_prompt(tok, prompt, system_prompt, think_prefix)",
                "completion": "{cot}\\n</think>\\n\\n{answer}<eos>"
                if model_cfg.think_prefix
                else "<think>\\n{cot}\\n</think>\\n\\n{answer}<eos>",
                "loss": "completion only",
                "system_prompt": model_cfg.system_prompt,
                "think_prefix": model_cfg.think_prefix,
                "think_tokens": think_mode,
                "added_token_ids": new_ids,
            },
            "hyperparameters": {
                **sft.model_dump(mode="json"),
                "micro_batch": micro,
                "grad_accum": accum,
                "world_size": world_size(),
                "optimizer_steps": trainer.state.global_step,
                "epochs_run": trainer.state.epoch,
                **flags,
                "precision": precision_label(model_cfg.dtype, frozen),
                "fast_kernels": fast_kernels,
                "device": "cuda" if use_cuda() else "cpu",
            },
            "loss": losses,
            "train_loss": result.training_loss,
            "runtime_s": round(wall, 2),
            "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
            "notes": notes,
            "versions": versions(),
            "fingerprint": fp,
            "fingerprint_hash": config_hash(fp) if fp is not None else None,
        }
        write_card(tmp, card)
    trainer.accelerator.wait_for_everyone()  # other ranks go on only once rank 0 has renamed the adapter
    return card


def _no_data_message(run: RunDir, filtered) -> str:
    n = len(filtered)
    mal = int(filtered["malformed"].sum()) if "malformed" in filtered else 0
    reasons = filtered["reason"].value_counts().head(3).to_dict() if "reason" in filtered and n else {}
    return (
        f"{run.path / 'filtered.parquet'}: 0 of {n} traces were kept ({mal} malformed; top reasons: {reasons}). "
        f"SFT stops here rather than train on nothing: use another teacher (teach.teacher), another filter judge "
        f"(filter.judge), or check the judge's verdicts in the reason column."
    )


def run_sft(run: RunDir, force: bool = False) -> dict:
    """filtered.parquet (kept rows) -> <run>/adapter (PEFT adapter, tokenizer, card.json, loss.png)."""
    cfg = run.config
    filtered = run.read("filtered")
    kept = filtered[filtered["kept"].astype(bool)]
    if kept.empty:
        raise NoTrainingData(_no_data_message(run, filtered))
    if (
        "raw" in kept
    ):  # traces kept with filter.keep_malformed have no parsed cot/answer: train on the raw text
        kept = kept.assign(cot=kept["cot"].fillna(""), answer=kept["answer"].fillna(kept["raw"]))
    rows = kept[list(DATA_FIELDS)].to_dict("records")
    dest = run.path / "adapter"
    run.begin("sft", force)  # keeps the adapter only when it was trained under this identity
    fp = run.deps("sft")
    if reusable(dest, fp):
        check_adapter_base(dest, cfg.model.student)
        run.finish("sft", rows=len(rows), reused=True)
        return {"adapter": str(dest), "reused": True}
    card = train_sft(cfg.model.student, rows, dest, cfg.sft, cfg.model, fp)
    run.finish(
        "sft",
        rows=len(rows),
        steps=card["hyperparameters"]["optimizer_steps"],
        train_loss=card["train_loss"],
        runtime_s=card["runtime_s"],
        dtype=card["hyperparameters"]["precision"],
        tokens_per_s=card["tokens_per_s"],
        warnings=card["notes"],
    )
    return {
        "adapter": str(dest),
        "examples": card["data"]["n_examples"],
        "steps": card["hyperparameters"]["optimizer_steps"],
        "train_loss": round(card["train_loss"], 4),
        "runtime_s": card["runtime_s"],
    }
