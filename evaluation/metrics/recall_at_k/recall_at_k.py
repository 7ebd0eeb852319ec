"""Retrieval Recall@K and median rank, from each query's scores over the candidates."""

import datasets
import evaluate
import torch

from regionmed_clip.evaluation.retrieval import best_positive_ranks, rank_summary

_DESCRIPTION = """Recall@K (percent of queries whose best-scoring correct candidate ranks in the top K)
and the median rank (1-based) of that candidate. A query may have several correct candidates (an
image with several captions). Ties rank the correct candidate last among those it ties with."""

_INPUTS = """
Args:
    predictions: per query, the scores of all C candidates (a list of C floats; the same C for every query).
    references: per query, the indices of its correct candidates (a non-empty list of ints in [0, C)).
    ks (list of int, default [1, 5, 10]).
Returns:
    {"R@1", "R@5", "R@10", "median_rank"}.
Examples:
    >>> metric = evaluate.load("evaluation/metrics/recall_at_k")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.8, 0.3]], references=[[0], [1]], ks=[1])
    {'R@1': 50.0, 'median_rank': 1.5}
"""


class RecallAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        widths = {len(row) for row in predictions}
        if len(widths) != 1:
            raise ValueError(f"every query must score the same candidates; got rows of lengths {sorted(widths)}")
        scores = torch.tensor(predictions, dtype=torch.float64)
        positives = torch.zeros_like(scores, dtype=torch.bool)
        for query, indices in enumerate(references):
            if not indices or min(indices) < 0 or max(indices) >= scores.shape[1]:
                raise ValueError(f"references[{query}] must be non-empty indices in [0, {scores.shape[1]}), "
                                 f"got {list(indices)}")
            positives[query, list(indices)] = True
        return rank_summary(best_positive_ranks(scores, positives), ks)
