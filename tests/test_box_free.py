"""Box-free inference: proposal windows pooled from the global patch grid, the dense-region head, and the
processor's full-resolution proposals read as regions and pooled per image."""

import math

import pytest
import torch

from regionmed_clip.modeling_regionmed_clip import CONFIG_ERRORS, RegionMedCLIPConfig
from regionmed_clip.modeling_regionmed_clip.box_free_regionmed_clip import (
    _PROPOSAL_POOL_SHARPNESS,
    log_mean_exp_centred,
    pool_window_features,
    sliding_window_boxes,
    window_sampling_weights,
)
from regionmed_clip.modeling_regionmed_clip.roi_regionmed_clip import RegionMedCLIPAttentionPool, roi_align

from conftest import make_inputs, tiny_model


def test_sliding_windows_tile_the_view_at_half_a_side_stride():
    boxes = sliding_window_boxes([0.5, 1.0], torch.device("cpu"), torch.float32)
    assert boxes.shape == (9 + 1, 4)
    starts = torch.tensor([0.0, 0.25, 0.5])
    torch.testing.assert_close(boxes[:9, 0], starts.repeat(3))  # x0, row-major
    torch.testing.assert_close(boxes[:9, 1], starts.repeat_interleave(3))  # y0
    torch.testing.assert_close(boxes[:9, 2:] - boxes[:9, :2], torch.full((9, 2), 0.5))
    torch.testing.assert_close(boxes[9], torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.3, 3.0, 30.0, 200.0])
def test_window_pool_keeps_float32_precision_at_every_scale(scale):
    # Centred scores pool to a second-order quantity: `logsumexp - log(N)` in float32 loses it
    # (relative error ~1.5 at scale 1e-3, 4e-3 at 0.02); the pool must stay at float32 precision.
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 58, 16, generator=generator, dtype=torch.float64) * scale
    scores = scores - scores.mean(dim=1, keepdim=True)
    exact = torch.logsumexp(scores, dim=1) - math.log(58)
    pooled = log_mean_exp_centred(scores.float()).double()
    assert ((pooled - exact).abs() / exact.abs()).max() < 1e-6


def _log_mean_exp(scores: torch.Tensor, sharpness: float) -> torch.Tensor:
    """The pool's definition, `log(mean(exp(s * x))) / s` over dim 1, in float64 by logsumexp."""
    return (torch.logsumexp(sharpness * scores.double(), dim=1) - math.log(scores.shape[1])) / sharpness


def test_window_pool_gradients_are_nonzero_and_finite_for_large_scores():
    scores = (torch.randn(2, 58, 4) * 60).requires_grad_()
    log_mean_exp_centred(scores - scores.mean(dim=1, keepdim=True)).sum().backward()
    # through the centring, each score's gradient is its softmax weight minus 1 / 58: never zero
    assert torch.isfinite(scores.grad).all() and torch.all(scores.grad != 0)


def test_window_pool_gradients_match_finite_differences_in_every_branch():
    # channel 0 overflows exp (logsumexp), channel 1 is small (the series), channel 2 in between (expm1)
    scores = torch.tensor([[[30.0, 0.03, 1.5], [-4.0, -0.05, -0.7], [-8.0, 0.01, 2.2], [-2.0, -0.02, -0.4],
                            [-6.0, 0.04, 0.9], [-10.0, -0.01, -2.5]]], dtype=torch.float64, requires_grad=True)

    def pooled(values: torch.Tensor) -> torch.Tensor:
        return log_mean_exp_centred(values - values.mean(dim=1, keepdim=True))

    assert torch.autograd.gradcheck(pooled, (scores,))
    # the value too: exact to float32 precision (the series stops at the fifth power)
    torch.testing.assert_close(pooled(scores), _log_mean_exp(scores - scores.mean(dim=1, keepdim=True), 1.0),
                               rtol=1e-6, atol=0)


def test_window_pool_is_the_centred_log_mean_exp_of_planted_window_features():
    # 10 windows (9 of half the side, then the whole view), 3 channels: one window shows channel 0
    # strongly, one hides channel 1, and channel 2 varies slightly. A mean pool gives 0 for every
    # centred channel, a max pool the largest deviation: the pool is neither.
    planted = torch.zeros(1, 10, 3)
    planted[0, 3, 0], planted[0, 6, 1] = 2.0, -2.0
    planted[0, :, 2] = torch.linspace(-0.01, 0.01, 10)
    seen = []

    def dense_head(sampled: torch.Tensor) -> torch.Tensor:
        seen.append(sampled.shape)
        return planted

    tokens = torch.randn(1, 1 + 4 * 4, 5)
    pooled = pool_window_features(tokens, (4, 4), (0.5, 1.0), 2, dense_head)
    assert seen == [(1, 10, 2 * 2 * 5)]  # every window's 2 x 2 RoIAlign bins of the 5-channel patch grid
    deviations = planted - planted.mean(dim=1, keepdim=True)
    expected = _log_mean_exp(deviations, _PROPOSAL_POOL_SHARPNESS)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.double(), expected, rtol=1e-5, atol=1e-9)
    peak = deviations[0, :, 0].amax()
    assert 0.5 * peak < pooled[0, 0] < peak - 0.1  # a soft maximum: near the peak window, below it
    assert 0 < pooled[0, 1] < 0.5 * pooled[0, 0]  # a dip of the same size counts far less than the peak
    assert 0 < pooled[0, 2] < 0.02 * deviations[0, :, 2].amax()  # a small spread stays second order


@pytest.mark.parametrize("patch_grid", [(16, 16), (7, 9)])
def test_the_window_matrix_is_roi_align_of_the_windows(patch_grid):
    # pool_window_features multiplies by this fixed matrix instead of sampling the windows each step.
    torch.manual_seed(0)
    features = torch.randn(2, 5, *patch_grid, dtype=torch.float64, requires_grad=True)
    windows = sliding_window_boxes((0.25, 0.5), features.device, features.dtype)
    expected = roi_align(features, windows.expand(2, -1, -1), 3)  # (B, P, G, G, C)
    weights = window_sampling_weights((0.25, 0.5), patch_grid, 3, features.device, features.dtype)
    actual = (weights @ features.flatten(2).transpose(1, 2)).reshape(expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    grad_expected, = torch.autograd.grad((expected * expected.detach()).sum(), features)
    grad_actual, = torch.autograd.grad((actual * expected.detach()).sum(), features)
    torch.testing.assert_close(grad_actual, grad_expected, rtol=0, atol=1e-12)


def test_window_sizes_outside_the_view_are_rejected_by_name():
    with pytest.raises(CONFIG_ERRORS, match="proposal_window_sizes"):
        RegionMedCLIPConfig.from_preset("tiny", proposal_window_sizes=[0.25, 1.5])


def test_box_free_embedding_pools_the_proposal_windows():
    model = tiny_model()
    pixel_values = make_inputs(model.config, [1, 1])["pixel_values"]
    plain = tiny_model(proposal_window_sizes=[])
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        with_windows = model.get_image_features(pixel_values).pooler_output
        without = plain.get_image_features(pixel_values).pooler_output
        tokens = model.vision_model(pixel_values)
        grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
        windows = sliding_window_boxes(model.config.proposal_window_sizes, pixel_values.device, pixel_values.dtype)
        window_features = model.roi_processor.dense_features(
            model.roi_processor.align_boxes(tokens.last_hidden_state, windows.expand(2, -1, -1), (grid, grid)))
    # without windows the box-free feature is the tower's pooled output, projected
    torch.testing.assert_close(without, model.visual_projection(tokens.pooler_output))
    # with windows it is the log-mean-exp over windows of each channel's deviation from the image's
    # mean window (a fresh model's box-free centre is zero), projected
    deviations = window_features - window_features.mean(1, keepdim=True)
    pooled = _log_mean_exp(deviations, _PROPOSAL_POOL_SHARPNESS).float()
    torch.testing.assert_close(with_windows, model.visual_projection(pooled), rtol=1e-4, atol=1e-6)


def test_dense_region_embedding_reads_the_patch_grid_not_the_crop():
    model = tiny_model()
    inputs = make_inputs(model.config, [2, 1])
    other_crops = {**inputs, "roi_pixel_values": torch.randn_like(inputs["roi_pixel_values"])}
    moved = {**inputs, "roi_boxes": inputs["roi_boxes"].flip(-1).mul(-1).add(1)}  # point reflection
    with torch.no_grad():
        reference = model(**inputs)
        crops_changed = model(**other_crops)
        boxes_moved = model(**moved)
    valid = inputs["roi_mask"]
    torch.testing.assert_close(crops_changed.dense_region_embeds, reference.dense_region_embeds)
    assert not torch.allclose(crops_changed.region_embeds[valid], reference.region_embeds[valid], atol=1e-4)
    assert not torch.allclose(boxes_moved.dense_region_embeds[valid], reference.dense_region_embeds[valid], atol=1e-4)
    assert torch.all(reference.dense_region_embeds[~valid] == 0)


def test_box_dropout_acts_in_training_only():
    model = tiny_model(roi_box_dropout=0.999, roi_gate_init=0.5, region_pool_gate_init=0.5)
    inputs = make_inputs(model.config, [3, 2])
    inputs["region_input_ids"] = torch.randint(5, 100, (*inputs["roi_mask"].shape, 8))
    model.train()
    torch.manual_seed(0)
    model(**inputs, return_loss=True).loss.backward()
    # every box embedding was dropped: the coordinates' MLP gets no gradient
    assert all(torch.all(p.grad == 0) for p in model.roi_processor.box_embedding.parameters())
    # at inference the coordinates are used: silencing their MLP changes the region embeddings
    model.eval()
    with torch.no_grad():
        with_boxes = model(**inputs).region_embeds
        model.roi_processor.box_embedding[-1].bias.add_(torch.randn(model.config.vision_config.hidden_size))
        shifted = model(**inputs).region_embeds
    valid = inputs["roi_mask"]
    assert not torch.allclose(with_boxes[valid], shifted[valid], atol=1e-4)


# -- full-resolution proposals ---------------------------------------------------------------------


def _proposal_inputs(config, count: int = 5, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    inputs = make_inputs(config, [count] * batch, seed=seed)
    return {"pixel_values": inputs["pixel_values"], "proposal_pixel_values": inputs["roi_pixel_values"],
            "proposal_boxes": inputs["roi_boxes"], "proposal_mask": inputs["roi_mask"]}


@torch.no_grad()
def test_proposals_are_read_and_pooled_exactly_as_regions_are():
    model = tiny_model(roi_gate_init=0.5, region_pool_gate_init=0.7)
    inputs = _proposal_inputs(model.config)
    inputs["proposal_mask"][1, 3:] = False  # the second image has 3 proposals
    box_free = model(**inputs)
    as_rois = model(pixel_values=inputs["pixel_values"], roi_pixel_values=inputs["proposal_pixel_values"],
                    roi_boxes=inputs["proposal_boxes"], roi_mask=inputs["proposal_mask"])
    torch.testing.assert_close(box_free.image_embeds, as_rois.image_embeds)
    torch.testing.assert_close(box_free.proposal_embeds, as_rois.region_embeds)
    assert box_free.region_embeds is None and box_free.proposal_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    features = model.get_image_features(**inputs).pooler_output
    torch.testing.assert_close(torch.nn.functional.normalize(features, dim=-1), box_free.image_embeds)
    # padding proposals are inert: dropping them changes nothing
    second = model(**{key: value[1:, :3] if key.startswith("proposal") else value[1:] for key, value in inputs.items()})
    torch.testing.assert_close(second.image_embeds, box_free.image_embeds[1:])


@torch.no_grad()
def test_a_fresh_model_is_unchanged_by_proposals_and_a_trained_pool_uses_them():
    model = tiny_model()  # gates closed: the region machinery starts closed
    inputs = _proposal_inputs(model.config)
    plain = model(pixel_values=inputs["pixel_values"]).image_embeds
    torch.testing.assert_close(model(**inputs).image_embeds, plain)
    model.roi_processor.pool_gate.fill_(1.0)
    assert (model(**inputs).image_embeds - plain).abs().max() > 1e-3


@torch.no_grad()
def test_the_region_pool_follows_the_planted_best_item_and_ignores_masked_ones():
    pool = RegionMedCLIPAttentionPool(4)
    for layer in (pool.query, pool.key, pool.output):
        layer.weight.copy_(torch.eye(4))
        layer.bias.zero_()
    query = torch.tensor([[1.0, 0, 0, 0]])
    items = torch.tensor([[[0, 1.0, 0, 0], [40.0, 0, 0, 0], [0, 0, 1.0, 0], [90.0, 0, 0, 1.0]]])
    mask = torch.tensor([[True, True, True, False]])  # the strongest item is padding
    torch.testing.assert_close(pool(query, items, mask), items[:, 1], atol=1e-6, rtol=0)
    assert pool(query, items, torch.zeros_like(mask)).abs().max() == 0  # no valid item: zero


def test_proposal_inputs_are_checked_by_name():
    model = tiny_model()
    inputs = _proposal_inputs(model.config)
    with pytest.raises(ValueError, match="proposal_boxes must be"):
        model(**{**inputs, "proposal_boxes": inputs["proposal_boxes"][:, :2]})
    with pytest.raises(ValueError, match="proposal_boxes is required"):
        model(**{key: value for key, value in inputs.items() if key != "proposal_boxes"})
    rois = make_inputs(model.config, [1, 1])
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, roi_pixel_values=rois["roi_pixel_values"], roi_boxes=rois["roi_boxes"])
