import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import kill_after_shards, register_tiny_datasets

from dalign.config import load_config
from dalign.models import load_model, prompt_ids
from dalign.rundir import RunDir, StageMismatch
from dalign.sample.sampler import derive_seed, sample_batch
from dalign.sample.stage import run_sample

PROMPTS = ["hello there", "What is the capital of France? Explain in detail please", "bake bread", "a"]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = load_model(f"hf:{tiny_dir}")
    return model, tok, [prompt_ids(tok, p)[0] for p in PROMPTS]


def test_text_depends_only_on_seed_not_on_batching(tiny):
    model, tok, ids = tiny
    seeds = [derive_seed(0, "b", i, 0) for i in range(len(ids))]
    together = sample_batch(model, tok, ids, seeds, max_new_tokens=24)
    alone = [
        sample_batch(model, tok, [p], [s], max_new_tokens=24)[0] for p, s in zip(ids, seeds, strict=True)
    ]
    reversed_ = sample_batch(model, tok, ids[::-1], seeds[::-1], max_new_tokens=24)[::-1]
    for a, b, c in zip(together, alone, reversed_, strict=True):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.finish_reason == b.finish_reason
    again = sample_batch(model, tok, ids, seeds, max_new_tokens=24)
    assert [g.token_ids for g in again] == [g.token_ids for g in together]
    other = sample_batch(model, tok, ids, [s + 1 for s in seeds], max_new_tokens=24)
    assert [g.token_ids for g in other] != [g.token_ids for g in together]


def test_stop_token_ends_and_is_kept(tiny):
    model, tok, ids = tiny
    gens = sample_batch(model, tok, ids * 16, list(range(64)), temperature=5.0, max_new_tokens=40)
    stopped = [g for g in gens if g.finish_reason == "stop"]
    assert stopped, "the tiny model should stop sometimes"
    for g in stopped:
        assert g.token_ids[-1] == tok.eos_token_id and tok.eos_token_id not in g.token_ids[:-1]
    for g in gens:
        if g.finish_reason == "length":
            assert len(g.token_ids) == 40


def test_temperature_zero_is_greedy(tiny):
    model, tok, ids = tiny
    g = sample_batch(model, tok, [ids[0]], [1], temperature=0, max_new_tokens=12)[0]
    ref = model.generate(
        torch.tensor([ids[0]]), do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id
    )
    expected = ref[0, len(ids[0]) :].tolist()
    k = expected.index(tok.eos_token_id) + 1 if tok.eos_token_id in expected else len(expected)
    assert g.token_ids == expected[:k]


def test_samples_follow_softmax_distribution(tiny):
    """The Gumbel trick must sample from softmax(logits / T): compare first-token frequencies."""
    model, tok, ids = tiny
    temperature, n = 1.5, 3000
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids[0]])).logits[0, -1].double() / temperature, -1)
    gens = sample_batch(model, tok, [ids[0]] * n, list(range(n)), temperature=temperature, max_new_tokens=1)
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in gens]), minlength=probs.numel()).double()
    top = probs.topk(5).indices
    for t in top:
        p = probs[t].item()
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(counts[t].item() / n - p) < 5 * sd + 1e-3, (t, counts[t].item() / n, p)


def test_top_p_never_samples_outside_nucleus(tiny):
    model, tok, ids = tiny
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids[1]])).logits[0, -1] / 0.7, -1)
    sorted_p, order = probs.sort(descending=True)
    k = int((sorted_p.cumsum(0) < 0.5).sum()) + 1
    nucleus = set(order[:k].tolist())
    gens = sample_batch(model, tok, [ids[1]] * 300, list(range(300)), top_p=0.5, max_new_tokens=1)
    assert {g.token_ids[0] for g in gens} <= nucleus


def test_captured_state_equals_full_forward(tiny):
    model, tok, ids = tiny
    gens = sample_batch(model, tok, ids, [5, 6, 7, 8], max_new_tokens=20, capture_layers=[1, 2, 4])
    for p, g in zip(ids, gens, strict=True):
        with torch.no_grad():
            hs = model(torch.tensor([p + g.token_ids]), output_hidden_states=True).hidden_states
        for layer in (1, 2, 4):
            torch.testing.assert_close(
                torch.from_numpy(g.hidden[layer]), hs[layer][0, -1], atol=1e-5, rtol=1e-5
            )


def _config(tmp_path, tiny_dir, **extra):
    register_tiny_datasets()
    over = {
        "runs_dir": str(tmp_path),
        "name": "r",
        "model": {"student": f"hf:{tiny_dir}", "think_prefix": False},
        "sample": {
            "datasets": [{"name": "tiny-harmful"}, {"name": "tiny-math"}],
            "n": 3,
            "max_new_tokens": 16,
            "batch_size": 4,
        },
    }
    for k, v in extra.items():
        over[k] = {**over.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(overrides=over)


def test_stage_writes_schema_and_is_idempotent(tmp_path, tiny_dir):
    run = RunDir.for_config(_config(tmp_path, tiny_dir))
    summary = run_sample(run)
    df = run.read("samples")
    assert summary["rows"] == len(df) == (6 + 2) * 3
    for col in [
        "benchmark",
        "prompt_id",
        "candidate",
        "prompt",
        "response",
        "token_ids",
        "finish_reason",
        "n_tokens",
        "seed",
        "prompt_token_ids",
        "role",
        "kind",
        "answer",
        "checker",
    ]:
        assert col in df.columns, col
    assert set(df["kind"]) == {"safety", "utility"}
    assert df.loc[df.benchmark == "tiny-math", "answer"].notna().all()
    assert not df.duplicated(["benchmark", "prompt_id", "candidate"]).any()
    assert run.stage_entry("sample")["status"] == "done"
    assert run_sample(run)["new"] == 0
    # a different sampling config must not mix with these rows
    other = RunDir.for_config(_config(tmp_path, tiny_dir, sample={"temperature": 1.0}))
    with pytest.raises(StageMismatch, match="sample.temperature"):
        run_sample(other)
    # but a different batch size is the same experiment
    same = RunDir.for_config(_config(tmp_path, tiny_dir, sample={"batch_size": 7}))
    assert run_sample(same)["new"] == 0


def test_a_dataset_budget_overrides_the_sample_budget(tmp_path, tiny_dir):
    cfg = _config(tmp_path, tiny_dir, sample={"temperature": 5.0})
    cfg.sample.datasets[1].max_new_tokens = 4  # tiny-math
    run = RunDir.for_config(cfg)
    run_sample(run)
    df = run.read("samples")
    tokens = df.groupby("benchmark")["n_tokens"].max()
    assert tokens["tiny-math"] == 4 and tokens["tiny-harmful"] > 4
    assert (df.loc[df.benchmark == "tiny-math", "finish_reason"] == "length").any()


def test_long_prompt_truncated_and_counted(tmp_path, tiny_dir):
    run = RunDir.for_config(_config(tmp_path, tiny_dir, model={"max_context": 72}))
    with pytest.warns(UserWarning, match="cut from the left"):
        run_sample(run)
    assert run.stage_entry("sample")["truncated_prompts"] >= 1
    assert run.read("samples")["prompt_token_ids"].map(len).max() <= 72 - 16


def test_capture_column_matches_scoring_forward(tmp_path, tiny_dir):
    run = RunDir.for_config(_config(tmp_path, tiny_dir, sample={"capture_layers": [2]}))
    run_sample(run)
    df = run.read("samples")
    model, _ = load_model(f"hf:{tiny_dir}")
    row = df.iloc[0]
    ids = list(row.prompt_token_ids) + list(row.token_ids)
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, -1]
    torch.testing.assert_close(
        torch.tensor(list(row.hidden_l2), dtype=torch.float32), h, atol=1e-5, rtol=1e-5
    )


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from tiny import kill_after_shards, register_tiny_datasets
from dalign.config import load_config
from dalign.rundir import RunDir
from dalign.sample.stage import run_sample
import time, dalign.sample.stage as st
real = st.sample_batch
def slow(*a, **k):
    time.sleep(0.4)  # give the parent time to kill us between shards
    return real(*a, **k)
st.sample_batch = slow
register_tiny_datasets()
cfg = load_config({cfg!r})
run_sample(RunDir.for_config(cfg))
"""


def test_resume_after_sigkill(tmp_path, tiny_dir):
    cfg_path = tmp_path / "c.yaml"
    from dalign.config import to_yaml

    cfg = _config(tmp_path, tiny_dir, sample={"batch_size": 2}, name="killed")
    cfg_path.write_text(to_yaml(cfg))
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), cfg=str(cfg_path))
    store = RunDir(cfg.run_dir, cfg).store("samples")
    partial = kill_after_shards([sys.executable, "-c", textwrap.dedent(script)], store)
    assert 0 < partial < 24

    run = RunDir.for_config(cfg)
    run_sample(run)
    df = run.read("samples")
    assert len(df) == 24 and not df.duplicated(["benchmark", "prompt_id", "candidate"]).any()

    # identical to an uninterrupted run
    fresh = RunDir.for_config(_config(tmp_path, tiny_dir, sample={"batch_size": 5}, name="fresh"))
    run_sample(fresh)
    key = ["benchmark", "prompt_id", "candidate"]
    a = df.sort_values(key).reset_index(drop=True)
    b = fresh.read("samples").sort_values(key).reset_index(drop=True)
    assert a["token_ids"].map(list).tolist() == b["token_ids"].map(list).tolist()


def test_empty_dataset_list_is_explained(tmp_path, tiny_dir):
    cfg = _config(tmp_path, tiny_dir, sample={"datasets": []})
    with pytest.raises(ValueError, match="sample.datasets is empty"):
        run_sample(RunDir.for_config(cfg))


@pytest.mark.slow
def test_smollm2_samples_reproducibly(smollm2_spec):
    model, tok = load_model(smollm2_spec)
    ids = [prompt_ids(tok, "Name three colours.")[0], prompt_ids(tok, "What is 2+2?")[0]]
    a = sample_batch(model, tok, ids, [1, 2], max_new_tokens=12, capture_layers=[12])
    b = [sample_batch(model, tok, [p], [s], max_new_tokens=12)[0] for p, s in zip(ids, [1, 2], strict=True)]
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert a[0].hidden[12].shape == (576,)


def test_batches_bound_rows_and_tokens():
    from dalign.sample.stage import batches

    lengths = [3, 3, 4, 10, 10, 40, 41, 200]
    work = [{"i": i, "prompt_token_ids": [0] * n, "max_new_tokens": 8} for i, n in enumerate(lengths)]
    got = batches(work, rows=3, tokens=64)
    assert [w["i"] for b in got for w in b] == list(range(len(work)))  # all, in order, once
    for b in got:
        need = len(b) * max(len(w["prompt_token_ids"]) + w["max_new_tokens"] for w in b)
        assert len(b) <= 3 and (need <= 64 or len(b) == 1)
    assert [len(b) for b in got] == [3, 2, 1, 1, 1]  # the 200-token prompt alone, though over the cap


def test_batches_keep_a_prompts_candidates_together():
    """A batch ends before a prompt's candidates, not among them (they share one prefill), unless that prompt's
    candidates alone exceed the bounds."""
    from dalign.sample.stage import batches

    work = [
        {"i": (p, c), "prompt_token_ids": [p] * 4, "max_new_tokens": 4} for p in range(5) for c in range(3)
    ]
    for rows, tokens, sizes in ((7, 10**6, [6, 6, 3]), (10**6, 8 * 8, [6, 6, 3]), (2, 10**6, [2, 1] * 5)):
        got = batches(work, rows=rows, tokens=tokens)
        assert [w["i"] for b in got for w in b] == [w["i"] for w in work]
        assert [len(b) for b in got] == sizes


def test_merged_adapter_samples_what_the_adapter_does(tmp_path, tiny_dir, tiny_adapter_dir):
    texts = {}
    for merge in (True, False):
        cfg = _config(
            tmp_path,
            tiny_dir,
            name=f"merge-{merge}",
            model={"adapter": str(tiny_adapter_dir)},
            sample={"merge_adapter": merge},
        )
        run = RunDir.for_config(cfg)
        run_sample(run)
        assert run.stage_entry("sample")["adapter_merged"] is merge
        texts[merge] = run.read("samples").sort_values(["benchmark", "prompt_id", "candidate"])["token_ids"]
    assert [list(t) for t in texts[True]] == [list(t) for t in texts[False]]
