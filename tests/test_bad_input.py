"""Bad input and faults, tried as a new user would: one clear error each, and nothing changed on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from dalign.cli import app
from dalign.config import ConfigError, DatasetRef, ModelConfig, load_config
from dalign.data import DatasetError, load_dataset
from dalign.models.loading import ModelSpecError, resolve_spec
from dalign.models.pair import AdapterMismatch, load_pair
from dalign.rundir import RunDir
from dalign.score.bestofn import BestOfN

cli = CliRunner()


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def made_run(tmp_path, tiny_dir) -> Path:
    """A run whose samples and scores exist (written through begin/finish under its config)."""
    cfg = load_config(
        overrides={
            "name": "r",
            "runs_dir": str(tmp_path),
            "model": {"student": f"hf:{tiny_dir}"},
            "sample": {"n": 2, "datasets": [{"name": "advbench", "limit": 4}]},
            "score": {"layers": [1, 2]},
        }
    )
    run = RunDir.for_config(cfg)
    for stage, name, rows in (
        ("sample", "samples", [{"benchmark": "advbench", "prompt_id": "a", "candidate": 0, "prompt": "x"}]),
        ("score", "scores", [{"benchmark": "advbench", "prompt_id": "a", "candidate": 0, "metric": "kl",
                              "layer": None, "value": 0.1}]),
    ):  # fmt: skip
        run.begin(stage)
        run.store(name).write(rows)
        run.finish(stage)
    return run.path


def test_refused_command_rewrites_nothing(made_run):
    before = _snapshot(made_run)
    res = cli.invoke(app, ["sample", "-r", str(made_run), "--set", "sample.temperature=1.3", "-n", "2"])
    assert res.exit_code == 2 and "sample.temperature" in res.output
    assert _snapshot(made_run) == before, "config.yaml (and everything else) untouched by a refused command"


def test_force_validates_before_deleting(made_run):
    before = _snapshot(made_run)
    res = cli.invoke(app, ["score", "-r", str(made_run), "--set", "score.layers=[99]", "--force"])
    assert res.exit_code == 2 and "out of range" in res.output and "1..4" in res.output
    assert _snapshot(made_run) == before, "scores.parquet survives a --force whose config is invalid"


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--set", "sample.batch_size=-1"], "batch_size"),
        (["sample", "--limit", "3"], "--limit is per --dataset"),
        (["report", "-r", "typo-dir"], "does not exist"),
        (["sample", "-r", "nonexistent"], "does not exist"),
        (["judge-train", "--layers", "2,x"], "comma-separated block numbers"),
    ],
)
def test_nothing_done_is_an_error_not_exit_0(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli.invoke(app, args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert list(tmp_path.iterdir()) == [], "no folder was created"


def test_hf_spec_of_missing_local_dir(tmp_path):
    with pytest.raises(ModelSpecError, match="local model directory .* does not exist"):
        resolve_spec(f"hf:{tmp_path}/no-such-model")
    assert resolve_spec("hf:HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_read_only_run_dir(tmp_path, monkeypatch):
    import os

    run = RunDir.for_config(load_config(overrides={"runs_dir": str(tmp_path), "name": "ro"}))
    run.path.mkdir()
    os.chmod(run.path, 0o555)
    try:
        if os.access(run.path, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: a read-only directory cannot be made here")
        with pytest.raises(FileNotFoundError, match="not writable"):
            run.begin("sample")
    finally:
        os.chmod(run.path, 0o755)


def test_broken_adapters_get_clear_errors(tmp_path, tiny_dir, tiny_adapter_dir):
    empty = tmp_path / "empty"
    shutil.copytree(tiny_adapter_dir, empty)
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterMismatch, match="no 'peft_type'"):
        load_pair(ModelConfig(student=f"hf:{tiny_dir}"), empty)
    cut = tmp_path / "cut"
    shutil.copytree(tiny_adapter_dir, cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AdapterMismatch, match="truncated or damaged"):
        load_pair(ModelConfig(student=f"hf:{tiny_dir}"), cut)


def test_blank_csv_row_is_an_error_naming_file_and_line(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt\nfirst\n   \nthird\n")
    with pytest.raises(DatasetError, match=r"p\.csv: empty prompt in data row 2 \(line 3\)"):
        load_dataset(DatasetRef(name="file", path=str(f)))
    f.write_text("prompt\nfirst\nsecond\n\n\n")  # blank lines at the end are not rows
    assert len(load_dataset(DatasetRef(name="file", path=str(f)))) == 2
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": " "}) + "\n")
    with pytest.raises(DatasetError, match=r"p\.jsonl: empty prompt in data row 2 \(record 2\)"):
        load_dataset(DatasetRef(name="file", path=str(j)))


def test_batch_sizes_must_be_positive():
    for key in ("sample.batch_size", "score.batch_size", "judge.batch_size", "teach.batch_size"):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            load_config(overrides=[f"{key}=0"])


def test_bestofn_api_misuse(tiny_dir, tiny_adapter_dir):
    pair = load_pair(ModelConfig(student=f"hf:{tiny_dir}"), tiny_adapter_dir)
    with pytest.raises(ValueError, match="pass layer=<int>"):
        BestOfN(pair, "latent_similarity", layer=None)
    bon = BestOfN(pair, "latent_similarity", layer=2)
    assert bon.think_prefix is ModelConfig().think_prefix
    with pytest.raises(TypeError, match="list of answer strings"):
        bon.choose("hi", "abc")
    with pytest.raises(ValueError, match="n must be >= 1"):
        bon.generate("hi", n=0)
    assert BestOfN(pair, "kl", layer=None).choose("hi", ["a", "b"]).index in (0, 1)


def test_truncated_shard_is_named_and_fix_given(made_run):
    store = RunDir(made_run).store("samples")
    f = store.files()[0]
    f.write_bytes(f.read_bytes()[:30])
    res = cli.invoke(app, ["report", "-r", str(made_run)])
    assert res.exit_code == 0  # the report lists what it cannot read instead of failing
    res = json.loads((made_run / "results.json").read_text())
    assert any(str(f) in m and "rerun" in m for m in res["missing"])
    assert isinstance(pd.read_parquet(RunDir(made_run).store("scores").files()[0]), pd.DataFrame)
