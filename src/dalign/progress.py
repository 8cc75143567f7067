"""Progress bars that also work in a log file: off a terminal, a plain line per task every ~5 % of its work.

rich redraws a bar only on a terminal; under `nohup`, CI or a job scheduler a long stage would show nothing until
it ends. `Progress` here is rich's, plus those lines (description, done/total, the task's fields, elapsed, ETA).
"""

from __future__ import annotations

import rich.progress

STEP = 0.05  # a line every 5 % of a task's total


class Progress(rich.progress.Progress):
    def __init__(self, *columns, **kwargs):
        super().__init__(*columns, **kwargs)
        self._logged: dict = {}  # task id -> the 5 % bucket last printed

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id) -> None:
        if self.console.is_terminal or self.disable:
            return
        task = self._tasks[task_id]
        if not task.total:
            return
        frac = min(task.completed / task.total, 1.0)
        bucket = int(frac / STEP + 1e-9)  # lines at 0 %, 5 %, 10 %, ... and at the end
        if self._logged.get(task_id) == bucket:
            return
        self._logged[task_id] = bucket
        # text fields as they are ("loss 2.31"), numbers with their name ("tps 118")
        fields = "  ".join(
            f"{k} {v:.4g}" if isinstance(v, int | float) else str(v) for k, v in task.fields.items() if str(v)
        )
        eta = task.time_remaining
        self.console.print(
            f"{task.description}: {task.completed:g}/{task.total:g}  {fields}  {task.elapsed or 0:.0f} s"
            + (f", ETA {eta:.0f} s" if eta is not None and frac < 1.0 else "")
        )


__all__ = ["Progress"]
