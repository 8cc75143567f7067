"""execution.backend=ray on a real local Ray cluster (2 CPUs, 2 actors): equal to local, resumable, survives a
killed worker. The cluster starts once for the module; a killed driver joins it by address."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
from tiny import kill_after_shards

from dalign.config import load_config, to_yaml
from dalign.rundir import RunDir
from dalign.sample.stage import run_sample
from dalign.score.stage import run_score

ray = pytest.importorskip("ray")

KEYS = ["benchmark", "prompt_id", "candidate"]
SCORE_KEYS = [*KEYS, "metric", "layer"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _cfg(root, name, tiny_dir, adapter, prompts, backend="local", batch_size=2, max_new_tokens=12):
    return load_config(
        overrides={
            "runs_dir": str(root),
            "name": name,
            "model": {"student": f"hf:{tiny_dir}", "adapter": str(adapter), "think_prefix": False},
            "sample": {
                "datasets": [
                    {"name": "file", "path": str(prompts), "prompt_field": "prompt", "id_field": "id"}
                ],
                "n": 4,
                "max_new_tokens": max_new_tokens,
                "batch_size": batch_size,
            },
            "score": {
                "metrics": ["latent_similarity", "kl", "perplexity", "self_certainty"],
                "layers": "all",
            },
            "execution": {"backend": backend, "workers": 2, "num_cpus": 1},
        }
    )


def _samples(run: RunDir) -> pd.DataFrame:
    df = run.read("samples").sort_values(KEYS).reset_index(drop=True)
    assert not df.duplicated(KEYS).any()
    return df


def _same_samples(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert a[KEYS].values.tolist() == b[KEYS].values.tolist()
    assert a["token_ids"].map(list).tolist() == b["token_ids"].map(list).tolist()
    assert a["response"].tolist() == b["response"].tolist()
    assert a["finish_reason"].tolist() == b["finish_reason"].tolist()


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_dir, tiny_adapter_dir, prompts):
    cfg = _cfg(tmp_path_factory.mktemp("local"), "local", tiny_dir, tiny_adapter_dir, prompts)
    run = RunDir.for_config(cfg)
    run_sample(run)
    run_score(run)
    return run


def test_ray_sample_and_score_equal_local(cluster, local, tmp_path, tiny_dir, tiny_adapter_dir, prompts):
    run = RunDir.for_config(_cfg(tmp_path, "ray", tiny_dir, tiny_adapter_dir, prompts, backend="ray"))
    run_sample(run)
    run_score(run)
    _same_samples(_samples(run), _samples(local))
    # one shard per chunk, as the local backend writes them
    assert len(run.store("samples").files()) == len(local.store("samples").files()) == 12
    # the work really ran in Ray actors, not in this process (how many of the 2 got chunks depends on start-up)
    workers = run.stage_entry("sample")["workers"] + run.stage_entry("score")["workers"]
    assert workers and all(int(w.rpartition(":")[2]) != os.getpid() for w in workers)
    assert local.stage_entry("sample")["workers"] == [f"{socket.gethostname()}:{os.getpid()}"]
    a = run.read("scores").sort_values(SCORE_KEYS).reset_index(drop=True)
    b = local.read("scores").sort_values(SCORE_KEYS).reset_index(drop=True)
    assert len(a) == len(b) == 24 * (4 + 3) and a[SCORE_KEYS].astype(str).equals(b[SCORE_KEYS].astype(str))
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=0, atol=1e-6)


def test_killed_ray_job_resumes_without_loss_or_duplicates(
    cluster, local, tmp_path, tiny_dir, tiny_adapter_dir, prompts
):
    cfg = _cfg(tmp_path, "killed", tiny_dir, tiny_adapter_dir, prompts, backend="ray", batch_size=1)
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    # A separate driver joins this cluster; SIGKILL of its process group ends the job mid-stage.
    cmd = [sys.executable, "-m", "dalign.cli", "sample", "-c", str(path), "--address", cluster]
    store = RunDir(cfg.run_dir, cfg).store("samples")
    partial = kill_after_shards(cmd, store, shards=2, timeout=180)
    assert 0 < partial < 24
    run = RunDir.for_config(cfg)
    run_sample(run)  # resumes on the same cluster (this process is already connected)
    df = _samples(run)
    assert len(df) == 24
    _same_samples(df, _samples(local))


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])  # the name may hold spaces; ppid follows the state


def _actor_pids() -> set[int]:
    """This cluster's StageActor processes: descendants of this process (ray.init started the raylet), so a
    dalign job or another test session on the same machine is never killed."""
    pids = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if b"StageActor" not in f.read():
                    continue
            pid = int(d)
            while pid > 1 and pid != os.getpid():
                pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            continue
        if pid == os.getpid():
            pids.add(int(d))
    return pids


def test_worker_killed_mid_task_is_retried(cluster, local, tmp_path, tiny_dir, tiny_adapter_dir, prompts):
    cfg = _cfg(
        tmp_path, "wk", tiny_dir, tiny_adapter_dir, prompts, backend="ray", batch_size=1, max_new_tokens=12
    )
    run = RunDir.for_config(cfg)
    errors: list[BaseException] = []

    def drive():
        try:
            run_sample(run)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    t = threading.Thread(target=drive)
    t.start()
    store = run.store("samples")
    deadline = time.time() + 120
    while len(store.files()) < 1 and time.time() < deadline and t.is_alive():
        time.sleep(0.02)
    victims = _actor_pids()
    assert t.is_alive() and victims, "the stage finished before a worker could be killed"
    # Kill every actor alive now: the one that just committed a shard has more chunks in flight.
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive() and not errors, errors
    df = _samples(run)
    assert len(df) == 24
    _same_samples(df, _samples(local))
    # every chunk committed once, also those whose worker died after committing (its retry finds them done)
    assert len(run.store("samples").files()) == 24
    pids = {int(w.rpartition(":")[2]) for w in run.stage_entry("sample")["workers"]}
    assert pids - victims, f"no restarted actor took over the remaining chunks: {pids} vs killed {victims}"


def test_ray_judge_with_a_model_judge_equals_local(
    cluster, local, tmp_path, tiny_dir, tiny_adapter_dir, prompts
):
    """Model judges run in Ray actors (each loads the judge model once) and write the same judgments."""
    import json
    import shutil

    from transformers import AutoConfig

    from dalign.judge.probe import Probe
    from dalign.judge.stage import run_judge

    hidden = AutoConfig.from_pretrained(tiny_dir).hidden_size
    rng = np.random.default_rng(0)
    meta = {"model": f"hf:{tiny_dir}", "layer": 2, "max_prompt_tokens": 64, "max_answer_tokens": 128}
    probe = Probe(np.zeros(hidden), np.ones(hidden), rng.normal(size=hidden), 0.0, {**meta, "threshold": 0.5})
    path = probe.save(tmp_path / "tiny-probe.safetensors")
    tables = {}
    for backend in ("local", "ray"):
        cfg = _cfg(tmp_path, f"judge-{backend}", tiny_dir, tiny_adapter_dir, prompts, backend=backend)
        cfg.judge.judges = ["content", "refusal"]
        cfg.judge.content_probe = str(path)
        run = RunDir.for_config(cfg)
        shutil.copytree(local.path / "samples.parquet", run.path / "samples.parquet")
        summary = run_judge(run)
        assert summary["new"] == 2 * len(local.read("samples"))
        tables[backend] = run.read("judgments").sort_values([*KEYS, "judge"]).reset_index(drop=True)
        entry = json.loads((run.path / "manifest.json").read_text())["stages"]["judge"]
        assert entry["rows"] == summary["rows"] and entry["workers"]
        in_driver = [int(w.rpartition(":")[2]) == os.getpid() for w in entry["workers"]]
        assert all(in_driver) if backend == "local" else not any(in_driver)
    pd.testing.assert_frame_equal(tables["local"], tables["ray"])
    assert set(tables["ray"]["label"]) <= {"safe", "unsafe", "error"}
    assert tables["ray"].loc[tables["ray"].judge == "content", "score"].notna().any()


def test_ray_teach_with_a_model_teacher_equals_local(cluster, tmp_path, tiny_dir, tiny_adapter_dir, prompts):
    """A model teacher runs in Ray actors; each chunk is seeded from its prompts, so sampled traces match."""
    import json

    from dalign.teach.stage import run_teach

    teach_prompts = tmp_path / "teach.jsonl"
    teach_prompts.write_text(
        "".join(
            json.dumps({"question": f"Question {i}: how do locks work?", "category": "illicit"}) + "\n"
            for i in range(6)
        )
    )
    tables = {}
    for backend in ("local", "ray"):
        cfg = _cfg(tmp_path, f"teach-{backend}", tiny_dir, tiny_adapter_dir, prompts, backend=backend)
        cfg.teach.teacher = f"hf:{tiny_dir}"
        cfg.teach.prompts = str(teach_prompts)
        cfg.teach.max_new_tokens = 6
        cfg.teach.temperature = 1.0
        cfg.teach.batch_size = 2
        run = RunDir.for_config(cfg)
        assert run_teach(run)["new"] == 6
        tables[backend] = run.read("traces").sort_values("prompt_id").reset_index(drop=True)
        in_driver = [int(w.rpartition(":")[2]) == os.getpid() for w in run.stage_entry("teach")["workers"]]
        assert all(in_driver) if backend == "local" else in_driver and not any(in_driver)
    pd.testing.assert_frame_equal(tables["local"], tables["ray"])
