"""Evaluation of RegionMed-CLIP: retrieval, zero-shot classification, region probes and VQA metrics."""

from .probe import (
    blank_crops,
    mean_pairwise_cosine,
    mirror_boxes,
    region_negative_accuracy,
    remove_box_geometry,
    run_probe,
    zero_shot_auroc,
    zero_shot_scores,
)
from .retrieval import retrieval_recall_at_k
from .scoring import auroc, bootstrap_interval, classification_accuracy, macro_f1, vqa_accuracy

__all__ = [
    "auroc",
    "blank_crops",
    "bootstrap_interval",
    "classification_accuracy",
    "macro_f1",
    "mean_pairwise_cosine",
    "mirror_boxes",
    "region_negative_accuracy",
    "remove_box_geometry",
    "retrieval_recall_at_k",
    "run_probe",
    "vqa_accuracy",
    "zero_shot_auroc",
    "zero_shot_scores",
]
