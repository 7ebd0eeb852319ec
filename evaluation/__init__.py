"""Evaluation of RegionMed-CLIP: retrieval, zero-shot classification and VQA metrics."""

from .retrieval import retrieval_recall_at_k

__all__ = ["retrieval_recall_at_k"]
