"""Where a model stage's work runs: in this process (`local`) or on Ray Data actors (`ray`).

A stage plans its pending work (only keys not yet committed) as a list of chunks, one future shard each, and names
a worker class. A worker loads its model once (`Worker(run)`) and turns one chunk into one committed shard of the
stage's artifact (`worker(chunk) -> stats`). `execute` runs the chunks through one local worker, or through a pool
of Ray actors that each build the worker and write their shards into the same run directory (shared storage). The
chunks are the same on both backends, so batch composition and therefore every token id and score are the same.

    for stats in execute(run, "dalign.sample.stage:SampleWorker", chunks):
        bar.advance(task, stats["items"])
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Protocol

import pandas as pd

from dalign.rundir import RunDir


class Worker(Protocol):
    """Built once per process (loads the model); each call commits one shard and returns small stats.

    `artifact` names the store it writes; `keys` are the chunk columns that identify its rows there (a prefix of
    the store's keys), so a retried chunk can skip rows already committed.
    """

    artifact: str
    keys: tuple[str, ...]

    def __init__(self, run: RunDir) -> None: ...

    def __call__(self, chunk: pd.DataFrame) -> dict: ...


def worker_id() -> str:
    """host:pid of this process, as recorded in a stage's manifest (`workers`)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_class(target: str) -> type[Worker]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def execute(run: RunDir, target: str, chunks: list[pd.DataFrame]) -> Iterator[dict]:
    """Run every chunk through `target` ("module:Class") on the configured backend; yields each chunk's stats
    (plus `items`: its row count, `worker`: host:pid that ran it, `seconds`: the worker's time on it) as it
    commits, in completion order."""
    if not chunks:
        return
    if run.config.execution.backend == "ray":
        from dalign.execution.ray_backend import execute_on_ray

        yield from execute_on_ray(run, target, chunks)
        return
    worker = worker_class(target)(run)
    for chunk in chunks:
        t0 = time.perf_counter()
        stats = worker(chunk)
        yield {"items": len(chunk), "worker": worker_id(), "seconds": time.perf_counter() - t0, **stats}


__all__ = ["Worker", "execute", "worker_class", "worker_id"]
