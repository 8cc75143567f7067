"""The scoring engine against a slow float64 reference: one unpadded sequence at a time, full HF forward."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from dalign.config import ModelConfig
from dalign.models.pair import ModelPair, load_pair
from dalign.score.engine import ScoreEngine, ScoreError, ScoreRow
from dalign.score.metrics import get_metric

ALL = ["latent_similarity", "kl", "reverse_kl", "perplexity", "self_certainty", "random"]
TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tiny_dir, tiny_adapter_dir) -> ModelPair:
    return load_pair(ModelConfig(student=f"hf:{tiny_dir}", device="cpu", dtype="float32"), tiny_adapter_dir)


@pytest.fixture(scope="module")
def ref_pair(pair) -> ModelPair:
    """The same pair cast to float64: the reference runs in double precision."""
    return ModelPair(model=copy.deepcopy(pair.model).double(), tokenizer=pair.tokenizer)


def make_rows(seed: int = 0, n_prompts: int = 5, per_prompt: int = 3) -> list[ScoreRow]:
    """Prompts of mixed lengths (1..14 tokens), responses of 0..10 tokens, several candidates per prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_prompts):
        p = torch.randint(
            4, 300, (1 if i == 0 else int(torch.randint(2, 15, (1,), generator=g)),), generator=g
        )
        for j in range(per_prompt):
            r_len = 0 if (i + j) % 4 == 1 else int(torch.randint(1, 11, (1,), generator=g))
            r = torch.randint(4, 300, (r_len,), generator=g)
            rows.append(ScoreRow(p.tolist(), r.tolist(), ("bench", str(i), j)))
    return rows


def reference(ref: ModelPair, row: ScoreRow, layers: list[int]) -> dict:
    """Metric values for one row, alone and unpadded, from output_hidden_states and full logits (float64)."""
    ids = torch.tensor([[*row.prompt_ids, *row.response_ids]])
    p, n = len(row.prompt_ids), ids.shape[1]
    with torch.no_grad():
        with ref.aligned() as m:
            oa = m(input_ids=ids, output_hidden_states=True)
        with ref.base() as m:
            ob = m(input_ids=ids, output_hidden_states=True)
    out = {}
    for layer in layers:
        ha, hb = oa.hidden_states[layer][0, n - 1], ob.hidden_states[layer][0, n - 1]
        out[("latent_similarity", layer)] = float(ha @ hb / (ha.norm() * hb.norm()))
    la = torch.log_softmax(oa.logits[0, p - 1 : n - 1], -1)
    lb = torch.log_softmax(ob.logits[0, p - 1 : n - 1], -1)
    if n == p:
        for k in ("kl", "reverse_kl", "perplexity", "self_certainty"):
            out[(k, None)] = math.nan
        return out
    tgt = torch.tensor(row.response_ids)
    out[("kl", None)] = float((la.exp() * (la - lb)).sum(-1).mean())
    out[("reverse_kl", None)] = float((lb.exp() * (lb - la)).sum(-1).mean())
    out[("perplexity", None)] = float(torch.exp(-la[torch.arange(len(tgt)), tgt].mean()))
    v = la.shape[-1]
    out[("self_certainty", None)] = float((-(1 / v) * (math.log(v) + la).sum(-1)).mean())
    return out


def assert_close(got: dict, want: list[dict], rows: list[ScoreRow]) -> None:
    for col, expected in ((c, [w[c] for w in want]) for c in want[0]):
        for i, e in enumerate(expected):
            g = got[col][i]
            if math.isnan(e):
                assert math.isnan(g), f"{col} row {rows[i].key}: expected NaN, got {g}"
            else:  # relative for perplexity (values in the hundreds), absolute otherwise
                assert abs(g - e) <= TOL * max(1.0, abs(e)), f"{col} row {rows[i].key}: {g} vs reference {e}"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("share", [False, True])
def test_matches_float64_reference(pair, ref_pair, side, share):
    rows = make_rows()
    layers = [1, 2, 3, 4]
    eng = ScoreEngine(pair, ALL, layers, batch_size=4, share_prompt=share, padding_side=side)
    got = eng.score(rows)
    want = [reference(ref_pair, r, layers) for r in rows]
    assert_close(got, want, rows)
    assert any(len(r.response_ids) == 0 for r in rows) and np.isnan(got[("kl", None)]).any()
    # Sanity: the adapter changes the model, so the comparison is not trivially 1.
    assert (got[("latent_similarity", 4)] < 0.999).all()


def test_lm_head_chunks_and_softmax_slices_do_not_change_values(pair, ref_pair, monkeypatch):
    """Logit metrics over response positions split across LM-head chunks and softmax slices of odd sizes."""
    from dalign.score import engine

    monkeypatch.setattr(engine, "LOGIT_CHUNK", 5)
    monkeypatch.setattr(engine, "SOFTMAX_ROWS", 2)
    rows = make_rows(seed=5)
    got = ScoreEngine(pair, ALL, [2], batch_size=4).score(rows)
    assert_close(got, [reference(ref_pair, r, [2]) for r in rows], rows)


@pytest.mark.parametrize("capped_side", ["aligned", "base"])
def test_softcapped_logits_match_the_reference(capped_side):
    """A family that squashes its logits after the LM head (Gemma 2's final_logit_softcapping): the scorer's
    sliced log-softmax applies each side's own cap, as the model's own forward does; on the aligned side of a
    LoRA pair, or on a base checkpoint of that family beside an uncapped aligned model."""
    from tiny import make_model, make_tokenizer, random_lora

    tok = make_tokenizer()
    gemma = make_model("gemma2", len(tok))
    with torch.no_grad():
        gemma.get_output_embeddings().weight.mul_(8.0)  # logits well past the cap, so it matters
    if capped_side == "aligned":
        capped = ModelPair(model=random_lora(gemma), tokenizer=tok)
        ref = ModelPair(model=copy.deepcopy(capped.model).double(), tokenizer=tok)
    else:
        llama = make_model("llama", len(tok), seed=4)
        capped = ModelPair(model=llama, tokenizer=tok, base_model=gemma)
        ref = ModelPair(
            model=copy.deepcopy(llama).double(), tokenizer=tok, base_model=copy.deepcopy(gemma).double()
        )
    rows = make_rows(seed=6)
    got = ScoreEngine(capped, ALL, [2], batch_size=4, share_prompt=True).score(rows)
    assert_close(got, [reference(ref, r, [2]) for r in rows], rows)


def test_kl_terms_of_zero_probability_are_zero():
    """p_v = 0 contributes 0 even where log q_v = -inf (masked logits); q_v = 0 under p_v > 0 gives inf."""
    kl = get_metric("kl").fn
    inf = math.inf
    logp = torch.tensor([[math.log(0.5), math.log(0.5), -inf], [math.log(0.5), math.log(0.5), -inf]])
    logq = torch.tensor([[math.log(0.25), math.log(0.75), -inf], [math.log(0.25), -inf, math.log(0.75)]])
    got = kl(logp, logq, torch.zeros(2, dtype=torch.long))
    assert got[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert got[1].item() == inf


def test_batch_size_and_order_do_not_change_values(pair):
    rows = make_rows(seed=3)
    a = ScoreEngine(pair, ALL, [2], batch_size=1).score(rows)
    b = ScoreEngine(pair, ALL, [2], batch_size=7, padding_side="left").score(rows[::-1])
    # Prefix sharing with groups larger than a batch (3 candidates, batch_size 1) and several groups per batch.
    c = ScoreEngine(pair, ALL, [2], batch_size=1, share_prompt=True).score(rows)
    d = ScoreEngine(pair, ALL, [2], batch_size=100, share_prompt=True).score(rows[::-1])
    for col in a:
        np.testing.assert_allclose(a[col], b[col][::-1], rtol=1e-5, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(a[col], c[col], rtol=1e-5, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(a[col], d[col][::-1], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_separate_base_checkpoint_qwen(tiny_qwen_dir):
    """Two full checkpoints (no adapter), Qwen2 architecture: same reference agreement."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).eval()
    base = copy.deepcopy(model)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pair = ModelPair(model=model, tokenizer=None, base_model=base)
    ref = ModelPair(
        model=copy.deepcopy(model).double(), tokenizer=None, base_model=copy.deepcopy(base).double()
    )
    rows = make_rows(seed=1)
    for share in (False, True):
        got = ScoreEngine(pair, ALL, [1, 4], batch_size=5, share_prompt=share, padding_side="left").score(
            rows
        )
        assert_close(got, [reference(ref, r, [1, 4]) for r in rows], rows)


def test_adapter_disabled_base_equals_separately_loaded_base(pair, tiny_dir):
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    rows = make_rows(seed=2)
    two_copies = ModelPair(model=pair.model, tokenizer=pair.tokenizer, base_model=plain)
    a = ScoreEngine(pair, ALL, [1, 3, 4]).score(rows)
    b = ScoreEngine(two_copies, ALL, [1, 3, 4]).score(rows)
    for col in a:
        np.testing.assert_allclose(a[col], b[col], rtol=1e-6, atol=1e-7, equal_nan=True)
    ids = torch.tensor([[*rows[0].prompt_ids, *rows[0].response_ids]])
    with torch.no_grad(), pair.base() as m:
        disabled = m(input_ids=ids).logits
    torch.testing.assert_close(disabled, plain(input_ids=ids).logits)


def _count_calls(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], list]:
    counts = dict.fromkeys(modules, 0)
    handles = []
    for name, mod in modules.items():

        def hook(*_, name=name):
            counts[name] += 1

        handles.append(mod.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("layer", [1, 2, 4])
def test_early_exit_equals_full_pass_and_skips_the_rest(pair, layer):
    rows = make_rows(seed=4, n_prompts=2)
    fam = pair.family
    watch = {f"block{i + 1}": b for i, b in enumerate(fam.layers())}
    watch |= {"norm": fam.final_norm(), "lm_head": fam.model.get_output_embeddings()}
    counts, handles = _count_calls(watch)
    try:
        eng = ScoreEngine(pair, ["latent_similarity"], [layer], batch_size=8)
        got = eng.score(rows)[("latent_similarity", layer)]
    finally:
        for h in handles:
            h.remove()
    assert counts["lm_head"] == 0
    assert all(counts[f"block{i}"] == 0 for i in range(layer + 1, fam.num_layers + 1))
    assert counts[f"block{layer}"] > 0
    for i, r in enumerate(rows):
        ids = torch.tensor([[*r.prompt_ids, *r.response_ids]])
        with torch.no_grad():
            with pair.aligned() as m:
                ha = m(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1]
            with pair.base() as m:
                hb = m(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1]
        assert abs(got[i] - float(torch.nn.functional.cosine_similarity(ha, hb, dim=0))) < TOL


def test_kl_of_model_with_itself_is_zero(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    same = ModelPair(model=model, tokenizer=None, base_model=model)
    got = ScoreEngine(same, ["kl", "reverse_kl", "latent_similarity"], [2, 4]).score(make_rows())
    has = ~np.isnan(got[("kl", None)])
    assert has.any()
    np.testing.assert_allclose(got[("kl", None)][has], 0.0, atol=1e-6)
    np.testing.assert_allclose(got[("reverse_kl", None)][has], 0.0, atol=1e-6)
    np.testing.assert_allclose(got[("latent_similarity", 4)], 1.0, atol=1e-6)


def test_self_certainty_of_uniform_is_zero(tiny_dir):
    v = 300
    uniform = torch.full((5, v), -math.log(v), dtype=torch.float64)
    sc = get_metric("self_certainty").fn(uniform, None, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(sc, torch.zeros(5, dtype=torch.float64))
    peaked = torch.log_softmax(torch.tensor([[10.0, 0, 0, 0]], dtype=torch.float64), -1)
    assert get_metric("self_certainty").fn(peaked, None, torch.zeros(1, dtype=torch.long)).item() > 1
    # Through the engine: a zero LM head gives uniform next-token distributions.
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.zeros_like(head.weight))
    got = ScoreEngine(ModelPair(model=model, tokenizer=None), ["self_certainty", "perplexity"]).score(
        make_rows()
    )
    has = ~np.isnan(got[("self_certainty", None)])
    np.testing.assert_allclose(got[("self_certainty", None)][has], 0.0, atol=1e-6)
    np.testing.assert_allclose(got[("perplexity", None)][has], model.config.vocab_size, rtol=1e-5)


def test_captured_aligned_hidden_skips_aligned_pass(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    base = copy.deepcopy(model)
    with torch.no_grad():
        base.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    pair = ModelPair(model=model, tokenizer=None, base_model=base)
    rows = make_rows(seed=5)
    captured = {}
    for layer in (2, 3):
        states = []
        for r in rows:
            ids = torch.tensor([[*r.prompt_ids, *r.response_ids]])
            with torch.no_grad():
                states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1])
        captured[layer] = torch.stack(states)
    full = ScoreEngine(pair, ["latent_similarity"], [2, 3]).score(rows)
    counts, handles = _count_calls({"aligned": model.model.layers[0], "base": base.model.layers[0]})
    try:
        cap = ScoreEngine(pair, ["latent_similarity"], [2, 3]).score(rows, aligned_hidden=captured)
    finally:
        for h in handles:
            h.remove()
    assert counts["aligned"] == 0 and counts["base"] > 0
    for col in full:
        np.testing.assert_allclose(cap[col], full[col], atol=1e-6)


def test_random_is_seeded_and_batching_independent(pair):
    rows = make_rows()
    a = ScoreEngine(pair, ["random"], seed=1, batch_size=2).score(rows)[("random", None)]
    b = ScoreEngine(pair, ["random"], seed=1, batch_size=9).score(rows[::-1])[("random", None)][::-1]
    c = ScoreEngine(pair, ["random"], seed=2).score(rows)[("random", None)]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and ((a >= 0) & (a < 1)).all()


# ---- errors ------------------------------------------------------------------------------------------------------


def test_layer_out_of_range_names_valid_range(pair):
    with pytest.raises(ScoreError, match=r"valid layers are 1\.\.4"):
        ScoreEngine(pair, ["latent_similarity"], [5])
    with pytest.raises(ScoreError, match=r"1\.\.4"):
        ScoreEngine(pair, ["latent_similarity"], [0])
    assert ScoreEngine(pair, ["latent_similarity"], "all").layers == [1, 2, 3, 4]


def test_nan_hidden_state_names_the_row(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    base = copy.deepcopy(model)
    rows = make_rows(n_prompts=2)
    bad = rows[2].response_ids[-1] if rows[2].response_ids else rows[2].prompt_ids[-1]
    with torch.no_grad():
        base.get_input_embeddings().weight[bad] = float("nan")
    pair = ModelPair(model=model, tokenizer=None, base_model=base)
    with pytest.raises(
        ScoreError, match=r"base model: NaN/inf hidden state at layer 2 for row \('bench', '\d', \d\)"
    ):
        ScoreEngine(pair, ["latent_similarity"], [2]).score(rows)
    cap = {2: torch.zeros(len(rows), 32)}
    cap[2][1, 0] = float("inf")
    with pytest.raises(ScoreError, match=r"hidden_l2 of row \('bench', '0', 1\)"):
        ScoreEngine(
            ModelPair(model=model, tokenizer=None, base_model=model), ["latent_similarity"], [2]
        ).score(rows, aligned_hidden=cap)


def test_candidate_without_prompt(pair):
    rows = [ScoreRow([5, 6], [7]), ScoreRow([], [7, 8], ("wj", "p9", 3))]
    with pytest.raises(ScoreError, match=r"row \('wj', 'p9', 3\): candidate has no prompt"):
        ScoreEngine(pair, ["kl"]).score(rows)


def test_token_outside_vocab(pair):
    with pytest.raises(ScoreError, match="outside the model's vocabulary"):
        ScoreEngine(pair, ["kl"]).score([ScoreRow([5, 6], [10_000], ("b", "p", 0))])


def test_tokenizer_mismatch(tiny_dir, tmp_path):
    from tiny import make_model, make_tokenizer

    from dalign.models.pair import TokenizerMismatch

    tok = make_tokenizer(vocab_size=280)
    other = make_model("llama", len(tok))
    other.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    with pytest.raises(TokenizerMismatch, match="tokenizers of"):
        load_pair(ModelConfig(student=f"hf:{tiny_dir}", base=f"hf:{tmp_path}", device="cpu"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ScoreError, match="different vocabularies"):
        ScoreEngine(ModelPair(model=model, tokenizer=None, base_model=other), ["latent_similarity"], [1])


def test_unknown_metric_suggests():
    from dalign.registry import UnknownName

    with pytest.raises(UnknownName, match="Did you mean 'latent_similarity'"):
        get_metric("latent_similarty")


def test_directions_are_registered():
    want = {"latent_similarity": "argmin", "kl": "argmax", "perplexity": "argmin", "self_certainty": "argmax"}
    assert {k: get_metric(k).direction for k in want} == want
    assert get_metric("latent_similarity").per_layer and not get_metric("kl").per_layer
    assert get_metric("kl").needs_base_logits and not get_metric("perplexity").needs_base_logits


def test_sampler_capture_equals_scoring_time_state(pair):
    """Hidden states the sampler captures while generating equal the engine's aligned pass on the same ids."""
    from dalign.sample.sampler import sample_batch

    tok = pair.tokenizer
    prompts = [[1, 40, 41, 42, 2, 1, 50], [1, 60, 2, 1, 70, 71, 72, 73, 74]]
    with pair.aligned() as m:
        gens = sample_batch(
            m, tok, prompts * 2, [0, 1, 2, 3], temperature=1.0, max_new_tokens=6, capture_layers=[2, 4]
        )
    rows = [
        ScoreRow(p, g.token_ids, ("s", i)) for i, (p, g) in enumerate(zip(prompts * 2, gens, strict=True))
    ]
    captured = {layer: torch.tensor(np.stack([g.hidden[layer] for g in gens])) for layer in (2, 4)}
    eng = ScoreEngine(pair, ["latent_similarity"], [2, 4])
    with pair.aligned() as m:
        two_pass_states = eng._side_padded(m, rows, [2, 4], False).final
    for layer in (2, 4):
        torch.testing.assert_close(captured[layer], two_pass_states[layer], atol=2e-5, rtol=1e-5)
    a = eng.score(rows)
    b = eng.score(rows, aligned_hidden=captured)
    for col in a:
        np.testing.assert_allclose(a[col], b[col], atol=2e-5)


def test_keyless_rows_get_positional_keys(pair):
    rows = [ScoreRow([5, 6], [7]), ScoreRow([5, 6], [8]), ScoreRow([], [9])]
    vals = ScoreEngine(pair, ["random"]).score(rows[:2])[("random", None)]
    assert vals[0] != vals[1]
    with pytest.raises(ScoreError, match=r"row \(2,\): candidate has no prompt"):
        ScoreEngine(pair, ["random"]).score(rows)
