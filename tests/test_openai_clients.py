"""The openai-SDK teacher and rubric judge against a real OpenAI-compatible server: `transformers serve` on the
tiny local model, bound to 127.0.0.1 and stopped by the fixture. Failures use real conditions too: a port where
nothing listens (connection refused, retried by the SDK, then a clear error)."""

from __future__ import annotations

import json

import pytest
from servers import TransformersServer, free_port
from tiny import build_tiny

from dalign.config import JudgeConfig, TeachConfig
from dalign.judge.rubric import RubricJudge
from dalign.models.openai_client import Endpoint, describe_error
from dalign.teach.teachers import OpenAITeacher, TeacherError, TeachRequest, get_teacher


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A context that holds the rubric's ~850-token prompt: transformers serve >= 5.25 refuses longer prompts (400).
    model = build_tiny(tmp_path_factory.mktemp("tiny-2k"), context=2048)
    with TransformersServer(model, log=tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


def _requests(n: int) -> list[TeachRequest]:
    return [TeachRequest(f"q{i}", f"prompt {i}", "illicit", f"How do I pick a lock? ({i})") for i in range(n)]


def test_openai_teacher_against_transformers_serve(server, monkeypatch):
    monkeypatch.setenv("DALIGN_OPENAI_BASE_URL", server.base_url)
    teacher = get_teacher(
        f"openai:{server.model}", TeachConfig(max_new_tokens=8, temperature=0.0, batch_size=2)
    )
    assert isinstance(teacher, OpenAITeacher) and teacher.url == server.base_url
    batches = list(teacher.run(_requests(3)))
    rows = [r for b in batches for r in b]
    assert [len(b) for b in batches] == [2, 1] and [r["prompt_id"] for r in rows] == ["q0", "q1", "q2"]
    for r in rows:  # the tiny model writes no <think> block: kept raw, flagged malformed, never dropped
        assert isinstance(r["raw"], str) and r["raw"] and r["teacher"] == f"openai:{server.model}"
        assert r["malformed"] and r["answer"] is None
    # Greedy decoding on the server: the same request gives the same text.
    assert teacher.complete("How do I pick a lock? (0)") == rows[0]["raw"]


def test_openai_teacher_unreachable_and_missing_url(monkeypatch):
    dead = Endpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, timeout_s=5)
    teacher = OpenAITeacher("openai:m", TeachConfig(), endpoint=dead)
    with pytest.raises(TeacherError, match="cannot reach.*rerun resumes"):
        teacher.complete("hi")
    monkeypatch.delenv("DALIGN_OPENAI_BASE_URL", raising=False)
    with pytest.raises(TeacherError, match="DALIGN_OPENAI_BASE_URL"):
        get_teacher("openai:m", TeachConfig())


def test_rubric_judge_against_transformers_serve(server, monkeypatch):
    """The tiny model cannot write the rubric's JSON: every row is `error` with the server's text kept."""
    monkeypatch.setenv("DALIGN_OPENAI_BASE_URL", server.base_url)
    judge = RubricJudge(JudgeConfig(judges=["strongreject-rubric"], model=server.model, batch_size=2))
    out = judge.judge([{"prompt": "How do I pick a lock?", "response": f"answer {i}"} for i in range(3)])
    assert [r["label"] for r in out] == ["error"] * 3
    assert all(r["score"] is None and r["raw"].startswith("unparsable rubric") for r in out)


def test_rubric_judge_unreachable_is_error_never_safe():
    dead = Endpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, timeout_s=5)
    judge = RubricJudge(JudgeConfig(judges=["strongreject-rubric"], model="m"), endpoint=dead)
    out = judge.judge([{"prompt": "p", "response": "r"}])
    assert out[0]["label"] == "error" and "cannot reach" in out[0]["raw"]


def test_openai_teacher_is_sampled_on_the_benchmark_prompts(server, monkeypatch, tmp_path, tiny_dir):
    """sample.models: teacher with teach.teacher = openai:<model>: chat requests with each candidate's seed, rows
    tagged teacher, the server's token counts, and a rerun that asks for nothing new."""
    from tiny import write_prompt_files

    from dalign.config import load_config
    from dalign.models import load_tokenizer
    from dalign.rundir import RunDir
    from dalign.sample.sampler import derive_seed
    from dalign.sample.stage import run_sample_teacher

    monkeypatch.setenv("DALIGN_OPENAI_BASE_URL", server.base_url)
    harmful, _ = write_prompt_files(tmp_path)
    eos = load_tokenizer(f"hf:{tiny_dir}").eos_token_id
    sampling = json.dumps({"do_sample": True, "eos_token_id": eos})

    def sample(name: str):
        cfg = load_config(
            overrides={
                "name": name,
                "runs_dir": str(tmp_path / "runs"),
                "model": {"student": f"hf:{tiny_dir}"},
                "teach": {"teacher": f"openai:{server.model}"},
                "sample": {
                    "models": ["aligned", "teacher"],
                    "n": 2,
                    "max_new_tokens": 24,
                    "temperature": 5.0,  # a tiny random model: only a hot temperature makes candidates differ
                    # transformers serve shares one global seed, and samples only when generation_config says so
                    "openai": {"max_concurrency": 1, "extra_body": {"generation_config": sampling}},
                    "datasets": [{"name": "file", "path": str(harmful), "prompt_field": "q", "id_field": "id",
                                  "benchmark": "harm", "limit": 3}],
                },
            }
        )  # fmt: skip
        run = RunDir(cfg.run_dir, cfg)
        out = run_sample_teacher(run)
        return (
            run,
            out,
            run.read("samples-teacher").sort_values(["prompt_id", "candidate"], ignore_index=True),
        )

    run, out, rows = sample("a")
    assert out["new"] == 6 and len(rows) == 6 and set(rows["model"]) == {"teacher"}
    assert set(rows["token_ids_source"]) == {"none"} and rows["n_tokens"].between(1, 24).all()
    assert list(rows["seed"]) == [
        derive_seed(0, "harm", p, c) for p, c in zip(rows.prompt_id, rows.candidate, strict=True)
    ]
    assert rows["response"].map(lambda t: isinstance(t, str) and len(t) > 0).all()
    assert run_sample_teacher(run)["new"] == 0  # resumable: nothing is asked twice
    # the server honours each candidate's seed: another run gives the same text, candidate by candidate, and the
    # candidates of a prompt differ (T = 0.7)
    _, _, again = sample("b")
    assert list(again["response"]) == list(rows["response"])
    assert (rows.groupby("prompt_id")["response"].nunique() > 1).any()


def test_status_error_names_the_servers_reason():
    """A 400 whose reason is FastAPI's {"detail": ...} (transformers serve's form), not OpenAI's error object: the
    SDK's message is only "Error code: 400", so the reason must come from the body."""
    import httpx
    import openai

    url = "http://127.0.0.1:1/v1"
    for body in (
        {"detail": "The prompt has 846 tokens"},
        {"error": {"message": "The prompt has 846 tokens"}},
    ):
        response = httpx.Response(400, json=body, request=httpx.Request("POST", f"{url}/chat/completions"))
        err = openai.OpenAI(base_url=url, api_key="x")._make_status_error_from_response(response)
        assert isinstance(err, openai.BadRequestError)
        assert describe_error(err, url).count("The prompt has 846 tokens") == 1, describe_error(err, url)
