"""Losses against hand-computed values, and `training_loss` term by term against the objective written out."""

import math

import pytest
import torch

from regionmed_clip.modeling_regionmed_clip.modeling_regionmed_clip import clamped_logit_scale
from regionmed_clip.training_scripts.losses import (
    ContrastiveLossConfig,
    caption_groups,
    global_contrastive_loss,
    hard_negative_loss,
    image_region_loss,
    multi_positive_info_nce,
    negative_text_margin_loss,
    region_contrastive_loss,
    regionmed_clip_loss,
)


def nll(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_global_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(10.0)
    # logits_per_image = 10 * image @ text.T = [[10, 6], [0, 8]]
    image_to_text = (nll([10, 6], 0) + nll([0, 8], 1)) / 2
    text_to_image = (nll([10, 0], 0) + nll([6, 8], 1)) / 2
    expected = (image_to_text + text_to_image) / 2
    assert global_contrastive_loss(image, text, scale).item() == pytest.approx(expected, abs=1e-5)


def test_identical_captions_are_both_positives():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    positives = torch.tensor([[True, True, False]])
    expected = -math.log((math.exp(3) + math.exp(1)) / (math.exp(3) + math.exp(1) + 1))
    assert multi_positive_info_nce(logits, positives).item() == pytest.approx(expected, abs=1e-6)
    image = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    grouped = global_contrastive_loss(image, text, torch.tensor(5.0), text_groups=torch.tensor([7, 7, 9]))
    plain = global_contrastive_loss(image, text, torch.tensor(5.0))
    assert grouped.item() < plain.item()  # the duplicate is no longer pushed away


def test_single_positive_is_cross_entropy():
    logits = torch.randn(4, 6)
    targets = torch.tensor([0, 3, 5, 1])
    positives = torch.nn.functional.one_hot(targets, 6).bool()
    torch.testing.assert_close(multi_positive_info_nce(logits, positives),
                               torch.nn.functional.cross_entropy(logits, targets))


def test_region_loss_uses_only_valid_rois():
    torch.manual_seed(0)
    regions = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    scale = torch.tensor(20.0)
    expected = global_contrastive_loss(regions[mask], captions[mask], scale)
    torch.testing.assert_close(region_contrastive_loss(regions, captions, mask, scale), expected)
    empty = region_contrastive_loss(regions, captions, torch.zeros(2, 3, dtype=torch.bool), scale)
    assert empty.item() == 0.0


def test_hard_negative_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[[0.8, 0.6], [0.0, 0.0]], [[0.6, 0.8], [1.0, 0.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    scale = torch.tensor(10.0)
    plain = ContrastiveLossConfig(hardest_k=0)
    # row 0 candidates: texts [10, 0] + own negatives [8]; row 1: texts [0, 10] + negatives [8, 0]
    expected = (nll([10, 0, 8], 0) + nll([0, 10, 8, 0], 1)) / 2
    value = hard_negative_loss(image, text, negatives, mask, scale, config=plain)
    assert value.item() == pytest.approx(expected, abs=1e-5)
    # hardest k=1 up-weighted by w: that logit gains log(w); row 0's hardest is its negative (8),
    # row 1's is its first negative (8)
    weighted = ContrastiveLossConfig(hardest_k=1, hard_negative_weight=3.0)
    boost = math.log(3.0)
    expected = (nll([10, 0, 8 + boost], 0) + nll([0, 10, 8 + boost, 0], 1)) / 2
    value = hard_negative_loss(image, text, negatives, mask, scale, config=weighted)
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_caption_groups_ignore_padding():
    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 7, 9, 3, 0, 0], [2, 7, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    groups = caption_groups(ids, mask)
    assert groups[0] == groups[1] != groups[2]
    shorter = caption_groups(ids[:, :4], mask[:, :4])
    assert torch.equal(groups, shorter)


def test_logit_scale_clamp():
    assert clamped_logit_scale(torch.tensor(math.log(1000.0))).item() == pytest.approx(100.0)
    assert clamped_logit_scale(torch.tensor(math.log(20.0))).item() == pytest.approx(20.0)


def test_weighted_sum_and_errors():
    torch.manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    summary = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    scale = torch.tensor(10.0)
    total, terms = regionmed_clip_loss({"global_report": 1.0, "global_summary": 0.5}, scale, image, text,
                                       summary_text_embeds=summary)
    assert set(terms) == {"global_report", "global_summary"}
    torch.testing.assert_close(total, terms["global_report"] + 0.5 * terms["global_summary"])
    _, terms = regionmed_clip_loss({"global_report": 1.0, "region": 0.0}, scale, image, text)
    assert set(terms) == {"global_report"}
    with pytest.raises(ValueError, match="'region' has weight 0.5 but its inputs"):
        regionmed_clip_loss({"region": 0.5}, scale, image, text)
    with pytest.raises(ValueError, match="unknown loss terms"):
        regionmed_clip_loss({"regoin": 1.0}, scale, image, text)


def test_image_region_loss_is_caption_to_image_cross_entropy():
    generator = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(3, 2, 8, generator=generator), dim=-1)
    roi_mask = torch.tensor([[True, True], [True, False], [False, False]])
    scale = torch.tensor(5.0)
    expected = torch.nn.functional.cross_entropy(scale * captions[roi_mask] @ images.t(), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(image_region_loss(images, captions, roi_mask, scale), expected)


def test_image_region_loss_counts_an_image_with_the_same_caption_as_a_positive():
    images = torch.eye(3)
    captions = torch.stack([torch.eye(3)[[0, 2]], torch.eye(3)[[0, 1]], torch.eye(3)[[0, 1]]])  # (3, 2, 3)
    roi_mask = torch.tensor([[True, False], [True, False], [False, False]])
    groups = torch.tensor([[7, 0], [7, 0], [0, 0]])  # images 0 and 1 carry the same caption
    scale = torch.tensor(4.0)
    logits = scale * captions[roi_mask] @ images.t()
    # each caption's positives are images 0 and 1: -log of their summed softmax mass
    expected = -(logits.softmax(-1)[:, :2].sum(-1)).log().mean()
    torch.testing.assert_close(image_region_loss(images, captions, roi_mask, scale, groups), expected)


def test_negative_text_margin_by_hand():
    unit = torch.eye(3)
    captions = unit[:2]  # two captions, e1 and e2
    close = torch.nn.functional.normalize(torch.tensor([1.0, 0.1, 0.0]), dim=0)  # cos 0.995 with e1
    negatives = torch.stack([torch.stack([close, unit[2]]), torch.stack([unit[1], -unit[1]])])  # (2, 2, 3)
    mask = torch.tensor([[True, True], [True, False]])
    # hardest valid negative per caption: cos 0.995 (over the margin by 0.295; e3 at cos 0 is easier)
    # and cos 1 (over by 0.3; -e2 is masked out)
    expected = (float(close[0]) - 0.7 + 0.3) / 2
    assert negative_text_margin_loss(captions, negatives, mask, 0.7).item() == pytest.approx(expected, abs=1e-6)
    # nothing over the margin, or nothing valid: zero
    assert negative_text_margin_loss(captions, -negatives, mask, 0.7).item() == 0.0
    assert negative_text_margin_loss(captions, negatives, torch.zeros_like(mask), 0.7).item() == 0.0


def test_negative_text_margin_pushes_only_the_hardest_negative_over_the_margin():
    captions = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    near = torch.nn.functional.normalize(captions.detach() + 0.3 * torch.randn(4, 8), dim=-1)
    negatives = torch.stack([captions.detach(), near, -captions.detach()], dim=1).requires_grad_()  # cos 1, ~0.9, -1
    loss = negative_text_margin_loss(captions, negatives, torch.ones(4, 3, dtype=torch.bool), 0.7)
    loss.backward()
    assert negatives.grad[:, 0].abs().sum() > 0  # the identical (hardest) negative is pushed
    assert negatives.grad[:, 1:].abs().sum() == 0  # the others are not the hardest: untouched
    with pytest.raises(ValueError, match="negative_embeds"):
        negative_text_margin_loss(captions, negatives[:3], torch.ones(3, 2, dtype=torch.bool), 0.7)


# -- training_loss, term by term, against the objective written out here ------------------------------
#
# The reference below restates each term from its definition, one anchor at a time with Python loops
# (nothing of training_scripts.losses is reused), on planted float64 embeddings: random directions,
# duplicate captions, padding slots holding junk, region negatives near their caption.


def _reference_info_nce(logits: list[torch.Tensor], positives: list[bool]) -> torch.Tensor:
    """-log(sum of exp over the positives / sum of exp over every candidate), one anchor."""
    values = torch.stack(logits)
    return torch.logsumexp(values, 0) - torch.logsumexp(values[torch.tensor(positives)], 0)


def _reference_symmetric(anchors, candidates, groups, scale) -> torch.Tensor:
    """Anchor i against every candidate (positives: the candidates of i's caption group), and back."""
    n = len(anchors)
    forward = [_reference_info_nce([scale * anchors[i] @ candidates[j] for j in range(n)],
                                   [groups[j] == groups[i] for j in range(n)]) for i in range(n)]
    backward = [_reference_info_nce([scale * candidates[i] @ anchors[j] for j in range(n)],
                                    [groups[j] == groups[i] for j in range(n)]) for i in range(n)]
    return (torch.stack(forward).mean() + torch.stack(backward).mean()) / 2


def _reference_with_negatives(anchors, texts, text_groups, negatives, negative_valid, scale, hardest_k, weight):
    """Anchor i against every text and its own valid negatives; positives: the texts of i's group; the
    `hardest_k` highest non-positive candidates get log(weight) added (their exp scaled by weight)."""
    losses = []
    for i, anchor in enumerate(anchors):
        logits = [scale * anchor @ text for text in texts]
        positives = [group == text_groups[i] for group in text_groups]
        for negative, valid in zip(negatives[i], negative_valid[i], strict=True):
            if valid:
                logits.append(scale * anchor @ negative)
                positives.append(False)
        others = sorted((j for j, positive in enumerate(positives) if not positive), key=lambda j: -float(logits[j]))
        if weight != 1.0:
            for j in others[:hardest_k]:
                logits[j] = logits[j] + math.log(weight)
        losses.append(_reference_info_nce(logits, positives))
    return torch.stack(losses).mean()


def _reference_terms(out, report_groups, summary_groups, region_groups, config) -> dict[str, torch.Tensor]:
    """Every term whose inputs `out` holds (summary, region and negative captions each optional)."""
    scale = out.logit_scale
    with_regions = out.region_text_embeds is not None
    # the box-free embedding joins the image-level terms as a second anchor set when regions are pooled
    image_sets = (out.image_embeds, out.box_free_image_embeds) if out.region_embeds is not None else (out.image_embeds,)
    terms = {"global_report": sum(_reference_symmetric(images, out.text_embeds, report_groups, scale)
                                  for images in image_sets) / len(image_sets)}
    if out.summary_text_embeds is not None:
        terms["global_summary"] = sum(_reference_symmetric(images, out.summary_text_embeds, summary_groups, scale)
                                      for images in image_sets) / len(image_sets)
    if out.negative_text_embeds is not None:
        terms["hard_negative"] = sum(_reference_with_negatives(
            images, out.text_embeds, report_groups, out.negative_text_embeds, out.negative_mask, scale,
            config.hardest_k, config.hard_negative_weight) for images in image_sets) / len(image_sets)
    if not with_regions:
        return terms
    batch, slots = out.roi_mask.shape
    rois = [(b, k) for b in range(batch) for k in range(slots) if out.roi_mask[b, k]]
    region_texts = [out.region_text_embeds[b, k] for b, k in rois]
    groups = [region_groups[b][k] for b, k in rois]
    terms["region"] = _reference_symmetric([out.region_embeds[b, k] for b, k in rois], region_texts, groups, scale)
    terms["dense_region"] = _reference_symmetric([out.dense_region_embeds[b, k] for b, k in rois], region_texts,
                                                 groups, scale)
    # region caption -> image, box-free images only: positives are the images holding a caption of its group
    image_region = []
    for caption, group in zip(region_texts, groups, strict=True):
        owners = {owner for (owner, _), other in zip(rois, groups, strict=True) if other == group}
        image_region.append(_reference_info_nce([scale * caption @ image for image in out.box_free_image_embeds],
                                                [index in owners for index in range(batch)]))
    terms["image_region"] = torch.stack(image_region).mean()
    if out.region_negative_text_embeds is None:
        return terms
    terms["region_hard_negative"] = sum(_reference_with_negatives(
        [regions[b, k] for b, k in rois], region_texts, groups,
        [out.region_negative_text_embeds[b, k] for b, k in rois], [out.region_negative_mask[b, k] for b, k in rois],
        scale, config.hardest_k, config.hard_negative_weight)
        for regions in (out.region_embeds, out.dense_region_embeds)) / 2
    # the margin: per region caption with a valid negative, relu(cos(caption, nearest valid negative) - margin)
    margins = []
    for (b, k), caption in zip(rois, region_texts, strict=True):
        cosines = [caption @ negative for negative, valid in zip(out.region_negative_text_embeds[b, k],
                                                                 out.region_negative_mask[b, k], strict=True) if valid]
        if cosines:
            margins.append(torch.relu(max(cosines) - config.negative_text_margin))
    terms["negative_text_margin"] = torch.stack(margins).mean()
    return terms


def _planted_step(seed: int = 0):
    """Model outputs (as the model returns them: normalised, 0/1 masks) and the caption inputs of a batch
    of 4 images, 3 ROI slots (6 valid; image 3 has none) and 3 negatives per image; reports 0 and 2 are
    the same caption, and so are region captions (0, 0) and (2, 1)."""
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(seed)
    batch, slots, negatives, region_negatives, dim, length = 4, 3, 3, 2, 8, 6

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, dim, generator=generator, dtype=torch.float64), dim=-1)

    def tokens(*shape):
        ids = torch.randint(5, 90, (*shape, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[..., length - 2 :] = 0  # padded
        return ids.masked_fill(mask == 0, 0), mask

    report_ids, report_mask = tokens(batch)
    report_ids[2] = report_ids[0]
    summary_ids, summary_mask = tokens(batch)
    region_ids, region_mask = tokens(batch, slots)
    region_ids[2, 1] = region_ids[0, 0]
    roi_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    region_text = unit(batch, slots)
    region_text[2, 1] = region_text[0, 0]  # the same caption, the same embedding
    # region negatives: a few edits near their caption (over the margin), the rest anywhere
    region_negative = unit(batch, slots, region_negatives)
    near = torch.nn.functional.normalize(region_text[..., None, :] + 0.35 * unit(batch, slots, region_negatives), dim=-1)
    region_negative = torch.where(torch.rand(batch, slots, region_negatives, 1, generator=generator) < 0.6, near,
                                  region_negative)
    region_negative[0, 1, 1] = region_text[0, 1]  # the nearest possible negative, but masked out: ignored
    outputs = SimpleNamespace(
        logit_scale=torch.tensor(7.0, dtype=torch.float64),
        image_embeds=unit(batch), box_free_image_embeds=unit(batch), text_embeds=unit(batch),
        summary_text_embeds=unit(batch),
        region_embeds=unit(batch, slots), dense_region_embeds=unit(batch, slots), region_text_embeds=region_text,
        roi_mask=roi_mask,
        negative_text_embeds=unit(batch, negatives), negative_mask=torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1],
                                                                                 [0, 0, 0]]),
        region_negative_text_embeds=region_negative,
        region_negative_mask=torch.tensor([[[1, 1], [1, 0], [1, 1]], [[0, 0], [1, 1], [0, 1]], [[1, 1], [1, 1], [0, 1]],
                                           [[1, 1], [1, 1], [1, 1]]]) * roi_mask[..., None],
    )
    inputs = {"input_ids": report_ids, "attention_mask": report_mask, "summary_input_ids": summary_ids,
              "summary_attention_mask": summary_mask, "region_input_ids": region_ids,
              "region_attention_mask": region_mask}
    # caption groups as the definition has them: equal token ids
    groups = lambda ids: [tuple(row) for row in ids.tolist()]  # noqa: E731
    region_groups = [[tuple(caption) for caption in image] for image in region_ids.tolist()]
    return outputs, inputs, groups(report_ids), groups(summary_ids), region_groups


@pytest.mark.parametrize("config", [ContrastiveLossConfig(),
                                    ContrastiveLossConfig(hardest_k=1, hard_negative_weight=5.0,
                                                          negative_text_margin=0.5)],
                         ids=["default", "k1-w5-margin0.5"])
def test_training_loss_terms_equal_the_objective_written_out(config):
    from regionmed_clip.training_scripts.losses import DEFAULT_LOSS_WEIGHTS, LOSS_TERMS, training_loss

    outputs, inputs, report_groups, summary_groups, region_groups = _planted_step()
    expected = _reference_terms(outputs, report_groups, summary_groups, region_groups, config)
    assert set(expected) == set(LOSS_TERMS)
    # the batch is planted so that every term is at work: none is zero
    assert all(value.item() > 0.01 for value in expected.values()), expected

    total, terms = training_loss(outputs, inputs, outputs.logit_scale, pad_token_id=0, config=config)
    assert set(terms) == set(LOSS_TERMS)  # every input present: every term, at its default weight
    for name in LOSS_TERMS:
        torch.testing.assert_close(terms[name], expected[name], msg=lambda text, name=name: f"{name}: {text}")
    torch.testing.assert_close(total, sum(DEFAULT_LOSS_WEIGHTS[name] * expected[name] for name in LOSS_TERMS))

    # each weight multiplies its own term: distinct weights, so a weight applied to another term shows
    weights = dict(zip(LOSS_TERMS, (1.0, 0.3, 0.7, 1.3, 0.2, 0.9, 0.4, 2.5), strict=True))
    total, terms = training_loss(outputs, inputs, outputs.logit_scale, 0, weights, config)
    torch.testing.assert_close(total, sum(weights[name] * expected[name] for name in LOSS_TERMS))


def test_the_planted_step_tells_swapped_inputs_apart():
    """The reference on the planted step moves when an input a term might be handed by mistake is swapped
    in (by more than the comparison's tolerance), so the test above fails on such a swap."""
    outputs, inputs, report_groups, summary_groups, region_groups = _planted_step()
    config = ContrastiveLossConfig()
    expected = _reference_terms(outputs, report_groups, summary_groups, region_groups, config)
    swaps = {
        "image_region": {"box_free_image_embeds": outputs.image_embeds},  # box-free -> region-pooled images
        "region": {"region_embeds": outputs.dense_region_embeds},  # crop-fused -> dense regions
        "dense_region": {"dense_region_embeds": outputs.region_embeds},
        "global_report": {"text_embeds": outputs.summary_text_embeds},  # report -> summary captions
        "global_summary": {"summary_text_embeds": outputs.text_embeds},
        "hard_negative": {"negative_text_embeds": outputs.negative_text_embeds.flip(0)},  # another image's negatives
        "region_hard_negative": {"region_negative_mask": torch.ones_like(outputs.region_negative_mask)},  # mask ignored
        "negative_text_margin": {"region_negative_mask": torch.ones_like(outputs.region_negative_mask)},
    }
    for name, swap in swaps.items():
        changed = type(outputs)(**{**vars(outputs), **swap})
        moved = _reference_terms(changed, report_groups, summary_groups, region_groups, config)[name]
        assert abs(moved.item() - expected[name].item()) > 1e-3, name
    # and the groups: without the duplicate captions as positives, the terms that read them change
    distinct = _reference_terms(outputs, list(range(4)), summary_groups, [[(b, k) for k in range(3)] for b in range(4)],
                                config)
    for name in ("global_report", "hard_negative", "region", "dense_region", "image_region", "region_hard_negative"):
        assert abs(distinct[name].item() - expected[name].item()) > 1e-3, name


def test_training_loss_takes_the_terms_the_batch_allows_and_each_equals_the_objective_written_out():
    from regionmed_clip.training_scripts.losses import DEFAULT_LOSS_WEIGHTS, training_loss

    from conftest import make_inputs, tiny_model

    model = tiny_model()
    config = model.config
    inputs = make_inputs(config, [2, 1])
    texts = make_inputs(config, [1, 1], seed=3)
    inputs.update(region_input_ids=texts["input_ids"][:, None].expand(-1, 2, -1).clone(),
                  region_attention_mask=texts["attention_mask"][:, None].expand(-1, 2, -1).clone())
    outputs = model(**inputs)
    pad = config.text_config.pad_token_id
    total, terms = training_loss(outputs, inputs, outputs.logit_scale, pad)
    # no summary or negative captions in the batch: only the terms their inputs allow
    assert set(terms) == {"global_report", "image_region", "region", "dense_region"}

    def groups(ids, mask):  # equal (unpadded) token ids, the definition of one caption
        return [tuple(token for token, real in zip(row, keep, strict=True) if real)
                for row, keep in zip(ids.tolist(), mask.tolist(), strict=True)]

    region_groups = [groups(ids, mask) for ids, mask in zip(inputs["region_input_ids"], inputs["region_attention_mask"],
                                                            strict=True)]
    expected = _reference_terms(outputs, groups(inputs["input_ids"], inputs["attention_mask"]), None, region_groups,
                                ContrastiveLossConfig())
    assert set(expected) == set(terms)
    for name, value in terms.items():
        torch.testing.assert_close(value, expected[name].detach(), msg=lambda text, name=name: f"{name}: {text}")
    torch.testing.assert_close(total, sum(DEFAULT_LOSS_WEIGHTS[name] * expected[name] for name in terms))
    with pytest.raises(ValueError, match="loss.hard_negative_weight"):
        ContrastiveLossConfig(hard_negative_weight=0.5)
