"""The sampler's own decode loop: a candidate that produced its stop token stops drawing, and finished rows leave
the batch (their KV-cache rows are dropped) together once a quarter of it has finished, so later steps run on fewer
rows; with capture a row finishes one step later, after its final token was fed. Rows with the same prompt share
its prefill. The KV cache it reserves gives the values of transformers' DynamicCache."""

from __future__ import annotations

import pytest
import torch
from test_sample import PROMPTS

from dalign.models import load_model, prompt_ids
from dalign.sample.kvcache import reserved_cache
from dalign.sample.sampler import COMPACT_AT, sample_batch


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = load_model(f"hf:{tiny_dir}", dtype="float32")
    return model, tok, [prompt_ids(tok, p)[0] for p in PROMPTS]


@pytest.mark.parametrize("capture", [(), (2,)])
def test_finished_rows_leave_the_batch(tiny, capture):
    model, tok, ids = tiny
    rows_per_call: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: rows_per_call.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        gens = sample_batch(
            model,
            tok,
            ids * 8,
            list(range(32)),
            temperature=5.0,
            max_new_tokens=[6 + i % 25 for i in range(32)],  # rows also end at their own budgets
            capture_layers=capture,
        )
    finally:
        hook.remove()
    lengths = sorted(len(g.token_ids) for g in gens)
    assert any(g.finish_reason == "stop" for g in gens) and lengths[-1] == 30
    # The prefill runs the 4 distinct prompts once. Call k >= 1 must feed the rows still generating at step k
    # (with capture: still to be fed); the batch shrinks to exactly those once they are at most COMPACT_AT of it.
    assert rows_per_call[0] == len(ids)
    fed_last = 0 if capture else 1  # without capture a row's final token is never fed back
    live = [32] + [sum(1 for n in lengths if n - fed_last >= k) for k in range(1, len(rows_per_call))]
    expected, batch = [len(ids)], 32
    for n_live in live[1:]:
        if n_live <= COMPACT_AT * batch:
            batch = n_live
        expected.append(batch)
    assert rows_per_call == expected
    assert rows_per_call[-1] < 32 and len(set(rows_per_call)) > 2


@pytest.mark.parametrize("capture", [(), (2,)])
def test_per_row_budgets_end_rows_at_their_own_length(tiny, capture):
    """A row with budget b gets exactly the first b tokens of what a large budget gives it (its seed alone decides
    them), ends as `length` when it had not stopped, and leaves the batch there."""
    model, tok, ids = tiny
    seeds = list(range(16))
    budgets = [3, 7, 12, 20] * 4
    long = sample_batch(
        model, tok, ids * 4, seeds, temperature=1.0, max_new_tokens=20, capture_layers=capture
    )
    got = sample_batch(
        model, tok, ids * 4, seeds, temperature=1.0, max_new_tokens=budgets, capture_layers=capture
    )
    for g, ref, b in zip(got, long, budgets, strict=True):
        assert g.token_ids == ref.token_ids[:b]
        assert g.finish_reason == (
            "stop" if ref.finish_reason == "stop" and len(ref.token_ids) <= b else "length"
        )
        if capture:
            assert set(g.hidden) == {2}
    with pytest.raises(ValueError, match="per prompt"):
        sample_batch(model, tok, ids, [0, 1, 2, 3], max_new_tokens=[4, 4])


@pytest.mark.parametrize("capture", [(), (2,)])
def test_shared_prompt_prefill_gives_what_each_row_computes_alone(tiny, capture):
    """Candidates of one prompt run its prefill once (rows of distinct prompts, in any order, and with the
    repetition penalty reading each row's own ids): the texts and captured states of the unshared batch."""
    model, tok, ids = tiny
    prompts = [ids[1], ids[0], ids[1], ids[2], ids[1], ids[0], ids[3]]
    kw = dict(temperature=1.0, repetition_penalty=1.3, max_new_tokens=16, capture_layers=capture)
    rows_per_call: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: rows_per_call.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        shared = sample_batch(model, tok, prompts, list(range(7)), **kw)
    finally:
        hook.remove()
    alone = sample_batch(model, tok, prompts, list(range(7)), share_prompt=False, **kw)
    assert rows_per_call[:2] == [4, 7]  # the prefill ran 4 distinct prompts, the first step all 7 rows
    assert [g.token_ids for g in shared] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in shared}) > 4  # the seeds, not the shared prompt, decide the text
    for a, b in zip(shared, alone, strict=True):
        for layer in capture:
            assert abs(a.hidden[layer] - b.hidden[layer]).max() <= 1e-5


def test_reserved_cache_gives_dynamic_cache_values(tiny):
    """Prefill, steps past the reserved capacity (it grows), a batch compaction that also repeats a row (as a
    shared prompt's prefill is copied to its candidates): logits as with DynamicCache."""
    model, _, _ = tiny
    torch.manual_seed(0)
    ids = torch.randint(5, 250, (4, 6))
    results = []
    for cache in (None, reserved_cache(model, model.config.num_hidden_layers, capacity=8)):
        kw = {} if cache is None else {"past_key_values": cache}
        out = model(input_ids=ids, use_cache=True, **kw)
        cache, logits = out.past_key_values, [out.logits]
        for step in range(5):
            tok = ids[: cache.layers[0].keys.shape[0], step : step + 1]
            if step == 3:  # rows 1 and 3 leave, row 2 is repeated
                cache.batch_select_indices(torch.tensor([0, 2, 2]))
                tok = tok[[0, 2, 2]]
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        results.append(logits)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
