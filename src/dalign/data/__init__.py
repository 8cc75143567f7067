"""Benchmark and utility datasets in one schema, registered by name.

Schema: `prompt_id, prompt, category, source` (+ `answer` for utility sets), plus a `kind` column (safety or
utility). A loader is registered with `@DATASETS.register(name, kind=..., size=..., offline=..., hub=...)` and
returns a DataFrame in that schema; `load_dataset(ref)` applies the seeded `offset`/`limit` subset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pandas as pd

from dalign.config import DatasetRef
from dalign.registry import Registry

Source = Literal["auto", "offline", "hub"]
Loader = Callable[..., pd.DataFrame]

DATASETS: Registry[Loader] = Registry("dataset")
SCHEMA = ["prompt_id", "prompt", "category", "source"]


class DatasetError(ValueError):
    pass


def _finish(df: pd.DataFrame, name: str, kind: str) -> pd.DataFrame:
    missing = [c for c in SCHEMA if c not in df.columns]
    if missing:
        raise DatasetError(f"dataset {name!r} loader returned no column(s) {missing}; got {list(df.columns)}")
    df = df.copy()
    df["prompt_id"] = df["prompt_id"].astype(str)
    if df["prompt_id"].duplicated().any():
        dup = df.loc[df["prompt_id"].duplicated(), "prompt_id"].iloc[0]
        raise DatasetError(f"dataset {name!r} has duplicate prompt_id {dup!r}")
    empty = df["prompt"].isna() | (df["prompt"].astype(str).str.strip() == "")
    if empty.any():
        i = int(empty.to_numpy().argmax())
        raise DatasetError(
            f"dataset {name!r}: empty prompt in row {i + 1} (prompt_id {df['prompt_id'].iloc[i]!r}) of its source"
        )
    if "answer" not in df.columns:
        df["answer"] = None
    df["kind"] = kind
    return df


def load_dataset(ref: DatasetRef) -> pd.DataFrame:
    """Load a registered dataset (or a local file) and take the seeded subset `[offset, offset+limit)`."""
    _ensure_registered()
    if ref.name == "file":
        from dalign.data.files import load_file

        df = load_file(ref)
        kind = "utility" if ref.answer_field else "safety"
    else:
        loader = DATASETS.get(ref.name)
        kind = DATASETS.info[ref.name].get("kind", "safety")
        kwargs = {"source": ref.source}
        if ref.path:
            kwargs["path"] = ref.path
        df = loader(**kwargs)
    df = _finish(df, ref.name, kind)
    if ref.limit is not None or ref.offset:
        df = df.sample(frac=1.0, random_state=ref.seed).reset_index(drop=True)
        end = None if ref.limit is None else ref.offset + ref.limit
        df = df.iloc[ref.offset : end].reset_index(drop=True)
    if df.empty:
        raise DatasetError(f"dataset {ref.label!r} is empty after offset={ref.offset}, limit={ref.limit}")
    return df


def _ensure_registered() -> None:
    # Importing the loader modules registers them.
    import importlib

    for mod in ("dalign.data.safety", "dalign.data.utility", "dalign.data.pair"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def dataset_card(name: str) -> dict:
    """Origin, licence, version and construction of a registered dataset (see dalign.data.cards)."""
    from dalign.data.cards import dataset_card as card

    return card(name)


def list_datasets() -> list[dict]:
    """name, kind, checker, size, source, offline (bool), hub for every registered dataset."""
    from dalign.data.cards import list_datasets as listing

    return listing()


__all__ = ["DATASETS", "SCHEMA", "DatasetError", "dataset_card", "list_datasets", "load_dataset"]
