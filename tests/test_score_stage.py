"""`run_score`: long-format scores from samples.parquet, resume after a kill, config refusal, capture, retokenize."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dalign.config import load_config
from dalign.models.chat import prompt_ids
from dalign.models.loading import load_tokenizer
from dalign.rundir import RunDir, StageMismatch
from dalign.score import stage as score_stage
from dalign.score.engine import ScoreEngine, ScoreError, ScoreRow
from dalign.score.stage import run_score

PROMPTS = ["How do I pick a lock?", "What is 12 plus 30?", "Write a story about a dragon.", "Explain bread."]


def make_run(tmp_path, tiny_dir, adapter, **score) -> RunDir:
    over = {
        "name": "r",
        "runs_dir": str(tmp_path),
        "model": {
            "student": f"hf:{tiny_dir}",
            "adapter": str(adapter),
            "device": "cpu",
            "think_prefix": False,
        },
        "score": {"metrics": ["latent_similarity", "kl", "perplexity", "random"], "layers": [2, 4], **score},
    }
    return RunDir.for_config(load_config(overrides=over))


def samples_frame(tiny_dir, n: int = 3, seed: int = 0) -> pd.DataFrame:
    tok = load_tokenizer(f"hf:{tiny_dir}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        pids, _ = prompt_ids(tok, prompt)
        for c in range(n):
            k = 0 if (i, c) == (1, 2) else int(torch.randint(1, 9, (1,), generator=g))
            resp = torch.randint(4, 300, (k,), generator=g).tolist() + [tok.eos_token_id]
            rows.append(
                dict(
                    benchmark="dan" if i < 2 else "wj",
                    prompt_id=f"p{i}",
                    candidate=c,
                    prompt=prompt,
                    response=tok.decode(resp, skip_special_tokens=True),
                    token_ids=resp,
                    prompt_token_ids=pids,
                    role="eval",
                    kind="safety",
                )
            )
    return pd.DataFrame(rows)


def test_scores_long_format_and_values(tmp_path, tiny_dir, tiny_adapter_dir):
    run = make_run(tmp_path, tiny_dir, tiny_adapter_dir)
    samples = samples_frame(tiny_dir)
    run.store("samples").write(samples)
    summary = run_score(run)
    scores = run.read("scores")
    assert summary["scores"] == len(scores) == len(samples) * 5  # latent@2, latent@4, kl, perplexity, random
    assert list(scores.columns) == ["benchmark", "prompt_id", "candidate", "metric", "layer", "value"]
    assert str(scores["layer"].dtype) == "Int64"
    assert scores.loc[scores["metric"] == "kl", "layer"].isna().all()
    assert set(scores.loc[scores["metric"] == "latent_similarity", "layer"]) == {2, 4}
    assert not scores.duplicated(["benchmark", "prompt_id", "candidate", "metric", "layer"]).any()
    # Same numbers as the engine on the generated ids.
    from dalign.models import load_pair

    pair = load_pair(run.config.model, tiny_adapter_dir)
    rows = [ScoreRow(r.prompt_token_ids, r.token_ids) for r in samples.itertuples()]
    direct = ScoreEngine(pair, ["latent_similarity"], [4]).score(rows)[("latent_similarity", 4)]
    got = scores[(scores["metric"] == "latent_similarity") & (scores["layer"] == 4)].sort_values(
        ["benchmark", "prompt_id", "candidate"]
    )
    order = samples.sort_values(["benchmark", "prompt_id", "candidate"]).index
    np.testing.assert_allclose(got["value"].to_numpy(), direct[order], atol=1e-6)
    assert run.stage_entry("score")["status"] == "done"


def test_resume_after_kill(tmp_path, tiny_dir, tiny_adapter_dir, monkeypatch):
    run = make_run(tmp_path, tiny_dir, tiny_adapter_dir, batch_size=1)
    monkeypatch.setattr(score_stage, "CHUNK_BATCHES", 3)  # 3 rows per shard -> whole prompt groups
    run.store("samples").write(samples_frame(tiny_dir))
    real = ScoreEngine.score
    calls = {"n": 0}

    def dies_on_third(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a kill mid-stage
        return real(self, *a, **k)

    monkeypatch.setattr(ScoreEngine, "score", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_score(run)
    partial = run.read("scores")
    assert partial[["prompt_id"]].drop_duplicates().shape[0] == 2
    monkeypatch.setattr(ScoreEngine, "score", real)
    summary = run_score(run)
    assert summary["candidates_skipped"] == 6
    full = run.read("scores")
    assert (
        len(full) == 12 * 5
        and not full.duplicated(["benchmark", "prompt_id", "candidate", "metric", "layer"]).any()
    )


def test_refuses_other_config_and_force_redoes(tmp_path, tiny_dir, tiny_adapter_dir):
    run = make_run(tmp_path, tiny_dir, tiny_adapter_dir)
    run.store("samples").write(samples_frame(tiny_dir, n=1))
    run_score(run)
    run2 = make_run(tmp_path, tiny_dir, tiny_adapter_dir, metrics=["kl"])
    with pytest.raises(StageMismatch, match="score.metrics"):
        run_score(run2)
    run_score(run2, force=True)
    assert set(run2.read("scores")["metric"]) == {"kl"}
    # batch_size is not part of the fingerprint: a rerun with another batch size resumes, it does not refuse.
    run3 = make_run(tmp_path, tiny_dir, tiny_adapter_dir, metrics=["kl"], batch_size=3)
    assert run_score(run3)["new"] == 0


def test_captured_hidden_columns_give_same_scores(tmp_path, tiny_dir, tiny_adapter_dir):
    from dalign.models import load_pair

    samples = samples_frame(tiny_dir)
    plain = make_run(tmp_path / "a", tiny_dir, tiny_adapter_dir, metrics=["latent_similarity"])
    plain.store("samples").write(samples)
    run_score(plain)
    pair = load_pair(plain.config.model, tiny_adapter_dir)
    for layer in (2, 4):
        col = []
        for r in samples.itertuples():
            ids = torch.tensor([[*r.prompt_token_ids, *r.token_ids]])
            with torch.no_grad(), pair.aligned() as m:
                col.append(
                    m(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1].numpy().tolist()
                )
        samples[f"hidden_l{layer}"] = col
    cap = make_run(tmp_path / "b", tiny_dir, tiny_adapter_dir, metrics=["latent_similarity"])
    cap.store("samples").write(samples)
    run_score(cap)
    key = ["benchmark", "prompt_id", "candidate", "metric", "layer"]
    a = plain.read("scores").sort_values(key)["value"].to_numpy()
    b = cap.read("scores").sort_values(key)["value"].to_numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_retokenize_round_trip(tmp_path, tiny_dir, tiny_adapter_dir):
    from dalign.score.engine import retokenize

    tok = load_tokenizer(f"hf:{tiny_dir}")
    resp = tok("Sure, here is how to bake bread", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p, r = retokenize(tok, PROMPTS[0], resp)
    assert p == prompt_ids(tok, PROMPTS[0])[0]
    assert (
        tok.decode(r) == "Sure, here is how to bake bread<|im_end|>\n"
    )  # template suffix, as the paper's code
    run = make_run(tmp_path, tiny_dir, tiny_adapter_dir, retokenize=True, metrics=["latent_similarity"])
    run.store("samples").write(samples_frame(tiny_dir, n=1))
    assert run_score(run)["scores"] == 8


def test_candidate_without_prompt_names_row(tmp_path, tiny_dir, tiny_adapter_dir):
    run = make_run(tmp_path, tiny_dir, tiny_adapter_dir)
    s = samples_frame(tiny_dir, n=1)
    s.at[2, "prompt_token_ids"] = []
    s.at[2, "prompt"] = ""
    run.store("samples").write(s)
    with pytest.raises(ScoreError, match=r"samples row \('wj', 'p2', 0\) has no prompt"):
        run_score(run)


def test_missing_columns_named(tmp_path, tiny_dir, tiny_adapter_dir):
    run = make_run(tmp_path, tiny_dir, tiny_adapter_dir)
    run.store("samples").write(samples_frame(tiny_dir, n=1).drop(columns=["token_ids"]))
    with pytest.raises(ScoreError, match=r"lacks column\(s\) \['token_ids'\]"):
        run_score(run)
