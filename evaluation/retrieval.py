"""Image-text retrieval Recall@K from a similarity matrix."""

from collections.abc import Sequence

import torch

__all__ = ["retrieval_recall_at_k"]


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
    if any(k <= 0 for k in ks):
        raise ValueError(f"ks must be positive, got {list(ks)}")
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity holds NaN or inf")

    # text -> image: rank of the true image = number of images scoring at least as high, minus one.
    true_scores = similarity[text_to_image, torch.arange(num_texts)]
    text_ranks = (similarity >= true_scores[None, :]).sum(0) - 1  # (N_texts,)
    # image -> text: best rank among the image's own texts.
    positives = text_to_image[None, :] == torch.arange(num_images, device=similarity.device)[:, None]
    best_true = similarity.masked_fill(~positives, float("-inf")).max(1).values  # (N_images,)
    image_ranks = (similarity >= best_true[:, None]).sum(1) - positives.sum(1).clamp(max=1)
    has_text = positives.any(1)
    results = {}
    for k in ks:
        results[f"image_to_text_R@{k}"] = 100.0 * (image_ranks[has_text] < k).float().mean().item()
        results[f"text_to_image_R@{k}"] = 100.0 * (text_ranks < k).float().mean().item()
    return results
