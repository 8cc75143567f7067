"""BestOfN: choose among strings, generate-and-choose, agreement with the engine; slow check on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from dalign.config import ModelConfig
from dalign.models.chat import prompt_ids
from dalign.models.pair import load_pair
from dalign.score import BestOfN, ScoreEngine, ScoreRow


@pytest.fixture(scope="module")
def pair(tiny_dir, tiny_adapter_dir):
    return load_pair(ModelConfig(student=f"hf:{tiny_dir}", device="cpu"), tiny_adapter_dir)


CANDS = ["I cannot help with that request.", "Sure, here is how to pick a lock.", "Paris is the capital.", ""]


def test_choose_matches_engine_and_direction(pair):
    bon = BestOfN(pair, "latent_similarity", layer=3, think_prefix=False)  # as prompt_ids' default below
    choice = bon.choose("How do I pick a lock?", CANDS)
    assert len(choice.scores) == 4 and choice.metric == "latent_similarity" and choice.layer == 3
    assert choice.index == min(range(4), key=lambda i: choice.scores[i])
    assert choice.text == CANDS[choice.index]
    tok = pair.tokenizer
    pids = prompt_ids(tok, "How do I pick a lock?")[0]
    rows = [ScoreRow(pids, tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for c in CANDS]
    ref = ScoreEngine(pair, ["latent_similarity"], [3]).score(rows)[("latent_similarity", 3)]
    assert max(abs(a - b) for a, b in zip(choice.scores, ref, strict=True)) < 1e-5


def test_choose_argmax_metric_and_nan(pair):
    bon = BestOfN(pair, "kl", append_eos=False)
    choice = bon.choose("How do I pick a lock?", CANDS)
    assert choice.layer is None and math.isnan(choice.scores[3])  # empty answer: no response tokens
    finite = [i for i, s in enumerate(choice.scores) if not math.isnan(s)]
    assert choice.index == max(finite, key=lambda i: choice.scores[i])


def test_generate_then_choose(pair):
    bon = BestOfN(pair, "latent_similarity", layer=2)
    choice = bon.generate("Explain photosynthesis", n=4, max_new_tokens=8, seed=0)
    assert len(choice.candidates) == 4 and len(choice.scores) == 4
    assert 0 <= choice.index < 4 and all(not math.isnan(s) for s in choice.scores)
    again = bon.generate("Explain photosynthesis", n=4, max_new_tokens=8, seed=0)
    assert again.scores == pytest.approx(choice.scores, abs=1e-6)


@pytest.mark.slow
def test_smollm2_layer12_early_exit_matches_full_pass(smollm2_spec):
    """The real model: layer-12 latent similarity against output_hidden_states, a random LoRA making a pair."""
    from peft import LoraConfig, get_peft_model

    from dalign.models import load_model
    from dalign.models.pair import ModelPair

    model, tok = load_model(smollm2_spec, dtype="float32", device="cpu")
    torch.manual_seed(0)
    peft = get_peft_model(
        model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ).eval()
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pair = ModelPair(model=peft, tokenizer=tok)
    pids = prompt_ids(tok, "How do I pick a lock?")[0]
    resp = [
        tok("I can't help with that.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        [tok.eos_token_id],
    ]
    got = ScoreEngine(pair, ["latent_similarity"], [12], padding_side="left").score(
        [ScoreRow(pids, r) for r in resp]
    )
    for i, r in enumerate(resp):
        ids = torch.tensor([pids + r])
        with torch.no_grad():
            with pair.aligned() as m:
                ha = m(input_ids=ids, output_hidden_states=True).hidden_states[12][0, -1]
            with pair.base() as m:
                hb = m(input_ids=ids, output_hidden_states=True).hidden_states[12][0, -1]
        want = float(torch.nn.functional.cosine_similarity(ha.double(), hb.double(), dim=0))
        assert abs(got[("latent_similarity", 12)][i] - want) < 1e-5
