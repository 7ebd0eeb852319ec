"""Image-text retrieval: ranks of the true items, Recall@K and median rank.

`retrieval_ranks` / `retrieval_metrics` work from the embeddings in query chunks, so the extra memory
stays within a budget whatever the number of images and texts (the full similarity matrix of 100k x 100k
pairs would take 40 GB in float32); `retrieval_recall_at_k` takes a similarity matrix the caller already
holds and ranks it with the same chunked code.
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["best_positive_ranks", "rank_summary", "retrieval_metrics", "retrieval_ranks", "retrieval_recall_at_k"]

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# float32 counts 0/1 values exactly while the total stays below 2**24; past that, count in float64.
_FLOAT32_EXACT_COUNT = 2**24
_FINITE_CHECK_BLOCK_BYTES = 4 * 2**20


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


def _check_ks(ks: Sequence[int]) -> None:
    if any(k <= 0 for k in ks):
        raise ValueError(f"ks must be positive, got {list(ks)}")


def rank_summary(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`{"R@K": percent of ranks < K, ..., "median_rank": 1-based median}` of zero-based `ranks` `(Q,)`."""
    _check_ks(ks)
    if ranks.numel() == 0:
        raise ValueError("no ranks to summarise")
    summary = {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}
    summary["median_rank"] = float(np.median(ranks.cpu().numpy() + 1))  # mean of the middle two when even
    return summary


# --- chunked ranking -----------------------------------------------------------------------------


def _count_dtype(dtype: torch.dtype, n_candidates: int) -> torch.dtype:
    """The float dtype that counts up to `n_candidates` ones exactly."""
    if dtype == torch.float64 or n_candidates >= _FLOAT32_EXACT_COUNT:
        return torch.float64
    return torch.float32


def _rows_per_chunk(n_candidates: int, dtype: torch.dtype, budget: int, extra_row_bytes: int = 0) -> int:
    """Query rows per chunk so that the chunk's `(B, n_candidates)` temporaries fit in `budget` bytes.

    A chunk holds one score matrix `(B, n_candidates)` in `dtype`, compared in place (`ge_`) and summed
    in its own dtype; only a half-precision one is summed through a float32/float64 copy. At least one row.
    """
    count_dtype = _count_dtype(dtype, n_candidates)
    per_element = dtype.itemsize + (0 if count_dtype == dtype else count_dtype.itemsize)
    return max(1, budget // (n_candidates * per_element + extra_row_bytes))


def _count_at_least(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row of `scores` `(B, C)` (overwritten), how many entries are >= `threshold` `(B,)`; `(B,)` int64.

    Compares in place and sums the 0/1 floats: `(scores >= t).sum(1)` would allocate a bool matrix and,
    on CPU, an int64 copy of it (9 bytes per score).
    """
    count_dtype = _count_dtype(scores.dtype, scores.shape[1])
    flags = scores.ge_(threshold[:, None])
    return flags.sum(1, dtype=None if count_dtype == scores.dtype else count_dtype).long()


def _image_to_text_ranks(
    image_rows: Callable[[torch.Tensor], torch.Tensor], text_to_image: torch.Tensor, n_images: int,
    rows_per_chunk: int,
) -> torch.Tensor:
    """Ranks `(N_images_with_text,)` of each image's best text, images in index order.

    `image_rows(image_indices (B,))` returns a fresh `(B, N_texts)` score matrix (it is overwritten).
    The positives come from `text_to_image` `(N_texts,)` sorted by image: no `(N_images, N_texts)` mask.
    """
    device = text_to_image.device
    counts = torch.bincount(text_to_image, minlength=n_images)  # texts per image
    queries = counts.nonzero().squeeze(1)  # images with a text, ascending
    query_counts = counts[queries]
    texts_by_image = torch.argsort(text_to_image, stable=True)  # texts grouped by image, images ascending
    starts = [0, *query_counts.cumsum(0).tolist()]  # query j's texts: texts_by_image[starts[j]:starts[j + 1]]
    ranks = torch.empty(len(queries), dtype=torch.long, device=device)
    for first in range(0, len(queries), rows_per_chunk):
        last = min(first + rows_per_chunk, len(queries))
        scores = image_rows(queries[first:last])
        texts = texts_by_image[starts[first]:starts[last]]
        rows = torch.repeat_interleave(torch.arange(last - first, device=device), query_counts[first:last])
        positive_scores = scores[rows, texts]  # a copy: the scores are overwritten below
        best = torch.full((last - first,), float("-inf"), dtype=scores.dtype, device=device)
        best.scatter_reduce_(0, rows, positive_scores, reduce="amax")
        positives_at_least = torch.zeros(last - first, dtype=torch.long, device=device)
        positives_at_least.scatter_add_(0, rows, (positive_scores >= best[rows]).long())
        ranks[first:last] = _count_at_least(scores, best) - positives_at_least
        del scores  # before the next chunk is made: two alive at once would double the peak
    return ranks


def _text_to_image_ranks(
    text_rows: Callable[[torch.Tensor], torch.Tensor], text_to_image: torch.Tensor, rows_per_chunk: int
) -> torch.Tensor:
    """Ranks `(N_texts,)` of each text's image. `text_rows(text_indices (B,))` returns a fresh `(B, N_images)`."""
    device = text_to_image.device
    n_texts = len(text_to_image)
    ranks = torch.empty(n_texts, dtype=torch.long, device=device)
    for first in range(0, n_texts, rows_per_chunk):
        last = min(first + rows_per_chunk, n_texts)
        scores = text_rows(torch.arange(first, last, device=device))
        positive_scores = scores[torch.arange(last - first, device=device), text_to_image[first:last]]
        ranks[first:last] = _count_at_least(scores, positive_scores) - 1  # the positive counts itself
        del scores
    return ranks


def _check_finite(values: torch.Tensor, name: str, budget: int) -> None:
    """Raise unless `values` `(N, M)` is finite, checked in row blocks whose temporaries fit in `budget` bytes.

    `torch.isfinite` makes an `abs()` copy and three bool masks: about `itemsize + 3` bytes per element.
    Blocks stay small (`_FINITE_CHECK_BLOCK_BYTES`) as well: freed, they can stay resident in the C heap
    while the large score chunks are mapped on top of them.
    """
    block_bytes = min(budget, _FINITE_CHECK_BLOCK_BYTES)
    rows = max(1, block_bytes // max(1, values.shape[1] * (values.dtype.itemsize + 3)))
    for first in range(0, values.shape[0], rows):
        if not torch.isfinite(values[first:first + rows]).all():
            raise ValueError(f"{name} holds NaN or inf")


def _check_budget(memory_budget_bytes: int) -> int:
    if (isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, numbers.Integral)
            or memory_budget_bytes <= 0):
        raise ValueError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")
    return int(memory_budget_bytes)


def _check_text_to_image(text_to_image: torch.Tensor, n_texts: int, n_images: int, device: torch.device) -> torch.Tensor:
    """`text_to_image` as int64 on `device`, or a ValueError naming it."""
    if not isinstance(text_to_image, torch.Tensor):
        raise ValueError(f"text_to_image must be a tensor of image indices, got {type(text_to_image).__name__}")
    if text_to_image.dtype == torch.bool or text_to_image.is_floating_point() or text_to_image.is_complex():
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must have shape ({n_texts},) (one image index per text), "
                         f"got {tuple(text_to_image.shape)}")
    text_to_image = text_to_image.to(device=device, dtype=torch.long)
    if n_texts and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image must hold {n_texts} image indices in [0, {n_images}), got values in "
                         f"[{text_to_image.min().item()}, {text_to_image.max().item()}]")
    return text_to_image


def retrieval_ranks(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> dict[str, torch.Tensor]:
    """Zero-based retrieval ranks in both directions, computed in query chunks.

    image_embeds `(N_i, D)` and text_embeds `(N_t, D)`, floating point, same dtype and device, compared
    by dot product (callers pass normalised embeddings); text_to_image `(N_t,)` integer: each text's
    image index (several texts per image allowed; images without a text are left out of image->text).

    Returns `{"image_to_text": (N_i_with_text,) int64, "text_to_image": (N_t,) int64}` on the inputs'
    device: image->text ranks of each image's best text, images with a text in index order; text->image
    ranks of each text's image. They equal `best_positive_ranks` on the full similarity matrix `(N_i, N_t)`
    (ties rank the positive last; other positives of the same query don't push it down), but no
    `(N_i, N_t)` tensor is made: queries go `B` at a time, `B` chosen so that the `(B, N)` score chunk (plus
    a float32 copy for half-precision inputs) fits in `memory_budget_bytes` (at least one row). Beyond that,
    only `O(N_i + N_t)` index vectors, the returned ranks, a few MiB of finite-check blocks and the matrix
    product's own workspace are allocated. Scores are computed per chunk (`chunk @ candidates.T`), so they
    may differ from a full-matrix product in the last bit; each query's positive and its competitors come
    from the same product, so exact ties (duplicate embeddings) still rank the positive last.
    """
    for name, embeds in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2:
            raise ValueError(f"{name} must be a (N, D) tensor, got {getattr(embeds, 'shape', type(embeds).__name__)}")
        if not embeds.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {embeds.dtype}")
        if embeds.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(embeds.shape)}")
    if text_embeds.shape[1] != image_embeds.shape[1]:
        raise ValueError(f"text_embeds has D={text_embeds.shape[1]} but image_embeds has D={image_embeds.shape[1]}")
    if text_embeds.dtype != image_embeds.dtype:
        raise ValueError(f"text_embeds ({text_embeds.dtype}) and image_embeds ({image_embeds.dtype}) must share a dtype")
    if text_embeds.device != image_embeds.device:
        raise ValueError(f"text_embeds ({text_embeds.device}) and image_embeds ({image_embeds.device}) "
                         "must be on one device")
    memory_budget_bytes = _check_budget(memory_budget_bytes)
    n_images, dim = image_embeds.shape
    n_texts = text_embeds.shape[0]
    text_to_image = _check_text_to_image(text_to_image, n_texts, n_images, image_embeds.device)
    _check_finite(image_embeds, "image_embeds", memory_budget_bytes)
    _check_finite(text_embeds, "text_embeds", memory_budget_bytes)

    row_bytes = dim * image_embeds.dtype.itemsize  # the chunk's copy of its query embeddings
    image_to_text = _image_to_text_ranks(
        lambda images: image_embeds.index_select(0, images) @ text_embeds.T, text_to_image, n_images,
        _rows_per_chunk(n_texts, image_embeds.dtype, memory_budget_bytes, row_bytes))
    text_to_image_ranks = _text_to_image_ranks(
        lambda texts: text_embeds.index_select(0, texts) @ image_embeds.T, text_to_image,
        _rows_per_chunk(n_images, image_embeds.dtype, memory_budget_bytes, row_bytes))
    return {"image_to_text": image_to_text, "text_to_image": text_to_image_ranks}


def retrieval_metrics(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10), memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> dict[str, Any]:
    """Recall@K and median rank of `retrieval_ranks` (same arguments and shapes), both directions.

    Returns `{"image_to_text": rank_summary(...), "text_to_image": rank_summary(...), "n_images": N_i,
    "n_texts": N_t, "n_images_with_text": the image->text queries}`.
    """
    _check_ks(ks)
    ranks = retrieval_ranks(image_embeds, text_embeds, text_to_image, memory_budget_bytes)
    return {
        "image_to_text": rank_summary(ranks["image_to_text"], ks),
        "text_to_image": rank_summary(ranks["text_to_image"], ks),
        "n_images": image_embeds.shape[0],
        "n_texts": text_embeds.shape[0],
        "n_images_with_text": len(ranks["image_to_text"]),
    }


def retrieval_recall_at_k(
    similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10), text_to_image: torch.Tensor | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> dict[str, float]:
    """Recall@K in percent, both directions, from a similarity matrix the caller holds.

    similarity `(N_images, N_texts)`; `text_to_image` `(N_texts,)` gives each text's image index
    (default: text i belongs to image i, which needs a square matrix). An image counts as found
    when any of its texts ranks in the top K. Ties rank the correct item last (no optimism).
    Ranked in row chunks of at most `memory_budget_bytes` (see `retrieval_ranks`, which starts from
    the embeddings and needs no matrix at all). Returns `{"image_to_text_R@K": ..., "text_to_image_R@K": ...}`.
    """
    if not isinstance(similarity, torch.Tensor) or similarity.ndim != 2:
        raise ValueError(f"similarity must be (N_images, N_texts), got shape {tuple(getattr(similarity, 'shape', ()))}")
    if not similarity.is_floating_point():
        raise ValueError(f"similarity must be floating point, got dtype {similarity.dtype}")
    if similarity.numel() == 0:
        raise ValueError(f"similarity is empty: shape {tuple(similarity.shape)}")
    _check_ks(ks)
    memory_budget_bytes = _check_budget(memory_budget_bytes)
    num_images, num_texts = similarity.shape
    if text_to_image is None:
        if num_images != num_texts:
            raise ValueError(f"text_to_image is required for a non-square similarity {num_images}x{num_texts}")
        text_to_image = torch.arange(num_texts)
    text_to_image = _check_text_to_image(text_to_image, num_texts, num_images, similarity.device)
    _check_finite(similarity, "similarity", memory_budget_bytes)

    image_ranks = _image_to_text_ranks(
        lambda images: similarity.index_select(0, images), text_to_image, num_images,
        _rows_per_chunk(num_texts, similarity.dtype, memory_budget_bytes))
    text_ranks = _text_to_image_ranks(
        lambda texts: similarity.index_select(1, texts).T, text_to_image,
        _rows_per_chunk(num_images, similarity.dtype, memory_budget_bytes))
    image_side, text_side = rank_summary(image_ranks, ks), rank_summary(text_ranks, ks)
    return {f"{direction}_R@{k}": side[f"R@{k}"]
            for k in ks for direction, side in (("image_to_text", image_side), ("text_to_image", text_side))}
