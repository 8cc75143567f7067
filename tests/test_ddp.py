"""Data-parallel SFT: 2 steps under `torchrun --nproc-per-node 2` (CPU, gloo) give the adapter that one process
training on the same global batch gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file
from servers import free_port

SCRIPT = """
import json
import os
import sys
from pathlib import Path
from dalign.config import ModelConfig, SFTConfig
from dalign.train.sft import train_sft

student, dest, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rows = [
    {"prompt_id": f"p{i}", "prompt": f"How do I pick lock number {i}?",
     "cot": "policy section 5.1 says refuse " * (1 + i % 2), "answer": "I cannot help with that."}
    for i in range(8)
]
cfg = SFTConfig(
    lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    learning_rate=5e-3, effective_batch_size=batch, per_device_batch_size=2, max_steps=2, max_length=512,
)
card = train_sft(student, rows, dest, cfg, ModelConfig(student=student, think_prefix=False), progress=False)
if os.environ.get("RANK", "0") != "0":  # one report: two ranks writing the same pipe can interleave characters
    sys.exit(0)
print("STEPS", card["hyperparameters"]["optimizer_steps"], "WORLD", card["hyperparameters"]["world_size"],
      "EXAMPLES", card["data"]["n_examples"])
print("LOSS", json.dumps([x["loss"] for x in card["loss"]]))
"""


def _train(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def _weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


def _losses(out: str) -> list[float]:
    return json.loads(out.split("LOSS ", 1)[1].splitlines()[0])


def _dist(a: dict, b: dict) -> float:
    """L2 distance between two adapters' weights, over all tensors."""
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5


def test_two_process_ddp_equals_one_process_same_global_batch(tmp_path, tiny_dir):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    student = f"hf:{tiny_dir}"
    torchrun = Path(sys.executable).with_name("torchrun")
    port = str(free_port())
    ddp = _train(
        [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port]
        + [str(script), student, str(tmp_path / "ddp"), "4"],
        tmp_path,
    )
    one = _train([sys.executable, str(script), student, str(tmp_path / "one"), "4"], tmp_path)
    # the same two steps with global batch 2: what a DDP that did not average gradients would resemble
    _train([sys.executable, str(script), student, str(tmp_path / "half"), "2"], tmp_path)
    # every example fits: each step sees 4 whole examples in both runs (an uneven split would differ honestly)
    assert "STEPS 2 WORLD 2 EXAMPLES 8" in ddp and "STEPS 2 WORLD 1 EXAMPLES 8" in one
    assert _losses(ddp)[0] == _losses(one)[0]  # same initial weights and the same first global batch
    a, b, c = (_weights(tmp_path / d) for d in ("ddp", "one", "half"))
    assert a.keys() == b.keys() == c.keys() and a
    lora_b = [k for k in a if "lora_B" in k]
    assert min(b[k].abs().max().item() for k in lora_b) > 1e-3  # LoRA B starts at zero: it moved
    # LoRA A gets a zero gradient in step 1 (B = 0) and a tiny one in step 2, which Adam divides by its own
    # magnitude: there float noise (all-reduce vs accumulation order) decides. B's gradients are not small.
    lora_a = [k for k in a if "lora_A" in k]
    near = {k: (a[k] - b[k]).abs().max().item() for k in lora_b}
    other = {k: (c[k] - b[k]).abs().max().item() for k in lora_b}
    assert max(near.values()) < 1e-5 < min(other.values()), (near, other)
    assert _dist({k: a[k] for k in lora_a}, b) < _dist({k: c[k] for k in lora_a}, b)
