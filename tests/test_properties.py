"""Property-based tests (hypothesis): the box mapping and the contrastive losses hold for ANY input
of their domain, not only the cases written out elsewhere."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regionmed_clip.processing.image_processing_regionmed_clip import RegionMedCLIPImageProcessor, ViewTransform
from regionmed_clip.training_scripts.losses import global_contrastive_loss, hard_negative_loss, region_contrastive_loss

sides = st.integers(min_value=8, max_value=4000)
view_sizes = st.sampled_from([32, 64, 224, 448])


@st.composite
def boxes_in_images(draw):
    """(height, width, xyxy pixel box inside the image, at least one pixel wide and tall)."""
    height, width = draw(sides), draw(sides)
    x0 = draw(st.floats(min_value=0.0, max_value=width - 1.0))
    y0 = draw(st.floats(min_value=0.0, max_value=height - 1.0))
    x1 = draw(st.floats(min_value=x0 + 1.0, max_value=float(width)))
    y1 = draw(st.floats(min_value=y0 + 1.0, max_value=float(height)))
    return height, width, np.array([x0, y0, x1, y1])


@settings(max_examples=300, deadline=None)
@given(boxes_in_images(), view_sizes)
def test_map_then_unmap_returns_the_box_within_a_pixel(case, view_size):
    height, width, box = case
    transform = ViewTransform.for_image(height, width, view_size, "pad")  # pad mode shows the whole image
    mapped = transform.map_box(box, view_size) * view_size
    scale = np.array([transform.scale_x, transform.scale_y] * 2)
    offset = np.array([transform.offset_x, transform.offset_y] * 2)
    unmapped = (mapped - offset) / scale  # the inverse of `view = original * scale + offset`
    assert np.abs(unmapped - box).max() <= 1.0


@settings(max_examples=300, deadline=None)
@given(sides, sides, view_sizes, st.sampled_from(["pad", "center_crop"]),
       st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), min_size=4, max_size=4))
def test_normalised_boxes_stay_in_the_unit_square(height, width, view_size, resize_mode, box):
    mapped = ViewTransform.for_image(height, width, view_size, resize_mode).map_box(np.array(box), view_size)
    assert np.all((mapped >= 0.0) & (mapped <= 1.0))


@settings(max_examples=300, deadline=None)
@given(boxes_in_images(), st.floats(min_value=1.0, max_value=3.0))
def test_crops_cover_their_boxes(case, context_factor):
    height, width, box = case
    processor = RegionMedCLIPImageProcessor(image_size=64, roi_size=32, roi_context_factor=context_factor)
    crop = processor.crop_box(box, height, width)
    assert crop[0] <= box[0] and crop[1] <= box[1] and crop[2] >= box[2] and crop[3] >= box[3]
    assert 0 <= crop[0] < crop[2] <= width and 0 <= crop[1] < crop[3] <= height


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


@st.composite
def embedding_batches(draw, max_batch=6, dim=4):
    batch = draw(st.integers(min_value=1, max_value=max_batch))
    values = draw(st.lists(finite, min_size=2 * batch * dim, max_size=2 * batch * dim))
    tensor = torch.tensor(values, dtype=torch.float32).reshape(2, batch, dim)
    # The model's embeddings are L2-normalised; an all-zero row normalises to zero, which must be fine too.
    tensor = torch.nn.functional.normalize(tensor, dim=-1)
    scale = torch.tensor(draw(st.floats(min_value=0.0, max_value=math.log(100.0))))
    return tensor[0], tensor[1], scale


@settings(max_examples=200, deadline=None)
@given(embedding_batches())
def test_losses_and_gradients_are_finite_for_any_finite_embeddings(batch):
    images, texts, scale = batch
    images, texts, scale = images.requires_grad_(), texts.requires_grad_(), scale.requires_grad_()
    negatives = torch.nn.functional.normalize(texts.detach().flip(-1), dim=-1)[:, None]
    losses = [global_contrastive_loss(images, texts, scale),
              hard_negative_loss(images, texts, negatives, torch.ones(len(images), 1, dtype=torch.bool), scale),
              region_contrastive_loss(images[:, None], texts[:, None], torch.ones(len(images), 1, dtype=torch.bool),
                                      scale)]
    total = sum(losses)
    total.backward()
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(t.grad).all() for t in (images, texts, scale))


@settings(max_examples=200, deadline=None)
@given(embedding_batches(), st.randoms(use_true_random=False))
def test_the_global_loss_does_not_depend_on_the_batch_order(batch, rng):
    images, texts, scale = batch
    order = list(range(len(images)))
    rng.shuffle(order)
    permuted = torch.tensor(order)
    torch.testing.assert_close(global_contrastive_loss(images[permuted], texts[permuted], scale),
                               global_contrastive_loss(images, texts, scale), rtol=1e-5, atol=1e-5)
