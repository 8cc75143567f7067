"""Dynamic batching: requests from the event loop queue up; one thread runs them through the model in batches.

The thread takes the oldest request, waits up to `max_wait_s` (counted from that request's arrival) for more to
arrive, then runs the oldest requests whose candidates fit in `max_batch` (at least one) as one batch. Oldest first
means no request waits behind later ones; the per-request token budget (checked before queueing) bounds how long any
one batch can take. A full queue is refused at once (429). A request whose client disconnects is dropped from the
queue (its slot is free again); one already in the running batch finishes with it and its answer is discarded.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dalign.score.bestofn import BatchResult, Generated, GenerateRequest
from dalign.serve.metrics import Metrics


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    pass


@dataclass
class Job:
    request: GenerateRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its batch began
    batch: tuple[int, int] = (0, 0)  # (requests, candidates) of its batch
    sample_s: float = 0.0
    score_s: float = 0.0


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[Sequence[GenerateRequest]], BatchResult],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics,
    ):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._closing = False
        self._batch_s = 1.0  # running mean of batch time, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="dalign-batcher", daemon=True)
        self._thread.start()

    # ---- event-loop side ---------------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(request, loop.create_future(), loop)
        with self._cv:
            if self._closing:
                raise ShuttingDown
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self._retry_after())
            self._queue.append(job)
            self._gauges()
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job that is still queued; returns whether it was (False: its batch is already running)."""
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._gauges()
            return True

    @property
    def depth(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking requests; queued ones still run. Waits for the thread to finish them."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout_s)

    # ---- batch thread ------------------------------------------------------------------------------------------
    def _retry_after(self) -> int:
        batches_ahead = 1 + sum(j.request.n for j in self._queue) / self.max_batch
        return max(1, math.ceil(batches_ahead * self._batch_s))

    def _gauges(self) -> None:
        self.metrics.set("dalign_serve_queue_depth", len(self._queue))

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._queue:
                if self._closing:
                    return None
                self._cv.wait()
            deadline = self._queue[0].enqueued + self.max_wait_s
            while (
                not self._closing
                and sum(j.request.n for j in self._queue) < self.max_batch
                and (left := deadline - time.perf_counter()) > 0
            ):
                self._cv.wait(left)
            if not self._queue:  # every waiting client went away
                return []
            batch, used = [], 0
            while self._queue and (not batch or used + self._queue[0].request.n <= self.max_batch):
                job = self._queue.popleft()
                batch.append(job)
                used += job.request.n
            self._gauges()
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        size = (len(batch), sum(j.request.n for j in batch))
        self.metrics.set("dalign_serve_running_requests", len(batch))
        try:
            result = self.run_batch([j.request for j in batch])
        except Exception as e:  # every request of the batch gets the error; the server keeps serving
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, e)
        else:
            for job, item in zip(batch, result.items, strict=True):
                job.started, job.batch = start, size
                job.sample_s, job.score_s = result.sample_s, result.score_s
                job.loop.call_soon_threadsafe(_settle, job.future, item, None)
            self.metrics.inc("dalign_serve_batches_total")
            self.metrics.observe("dalign_serve_batch_candidates", size[1])
        finally:
            self.metrics.set("dalign_serve_running_requests", 0)
            self._batch_s = 0.8 * self._batch_s + 0.2 * (time.perf_counter() - start)


def _settle(future: asyncio.Future, item: Generated | None, error: Exception | None) -> None:
    if future.done():  # the request was abandoned
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(item)
