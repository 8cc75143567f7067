"""`dalign export`: what an inference server needs to serve the aligned model.

vLLM loads a LoRA adapter as is (`vllm serve <base> --enable-lora --lora-modules aligned=<adapter>`) only when it
trains no `modules_to_save` (dalign's SFT adds them when it adds `<think>` tokens: the resized embeddings and head
are trained in full), its rank is one vLLM allows and within `--max-lora-rank`, and the tokenizer is the base's.
`vllm_problems` says which of these fail; `export_merged` writes base + adapter as one full checkpoint
(safetensors, tokenizer, card) that vLLM, SGLang, llama.cpp's converter or `transformers serve` load directly.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from dalign.config import ModelConfig

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16


def vllm_problems(adapter: str | Path) -> list[str]:
    """Reasons vLLM would refuse or need flags for this adapter; empty = it loads as is."""
    conf = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    out = []
    if conf.get("modules_to_save"):
        out.append(
            f"it trains modules_to_save {conf['modules_to_save']} (vLLM refuses these): export --merged"
        )
    r = int(conf.get("r", 0))
    if r not in VLLM_LORA_RANKS:
        out.append(f"rank {r} is not one vLLM allows {VLLM_LORA_RANKS}: export --merged")
    elif r > VLLM_DEFAULT_MAX_RANK:
        out.append(
            f"rank {r} > vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: pass --max-lora-rank {r}"
        )
    return out


def export_merged(cfg: ModelConfig, adapter: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Merge the LoRA adapter into the student's weights and save a full checkpoint at `out` (atomically)."""
    from peft import PeftModel

    from dalign.models.loading import load_model
    from dalign.models.pair import check_adapter_base, pair_tokenizer
    from dalign.rundir import dir_hash

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter dir (no adapter_config.json)")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or delete it first")
    check_adapter_base(adapter, cfg.student)
    model, _ = load_model(cfg.student, dtype, "cpu", cfg.trust_remote_code)
    tok = pair_tokenizer(cfg, adapter)
    if len(tok) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)  # as load_pair does
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        card = {"base_model": cfg.student, "merged_adapter": str(adapter), "adapter_hash": dir_hash(adapter)}
        (tmp / "card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["export_merged", "vllm_problems"]
