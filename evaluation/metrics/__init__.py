"""The metrics as local `evaluate` modules, loaded by path (never from the Hub):

    from regionmed_clip.evaluation.metrics import load_metric
    auroc = load_metric("auroc")                     # or evaluate.load(".../evaluation/metrics/auroc")
    auroc.compute(prediction_scores=[0.9, 0.2], references=[1, 0])

Each module is a thin `evaluate.Metric` over `regionmed_clip.scoring` / `evaluation.retrieval`, so the
numbers match `regionmed-eval` exactly.
"""

from pathlib import Path
from typing import Any

__all__ = ["METRICS_DIR", "METRIC_NAMES", "load_metric"]

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES: tuple[str, ...] = ("auroc", "recall_at_k", "vqa_accuracy")


def load_metric(name: str, config_name: str | None = None, **kwargs: Any) -> Any:
    """`evaluate.load` of the module `name` in `METRICS_DIR` (a local path: works offline)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; available: {list(METRIC_NAMES)}")
    import evaluate  # imported here: `evaluation` itself does not need it

    return evaluate.load(str(METRICS_DIR / name), config_name, **kwargs)
