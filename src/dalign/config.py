"""Typed run configuration: one section per stage, loaded from YAML with `key.sub=value` overrides.

Every field carries a help string; `dalign run CONFIG --print-config` prints the resolved config.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = [
    "teach",
    "filter",
    "sft",
    "grpo",
    "sample",
    "sample-base",
    "sample-teacher",
    "judge",
    "judge-models",
    "score",
    "select",
    "attack",
    "report",
]
# Models `sample.models` can name besides the aligned student, and the stage that samples each.
COMPARED_MODELS = {"base": "sample-base", "teacher": "sample-teacher"}


class ConfigError(ValueError):
    """A config problem, phrased for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    student: str = Field(
        "packaged:smollm2-135m-instruct",
        description="Student (aligned) model: hf:<id|dir>, gguf:<file> or packaged:smollm2-135m-instruct.",
    )
    adapter: str | None = Field(
        None,
        description="LoRA adapter dir for the aligned model. Default: <run>/adapter-grpo, else <run>/adapter "
        "when those exist; none means the student itself is scored against `base`.",
    )
    base: str | None = Field(
        None,
        description="Base model for scoring when the aligned model is a full checkpoint (not an adapter). "
        "With an adapter the base is the same weights with the adapter disabled.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = float32 on CPU, bfloat16 on GPU."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    system_prompt: str | None = Field(
        None, description="System prompt; null keeps the chat template's default (SmolLM2 has one)."
    )
    think_prefix: bool = Field(
        True,
        description="Append '<think>' to the generation prompt, as the paper does for distilled students.",
    )
    max_context: int | None = Field(
        None, description="Context length; longer prompts are cut from the left. Default: the model's limit."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off by default).")


class DatasetRef(Section):
    name: str = Field(
        description="Registered dataset name (`dalign datasets`) or 'file' for a local CSV/JSONL."
    )
    benchmark: str | None = Field(None, description="Name in artifacts; default: the dataset name.")
    path: str | None = Field(
        None, description="Local file for name='file' (or to override a dataset's source)."
    )
    source: Literal["auto", "offline", "hub"] = Field(
        "auto", description="auto: the offline package copy when installed, else the hub."
    )
    role: Literal["eval", "calibration"] = Field(
        "eval", description="calibration rows choose the latent layer; they never enter the reported numbers."
    )
    limit: int | None = Field(None, ge=1, description="Keep this many prompts after shuffling (null = all).")
    offset: int = Field(0, description="Skip this many shuffled prompts first (makes disjoint splits).")
    seed: int = Field(0, description="Shuffle seed for limit/offset.")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="This dataset's generation budget (default: sample.max_new_tokens); utility answers that "
        "reason first may need more to finish.",
    )
    prompt_field: str | None = Field(None, description="Column holding the prompt (name='file').")
    id_field: str | None = Field(
        None, description="Column holding a stable id (name='file'); default: row number."
    )
    category_field: str | None = Field(None, description="Column holding the category (name='file').")
    answer_field: str | None = Field(None, description="Column holding the reference answer (utility files).")

    @property
    def label(self) -> str:
        if self.benchmark:
            return self.benchmark
        return self.name if self.role == "eval" else f"{self.name}-calibration"


class TeachConfig(Section):
    teacher: str = Field(
        "corpus",
        description="corpus (the shipped traces), hf:<id|dir> for a local/hub model, or openai:<model> for an "
        "OpenAI-compatible endpoint (DALIGN_OPENAI_BASE_URL, DALIGN_OPENAI_API_KEY).",
    )
    prompts: str | None = Field(
        None,
        description="Prompt file (CSV/JSONL with question/prompt and category) or hf:UCSC-VLAA/STAR-41K.",
    )
    spec: str | None = Field(None, description="Safety spec YAML; default: the packaged spec.")
    limit: int | None = Field(None, description="Use only this many prompts.")
    max_new_tokens: int = Field(2048, ge=1, description="Teacher generation budget.")
    temperature: float = Field(0.6, description="Teacher sampling temperature.")
    batch_size: int = Field(
        8, ge=1, description="Prompts per teacher batch (HF teacher) or concurrent requests."
    )


class FilterConfig(Section):
    judge: str = Field(
        "content",
        description="Judge used on (prompt, answer); keep traces it labels safe. `none` keeps every well-formed "
        "trace (for a curated corpus): then `reason` must say why.",
    )
    reason: str | None = Field(
        None, description="Why the traces are not filtered (judge: none); recorded in the manifest."
    )
    keep_malformed: bool = Field(
        False, description="Keep traces with no parsable final answer (not advised)."
    )


class LoraConfig(Section):
    r: int = Field(32, description="LoRA rank.")
    alpha: int = Field(64, description="LoRA alpha.")
    dropout: float = Field(0.05, description="LoRA dropout.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules that get LoRA weights ('all-linear' or a list of names)."
    )


class SFTConfig(Section):
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    learning_rate: float = Field(1.41e-5, description="AdamW learning rate (paper: 1.41e-5).")
    epochs: float = Field(3.0, description="Training epochs.")
    effective_batch_size: int = Field(16, ge=1, description="Per-device batch x grad accumulation x devices.")
    per_device_batch_size: int = Field(4, ge=1, description="Micro-batch size.")
    max_length: int = Field(2048, description="Truncate training sequences to this many tokens.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = run all epochs).")
    group_by_length: bool = Field(
        True,
        description="Micro-batches of similar lengths (transformers' LengthGroupedSampler): on the shipped corpus "
        "77 % of a random micro-batch's tokens are real, 99 % of a grouped one's.",
    )
    seed: int = Field(0, description="Training seed.")


class GRPOConfig(Section):
    enabled: bool = Field(False, description="Run GRPO after SFT.")
    judge: str = Field("content", description="Reward judge: 1 if it labels the answer safe, else 0.")
    learning_rate: float = Field(1.41e-5, description="Learning rate.")
    epochs: float = Field(1.0, description="Epochs over the prompts.")
    batch_size: int = Field(256, ge=1, description="Prompts x generations per optimizer step (paper: 256).")
    num_generations: int = Field(8, description="Group size: completions per prompt.")
    beta: float = Field(0.0, description="KL coefficient (paper: 0).")
    max_new_tokens: int = Field(512, ge=1, description="Completion budget during GRPO.")
    max_steps: int = Field(-1, description="Stop after this many steps (-1 = all).")
    seed: int = Field(0, description="Training seed.")


class OpenAISampleConfig(Section):
    """`sample.backend: openai`: candidates from an OpenAI-compatible server (vLLM, SGLang, llama.cpp, transformers serve)."""

    base_url: str | None = Field(
        None, description="Server URL, e.g. http://127.0.0.1:8000/v1; default: $DALIGN_OPENAI_BASE_URL."
    )
    model: str | None = Field(
        None, description="Model name the server knows (vLLM: the --lora-modules name, e.g. aligned)."
    )
    api_key_env: str = Field("DALIGN_OPENAI_API_KEY", description="Environment variable holding the API key.")
    max_concurrency: int = Field(
        8, ge=1, description="Requests in flight (transformers serve: 1, else its global seed is shared)."
    )
    prompt_token_ids: bool = Field(
        False,
        description="Send the prompt as token ids (vLLM, SGLang) instead of the chat-formatted text, so the "
        "server cannot re-tokenise it differently (e.g. add a second BOS).",
    )
    server_token_ids: bool = Field(
        False,
        description="Ask for the generated token ids (vLLM/SGLang: logprobs + return_tokens_as_token_ids); "
        "off: ids are re-tokenised from the text and samples.token_ids_source says so.",
    )
    extra_body: dict = Field(
        default_factory=dict,
        description="Extra request fields, e.g. for transformers serve "
        '{generation_config: \'{"do_sample": true, "eos_token_id": 2}\'} (it replaces the model\'s defaults).',
    )
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout (the SDK retries with backoff).")
    max_retries: int = Field(4, ge=0, description="Retries of connection errors, 408/429 and 5xx.")


class SampleConfig(Section):
    backend: Literal["hf", "openai"] = Field(
        "hf", description="hf: HF generate with per-candidate seeds (exact); openai: an inference server."
    )
    openai: OpenAISampleConfig = Field(
        default_factory=OpenAISampleConfig, description="Server settings for backend: openai."
    )
    datasets: list[DatasetRef] = Field(default_factory=list, description="Benchmarks to sample on.")
    n: int = Field(8, description="Candidates per prompt (paper: 8).")
    temperature: float = Field(0.7, description="Sampling temperature (paper: 0.7); 0 = greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling mass (paper: 1.0).")
    repetition_penalty: float = Field(1.0, description="Repetition penalty (paper: 1.0).")
    max_new_tokens: int = Field(256, ge=1, description="Generation budget per candidate (paper: 2048).")
    batch_size: int = Field(128, ge=1, description="Most sequences per generation batch.")
    batch_tokens: int = Field(
        65536,
        ge=1,
        description="Most tokens per generation batch, counted as rows x (longest prompt + largest budget): long "
        "prompts get fewer rows, so the KV cache stays bounded (65536 ~ 1.5 GB for SmolLM2-135M in bf16).",
    )
    share_prompt: bool = Field(
        True,
        description="Run each prompt's prefill once for its N candidates and copy its KV cache to them (the "
        "same texts up to float rounding; N times less prefill, which dominates for long jailbreak prompts).",
    )
    merge_adapter: bool = Field(
        True,
        description="Sample from the student with its LoRA folded into the weights: the same model up to one "
        "rounding per weight, and ~1.4x faster decoding than applying the adapter at every step (hf backend).",
    )
    seed: int = Field(0, description="Base seed; each (benchmark, prompt, candidate) derives its own.")
    capture_layers: list[int] = Field(
        default_factory=list,
        description="Record the aligned model's final-token hidden state at these layers while sampling, "
        "so `score` needs only the base pass for latent similarity.",
    )
    models: list[Literal["aligned", "base", "teacher"]] = Field(
        default_factory=lambda: ["aligned"],
        description="Models sampled on the same prompts and seeds: aligned (always), base (the student without "
        "its adapter, or model.base) and teacher (teach.teacher when it is a local model). Base and teacher "
        "samples are judged by `judge-models` and compared in the report; selection applies to aligned only.",
    )

    @field_validator("n")
    @classmethod
    def _n_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"n must be >= 1, got {v}")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        if "aligned" not in v or len(set(v)) != len(v):
            raise ValueError(f"models must list aligned, and each model once; got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"temperature must be >= 0, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v


class JudgeConfig(Section):
    judges: list[str] = Field(
        default_factory=lambda: ["content"],
        description="Safety judges for harmful benchmarks (`dalign judge --help`), each labelling every "
        "candidate; the first is the primary judge that selection and calibration use.",
    )
    model: str | None = Field(
        None,
        description="Model of the model-backed judge in `judges`: hf:<id|dir> for llama-guard, the endpoint's "
        "model name for strongreject-rubric (list at most one of the two).",
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Decision threshold per judge, e.g. {llama-guard: 0.3}; a judge not listed uses its own "
        "default (content: the probe card's, llama-guard P(unsafe) 0.5, strongreject-rubric 0).",
    )
    content_probe: str | None = Field(
        None,
        description="Probe file of the content judge (from `dalign judge-train`); null = the packaged probe, "
        "packaged:NAME = another shipped one (packaged:content-v1, the first probe, reproduces earlier figures).",
    )
    unfinished: Literal["as_is", "unsafe", "error"] = Field(
        "as_is",
        description="Safety label of candidates without a finished final answer (reasoning not closed, or no "
        "stop token): as_is = judge the text (the final answer if any, else the reasoning), unsafe = count as "
        "an attack, error = count as undecided. The report shows the unfinished share beside every ASR.",
    )
    batch_size: int = Field(16, ge=1, description="Rows per judge batch.")

    @field_validator("judges")
    @classmethod
    def _judges(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("judges must name at least one judge, e.g. [content]")
        if len(set(v)) != len(v):
            raise ValueError(f"judges lists a judge twice: {v}")
        if {"llama-guard", "strongreject-rubric"} <= set(v):
            raise ValueError("llama-guard and strongreject-rubric both read judge.model; list one of them")
        return v

    @property
    def primary(self) -> str:
        """The judge whose labels selection, calibration and the headline ASR use."""
        return self.judges[0]


class ScoreConfig(Section):
    metrics: list[str] = Field(
        default_factory=lambda: ["latent_similarity", "kl", "perplexity", "self_certainty", "random"],
        description="Metrics to compute (`dalign score --help` lists them).",
    )
    layers: list[int] | Literal["all"] = Field(
        default_factory=lambda: [12],
        description="Layers for latent_similarity; 'all' = every layer 1..L (hidden_states convention).",
    )
    batch_size: int = Field(16, ge=1, description="Sequences per scoring batch.")
    retokenize: bool = Field(False, description="Re-tokenize decoded text as the paper's code does.")
    share_prompt: bool = Field(
        True,
        description="Run each prompt once and reuse its KV cache for its N candidates (same scores, faster).",
    )
    paired: bool = Field(
        True,
        description="bf16/fp16 with a LoRA adapter: run the base and the aligned side in one pass that shares the "
        "base's rounding (choices close to fp32's; on an AMX Xeon about the time of two passes apart for "
        "64-token candidates, 1.2x for 256-token ones); fp32 is unaffected.",
    )
    seed: int = Field(0, description="Seed of the random metric.")


class SelectConfig(Section):
    selectors: list[str] = Field(
        default_factory=list,
        description="metric or metric@layer names; default: every scored metric and layer.",
    )
    default_layer: int = Field(12, description="Paper default layer for latent similarity.")
    utility_constraint: float | None = Field(
        None, description="During calibration, reject layers whose utility drop exceeds this fraction."
    )


class ReportConfig(Section):
    bootstrap: int = Field(1000, description="Bootstrap resamples for 95 % CIs.")
    seed: int = Field(0, description="Bootstrap seed.")


class AttackConfig(Section):
    """`dalign attack pair`: PAIR (Chao et al. 2024) against the base, aligned and guarded student (Table 4)."""

    enabled: bool = Field(
        False, description="Run the attack in `dalign run` (`dalign attack pair` runs it regardless)."
    )
    behaviours: DatasetRef = Field(
        default_factory=lambda: DatasetRef(name="advbench", limit=50),
        description="Behaviours (goals) to attack; the PAIR target string is derived from each goal.",
    )
    targets: list[Literal["base", "aligned", "guarded"]] = Field(
        default_factory=lambda: ["base", "aligned", "guarded"],
        description="base = student with the adapter off, aligned = with it, guarded = aligned behind Best-of-N.",
    )
    streams: int = Field(20, ge=1, description="Attack conversations per behaviour (PAIR paper: 20).")
    depth: int = Field(8, ge=1, description="Iterations per stream (the DA paper's Table 4: 8).")
    success_threshold: int = Field(
        10, ge=1, le=10, description="Judge rating (1-10) at or above which a reply counts as jailbroken."
    )
    stop_behaviour_on_success: bool = Field(
        True,
        description="Stop all streams of a behaviour at its first jailbreak (PAIR); false: only that one.",
    )
    attacker: str = Field(
        "packaged:smollm2-135m-instruct",
        description="Attacker model: hf:<id|dir>, packaged:<name> or openai:<model> (an OpenAI-compatible server).",
    )
    attacker_base_url: str | None = Field(
        None, description="Base URL for an openai: attacker; default: $DALIGN_OPENAI_BASE_URL."
    )
    attacker_temperature: float = Field(1.0, ge=0, description="Attacker sampling temperature (PAIR: 1.0).")
    attacker_top_p: float = Field(0.9, gt=0, le=1, description="Attacker nucleus mass (PAIR: 0.9).")
    attacker_max_new_tokens: int = Field(500, ge=1, description="Attacker reply budget (PAIR: 500).")
    max_attempts: int = Field(
        5, ge=1, description="Attacker replies tried per iteration before it is an error row (PAIR: 5)."
    )
    keep_last: int = Field(
        3, ge=1, description="Previous rounds the attacker sees (its conversation is cut to the last ones)."
    )
    judge: str | None = Field(
        None,
        description="A registered judge (`dalign judge --help`; default: the run's safety judge), mapped to 1-10, "
        "or an LLM judge hf:/packaged:/openai:<model> asked for 'Rating: [[k]]'.",
    )
    judge_base_url: str | None = Field(
        None, description="Base URL for an openai: judge; default: $DALIGN_OPENAI_BASE_URL."
    )
    judge_max_new_tokens: int = Field(10, ge=1, description="LLM-judge reply budget (PAIR: 10).")
    target_max_new_tokens: int = Field(150, ge=1, description="Target reply budget (PAIR: 150).")
    target_temperature: float = Field(
        0.7, ge=0, description="Target sampling temperature for all three targets (the guard needs > 0)."
    )
    guard_n: int = Field(8, ge=1, description="Best-of-N candidates per guarded reply (paper: 8).")
    guard_metric: str = Field("latent_similarity", description="Best-of-N selection metric.")
    guard_layer: int = Field(12, ge=1, description="Layer for latent similarity (paper default 12).")
    seed: int = Field(0, description="Base seed; attacker and target seeds do not depend on the target.")
    batch_size: int = Field(
        32,
        ge=1,
        description="Streams (of all behaviours, one target, one iteration) per attacker/target/judge call and per "
        "commit; seeds are per stream, so it changes speed, not replies.",
    )


class ServeConfig(Section):
    """`dalign serve`: the Best-of-N guard behind an OpenAI-compatible API (model settings come from `model`)."""

    host: str = Field(
        "127.0.0.1",
        description="Bind address; anything but loopback needs API keys (the server refuses otherwise).",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    model_name: str = Field(
        "dalign-guard", description="Model id clients send as `model` and /v1/models lists."
    )
    metric: str = Field(
        "latent_similarity", description="Selection metric (`dalign score --help` lists them)."
    )
    layer: int = Field(12, ge=1, description="Layer of per-layer metrics; requests may set bon.layer.")
    n: int = Field(8, ge=1, description="Candidates per request unless it sets bon.n (paper: 8).")
    max_candidates: int = Field(16, ge=1, description="Largest bon.n a request may ask for.")
    temperature: float = Field(0.7, ge=0, description="Default sampling temperature (paper: 0.7).")
    top_p: float = Field(1.0, gt=0, le=1, description="Default nucleus sampling mass.")
    max_tokens: int = Field(256, ge=1, description="Default completion budget per candidate.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_request_tokens: int = Field(
        65536, ge=1, description="Per-request budget: candidates x (prompt + max_tokens) tokens, else 400."
    )
    max_messages: int = Field(256, ge=1, description="Most messages in one conversation.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body, else 413.")
    max_batch: int = Field(64, ge=1, description="Most candidates sampled and scored together.")
    max_wait_ms: float = Field(
        10.0, ge=0, description="How long the first queued request waits for others to join its batch."
    )
    max_queue: int = Field(
        64, ge=1, description="Requests waiting for a batch; beyond it the server answers 429."
    )
    score_batch_size: int = Field(64, ge=1, description="Rows per scoring forward pass.")
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted Bearer keys (prefer api_keys_env: configs get shared)."
    )
    api_keys_env: str = Field(
        "DALIGN_SERVE_API_KEYS", description="Environment variable with more accepted keys, comma-separated."
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM/Ctrl-C, how long running requests may take to finish."
    )


class ExecutionConfig(Section):
    """Where the sample and score stages run; results do not depend on it (README "Scaling up")."""

    backend: Literal["local", "ray"] = Field(
        "local", description="local: this process; ray: Ray Data actors, each loading the model once."
    )
    address: str = Field(
        "local",
        description="ray: 'local' starts Ray on this machine, 'auto' joins the running cluster, or host:port.",
    )
    workers: int = Field(2, ge=1, description="ray: actors per stage (the model is loaded once per actor).")
    num_cpus: float = Field(1.0, gt=0, description="ray: CPUs per actor (also its torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="ray: GPUs per actor (1 on a GPU node, 0.5 to pack two).")


class RunConfig(Section):
    name: str = Field("run", description="Run name; the run directory is <runs_dir>/<name>.")
    runs_dir: str = Field("runs", description="Where run directories live.")
    stages: list[str] = Field(
        default_factory=lambda: list(STAGES), description="Stages to run, in pipeline order."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Student/base models.")
    teach: TeachConfig = Field(default_factory=TeachConfig, description="Teacher traces.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Guard filtering of traces.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="LoRA SFT.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO with the guard as reward.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Best-of-N candidate sampling.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Labelling candidates.")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="Selection metrics.")
    select: SelectConfig = Field(default_factory=SelectConfig, description="Selectors and layer calibration.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Report settings.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The guard as an OpenAI server.")
    attack: AttackConfig = Field(default_factory=AttackConfig, description="PAIR adaptive attacks.")
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig, description="Local or Ray execution of model stages."
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES}")
        return sorted(v, key=STAGES.index)

    @model_validator(mode="after")
    def _compared_model_stages(self) -> RunConfig:
        """sample.models implies its stages: listing `sample` (`judge`) runs the compared models' sampling
        (judging) too, so a config need not repeat them in `stages`."""
        extra = [
            COMPARED_MODELS[m] for m in self.sample.models if m in COMPARED_MODELS and "sample" in self.stages
        ]
        if len(self.sample.models) > 1 and "judge" in self.stages:
            extra.append("judge-models")
        if set(extra) - set(self.stages):
            self.stages = sorted(set(self.stages) | set(extra), key=STAGES.index)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _suggest(key: str, model: type[BaseModel]) -> str:
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_model(path: tuple, root: type[BaseModel] = RunConfig) -> type[BaseModel] | None:
    model: Any = root
    for part in path:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            # list[DatasetRef] and similar
            for c in candidates:
                for a in getattr(c, "__args__", ()):
                    if isinstance(a, type) and issubclass(a, BaseModel):
                        model = a
    return model


def _friendly(err: ValidationError, origin: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _field_model(tuple(e["loc"][:-1]))
            hint = _suggest(str(e["loc"][-1]), parent) if parent else ""
            lines.append(f"unknown key {loc!r}{hint}")
        else:
            lines.append(f"{loc}: {e['msg']}")
    return ConfigError(f"invalid config ({origin}):\n  " + "\n  ".join(lines))


def _set_path(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    d[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value, e.g. sample.n=4")
        key, raw = item.split("=", 1)
        _set_path(out, key.strip(), yaml.safe_load(raw))
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Load a YAML config (or defaults), apply overrides, validate; errors name the key and the file."""
    data: dict = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(data).__name__}")
        origin = str(p)
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        data = deep_merge(data, extra)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise _friendly(e, origin) from None


def config_hash(obj: Any) -> str:
    """Stable short hash of any JSON-able value (a config section, a dict of sections)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
