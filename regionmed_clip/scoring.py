"""Metrics as pure functions of arrays: AUROC, bootstrap intervals, classification accuracy and
macro-F1, VQA answer normalisation and accuracy, the mean pairwise cosine (the collapse alarm). The
`evaluate` modules in `evaluation/metrics/`, every task of `regionmed-eval` and the trainer's logs call
these, so each number has one definition. This module imports no model, training or evaluation code.

Inputs may be lists, numpy arrays or torch tensors; outputs are Python floats (fractions in
[0, 1]) or dicts of them. A metric that cannot be computed (AUROC of a class without a positive)
is NaN.
"""

import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "ANSWER_TYPES",
    "as_float_array",
    "auroc",
    "bootstrap_interval",
    "classification_accuracy",
    "macro_f1",
    "mean_pairwise_cosine",
    "normalize_answer",
    "vqa_accuracy",
]

ANSWER_TYPES: tuple[str, ...] = ("closed", "open")


def as_float_array(values: Any, name: str) -> np.ndarray:
    """`values` as a 1-D float64 array; ValueError naming `name` otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic; a tie between a positive and a
    negative counts 1/2 (as scikit-learn's `roc_auc_score`). NaN when there is no positive or no negative.

    scores `(N,)` (higher = more likely positive); labels `(N,)` bool / 0-1.
    """
    score_array = as_float_array(scores, "scores")
    label_array = as_float_array(labels, "labels")
    if score_array.shape != label_array.shape:
        raise ValueError(f"scores {score_array.shape} and labels {label_array.shape} differ in shape")
    if not np.isfinite(score_array).all():
        raise ValueError("scores hold NaN or inf")
    if not np.isin(label_array, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1 or bool")
    positive = label_array == 1.0
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    # Average ranks (1-based) over tie groups: U = sum of positive ranks - n_pos (n_pos + 1) / 2.
    _, inverse, counts = np.unique(score_array, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u_statistic = ranks[positive].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u_statistic / (num_pos * num_neg))


def bootstrap_interval(
    metric: Callable[..., float], *arrays: Any, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(*arrays)`: the examples (rows, shared by every array)
    are resampled with replacement `resamples` times; resamples where the metric is NaN (e.g. no
    positive drawn) are left out. Returns `(low, high)`, NaN when no resample gives a number.
    """
    if not arrays:
        raise ValueError("bootstrap_interval needs at least one array")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    columns = [np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array) for array in arrays]
    count = len(columns[0])
    if count == 0 or any(len(column) != count for column in columns):
        raise ValueError(f"the arrays must be non-empty and share their length, got {[len(c) for c in columns]}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, count, count)
        value = metric(*(column[index] for column in columns))
        if not np.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _class_indices(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    predicted = np.asarray(predictions)
    true = np.asarray(references)
    if predicted.ndim != 1 or predicted.shape != true.shape or predicted.size == 0:
        raise ValueError(f"predictions {predicted.shape} and references {true.shape} must be the same non-empty 1-D shape")
    return predicted, true


def classification_accuracy(predictions: Any, references: Any) -> float:
    """Fraction of `predictions` `(N,)` equal to `references` `(N,)` (class indices or names)."""
    predicted, true = _class_indices(predictions, references)
    return float((predicted == true).mean())


def macro_f1(predictions: Any, references: Any, classes: Sequence[Any] | None = None) -> float:
    """Unweighted mean over `classes` (default: every class in the references or predictions) of
    the per-class F1; a class never predicted nor present scores 0 (scikit-learn's zero_division=0)."""
    predicted, true = _class_indices(predictions, references)
    classes = list(classes) if classes is not None else sorted(set(true.tolist()) | set(predicted.tolist()))
    scores = []
    for name in classes:
        true_positive = float(((predicted == name) & (true == name)).sum())
        denominator = float((predicted == name).sum() + (true == name).sum())
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return float(np.mean(scores))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans(dict.fromkeys(string.punctuation, " "))


def normalize_answer(answer: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed (the VQA
    convention: "The Left lung." == "left lung")."""
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a str, got {type(answer).__name__}")
    return " ".join(_ARTICLES.sub(" ", answer.lower().translate(_PUNCTUATION)).split())


def vqa_accuracy(
    predictions: Sequence[str], references: Sequence[str], answer_types: Sequence[str] | None = None
) -> dict[str, float | int]:
    """Exact-match accuracy of normalised answers, overall and per answer type.

    `answer_types[i]` is "closed" (yes/no) or "open". Returns `{"accuracy", "n"}` plus
    `{"closed_accuracy", "closed_n", "open_accuracy", "open_n"}` when types are given (NaN for a
    type without questions).
    """
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references (need the same, >= 1)")
    correct = np.array([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)])
    result: dict[str, float | int] = {"accuracy": float(correct.mean()), "n": len(correct)}
    if answer_types is not None:
        if len(answer_types) != len(references):
            raise ValueError(f"{len(answer_types)} answer types for {len(references)} references")
        types = np.asarray(answer_types)
        unknown = sorted(set(types.tolist()) - set(ANSWER_TYPES))
        if unknown:
            raise ValueError(f"answer types must be in {ANSWER_TYPES}, got {unknown}")
        for kind in ANSWER_TYPES:
            chosen = types == kind
            result[f"{kind}_accuracy"] = float(correct[chosen].mean()) if chosen.any() else float("nan")
            result[f"{kind}_n"] = int(chosen.sum())
    return result


def mean_pairwise_cosine(embeds: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over distinct pairs of the rows of `(N, D)` embeddings, as a 0-dim float64
    tensor on their device (1.0: every row points the same way; NaN for fewer than 2 rows). A tensor, so
    the trainer can average it over steps without waiting on the device."""
    if embeds.ndim != 2:
        raise ValueError(f"embeds must be (N, D), got shape {tuple(embeds.shape)}")
    count = embeds.shape[0]
    if count < 2:
        return torch.tensor(float("nan"), dtype=torch.float64, device=embeds.device)
    total = torch.nn.functional.normalize(embeds.double(), dim=-1).sum(0)
    # the sum over all ordered pairs, i == j included, is |total|^2; the diagonal contributes N
    return ((total @ total) - count) / (count * (count - 1))
