"""Run directories: the config, a manifest of stage progress, and artifacts that carry their own identity.

Every artifact records, *itself*, the identity it was made under (the stage key and the dependencies behind it) and
a content hash its consumers build their own identity from (pipeline.py declares who depends on what):

- tables (`<name>.parquet/`): parquet shards plus `_index.json`, the commit record listing the shards that belong
  to the table. A shard is written to a temporary name, fsynced and renamed; it becomes part of the table only when
  the index naming it is fsynced and renamed into place. So a run killed at any point (even by SIGKILL) leaves a
  table that is exactly its last commit; stray shards are never read and are swept at the next `begin`.
- adapter dirs (`adapter/`, `adapter-grpo/`): built in a temporary dir and renamed (train/common.atomic_dir);
  their card.json holds the identity (`fingerprint`, `fingerprint_hash`).
- the report: results.json holds the identity and is written after the other report files.

`manifest.json` only says how each stage went (status, times, counts, warnings); deleting it loses no check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
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
    "samples-base": ["benchmark", "prompt_id", "candidate"],
    "samples-teacher": ["benchmark", "prompt_id", "candidate"],
    "judgments": ["benchmark", "prompt_id", "candidate", "judge"],
    "judgments-models": ["model", "benchmark", "prompt_id", "candidate", "judge"],
    "scores": ["benchmark", "prompt_id", "candidate", "metric", "layer"],
    "selection": ["benchmark", "selector", "prompt_id"],
    "attacks": ["behaviour", "target", "stream", "iteration"],
}
ADAPTERS = ("adapter", "adapter-grpo")
INDEX = "_index.json"


class StageMismatch(RuntimeError):
    """Artifacts on disk were made under another config."""


class MissingArtifact(FileNotFoundError):
    pass


class ArtifactError(RuntimeError):
    """An artifact on disk cannot be read (a truncated shard, a damaged index)."""


class RunNotFound(FileNotFoundError):
    pass


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory: whole or absent."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class ShardStore:
    """A table of parquet shards committed through `_index.json`. Keys identify rows across shards."""

    def __init__(self, path: Path, keys: list[str], identity: dict | None = None):
        self.path = path
        self.keys = keys
        self.identity = identity  # {"key", "deps"} of the stage writing it now (set by RunDir.begin)

    # ---- the commit record ---------------------------------------------------------------------------------
    def index(self) -> dict[str, Any]:
        p = self.path / INDEX
        if not p.is_file():
            return {"shards": []}
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(
                f"{p} is damaged ({e}); delete {self.path} and rerun the stage that makes it"
            ) from None

    def _commit(self, shards: list[dict], complete: bool = False) -> None:
        idx = {
            "shards": shards,
            "complete": complete,
            "content": _sha(json.dumps(sorted(s["sha"] for s in shards)).encode()),
        }
        old = self.index()
        ident = self.identity or {k: old[k] for k in ("key", "deps", "config") if k in old}
        idx.update(ident)
        atomic_write_text(self.path / INDEX, json.dumps(idx, indent=1, sort_keys=True, default=str))

    def record(self) -> dict | None:
        """What the table was made under: {key, deps, complete, content}, or None when nothing is committed."""
        idx = self.index()
        return idx if idx["shards"] or "key" in idx else None

    def content(self) -> str | None:
        idx = self.index()
        return idx.get("content") if idx["shards"] else None

    def begin(self) -> None:
        with self._lock():
            self._commit(self.index()["shards"])

    def mark_complete(self) -> None:
        with self._lock():
            self._commit(self.index()["shards"], complete=True)

    def _lock(self) -> FileLock:
        self.path.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path / ".lock"))

    # ---- reading ---------------------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        return [self.path / s["name"] for s in self.index()["shards"]]

    def _read(self, f: Path, columns: list[str] | None = None) -> pd.DataFrame:
        try:
            return pd.read_parquet(f, columns=columns)
        except Exception as e:  # pyarrow raises several types for a truncated or foreign file
            raise ArtifactError(
                f"{f} cannot be read ({type(e).__name__}: {e}). The file is damaged (it is not one dalign "
                f"committed, or the disk lost it): delete {self.path} and rerun the stage, or rerun it with --force"
            ) from None

    def read(self) -> pd.DataFrame:
        files = self.files()
        if not files:
            return pd.DataFrame()
        return pd.concat([self._read(f) for f in files], ignore_index=True)

    def done_keys(self) -> set[tuple]:
        files = self.files()
        if not files:
            return set()
        df = pd.concat([self._read(f, self.keys) for f in files], ignore_index=True)
        return set(df.itertuples(index=False, name=None))

    # ---- writing ---------------------------------------------------------------------------------------------
    def _shard(self, rows: list[dict] | pd.DataFrame) -> dict | None:
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
        if df.empty:
            return None
        missing = [k for k in self.keys if k not in df.columns]
        if missing:
            raise ValueError(f"shard for {self.path.name} lacks key columns {missing}")
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        buf = df.to_parquet(index=False)
        atomic_write_bytes(self.path / name, buf)
        return {"name": name, "rows": len(df), "sha": _sha(buf)}

    def write(self, rows: list[dict] | pd.DataFrame) -> int:
        """Append one shard and commit it; returns the rows written."""
        shard = self._shard(rows)
        if shard is None:
            return 0
        with self._lock():
            self._commit([*self.index()["shards"], shard])
        return shard["rows"]

    def replace(self, rows: list[dict] | pd.DataFrame) -> int:
        """Make `rows` the whole table in one commit (the old shards stop counting at the same instant)."""
        shard = self._shard(rows)
        with self._lock():
            old = self.files()
            self._commit([shard] if shard else [])
        for f in old:
            f.unlink(missing_ok=True)
        return shard["rows"] if shard else 0

    def sweep(self) -> int:
        """Delete shards and temporary files no commit lists (left by a killed run); returns how many."""
        if not self.path.is_dir():
            return 0
        keep = {p.name for p in self.files()} | {INDEX, ".lock"}
        gone = 0
        for p in self.path.iterdir():
            if p.name not in keep and p.is_file():
                p.unlink(missing_ok=True)
                gone += 1
        return gone

    def clear(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)


@cache
def _dir_hash(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.name.startswith("adapter_") and f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@cache
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):  # streamed: GGUF files are hundreds of MB
            h.update(block)
    return h.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """Content hash of a file, cached per path, size and mtime (hashed again when one of them changes)."""
    path = Path(path).resolve()
    st = path.stat()
    return _file_hash(str(path), st.st_size, st.st_mtime_ns)


def dir_hash(path: Path | None) -> str | None:
    """Content hash of an adapter dir (its adapter_* files), cached per file sizes and mtimes."""
    if path is None or not Path(path).is_dir():
        return None
    files = sorted(f for f in Path(path).iterdir() if f.name.startswith("adapter_") and f.is_file())
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _dir_hash(str(Path(path).resolve()), stamp)


class DirArtifact:
    """An adapter dir, renamed into place whole; card.json holds the identity it was trained under."""

    def __init__(self, path: Path):
        self.path = path

    def record(self) -> dict | None:
        card = self.path / "card.json"
        if not card.is_file():
            return {"key": None, "deps": {}, "complete": False} if self.path.exists() else None
        try:
            c = json.loads(card.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {"key": None, "deps": {}, "complete": False}
        done = (self.path / "adapter_config.json").is_file()
        return {"key": c.get("fingerprint_hash"), "deps": c.get("fingerprint") or {}, "complete": done}

    def content(self) -> str | None:
        return dir_hash(self.path) if (self.path / "adapter_config.json").is_file() else None

    def sweep(self) -> int:
        stale = [
            *self.path.parent.glob(f".{self.path.name}.*.tmp"),
            *self.path.parent.glob(f".{self.path.name}.*.old"),
        ]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)

    def clear(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)


class ReportArtifact:
    """report.md/.html, figures/ and results.json; results.json (written last) holds the identity."""

    def __init__(self, path: Path):
        self.path = path / "results.json"

    def record(self) -> dict | None:
        if not self.path.is_file():
            return None
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            ident = json.loads(self.path.read_text(encoding="utf-8")).get("identity")
            if isinstance(ident, dict):
                return {**ident, "complete": True}
        return {"key": None, "deps": {}, "complete": False}

    def content(self) -> str | None:
        return _sha(self.path.read_bytes()) if self.path.is_file() else None

    def sweep(self) -> int:
        return 0

    def clear(self) -> None:
        """The report rewrites its own files in full; it never deletes anything in the run dir."""


class RunDir:
    """One run: `config.yaml`, `manifest.json` and the artifacts of DESIGN.md §1.

    Opening a RunDir writes nothing; the first `begin` (after the stage validated its inputs) creates the
    directory and writes config.yaml.
    """

    def __init__(self, path: str | Path, config: RunConfig | None = None):
        self.path = Path(path)
        self.config = config if config is not None else self._load_config()
        self._writing: dict[str, dict] = {}  # artifact -> identity of the stage now writing it

    @classmethod
    def for_config(cls, cfg: RunConfig) -> RunDir:
        return cls(cfg.run_dir, cfg)

    @classmethod
    def existing(cls, path: str | Path) -> Path:
        """`path` if it is a run directory (holds config.yaml), else a RunNotFound saying what to do."""
        p = Path(path)
        if not (p / "config.yaml").is_file():
            what = "does not exist" if not p.exists() else "holds no config.yaml, so it is not a dalign run"
            raise RunNotFound(
                f"run directory {p} {what}; start a run with `dalign run CONFIG` (or pass --config to a stage verb)"
            )
        return p

    def _load_config(self) -> RunConfig:
        from dalign.config import load_config

        cfg_file = self.path / "config.yaml"
        return load_config(cfg_file if cfg_file.exists() else None)

    # ---- artifacts -------------------------------------------------------------------------------------------
    def store(self, name: str) -> ShardStore:
        return ShardStore(self.path / f"{name}.parquet", ARTIFACT_KEYS[name], self._writing.get(name))

    def artifact(self, name: str) -> ShardStore | DirArtifact | ReportArtifact:
        if name in ARTIFACT_KEYS:
            return self.store(name)
        if name in ADAPTERS:
            return DirArtifact(self.path / name)
        if name == "report":
            return ReportArtifact(self.path)
        raise KeyError(f"unknown artifact {name!r}")

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

    def made_with(self, name: str) -> RunConfig | None:
        """The config a committed table was made with (not the latest edit of config.yaml), if it recorded one."""
        idx = self.store(name).index()
        return RunConfig.model_validate(idx["config"]) if idx.get("config") and idx["shards"] else None

    def content(self, name: str) -> str | None:
        """Content hash of an input: a committed table or adapter; 'aligned' = the adapter the run scores."""
        if name == "aligned":
            return dir_hash(adapter_dir(self))
        return self.artifact(name).content()

    # ---- manifest --------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # the manifest is a log: a damaged one is restarted, no identity is lost
            return {"stages": {}}

    def _update(self, stage: str, **fields: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path / ".lock")):
            m = self.manifest()
            entry = m["stages"].setdefault(stage, {})
            entry.update(fields)
            m["dalign_version"] = __version__
            atomic_write_text(self.manifest_path, json.dumps(m, indent=2, sort_keys=True, default=str))

    def stage_entry(self, stage: str) -> dict[str, Any]:
        return self.manifest()["stages"].get(stage, {})

    # ---- stage lifecycle -------------------------------------------------------------------------------------
    def begin(self, stage: str, force: bool = False) -> str:
        """Start (or resume) `stage`: check its outputs against its identity, sweep leftovers, mark it running.

        Call it once the stage has validated its config and inputs: it is the first thing that writes. Outputs
        made under another config are refused (StageMismatch naming the keys) unless `force`; outputs made from
        other inputs (an upstream artifact changed) are deleted and redone; with `force` outputs are always redone.
        Returns the stage key.
        """
        from dalign.pipeline import PIPELINE, stage_deps

        st = PIPELINE[stage]
        deps = stage_deps(self, stage)
        key = config_hash(deps)
        self._check_writable()
        for out in st.outputs:
            art = self.artifact(out)
            art.sweep()
            rec = art.record()
            if rec is None or (rec.get("key") == key and not force):
                continue
            if rec.get("key") is None and not force:  # by hand or an older dalign: not ours to delete
                raise StageMismatch(
                    f"{self.path}: the {stage!r} artifact {out!r} was made without a recorded identity (by hand or "
                    f"an older dalign), so dalign cannot tell what it was made from. Use a new run name, or --force "
                    f"to delete and redo it."
                )
            old = rec.get("deps") or {}
            changed = config_changes(old, deps)
            if not force and not changed and rec.get("key") and not input_changes(old, deps):
                continue  # only the requested rows changed (e.g. sample.n): the stage prunes and extends itself
            if changed and not force and not st.derived:
                raise StageMismatch(
                    f"{self.path}: the {stage!r} artifact {out!r} was made under another config; differing keys: "
                    f"{', '.join(changed)}. Use a new run name, or --force to delete and redo it."
                )
            art.clear()
        for out in st.outputs:  # the full config rides along (not in the key) so the report can describe it
            self._writing[out] = {"key": key, "deps": deps, "config": self.config.model_dump(mode="json")}
            art = self.artifact(out)
            if isinstance(
                art, ShardStore
            ):  # the identity goes on disk now, so any worker process appends under it
                art.begin()
        atomic_write_text(self.path / "config.yaml", to_yaml(self.config))
        self._update(stage, status="running", key=key, started=_now(), versions=_versions())
        return key

    def deps(self, stage: str) -> dict:
        """The identity (dependencies) `begin` recorded for this stage's outputs in this process."""
        from dalign.pipeline import PIPELINE

        return self._writing[PIPELINE[stage].outputs[0]]["deps"]

    def finish(self, stage: str, **fields: Any) -> None:
        from dalign.pipeline import PIPELINE

        for out in PIPELINE[stage].outputs:
            art = self.artifact(out)
            if isinstance(art, ShardStore) and art.path.is_dir():
                art.mark_complete()
        self._update(stage, status="done", finished=_now(), **fields)

    def clear(self, outputs: Iterable[str]) -> None:
        for o in outputs:
            self.artifact(o).clear()

    def _check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RunNotFound(
                f"run directory {self.path} is not writable ({e.strerror}); fix its permissions or pick another "
                f"`runs_dir`/`name`"
            ) from None


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted config keys that differ between two recorded identities (inputs left out)."""
    return [k.removeprefix("config.") for k in diff_keys(old, new) if k.startswith("config.")]


def input_changes(old: dict, new: dict) -> list[str]:
    return sorted({k.split(".")[1] for k in diff_keys(old, new) if k.startswith(("inputs.", "extra."))})


def row_changes(old: dict, new: dict) -> list[str]:
    """Config keys that only choose which rows exist (a stage extends or prunes its table for them)."""
    return [k.removeprefix("rows.") for k in diff_keys(old, new) if k.startswith("rows.")]


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
    for name in reversed(ADAPTERS):
        p = run.path / name
        if (p / "adapter_config.json").exists():
            return p
    return None
