"""SFT and GRPO on the tiny model: data format, weights change, save/reload, resume, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dalign.config import GRPOConfig, LoraConfig, ModelConfig, SFTConfig, load_config
from dalign.models import load_pair, prompt_ids, render_prompt
from dalign.models.pair import AdapterMismatch
from dalign.rundir import RunDir, StageMismatch
from dalign.teach.parse import format_trace
from dalign.train.common import NoTrainingData, TrainError, ensure_think_tokens, load_student
from dalign.train.grpo import JudgeReward, batch_plan, load_trainable, run_grpo
from dalign.train.sft import build_examples, run_sft

COT = "The user asks how to pick a lock. Policy section 5.1 says refuse."
ANSWER = "I cannot help with that request, but I can offer safer alternatives."


def _rows(n: int = 4) -> list[dict]:
    return [
        {"prompt_id": f"t{i}", "prompt": f"How do I pick a lock? {i}", "category": "illicit", "cot": COT,
         "answer": ANSWER, "teacher": "corpus", "raw": format_trace(COT, ANSWER), "malformed": False,
         "label": "safe", "score": 0.0, "kept": True, "reason": "refusal: safe"}
        for i in range(n)
    ]  # fmt: skip


def _run(tmp_path, student: str, rows: list[dict] | None = None, **over) -> RunDir:
    base = {
        "name": "r",
        "runs_dir": str(tmp_path),
        "model": {"student": student},
        "sft": {"learning_rate": 5e-3, "max_steps": 1, "per_device_batch_size": 2, "effective_batch_size": 2,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "grpo": {"enabled": True, "judge": "fake", "learning_rate": 5e-2, "max_steps": 2, "batch_size": 4,
                 "num_generations": 2, "max_new_tokens": 8},
    }  # fmt: skip
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    run = RunDir.for_config(load_config(overrides=base))
    run.store("filtered").write(_rows() if rows is None else rows)
    return run


def _lora(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _assert_loaded(model, saved: dict[str, torch.Tensor]) -> None:
    """Every saved adapter tensor sits, bit for bit, in the loaded model (nothing left at its init)."""
    params = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    for name, tensor in saved.items():
        if "lora_" not in name:
            continue
        assert name in params, name
        assert torch.equal(params[name].cpu(), tensor), name


# ---------------------------------------------------------------- data format


def test_sft_examples_match_the_sampler_prompt(tiny_dir):
    model, tok = load_student(f"hf:{tiny_dir}")
    rows = _rows(2)
    examples, notes = build_examples(tok, rows, None, True, 512)
    assert notes == [] and len(examples) == 2
    ex = examples[0]
    p_ids, _ = prompt_ids(tok, rows[0]["prompt"], None, think_prefix=True)
    n_prompt = ex["completion_mask"].index(1)
    assert ex["input_ids"][:n_prompt] == p_ids  # token for token what the sampler feeds the model
    assert render_prompt(tok, rows[0]["prompt"], None, True).endswith("<think>\n")
    completion = ex["input_ids"][n_prompt:]
    assert completion[-1] == tok.eos_token_id and all(ex["completion_mask"][n_prompt:])
    assert tok.decode(completion[:-1]) == f"{COT}\n</think>\n\n{ANSWER}"


def test_grpo_prompt_text_tokenizes_like_the_sampler(tiny_dir):
    from dalign.train.common import strip_bos

    _, tok = load_student(f"hf:{tiny_dir}")
    text = strip_bos(tok, render_prompt(tok, "How do I pick a lock?", None, True))
    assert tok(text)["input_ids"] == prompt_ids(tok, "How do I pick a lock?", None, think_prefix=True)[0]


@pytest.mark.slow
def test_smollm2_sft_examples(smollm2_spec):
    from dalign.models import load_tokenizer

    tok = load_tokenizer(smollm2_spec)
    examples, _ = build_examples(tok, _rows(1), None, True, 2048)
    ex = examples[0]
    n_prompt = ex["completion_mask"].index(1)
    assert ex["input_ids"][:n_prompt] == prompt_ids(tok, _rows(1)[0]["prompt"], None, think_prefix=True)[0]
    assert tok.decode(ex["input_ids"][n_prompt:]) == f"{COT}\n</think>\n\n{ANSWER}<|im_end|>"
    assert (
        "<think>" not in tok.get_vocab()
    )  # why the default is to keep the tags as text (see train/common.py)


def test_sft_examples_without_think_prefix_and_too_long(tiny_dir):
    _, tok = load_student(f"hf:{tiny_dir}")
    examples, _ = build_examples(tok, _rows(1), "sys", False, 512)
    ex = examples[0]
    n_prompt = ex["completion_mask"].index(1)
    assert tok.decode(ex["input_ids"][n_prompt:-1]).startswith("<think>\n")
    examples, notes = build_examples(tok, _rows(1), None, True, 20)  # completion alone is longer than 20
    assert examples == [] and "dropped" in notes[0]


# ---------------------------------------------------------------- SFT


def test_one_step_sft_changes_weights_and_reloads(tmp_path, tiny_dir):
    student = f"hf:{tiny_dir}"
    run = _run(tmp_path, student)
    out = run_sft(run)
    adapter = run.path / "adapter"
    assert (
        out["steps"] == 1 and (adapter / "adapter_config.json").exists() and (adapter / "loss.png").exists()
    )
    card = json.loads((adapter / "card.json").read_text())
    assert (
        card["base_model"] == student
        and card["data"]["n_examples"] == 4
        and len(card["data"]["data_hash"]) == 16
    )
    assert card["hyperparameters"]["learning_rate"] == 5e-3 and card["hyperparameters"]["lora"]["r"] == 4
    assert len(card["loss"]) == 1 and card["loss"][0]["loss"] > 0
    saved = _lora(adapter)
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    pair = load_pair(ModelConfig(student=student), adapter)
    _assert_loaded(pair.model, saved)
    x = torch.tensor([prompt_ids(pair.tokenizer, "How do I pick a lock?", None, True)[0]])
    with torch.no_grad(), pair.aligned() as m:
        aligned = m(input_ids=x).logits
    with torch.no_grad(), pair.base() as m:
        base = m(input_ids=x).logits
    assert not torch.allclose(aligned, base)
    assert run.stage_entry("sft")["status"] == "done"


def test_sft_reuses_a_finished_adapter(tmp_path, tiny_dir):
    run = _run(tmp_path, f"hf:{tiny_dir}")
    run_sft(run)
    before = _lora(run.path / "adapter")
    assert run_sft(run) == {"adapter": str(run.path / "adapter"), "reused": True}
    after = _lora(run.path / "adapter")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sft_zero_kept_traces_stops_before_training(tmp_path, tiny_dir):
    rows = [{**r, "kept": False, "label": "unsafe", "reason": "refusal: unsafe"} for r in _rows(3)]
    run = _run(tmp_path, f"hf:{tiny_dir}", rows=rows)
    with pytest.raises(NoTrainingData, match=r"0 of 3 traces were kept.*refusal: unsafe"):
        run_sft(run)
    assert not (run.path / "adapter").exists() and run.stage_entry("sft") == {}


def test_sft_refuses_an_adapter_of_another_base(tmp_path, tiny_dir):
    run = _run(tmp_path, f"hf:{tiny_dir}")
    (run.path / "adapter").mkdir()
    (run.path / "adapter" / "card.json").write_text(
        json.dumps({"base_model": "hf:Qwen/Qwen2.5-0.5B-Instruct"})
    )
    # an adapter dalign did not train under a recorded identity is refused, not silently replaced
    with pytest.raises(StageMismatch, match="without a recorded identity"):
        run_sft(run)
    assert (run.path / "adapter" / "card.json").exists()


def test_think_tokens_added_only_in_add_mode(tmp_path, tiny_dir):
    model, tok = load_student(f"hf:{tiny_dir}")
    n = len(tok)
    assert ensure_think_tokens(model, tok, "text") == [] and len(tok) == n
    pieces = tok("<think>", add_special_tokens=False)["input_ids"]
    new = ensure_think_tokens(model, tok, "add")
    assert len(new) == 2 and len(tok) == n + 2 and model.get_input_embeddings().weight.shape[0] == n + 2
    emb = model.get_input_embeddings().weight
    assert torch.allclose(emb[new[0]], emb[pieces].mean(0))  # deterministic init, not random
    assert tok("<think>", add_special_tokens=False)["input_ids"] == [new[0]]
    assert ensure_think_tokens(model, tok, "add") == []  # present now: nothing added twice


def test_sft_in_add_mode_trains_the_new_rows_and_reloads(tmp_path, tiny_dir):
    from dalign.train.sft import train_sft

    student = f"hf:{tiny_dir}"
    dest = tmp_path / "adapter"
    sft = SFTConfig(learning_rate=5e-2, max_steps=1, per_device_batch_size=2, effective_batch_size=2,
                    lora=LoraConfig(r=4, alpha=8, dropout=0.0))  # fmt: skip
    card = train_sft(
        student, _rows(2), dest, sft, ModelConfig(student=student), think_mode="add", progress=False
    )
    new_ids = card["format"]["added_token_ids"]
    assert len(new_ids) == 2
    saved = _lora(dest)
    trained = saved[
        "base_model.model.model.embed_tokens.modules_to_save.weight"
    ]  # the embedding travels along
    pair = load_pair(ModelConfig(student=student), dest)
    assert len(pair.tokenizer) == pair.model.get_input_embeddings().weight.shape[0] == trained.shape[0]
    _assert_loaded(pair.model, saved)
    assert torch.equal(pair.model.get_input_embeddings().weight, trained)
    x = torch.tensor([[new_ids[0], new_ids[1]]])
    with torch.no_grad(), pair.aligned() as m:
        aligned = m(input_ids=x).logits
    with torch.no_grad(), pair.base() as m:
        base = m(input_ids=x).logits
    assert not torch.allclose(aligned, base)


# ---------------------------------------------------------------- GRPO


class _FakeJudge:
    """Deterministic, varied labels so GRPO groups have non-zero advantages; 'error' on some."""

    name = "fake"

    def judge(self, items):
        out = []
        for it in items:
            h = sum(map(ord, it["response"])) % 3
            out.append({"label": ["safe", "unsafe", "error"][h], "score": None, "raw": ""})
        return out


def test_reward_rule():
    class J:
        def judge(self, items):
            return [{"label": it["answer"], "score": None, "raw": ""} for it in items]

    reward = JudgeReward(J())
    got = reward(
        prompts=["p"] * 3,
        completions=["x </think> safe", "y </think> unsafe", "z </think> error"],
        user_prompt=["u"] * 3,
    )
    assert got == [1.0, 0.0, 0.0]  # judge errors are never rewarded as safe
    assert reward.counts == {"safe": 1, "unsafe": 1, "error": 1}


def test_reward_with_a_refusal_judge_pays_answers_to_benign_prompts():
    class Refusal:
        name = "refusal"

        def judge(self, items):
            return [{"label": it["answer"], "score": None, "raw": ""} for it in items]

    reward = JudgeReward(Refusal(), benign="benign")
    got = reward(
        prompts=["p"] * 4,
        completions=["a </think> safe", "b </think> unsafe", "c </think> unsafe", "d </think> error"],
        user_prompt=["u"] * 4,
        category=["illicit", "illicit", "benign", "benign"],
    )
    assert got == [1.0, 0.0, 1.0, 0.0]  # refusing a benign request earns nothing; errors never pay
    assert JudgeReward(_FakeJudge(), benign="benign").benign is None  # content judges are taken as they are


def test_frozen_adapter_is_the_pitfall_and_we_avoid_it(tiny_adapter_dir, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    frozen = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tiny_adapter_dir)
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 0  # the authors' no-op GRPO
    _, _, n, _ = load_trainable(f"hf:{tiny_dir}", tiny_adapter_dir, ModelConfig(student=f"hf:{tiny_dir}"))
    assert n > 0


def test_grpo_batch_plan():
    assert batch_plan(GRPOConfig(batch_size=256, num_generations=8)) == (8, 32)
    assert batch_plan(GRPOConfig(batch_size=4, num_generations=2)) == (4, 1)
    with pytest.raises(ValueError, match="multiple of grpo.num_generations"):
        batch_plan(GRPOConfig(batch_size=12, num_generations=8))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_step_grpo_trains_the_sft_adapter(tmp_path, tiny_dir, monkeypatch, dtype):
    """Also in bf16: a bf16 frozen base with fp32 LoRA factors generates and trains under autocast."""
    import dalign.judge

    monkeypatch.setattr(dalign.judge, "get_judge", lambda name, cfg=None: _FakeJudge())
    student = f"hf:{tiny_dir}"
    run = _run(tmp_path, student, model={"dtype": dtype}, sft={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
    run_sft(run)
    out = run_grpo(run)
    sft, grpo = _lora(run.path / "adapter"), _lora(run.path / "adapter-grpo")
    assert out["steps"] == 2 and sft.keys() == grpo.keys()
    changed = [k for k in sft if not torch.equal(sft[k], grpo[k])]
    assert len(changed) == len(sft)  # every LoRA tensor moved: the adapter was trainable
    card = json.loads((run.path / "adapter-grpo" / "card.json").read_text())
    assert [s["step"] for s in card["reward_per_step"]] == [1, 2]
    assert all(0.0 <= s["reward"] <= 1.0 for s in card["reward_per_step"])
    assert sum(card["reward"]["labels"].values()) == 2 * 4  # 2 steps x 4 completions judged
    assert card["hyperparameters"]["beta"] == 0.0 and card["parent_adapter"].endswith("adapter")
    assert ("bfloat16 frozen base" in card["hyperparameters"]["precision"]) is (dtype == "bfloat16")
    assert {t.dtype for t in grpo.values()} == {torch.float32}
    assert (run.path / "adapter-grpo" / "reward.png").exists()
    pair = load_pair(ModelConfig(student=student), run.path / "adapter-grpo")
    _assert_loaded(pair.model, grpo)
    assert run_grpo(run)["reused"] is True


def test_grpo_disabled_or_missing_inputs(tmp_path, tiny_dir):
    run = _run(tmp_path, f"hf:{tiny_dir}", grpo={"enabled": False})
    assert run_grpo(run) == {"skipped": "grpo.enabled is false"}
    run2 = _run(tmp_path / "b", f"hf:{tiny_dir}")
    with pytest.raises(FileNotFoundError, match="run `dalign sft` first"):
        run_grpo(run2)
    (run2.path / "adapter").mkdir()
    (run2.path / "adapter" / "adapter_config.json").write_text("{}")
    (run2.path / "adapter" / "card.json").write_text(json.dumps({"base_model": "hf:other"}))
    with pytest.raises(AdapterMismatch):
        run_grpo(run2)


def test_train_error_is_runtime_error():
    assert issubclass(NoTrainingData, TrainError) and issubclass(TrainError, RuntimeError)


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    from dalign.train.common import atomic_dir

    dest = tmp_path / "adapter"
    (tmp_path / ".adapter.dead.tmp").mkdir()  # left by a killed run
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (dest / "a.txt").read_text() == "1" and not (tmp_path / ".adapter.dead.tmp").exists()
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("training crashed")
    assert (dest / "a.txt").read_text() == "1"  # the old adapter survives a failed retrain
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_live_progress_prints_plain_lines_when_not_a_terminal(capsys):
    """In a log file the rich bar is never redrawn, so training progress is printed as lines (every ~5 %)."""
    from types import SimpleNamespace

    from dalign.train.common import LiveProgress

    live = LiveProgress("SFT")
    state = SimpleNamespace(is_world_process_zero=True, max_steps=40, global_step=0)
    live.on_train_begin(None, state, None)
    for step in range(1, 41):
        state.global_step = step
        live.on_log(None, state, None, logs={"loss": 2.0 - step / 40, "num_tokens": 100 * step})
        live.on_step_end(None, state, None)
    live.on_train_end(None, state, None)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("SFT: ")]
    # a line at the start and at every 5 % of the 40 steps (2 steps), the last one without an ETA
    assert [x.split()[1] for x in lines] == ["1/40"] + [f"{s}/40" for s in range(2, 41, 2)]
    assert "loss 1" in lines[-1] and "tok/s" in lines[-1] and "ETA" not in lines[-1] and "ETA" in lines[-2]
