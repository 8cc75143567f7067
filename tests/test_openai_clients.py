"""The openai-SDK teacher and rubric judge against a real OpenAI-compatible server: `transformers serve` on the
tiny local model, bound to 127.0.0.1 and stopped by the fixture. Failures use real conditions too: a port where
nothing listens (connection refused, retried by the SDK, then a clear error)."""

from __future__ import annotations

import pytest
from servers import TransformersServer, free_port

from dalign.config import JudgeConfig, TeachConfig
from dalign.judge.rubric import RubricJudge
from dalign.models.openai_client import Endpoint
from dalign.teach.teachers import OpenAITeacher, TeacherError, TeachRequest, get_teacher


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with TransformersServer(tiny_dir, log=tmp_path_factory.mktemp("serve") / "server.log") as srv:
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
