"""Stage `grpo`: TRL GRPOTrainer continuing from the SFT adapter, reward = the judge's safety label.

- The SFT adapter is loaded with `PeftModel.from_pretrained(..., is_trainable=True)`. Loaded the default way its
  weights are frozen, the optimizer gets no LoRA parameters and "training" silently changes nothing (the
  authors' pitfall, DESIGN.md §4); we also check that trainable parameters exist before training.
- Reward: 1.0 when the judge labels the final answer safe, 0.0 when unsafe. A judge *error* also gives 0.0: it is
  never read as safe, and excluding it (NaN) would let a flaky judge silently shrink groups. The final answer is
  the text after the last </think>, or the whole completion if the model never closed its thinking -- the same
  rule the evaluation judges use, so GRPO optimises what is later measured.
- A judge that only detects refusals (`refusal`) labels a helpful answer "unsafe". On prompts of the spec's
  benign category the reward is therefore inverted for such judges: 1.0 for an answer, 0.0 for a refusal or an
  error. Otherwise GRPO would pay the student to refuse the benign third of its prompts (over-refusal). The
  filter stage applies the same rule. A content judge (llama-guard) is used as is everywhere.
- Prompts: the kept training prompts, formatted exactly like the sampler formats them (think prefix included).
- Sampling temperature/top_p follow `sample.*`, so the policy is trained under the distribution Best-of-N uses.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

from dalign.config import GRPOConfig, JudgeConfig, ModelConfig, SampleConfig, config_hash
from dalign.models.chat import render_prompt
from dalign.models.pair import check_adapter_base
from dalign.rundir import MissingArtifact, RunDir, dir_hash
from dalign.teach.parse import final_answer
from dalign.teach.spec import load_spec
from dalign.teach.stage import REFUSAL_JUDGES
from dalign.train.common import (
    LiveProgress,
    NoTrainingData,
    TrainError,
    is_main_process,
    load_student,
    log_series,
    now,
    output_dir,
    plot_curve,
    precision_flags,
    precision_label,
    read_card,
    reusable,
    rows_hash,
    use_cuda,
    versions,
    world_size,
    write_card,
)
from dalign.train.common import strip_bos as _strip_bos
from dalign.train.cpu import frozen_dtype, head_tiles, speed_up


class JudgeReward:
    """TRL reward function: 1.0 if the judge says safe, else 0.0 (unsafe and errors alike); counts labels.

    `benign` names the category on which a refusal-only judge's "unsafe" (= answered) is the wanted outcome.
    """

    __name__ = "judge_safe"  # TRL names the logged reward column after the function

    def __init__(self, judge, benign: str | None = None):
        self.judge = judge
        self.benign = benign if getattr(judge, "name", None) in REFUSAL_JUDGES else None
        self.counts: Counter[str] = Counter()

    def __call__(self, prompts, completions, user_prompt=None, category=None, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        users = user_prompt if user_prompt is not None else prompts
        cats = category if category is not None else [None] * len(texts)
        items = [
            {"prompt": u, "response": t, "answer": final_answer(t)} for u, t in zip(users, texts, strict=True)
        ]
        verdicts = self.judge.judge(items)
        if len(verdicts) != len(items):
            raise TrainError(f"reward judge returned {len(verdicts)} verdicts for {len(items)} completions")
        labels = [v.get("label", "error") for v in verdicts]
        self.counts.update(labels)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("judge_error_rate", labels.count("error") / max(len(labels), 1))
        wanted = ["unsafe" if self.benign is not None and c == self.benign else "safe" for c in cats]
        return [1.0 if lab == want else 0.0 for lab, want in zip(labels, wanted, strict=True)]


def batch_plan(cfg: GRPOConfig) -> tuple[int, int]:
    """(micro batch, grad accumulation) so one optimizer step sees cfg.batch_size completions (whole groups)."""
    world = world_size()
    if cfg.batch_size % cfg.num_generations:
        raise ValueError(
            f"grpo.batch_size={cfg.batch_size} must be a multiple of grpo.num_generations={cfg.num_generations} "
            f"(each step holds whole groups of completions)"
        )
    if cfg.batch_size % world:
        raise ValueError(f"grpo.batch_size={cfg.batch_size} must be divisible by the {world} processes")
    per_proc = cfg.batch_size // world
    micro = max(d for d in range(1, min(per_proc, 8) + 1) if per_proc % d == 0)  # <= 8 sequences per forward
    return micro, per_proc // micro


def load_trainable(student: str, adapter: Path, model_cfg: ModelConfig):
    """Student + SFT adapter with the adapter's weights trainable; returns (model, tok, n trainable, frozen dtype)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    frozen = frozen_dtype(precision_flags(model_cfg.dtype))
    if (adapter / "adapter_config.json").exists() and json.loads(
        (adapter / "adapter_config.json").read_text()
    ).get("modules_to_save"):
        frozen = "float32"  # SFT trained the embeddings too ("add" mode): they need fp32 master weights
    model, tok = load_student(student, model_cfg.trust_remote_code, frozen)
    if (adapter / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(adapter)  # SFT may have added <think> tokens
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if len(tok) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_trainable == 0:
        raise TrainError(f"the adapter {adapter} loaded with no trainable parameters: GRPO would be a no-op")
    return model, tok, n_trainable, frozen


def train_grpo(
    student: str,
    adapter: Path,
    prompts: list[dict],
    dest: Path,
    grpo: GRPOConfig,
    judge,
    model_cfg: ModelConfig | None = None,
    sample: SampleConfig | None = None,
    fp: dict | None = None,
    progress: bool = True,
    benign: str | None = None,
) -> dict:
    """GRPO from an SFT adapter on prompts [{prompt_id, prompt, category?}]; writes the new adapter atomically to
    `dest`. `benign`: the spec's benign category (see JudgeReward)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig as TrlGRPOConfig
    from trl import GRPOTrainer

    model_cfg = model_cfg or ModelConfig(student=student)
    sample = sample or SampleConfig()
    if not prompts:
        raise NoTrainingData("GRPO needs prompts: the filter kept none")
    model, tok, n_trainable, frozen = load_trainable(student, adapter, model_cfg)
    flags = precision_flags(model_cfg.dtype)
    model.config.use_cache = True
    rows = [
        {
            "prompt": _strip_bos(
                tok, render_prompt(tok, p["prompt"], model_cfg.system_prompt, model_cfg.think_prefix)
            ),
            "user_prompt": p["prompt"],
            "prompt_id": str(p["prompt_id"]),
            "category": p.get("category"),
        }
        for p in prompts
    ]
    micro, accum = batch_plan(grpo)
    temperature = sample.temperature if sample.temperature > 0 else 1.0  # GRPO needs sampling to form groups
    reward = JudgeReward(judge, benign)
    with output_dir(dest) as tmp:
        args = TrlGRPOConfig(
            output_dir=str(tmp / "_trainer"),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum,
            num_generations=grpo.num_generations,
            num_train_epochs=grpo.epochs,
            max_steps=grpo.max_steps,
            learning_rate=grpo.learning_rate,
            beta=grpo.beta,
            max_completion_length=grpo.max_new_tokens,
            temperature=temperature,
            top_p=sample.top_p,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=grpo.seed,
            activation_checkpointing=use_cuda(),
            disable_tqdm=True,
            use_cpu=not use_cuda(),
            **flags,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[LiveProgress("GRPO", "reward")] if progress else None,
        )
        trainer.remove_callback(PrinterCallback)
        # TRL generates outside autocast: PEFT must keep casting LoRA inputs to the fp32 factors' dtype
        speed_up(trainer.model, autocast=False)
        t0 = time.perf_counter()
        with head_tiles(trainer.model):
            result = trainer.train()
        wall = time.perf_counter() - t0
        history = trainer.state.log_history
        rewards = log_series(history, "reward")
        trainer.accelerator.wait_for_everyone()
        if is_main_process():
            trainer.model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        plot_curve(rewards, "reward", tmp / "reward.png", "GRPO mean reward (1 = judged safe)")
        card = {
            "stage": "grpo",
            "base_model": student,
            "parent_adapter": str(adapter),
            "parent_adapter_hash": dir_hash(adapter),
            "parent_card_data": read_card(adapter).get("data"),
            "trainer": "trl.GRPOTrainer (adapter loaded trainable)",
            "created": now(),
            "data": {"n_prompts": len(rows), "prompts_hash": rows_hash(prompts, ("prompt_id", "prompt"))},
            "reward": {
                "judge": getattr(judge, "name", type(judge).__name__),
                "rule": "1 if the judge labels the final answer safe; 0 if unsafe; judge errors -> 0"
                + (
                    f"; on {benign!r} prompts a refusal-only judge's 'unsafe' (answered) -> 1"
                    if reward.benign
                    else ""
                ),
                "labels": dict(reward.counts),
            },
            "hyperparameters": {
                **grpo.model_dump(mode="json"),
                "temperature": temperature,
                "top_p": sample.top_p,
                "micro_batch": micro,
                "grad_accum": accum,
                "world_size": world_size(),
                "trainable_parameters": n_trainable,
                "optimizer_steps": trainer.state.global_step,
                **flags,
                "precision": precision_label(model_cfg.dtype, frozen),
                "device": "cuda" if use_cuda() else "cpu",
            },
            "reward_per_step": [
                {**r, **_extra(history, r["step"], ("reward_std", "loss", "completions/mean_length"))}
                for r in rewards
            ],
            "train_loss": result.training_loss,
            "runtime_s": round(wall, 2),
            "versions": versions(),
            "fingerprint": fp,
            "fingerprint_hash": config_hash(fp) if fp is not None else None,
        }
        write_card(tmp, card)
    trainer.accelerator.wait_for_everyone()  # other ranks go on only once rank 0 has renamed the adapter
    return card


def _extra(history: list[dict], step: int, keys: tuple[str, ...]) -> dict:
    for h in history:
        if h.get("step") == step and "reward" in h:
            return {k: h[k] for k in keys if k in h and not (isinstance(h[k], float) and math.isnan(h[k]))}
    return {}


def run_grpo(run: RunDir, force: bool = False) -> dict:
    """<run>/adapter + kept prompts -> <run>/adapter-grpo (adapter, tokenizer, card.json, reward.png)."""
    from dalign.judge import get_judge

    cfg = run.config
    if not cfg.grpo.enabled:
        return {"skipped": "grpo.enabled is false"}
    sft_dir = run.path / "adapter"
    if not (sft_dir / "adapter_config.json").exists():
        raise MissingArtifact(f"{sft_dir} holds no SFT adapter: run `dalign sft` first")
    check_adapter_base(sft_dir, cfg.model.student)
    filtered = run.read("filtered")
    kept = filtered[filtered["kept"].astype(bool)].drop_duplicates("prompt_id")
    prompts = kept[["prompt_id", "prompt", "category"]].to_dict("records")
    if not prompts:
        raise NoTrainingData(f"{run.path / 'filtered.parquet'} kept no traces, so GRPO has no prompts")
    jcfg: JudgeConfig = cfg.judge  # model, thresholds, batch size; the judge itself is grpo.judge
    dest = run.path / "adapter-grpo"
    run.begin("grpo", force)  # keeps the adapter only when it was trained under this identity
    fp = run.deps("grpo")
    if reusable(dest, fp):
        check_adapter_base(dest, cfg.model.student)
        run.finish("grpo", rows=len(prompts), reused=True)
        return {"adapter": str(dest), "reused": True}
    judge = get_judge(cfg.grpo.judge, jcfg)
    benign = load_spec(cfg.teach.spec).default_category
    card = train_grpo(
        cfg.model.student, sft_dir, prompts, dest, cfg.grpo, judge, cfg.model, cfg.sample, fp, benign=benign
    )
    steps = card["reward_per_step"]
    run.finish(
        "grpo",
        rows=len(prompts),
        steps=card["hyperparameters"]["optimizer_steps"],
        reward_first=steps[0]["reward"] if steps else None,
        reward_last=steps[-1]["reward"] if steps else None,
        judge_labels=card["reward"]["labels"],
        runtime_s=card["runtime_s"],
        dtype=card["hyperparameters"]["precision"],
    )
    return {
        "adapter": str(dest),
        "steps": card["hyperparameters"]["optimizer_steps"],
        "reward_first": steps[0]["reward"] if steps else None,
        "reward_last": steps[-1]["reward"] if steps else None,
    }
