"""Real OpenAI-compatible servers for tests: `transformers serve` on a local model dir, bound to 127.0.0.1.

What `transformers serve` (transformers 5.24) honours, read from its handlers and checked in tests:
- `/v1/chat/completions` applies the model's chat template; `/v1/completions` takes a raw text `prompt`
  (a string only, tokenized with the tokenizer's default special tokens; no token-id prompts).
- `seed` is honoured by `torch.manual_seed` on the server's one global RNG: reproducible only when requests
  are sent one at a time (a concurrent request reseeds the RNG mid-generation).
- `n`, `logprobs`, `top_logprobs`, `best_of`, `echo` are accepted and ignored (a warning in the server log):
  one choice per request and no token ids; recover them by re-tokenising the text.
- `temperature`, `top_p`, `max_tokens`, `stop` and `frequency_penalty` (as repetition_penalty = 1 + value) map to
  generate(); `generation_config` (a JSON string of GenerationConfig fields) REPLACES the model's defaults, e.g.
  `{"do_sample": true, "eos_token_id": 2}` (without eos_token_id it never stops early; without the field the
  model's own generation_config decides do_sample, and temperature is ignored when that is off).
- The text is decoded with skip_special_tokens=True; finish_reason is "length" when max_tokens was reached, else
  "stop". Unknown top-level fields are refused with HTTP 422.

    with TransformersServer(model_dir) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="EMPTY")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class TransformersServer:
    """`transformers serve <model_dir>` as a subprocess on 127.0.0.1:<free port>; stopped (SIGTERM, then SIGKILL
    of its process group) on exit. `model` is the name requests must use (the pinned model's path)."""

    def __init__(
        self, model_dir: str | Path, startup_s: float = 120.0, log: Path | None = None, threads: int = 1
    ):
        self.model = str(model_dir)
        self.threads = threads
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}/v1"
        self.startup_s = startup_s
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> TransformersServer:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", self.model, "--host", HOST, "--port", str(self.port), "--device", "cpu"]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": str(self.threads),
        }
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
        deadline = time.time() + self.startup_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode} ({' '.join(cmd)})")
            try:
                if httpx.get(f"http://{HOST}:{self.port}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"transformers serve did not answer /health within {self.startup_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> TransformersServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
