"""Helpers shared by SFT and GRPO: the student, <think> tokens, precision, atomic adapter dirs, cards, curves."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from dalign.config import config_hash
from dalign.models.chat import THINK_CLOSE, THINK_OPEN
from dalign.progress import Progress

ThinkMode = Literal["text", "add"]

# Why "text" is the default (DESIGN.md §2 says "add when missing"; we deviate on purpose):
# - The Best-of-N guard compares the aligned model with the *same weights, adapter disabled*. New token rows exist
#   only in the adapter; with the adapter off, the base model reads whatever the rows were initialised to (random
#   in `load_pair`, which resizes with mean_resizing=False). The base's hidden states would then be perturbed right
#   where every prompt ends ("<think>\n"), confounding the latent-similarity signal we study.
# - At lr 1.41e-5 and a few hundred traces, freshly initialised rows barely move; the student must learn to emit a
#   token it has never seen. As text, "<think>" is a few ordinary tokens every tokenizer already models.
# - Plain text keeps the adapter usable with the student's own tokenizer and keeps it small: "add" must train and
#   save the whole embedding matrix (113 MB fp32 for SmolLM2), see `lora_config`.
# "add" is implemented for students whose chat template already uses the tags, or when the user asks for it.
DEFAULT_THINK_MODE: ThinkMode = "text"


class TrainError(RuntimeError):
    pass


class NoTrainingData(TrainError):
    """Filtering kept nothing: training would be a no-op, so we stop and say why."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def rows_hash(rows: list[dict], fields: tuple[str, ...]) -> str:
    """Order-independent content hash of training rows."""
    keyed = sorted(json.dumps([r.get(f) for f in fields], ensure_ascii=False) for r in rows)
    return hashlib.sha256("\n".join(keyed).encode()).hexdigest()[:16]


def use_cuda() -> bool:
    return torch.cuda.is_available()


def precision_flags(dtype: str = "auto") -> dict[str, bool]:
    """Trainer mixed-precision flags for `model.dtype`: bf16/fp16 autocast over fp32 master weights.

    `auto` is bf16 on GPUs that support it and on CPUs with AMX / AVX-512 BF16 (`dalign.models.cpu`), else fp32.
    """
    from dalign.models.loading import pick_dtype

    dt = pick_dtype(dtype, torch.device("cuda" if use_cuda() else "cpu"))
    if dt == torch.float16 and not use_cuda():
        raise TrainError("model.dtype=float16 training needs a GPU; on CPU use bfloat16 or float32")
    bf16 = dt == torch.bfloat16 and (not use_cuda() or torch.cuda.is_bf16_supported())
    return {"bf16": bf16, "fp16": dt == torch.float16}


def precision_label(dtype: str = "auto", frozen: str = "float32") -> str:
    """How SFT/GRPO compute, for cards and the manifest: e.g. 'bfloat16 autocast, fp32 master weights, bfloat16
    frozen base (auto: ...)'."""
    from dalign.models.loading import describe_dtype

    flags = precision_flags(dtype)
    how = "bfloat16 autocast" if flags["bf16"] else "float16 autocast" if flags["fp16"] else "float32"
    base = f", {frozen} frozen base" if frozen != "float32" else ""
    why = describe_dtype(dtype, "cuda" if use_cuda() else "cpu").partition(" ")[2]
    return f"{how}, fp32 master weights{base}" + (f" {why}" if why else "")


def load_student(spec: str, trust_remote_code: bool = False, dtype: str = "float32"):
    """Student weights on CPU, the Trainer moves them to its device (also under accelerate). Trained weights must
    be fp32 (the optimizer's master copy); a frozen base under autocast may be bf16/fp16 (`cpu.frozen_dtype`)."""
    from dalign.models.loading import load_model

    model, tok = load_model(spec, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def ensure_think_tokens(model, tok, mode: ThinkMode) -> list[int]:
    """In "add" mode, add <think>/</think> when the vocabulary lacks them; returns the new token ids.

    New rows start at the mean embedding of the tag's plain-text pieces (deterministic, and close to what the
    model already associates with the text), not at random.
    """
    if mode == "text":
        return []
    missing = [t for t in (THINK_OPEN, THINK_CLOSE) if t not in tok.get_vocab()]
    if not missing:
        return []
    pieces = {t: tok(t, add_special_tokens=False)["input_ids"] for t in missing}
    tok.add_tokens(missing, special_tokens=False)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    new_ids = tok.convert_tokens_to_ids(missing)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        for t, i in zip(missing, new_ids, strict=True):
            emb[i] = emb[pieces[t]].mean(0)
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[i] = out.weight[pieces[t]].mean(0)
    return list(new_ids)


def lora_config(lcfg, model=None, train_embeddings: bool = False):
    """PEFT LoraConfig from our LoraConfig section.

    With `train_embeddings` (new <think> tokens were added) the input embedding and LM head are trained in full via
    `modules_to_save`, kept tied when the model ties them. PEFT's lighter `trainable_token_indices` would train
    only the new rows, but its wrapper on a tied LM head breaks TRL's fused LM-head loss (no `.bias` attribute).
    """
    from peft import LoraConfig

    extra: dict[str, Any] = {}
    if train_embeddings and model is not None:
        names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        extra["modules_to_save"] = [names[inp]] + ([names[out]] if out is not None else [])
        extra["ensure_weight_tying"] = bool(getattr(model.config, "tie_word_embeddings", False))
    return LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=lcfg.target_modules,
        task_type="CAUSAL_LM",
        **extra,
    )


def strip_bos(tok, text: str) -> str:
    """Drop a BOS the chat template wrote when the tokenizer adds one itself (TRL tokenizes text prompts with
    special tokens on), so the model never sees two BOS tokens."""
    bos = tok.bos_token
    if bos and text.startswith(bos):
        probe = tok("x")["input_ids"]
        if probe and probe[0] == tok.bos_token_id:
            return text[len(bos) :]
    return text


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temp dir next to `dest`; on success it replaces `dest`, on error it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A run killed mid-training leaves its temp dir behind; the stage is not meant to run twice at once, so
    # any such leftover is stale.
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch`/torchrun (RANK is set there), else True."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def output_dir(dest: Path) -> Iterator[Path]:
    """Where a trainer writes: an atomic replacement of `dest` on the main process, scratch space elsewhere
    (under multi-GPU launch every rank trains, only rank 0 saves)."""
    if is_main_process():
        with atomic_dir(dest) as tmp:
            yield tmp
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dalign-rank-") as tmp:
        yield Path(tmp)


def read_card(adapter: Path) -> dict:
    p = adapter / "card.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def write_card(adapter: Path, card: dict) -> None:
    (adapter / "card.json").write_text(json.dumps(card, indent=2, default=str), encoding="utf-8")


def reusable(adapter: Path, fp: dict) -> bool:
    """A finished adapter (weights + card) made under the same fingerprint can be reused as is."""
    card = read_card(adapter)
    return (adapter / "adapter_config.json").exists() and card.get("fingerprint_hash") == config_hash(fp)


def log_series(history: list[dict], key: str) -> list[dict[str, Any]]:
    """Per-step values of one logged metric from a Trainer's log_history."""
    return [
        {"step": h["step"], "epoch": h.get("epoch"), key: float(h[key])}
        for h in history
        if key in h and "step" in h
    ]


def plot_curve(series: list[dict], key: str, path: Path, title: str) -> Path | None:
    """A small PNG of one metric per step (headless matplotlib)."""
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    ax.plot([p["step"] for p in series], [p[key] for p in series], marker="o" if len(series) < 40 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("dalign", "torch", "transformers", "peft", "trl"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class LiveProgress(TrainerCallback):
    """A live rich bar for SFT/GRPO in `dalign run`: steps, loss (GRPO: reward), tokens/s and ETA, every step.

    Used instead of TRL's RichProgressCallback, which stays hidden under `disable_tqdm` until training ends.
    """

    def __init__(self, what: str, metric: str = "loss"):
        self.what, self.metric = what, metric
        self.bar: Progress | None = None
        self.task = None
        self.t0 = 0.0
        self.fields = {"shown": "", "tps": ""}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.t0 = time.perf_counter()
        self.bar = Progress(
            TextColumn(f"[bold]{self.what}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  {task.fields[shown]}  {task.fields[tps]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task(self.what, total=state.max_steps, **self.fields)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if self.metric in logs:
            self.fields["shown"] = f"{self.metric} {float(logs[self.metric]):.4g}"
        if "num_tokens" in logs:  # cumulative tokens seen, logged by TRL's trainers
            rate = float(logs["num_tokens"]) / max(time.perf_counter() - self.t0, 1e-9)
            self.fields["tps"] = f"{rate:.0f} tok/s"
        self.bar.update(self.task, completed=state.global_step, **self.fields)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)
            self.bar.stop()
            self.bar = None
