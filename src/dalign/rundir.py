"""Run directories: the resolved config, a manifest per stage, and artifacts written in atomic parquet shards.

A stage appends shards as it goes and, when rerun, skips the keys already present, so a run killed at any point
(even by SIGKILL) resumes with no lost and no duplicated rows: a shard is written to a temporary name and renamed,
and rename is atomic, so a shard is either whole or absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from dalign import __version__
from dalign.config import RunConfig, config_hash, diff_keys, to_yaml

# Artifact name -> key columns that identify one row.
ARTIFACT_KEYS: dict[str, list[str]] = {
    "traces": ["prompt_id"],
    "filtered": ["prompt_id"],
    "samples": ["benchmark", "prompt_id", "candidate"],
    "judgments": ["benchmark", "prompt_id", "candidate", "judge"],
    "scores": ["benchmark", "prompt_id", "candidate", "metric", "layer"],
    "selection": ["benchmark", "selector", "prompt_id"],
}


class StageMismatch(RuntimeError):
    """Artifacts on disk were made under another config."""


class MissingArtifact(FileNotFoundError):
    pass


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ShardStore:
    """A directory of parquet shards, read as one table. Keys identify rows across shards."""

    def __init__(self, path: Path, keys: list[str]):
        self.path = path
        self.keys = keys

    def files(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def read(self) -> pd.DataFrame:
        files = self.files()
        if not files:
            return pd.DataFrame()
        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return df

    def done_keys(self) -> set[tuple]:
        files = self.files()
        if not files:
            return set()
        cols = [pd.read_parquet(f, columns=self.keys) for f in files]
        df = pd.concat(cols, ignore_index=True)
        return set(df.itertuples(index=False, name=None))

    def write(self, rows: list[dict] | pd.DataFrame) -> int:
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
        if df.empty:
            return 0
        missing = [k for k in self.keys if k not in df.columns]
        if missing:
            raise ValueError(f"shard for {self.path.name} lacks key columns {missing}")
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.path / f".{name}.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.path / name)
        return len(df)

    def replace(self, rows: list[dict] | pd.DataFrame) -> int:
        """Write the whole table as one shard, then drop the old shards (for small derived tables)."""
        old = self.files()
        n = self.write(rows)
        for f in old:
            f.unlink()
        return n

    def clear(self) -> None:
        for f in self.files():
            f.unlink()


class RunDir:
    """One run: `config.yaml`, `manifest.json` and the artifacts of DESIGN.md §1."""

    def __init__(self, path: str | Path, config: RunConfig | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = config if config is not None else self._load_config()
        self._lock = FileLock(str(self.path / ".lock"))

    @classmethod
    def for_config(cls, cfg: RunConfig) -> RunDir:
        run = cls(cfg.run_dir, cfg)
        _atomic_write_text(run.path / "config.yaml", to_yaml(cfg))
        return run

    def _load_config(self) -> RunConfig:
        from dalign.config import load_config

        cfg_file = self.path / "config.yaml"
        return load_config(cfg_file if cfg_file.exists() else None)

    # ---- artifacts -------------------------------------------------------------------------------------------
    def store(self, name: str) -> ShardStore:
        return ShardStore(self.path / f"{name}.parquet", ARTIFACT_KEYS[name])

    def has(self, name: str) -> bool:
        return bool(self.store(name).files())

    def read(self, name: str) -> pd.DataFrame:
        store = self.store(name)
        if not store.files():
            raise MissingArtifact(
                f"{store.path} is missing or empty: run the stage that makes {name!r} first "
                f"(see `dalign run --dry-run`)"
            )
        return store.read()

    # ---- manifest --------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def _update(self, stage: str, **fields: Any) -> None:
        with self._lock:
            m = self.manifest()
            entry = m["stages"].setdefault(stage, {})
            entry.update(fields)
            m["dalign_version"] = __version__
            _atomic_write_text(self.manifest_path, json.dumps(m, indent=2, sort_keys=True, default=str))

    def stage_entry(self, stage: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(stage, {})

    def begin(
        self, stage: str, fingerprint: dict[str, Any], outputs: Iterable[str], force: bool = False
    ) -> None:
        """Check that existing outputs were made under this fingerprint, then mark the stage running.

        `fingerprint` is the config that determines the stage's outputs (a nested dict). With `force`, outputs
        made under another config are deleted instead of refused.
        """
        entry = self.stage_entry(stage)
        old = entry.get("fingerprint")
        outputs = list(outputs)
        existing = [o for o in outputs if (self.path / f"{o}.parquet").exists() or (self.path / o).exists()]
        if old is not None and config_hash(old) != config_hash(fingerprint) and existing:
            keys = diff_keys(old, fingerprint)
            if not force:
                raise StageMismatch(
                    f"{self.path}: the {stage!r} artifacts {existing} were made under another config; "
                    f"differing keys: {', '.join(keys)}. Use a new run name, or --force to delete and redo them."
                )
            self.clear(outputs)
        self._update(
            stage,
            status="running",
            fingerprint=fingerprint,
            config_hash=config_hash(fingerprint),
            started=_now(),
            versions=_versions(),
        )

    def finish(self, stage: str, **fields: Any) -> None:
        self._update(stage, status="done", finished=_now(), **fields)

    def clear(self, outputs: Iterable[str]) -> None:
        import shutil

        for o in outputs:
            for p in (self.path / f"{o}.parquet", self.path / o):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()


def fingerprint(cfg: RunConfig, sections: dict[str, list[str] | None]) -> dict[str, Any]:
    """The parts of the config a stage depends on: {section: None (all fields) or [fields to drop]}."""
    dump = cfg.model_dump(mode="json")
    out = {}
    for section, drop in sections.items():
        part = dump[section]
        if isinstance(part, dict) and drop:
            part = {k: v for k, v in part.items() if k not in drop}
        out[section] = part
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("dalign", "torch", "transformers", "peft", "trl"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def adapter_dir(run: RunDir) -> Path | None:
    """The aligned model's adapter: model.adapter if set, else the run's GRPO adapter, else its SFT adapter."""
    if run.config.model.adapter:
        return Path(run.config.model.adapter)
    for name in ("adapter-grpo", "adapter"):
        p = run.path / name
        if (p / "adapter_config.json").exists():
            return p
    return None


def adapter_fingerprint(path: Path | None) -> str | None:
    """Content hash of an adapter's weights, so stages downstream of training notice a retrained adapter."""
    if path is None:
        return None
    import hashlib

    h = hashlib.sha256()
    for f in sorted(path.glob("adapter_model.*")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
