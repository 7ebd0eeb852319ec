"""Packing ragged rows into dense batches and back: the valid ROI crops and captions of a batch are
gathered across images (`valid_rows`, `scatter_rows`), and caption sets are joined, trimmed and
grouped by length so the text tower computes few padding tokens (`length_groups`)."""

import math

import torch
from torch import nn

__all__ = ["caption_lengths", "length_groups", "pad_and_join", "scatter_rows", "trim_padding", "valid_rows"]


def pad_and_join(caption_sets: list[tuple[torch.Tensor, torch.Tensor | None]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N_i, L_i)` ids (and masks, None = all tokens) -> one `(sum N_i, max L_i)` batch, right-padded."""
    length = max(ids.shape[1] for ids, _ in caption_sets)
    ids = torch.cat([nn.functional.pad(ids, (0, length - ids.shape[1]), value=pad_id) for ids, _ in caption_sets])
    mask = torch.cat([nn.functional.pad(torch.ones_like(ids) if mask is None else mask, (0, length - ids.shape[1]),
                                        value=0) for ids, mask in caption_sets])
    return ids, mask


def caption_lengths(mask: torch.Tensor) -> torch.Tensor:
    """`(N, L)` 0/1 mask -> `(N,)` one past each row's last token (its length when right-padded)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.to(torch.bool) * positions).amax(dim=1)


def length_groups(sorted_lengths: list[int], groups: int) -> list[int]:
    """Boundaries `[0, ..., N]` of at most `groups` runs of the ascending `sorted_lengths` that
    minimise the tokens computed, sum over runs of (size x longest), by dynamic programming over the
    distinct lengths (`U` of them: one `(U, U)` table per extra run)."""
    values, counts = torch.unique_consecutive(torch.tensor(sorted_lengths, dtype=torch.float64), return_counts=True)
    distinct = values.numel()
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0).double()])
    # run_cost[i, j]: tokens of one run holding the distinct lengths i..j, padded to values[j]
    run_cost = (cumulative[1:][None, :] - cumulative[:-1][:, None]) * values[None, :]
    run_cost = run_cost.masked_fill(torch.ones(distinct, distinct, dtype=torch.bool).tril(-1), math.inf)
    best, starts = run_cost[0], []  # best[j]: fewest tokens covering lengths 0..j; one run so far
    for _ in range(groups - 1):
        # The last run starts at i >= 1 after the best cover of 0..i-1, or nothing changes (start 0).
        candidates = torch.cat([best[None, :], best[:-1, None] + run_cost[1:]])  # (distinct, distinct)
        best, start = candidates.min(dim=0)
        starts.append(start)
    boundaries, end = [distinct], distinct - 1
    for start in reversed(starts):
        if (first := int(start[end])) == 0:  # this run count used fewer runs
            continue
        boundaries.append(first)
        end = first - 1
    return [int(cumulative[boundary]) for boundary in [0, *reversed(boundaries)]]


def trim_padding(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the trailing columns that are padding in every row (the tokens kept are unchanged)."""
    if mask is None:
        return ids, None
    length = max(int(caption_lengths(mask).max()), 1)
    return ids[:, :length], mask[:, :length]


def valid_rows(mask: torch.Tensor, *tensors: torch.Tensor | None
               ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """The True places of a bool `mask` over the tensors' leading dims, as index tensors, and each
    tensor's rows there (None stays None). One host read (the mask's nonzero) for all of them, where
    indexing each by the mask would wait for the device once per tensor, and again in backward."""
    index = mask.nonzero(as_tuple=True)
    return index, tuple(None if tensor is None else tensor[index] for tensor in tensors)


def scatter_rows(rows: torch.Tensor, index: tuple[torch.Tensor, ...], shape: torch.Size) -> torch.Tensor:
    """Packed `(N, D)` rows back into a zero `(*shape, D)` grid at `index` (from `valid_rows`). An
    `index_put`, whose backward gathers by the same index: `masked_scatter`'s reads the mask again."""
    return rows.new_zeros((*shape, rows.shape[-1])).index_put(index, rows)
