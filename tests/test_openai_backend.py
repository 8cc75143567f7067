"""sample.backend=openai against a real `transformers serve` on 127.0.0.1 (tests/servers.py), on the tiny model."""

from __future__ import annotations

import json

import pytest
from servers import TransformersServer, free_port

from dalign.config import load_config
from dalign.models import load_tokenizer
from dalign.rundir import RunDir
from dalign.sample.openai_backend import ServerTokenIdsError, server_token_ids
from dalign.sample.stage import run_sample

KEYS = ["benchmark", "prompt_id", "candidate"]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with TransformersServer(tiny_dir, log=tmp_path_factory.mktemp("srv") / "serve.log") as srv:
        yield srv


def _cfg(root, name, tiny_dir, prompts, backend="openai", n=2, temperature=0.0, max_new_tokens=12, **openai):
    return load_config(
        overrides={
            "runs_dir": str(root),
            "name": name,
            "model": {"student": f"hf:{tiny_dir}", "think_prefix": False},
            "sample": {
                "backend": backend,
                "openai": openai,
                "datasets": [
                    {"name": "file", "path": str(prompts), "prompt_field": "prompt", "id_field": "id"}
                ],
                "n": n,
                "temperature": temperature,
                "max_new_tokens": max_new_tokens,
                "batch_size": 4,
            },
        }
    )


def _read(run):
    df = run.read("samples").sort_values(KEYS).reset_index(drop=True)
    assert not df.duplicated(KEYS).any()
    return df


def test_greedy_through_server_equals_local_generate(server, tmp_path, tiny_dir, prompts):
    local = RunDir.for_config(_cfg(tmp_path, "local", tiny_dir, prompts, backend="hf"))
    run_sample(local)
    remote = RunDir.for_config(
        _cfg(
            tmp_path,
            "remote",
            tiny_dir,
            prompts,
            base_url=server.base_url,
            model=server.model,
            max_concurrency=2,
        )
    )
    run_sample(remote)
    a, b = _read(remote), _read(local)
    assert len(a) == len(b) == 12
    # same prompt formatting and the same greedy continuation: the server's text is local's decoded ids
    assert a["response"].tolist() == b["response"].tolist()
    assert a["finish_reason"].tolist() == b["finish_reason"].tolist()
    assert set(a["token_ids_source"]) == {"retokenized"} and set(b["token_ids_source"]) == {"generated"}
    tok = load_tokenizer(f"hf:{tiny_dir}")
    exact = 0
    for ra, rb in zip(a.itertuples(), b.itertuples(), strict=True):
        body = list(rb.token_ids[:-1]) if rb.finish_reason == "stop" else list(rb.token_ids)
        if (
            tok.encode(tok.decode(body), add_special_tokens=False) == body
        ):  # ids that survive a text round trip
            assert list(ra.token_ids) == list(rb.token_ids)
            exact += 1
    assert exact > 0
    assert remote.stage_entry("sample")["backend"] == "openai/local"


def test_seeded_candidates_resume_to_the_same_samples(server, tmp_path, tiny_dir, prompts):
    tok = load_tokenizer(f"hf:{tiny_dir}")
    # transformers serve: generation_config replaces the model's defaults, so it must name the stop token too
    sampling = {"generation_config": json.dumps({"do_sample": True, "eos_token_id": tok.eos_token_id})}
    common = dict(base_url=server.base_url, model=server.model, max_concurrency=1, extra_body=sampling)
    grown = RunDir.for_config(
        _cfg(tmp_path, "grown", tiny_dir, prompts, n=2, temperature=5.0, max_new_tokens=40, **common)
    )
    run_sample(grown)
    first = _read(grown)
    grown = RunDir.for_config(
        _cfg(tmp_path, "grown", tiny_dir, prompts, n=4, temperature=5.0, max_new_tokens=40, **common)
    )
    assert run_sample(grown)["new"] == 12  # only the missing candidates were requested
    fresh = RunDir.for_config(
        _cfg(tmp_path, "fresh", tiny_dir, prompts, n=4, temperature=5.0, max_new_tokens=40, **common)
    )
    run_sample(fresh)
    a, b = _read(grown), _read(fresh)
    assert len(a) == 24 and a["response"].tolist() == b["response"].tolist()
    assert a[a["candidate"] < 2]["response"].tolist() == first["response"].tolist()
    # per-candidate seeds: candidates of one prompt differ
    assert (a.groupby("prompt_id")["response"].nunique() > 1).all()
    # re-tokenised ids end with the stop token the server's text omits, as HF sampling keeps it
    stopped = a[a["finish_reason"] == "stop"]
    assert len(stopped) > 0
    for r in stopped.itertuples():
        assert list(r.token_ids) == tok.encode(r.response, add_special_tokens=False) + [tok.eos_token_id]


def test_unreachable_server_is_a_clear_error_and_writes_nothing(tmp_path, tiny_dir, prompts):
    url = f"http://127.0.0.1:{free_port()}/v1"
    run = RunDir.for_config(_cfg(tmp_path, "down", tiny_dir, prompts, base_url=url, model="m", max_retries=0))
    with pytest.raises(RuntimeError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1.*rerun asks only"):
        run_sample(run)
    assert not run.store("samples").files()


def test_missing_model_name_is_explained(tmp_path, tiny_dir, prompts):
    run = RunDir.for_config(_cfg(tmp_path, "nomodel", tiny_dir, prompts, base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(ValueError, match="sample.openai.model"):
        run_sample(run)


def test_server_token_ids_parse_the_vllm_form():
    assert server_token_ids(["token_id:5", "token_id:17", "token_id:2"]) == [5, 17, 2]
    with pytest.raises(ServerTokenIdsError, match="server_token_ids=false"):
        server_token_ids(["Hello", " world"])
    with pytest.raises(ServerTokenIdsError):
        server_token_ids(None)
