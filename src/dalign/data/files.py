"""Local CSV / JSONL / JSON files: reading with clear errors, and `name: file` datasets with column mappings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from dalign.config import DatasetRef
from dalign.data import DatasetError

# Column names tried, in order, when `prompt_field` is not given.
PROMPT_ALIASES = [
    "prompt",
    "forbidden_prompt",
    "question",
    "goal",
    "behavior",
    "Behavior",
    "instruction",
    "text",
]
ANSWER_ALIASES = ["answer", "target_answer", "solution"]


def read_text(path: str | Path) -> str:
    """File contents as UTF-8; a decoding error names the line and byte, an empty file is an error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"{p} does not exist (or is not a file)")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte-order mark written by spreadsheet programs
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetError(
            f"{p}: line {line} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    if not text.strip():
        raise DatasetError(f"{p} is empty")
    return text


def read_table(path: str | Path, comment: str | None = None) -> pd.DataFrame:
    """Read a .csv/.tsv, .jsonl or .json (list of objects) file into a DataFrame, with errors naming the file."""
    p = Path(path).expanduser()
    text = read_text(p)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p}: line {i} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{p}: line {i} is a JSON {type(obj).__name__}, expected an object")
            rows.append(obj)
        df = pd.DataFrame(rows)
    elif suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if isinstance(obj, dict):  # {"data": [...]} or {"rows": [...]}
            lists = [v for v in obj.values() if isinstance(v, list)]
            obj = lists[0] if len(lists) == 1 else obj
        if not isinstance(obj, list):
            raise DatasetError(f"{p}: expected a JSON list of objects")
        df = pd.DataFrame([o if isinstance(o, dict) else {"prompt": o} for o in obj])
    elif suffix in (".csv", ".tsv"):
        try:
            # Blank rows stay rows (and then fail as empty prompts, naming the line) instead of vanishing and
            # shifting the ids of every later row; only blank lines at the end of the file are dropped.
            df = pd.read_csv(
                io.StringIO(text.rstrip() + "\n"),
                sep="\t" if suffix == ".tsv" else ",",
                comment=comment,
                keep_default_na=False,
                skip_blank_lines=comment is not None,
            )
        except pd.errors.ParserError as e:
            raise DatasetError(f"{p}: not a valid {suffix[1:].upper()} file ({e})") from None
    else:
        raise DatasetError(f"{p}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .json")
    if df.empty:
        raise DatasetError(f"{p} has a header but no rows")
    return df


def require_columns(df: pd.DataFrame, columns: list[str], where: str, hint: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(
            f"{where}: missing column(s) {missing}; columns found: {list(df.columns)}"
            + (f". {hint}" if hint else "")
        )


def _pick(df: pd.DataFrame, given: str | None, aliases: list[str], what: str, flag: str, where: str) -> str:
    if given is not None:
        require_columns(df, [given], where, f"set {flag} to one of the columns found")
        return given
    for a in aliases:
        if a in df.columns:
            return a
    raise DatasetError(
        f"{where}: no {what} column (tried {aliases}); columns found: {list(df.columns)}. Pass {flag}=COLUMN"
    )


def load_file(ref: DatasetRef) -> pd.DataFrame:
    """A local CSV/JSONL file as a dataset, using the ref's `*_field` mappings (or common column names)."""
    if not ref.path:
        raise DatasetError(
            "dataset name 'file' needs a path, e.g. {name: file, path: prompts.csv, prompt_field: text}"
        )
    df = read_table(ref.path)
    where = str(ref.path)
    prompt_col = _pick(df, ref.prompt_field, PROMPT_ALIASES, "prompt", "prompt_field", where)
    out = pd.DataFrame({"prompt": df[prompt_col].astype(str)})
    empty = (df[prompt_col].isna() | (out["prompt"].str.strip() == "")).to_numpy()
    if empty.any():
        i = int(empty.argmax())
        line = f"line {i + 2}" if Path(ref.path).suffix.lower() in (".csv", ".tsv") else f"record {i + 1}"
        raise DatasetError(
            f"{where}: empty prompt in data row {i + 1} ({line}), column {prompt_col!r}"
            f"{f' ({int(empty.sum())} empty in all)' if empty.sum() > 1 else ''}; fill it in or delete the row"
        )
    if ref.id_field is not None:
        require_columns(df, [ref.id_field], where, "set id_field to a column of unique ids, or leave it out")
        out["prompt_id"] = df[ref.id_field].astype(str)
    else:
        out["prompt_id"] = [f"{Path(ref.path).stem}-{i:05d}" for i in range(len(df))]
    if ref.category_field is not None:
        require_columns(
            df, [ref.category_field], where, "set category_field to a column found, or leave it out"
        )
        out["category"] = df[ref.category_field].astype(str)
    else:
        out["category"] = df["category"].astype(str) if "category" in df.columns else "unspecified"
    if ref.answer_field is not None:
        require_columns(df, [ref.answer_field], where, "set answer_field to the reference-answer column")
        out["answer"] = df[ref.answer_field].astype(str)
    out["source"] = f"file:{Path(ref.path).name}"
    return out[["prompt_id", "prompt", "category", "source"] + (["answer"] if "answer" in out else [])]


# ---- where a registered dataset's rows come from ---------------------------------------------------------------
def pick_source(
    dataset: str, source: str, path: str | None, offline: list[str], hub: str | None, schema: str
) -> str:
    """'path', 'offline' or 'hub' for a loader call; errors say which package/hub id provides the data."""
    from dalign.data import offline as off

    if path:
        return "path"
    local = f"pass a local file in the upstream schema ({schema}) with `path:`"
    if source == "hub":
        if hub is None:
            raise DatasetError(f"dataset {dataset!r} has no hub loader; use source: offline or {local}")
        return "hub"
    have_offline = bool(offline) and all(off.available(k) for k in offline)
    if source == "offline" or (source == "auto" and hub is None):
        if not offline:
            raise DatasetError(
                f"dataset {dataset!r} is not available offline: it comes from the hub ({hub}). "
                f"Use source: hub (needs network), or {local}"
            )
        for k in offline:
            off.offline_path(k, dataset)  # raises with the package to install
        return "offline"
    return "offline" if have_offline else "hub"


def hub_records(
    dataset: str, hub_id: str, config: str | None, split: str, schema: str, **kwargs
) -> pd.DataFrame:
    """Rows of a Hugging Face hub dataset split as a DataFrame (via `datasets.load_dataset`)."""
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, config, split=split, **kwargs)
    except Exception as e:  # network, gating, missing config: all need the same advice
        raise DatasetError(
            f"dataset {dataset!r}: could not load {hub_id}"
            + (f" (config {config!r})" if config else "")
            + f" split {split!r} from the Hugging Face hub: {type(e).__name__}: {e}. Without network access, "
            f"pass a local file in the upstream schema ({schema}) with `path:`"
        ) from e
    return ds.to_pandas() if hasattr(ds, "to_pandas") else pd.DataFrame(list(ds))
