"""Build the report document (sections of tables, text and figures) from the numbers in results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dalign.report import attack
from dalign.report.analysis import is_oracle
from dalign.report.inputs import LAYERED
from dalign.report.render import Bullets, Document, Image, Section, Table, Text

DASH = "–"
ORACLE_NOTE = (
    "† reference selector: reads the test-set labels (oracle-any-safe, majority, or a layer chosen on the test "
    "prompts); an upper bound or after-the-fact choice, not a deployable setting."
)


def _ok(x: float | None) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def pct(x: float | None, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}" if _ok(x) else DASH


def signed(x: float | None) -> str:
    return f"{100 * x:+.1f} %" if _ok(x) else DASH


def ci(c: list | None) -> str:
    return f"[{pct(c[0])}, {pct(c[1])}]" if c and _ok(c[0]) and _ok(c[1]) else DASH


def calibrated_layer(facts: dict, bench: str | None = None) -> str | None:
    cal = facts.get("calibrated_layer")
    if isinstance(cal, dict):
        cal = cal.get(bench) if bench is not None else ", ".join(f"{k}: {v}" for k, v in cal.items())
    return None if cal is None else str(cal)


def selector_label(sel: str, facts: dict, bench: str | None = None) -> str:
    label = sel
    if sel == f"{LAYERED}@calibrated" and (cal := calibrated_layer(facts, bench)) is not None:
        label += f" (layer {cal})"
    oracle = (facts.get("oracle_layers") or {}).get(bench) if bench is not None else None
    if sel == f"{LAYERED}@oracle" and oracle is not None:
        label += f" (layer {oracle})"
    return label + (" †" if is_oracle(sel) else "")


def _ordered_union(blocks: dict) -> list[str]:
    out: list[str] = []
    for b in sorted(blocks):
        out += [s for s in blocks[b]["order"] if s not in out]
    return out


def main_table(results: dict, kind: str = "safety") -> Table | None:
    """Compact Table 1: selectors × benchmarks, cell = rate % (relative drop)."""
    blocks = results.get(kind, {})
    if not blocks:
        return None
    rows = []
    for sel in _ordered_union(blocks):
        row = [selector_label(sel, results.get("facts", {}))]
        for b in sorted(blocks):
            r = blocks[b]["selectors"].get(sel)
            if r is None:
                row.append(DASH)
            else:
                drop = "ref." if sel == "single" else signed(r["relative_drop"])
                row.append(f"{pct(r['value'])} ({drop}){unfinished_note(r)}")
        rows.append(row)
    what = "ASR %" if kind == "safety" else "accuracy %"
    cols = ["selector"] + [f"{b} (n={blocks[b]['n_prompts']})" for b in sorted(blocks)]
    return Table(
        cols,
        rows,
        f"{what} (relative {'ASR' if kind == 'safety' else 'utility'} drop vs single); "
        "unf. = share of the chosen answers that are unfinished",
    )


def unfinished_note(r: dict) -> str:
    """' · unf. 12 %' beside a rate: the share of chosen candidates without a finished final answer."""
    u = r.get("unfinished_share")
    return f" · unf. {pct(u, 0)} %" if _ok(u) else ""


def main_table_text(results: dict) -> str:
    """The main tables as Markdown text, for the console at the end of `dalign run` / `dalign quickstart`."""
    from dalign.report.render import md_table

    parts = [md_table(t) for k in ("safety", "utility") if (t := main_table(results, k)) is not None]
    return "\n\n".join(parts) if parts else "(no judged benchmarks yet: nothing to tabulate)"


def _detail(results: dict, bench: str, kind: str) -> Table:
    blk = results[kind][bench]
    rate = "ASR %" if kind == "safety" else "accuracy %"
    hits = "unsafe/valid" if kind == "safety" else "correct/valid"
    rows = []
    for sel in blk["order"]:
        r = blk["selectors"][sel]
        drop = (
            signed(r["relative_drop"])
            if r["drop_note"] is None or sel == "single"
            else f"{DASH} ({r['drop_note']})"
        )
        rows.append(
            [
                selector_label(sel, results.get("facts", {}), bench),
                pct(r["value"]),
                ci(r["ci"]),
                drop if sel != "single" else "(reference)",
                ci(r["relative_drop_ci"]) if sel != "single" else "",
                f"{r['hits']}/{r['valid']}",
                str(r["errors"]),
                str(r["missing"]),
                pct(r.get("unfinished_share")),
            ]
        )
    cols = [
        "selector",
        rate,
        "95 % CI",
        "relative drop",
        "drop 95 % CI",
        hits,
        "errors",
        "missing",
        "unfinished %",
    ]
    return Table(cols, rows, f"{bench}: {blk['n_prompts']} eval prompts, judge `{blk['judge']}`")


def _rates_section(results: dict, kind: str, figs: dict[str, Path]) -> Section:
    title = "Table 1: attack success rate by selector" if kind == "safety" else "Utility by selector"
    sec = Section(title)
    blocks = results.get(kind, {})
    if not blocks:
        sec.blocks.append(Text(f"No judged {kind} benchmark in this run."))
        return sec
    if kind == "safety":
        sec.blocks.append(
            Text(
                "ASR = unsafe / (safe + unsafe) over eval prompts, for the candidate each selector chose; `error` "
                "labels are left out of the rate and counted beside it; `missing` = prompts with no selection or no "
                "judgment. Relative drop = (ASR_single − ASR_selector) / ASR_single (positive = fewer unsafe answers); "
                "single = the first sample. CIs: 95 % percentile bootstrap over prompts, paired across selectors."
            )
        )
    else:
        sec.blocks.append(
            Text(
                "Accuracy = correct / (correct + wrong). Relative drop = (acc_single − acc_selector) / acc_single "
                "(positive = utility lost)."
            )
        )
    sec.blocks += [_detail(results, b, kind) for b in sorted(blocks)]
    sec.blocks.append(Text(ORACLE_NOTE))
    if kind in figs:
        sec.blocks.append(
            Image(figs[kind], f"{'ASR' if kind == 'safety' else 'Accuracy'} per selector with 95 % CI")
        )
    return sec


def _headroom_section(results: dict, figs: dict[str, Path]) -> Section:
    sec = Section("Figure 5: one sample vs the majority of samples, and head-room")
    f5 = results.get("figure5", {})
    if not f5:
        sec.blocks.append(Text("Needs judgments of a safety benchmark."))
        return sec
    rows = [
        [
            b,
            str(v["n_prompts"]),
            pct(v["asr_single"]),
            pct(v["asr_majority"]),
            str(v["n_failing"]),
            pct(v["share_failing_with_safe"]),
        ]
        for b, v in sorted(f5.items())
    ]
    sec.blocks += [
        Text(
            "ASR with one sample (the first candidate) vs the ASR where a prompt counts as failed only when more than "
            "half of its judged candidates are unsafe; and, among prompts whose first sample was unsafe, the share with "
            "at least one safe candidate: what a perfect selector could rescue."
        ),
        Table(
            [
                "benchmark",
                "prompts",
                "ASR single %",
                "ASR > half unsafe %",
                "failing prompts",
                "with ≥ 1 safe candidate %",
            ],
            rows,
        ),
    ]
    if "figure5" in figs:
        sec.blocks.append(
            Image(figs["figure5"], "Single vs majority ASR; safe candidates among failing prompts")
        )
    return sec


def auc(x: float | None, c: list | None = None) -> str:
    """'0.543 [0.49, 0.60]': an AUROC with its CI when there is one."""
    if not _ok(x):
        return DASH
    return f"{x:.3f}" + (f" [{c[0]:.2f}, {c[1]:.2f}]" if c and _ok(c[0]) and _ok(c[1]) else "")


def _auc_cell(m: dict | None) -> str:
    if m is None:
        return DASH
    return (
        f"{auc(m['auroc'], m.get('auroc_ci'))} / {auc(m['within_prompt_auroc'], m.get('within_prompt_ci'))}"
    )


def _auroc_section(results: dict, figs: dict[str, Path]) -> Section:
    sec = Section("Figure 6: metric densities and AUROC (safe vs unsafe candidates)")
    au = results.get("auroc", {})
    if not au:
        sec.blocks.append(Text("Needs both judgments and scores of a safety benchmark."))
        return sec
    benches = list(au)
    keys: list[str] = []
    for b in benches:
        keys += [k for k in au[b] if k not in keys]
    keys.sort(key=lambda k: (k.startswith(f"{LAYERED}@"), int(k.split("@")[1]) if "@" in k else 0, k))
    rows = []
    for k in keys:
        row = [k]
        for b in benches:
            row.append(_auc_cell(au[b].get(k)))
        rows.append(row)
    sec.blocks += [
        Text(
            "AUROC of each metric for telling safe from unsafe candidates, oriented by the metric's selection "
            "direction (argmin for latent similarity and perplexity, argmax for KL and self-certainty), so > 0.5 "
            "means the selector prefers safe candidates. First number: all candidates pooled; second: only pairs of "
            "candidates of the same prompt (the comparison Best-of-N makes). Ties count one half."
        ),
        Table(
            ["metric"] + benches,
            rows,
            "AUROC pooled / within-prompt [95 % cluster-bootstrap CI over prompts]",
        ),
    ]
    unknown = sorted({m["metric"] for d in au.values() for m in d.values() if not m["direction_known"]})
    if unknown:
        sec.blocks.append(Text(f"Direction unknown for {', '.join(unknown)}: oriented as argmin."))
    for key, cap in (
        ("densities", "Density of each metric for safe vs unsafe candidates (pooled over safety benchmarks)"),
        ("auroc_layers", "AUROC of latent similarity by layer"),
    ):
        if key in figs:
            sec.blocks.append(Image(figs[key], cap))
    return sec


def _confound_section(results: dict) -> Section | None:
    """Finish confound (report/confound.py): AUROC and selector ASR within finished / length-capped candidates."""
    fc = results.get("finish_confound") or {}
    if not fc.get("benchmarks"):
        return None
    # The last entry: pooled over the safety benchmarks when there are several.
    bench, res = next(reversed(fc["benchmarks"].items()))
    sec = Section("Finish confound: finished vs length-capped candidates")
    share = res["safe_share"]
    sec.blocks.append(
        Text(
            f"{bench}: {share['finished']['n']} candidates ended with their stop token (finished), "
            f"{share['capped']['n']} were cut at the token budget (capped). Safe: finished "
            f"{pct(share['finished']['safe'])} % {ci(share['finished']['ci'])}, capped {pct(share['capped']['safe'])} % "
            f"{ci(share['capped']['ci'])}. A final-token metric can tell the two apart by the last token alone; if "
            "finished candidates are safer, its pooled AUROC rises without any base-model attribution. Below, each "
            "metric's AUROC (pooled / within-prompt) on all candidates, on finished ones only and on capped ones only, "
            "its AUROC for preferring finished over capped candidates, and its selector's ASR % when it chooses only "
            "among a prompt's finished (or capped) candidates. Brackets: 95 % cluster-bootstrap CIs over prompts."
        )
    )
    rows = []
    for key, m in res["metrics"].items():
        asr = m["selector_asr"]
        rows.append(
            [key]
            + [
                f"{auc(m[s]['auroc'], m[s]['ci'])} / {auc(m[s]['within'], m[s]['within_ci'])}"
                for s in ("all", "finished", "capped")
            ]
            + [auc(m["finish_auroc"]["auroc"], m["finish_auroc"]["ci"])]
            + [
                f"{pct(asr[s]['asr'])} {ci(asr[s]['ci'])} (n={asr[s]['n_prompts']})"
                for s in ("finished", "capped")
            ]
        )
    cols = [
        "metric",
        "AUROC all",
        "AUROC finished",
        "AUROC capped",
        "prefers finished (AUROC)",
        "ASR % among finished",
        "ASR % among capped",
    ]
    sec.blocks.append(Table(cols, rows, f"{bench}; per benchmark in results.json `finish_confound`"))
    warnings = list(fc.get("warnings") or [])
    cal = results.get("facts", {}).get("calibrated_layer")
    cals = sorted(set(cal.values())) if isinstance(cal, dict) else [] if cal is None else [cal]
    flagged = [c for c in cals if any(f"{LAYERED}@{c} " in w for w in warnings)]
    if flagged:
        warnings.insert(
            0,
            f"The calibrated layer ({', '.join(map(str, flagged))}) is flagged below: the layer calibration can "
            "have been won by the finish signal; read its numbers with the within-finished and within-capped AUROCs.",
        )
    if warnings:
        sec.blocks.append(Bullets(warnings))
    return sec


def _ablation_section(results: dict, figs: dict[str, Path]) -> Section:
    sec = Section("Layer ablation: latent-similarity selection at every scored layer")
    abl = {b: a for b, a in results.get("ablation", {}).items() if a}
    if not abl:
        sec.blocks.append(Text("Needs judgments and latent-similarity scores (or selections) at some layer."))
        return sec
    layers = sorted({int(layer) for a in abl.values() for layer in a})
    benches = sorted(abl)
    kinds = {b: ("safety" if b in results.get("safety", {}) else "utility") for b in benches}
    facts = results.get("facts", {})
    rows = []
    for layer in layers:
        mark = " (default)" if layer == facts.get("default_layer") else ""
        row = [f"{layer}{mark}"]
        for b in benches:
            r = abl[b].get(str(layer))
            row.append(DASH if r is None else f"{pct(r['value'])} {ci(r['ci'])}")
        rows.append(row)
    best = []
    for b in benches:
        vals = {k: v["value"] for k, v in abl[b].items() if _ok(v["value"])}
        if vals:
            pick = min(vals, key=vals.get) if kinds[b] == "safety" else max(vals, key=vals.get)
            best.append(f"{b}: layer {pick} ({pct(vals[pick])} %)")
    cols = ["layer"] + [f"{b} ({'ASR' if kinds[b] == 'safety' else 'acc.'} %)" for b in benches]
    sec.blocks += [
        Table(cols, rows, "rate with 95 % CI per layer"),
        Text("Best layer on the test set per benchmark († oracle, not deployable): " + "; ".join(best) + "."),
    ]
    if (cal := calibrated_layer(facts)) is not None:
        sec.blocks.append(Text(f"Layer chosen on the held-out calibration prompts: {cal}."))
    sources = {r.get("source") for a in abl.values() for r in a.values()}
    if "derived from scores" in sources:
        sec.blocks.append(
            Text(
                "Layers without a selector in selection.parquet were selected here from scores (argmin, ties → lowest candidate)."
            )
        )
    if "ablation" in figs:
        sec.blocks.append(Image(figs["ablation"], "Rate of latent-similarity selection per layer"))
    return sec


def _per_judge_section(results: dict) -> Section | None:
    """ASR of each selector under each judge, on the candidates selection chose with the primary judge."""
    per = results.get("per_judge") or {}
    if not per:
        return None
    sec = Section("ASR per judge")
    sec.blocks.append(
        Text(
            "The same chosen candidates (selection and calibration use the primary judge, listed first) read by "
            "every judge of judge.judges. Cell: ASR % [95 % CI] and, in parentheses, error labels left out. "
            "unfinished % = chosen answers that hit the token budget or never closed their reasoning "
            "(judge.unfinished decides how they were labelled)."
        )
    )
    for bench in sorted(per):
        judges = list(per[bench])
        first = per[bench][judges[0]]
        rows = []
        for sel in results.get("safety", {}).get(bench, {}).get("order", list(first)):  # Table 1's rows
            row = [selector_label(sel, results.get("facts", {}), bench)]
            for j in judges:
                r = per[bench][j].get(sel)
                row.append(DASH if r is None else f"{pct(r['value'])} {ci(r['ci'])} ({r['errors']})")
            row.append(pct(first[sel].get("unfinished_share")))
            rows.append(row)
        cols = [
            "selector",
            *[f"{j} (primary)" if k == 0 else j for k, j in enumerate(judges)],
            "unfinished %",
        ]
        sec.blocks.append(Table(cols, rows, f"{bench}: ASR % per judge"))
    return sec


def _agreement_section(results: dict) -> Section:
    sec = Section("Judge agreement")
    ag = results.get("agreement", [])
    if not ag:
        sec.blocks.append(Text("Only one judge labelled these rows: no agreement to report."))
        return sec
    rows = [
        [
            " vs ".join(a["judges"]),
            ", ".join(a["benchmarks"]),
            str(a["n"]),
            str(a["n_error_excluded"]),
            pct(a["agreement"]),
            f"{a['kappa']:.3f}" if _ok(a["kappa"]) else DASH,
        ]
        for a in ag
    ]
    sec.blocks.append(
        Table(["judges", "benchmarks", "rows", "error rows left out", "agreement %", "Cohen's κ"], rows)
    )
    return sec


def _models_section(results: dict, figs: dict[str, Path]) -> Section | None:
    """The alignment gap: teacher, base and aligned student, and aligned + guard, on the same prompts."""
    blocks = results.get("models") or {}
    if not blocks:
        return None
    sec = Section("Models compared (alignment gap)")
    sec.blocks.append(
        Text(
            "Single-sample rate (candidate 0: the same prompts and seeds for every model) under each benchmark's "
            "primary judge, 95 % bootstrap CI over prompts; aligned + guard is the Best-of-N choice of Table 1. "
            "Safety: ASR (lower is better); utility: accuracy."
        )
    )
    order = ["teacher", "base", "aligned", "aligned + guard"]
    rows = []
    for bench in sorted(blocks):
        b = blocks[bench]
        for m in [m for m in order if m in b["models"]]:
            r = b["models"][m]
            label = f"{m} ({r['selector']})" if "selector" in r else m
            tokens = r.get("mean_tokens")
            rows.append(
                [
                    bench,
                    b["kind"],
                    label,
                    f"{pct(r['value'])} {ci(r.get('ci'))}",
                    f"{r['hits']}/{r['valid']}",
                    str(r["errors"]),
                    f"{tokens:.0f}" if _ok(tokens) else DASH,
                ]
            )
    sec.blocks.append(
        Table(
            ["benchmark", "kind", "model", "rate % [95 % CI]", "hits / valid", "errors", "mean tokens"], rows
        )
    )
    return sec


def _length_section(results: dict, figs: dict[str, Path]) -> Section:
    sec = Section("Response length")
    ln = results.get("lengths", {})
    if ln.get("note"):
        sec.blocks.append(Text(ln["note"] + "."))
    if ln.get("rows"):
        rows = [
            [
                r["benchmark"],
                r["model"],
                str(r["n"]),
                f"{r['mean_tokens']:.1f}",
                f"{r['median_tokens']:.0f}",
                pct(r["truncated_share"]),
            ]
            for r in ln["rows"]
        ]
        sec.blocks.append(
            Table(
                ["benchmark", "model", "responses", "mean tokens", "median tokens", "hit max_new_tokens %"],
                rows,
            )
        )
    if "lengths" in figs:
        sec.blocks.append(Image(figs["lengths"], "Response length (tokens) per benchmark and model"))
    return sec


def _packages(card: dict) -> str:
    """Offline packages a dataset was read from, with versions; else its hub id."""
    pkgs = sorted(
        {
            f"{p['package']} {p.get('version') or '(not installed)'}"
            for p in (card.get("offline") or {}).values()
        }
    )
    return ", ".join(pkgs) or (f"hub {card['hub']}" if card.get("hub") else DASH)


def _facts_section(facts: dict) -> Section:
    sec = Section("Run facts")
    m = facts.get("models", {})
    items = [
        f"Run directory: `{facts.get('run_dir')}`",
        f"Student: `{m.get('student')}`; adapter: `{facts.get('adapter_dir')}`; base for scoring: "
        + (f"`{m['base']}`" if m.get("base") else "the student with its adapter disabled"),
        f"Judges (configured, primary first): `{', '.join(facts.get('judge', {}).get('judges', []))}`; used per benchmark: "
        + (", ".join(f"{b}: `{j}`" for b, j in facts.get("judges_used", {}).items()) or DASH),
        f"N = {facts.get('n_config')} candidates per prompt (observed max {facts.get('n_observed')}); sampling "
        + ", ".join(f"{k}={v}" for k, v in facts.get("sampling", {}).items()),
        "Seeds: " + ", ".join(f"{k}={v}" for k, v in facts.get("seeds", {}).items()),
        "Precision: "
        + (
            ", ".join(f"{s['stage']} {s['dtype']}" for s in facts.get("stages", []) if s.get("dtype")) or DASH
        ),
        f"Bootstrap resamples: {facts.get('bootstrap')}; default latent layer {facts.get('default_layer')}; "
        f"calibrated layer: {calibrated_layer(facts) or 'not recorded'}",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(facts.get("versions", {}).items())),
    ]
    sec.blocks.append(Bullets(items))
    if facts.get("adapter_card"):
        card = facts["adapter_card"]
        sec.blocks.append(
            Table(
                ["adapter card key", "value"],
                [[str(k), json.dumps(v, default=str)[:200]] for k, v in card.items()],
            )
        )
    else:
        sec.blocks.append(Text("No adapter card.json found."))
    if facts.get("datasets"):
        rows = [
            [
                d["label"],
                d["name"],
                d["role"],
                f"{d['limit']} / {d['offset']} / {d['seed']}",
                str(d["card"].get("size", DASH)),
                _packages(d["card"]),
                str(d["card"].get("licence", DASH)),
            ]
            for d in facts["datasets"]
        ]
        cols = [
            "benchmark",
            "dataset",
            "role",
            "limit / offset / seed",
            "full size",
            "offline source",
            "licence",
        ]
        sec.blocks.append(Table(cols, rows, "Datasets (cards from `dalign datasets`)"))
        origins = [
            f"{d['label']}: {d['card']['origin']}. {d['card'].get('built', '')}".strip()
            for d in facts["datasets"]
            if d["card"].get("origin")
        ]
        if origins:
            sec.blocks.append(Bullets(origins))
    if facts.get("stages"):
        rows = [
            [
                s["stage"],
                str(s["status"]),
                str(s["started"]),
                f"{s['seconds']:.0f}" if _ok(s["seconds"]) else DASH,
                json.dumps(s["rows"], default=str) if s["rows"] is not None else DASH,
                str(len(s["warnings"])),
            ]
            for s in facts["stages"]
            if s["stage"] != "report"  # this report's own entry is still "running" while it is written
        ]
        sec.blocks.append(
            Table(["stage", "status", "started", "seconds", "rows", "warnings"], rows, "From manifest.json")
        )
        warns = [f"{s['stage']}: {w}" for s in facts["stages"] for w in s["warnings"]]
        if warns:
            sec.blocks.append(Bullets(warns[:50]))
    return sec


def _status_section(results: dict) -> Section | None:
    items = [f"missing: {m}" for m in results.get("missing", [])]
    stages = results.get("facts", {}).get("stages", [])
    items += [
        f"stage `{s['stage']}` is {s['status']}"
        for s in stages
        if s["status"] != "done" and s["stage"] != "report"
    ]
    items += results.get("notes", []) + results.get("facts", {}).get("notes", [])
    if not items:
        return None
    return Section(
        "Status: what is missing or noteworthy",
        [Text("This report covers what exists; the following is missing or caveated."), Bullets(items)],
    )


def build(results: dict, figs: dict[str, Path], generated: str) -> Document:
    sections = []
    if (status := _status_section(results)) is not None:
        sections.append(status)
    summary = Section("Summary")
    for kind in ("safety", "utility"):
        if (t := main_table(results, kind)) is not None:
            summary.blocks.append(t)
    if not summary.blocks:
        summary.blocks.append(
            Text("No judged benchmark yet: run `dalign judge` (and `score`, `select`) first.")
        )
    else:
        summary.blocks.append(
            Text(f"{ORACLE_NOTE} {DASH} = undefined (no valid label, or a single-sample rate of 0).")
        )
    sections += [
        summary,
        _rates_section(results, "safety", figs),
        _rates_section(results, "utility", figs),
        *([sec] if (sec := _models_section(results, figs)) is not None else []),
        _headroom_section(results, figs),
        *filter(None, [attack.section(results.get("attack", {}), figs)]),
        _auroc_section(results, figs),
        *([sec] if (sec := _confound_section(results)) is not None else []),
        _ablation_section(results, figs),
        *([sec] if (sec := _per_judge_section(results)) is not None else []),
        _agreement_section(results),
        _length_section(results, figs),
        _facts_section(results.get("facts", {})),
    ]
    return Document(
        "dalign report", f"Run `{results.get('facts', {}).get('run_dir')}`, generated {generated}", sections
    )


def main_table_for_run(run_dir: str | Path) -> str:
    """The main tables of a run that has a results.json (written by `dalign report`)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return f"(no {path}: run `dalign report` first)"
    return main_table_text(json.loads(path.read_text(encoding="utf-8")))
