"""Losses against hand-computed values (pure functions, no model)."""

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


def test_training_loss_takes_the_terms_the_batch_allows_and_equals_the_pure_functions():
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
    assert total.item() == pytest.approx(sum(DEFAULT_LOSS_WEIGHTS[t] * v.item() for t, v in terms.items()), rel=1e-5)
    only_global, global_terms = training_loss(outputs, inputs, outputs.logit_scale, pad, {"global_report": 1.0})
    groups = caption_groups(inputs["input_ids"], inputs["attention_mask"])
    expected = (global_contrastive_loss(outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, groups)
                + global_contrastive_loss(outputs.global_image_embeds, outputs.text_embeds, outputs.logit_scale,
                                          groups)) / 2  # the box-free embedding is a second anchor set
    assert only_global.item() == pytest.approx(expected.item(), rel=1e-5) and set(global_terms) == {"global_report"}
    with pytest.raises(ValueError, match="loss.hard_negative_weight"):
        ContrastiveLossConfig(hard_negative_weight=0.5)
