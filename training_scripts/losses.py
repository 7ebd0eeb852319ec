"""The training objective of RegionMed-CLIP, as pure functions of embeddings (open_clip's `loss.py` style).

It lives on the training side: the shipped model (remote code) computes only a plain CLIP loss when
asked (`forward(..., return_loss=True)`), and holds no `torch.distributed` code and no training
knobs. `training_loss` turns a model output and its batch into the named terms of `LOSS_TERMS`.

Every function takes L2-normalised embeddings and the (already clamped) logit scale. Across
processes, features are gathered WITH gradients (`torch.distributed.nn.functional.all_gather`),
as open_clip's `gather_with_grad=True` does; `local_loss=True` keeps only this rank's rows as
anchors (against every rank's candidates), which saves the `(N_all x N_all)` logits. A local loss
is this rank's SUM over its anchors divided by `N_all / world_size`, not its own mean: the ranks'
anchor counts differ (valid ROIs always, rows sometimes), and only then does DDP's average over
ranks equal the mean over the union batch.

Gradients under gathering: each rank's features receive the SUM over ranks of the gradient of
that rank's loss, i.e. `world_size x` the single-process gradient of the mean loss; DDP then
averages parameter gradients over ranks, which cancels the factor, exactly as in open_clip.

Captions repeat (many films share "Normal chest X-ray."): `text_groups` marks identical
captions, and every caption of the anchor's group counts as a positive (multi-positive
InfoNCE) instead of being pushed away as a false negative.
"""

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "ContrastiveLossConfig",
    "DEFAULT_LOSS_WEIGHTS",
    "LOSS_TERMS",
    "TERM_CAPTION_LEVELS",
    "caption_groups",
    "gather_features",
    "global_contrastive_loss",
    "hard_negative_loss",
    "image_region_loss",
    "multi_positive_info_nce",
    "negative_text_margin_loss",
    "rank_sizes",
    "region_contrastive_loss",
    "regionmed_clip_loss",
    "training_loss",
]

@dataclass(frozen=True)
class ContrastiveLossConfig:
    """How losses see other ranks, and the in-batch hard-negative mining (the run YAML's `loss:` section).

    local_loss: anchors are this rank's rows only, against every rank's candidates.
    hardest_k / hard_negative_weight: the k hardest non-matching captions of each anchor have their
        exp(logit) multiplied by the weight (`hard_negative_loss`).
    negative_text_margin: cosine above which a region caption and one of its own negatives are pushed
        apart (`negative_text_margin_loss`: the text tower must not merge a statement with its falsification).
    """

    local_loss: bool = False
    gather_with_grad: bool = True
    hardest_k: int = 3
    hard_negative_weight: float = 2.0
    negative_text_margin: float = 0.7

    def __post_init__(self) -> None:
        if isinstance(self.hardest_k, bool) or not isinstance(self.hardest_k, int) or self.hardest_k < 0:
            raise ValueError(f"loss.hardest_k must be a non-negative integer, got {self.hardest_k!r}")
        if not isinstance(self.hard_negative_weight, (int, float)) or not self.hard_negative_weight >= 1.0:
            raise ValueError(f"loss.hard_negative_weight must be >= 1 (an up-weighting), got {self.hard_negative_weight!r}")
        if isinstance(self.negative_text_margin, bool) or not isinstance(self.negative_text_margin, (int, float)) \
                or not -1.0 <= self.negative_text_margin <= 1.0:
            raise ValueError(f"loss.negative_text_margin must be a cosine in [-1, 1], got {self.negative_text_margin!r}")


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_sizes(*sizes: int, device: torch.device) -> list[list[int]]:
    """Every rank's values of this rank's `sizes`, in one all-gather and one host read: `result[i][r]`
    is size `i` on rank `r`. Without a process group: `[[size] for size in sizes]`.

    A loss gathers several tensors that share their ragged sizes (anchors, candidates and their
    caption groups): reading the sizes once for all of them spares a collective and a host wait each."""
    _, world = _distributed()
    if world == 1:
        return [[size] for size in sizes]
    local = torch.tensor(sizes, device=device)
    everyone = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(everyone, local)
    return torch.stack(everyone).t().tolist()


def gather_features(features: torch.Tensor, gather_with_grad: bool = True, counts: list[int] | None = None
                    ) -> tuple[torch.Tensor, int]:
    """Concatenate `(N_r, ...)` features of every rank (ragged N_r allowed) -> `(sum N_r, ...)`, and
    the offset of this rank's rows in it. `counts` are every rank's N_r when already known
    (`rank_sizes`); else they are gathered first. Without a process group it returns the input and 0."""
    rank, world = _distributed()
    if world == 1:
        return features, 0
    if counts is None:
        counts = rank_sizes(features.shape[0], device=features.device)[0]
    if features.dtype == torch.bool:  # not every backend gathers bools
        gathered, offset = gather_features(features.to(torch.uint8), gather_with_grad=False, counts=counts)
        return gathered.bool(), offset
    # all_gather needs equal shapes: pad to the largest rank, then cut the padding off again.
    padded = features.new_zeros((max(counts), *features.shape[1:]))
    padded[: features.shape[0]] = features
    if gather_with_grad:
        pieces = torch.distributed.nn.functional.all_gather(padded)
    else:
        pieces = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
        pieces[rank] = padded  # keep the local rows differentiable
    gathered = torch.cat([piece[:n] for piece, n in zip(pieces, counts, strict=True)])
    return gathered, sum(counts[:rank])


def _pad_dim1(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad dimension 1 to `size` (e.g. M negatives per image, ragged across ranks, before a gather)."""
    extra = size - tensor.shape[1]
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((tensor.shape[0], extra, *tensor.shape[2:]))], dim=1)


@functools.lru_cache(maxsize=16)
def _hash_coefficients(length: int, device: torch.device) -> torch.Tensor:
    """Kept per device: made each step, they would be a host-to-device copy each time."""
    return torch.tensor([pow(1_000_003, t, 2**31 - 1) for t in range(length)], device=device)


def caption_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`(..., L)` token ids -> `(...)` int64 ids, equal for identical captions (padding ignored).

    A polynomial hash rather than `torch.unique`, so ids agree across ranks without communication.
    Coefficients stay below 2^31 and ids below 2^17, so the sum cannot overflow int64 for L <= 2^15.
    """
    coefficients = _hash_coefficients(input_ids.shape[-1], input_ids.device)
    tokens = input_ids.long() + 1
    if attention_mask is not None:
        tokens = tokens * (attention_mask != 0)
    return (tokens * coefficients).sum(-1)


def _gathered_groups(groups: torch.Tensor | None, total: int, device: torch.device, counts: list[int]) -> torch.Tensor:
    """Caption groups of every rank's rows (`counts` of them per rank); without groups each row is its own group."""
    if groups is None:
        return torch.arange(total, device=device)
    return gather_features(groups, gather_with_grad=False, counts=counts)[0]


def multi_positive_info_nce(
    logits: torch.Tensor, positives: torch.Tensor, denominator: float | None = None
) -> torch.Tensor:
    """`-log(sum_pos softmax(logits))` per row, averaged; logits `(N, M)`, positives `(N, M)` bool.

    With one positive per row this is cross-entropy. Rows without a positive are ignored. The
    rows' sum is divided by `denominator` when given (a local loss: see the module docstring),
    else by the number of rows with a positive.
    """
    has_positive = positives.any(dim=1)
    positive_logits = logits.masked_fill(~positives, torch.finfo(logits.dtype).min)
    per_row = torch.logsumexp(logits, dim=1) - torch.logsumexp(positive_logits, dim=1)
    # Masked rather than indexed: selecting the rows would make the host wait for the device. A row
    # without a positive (its value meaningless) gets neither a value nor a gradient from `where`.
    per_row = torch.where(has_positive, per_row, 0.0)
    return per_row.sum() / (has_positive.sum().clamp(min=1) if denominator is None else denominator)


def _local_denominator(total_anchors: int) -> float:
    """What a rank divides its local sum by, so DDP's mean over ranks is the union batch's mean."""
    return total_anchors / _distributed()[1]


def _symmetric_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None,
    config: ContrastiveLossConfig,
) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of `anchors (N, D)` and `candidates (N, D)`, over all ranks."""
    count = anchors.shape[0]
    (counts,) = rank_sizes(count, device=anchors.device)
    all_anchors, offset = gather_features(anchors, config.gather_with_grad, counts)
    all_candidates, _ = gather_features(candidates, config.gather_with_grad, counts)
    all_groups = _gathered_groups(groups, all_anchors.shape[0], anchors.device, counts)
    if config.local_loss:
        rows = slice(offset, offset + count)
        positives = all_groups[rows, None] == all_groups[None, :]
        forward = logit_scale * all_anchors[rows] @ all_candidates.t()
        backward = logit_scale * all_candidates[rows] @ all_anchors.t()
        denominator = _local_denominator(all_anchors.shape[0])
        return (multi_positive_info_nce(forward, positives, denominator)
                + multi_positive_info_nce(backward, positives, denominator)) / 2
    positives = all_groups[:, None] == all_groups[None, :]
    logits = logit_scale * all_anchors @ all_candidates.t()
    return (multi_positive_info_nce(logits, positives) + multi_positive_info_nce(logits.t(), positives)) / 2


def global_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    text_groups: torch.Tensor | None = None,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
) -> torch.Tensor:
    """Image `(B, D)` <-> its caption `(B, D)` (report or summary), symmetric, over the gathered batch."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must match")
    return _symmetric_loss(image_embeds, text_embeds, logit_scale, text_groups, config)


def _roi_index(roi_mask: torch.Tensor, roi_index: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...]:
    """The valid ROIs' indices: as given, else read from the mask (one host read; indexing each tensor
    by the mask would wait for the device once per tensor)."""
    return roi_mask.nonzero(as_tuple=True) if roi_index is None else roi_index


def region_contrastive_loss(
    region_embeds: torch.Tensor,
    region_text_embeds: torch.Tensor,
    roi_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    text_groups: torch.Tensor | None = None,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
    *,
    roi_index: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Each valid ROI `(B, K, D)` against the region captions `(B, K, D)` of ALL valid ROIs of the
    gathered batch. `text_groups (B, K)` marks identical region captions. Zero when no ROI is valid.
    `roi_index`: `roi_mask.nonzero(as_tuple=True)` when the caller has read it already."""
    if region_embeds.shape != region_text_embeds.shape or region_embeds.shape[:2] != roi_mask.shape:
        raise ValueError(
            f"region_embeds {tuple(region_embeds.shape)}, region_text_embeds {tuple(region_text_embeds.shape)} "
            f"and roi_mask {tuple(roi_mask.shape)} must agree on (B, K)"
        )
    valid = _roi_index(roi_mask, roi_index)
    groups = text_groups[valid] if text_groups is not None else None
    return _symmetric_loss(region_embeds[valid], region_text_embeds[valid], logit_scale, groups, config)


def image_region_loss(
    image_embeds: torch.Tensor,
    region_text_embeds: torch.Tensor,
    roi_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    text_groups: torch.Tensor | None = None,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
    *,
    roi_index: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Region caption -> image InfoNCE: every valid region caption `(B, K, D)` must pick its own
    image `(B, D)` among the gathered batch's images (multi-positive: an image holding an identical
    caption counts too). It teaches the image embedding, box-free, to hold each of its findings and
    where they are: short captions are a direct signal that long reports are not. Zero without ROIs.
    `roi_index`: `roi_mask.nonzero(as_tuple=True)` when the caller has read it already."""
    if region_text_embeds.shape[:2] != roi_mask.shape or region_text_embeds.shape[0] != image_embeds.shape[0]:
        raise ValueError(
            f"region_text_embeds {tuple(region_text_embeds.shape)} and roi_mask {tuple(roi_mask.shape)} must be "
            f"(B={image_embeds.shape[0]}, K, D) and (B, K)"
        )
    valid = _roi_index(roi_mask, roi_index)
    captions = region_text_embeds[valid]
    image_counts, caption_counts = rank_sizes(image_embeds.shape[0], captions.shape[0], device=captions.device)
    all_images, image_offset = gather_features(image_embeds, config.gather_with_grad, image_counts)
    owners = valid[0] + image_offset  # the row of each valid region's image in the gathered batch
    all_captions, caption_offset = gather_features(captions, config.gather_with_grad, caption_counts)
    all_owners, _ = gather_features(owners, gather_with_grad=False, counts=caption_counts)
    groups = None if text_groups is None else text_groups[valid]
    all_groups = _gathered_groups(groups, all_captions.shape[0], captions.device, caption_counts)
    # positives[n, b]: image b holds a caption of caption n's group (its own image always does)
    # (one_hot would check the owners' range on the host)
    owner_onehot = (all_owners[:, None] == torch.arange(all_images.shape[0], device=all_owners.device)).float()
    positives = ((all_groups[:, None] == all_groups[None, :]).float() @ owner_onehot) > 0
    if config.local_loss:
        rows = slice(caption_offset, caption_offset + captions.shape[0])
        logits = logit_scale * all_captions[rows] @ all_images.t()
        return multi_positive_info_nce(logits, positives[rows], _local_denominator(all_captions.shape[0]))
    return multi_positive_info_nce(logit_scale * all_captions @ all_images.t(), positives)


def _check_negatives(anchors: torch.Tensor, negative_embeds: torch.Tensor, negative_mask: torch.Tensor) -> None:
    """Each of the N anchors `(N, D)` has M negatives `(N, M, D)` with a validity mask `(N, M)`."""
    if negative_embeds.shape[:2] != negative_mask.shape or negative_embeds.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"negative_embeds {tuple(negative_embeds.shape)} and negative_mask {tuple(negative_mask.shape)} "
            f"must be (N={anchors.shape[0]}, M, D) and (N, M)"
        )


def hard_negative_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    negative_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    text_groups: torch.Tensor | None = None,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
) -> torch.Tensor:
    """Image -> text InfoNCE where each image's own negative captions join the candidates
    (NegCLIP), and the `hardest_k` non-matching candidates of each row are up-weighted by
    `hard_negative_weight` (their `exp(logit)` multiplied by it; the choice is not differentiated).

    image_embeds, text_embeds `(B, D)`; negative_embeds `(B, M, D)`; negative_mask `(B, M)` bool.
    """
    _check_negatives(image_embeds, negative_embeds, negative_mask)
    count = image_embeds.shape[0]
    counts, negative_counts = rank_sizes(count, negative_embeds.shape[1], device=text_embeds.device)
    all_texts, offset = gather_features(text_embeds, config.gather_with_grad, counts)
    groups = _gathered_groups(text_groups, all_texts.shape[0], text_embeds.device, counts)
    if config.local_loss:
        anchors = image_embeds
        row_groups = groups[offset : offset + count]
        own_negatives, own_negative_mask = negative_embeds, negative_mask
    else:
        anchors, _ = gather_features(image_embeds, config.gather_with_grad, counts)
        row_groups = groups
        # M is ragged across ranks too: pad every rank's negatives to the largest before gathering
        most = max(negative_counts)
        own_negatives, _ = gather_features(_pad_dim1(negative_embeds, most), config.gather_with_grad, counts)
        own_negative_mask, _ = gather_features(_pad_dim1(negative_mask, most), gather_with_grad=False, counts=counts)
    in_batch = logit_scale * anchors @ all_texts.t()  # (R, T)
    negatives = logit_scale * torch.einsum("rd,rmd->rm", anchors, own_negatives)  # (R, M)
    negatives = negatives.masked_fill(~own_negative_mask, torch.finfo(negatives.dtype).min)
    logits = torch.cat([in_batch, negatives], dim=1)
    positives = torch.zeros_like(logits, dtype=torch.bool)
    positives[:, : all_texts.shape[0]] = row_groups[:, None] == groups[None, :]
    if config.hardest_k > 0 and config.hard_negative_weight != 1.0:
        candidates = logits.detach().masked_fill(positives, torch.finfo(logits.dtype).min)
        k = min(config.hardest_k, candidates.shape[1])
        hardest = torch.zeros_like(positives)
        hardest.scatter_(1, candidates.topk(k, dim=1).indices, True)
        # never up-weight a padding slot or a positive that topk had to pick for lack of candidates
        hardest &= candidates > torch.finfo(logits.dtype).min
        logits = logits + hardest * torch.log(torch.tensor(config.hard_negative_weight, dtype=logits.dtype))
    denominator = _local_denominator(all_texts.shape[0]) if config.local_loss else None
    return multi_positive_info_nce(logits, positives, denominator)


def negative_text_margin_loss(
    text_embeds: torch.Tensor, negative_embeds: torch.Tensor, negative_mask: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mean over captions of `relu(cos(caption, its hardest negative) - margin)`, the hardest being
    its own valid negative nearest to it.

    A negative is the caption with one fact changed ("cavity" for "nodule"). Where the images cannot
    yet tell the two apart, the image-anchored terms pull both captions towards the same regions and
    the text tower keeps them at cosine ~0.998 (measured), which leaves the image side no target to
    learn the difference towards. This term stops the text tower from merging a statement with its
    falsification; above `margin` apart it is silent, so it does not order the captions by itself.
    The hardest negative only: a mean over all of a caption's negatives let the one look-alike
    among six edits (the rest already apart) fade (measured: cosine 0.995 after 900 steps).

    text_embeds `(N, D)` L2-normalised; negative_embeds `(N, M, D)`; negative_mask `(N, M)` bool.
    Local: it couples no two examples, so no gathering.
    """
    _check_negatives(text_embeds, negative_embeds, negative_mask)
    cosine = torch.einsum("nd,nmd->nm", text_embeds, negative_embeds)
    excess = torch.relu(cosine - margin) * negative_mask  # (N, M), >= 0
    if excess.shape[1] == 0:  # no negatives at all
        return excess.sum()
    hardest = excess.amax(dim=1)  # (N,)
    has_negative = negative_mask.any(dim=1)
    # An empty batch still returns a graph-connected zero (DDP expects every term's parameters used).
    return (hardest * has_negative).sum() / has_negative.sum().clamp(min=1)


LOSS_TERMS = ("global_report", "global_summary", "image_region", "region", "dense_region", "hard_negative",
              "region_hard_negative", "negative_text_margin")
# Which caption levels (`processing.CAPTION_LEVELS`) each term reads, beside the images.
TERM_CAPTION_LEVELS: dict[str, tuple[str, ...]] = {
    "global_report": ("report",),
    "global_summary": ("summary",),
    "image_region": ("region",),
    "region": ("region",),
    "dense_region": ("region",),
    "hard_negative": ("report", "negative"),
    "region_hard_negative": ("region", "region_negative"),
    "negative_text_margin": ("region", "region_negative"),
}
# The one table of default weights (the default stage's, training_scripts/schedule.py): the global loss
# leads, the region, dense-region and hard-negative terms refine it, the margin keeps look-alike
# region captions apart (docs/TRAINING.md, entries 9-11).
DEFAULT_LOSS_WEIGHTS = {"global_report": 1.0, "global_summary": 0.5, "image_region": 1.0, "region": 0.5,
                        "dense_region": 0.5, "hard_negative": 0.5, "region_hard_negative": 0.5,
                        "negative_text_margin": 5.0}


def _mean_over(anchor_sets: list[torch.Tensor], term) -> torch.Tensor:
    """Mean of `term(anchors)` over the anchor sets (e.g. the box-free and the region-pooled images)."""
    return sum(term(anchors) for anchors in anchor_sets) / len(anchor_sets)


def regionmed_clip_loss(
    weights: dict[str, float],
    logit_scale: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_groups: torch.Tensor | None = None,
    summary_text_embeds: torch.Tensor | None = None,
    summary_groups: torch.Tensor | None = None,
    region_embeds: torch.Tensor | None = None,
    region_text_embeds: torch.Tensor | None = None,
    roi_mask: torch.Tensor | None = None,
    region_groups: torch.Tensor | None = None,
    negative_text_embeds: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
    box_free_image_embeds: torch.Tensor | None = None,
    dense_region_embeds: torch.Tensor | None = None,
    region_negative_embeds: torch.Tensor | None = None,
    region_negative_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the loss terms in `LOSS_TERMS`; terms with weight 0 are not computed.

    `box_free_image_embeds (B, D)` (the global view alone, when `image_embeds` pools given regions)
    join the image-level terms as a second anchor set, so the embedding that box-free inference uses
    is trained too. `dense_region_embeds (B, K, D)` (regions pooled from the global patch grid) are
    the `dense_region` term's anchors and join `region_hard_negative`, whose candidates are each
    region's own negative captions `region_negative_embeds (B, K, M, D)` (valid where
    `region_negative_mask (B, K, M)`) plus every region caption of the batch.

    Returns the total and each computed term (unweighted, detached) for logging. A term with a
    positive weight whose inputs are missing is an error naming the term and the inputs.
    """
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; known: {list(LOSS_TERMS)}")
    region_inputs = (("region_text_embeds", region_text_embeds), ("roi_mask", roi_mask))
    needs = {
        "global_report": (),
        "global_summary": (("summary_text_embeds", summary_text_embeds),),
        "image_region": region_inputs,
        "region": (("region_embeds", region_embeds), *region_inputs),
        "dense_region": (("dense_region_embeds", dense_region_embeds), *region_inputs),
        "hard_negative": (("negative_text_embeds", negative_text_embeds), ("negative_mask", negative_mask)),
        "region_hard_negative": (("region_embeds", region_embeds), *region_inputs,
                                 ("region_negative_embeds", region_negative_embeds),
                                 ("region_negative_mask", region_negative_mask)),
        "negative_text_margin": (("region_text_embeds", region_text_embeds), ("roi_mask", roi_mask),
                                 ("region_negative_embeds", region_negative_embeds),
                                 ("region_negative_mask", region_negative_mask)),
    }
    image_sets = [image_embeds] if box_free_image_embeds is None else [image_embeds, box_free_image_embeds]
    # The valid ROIs' indices, read once for every term that selects them (those that need roi_mask)
    valid_rois = None
    if roi_mask is not None and any(weight != 0 and "roi_mask" in dict(needs[term]) for term, weight in weights.items()):
        valid_rois = roi_mask.nonzero(as_tuple=True)
    total = image_embeds.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    for term, weight in weights.items():
        if weight == 0:
            continue
        missing = [name for name, value in needs[term] if value is None]
        if missing:
            raise ValueError(f"loss term {term!r} has weight {weight} but its inputs {missing} were not given")
        if term == "global_report":
            value = _mean_over(image_sets, lambda images: global_contrastive_loss(
                images, text_embeds, logit_scale, text_groups, config))
        elif term == "global_summary":
            value = _mean_over(image_sets, lambda images: global_contrastive_loss(
                images, summary_text_embeds, logit_scale, summary_groups, config))
        elif term == "image_region":
            # On the box-free embedding only: one that pools the same regions would find them trivially.
            value = image_region_loss(image_sets[-1], region_text_embeds, roi_mask, logit_scale, region_groups, config,
                                      roi_index=valid_rois)
        elif term == "region":
            value = region_contrastive_loss(region_embeds, region_text_embeds, roi_mask, logit_scale, region_groups, config,
                                            roi_index=valid_rois)
        elif term == "dense_region":
            value = region_contrastive_loss(dense_region_embeds, region_text_embeds, roi_mask, logit_scale,
                                            region_groups, config, roi_index=valid_rois)
        elif term == "hard_negative":
            value = _mean_over(image_sets, lambda images: hard_negative_loss(
                images, text_embeds, negative_text_embeds, negative_mask, logit_scale, text_groups, config))
        elif term == "negative_text_margin":
            value = negative_text_margin_loss(region_text_embeds[valid_rois], region_negative_embeds[valid_rois],
                                              region_negative_mask[valid_rois], config.negative_text_margin)
        else:
            region_sets = [region_embeds] if dense_region_embeds is None else [region_embeds, dense_region_embeds]
            valid_groups = None if region_groups is None else region_groups[valid_rois]
            # Regions are the anchors: each valid ROI against its own negatives (NegCLIP at region level).
            value = _mean_over(region_sets, lambda regions, groups=valid_groups: hard_negative_loss(
                regions[valid_rois], region_text_embeds[valid_rois], region_negative_embeds[valid_rois],
                region_negative_mask[valid_rois], logit_scale, groups, config))
        terms[term] = value.detach()
        total = total + weight * value
    return total, terms


def _padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int) -> torch.Tensor:
    """The given mask, or one derived from the pad id, so identical captions padded to different lengths
    (on different ranks) still hash to the same caption group."""
    return attention_mask if attention_mask is not None else (input_ids != pad_token_id).long()


def _as_bool(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The model's 0/1 output masks as the bool masks the loss terms index with."""
    return None if mask is None else mask.bool()


def training_loss(
    outputs: Any,
    inputs: dict[str, torch.Tensor],
    logit_scale: torch.Tensor,
    pad_token_id: int,
    weights: dict[str, float] | None = None,
    config: ContrastiveLossConfig = ContrastiveLossConfig(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The multi-level objective of a `RegionMedCLIPModel` output and the batch it came from.

    `inputs` are the model's inputs (report `input_ids` / `attention_mask`, and as present the
    summary, region and negative caption inputs); `logit_scale` the clamped scale. `weights` default
    to `DEFAULT_LOSS_WEIGHTS` restricted to the terms whose inputs are present. Returns the total and
    each term (`regionmed_clip_loss`).
    """
    has_regions = outputs.region_text_embeds is not None
    if weights is None:
        available = {
            "global_report": True, "global_summary": outputs.summary_text_embeds is not None,
            "image_region": has_regions, "region": has_regions, "dense_region": has_regions,
            "hard_negative": outputs.negative_text_embeds is not None,
            "region_hard_negative": outputs.region_negative_text_embeds is not None,
            "negative_text_margin": outputs.region_negative_text_embeds is not None,
        }
        weights = {term: weight for term, weight in DEFAULT_LOSS_WEIGHTS.items() if available[term]}

    def groups(prefix: str) -> torch.Tensor | None:
        ids = inputs.get(f"{prefix}input_ids")
        return None if ids is None else caption_groups(ids, _padding_mask(ids, inputs.get(f"{prefix}attention_mask"),
                                                                            pad_token_id))

    return regionmed_clip_loss(
        weights, logit_scale, outputs.image_embeds, outputs.text_embeds,
        text_groups=groups(""),
        summary_text_embeds=outputs.summary_text_embeds, summary_groups=groups("summary_"),
        region_embeds=outputs.region_embeds, region_text_embeds=outputs.region_text_embeds, roi_mask=_as_bool(outputs.roi_mask),
        region_groups=groups("region_"),
        negative_text_embeds=outputs.negative_text_embeds, negative_mask=_as_bool(outputs.negative_mask),
        config=config,
        # With regions given, the box-free embedding is trained beside the region-pooled one.
        box_free_image_embeds=outputs.box_free_image_embeds if outputs.region_embeds is not None else None,
        dense_region_embeds=outputs.dense_region_embeds,
        region_negative_embeds=outputs.region_negative_text_embeds,
        region_negative_mask=_as_bool(outputs.region_negative_mask),
    )
