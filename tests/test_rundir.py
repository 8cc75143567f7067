"""Run directories: committed shards, identities stored with the artifacts, sweeping what a killed run left."""

import json

import pandas as pd
import pytest

from dalign.config import load_config
from dalign.rundir import INDEX, ArtifactError, RunDir, StageMismatch


def _run(tmp_path, **over):
    cfg = load_config(overrides={"runs_dir": str(tmp_path), "name": "r", **over})
    return RunDir.for_config(cfg)


def _sample(run, rows=1, force=False):
    run.begin("sample", force)
    run.store("samples").write([{"benchmark": "b", "prompt_id": str(i), "candidate": 0} for i in range(rows)])
    run.finish("sample", rows=rows)


def test_shards_append_and_keys(tmp_path):
    run = _run(tmp_path)
    store = run.store("samples")
    store.write([{"benchmark": "b", "prompt_id": "1", "candidate": 0, "response": "x"}])
    store.write(pd.DataFrame([{"benchmark": "b", "prompt_id": "1", "candidate": 1, "response": "y"}]))
    assert store.done_keys() == {("b", "1", 0), ("b", "1", 1)}
    assert sorted(run.read("samples")["response"]) == ["x", "y"]
    assert not list(store.path.glob(".*tmp")), "no temporary files left behind"
    with pytest.raises(ValueError, match="key columns"):
        store.write([{"benchmark": "b"}])


def test_only_committed_shards_count_and_strays_are_swept(tmp_path):
    run = _run(tmp_path)
    _sample(run, rows=2)
    store = run.store("samples")
    # What a run killed between the shard rename and the index commit leaves: a whole shard no index lists.
    stray = store.path / "part-99999999999999999999-deadbeef.parquet"
    pd.DataFrame([{"benchmark": "b", "prompt_id": "9", "candidate": 0}]).to_parquet(stray)
    (store.path / ".part-x.parquet.1234.tmp").write_bytes(b"half a shard")
    assert len(run.read("samples")) == 2 and stray not in store.files()
    run.begin("sample")
    assert not stray.exists() and not list(store.path.glob(".*.tmp"))
    assert len(run.read("samples")) == 2


def test_replace_is_one_commit(tmp_path):
    run = _run(tmp_path)
    store = run.store("selection")
    store.write([{"benchmark": "b", "selector": "s", "prompt_id": "1", "chosen_candidate": 0}])
    store.write([{"benchmark": "b", "selector": "s", "prompt_id": "2", "chosen_candidate": 0}])
    store.replace([{"benchmark": "b", "selector": "s", "prompt_id": "3", "chosen_candidate": 1}])
    assert run.read("selection")["prompt_id"].tolist() == ["3"]
    assert len(list(store.path.glob("part-*.parquet"))) == 1, "old shards removed after the commit"


def test_begin_refuses_other_config_and_names_keys(tmp_path):
    run = _run(tmp_path)
    _sample(run)
    changed = _run(tmp_path, sample={"temperature": 1.3, "batch_size": 99})
    with pytest.raises(StageMismatch) as e:
        changed.begin("sample")
    assert "sample.temperature" in str(e.value) and "batch_size" not in str(e.value)
    assert changed.has("samples"), "a refused begin deletes nothing"
    changed.begin("sample", force=True)
    assert not changed.has("samples")


def test_identity_survives_deleting_the_manifest(tmp_path):
    run = _run(tmp_path)
    _sample(run)
    (run.path / "manifest.json").unlink()
    with pytest.raises(StageMismatch, match="sample.temperature"):
        _run(tmp_path, sample={"temperature": 1.3}).begin("sample")
    idx = json.loads((run.store("samples").path / INDEX).read_text())
    assert idx["deps"]["config"]["sample"]["temperature"] == 0.7 and idx["complete"]


def test_upstream_change_makes_downstream_stale(tmp_path):
    run = _run(tmp_path)
    _sample(run)
    run.begin("judge")
    run.store("judgments").write(
        [{"benchmark": "b", "prompt_id": "0", "candidate": 0, "judge": "j", "label": "safe"}]
    )
    run.finish("judge")
    run.begin("judge")  # same samples: kept
    assert run.has("judgments")
    _sample(run, rows=2, force=True)  # re-sampled: the old labels belong to other samples
    run.begin("judge")
    assert not run.has("judgments")


def test_opening_a_run_writes_nothing(tmp_path):
    run = _run(tmp_path)
    assert not run.path.exists()
    assert not run.has("samples") and run.stage_entry("sample") == {}
    assert not run.path.exists()
    run.begin("sample")
    assert (run.path / "config.yaml").is_file()


def test_truncated_shard_names_file_and_fix(tmp_path):
    run = _run(tmp_path)
    _sample(run, rows=3)
    shard = run.store("samples").files()[0]
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ArtifactError, match=f"{shard}.*damaged.*rerun"):
        run.read("samples")


def test_adapter_temp_dirs_are_swept(tmp_path):
    run = _run(tmp_path)
    run.path.mkdir(parents=True)
    stale = run.path / ".adapter.1a2b3c4d.tmp"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    run.begin("sft")
    assert not stale.exists()
