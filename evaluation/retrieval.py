"""Image-text retrieval: ranks of the true items, Recall@K and median rank."""

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["best_positive_ranks", "rank_summary", "retrieval_recall_at_k"]


def best_positive_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Zero-based rank of each query's best-scoring positive candidate among all candidates.

    scores `(Q, C)`; positives `(Q, C)` bool, at least one per row. Ties rank the positive last among
    the candidates it ties with (no optimism); other positives of the same query do not push it
    down. Returns `(Q,)` int64.
    """
    if scores.ndim != 2 or positives.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be the same (Q, C)")
    if not torch.isfinite(scores).all():
        raise ValueError("scores hold NaN or inf")
    positives = positives.to(device=scores.device, dtype=torch.bool)
    if not positives.any(1).all():
        raise ValueError("every query needs at least one positive candidate")
    best = scores.masked_fill(~positives, float("-inf")).max(1).values
    return ((scores >= best[:, None]) & ~positives).sum(1)


def rank_summary(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`{"R@K": percent of ranks < K, ..., "median_rank": 1-based median}` of zero-based `ranks` `(Q,)`."""
    if any(k <= 0 for k in ks):
        raise ValueError(f"ks must be positive, got {list(ks)}")
    if ranks.numel() == 0:
        raise ValueError("no ranks to summarise")
    summary = {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}
    summary["median_rank"] = float(np.median(ranks.cpu().numpy() + 1))  # mean of the middle two when even
    return summary


def retrieval_recall_at_k(
    similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10), text_to_image: torch.Tensor | None = None
) -> dict[str, float]:
    """Recall@K in percent, both directions.

    similarity `(N_images, N_texts)`; `text_to_image` `(N_texts,)` gives each text's image index
    (default: text i belongs to image i, which needs a square matrix). An image counts as found
    when any of its texts ranks in the top K. Ties rank the correct item last (no optimism).
    Returns `{"image_to_text_R@K": ..., "text_to_image_R@K": ...}`.
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (N_images, N_texts), got shape {tuple(similarity.shape)}")
    num_images, num_texts = similarity.shape
    if text_to_image is None:
        if num_images != num_texts:
            raise ValueError(f"text_to_image is required for a non-square similarity {num_images}x{num_texts}")
        text_to_image = torch.arange(num_texts)
    text_to_image = text_to_image.to(similarity.device)
    if text_to_image.shape != (num_texts,) or text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image must hold {num_texts} image indices in [0, {num_images})")
    positives = text_to_image[None, :] == torch.arange(num_images, device=similarity.device)[:, None]
    has_text = positives.any(1)
    image_ranks = best_positive_ranks(similarity[has_text], positives[has_text])
    text_ranks = best_positive_ranks(similarity.t(), positives.t())
    image_side, text_side = rank_summary(image_ranks, ks), rank_summary(text_ranks, ks)
    return {f"{direction}_R@{k}": side[f"R@{k}"]
            for k in ks for direction, side in (("image_to_text", image_side), ("text_to_image", text_side))}
