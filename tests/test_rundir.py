import pandas as pd
import pytest

from dalign.config import load_config
from dalign.rundir import RunDir, StageMismatch, fingerprint


def _run(tmp_path, **over):
    cfg = load_config(overrides={"runs_dir": str(tmp_path), "name": "r", **over})
    return RunDir.for_config(cfg)


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


def test_read_missing_artifact_says_what_to_run(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(FileNotFoundError, match="judgments"):
        run.read("judgments")


def test_begin_refuses_other_config_and_names_keys(tmp_path):
    run = _run(tmp_path)
    run.begin("sample", fingerprint(run.config, {"sample": ["batch_size"]}), ["samples"])
    run.store("samples").write([{"benchmark": "b", "prompt_id": "1", "candidate": 0}])
    run.finish("sample", rows=1)

    changed = _run(tmp_path, sample={"n": 3, "batch_size": 99})
    fp = fingerprint(changed.config, {"sample": ["batch_size"]})
    with pytest.raises(StageMismatch) as e:
        changed.begin("sample", fp, ["samples"])
    assert "sample.n" in str(e.value) and "batch_size" not in str(e.value)
    changed.begin("sample", fp, ["samples"], force=True)
    assert not changed.has("samples")
    assert changed.stage_entry("sample")["status"] == "running"


def test_same_config_resumes(tmp_path):
    run = _run(tmp_path)
    fp = fingerprint(run.config, {"sample": None})
    run.begin("sample", fp, ["samples"])
    run.store("samples").write([{"benchmark": "b", "prompt_id": "1", "candidate": 0}])
    run.begin("sample", fp, ["samples"])  # no error: same config
    assert run.has("samples")
