"""attacks.parquet: one row per (behaviour, target, stream, iteration), committed per iteration.

Every use of the run directory's store for attacks goes through here (keys: rundir.ARTIFACT_KEYS["attacks"]).
"""

from __future__ import annotations

import pandas as pd

from dalign.rundir import ARTIFACT_KEYS, RunDir

NAME = "attacks"
KEYS = ARTIFACT_KEYS[NAME]
COLUMNS = [
    *KEYS,
    "goal",
    "target_string",
    "attempts",  # attacker replies tried this iteration (1 .. max_attempts)
    "improvement",
    "attacker_prompt",  # None when every attempt was malformed
    "target_response",  # None when the target was not queried
    "judge_score",  # 1..10, NaN when there is none
    "jailbroken",
    "error",  # None, "attacker: ..." (target not queried) or "judge ..." (queried, not rated)
    "judge",
    "judge_raw",
    "guard_choice",  # the guard's chosen candidate (guarded target), else -1
    "attacker_seed",
    "target_seed",
    "attacker_s",  # this row's share of the iteration's attacker / target / judge wall time
    "target_s",
    "judge_s",
]
TEXT = [
    "goal",
    "target_string",
    "improvement",
    "attacker_prompt",
    "target_response",
    "error",
    "judge",
    "judge_raw",
]


def read(run: RunDir) -> pd.DataFrame:
    """All committed rows (an empty frame with the columns when there are none), sorted by key."""
    df = run.store(NAME).read()
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    # one dtype whatever the shards held: a shard whose column is all None reads as object, not str (NaN = none)
    df[TEXT] = df[TEXT].astype("str")
    return df.sort_values(KEYS, kind="stable").reset_index(drop=True)


def write(run: RunDir, rows: list[dict]) -> int:
    """Commit one iteration's rows as one shard (whole or absent after a kill)."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("judge_score", "attacker_s", "target_s", "judge_s"):
        df[col] = df[col].astype("float64")
    return run.store(NAME).write(df)
