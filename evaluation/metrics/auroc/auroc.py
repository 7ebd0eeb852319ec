"""AUROC (Mann-Whitney, ties count 1/2), binary or multi-label, with optional bootstrap intervals."""

import datasets
import evaluate
import numpy as np

from regionmed_clip.scoring import auroc, bootstrap_interval

_DESCRIPTION = """Area under the ROC curve. Config "binary" (default): one score and one 0/1 label per
example. Config "multilabel": a list of per-class scores and a list of per-class 0/1 labels per
example; the result holds the per-class AUROC and their macro mean over the classes that have both
a positive and a negative. Identical to scikit-learn's roc_auc_score (checked in the tests)."""

_INPUTS = """
Args:
    prediction_scores: float per example ("binary") or list of floats per example ("multilabel").
    references: 0/1 per example, or list of 0/1 per example.
    bootstrap_resamples (int, default 0): > 0 adds percentile bootstrap intervals over examples.
    confidence_level (float, default 0.95), seed (int, default 0): of the bootstrap.
Returns:
    "binary": {"roc_auc", ["roc_auc_low", "roc_auc_high"]}.
    "multilabel": {"roc_auc" (macro), "per_class": [...], ["per_class_low", "per_class_high"]}.
Examples:
    >>> metric = evaluate.load("evaluation/metrics/auroc")
    >>> metric.compute(prediction_scores=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])
    {'roc_auc': 0.75}
"""


class Auroc(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "multilabel":
            features = datasets.Features({"prediction_scores": datasets.Sequence(datasets.Value("float64")),
                                          "references": datasets.Sequence(datasets.Value("int32"))})
        elif self.config_name in ("binary", "default"):
            features = datasets.Features({"prediction_scores": datasets.Value("float64"),
                                          "references": datasets.Value("int32")})
        else:
            raise ValueError(f"config_name must be 'binary' or 'multilabel', got {self.config_name!r}")
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
                                   features=features)

    def _compute(self, prediction_scores, references, bootstrap_resamples: int = 0, confidence_level: float = 0.95,
                 seed: int = 0):
        scores, labels = np.asarray(prediction_scores, dtype=np.float64), np.asarray(references, dtype=np.float64)
        interval = {"resamples": bootstrap_resamples, "confidence": confidence_level, "seed": seed}
        if self.config_name != "multilabel":
            result = {"roc_auc": auroc(scores, labels)}
            if bootstrap_resamples:
                result["roc_auc_low"], result["roc_auc_high"] = bootstrap_interval(auroc, scores, labels, **interval)
            return result
        if scores.ndim != 2 or scores.shape != labels.shape:
            raise ValueError(f"multilabel scores {scores.shape} and references {labels.shape} must be the same (N, C)")
        per_class = [auroc(scores[:, c], labels[:, c]) for c in range(scores.shape[1])]
        finite = [value for value in per_class if not np.isnan(value)]
        result = {"roc_auc": float(np.mean(finite)) if finite else float("nan"), "per_class": per_class}
        if bootstrap_resamples:
            bounds = [bootstrap_interval(auroc, scores[:, c], labels[:, c], **interval) for c in range(scores.shape[1])]
            result["per_class_low"] = [low for low, _ in bounds]
            result["per_class_high"] = [high for _, high in bounds]
        return result
