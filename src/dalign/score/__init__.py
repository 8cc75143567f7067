"""Scoring: selection metrics (registry), the scoring engine, selection, and the Best-of-N API.

Stage functions live in `dalign.score.stage` (`run_score`) and `dalign.score.select` (`run_select`); they are
imported lazily by the pipeline so `import dalign.score` stays light.
"""

from dalign.score.bestofn import BestOfN, Choice
from dalign.score.engine import ScoreEngine, ScoreError, ScoreRow, retokenize
from dalign.score.metrics import (
    METRICS,
    Metric,
    get_metric,
    hidden_metric,
    metric_names,
    row_metric,
    token_metric,
)

__all__ = [
    "METRICS",
    "BestOfN",
    "Choice",
    "Metric",
    "ScoreEngine",
    "ScoreError",
    "ScoreRow",
    "get_metric",
    "hidden_metric",
    "metric_names",
    "retokenize",
    "row_metric",
    "token_metric",
]
