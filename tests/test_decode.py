"""The sampler's own decode loop: a candidate that produced its stop token stops drawing, and finished rows leave
the batch (their KV-cache rows are dropped) together once a quarter of it has finished, so later steps run on fewer
rows; with capture a row finishes one step later, after its final token was fed. The KV cache it reserves gives
the values of transformers' DynamicCache."""

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
    # Call k (0 = prefill) must feed the rows still generating at step k (with capture: still to be fed); the
    # batch shrinks to exactly those once they are at most COMPACT_AT of it.
    fed_last = 0 if capture else 1  # without capture a row's final token is never fed back
    live = [sum(1 for n in lengths if n - fed_last >= k) for k in range(len(rows_per_call))]
    expected, batch = [], 32
    for k, n_live in enumerate(live):
        if k and n_live <= COMPACT_AT * batch:
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


def test_reserved_cache_gives_dynamic_cache_values(tiny):
    """Prefill, steps past the reserved capacity (it grows), a batch compaction: logits as with DynamicCache."""
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
            if step == 3:  # rows 1 and 3 leave
                cache.batch_select_indices(torch.tensor([0, 2]))
                tok = tok[[0, 2]]
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        results.append(logits)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
