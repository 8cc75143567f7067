"""`dalign export`: vLLM compatibility of an adapter and the merged checkpoint (same logits as base + adapter)."""

from __future__ import annotations

import json
import shutil

import torch
from typer.testing import CliRunner

from dalign.cli import app
from dalign.config import ModelConfig
from dalign.models import load_model
from dalign.models.export import vllm_problems
from dalign.models.pair import load_pair


def test_merged_checkpoint_has_the_adapter_pairs_logits(tmp_path, tiny_dir, tiny_adapter_dir):
    out = tmp_path / "merged"
    res = CliRunner().invoke(
        app,
        [
            "export",
            "--adapter",
            str(tiny_adapter_dir),
            "--out",
            str(out),
            "--merged",
            "--set",
            f"model.student=hf:{tiny_dir}",
        ],
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "rank 4 is not one vLLM allows" in text and f"wrote {out}" in text
    assert (out / "model.safetensors").exists() and not list(out.glob("adapter_*"))
    assert json.loads((out / "card.json").read_text())["base_model"] == f"hf:{tiny_dir}"

    pair = load_pair(ModelConfig(student=f"hf:{tiny_dir}"), tiny_adapter_dir)
    merged, _ = load_model(f"hf:{out}")
    ids = torch.tensor([pair.tokenizer.encode("How do I pick a lock? The answer is 42.")])
    with torch.no_grad():
        want = pair.model(ids).logits
        got = merged(ids).logits
        base, _ = load_model(f"hf:{tiny_dir}")
        plain = base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (plain - want).abs().max() > 1e-2  # the adapter changes the logits, so the check above has teeth

    again = CliRunner().invoke(
        app, ["export", "--adapter", str(tiny_adapter_dir), "--out", str(out), "--merged"]
    )
    assert again.exit_code == 2 and "exists" in again.output


def test_vllm_problems_name_modules_to_save_and_rank(tmp_path, tiny_adapter_dir):
    ok = tmp_path / "ok"
    shutil.copytree(tiny_adapter_dir, ok)
    conf = json.loads((ok / "adapter_config.json").read_text())
    (ok / "adapter_config.json").write_text(json.dumps({**conf, "r": 16, "modules_to_save": None}))
    assert vllm_problems(ok) == []
    (ok / "adapter_config.json").write_text(
        json.dumps({**conf, "r": 32, "modules_to_save": ["embed_tokens"]})
    )
    problems = " ".join(vllm_problems(ok))
    assert "modules_to_save ['embed_tokens']" in problems and "--max-lora-rank 32" in problems
