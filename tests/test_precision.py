"""bf16 on CPUs that run it fast: detection, `model.dtype: auto`, bf16 scoring error vs the fp64 reference,
mixed-precision training with fp32 master weights, live training progress, and the FLOP count behind MFU."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from test_score_engine import reference
from torch.utils.flop_counter import FlopCounterMode

from dalign.config import ModelConfig, SFTConfig
from dalign.models import cpu, load_model
from dalign.models.loading import pick_dtype
from dalign.models.pair import ModelPair, load_pair
from dalign.score.engine import ScoreEngine, ScoreRow
from dalign.train.common import precision_flags
from dalign.train.sft import train_sft


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has these /proc/cpuinfo flags (and no DALIGN_CPU_BF16 override)."""
    monkeypatch.delenv(cpu.ENV, raising=False)

    def set_flags(*names):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(names))

    return set_flags


def test_bf16_detected_from_amx_or_avx512_bf16_flags(flags, monkeypatch):
    for names, fast in [(("avx2", "amx_bf16"), True), (("avx512f", "avx512_bf16"), True), (("avx2",), False)]:
        flags(*names)
        assert cpu.fast_bf16() is fast, names
        assert ("CPU flags" in cpu.bf16_reason()) is fast
    monkeypatch.setenv(cpu.ENV, "1")  # the override wins over the flags
    assert cpu.fast_bf16() and cpu.bf16_reason() == f"{cpu.ENV}=1"
    monkeypatch.setenv(cpu.ENV, "yes")
    with pytest.raises(ValueError, match="use 1"):
        cpu.fast_bf16()


def test_auto_dtype_is_bf16_only_where_the_cpu_runs_it_fast(flags, tiny_dir):
    flags("amx_bf16")
    assert pick_dtype("auto", torch.device("cpu")) == torch.bfloat16
    model, _ = load_model(f"hf:{tiny_dir}", dtype="auto", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert precision_flags("auto") == {"bf16": True, "fp16": False}
    flags("avx2")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert precision_flags("auto") == {"bf16": False, "fp16": False}
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32  # explicit dtypes are kept


def _bf16_and_fp64_pairs(tiny_dir, adapter) -> tuple[ModelPair, ModelPair]:
    """The tiny model + adapter as the scorer loads it in bf16, and as the fp64 reference."""
    pair = load_pair(ModelConfig(student=f"hf:{tiny_dir}", device="cpu", dtype="bfloat16"), adapter)
    ref = load_pair(ModelConfig(student=f"hf:{tiny_dir}", dtype="float32"), adapter).model.double()
    return pair, ModelPair(model=ref, tokenizer=pair.tokenizer)


def test_bf16_scores_stay_close_to_fp64_and_pick_the_same_candidates(tiny_dir, tiny_adapter_dir):
    """Latent similarity and KL in bf16 vs the unbatched fp64 reference: bounded error, same argmin choices."""
    pair, ref = _bf16_and_fp64_pairs(tiny_dir, tiny_adapter_dir)
    assert next(pair.model.parameters()).dtype == torch.bfloat16
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(12):
        p = torch.randint(4, 300, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        for j in range(4):
            r = torch.randint(4, 300, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g).tolist()
            rows.append(ScoreRow(p, r, ("b", str(i), j)))
    layers = [2, 4]
    got = ScoreEngine(pair, ["latent_similarity", "kl"], layers, batch_size=8, share_prompt=True).score(rows)
    want = [reference(ref, r, layers) for r in rows]
    for col in got:
        err = np.abs(got[col] - np.array([w[col] for w in want]))
        assert err.max() > 1e-4, (
            f"{col}: no bf16 rounding visible (max error {err.max():.1e}): did it run in bf16?"
        )
        assert err.max() < (0.03 if col[0] == "latent_similarity" else 0.02), (col, err.max())
    for layer in layers:  # the selector's choice (argmin per prompt) agrees with the reference's
        col = ("latent_similarity", layer)
        a = got[col].reshape(12, 4).argmin(1)
        b = np.array([w[col] for w in want]).reshape(12, 4).argmin(1)
        assert (a == b).mean() >= 0.75, (layer, a, b)


def test_bf16_scoring_sums_the_lora_term_of_residual_writers_in_fp32(tiny_dir, tmp_path):
    """A LoRA term on down_proj that is small against W x: summed in bf16 it is rounded to 2^-9 of |W x|, so the
    aligned-vs-base distance (1 - cos, ~2e-9 here) at layer 1 would be off by ~20 %; summed in fp32, by ~3 %."""
    import json

    from tiny import random_lora
    from transformers import AutoModelForCausalLM

    peft = random_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), targets=("down_proj",))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.002)
    peft.save_pretrained(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"base_model": f"hf:{tiny_dir}"}))
    pair, ref = _bf16_and_fp64_pairs(tiny_dir, tmp_path)
    g = torch.Generator().manual_seed(3)
    rows = [
        ScoreRow(p, torch.randint(4, 300, (10,), generator=g).tolist(), ("b", str(i), j))
        for i, p in enumerate(torch.randint(4, 300, (6, 8), generator=g).tolist())
        for j in range(4)
    ]
    got = ScoreEngine(pair, ["latent_similarity"], [1], batch_size=8).score(rows)[("latent_similarity", 1)]
    want = np.array([reference(ref, r, [1])[("latent_similarity", 1)] for r in rows])
    rel = np.abs(got - want) / (1 - want)
    assert rel.max() < 0.08, rel.max()


def _small_lora_pair(tiny_dir, path, scale: float) -> tuple[ModelPair, ModelPair]:
    """A LoRA on every linear layer, B shrunk by `scale`: aligned and base differ by a small share of the state."""
    import json

    from tiny import random_lora
    from transformers import AutoModelForCausalLM

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    peft = random_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), targets=targets)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    peft.save_pretrained(path)
    (path / "card.json").write_text(json.dumps({"base_model": f"hf:{tiny_dir}"}))
    pair = load_pair(ModelConfig(student=f"hf:{tiny_dir}", device="cpu", dtype="bfloat16"), path)
    # the reference gets the same bf16-rounded weights: what is left is the rounding inside the passes
    return pair, ModelPair(model=copy.deepcopy(pair.model).double(), tokenizer=pair.tokenizer)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_paired_bf16_passes_share_the_bases_rounding(tiny_dir, tmp_path, share_prompt):
    """Two bf16 passes round each side apart, to 2^-9 of the whole activation; the paired pass (one batch, the
    aligned side's matmul inputs as the base's plus a difference) shares the base's rounding. Against the fp64
    reference, the error on the aligned-vs-base distance is several times smaller, for latent similarity at each
    layer and for KL, and the Best-of-N picks follow the reference's."""
    from dalign.score import paired

    pair, ref = _small_lora_pair(tiny_dir, tmp_path, 0.01)
    g = torch.Generator().manual_seed(5)
    rows = [
        ScoreRow(
            p,
            torch.randint(4, 300, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g).tolist(),
            ("b", str(i), j),
        )
        for i, p in enumerate(torch.randint(4, 300, (8, 7), generator=g).tolist())
        for j in range(4)
    ]
    layers = [1, 3]
    kw = dict(metrics=["latent_similarity", "kl"], layers=layers, batch_size=8, share_prompt=share_prompt)
    together, apart = ScoreEngine(pair, **kw), ScoreEngine(pair, **kw, paired=False)
    assert together.paired and not apart.paired and paired.supported(pair)
    got, base = together.score(rows), apart.score(rows)
    want = [reference(ref, r, layers) for r in rows]
    for col in got:
        w = np.array([x[col] for x in want])
        dist = (1 - w) if col[0] == "latent_similarity" else w  # the quantity the selector ranks
        err, err_apart = np.abs(got[col] - w).max(), np.abs(base[col] - w).max()
        assert err < err_apart / 4, (col, err, err_apart)
        assert err < 0.05 * dist.max(), (col, err, dist.max())
        picks = got[col].reshape(8, 4).argmin(1) == w.reshape(8, 4).argmin(1)
        assert picks.all(), (col, picks)


def test_paired_passes_split_by_positions_give_the_same_scores(tiny_dir, tmp_path, monkeypatch):
    """A batch split into several paired passes (a small position budget) scores as one pass does."""
    from dalign.score import engine

    pair, _ = _small_lora_pair(tiny_dir, tmp_path, 0.01)
    g = torch.Generator().manual_seed(7)
    rows = [
        ScoreRow(
            p, torch.randint(4, 300, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
        )
        for p in torch.randint(4, 300, (3, 5), generator=g).tolist()
        for _ in range(3)
    ]
    for share in (True, False):
        eng = ScoreEngine(pair, ["latent_similarity", "kl"], [1, 3], batch_size=9, share_prompt=share)
        whole = eng.score(rows)
        passes = []
        monkeypatch.setattr(engine, "PAIRED_POSITIONS", 40)
        real = eng._side

        def counted(*a, passes=passes, real=real, **k):
            passes.append(len(a[1]))
            return real(*a, **k)

        monkeypatch.setattr(eng, "_side", counted)
        split = eng.score(rows)
        monkeypatch.undo()
        assert len(passes) > 2 and max(passes) < 2 * len(rows), passes  # several passes of [part; part]
        for col in whole:
            np.testing.assert_allclose(split[col], whole[col], rtol=0, atol=1e-6, err_msg=str(col))


def test_paired_scoring_only_where_the_pair_allows_it(tiny_dir, tmp_path):
    """fp32 pairs stay exact and unpaired; a merged adapter or a separate base checkpoint has no shared weights to
    pair on."""
    from dalign.score import paired

    pair, ref = _small_lora_pair(tiny_dir, tmp_path, 0.01)
    assert paired.supported(pair)
    fp32 = load_pair(ModelConfig(student=f"hf:{tiny_dir}", dtype="float32"), tmp_path)
    assert not paired.supported(fp32) and not ScoreEngine(fp32, ["latent_similarity"], [1]).paired
    assert not paired.supported(ModelPair(model=pair.model, tokenizer=pair.tokenizer, base_model=ref.model))
    pair.model.merge_adapter()
    assert not paired.supported(pair)


def test_bf16_weights_keep_an_fp32_residual_stream(tiny_dir):
    """The scorer's forward on bf16 weights: layer outputs (the residual stream the guard compares) are fp32,
    while the matmuls inside run in bf16."""
    from transformers import DynamicCache

    from dalign.models.family import cache_kwarg
    from dalign.score.engine import _capture

    model, _ = load_model(f"hf:{tiny_dir}", dtype="bfloat16", device="cpu")
    inner = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    seen = {}  # what q, k and v received: the normed fp32 state, cast to bf16 once for all three
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(model.model.layers[0].self_attn, name)
        proj.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0]))
    ids = torch.tensor([[5, 6, 7, 8]])
    cache = DynamicCache(config=model.config)
    got = _capture(
        model,
        {"input_ids": ids, "use_cache": True, cache_kwarg(model): cache},
        {2: {"last": (torch.tensor([0]), torch.tensor([3]))}},
    )
    assert got[2]["last"].dtype == torch.float32
    assert inner == [torch.bfloat16]
    assert seen["q_proj"].dtype == torch.bfloat16 and seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    assert cache.layers[0].keys.dtype == torch.bfloat16  # rotary cos/sin in bf16: the keys are not upcast


def test_mask_dropout_has_the_law_of_dropout():
    from dalign.train.cpu import MaskDropout

    drop = MaskDropout(0.05).train()
    x = torch.ones(400, 1000)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.95) < 0.002  # 6 standard errors (3.4e-4) of 400k draws
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - round(0.05 * 65536) / 65536)))
    assert abs(y.mean().item() - 1.0) < 0.003  # inverted dropout: unbiased
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded by torch's generator
    assert not torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)
    y16 = drop.train()(x.bfloat16())  # 16-bit floats: the mask is built from the scale's bit pattern
    assert y16.dtype == torch.bfloat16 and abs((y16 != 0).float().mean().item() - 0.95) < 0.002
    assert set(y16.unique().tolist()) == {0.0, torch.tensor(drop.scale, dtype=torch.bfloat16).item()}
    odd = torch.ones(3, 5, dtype=torch.bfloat16)  # numel not a multiple of 4
    assert MaskDropout(0.5).train()(odd).shape == odd.shape


def test_bf16_sft_loads_a_bf16_base_and_uses_the_cpu_kernels(tmp_path, tiny_dir, monkeypatch):
    """On CPU with bf16 autocast the frozen base is bf16, LoRA factors fp32, dropout is MaskDropout and attention
    is eager; fast_kernels=False keeps the stock path."""
    import dalign.train.sft as sft_mod
    from dalign.train.cpu import MaskDropout

    seen = {}
    real = sft_mod.speed_up

    def observed(model, autocast):
        real(model, autocast)
        seen["base"] = model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.dtype
        seen["lora"] = model.get_base_model().model.layers[0].mlp.down_proj.lora_A["default"].weight.dtype
        seen["drop"] = type(model.get_base_model().model.layers[0].mlp.down_proj.lora_dropout["default"])
        seen["attn"] = model.get_base_model().config._attn_implementation

    monkeypatch.setattr(sft_mod, "speed_up", observed)
    student = f"hf:{tiny_dir}"
    cfg = _tiny_sft(dropout=0.1, steps=1)
    mc = ModelConfig(student=student, dtype="bfloat16")
    card = train_sft(student, _rows(4), tmp_path / "a", cfg, mc, progress=False)
    assert seen == {"base": torch.bfloat16, "lora": torch.float32, "drop": MaskDropout, "attn": "eager"}
    assert "bfloat16 frozen base" in card["hyperparameters"]["precision"]
    seen.clear()
    card = train_sft(student, _rows(4), tmp_path / "b", cfg, mc, progress=False, fast_kernels=False)
    assert not seen and "frozen base" not in card["hyperparameters"]["precision"]


def _tiny_sft(dropout: float, steps: int) -> SFTConfig:
    return SFTConfig(
        lora={"r": 4, "alpha": 8, "dropout": dropout},
        learning_rate=5e-3,
        epochs=1,
        max_steps=steps,
        effective_batch_size=2,
        per_device_batch_size=2,
        max_length=128,
    )


def _rows(n):
    return [
        {
            "prompt_id": str(i),
            "prompt": f"How do I pick lock {i}?",
            "cot": "Policy section 1 says refuse.",
            "answer": "I can't help.",
        }
        for i in range(n)
    ]


def test_bf16_sft_autocasts_over_fp32_master_weights_and_shows_progress(
    tmp_path, tiny_dir, monkeypatch, capsys
):
    """model.dtype=bfloat16: linear layers compute in bf16 while the trained LoRA weights stay fp32; the live
    progress bar prints steps, the loss and the ETA while training."""
    import dalign.train.sft as sft_mod

    seen: set[torch.dtype] = set()
    real = sft_mod.load_student

    def observed(*a, **k):
        model, tok = real(*a, **k)
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        return model, tok

    monkeypatch.setattr(sft_mod, "load_student", observed)
    student = f"hf:{tiny_dir}"
    cfg = _tiny_sft(dropout=0.0, steps=2)
    card = train_sft(
        student, _rows(4), tmp_path / "adapter", cfg, ModelConfig(student=student, dtype="bfloat16")
    )
    assert torch.bfloat16 in seen  # autocast ran the forward in bf16
    assert card["hyperparameters"]["bf16"] is True and card["hyperparameters"]["optimizer_steps"] == 2
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}  # master weights
    out = capsys.readouterr()
    text = out.out + out.err
    assert "SFT" in text and "2/2" in text and "loss" in text and "ETA" in text


def test_forward_flops_match_torch_flop_counter(tiny_dir):
    """The MFU numerator against PyTorch's own FLOP counter on a full forward (eager attention computes all
    T^2 query-key pairs)."""
    model, _ = load_model(f"hf:{tiny_dir}", dtype="float32", device="cpu")
    model.set_attn_implementation("eager")  # attention as matmuls, which the counter sees (not fused SDPA)
    t = 24
    x = torch.randint(4, 300, (2, t))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=x)
    assert cpu.forward_flops(model, 2 * t, 2 * t * t) == pytest.approx(fc.get_total_flops(), rel=0.01)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:  # LM head on the last position only
        model(input_ids=x, logits_to_keep=1)
    assert cpu.forward_flops(model, 2 * t, 2 * t * t, head_tokens=2) == pytest.approx(
        fc.get_total_flops(), rel=0.01
    )
    assert cpu.matmul_peak(torch.float32, n=128, seconds=0.05) > 0


def test_generation_flops_count_a_shared_prefill_once(tiny_dir):
    """The sampler's executed FLOPs (PyTorch's counter) with and without a shared prompt differ by what
    generation_flops says the two skipped prefills cost."""
    from dalign.sample.sampler import sample_batch

    model, tok = load_model(f"hf:{tiny_dir}", dtype="float32", device="cpu")
    model.generation_config.suppress_tokens = [tok.eos_token_id]  # every row generates exactly 5 tokens
    ids = [list(range(10, 30))] * 3
    counted = {}
    for share in (True, False):
        with FlopCounterMode(display=False) as fc:
            sample_batch(model, tok, ids, [1, 2, 3], max_new_tokens=5, share_prompt=share)
        counted[share] = fc.get_total_flops()
    lens, new = [20] * 3, [5] * 3
    saved = cpu.generation_flops(model, lens, new) - cpu.generation_flops(model, lens, new, prefill_lens=[20])
    attention = cpu.forward_flops(model, 0, attended=2 * (20 * 21 // 2))  # the counter misses fused SDPA
    assert counted[False] - counted[True] == pytest.approx(saved - attention, rel=1e-6)


def test_mfu_leaves_out_an_emulated_bf16_peak():
    """Where bf16 is slower than fp32 (no AMX / AVX-512 BF16), a share of its 'peak' would read 10,000 %."""
    assert (
        cpu.mfu(5e10, 1.0, {"float32": 100.0, "bfloat16": 0.3})
        == "50.0 GFLOP/s = 50.0 % of the fp32 peak (100)"
    )
    fast = cpu.mfu(5e10, 1.0, {"float32": 100.0, "bfloat16": 400.0})
    assert fast == "50.0 GFLOP/s = 12.5 % of the bf16 peak (400), 50.0 % of the fp32 peak (100)"


def test_head_tiles_project_only_labelled_positions_with_the_same_numbers(tiny_dir, monkeypatch):
    """On CPU, TRL's fused LM head under `head_tiles`: the kernel gets only the positions that have a label, in
    our tile sizes; loss, log-probs, entropy and gradients equal TRL's default path. Settings restored on exit."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as tu
    from trl.trainer.utils import add_fused_lm_head

    from dalign.train.cpu import HEAD_TOKENS, HEAD_VOCAB, head_tiles

    model, _ = load_model(f"hf:{tiny_dir}", dtype="float32", device="cpu")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100  # prompts
    labels[1, 9:] = -100  # padding
    calls = []
    real = tu._ChunkedLogProbFunction.apply

    def spy(hidden, weight, bias, targets, temperature, chunk, *rest):
        calls.append((hidden.shape[0], chunk, kernel.TOKEN_CHUNK_SIZE))
        return real(hidden, weight, bias, targets, temperature, chunk, *rest)

    monkeypatch.setattr(tu._ChunkedLogProbFunction, "apply", staticmethod(spy))

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return [out.loss, out.log_probs, out.entropy, model.model.layers[0].mlp.down_proj.weight.grad]

    stock = run()
    with head_tiles(model):
        tiled = run()
    assert calls[1] == (int((labels[:, 1:] != -100).sum()), HEAD_VOCAB, HEAD_TOKENS) and calls[0][0] == 22
    for a, b in zip(stock, tiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert kernel.TOKEN_CHUNK_SIZE != HEAD_TOKENS and not tu._use_triton(torch.device("cpu"))


def test_head_tiles_kernels_match_trl_and_an_fp64_reference():
    """`head_tiles`'s CPU folds and backward over several token and vocabulary tiles: in fp32 (with temperature,
    a trained head and bias, argmax ties, and softcapping) every output and gradient equals TRL's; in bf16 the hidden-state
    gradient is as close to an fp64 reference as TRL's own. TRL's functions are restored on exit."""
    import trl.kernels.chunked_logprob as kernel
    from trl.kernels import ChunkedLogProbFunction

    from dalign.train.cpu import HEAD_TOKENS, HEAD_VOCAB, head_tiles

    model = torch.nn.Linear(1, 1)  # head_tiles only asks where the model lives
    stock_parts = (vars(ChunkedLogProbFunction)["backward"], kernel._forward_tile, kernel._backward_tile)
    g = torch.Generator().manual_seed(0)
    n, vocab, dim = HEAD_TOKENS * 2 + 37, HEAD_VOCAB * 2 + 300, 64
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / 4
    bias = torch.randn(vocab, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    top = (hidden @ weight.t() + bias).argmax(-1)
    targets[:100] = top[:100]  # top-1 targets, across tiles
    assert top[1] > 0 and top[0] < vocab - 1
    for tie, row in ((vocab - 1, 0), (0, 1)):  # a tie after one target (still top-1), before another (not)
        weight[tie], bias[tie] = weight[top[row]], bias[top[row]]
    outs = ("log_probs", "entropy", "is_top1")

    def run(dtype, tiled, train_head=False, temperature=1.0, softcap=None):
        h = hidden.to(dtype, copy=True).requires_grad_(True)
        w = weight.to(dtype, copy=True).requires_grad_(train_head)
        b = bias.to(dtype, copy=True).requires_grad_(train_head) if train_head else None
        with head_tiles(model) if tiled else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                lp, ent, _, _, top1 = ChunkedLogProbFunction.apply(
                    h, w, b, targets, temperature, HEAD_VOCAB, softcap, 1.0, outs
                )
            (lp.sum() + 0.3 * ent.sum()).backward()
        return [lp, ent, top1] + [t.grad for t in (h, w, b) if t is not None and t.requires_grad]

    stock, tiled = run(torch.float32, False, True, 0.7), run(torch.float32, True, True, 0.7)
    assert 50 < stock[2].sum() < n and stock[2][0] and not stock[2][1] and torch.equal(stock[2], tiled[2])
    capped = run(torch.float32, False, softcap=2.0), run(torch.float32, True, softcap=2.0)  # TRL's folds
    for a, b in zip(
        stock[:2] + stock[3:] + capped[0][:2], tiled[:2] + tiled[3:] + capped[1][:2], strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())

    h64 = hidden.to(torch.bfloat16).double().requires_grad_(True)
    logp = torch.log_softmax(h64 @ weight.to(torch.bfloat16).double().t(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    (logp.gather(-1, targets[:, None]).sum() + 0.3 * ent.sum()).backward()
    err = {t: (run(torch.bfloat16, t)[3].double() - h64.grad).abs().mean().item() for t in (False, True)}
    assert err[True] <= 1.1 * err[False] and err[True] < 0.01 * h64.grad.abs().mean().item(), err
    assert stock_parts == (
        vars(ChunkedLogProbFunction)["backward"],
        kernel._forward_tile,
        kernel._backward_tile,
    )


def test_agreement_benchmark_counts_flips_regret_and_near_ties():
    """benchmarks/score_agreement.py: picks follow each metric's direction, regret is the fp32 score the new pick
    gives up over the prompt's range, a near tie is a runner-up within the column's error."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "score_agreement.py"
    spec = importlib.util.spec_from_file_location("score_agreement", path)
    sa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sa)
    groups = np.array([0, 0, 0, 1, 1, 1])
    ls, kl = ("latent_similarity", 1), ("kl", None)
    ref = {ls: np.array([0.9, 0.5, 0.51, 0.2, 0.8, 0.9]), kl: np.array([1.0, 3.0, 2.0, 5.0, 4.0, 0.0])}
    new = {ls: np.array([0.9, 0.52, 0.51, 0.2, 0.8, 0.9]), kl: np.array([1.0, 2.0, 3.0, 5.0, 4.0, 0.0])}
    picks = sa.compare(ref, new, groups)
    err, out = picks[ls]
    assert err == pytest.approx(0.02)
    assert [s for s, _, _ in out] == [False, True]  # argmin: 0.50 -> 0.51
    assert out[0][1] == pytest.approx(0.01 / 0.4) and out[1][1] == 0.0
    assert [n for _, _, n in out] == [True, False]  # 0.51 - 0.50 < 0.02; 0.8 - 0.2 is not
    err, out = picks[kl]
    assert [s for s, _, _ in out] == [False, True]  # argmax: candidate 1 (3.0) -> 2
    assert out[0][1] == pytest.approx(0.5) and [n for _, _, n in out] == [False, False]
    assert sa.share(picks, [ls, kl]) == 0.5 and sa.share(picks, [kl]) == 0.5
    summary = sa.summarise(picks)  # 4 choices: near ties [T, F, F, F]; flips ls@0 (near) and kl@0 (not)
    assert summary["near_tie_share"] == 0.25 and summary["flips_near_tie"] == 0.5
    assert summary["regret_mean"] == pytest.approx(round((0.025 + 0.5) / 4, 4))
    assert summary["choice_agreement"] == 0.5 and summary["choices"] == 4 and summary["max_abs_err"] == 1.0
