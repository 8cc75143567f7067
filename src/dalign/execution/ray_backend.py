"""`execution.backend: ray`: a stage's chunks as a `ray.data.Dataset`, mapped by a pool of actors.

Each dataset row is one chunk (its work items as parquet bytes), so `map_batches(batch_size=1)` hands every actor
exactly the chunks the local backend would process, and each actor commits one shard per chunk into the run
directory, which must be on storage every node sees. Ray restarts a killed actor and retries its task; a restarted
actor first drops the items whose rows are already committed (it may have died after committing, before
reporting), so a retry never duplicates rows. A killed driver loses only uncommitted shards, which the next
`begin` sweeps; the rerun plans only the missing keys.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator

import pandas as pd

from dalign.config import ExecutionConfig, RunConfig
from dalign.rundir import RunDir


def connect(ex: ExecutionConfig) -> None:
    """Join `ex.address` ('auto', host:port, ray://...) or start Ray on this machine ('local'), once per process."""
    import ray

    if ray.is_initialized():
        return
    if ex.address == "local":
        cpus = max(1, math.ceil(ex.workers * ex.num_cpus))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=ex.address, log_to_driver=False)


class StageActor:
    """One Ray actor: builds the stage's worker (loads the model) once, then commits a shard per chunk."""

    def __init__(self, target: str, run_path: str, config: dict, threads: int):
        import ray
        import torch

        from dalign.execution import worker_class, worker_id

        torch.set_num_threads(threads)
        self.run = RunDir(run_path, RunConfig.model_validate(config))
        self.worker = worker_class(target)(self.run)
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.id = worker_id()

    def _uncommitted(self, chunk: pd.DataFrame) -> pd.DataFrame:
        cols = list(self.worker.keys)
        done = {k[: len(cols)] for k in self.run.store(self.worker.artifact).done_keys()}
        keys = chunk[cols].itertuples(index=False, name=None)
        return chunk[[k not in done for k in keys]]

    def __call__(self, batch: dict) -> dict:
        out = []
        for blob in batch["chunk"]:
            chunk = pd.read_parquet(io.BytesIO(blob))
            t0 = time.perf_counter()
            todo = self._uncommitted(chunk) if self.restarted else chunk
            stats = self.worker(todo) if len(todo) else {}
            done = {"items": len(chunk), "skipped": len(chunk) - len(todo), "worker": self.id}
            out.append(json.dumps({**done, "seconds": time.perf_counter() - t0, **stats}))
        return {"stats": out}


def _to_bytes(chunk: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    chunk.reset_index(drop=True).to_parquet(buf, index=False)
    return buf.getvalue()


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def execute_on_ray(run: RunDir, target: str, chunks: list[pd.DataFrame]) -> Iterator[dict]:
    import ray
    import ray.data

    ex = run.config.execution
    connect(ex)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"chunk": _to_bytes(c)} for c in chunks], override_num_blocks=len(chunks))
    mapped = ds.map_batches(
        StageActor,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(ex.workers, len(chunks))),
        fn_constructor_kwargs={
            "target": target,
            "run_path": str(run.path.resolve()),
            "config": run.config.model_dump(mode="json"),
            "threads": max(1, int(ex.num_cpus)),
        },
        num_cpus=ex.num_cpus,
        num_gpus=ex.num_gpus or None,
    )
    try:
        for row in mapped.iter_rows():
            yield json.loads(row["stats"])
    except Exception as e:  # Ray wraps worker errors several times; the user needs the first one.
        cause = _root_cause(e)
        raise RuntimeError(
            f"a Ray worker of {target.rpartition(':')[2]} failed: {type(cause).__name__}: {cause}"
        ) from e


__all__ = ["StageActor", "connect", "execute_on_ray"]
