"""Zero-shot classification on labelled datasets: prompt templates, label policies, and reports.

* **Prompts** come from a YAML of templates (`{c}` is the class name): a `default` positive and
  negative set and optional per-class overrides (`evaluation/prompts/chest_xray.yaml` ships one).
  Each class is scored by prompt ensembles (the mean of the normalised prompt embeddings).
* **Multi-label** findings (ChestX-ray14, CheXpert, MIMIC-CXR): per class, positive-vs-negative
  prompt pairs as CheXzero does; score = cos(image, positive ensemble) - cos(image, negative
  ensemble). Uncertain labels (CheXpert's -1) follow a policy: `ignore` (left out of that class's
  AUROC), `positive` or `negative`.
* **Multi-class** (one label per image): score = cos(image, class ensemble) over the classes; the
  prediction is the argmax. Accuracy and macro-F1, plus one-vs-rest AUROC per class.

Every figure gets a percentile bootstrap interval over images (`regionmed_clip.scoring`).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from regionmed_clip.scoring import auroc, bootstrap_interval, classification_accuracy, macro_f1

__all__ = [
    "DEFAULT_PROMPTS",
    "UNCERTAIN_POLICIES",
    "label_matrix",
    "load_prompt_templates",
    "multiclass_report",
    "multilabel_report",
    "prompts_for",
]

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "chest_xray.yaml"
UNCERTAIN_POLICIES: tuple[str, ...] = ("ignore", "positive", "negative")


def load_prompt_templates(path: str | Path = DEFAULT_PROMPTS) -> dict[str, Any]:
    """Read and check a prompt-template YAML: `{"default": {"positive": [...], "negative": [...]},
    "classes": {name: {"positive": [...], "negative": [...]}}}` (`classes` optional, and each of its
    entries may give either side). Every template must contain `{c}` except negative ones, which
    may be class-free ("Normal chest X-ray.")."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"prompt templates {str(path)!r} are not valid YAML: {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("default"), dict):
        raise ValueError(f"{path.name}: needs a 'default' mapping with 'positive' and 'negative' template lists")
    sections = {"default": spec["default"], **{f"classes.{k}": v for k, v in (spec.get("classes") or {}).items()}}
    for where, section in sections.items():
        if not isinstance(section, dict) or not set(section) <= {"positive", "negative"}:
            raise ValueError(f"{path.name}: {where} must map 'positive' / 'negative' to template lists")
        for side, templates in section.items():
            if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t for t in templates):
                raise ValueError(f"{path.name}: {where}.{side} must be a non-empty list of strings")
            if side == "positive" and not all("{c}" in t for t in templates) and where == "default":
                raise ValueError(f"{path.name}: every default positive template needs the class placeholder {{c}}")
    for side in ("positive", "negative"):
        if side not in spec["default"]:
            raise ValueError(f"{path.name}: default.{side} is missing")
    return {"default": spec["default"], "classes": spec.get("classes") or {}}


def prompts_for(templates: Mapping[str, Any], classes: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """`{"positive": {class: [prompt, ...]}, "negative": {...}}` for `classes` (a class's own
    templates replace the default ones side by side)."""
    result: dict[str, dict[str, list[str]]] = {"positive": {}, "negative": {}}
    for name in classes:
        own = templates["classes"].get(name, {})
        for side in ("positive", "negative"):
            result[side][name] = [t.replace("{c}", name) for t in own.get(side, templates["default"][side])]
    return result


def label_matrix(
    positives: Sequence[Sequence[str]],
    classes: Sequence[str],
    uncertain: Sequence[Sequence[str]] | None = None,
    policy: str = "ignore",
) -> tuple[np.ndarray, np.ndarray]:
    """Per image the classes it has (`positives[i]`) and, optionally, those marked uncertain
    (`uncertain[i]`) -> `(labels (N, C) 0/1 float, valid (N, C) bool)` under `policy` (one of
    `UNCERTAIN_POLICIES`). A class both positive and uncertain for an image is an error."""
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain-label policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
    if uncertain is not None and len(uncertain) != len(positives):
        raise ValueError(f"{len(uncertain)} uncertain-label lists for {len(positives)} images")
    index = {name: column for column, name in enumerate(classes)}
    labels = np.zeros((len(positives), len(classes)))
    valid = np.ones((len(positives), len(classes)), dtype=bool)
    for row, names in enumerate(positives):
        for name in names:
            if name in index:
                labels[row, index[name]] = 1.0
        for name in (uncertain[row] if uncertain is not None else ()):
            if name not in index:
                continue
            if labels[row, index[name]] == 1.0:
                raise ValueError(f"image {row}: {name!r} is both positive and uncertain")
            if policy == "ignore":
                valid[row, index[name]] = False
            elif policy == "positive":
                labels[row, index[name]] = 1.0
    return labels, valid


def _interval(metric, *arrays, resamples: int, confidence: float, seed: int) -> dict[str, float]:
    if not resamples:
        return {}
    low, high = bootstrap_interval(metric, *arrays, resamples=resamples, confidence=confidence, seed=seed)
    return {"low": low, "high": high}


def multilabel_report(
    scores: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    valid: np.ndarray,
    classes: Sequence[str],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-class AUROC (over that class's valid images) with bootstrap intervals, and the macro mean
    over the classes that have both a positive and a negative.

    scores, labels `(N, C)`; valid `(N, C)` bool. The macro interval resamples images jointly for
    all classes (it keeps the correlation between classes of one image).
    """
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if scores.shape != labels.shape or valid.shape != labels.shape or scores.ndim != 2 or scores.shape[1] != len(classes):
        raise ValueError(f"scores {scores.shape}, labels {labels.shape} and valid {valid.shape} must all be "
                         f"(N, C={len(classes)})")
    settings = {"resamples": resamples, "confidence": confidence, "seed": seed}
    per_class = {}
    for column, name in enumerate(classes):
        keep = valid[:, column]
        value = auroc(scores[keep, column], labels[keep, column])
        per_class[name] = {"auroc": value, "positives": int(labels[keep, column].sum()),
                           "negatives": int((labels[keep, column] == 0).sum()), "ignored": int((~keep).sum())}
        if not np.isnan(value):
            per_class[name].update(_interval(auroc, scores[keep, column], labels[keep, column], **settings))
    evaluated = [name for name in classes if not np.isnan(per_class[name]["auroc"])]
    columns = [classes.index(name) for name in evaluated]

    def macro(s: np.ndarray, y: np.ndarray, v: np.ndarray) -> float:
        values = [auroc(s[v[:, c], c], y[v[:, c], c]) for c in columns]
        values = [x for x in values if not np.isnan(x)]
        return float(np.mean(values)) if len(values) == len(columns) and values else float("nan")

    result = {"per_class": per_class, "classes_evaluated": evaluated,
              "classes_skipped": [name for name in classes if name not in evaluated],
              "macro_auroc": macro(scores, labels, valid) if evaluated else float("nan")}
    if evaluated and resamples:
        result["macro_auroc_interval"] = _interval(macro, scores, labels, valid, **settings)
    return result


def multiclass_report(
    scores: np.ndarray | torch.Tensor,
    targets: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy and macro-F1 of `argmax(scores)` against `targets` `(N,)` (class indices), with
    bootstrap intervals, and one-vs-rest AUROC per class from the scores `(N, C)`."""
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != (len(targets), len(classes)):
        raise ValueError(f"scores {scores.shape} must be (N={len(targets)}, C={len(classes)})")
    if targets.size and (targets.min() < 0 or targets.max() >= len(classes)):
        raise ValueError(f"targets must be class indices in [0, {len(classes)})")
    predictions = scores.argmax(1)
    settings = {"resamples": resamples, "confidence": confidence, "seed": seed}
    every = list(range(len(classes)))
    f1 = lambda p, t: macro_f1(p, t, classes=every)  # noqa: E731 - every class counts, even if unseen
    per_class = {}
    for column, name in enumerate(classes):
        is_class = (targets == column).astype(float)
        per_class[name] = {"auroc": auroc(scores[:, column], is_class), "support": int(is_class.sum())}
    return {
        "accuracy": classification_accuracy(predictions, targets),
        "accuracy_interval": _interval(classification_accuracy, predictions, targets, **settings),
        "macro_f1": f1(predictions, targets),
        "macro_f1_interval": _interval(f1, predictions, targets, **settings),
        "per_class": per_class,
        "chance_accuracy": float(np.bincount(targets, minlength=len(classes)).max() / len(targets)),
    }
