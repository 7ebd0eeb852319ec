"""The box-free image feature: sliding windows over the global patch grid, read by the ROI
processor's dense head (the one the dense-region loss aligns with region captions) and pooled per
channel by a centred log-mean-exp, a soft maximum over windows.

(The processor's full-resolution proposals take the other box-free path: they are read as regions
are, by the ROI processor.)"""

import functools
import math
from collections.abc import Callable, Sequence

import torch

from .roi_regionmed_clip import roi_align

__all__ = ["log_mean_exp_centred", "pool_window_features", "sliding_window_boxes", "window_sampling_weights"]

# Log-sum-exp pooling of window features: 1 would be near a mean, large values near a max. Window
# features are LayerNorm-ed (unit scale), so 5 lets a channel's strongest windows dominate.
_PROPOSAL_POOL_SHARPNESS = 5.0
# `log_mean_exp_centred` takes logsumexp for a channel whose largest score exceeds this (exp(20) is
# far from float32 overflow).
_CENTRED_EXP_LIMIT = 20.0


def sliding_window_boxes(window_sizes: Sequence[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`(P, 4)` normalised xyxy windows: for each size (a fraction of the view side), square windows
    at a stride of half their side that tile the view, row-major."""
    boxes = []
    for size in window_sizes:
        steps = round((1 - size) / (size / 2)) + 1
        starts = torch.linspace(0, 1 - size, steps, device=device, dtype=dtype)
        y0, x0 = torch.meshgrid(starts, starts, indexing="ij")
        corners = torch.stack([x0.flatten(), y0.flatten()], dim=-1)
        boxes.append(torch.cat([corners, corners + size], dim=-1))
    return torch.cat(boxes)


@functools.lru_cache(maxsize=8)
def window_sampling_weights(window_sizes: tuple[float, ...], patch_grid: tuple[int, int], output_size: int,
                            device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`(P * G * G, gh * gw)`: `roi_align` of the `sliding_window_boxes` as a matrix on the flattened
    patch grid (rows in `roi_align`'s window, bin-row, bin-column order), made by aligning the identity."""
    cells = patch_grid[0] * patch_grid[1]
    identity = torch.eye(cells, device=device, dtype=dtype).reshape(1, cells, *patch_grid)
    windows = sliding_window_boxes(window_sizes, device, dtype)[None]
    return roi_align(identity, windows, output_size)[0].reshape(-1, cells)


def log_mean_exp_centred(scores: torch.Tensor) -> torch.Tensor:
    """`log(mean(exp(scores), dim=1))` of scores `(B, N, C)` centred over `N` (zero mean) -> `(B, C)`.

    For centred scores the result is second order in them, and `logsumexp - log(N)` (or
    `log1p(mean(expm1(.)))`) loses its digits to cancellation against the first-order terms, which
    sum to zero. Here only `exp(y) - 1 - y >= 0` is summed (a series below 0.1, where `expm1(y) - y`
    would cancel too). Channels whose largest score could overflow `exp` take `logsumexp` (their
    result is large, so it is exact enough)."""
    bounded = scores.clamp(max=_CENTRED_EXP_LIMIT)  # finite (and finite gradients) where logsumexp is taken
    series = bounded.square() * (0.5 + bounded * (1 / 6 + bounded * (1 / 24 + bounded / 120)))
    excess = torch.where(bounded.abs() < 0.1, series, torch.expm1(bounded) - bounded)
    centred = torch.log1p(excess.mean(dim=1))
    shifted = torch.logsumexp(scores, dim=1) - math.log(scores.shape[1])
    return torch.where(scores.amax(dim=1) > _CENTRED_EXP_LIMIT, shifted, centred)


def pool_window_features(
    global_tokens: torch.Tensor,
    patch_grid: tuple[int, int],
    window_sizes: Sequence[float],
    context_grid: int,
    dense_head: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The box-free feature of `global_tokens (B, 1 + P, C)` on a `(gh, gw)` patch grid: `(B, C)` in
    float32 whatever the model's dtype (the pool can be small: see `log_mean_exp_centred`).

    Each sliding window is RoIAligned to `context_grid x context_grid` bins and read by `dense_head`
    (`(B, N, G * G * C)` -> `(B, N, C)`); each channel's deviations from the image's mean window are
    pooled by `log_mean_exp_centred` at `_PROPOSAL_POOL_SHARPNESS`."""
    batch, _, hidden = global_tokens.shape
    # The windows are fixed, so their RoIAlign is one fixed linear map of the patch tokens: a matrix
    # product, where grid_sample's backward was 70% of this pool on CPU.
    weights = window_sampling_weights(tuple(window_sizes), patch_grid, context_grid, global_tokens.device,
                                      global_tokens.dtype)  # (P * G * G, gh * gw)
    sampled = (weights @ global_tokens[:, 1:]).reshape(batch, -1, context_grid**2 * hidden)
    window_features = dense_head(sampled)
    # A finding is present when SOME window shows it (multiple-instance learning): a soft max over
    # windows keeps a lesion that fills one window of 58 at full strength, where a mean or an
    # untrained attention pool dilutes it under the anatomy every film shares.
    # Deviations from the image's own mean window: the anatomy every window (and film) shares cancels.
    # In float32: the pool is second order in the deviations, so a half-precision rounding of
    # their mean (first order) would swamp it.
    features = window_features.float()
    deviations = features - features.mean(dim=1, keepdim=True)
    return log_mean_exp_centred(_PROPOSAL_POOL_SHARPNESS * deviations) / _PROPOSAL_POOL_SHARPNESS
