"""The artifact graph: each stage's config fields, inputs and outputs, and the plan `dalign run` follows.

Each stage is a function `run_<stage>(run: RunDir, force: bool = False) -> dict` in its package. It validates its
config and inputs, calls `run.begin(stage, force)` (the first write: it checks the outputs' recorded identity and
sweeps what a killed run left), writes its outputs through `run.store(name)` (incremental, keyed), and ends with
`run.finish(stage, rows=..., warnings=...)`. The returned dict is a short summary for the console.

A stage's identity is the hash of the config fields it declares here plus the content hashes of the artifacts it
reads, so any upstream change (a config edit, a re-sample, a retrained adapter, another judge) makes every stage
downstream of it stale, and `dalign run --dry-run` names what changed. Speed knobs (batch sizes, devices, prefix
sharing) are left out: they change how fast, not what.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from dalign.config import STAGES, RunConfig, config_hash
from dalign.rundir import RunDir, adapter_dir, config_changes, input_changes, row_changes

MODEL_SHAPE = ("model.student", "model.system_prompt", "model.think_prefix", "model.dtype")
JUDGE = ("judge", "-judge.batch_size")
# What a sampled candidate depends on in `sample` (rows: datasets, n; speed: batch sizes; which models: models).
SAMPLING = (
    "sample",
    "-sample.batch_size",
    "-sample.batch_tokens",
    "-sample.share_prompt",
    "-sample.datasets",
    "-sample.n",
    "-sample.models",
)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    config: tuple[str, ...]  # dotted config paths it depends on; "-path" leaves a sub-field out
    inputs: tuple[str, ...]  # artifacts it reads; "aligned" = the adapter adapter_dir(run) resolves to
    outputs: tuple[str, ...]
    inputs_required: bool = True  # the report works with whatever exists
    derived: bool = False  # cheap to redo: a config change redoes it without --force
    enabled: Callable[[RunConfig], bool] = lambda cfg: True
    extra: str | None = None  # "module:function(run) -> dict": identity outside config and run (file hashes)
    rows: tuple[
        str, ...
    ] = ()  # config paths that only choose which rows exist: changed -> extend/prune, no --force

    def function(self) -> Callable[..., dict]:
        return _resolve(self.target)


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


PIPELINE: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "teach",
            "dalign.teach.stage:run_teach",
            ("teach", "-teach.batch_size", "-teach.limit"),
            (),
            ("traces",),
            extra="dalign.teach.stage:teach_files",
            rows=("teach.limit",),  # a larger limit extends the traces
        ),
        Stage(
            "filter",
            "dalign.teach.stage:run_filter",
            ("filter", "teach.spec", *JUDGE, "-judge.judges"),
            ("traces",),
            ("filtered",),
        ),
        Stage(
            "sft",
            "dalign.train.sft:run_sft",
            ("sft", "-sft.per_device_batch_size", *MODEL_SHAPE),
            ("filtered",),
            ("adapter",),
        ),
        Stage(
            "grpo",
            "dalign.train.grpo:run_grpo",
            (
                "grpo",
                *MODEL_SHAPE,
                "sample.temperature",
                "sample.top_p",
                "teach.spec",
                *JUDGE,
                "-judge.judges",
            ),
            ("adapter", "filtered"),
            ("adapter-grpo",),
            enabled=lambda cfg: cfg.grpo.enabled,
        ),
        Stage(
            "sample",
            "dalign.sample.stage:run_sample",
            ("model", "-model.device", "-model.adapter", "-model.base", *SAMPLING),
            ("aligned",),
            ("samples",),
            rows=("sample.datasets", "sample.n"),  # rows outside them are pruned, new ones sampled
        ),
        # Base and teacher samples depend on neither the adapter nor (base) the teacher, so a sweep shares them.
        Stage(
            "sample-base",
            "dalign.sample.stage:run_sample_base",
            ("model.student", "model.base", "model.system_prompt", "model.dtype", *SAMPLING),
            (),
            ("samples-base",),
            enabled=lambda cfg: "base" in cfg.sample.models,
            rows=("sample.datasets", "sample.n"),
        ),
        Stage(
            "sample-teacher",
            "dalign.sample.stage:run_sample_teacher",
            ("teach.teacher", "model.dtype", *SAMPLING),
            (),
            ("samples-teacher",),
            enabled=lambda cfg: "teacher" in cfg.sample.models,
            rows=("sample.datasets", "sample.n"),
        ),
        Stage("judge", "dalign.judge.stage:run_judge", JUDGE, ("samples",), ("judgments",)),
        Stage(
            "judge-models",
            "dalign.judge.stage:run_judge_models",
            JUDGE,
            ("samples-base", "samples-teacher"),
            ("judgments-models",),
            inputs_required=False,  # whichever of the two the config asks for
            enabled=lambda cfg: len(cfg.sample.models) > 1,
        ),
        Stage(
            "score",
            "dalign.score.stage:run_score",
            ("model", "-model.device", "-model.adapter", "score", "-score.batch_size", "-score.share_prompt"),
            ("samples", "aligned"),
            ("scores",),
        ),
        Stage(
            "select",
            "dalign.score.select:run_select",
            ("select", *JUDGE),
            ("samples", "judgments", "scores"),
            ("selection",),
        ),
        Stage(
            "attack",
            "dalign.attack.stage:run_attack",
            ("attack", "-attack.enabled", "-attack.batch_size", *MODEL_SHAPE, "model.base")
            + ("sample.top_p", "sample.repetition_penalty", *JUDGE),
            ("aligned",),
            ("attacks",),
            enabled=lambda cfg: cfg.attack.enabled,
            extra="dalign.attack.stage:attack_extra",
        ),
        Stage(
            "report",
            "dalign.report.stage:run_report",
            ("report", *JUDGE, "select.default_layer"),
            ("samples", "judgments", "scores", "selection", "attacks", "samples-base", "samples-teacher")
            + ("judgments-models",),
            ("report",),
            inputs_required=False,
            derived=True,
        ),
    ]
}
assert list(PIPELINE) == STAGES


def config_fields(cfg: RunConfig, paths: tuple[str, ...]) -> dict:
    """The declared part of the config as a nested dict ({"sample": {"temperature": 0.7, ...}, ...})."""
    dump = cfg.model_dump(mode="json")
    out: dict = {}
    for path in (p for p in paths if not p.startswith("-")):
        *parents, leaf = path.split(".")
        src, dst = dump, out
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    for path in (p[1:] for p in paths if p.startswith("-")):
        *parents, leaf = path.split(".")
        d = out
        for part in parents:
            d = d.get(part, {})
        d.pop(leaf, None)
    return out


def stage_deps(run: RunDir, stage: str) -> dict:
    """What a stage's outputs depend on: its config fields, its inputs' content hashes, and its `extra`."""
    st = PIPELINE[stage]
    deps = {"config": config_fields(run.config, st.config), "inputs": {i: run.content(i) for i in st.inputs}}
    if st.rows:
        deps["rows"] = config_fields(run.config, st.rows)
    if st.extra:
        deps["extra"] = _resolve(st.extra)(run)
    return deps


def _upstream(name: str, run: RunDir) -> set[str]:
    """Artifacts a stage reads, with 'aligned' resolved to the run's own adapter dir when it is one."""
    out = set(PIPELINE[name].inputs)
    if "aligned" in out:
        p = adapter_dir(run)
        out |= {p.name} if p is not None and p.parent == run.path else set()
        if not run.config.model.adapter:
            out |= {"adapter", "adapter-grpo"}  # a new run adapter becomes the aligned model
    return out


def plan(run: RunDir, stages: list[str]) -> list[tuple[str, str, str]]:
    """(stage, action, why) per stage: run, resume, reuse, skip, update (an input changed) or rerun (config edited).

    `rerun` needs --force; every other action is taken by `dalign run` on its own.
    """
    out: list[tuple[str, str, str]] = []
    changing: dict[str, str] = {}  # artifact -> the stage of this plan that will (re)make it
    for name in stages:
        st = PIPELINE[name]
        if not st.enabled(run.config):
            out.append((name, "skip", "disabled in the config"))
            continue
        recs = [run.artifact(o).record() for o in st.outputs]
        after = sorted({changing[i] for i in _upstream(name, run) if i in changing})
        if not any(recs):
            action, why = "run", "not started"
        elif after:
            action, why = "update", f"its input changes: {', '.join(after)} runs first"
        else:
            deps = stage_deps(run, name)
            rec = next(r for r in recs if r)
            if rec.get("key") == config_hash(deps):
                action, why = (
                    ("reuse", "up to date")
                    if rec.get("complete")
                    else ("resume", "stopped before it finished")
                )
            elif rec.get("key") is None:
                action, why = "rerun", "made without a recorded identity (an older dalign or by hand)"
            elif keys := config_changes(rec.get("deps") or {}, deps):
                action, why = ("update" if st.derived else "rerun"), "config changed: " + ", ".join(keys)
            elif changed := input_changes(rec.get("deps") or {}, deps):
                action, why = "update", "input changed: " + ", ".join(changed)
            else:
                action, why = "update", "rows requested changed: " + ", ".join(row_changes(rec["deps"], deps))
        out.append((name, action, why))
        if action != "reuse":
            changing.update({o: name for o in st.outputs})
    return out


def run_stage(name: str, run: RunDir, force: bool = False) -> dict:
    st = PIPELINE[name]
    if not st.enabled(run.config):
        return {"skipped": f"{name} is disabled in the config"}
    return st.function()(run, force=force)
