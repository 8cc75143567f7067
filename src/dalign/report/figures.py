"""Report figures as PNG files (matplotlib's object API on the Agg canvas: no display, no global pyplot state).

Each function takes numbers already computed by `analysis` and returns the written path, or None when there is
nothing to draw (the report then says why).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dalign.report.inputs import LAYERED

SAFE, UNSAFE = "#2b8cbe", "#e34a33"
DPI = 110


def _new(w: float, h: float, nrows: int = 1, ncols: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    # No "Software" text chunk: the PNG then holds no URL and is byte-stable across matplotlib patch versions.
    fig.savefig(tmp, format="png", metadata={"Software": None})
    tmp.replace(path)
    return path


def _pct(x: float | None) -> float:
    return math.nan if x is None else 100 * x


def rates_figure(block: dict[str, dict], path: Path, kind: str) -> Path | None:
    """Table 1 as bars: the rate of each selector per benchmark with its 95 % CI (oracles hatched)."""
    benches = [b for b in sorted(block) if block[b]["order"]]
    if not benches:
        return None
    n_sel = max(len(block[b]["order"]) for b in benches)
    fig, axes = _new(min(4.2 * len(benches), 16), 1.2 + 0.38 * n_sel, 1, len(benches))
    color = UNSAFE if kind == "safety" else SAFE
    for ax, bench in zip(axes[0], benches, strict=True):
        order = block[bench]["order"][::-1]
        sels = block[bench]["selectors"]
        vals = np.array([_pct(sels[s]["value"]) for s in order])
        lo = np.array([_pct(sels[s]["ci"][0]) for s in order])
        hi = np.array([_pct(sels[s]["ci"][1]) for s in order])
        err = np.vstack([np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)])
        bars = ax.barh(range(len(order)), np.nan_to_num(vals), xerr=err, color=color, alpha=0.8, capsize=3)
        for bar, s in zip(bars, order, strict=True):
            if sels[s]["oracle"]:
                bar.set_hatch("//")
                bar.set_alpha(0.45)
        for i, (v, h) in enumerate(zip(vals, hi, strict=True)):
            end = np.nanmax([v, h, 0.0])
            ax.text(end + 1.5, i, "n/a" if np.isnan(v) else f"{v:.1f}", va="center", fontsize=7)
        ax.axvline(_pct(sels["single"]["value"]), color="k", lw=0.8, ls="--")
        ax.set_yticks(range(len(order)), [s + (" †" if sels[s]["oracle"] else "") for s in order], fontsize=8)
        ax.set_xlabel("ASR (%)" if kind == "safety" else "accuracy (%)")
        ax.set_title(f"{bench} (n={block[bench]['n_prompts']})", fontsize=10)
        ax.set_xlim(0, 100)
    fig.suptitle(
        ("Attack success rate" if kind == "safety" else "Utility accuracy") + " by selector, 95 % CI"
    )
    return _save(fig, path)


def headroom_figure(fig5: dict[str, dict], path: Path) -> Path | None:
    """Figure 5 form: single vs majority-of-N ASR, and how many safe candidates the failing prompts had."""
    benches = [b for b in sorted(fig5) if fig5[b]["n_prompts"]]
    if not benches:
        return None
    fig, axes = _new(11, 3.8, 1, 2)
    ax = axes[0, 0]
    x = np.arange(len(benches))
    single = [_pct(fig5[b]["asr_single"]) for b in benches]
    major = [_pct(fig5[b]["asr_majority"]) for b in benches]
    for shift, vals, label, color in (
        (-0.2, single, "one sample (first candidate)", UNSAFE),
        (0.2, major, "> half of the N samples unsafe", "#fdbb84"),
    ):
        ax.bar(x + shift, vals, 0.4, label=label, color=color)
        for xi, v in zip(x + shift, vals, strict=True):
            ax.text(xi, v + 0.5, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    for i, b in enumerate(benches):
        share = fig5[b]["share_failing_with_safe"]
        if share is not None and math.isfinite(share):
            ax.text(i, max(single[i], major[i]) + 6, f"{100 * share:.0f}% rescuable", ha="center", fontsize=8)
    ax.set_xticks(x, benches, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("ASR: one sample vs majority of samples", fontsize=10)
    ax = axes[0, 1]
    benches = [b for b in benches if fig5[b]["n_failing"]]  # no failing prompt: nothing to rescue
    if not benches:
        ax.text(0.5, 0.5, "no failing prompts", ha="center", transform=ax.transAxes)
        return _save(fig, path)
    width = 0.8 / len(benches)
    n_max = max([int(k) for b in benches for k in fig5[b]["safe_count_hist"]] + [1])
    for i, b in enumerate(benches):
        hist = fig5[b]["safe_count_hist"]
        total = max(sum(hist.values()), 1)
        ks = np.arange(n_max + 1)
        ax.bar(
            ks + (i - (len(benches) - 1) / 2) * width,
            [100 * hist.get(str(k), 0) / total for k in ks],
            width,
            label=b,
        )
    ax.set_xlabel("safe candidates among the N (prompts whose first sample was unsafe)")
    ax.set_ylabel("share of failing prompts (%)")
    ax.set_xticks(np.arange(n_max + 1))
    ax.legend(fontsize=8)
    ax.set_title("Head-room of any selector", fontsize=10)
    return _save(fig, path)


def _kde(x: np.ndarray, grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian kernel density (Scott's rule), on at most 4,000 points to bound the cost."""
    if len(x) > 4000:
        x = rng.choice(x, 4000, replace=False)
    sd = float(np.std(x))
    h = 1.06 * (sd if sd > 0 else max(abs(float(np.mean(x))), 1.0) * 1e-3) * len(x) ** (-0.2)
    z = (grid[:, None] - x[None, :]) / h
    return np.exp(-0.5 * z * z).mean(axis=1) / (h * math.sqrt(2 * math.pi))


def density_figure(values: pd.DataFrame, aurocs: dict[str, dict], keys: list[str], path: Path) -> Path | None:
    """Figure 6 form: density of each metric for safe vs unsafe candidates, AUROC in the title."""
    keys = [k for k in keys if (values["key"] == k).any()]
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = _new(4.2 * ncols, 3.0 * nrows, nrows, ncols)
    rng = np.random.default_rng(0)
    for ax, key in zip(axes.flat, keys, strict=False):
        v = values[values["key"] == key]
        lo, hi = np.quantile(v["value"], [0.005, 0.995])
        pad = (hi - lo) * 0.1 or 1e-3
        grid = np.linspace(lo - pad, hi + pad, 200)
        for label, color in (("safe", SAFE), ("unsafe", UNSAFE)):
            x = v.loc[v["label"] == label, "value"].to_numpy(dtype=float)
            if len(x) >= 2:
                dens = _kde(x, grid, rng)
                ax.plot(grid, dens, color=color, label=f"{label} (n={len(x)})")
                ax.fill_between(grid, dens, color=color, alpha=0.15)
        a = aurocs.get(key, {})
        auc = a.get("auroc")
        sel = "argmin" if a.get("direction") == "min" else "argmax"
        ax.set_title(f"{key} ({sel})  AUROC={auc:.2f}" if auc is not None else key, fontsize=9)
        ax.set_yticks([])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle("Metric densities, safe vs unsafe candidates (AUROC > 0.5: the selector prefers safe)")
    return _save(fig, path)


def auroc_layers_figure(auroc: dict[str, dict[str, dict]], path: Path) -> Path | None:
    """AUROC of latent similarity per layer and benchmark; other metrics as dashed reference lines."""
    series = {
        b: sorted(
            (m["layer"], m["auroc"])
            for m in d.values()
            if m["metric"] == LAYERED and m["layer"] is not None and math.isfinite(m["auroc"])
        )
        for b, d in auroc.items()
    }
    if not any(len(s) > 1 for s in series.values()):
        return None
    fig, axes = _new(7.5, 4)
    ax = axes[0, 0]
    for b, s in series.items():
        if s:
            ax.plot(
                [p[0] for p in s],
                [p[1] for p in s],
                marker="o",
                ms=3,
                label=b,
                lw=2 if b.startswith("(") else 1,
            )
    pooled = auroc.get("(all safety)") or next(iter(auroc.values()))
    styles = iter([(0, (4, 2)), (0, (1, 1)), (0, (4, 1, 1, 1)), (0, (6, 2, 1, 2, 1, 2)), (0, (2, 3))] * 4)
    for key, m in sorted(pooled.items()):
        if m["metric"] != LAYERED and m["auroc"] is not None and math.isfinite(m["auroc"]):
            ax.axhline(m["auroc"], ls=next(styles), lw=1, color="grey", label=f"{key} (no layer)")
    ax.axhline(0.5, color="k", lw=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel("AUROC (safe vs unsafe)")
    ax.legend(fontsize=8)
    ax.set_title("Latent-similarity AUROC by layer", fontsize=10)
    return _save(fig, path)


def ablation_figure(
    ablation: dict[str, dict],
    kinds: dict[str, str],
    single: dict[str, float],
    marks: dict[str, int],
    path: Path,
) -> Path | None:
    """ASR (and utility accuracy) of latent-similarity selection at every scored layer, with 95 % CI bands.

    `single` holds each benchmark's single-sample rate (drawn dashed, the no-selection reference); `marks` names
    layers to flag with a vertical line (default, calibrated).
    """
    used = {b: a for b, a in ablation.items() if a}
    if not used:
        return None
    kinds_used = [k for k in ("safety", "utility") if any(kinds[b] == k for b in used)]
    fig, axes = _new(7.5, 3.4 * len(kinds_used), len(kinds_used), 1)
    for ax, kind in zip(axes[:, 0], kinds_used, strict=True):
        for b, a in sorted(used.items()):
            if kinds[b] != kind:
                continue
            layers = sorted(a, key=int)
            x = [int(layer) for layer in layers]
            y = [_pct(a[layer]["value"]) for layer in layers]
            lo = [_pct(a[layer]["ci"][0]) for layer in layers]
            hi = [_pct(a[layer]["ci"][1]) for layer in layers]
            (line,) = ax.plot(x, y, marker="o", ms=3, label=b)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
            if b in single and single[b] is not None:
                ax.axhline(
                    _pct(single[b]), color=line.get_color(), ls="--", lw=0.8, label=f"{b}: single sample"
                )
        for name, layer in marks.items():
            ax.axvline(layer, color="k", ls=":", lw=0.8)
            ax.annotate(name, (layer, 1), xycoords=("data", "axes fraction"), fontsize=7, ha="left", va="top")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("ASR (%)" if kind == "safety" else "accuracy (%)")
        ax.set_xlabel("layer of latent-similarity selection")
        ax.legend(fontsize=7)
    fig.suptitle("Layer ablation (95 % CI bands; dashed: single sample)")
    return _save(fig, path)


MODEL_ORDER = ["teacher", "base", "aligned", "aligned + guard"]


def models_figure(
    models: dict[str, dict],
    path: Path,
    title: str = "Models compared: single-sample rate and the guard (95 % CI)",
) -> Path | None:
    """The alignment gap: per benchmark, each compared model's rate with its 95 % CI, side by side."""
    benches = sorted(models)
    if not benches:
        return None
    fig, axes = _new(min(3.6 * len(benches), 16), 3.4, 1, len(benches))
    for ax, bench in zip(axes[0], benches, strict=True):
        rows = models[bench]["models"]
        names = [m for m in MODEL_ORDER if m in rows]
        vals = np.array([_pct(rows[m]["value"]) for m in names])
        lo = np.array([_pct(rows[m]["ci"][0]) for m in names])
        hi = np.array([_pct(rows[m]["ci"][1]) for m in names])
        err = np.vstack([np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)])
        color = UNSAFE if models[bench]["kind"] == "safety" else SAFE
        ax.bar(range(len(names)), np.nan_to_num(vals), yerr=err, color=color, alpha=0.8, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
        ax.set_ylabel("ASR (%)" if models[bench]["kind"] == "safety" else "accuracy (%)")
        ax.set_title(bench, fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)


def lengths_figure(samples: pd.DataFrame, path: Path) -> Path | None:
    """Response length (tokens) per benchmark and model, as box plots."""
    if samples is None or "n_tokens" not in samples.columns:
        return None
    model = (
        samples["model"].astype(str)
        if "model" in samples.columns
        else pd.Series("aligned", index=samples.index)
    )
    groups = samples.assign(_m=model).groupby(["benchmark", "_m"])["n_tokens"]
    data = [(f"{b}\n{m}", pd.to_numeric(g, errors="coerce").dropna().to_numpy()) for (b, m), g in groups]
    data = [(k, v) for k, v in data if len(v)]
    if not data:
        return None
    fig, axes = _new(max(5, 1.1 * len(data)), 3.6)
    ax = axes[0, 0]
    ax.boxplot([v for _, v in data], tick_labels=[k for k, _ in data])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("response tokens")
    ax.set_title("Response length by benchmark and model", fontsize=10)
    return _save(fig, path)
