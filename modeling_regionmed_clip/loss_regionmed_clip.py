"""Contrastive losses of RegionMed-CLIP, as pure functions of embeddings (open_clip's `loss.py` style)."""

import torch
from torch import nn

__all__ = ["LOGIT_SCALE_MAX", "clamped_logit_scale", "clip_contrastive_loss"]

# CLIP clamps the learnable temperature so logits never exceed 100 x cosine similarity.
LOGIT_SCALE_MAX = 100.0


def clamped_logit_scale(log_logit_scale: torch.Tensor) -> torch.Tensor:
    """`exp(log_logit_scale)` clamped to `LOGIT_SCALE_MAX` (scalar)."""
    return log_logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)


def clip_contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of a square `(N, N)` image-text logit matrix whose diagonal holds the pairs."""
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            f"clip_contrastive_loss needs a square (N, N) logit matrix of matched pairs, got {tuple(logits_per_image.shape)}"
        )
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = nn.functional.cross_entropy(logits_per_image, targets)
    text_to_image = nn.functional.cross_entropy(logits_per_image.t(), targets)
    return (image_to_text + text_to_image) / 2
