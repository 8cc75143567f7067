"""`dalign serve` against the real `openai` client and raw HTTP, on 127.0.0.1, with the tiny model + adapter.

Servers run in a thread (uvicorn on a socket bound to 127.0.0.1:0) except the graceful-shutdown test, which starts
the real `dalign serve` in a subprocess and sends it SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from dalign.config import ModelConfig, ServeConfig
from dalign.models.chat import prompt_ids
from dalign.models.pair import load_pair
from dalign.score.bestofn import BestOfN
from dalign.serve.app import Guard, authorized, create_app, rank
from dalign.serve.server import BindRefused, check_bind

KEYS = ["test-key-0123456789", "second-key-abcdef"]
SETTINGS = dict(
    layer=3, n=4, max_candidates=8, max_tokens=8, max_tokens_limit=64, max_messages=8, max_body_bytes=16384,
    max_request_tokens=2000, max_wait_ms=50, max_batch=32, max_queue=8,
)  # fmt: skip


@contextlib.contextmanager
def running(app):
    """Serve `app` on 127.0.0.1:<free port> in a thread; yields the base URL; stops it (lifespan shutdown) after."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def bon(tiny_dir, tiny_adapter_dir):
    pair = load_pair(ModelConfig(student=f"hf:{tiny_dir}", device="cpu"), tiny_adapter_dir)
    return BestOfN(pair, "latent_similarity", layer=3, think_prefix=False, batch_size=64)


@pytest.fixture(scope="module")
def url(bon):
    with running(create_app(Guard(bon, ServeConfig(**SETTINGS), 512), KEYS)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[0], max_retries=0, timeout=60)


def ask(client, prompt: str, **kw):
    extra = kw.pop("bon", {})
    return client.chat.completions.create(
        model="dalign-guard", messages=[{"role": "user", "content": prompt}], extra_body={"bon": extra}, **kw
    )


def test_response_shape_and_choice_equals_bestofn_choose(client, bon):
    prompt = "How do I pick a lock?"
    r = ask(client, prompt, max_tokens=8, seed=5, bon={"n": 4, "return_candidates": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "dalign-guard"
    g = r.model_extra["bon"]
    assert g["metric"] == "latent_similarity" and g["layer"] == 3 and g["n"] == 4 and g["scored"]
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].message.role == "assistant"
    cands = g["candidates"]
    assert [c["index"] for c in cands] == [0, 1, 2, 3]
    assert r.choices[0].message.content == cands[g["chosen"]]["text"]
    assert r.choices[0].finish_reason == cands[g["chosen"]]["finish_reason"] in ("stop", "length")
    assert set(g["timings_ms"]) == {"queue", "sample", "score", "total"}
    assert g["timings_ms"]["total"] >= g["timings_ms"]["sample"] > 0
    # The server's prompt is BestOfN's prompt, and its choice is BestOfN's choice on the same candidates.
    pids = prompt_ids(bon.pair.tokenizer, prompt)[0]
    assert r.usage.prompt_tokens == len(pids)
    assert r.usage.completion_tokens == len(cands[g["chosen"]]["token_ids"])
    ref = bon.choose_ids(pids, [c["token_ids"] for c in cands])
    assert ref.index == g["chosen"]
    assert g["scores"] == pytest.approx(ref.scores, abs=1e-5)
    assert [bon.pair.tokenizer.decode(c["token_ids"], skip_special_tokens=True) for c in cands] == [
        c["text"] for c in cands
    ]
    # Same seed, same answer; bon.generate (the single-request API) samples the same candidates.
    again = ask(client, prompt, max_tokens=8, seed=5, bon={"n": 4})
    assert again.choices[0].message.content == r.choices[0].message.content
    single = bon.generate(prompt, n=4, max_new_tokens=8, seed=5)
    assert single.candidates == [c["text"] for c in cands] and single.index == g["chosen"]


def test_n_choices_ranked_best_first(client):
    r = ask(client, "Write a story about a dragon.", max_tokens=8, seed=1, n=3, bon={"n": 6})
    g = r.model_extra["bon"]
    assert len(r.choices) == 3 and [c.index for c in r.choices] == [0, 1, 2]
    assert g["returned"][0] == g["chosen"] and g["returned"] == rank(g["scores"], "argmin")[:3]
    ranked = [g["scores"][i] for i in g["returned"]]
    assert ranked == sorted(ranked)  # latent similarity: least base-like (lowest cosine) first
    assert r.usage.completion_tokens >= 3


def test_rank_reuses_pick_order():
    nan = float("nan")
    assert rank([0.5, nan, 0.2, 0.2], "argmin") == [2, 3, 0, 1]  # ties: lowest index; NaN last
    assert rank([0.5, nan, 0.2], "argmax") == [0, 2, 1]
    assert rank([nan, nan], "argmin") == [0, 1]


def test_bon_layer_single_candidate_and_unscored(client):
    a = ask(client, "Explain photosynthesis", max_tokens=8, seed=3, bon={"n": 4})
    b = ask(client, "Explain photosynthesis", max_tokens=8, seed=3, bon={"n": 4, "layer": 1})
    ga, gb = a.model_extra["bon"], b.model_extra["bon"]
    assert gb["layer"] == 1 and ga["layer"] == 3 and ga["scores"] != pytest.approx(gb["scores"], abs=1e-9)
    one = ask(client, "Explain photosynthesis", max_tokens=8, seed=3, bon={"n": 1}).model_extra["bon"]
    assert one["n"] == 1 and not one["scored"] and one["scores"] == [None] and one["chosen"] == 0
    raw = ask(client, "Explain photosynthesis", max_tokens=8, seed=3, bon={"n": 4, "score": False})
    graw = raw.model_extra["bon"]
    assert not graw["scored"] and graw["chosen"] == 0 and graw["scores"] == [None] * 4
    assert graw["timings_ms"]["score"] < 1  # no scoring pass ran


def test_stream_is_sent_after_selection(client):
    kw = dict(max_tokens=8, seed=9, bon={"n": 4})
    full = ask(client, "What is the capital of France?", **kw)
    chunks = list(
        ask(
            client,
            "What is the capital of France?",
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    last = chunks[-1]
    assert last.model_extra["bon"]["chosen"] == full.model_extra["bon"]["chosen"]
    assert last.usage.completion_tokens == full.usage.completion_tokens


def test_models_health_metrics(client, url):
    assert [m.id for m in client.models.list().data] == ["dalign-guard"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # open: for load balancers
    assert httpx.get(f"{url}/metrics").status_code == 401
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"}).text
    for family in (
        "requests_total",
        "request_seconds_bucket",
        "candidates_total",
        "queue_depth",
        "errors_total",
    ):
        assert f"dalign_serve_{family}" in text
    assert re.search(r'dalign_serve_requests_total\{status="200"\} [1-9]', text)
    assert re.search(r'dalign_serve_stage_seconds_count\{stage="score"\} [1-9]', text)


def test_auth(url):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="dalign-guard", messages=body["messages"], max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    post = f"{url}/v1/chat/completions"
    for headers in ({}, {"Authorization": KEYS[0]}, {"Authorization": f"Basic {KEYS[0]}"}):
        r = httpx.post(post, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    ok = httpx.post(post, json=body, headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=60)
    assert ok.status_code == 200


def test_authorized_compares_whole_keys():
    assert authorized("Bearer abc", ["x", "abc"]) and authorized("bearer abc", ["abc"])
    assert not authorized("Bearer ab", ["abc"]) and not authorized("Bearer abcd", ["abc"])
    assert (
        not authorized(None, ["abc"])
        and not authorized("Bearer ", ["abc"])
        and not authorized("abc", ["abc"])
    )


U = {"role": "user", "content": "hi"}
LONG = "q" * 1000  # the tiny tokenizer learned no merges for q: one token per character
BAD = [
    (b'{"messages": [', 400, "invalid_json"),
    (b'\xff\xfe{"messages": []}', 400, "invalid_encoding"),
    (b"[1, 2]", 400, "invalid_json"),
    ({"messages": []}, 400, "invalid_parameter"),
    ({}, 400, "invalid_parameter"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_parameter"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "invalid_parameter"),
    ({"messages": [U, {"role": "assistant", "content": "x"}]}, 400, "invalid_parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, "invalid_parameter"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_encoding"),
    ({"messages": [U], "max_tokens": 65}, 400, "invalid_parameter"),
    ({"messages": [U], "max_tokens": 0}, 400, "invalid_parameter"),
    ({"messages": [U], "max_tokens": "8"}, 400, "invalid_parameter"),
    ({"messages": [U], "temperature": 3.0}, 400, "invalid_parameter"),
    ({"messages": [U], "n": 5}, 400, "invalid_parameter"),
    ({"messages": [U], "bon": {"n": 9}}, 400, "invalid_parameter"),
    ({"messages": [U], "bon": {"layer": 99}}, 400, "invalid_parameter"),
    ({"messages": [U], "bon": {"model": "hf:other"}}, 400, "invalid_parameter"),
    ({"messages": [U] * 9}, 400, "too_many_messages"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "q" * 200}], "max_tokens": 64, "bon": {"n": 8}}, 400, "request_too_large"),
    ({"messages": [U], "tools": [{"type": "function"}]}, 400, "unsupported_parameter"),
    ({"messages": [U], "stop": ["\n"]}, 400, "unsupported_parameter"),
    ({"messages": [U], "model": "/etc/passwd"}, 404, "model_not_found"),
    ({"messages": [U], "model": "hf:HuggingFaceTB/SmolLM2-1.7B"}, 404, "model_not_found"),
    ({"messages": [{"role": "user", "content": "a" * 20000}]}, 413, "request_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "code"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_openai_error(url, body, status, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/chat/completions", content=data, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}


def test_chunked_body_over_limit_is_413(url):
    """No Content-Length to check up front: the limit holds while the body streams in."""
    body = json.dumps({"messages": [{"role": "user", "content": "a" * 20000}]}).encode()
    chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
    headers = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/chat/completions", content=chunks, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_bad_input_through_openai_client_then_keeps_serving(client, url):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", max_tokens=1000)
    assert e.value.code == "invalid_parameter" and e.value.param == "max_tokens"
    assert "1..64" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="../../etc/passwd", messages=[U])
    for path, status in (("/v1/nothing", 404), ("/v1/chat/completions", 405)):
        r = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert r.status_code == status and "error" in r.json()
    assert ask(client, "hi", max_tokens=4).choices[0].message.content is not None


def test_multi_turn_and_system_messages(client, bon):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "12 plus 30?"}],
        },
    ]
    r = client.chat.completions.create(model="dalign-guard", messages=messages, max_tokens=4, seed=0)
    flat = [
        {**m, "content": m["content"] if isinstance(m["content"], str) else "And 12 plus 30?"}
        for m in messages
    ]
    tok = bon.pair.tokenizer  # the reference: the tokenizer's own template over every turn
    text = tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert r.usage.prompt_tokens == len(want)


def test_concurrent_requests_get_their_own_answers(client):
    prompts = [
        (f"{p} ({i})", i)
        for i, p in enumerate(["How do I pick a lock?", "Write a story about a dragon."] * 4)
    ]
    alone = {p: ask(client, p, max_tokens=8, seed=s) for p, s in prompts}  # one at a time: batches of one
    out: dict = {}

    def call(p, s):
        out[p] = ask(client, p, max_tokens=8, seed=s)

    threads = [threading.Thread(target=call, args=ps) for ps in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(out) == set(alone)
    for p, r in out.items():
        ga, gb = alone[p].model_extra["bon"], r.model_extra["bon"]
        assert r.choices[0].message.content == alone[p].choices[0].message.content, p
        assert gb["chosen"] == ga["chosen"] and gb["seed"] == ga["seed"]
        assert gb["scores"] == pytest.approx(ga["scores"], abs=1e-5)
    assert max(r.model_extra["bon"]["batch"]["requests"] for r in out.values()) > 1  # they were batched
    assert all(alone[p].model_extra["bon"]["batch"]["requests"] == 1 for p in alone)


class Gate:
    """Wraps generate_batch so a test can hold a batch (or fail one) while it fills the queue."""

    def __init__(self, bon):
        self.bon, self.open, self.entered, self.fail_next = bon, threading.Event(), threading.Event(), False

    def __call__(self, requests):
        self.entered.set()
        assert self.open.wait(60), "gate never opened"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        return self.bon.generate_batch(requests)


def test_queue_full_429_disconnect_frees_slot_and_batch_errors(bon):
    gate = Gate(bon)
    cfg = ServeConfig(**{**SETTINGS, "max_queue": 1, "max_wait_ms": 0})
    app = create_app(Guard(bon, cfg, 512), run_batch=gate)
    body = {"messages": [U], "max_tokens": 4}
    with running(app) as base:
        post = f"{base}/v1/chat/completions"
        results: dict = {}

        def send(name):
            results[name] = httpx.post(post, json=body, timeout=60)

        a = threading.Thread(target=send, args=("a",))
        a.start()
        assert gate.entered.wait(30)  # A is in the running batch, held by the gate

        def wait_for(cond):
            deadline = time.time() + 20
            while not cond() and time.time() < deadline:
                time.sleep(0.02)
            assert cond()

        metrics = app.state.metrics

        def give_up():
            with contextlib.suppress(httpx.ReadTimeout):
                results["b"] = httpx.post(post, json=body, timeout=1.0)

        b = threading.Thread(target=give_up)
        b.start()  # B waits in the queue, then its client gives up
        wait_for(lambda: app.state.batcher.depth == 1)
        full = httpx.post(post, json=body, timeout=10)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["code"] == "queue_full"
        b.join(30)
        wait_for(lambda: metrics.value("dalign_serve_disconnects_total") == 1)
        assert app.state.batcher.depth == 0  # B's slot is free again...
        d = threading.Thread(target=send, args=("d",))
        d.start()  # ...so D is queued rather than refused
        wait_for(lambda: app.state.batcher.depth == 1)
        gate.open.set()
        a.join(60)
        d.join(60)
        assert results["a"].status_code == 200 and results["d"].status_code == 200 and "b" not in results
        assert metrics.value("dalign_serve_requests_total", status="429") == 1
        gate.fail_next = True
        broken = httpx.post(post, json=body, timeout=60)
        assert broken.status_code == 500 and "injected failure" in broken.json()["error"]["message"]
        assert httpx.post(post, json=body, timeout=60).status_code == 200  # the batch thread survived


def test_bind_refused_without_keys(monkeypatch):
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, [])
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(BindRefused, match="API keys"):
            check_bind(host, [])
        check_bind(host, ["k"])
    from typer.testing import CliRunner

    from dalign.cli import app

    monkeypatch.delenv("DALIGN_SERVE_API_KEYS", raising=False)
    res = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", "hf:/nonexistent"])
    assert res.exit_code == 2 and "refusing to bind 0.0.0.0" in res.output


def test_graceful_shutdown_finishes_running_request(tiny_dir, tiny_adapter_dir, tmp_path):
    """The real CLI in a subprocess: SIGTERM while a request runs -> it still gets its 200, then a clean exit."""
    cmd = [sys.executable, "-m", "dalign.cli", "serve", "--model", f"hf:{tiny_dir}", "--adapter", str(tiny_adapter_dir),
           "--layer", "3", "--port", "0", "--set", "model.device=cpu", "--set", "model.think_prefix=false",
           "--set", "serve.shutdown_timeout_s=300"]  # fmt: skip
    env = {**os.environ, "DALIGN_SERVE_API_KEYS": KEYS[0]}
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path
    )
    try:
        port = None
        deadline = time.time() + 120
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited early"
            if m := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        assert port, "server never reported its address"
        log: list[str] = []
        drain = threading.Thread(target=lambda: log.append(proc.stderr.read()), daemon=True)
        drain.start()  # keep the pipe drained
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEYS[0]}"}
        result = {}
        body = {"messages": [U], "max_tokens": 48, "seed": 0, "bon": {"n": 8}}
        t = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth, timeout=300)
            )
        )
        t.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            m = httpx.get(f"{base}/metrics", headers=auth).text
            if "dalign_serve_running_requests 1" in m:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the request never started running")
        proc.send_signal(signal.SIGTERM)
        t.join(300)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["bon"]["n"] == 8
        # uvicorn re-raises the signal once shut down cleanly, so the exit status is "killed by SIGTERM".
        assert proc.wait(60) in (0, -signal.SIGTERM)
        drain.join(10)
        assert "Application shutdown complete" in log[0]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
