"""Prometheus text exposition (format 0.0.4) for the server's counters, gauges and histograms.

Small on purpose: a handful of metric families updated from the event loop and the batch thread under one lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# name -> (type, help); the only families there are, so a typo fails at once.
FAMILIES = {
    "dalign_serve_requests_total": ("counter", "Chat completion requests answered, by HTTP status."),
    "dalign_serve_errors_total": ("counter", "Error answers, by OpenAI error code."),
    "dalign_serve_disconnects_total": ("counter", "Requests whose client went away before the answer."),
    "dalign_serve_candidates_total": ("counter", "Candidates sampled."),
    "dalign_serve_generated_tokens_total": ("counter", "Tokens generated over all candidates."),
    "dalign_serve_batches_total": ("counter", "Batches run."),
    "dalign_serve_queue_depth": ("gauge", "Requests waiting for a batch."),
    "dalign_serve_running_requests": ("gauge", "Requests in the batch being computed."),
    "dalign_serve_request_seconds": ("histogram", "Time from a request's arrival to its answer."),
    "dalign_serve_stage_seconds": ("histogram", "Per request: time in each stage (queue, sample, score)."),
    "dalign_serve_batch_candidates": ("histogram", "Candidates per batch."),
}


def _labels(labels: dict[str, str]) -> str:
    def escape(v: str) -> str:  # the exposition format's label-value escapes
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    inner = ",".join(f'{k}="{escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}" if inner else ""


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hist: dict[str, dict[tuple, tuple[list[int], list[float]]]] = defaultdict(dict)
        self._buckets = {
            "dalign_serve_request_seconds": LATENCY_BUCKETS,
            "dalign_serve_stage_seconds": LATENCY_BUCKETS,
            "dalign_serve_batch_candidates": SIZE_BUCKETS,
        }

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        assert FAMILIES[name][0] == "counter", name
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        assert FAMILIES[name][0] == "gauge", name
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        bounds = self._buckets[name]
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts, total = self._hist[name].setdefault(key, ([0] * (len(bounds) + 1), [0.0]))
            counts[bisect.bisect_left(bounds, value)] += 1
            total[0] += value

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 when never set); for tests and the health endpoint."""
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_) in FAMILIES.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                if kind != "histogram":
                    series = self._values[name] or {(): 0.0}
                    lines += [f"{name}{_labels(dict(k))} {v:g}" for k, v in sorted(series.items())]
                    continue
                bounds = self._buckets[name]
                for key, (counts, total) in sorted(self._hist[name].items()):
                    labels, running = dict(key), 0
                    for bound, c in zip((*bounds, float("inf")), counts, strict=True):
                        running += c
                        le = "+Inf" if bound == float("inf") else f"{bound:g}"
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running}")
                    lines.append(f"{name}_sum{_labels(labels)} {total[0]:g}")
                    lines.append(f"{name}_count{_labels(labels)} {running}")
        return "\n".join(lines) + "\n"
