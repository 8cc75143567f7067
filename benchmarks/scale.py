"""Scale-out on one machine, same work: local (1 process, 2 threads) vs Ray (2 workers x 1 thread) vs the openai
backend against `transformers serve`, for `sample` and `score`, on the packaged SmolLM2 + a random LoRA adapter.

    .venv/bin/python benchmarks/scale.py --prompts 16 --n 4 --max-new-tokens 32

Throughput counts the stage's wall time after the cluster/server is up (Ray start and server start are reported
apart): model loading in the workers is included, as a user pays it. Overhead share = 1 - worker busy time /
(wall x workers). equal_ray: Ray's samples have the local token ids and its scores are within 1e-6 (relative to max(1, |score|):
the thread counts differ, so float reduction order does);
equal_openai_token_ids: greedy candidates from the server (serving the `dalign export --merged` checkpoint) have
the token ids local HF greedy decoding of that checkpoint gives. The paper-scale figures are a PROJECTION from
the measured per-worker throughput, not a measurement. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/servers.py: the server helper

from servers import TransformersServer  # noqa: E402

from dalign.config import ModelConfig, load_config  # noqa: E402
from dalign.models.export import export_merged  # noqa: E402
from dalign.rundir import RunDir  # noqa: E402
from dalign.sample.stage import run_sample  # noqa: E402
from dalign.score.stage import run_score  # noqa: E402

SPEC = "packaged:smollm2-135m-instruct"
KEYS = ["benchmark", "prompt_id", "candidate"]
PAPER = {"prompts": 6003, "candidates": 8, "pairs": 42, "max_new_tokens": 2048}


def make_adapter(dest: Path) -> Path:
    """A random LoRA (r=8 on q/v, small non-zero B) for SmolLM2, so aligned != base and scoring has two models."""
    from peft import LoraConfig, get_peft_model

    from dalign.models import load_model

    model, tok = load_model(SPEC, "float32", "cpu")
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft.save_pretrained(dest)
    (dest / "card.json").write_text(json.dumps({"base_model": SPEC}))
    return dest


def config(root: Path, name: str, args, **over):
    base = {
        "runs_dir": str(root),
        "name": name,
        "model": {"student": SPEC, "dtype": "float32", "device": "cpu"},
        "sample": {
            "datasets": [{"name": "advbench", "limit": args.prompts, "source": "offline"}],
            "n": args.n,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
        },
        # batch 4 -> 32-row chunks (whole prompt groups): several score tasks for the Ray pool
        "score": {
            "metrics": ["latent_similarity", "kl", "perplexity", "self_certainty"],
            "layers": [12],
            "batch_size": 4,
        },
        "execution": {"backend": "local", "workers": 2, "num_cpus": 1},
    }
    for section, values in over.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(overrides=base)


def timed(stage, run: RunDir) -> dict:
    t0 = time.perf_counter()
    stage(run)
    wall = time.perf_counter() - t0
    name = "sample" if stage is run_sample else "score"
    entry = run.stage_entry(name)
    workers = max(1, len(entry.get("workers", [])))
    busy = float(entry.get("worker_seconds") or 0.0)
    return {
        "wall_s": round(wall, 2),
        "workers": workers,
        "overhead_share": round(1 - busy / (wall * workers), 3),
    }


def samples(run: RunDir):
    return run.read("samples").sort_values(KEYS).reset_index(drop=True)


def scores(run: RunDir):
    return run.read("scores").sort_values([*KEYS, "metric", "layer"]).reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="AdvBench prompts (offline copy)")
    ap.add_argument("--n", type=int, default=4, help="candidates per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="sampling batch = one shard = one Ray task")
    ap.add_argument("--concurrency", type=int, default=2, help="openai backend requests in flight")
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="dalign-scale-"))
    adapter = make_adapter(root / "adapter")
    merged = export_merged(ModelConfig(student=SPEC), adapter, root / "merged")
    res: dict = {"candidates": args.prompts * args.n, "max_new_tokens": args.max_new_tokens}

    # 1. local: one process, two torch threads
    local = RunDir.for_config(config(root, "local", args, model={"adapter": str(adapter)}))
    res["local_sample"] = timed(run_sample, local)
    res["local_score"] = timed(run_score, local)
    tokens = int(samples(local)["n_tokens"].sum())

    # 2. ray: two actors of one thread each, on a cluster started beforehand
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    res["ray_init_s"] = round(time.perf_counter() - t0, 2)
    rayrun = RunDir.for_config(
        config(root, "ray", args, model={"adapter": str(adapter)}, execution={"backend": "ray"})
    )
    res["ray_sample"] = timed(run_sample, rayrun)
    res["ray_score"] = timed(run_score, rayrun)
    ray.shutdown()
    a, b = samples(rayrun), samples(local)
    same_ids = a["token_ids"].map(list).tolist() == b["token_ids"].map(list).tolist()
    got, want = scores(rayrun)["value"].to_numpy(), scores(local)["value"].to_numpy()
    res["ray_score_max_abs_diff"] = float(np.nanmax(np.abs(got - want)))
    # Ray actors run 1 torch thread, local 2: another reduction order, so the last float bits may differ.
    rel = float(np.nanmax(np.abs(got - want) / np.maximum(1.0, np.abs(want))))
    res["ray_score_max_rel_diff"] = rel
    equal_ray = bool(same_ids and rel <= 1e-6)

    # 3. openai backend against transformers serve, serving the merged checkpoint (2 threads)
    with TransformersServer(merged, threads=2, log=root / "serve.log") as srv:
        common = {"base_url": srv.base_url, "model": srv.model, "max_concurrency": args.concurrency}
        sampled = {**common, "extra_body": {"generation_config": json.dumps({"do_sample": True})}}
        api = RunDir.for_config(
            config(
                root,
                "openai",
                args,
                model={"student": f"hf:{merged}"},
                sample={"backend": "openai", "openai": sampled},
            )
        )
        res["openai_sample"] = timed(run_sample, api)
        api_tokens = int(samples(api)["n_tokens"].sum())
        greedy = {"n": 1, "temperature": 0.0}
        g_api = RunDir.for_config(
            config(
                root,
                "openai-greedy",
                args,
                model={"student": f"hf:{merged}"},
                sample={**greedy, "backend": "openai", "openai": common},
            )
        )
        run_sample(g_api)
    g_local = RunDir.for_config(
        config(root, "local-greedy", args, model={"student": f"hf:{merged}"}, sample=greedy)
    )
    run_sample(g_local)
    ga, gb = samples(g_api), samples(g_local)
    match = [list(x) == list(y) for x, y in zip(ga["token_ids"], gb["token_ids"], strict=True)]
    res["openai_greedy_rows_equal"] = f"{sum(match)}/{len(match)}"
    res["openai_greedy_text_equal"] = f"{int((ga['response'] == gb['response']).sum())}/{len(ga)}"

    tps = {k: tokens / res[f"{k}_sample"]["wall_s"] for k in ("local", "ray")}
    tps["openai"] = api_tokens / res["openai_sample"]["wall_s"]
    rps = {k: len(scores(local)) / res[f"{k}_score"]["wall_s"] for k in ("local", "ray")}
    res["tokens_per_s"] = {k: round(v, 1) for k, v in tps.items()}
    res["score_rows_per_s"] = {k: round(v, 1) for k, v in rps.items()}

    # PROJECTION (not measured): paper-scale evaluation with this model on CPU workers like these, every candidate
    # at the 2,048-token budget, at the measured per-worker Ray sampling throughput (busy time only).
    busy = float(rayrun.stage_entry("sample")["worker_seconds"])
    per_worker = tokens / busy
    total = PAPER["prompts"] * PAPER["candidates"] * PAPER["pairs"] * PAPER["max_new_tokens"]
    res["projection_paper_sample_hours"] = {
        str(w): round(total / (per_worker * w) / 3600, 1) for w in (1, 8, 64)
    }
    res["projection_per_worker_tokens_per_s"] = round(per_worker, 1)
    print(json.dumps(res, indent=2))
    print(
        f"ray/local sample {tps['ray'] / tps['local']:.2f}x, score {rps['ray'] / rps['local']:.2f}x; "
        f"openai/local sample {tps['openai'] / tps['local']:.2f}x"
    )
    summary = {
        "ray_over_local_sample": round(tps["ray"] / tps["local"], 3),
        "ray_over_local_score": round(rps["ray"] / rps["local"], 3),
        "openai_over_local_sample": round(tps["openai"] / tps["local"], 3),
        "equal_ray": equal_ray,
        "equal_openai_token_ids": all(match),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
