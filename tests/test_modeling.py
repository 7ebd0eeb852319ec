import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPModel
from regionmed_clip.modeling_regionmed_clip.roi_regionmed_clip import roi_align

from conftest import make_inputs, tiny_config, tiny_model


def test_output_shapes(model, config):
    inputs = make_inputs(config, [4, 2, 0])
    out = model(**inputs, return_loss=True)
    dim = config.projection_dim
    assert out.logits_per_image.shape == (3, 3)
    assert torch.equal(out.logits_per_text, out.logits_per_image.t())
    assert out.image_embeds.shape == out.box_free_image_embeds.shape == (3, dim)
    assert out.text_embeds.shape == (3, dim)
    assert out.region_embeds.shape == (3, 4, dim)
    # 0/1 like an attention mask: transformers' outputs hold no bool tensors
    assert out.roi_mask.dtype == torch.long and out.roi_mask.shape == (3, 4)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3))
    # masked-out region slots are exactly zero; valid ones are unit vectors
    assert torch.all(out.region_embeds[~out.roi_mask.bool()] == 0)
    assert torch.allclose(out.region_embeds[out.roi_mask.bool()].norm(dim=-1), torch.ones(6))


def test_without_rois_the_model_is_a_global_clip(model, config):
    inputs = make_inputs(config, [1, 1])
    out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert out.region_embeds is None and out.roi_mask is None
    assert torch.equal(out.image_embeds, out.box_free_image_embeds)


def test_padded_rois_change_nothing():
    model = tiny_model(roi_gate_init=0.5, region_pool_gate_init=0.5)
    config = model.config
    tight = make_inputs(config, [3, 1])
    padded = make_inputs(config, [3, 1], num_slots=7, seed=1)
    # same real content, different (junk) padding and more slots
    padded["pixel_values"] = tight["pixel_values"]
    padded["input_ids"], padded["attention_mask"] = tight["input_ids"], tight["attention_mask"]
    padded["roi_pixel_values"][:, :3] = tight["roi_pixel_values"]
    padded["roi_boxes"][:, :3] = tight["roi_boxes"]
    padded["roi_boxes"][1, 5] = float("nan")  # junk in a padding slot must not leak either
    with torch.no_grad():
        a, b = model(**tight), model(**padded)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.region_embeds, b.region_embeds[:, :3], rtol=0, atol=1e-6)
    assert torch.all(b.region_embeds[:, 3:] == 0)


def test_permuting_rois_permutes_region_embeddings():
    model = tiny_model(roi_gate_init=0.5, region_pool_gate_init=0.5)
    inputs = make_inputs(model.config, [4, 4])
    perm = torch.tensor([2, 0, 3, 1])
    permuted = dict(inputs)
    for key in ("roi_pixel_values", "roi_boxes", "roi_mask"):
        permuted[key] = inputs[key][:, perm]
    with torch.no_grad():
        a, b = model(**inputs), model(**permuted)
    torch.testing.assert_close(a.region_embeds[:, perm], b.region_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, rtol=0, atol=1e-6)


def test_zero_pool_gate_keeps_the_global_image_embedding(model, config):
    assert config.region_pool_gate_init == 0.0
    inputs = make_inputs(config, [4, 2])
    with torch.no_grad():
        out = model(**inputs)
        global_only = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert torch.equal(out.image_embeds, out.box_free_image_embeds)
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(global_only, dim=-1))


def test_open_pool_gate_mixes_regions_into_the_image_embedding():
    model = tiny_model(region_pool_gate_init=1.0)
    out = model(**make_inputs(model.config, [4, 2]))
    assert not torch.allclose(out.image_embeds, out.box_free_image_embeds, atol=1e-4)


def _with_region_captions(inputs):
    """Add region captions: they switch on the region and dense-region terms (the dense head feeds only the latter)."""
    generator = torch.Generator().manual_seed(1)
    return {**inputs, "region_input_ids": torch.randint(5, 100, (*inputs["roi_mask"].shape, 8), generator=generator)}


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs, return_loss=True).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_gradients_reach_every_trainable_parameter_with_rois():
    # open gates: with the default closed gates the fused branch is scaled by tanh(0) = 0
    model = tiny_model(roi_gate_init=0.5, region_pool_gate_init=0.5).train()
    grads = _grads(model, _with_region_captions(make_inputs(model.config, [4, 3])))
    missing = [name for name, grad in grads.items() if grad is None or not torch.any(grad != 0)]
    assert missing == [], missing


def test_closed_gates_still_train_the_gates():
    model = tiny_model().train()
    grads = _grads(model, _with_region_captions(make_inputs(model.config, [4, 3])))
    assert all(grad is not None for grad in grads.values())
    # the global loss sees the regions only through the pool, so its gate must learn to open
    assert grads["roi_processor.pool_gate"].abs() > 0


def test_forward_backward_with_four_rois_per_image(config):
    model = tiny_model().train()
    inputs = make_inputs(config, [4, 4, 4, 4])
    out = model(**inputs, return_loss=True)
    out.loss.backward()
    assert out.region_embeds.shape == (4, 4, config.projection_dim)
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    assert all(torch.isfinite(grad).all() for grad in grads.values() if grad is not None)
    # Closed gates scale the fused branch by tanh(0) = 0: exactly its parameters get no gradient. Every
    # other one does: both towers, the projections, the temperature, the dense head (the box-free
    # windows read it) and the pool gate, which is what opens the branch.
    gated = tuple(f"roi_processor.{name}." for name in ("box_embedding", "fusion_layers", "region_layernorm",
                                                        "region_pool"))
    without = sorted(name for name, grad in grads.items() if grad is None or not torch.any(grad != 0))
    assert without == sorted(name for name in grads if name.startswith(gated))
    assert {"roi_processor.pool_gate", "roi_processor.context_projection.weight", "logit_scale"} <= set(grads) - set(without)

    # The pool gate's gradient is the loss's central difference (eval mode: the box-free centre stays put).
    model.eval().zero_grad(set_to_none=True)
    model(**inputs, return_loss=True).loss.backward()
    gate, step = model.roi_processor.pool_gate, 1e-2
    with torch.no_grad():
        losses = []
        for value in (step, -step):
            gate.fill_(value)
            losses.append(model(**inputs, return_loss=True).loss.double())
        gate.zero_()
    finite_difference = (losses[0] - losses[1]) / (2 * step)
    assert gate.grad.abs().item() > 1e-4
    assert gate.grad.item() == pytest.approx(finite_difference.item(), rel=1e-2)


def test_roi_processor_gradients_match_finite_differences_with_closed_gates():
    from regionmed_clip.modeling_regionmed_clip.roi_regionmed_clip import RegionMedCLIPROIProcessor

    config = tiny_config(vision_config={"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16},
                         roi_fusion_heads=2)
    config._attn_implementation = "eager"  # what a model would resolve its attention backend to
    torch.manual_seed(0)
    processor = RegionMedCLIPROIProcessor(config).double().eval()
    assert processor.pool_gate.item() == processor.fusion_layers[0].attn_gate.item() == 0  # closed
    grid = (3, 4)
    crop_features = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    global_tokens = torch.randn(2, 1 + grid[0] * grid[1], 8, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[0.1, 0.2, 0.7, 0.9], [0.05, 0.0, 0.4, 0.35], [0.5, 0.5, 1.0, 0.8]]] * 2,
                         dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    gates = [processor.pool_gate, processor.fusion_layers[0].attn_gate, processor.fusion_layers[0].mlp_gate]

    def outputs(crops, tokens, pool_gate, attn_gate, mlp_gate):
        parameters = {"pool_gate": pool_gate, "fusion_layers.0.attn_gate": attn_gate,
                      "fusion_layers.0.mlp_gate": mlp_gate}
        return torch.func.functional_call(processor, parameters, (crops, boxes, mask, tokens, grid))

    gate_inputs = [gate.detach().clone().requires_grad_() for gate in gates]
    assert torch.autograd.gradcheck(outputs, (crop_features, global_tokens, *gate_inputs))
    # a random readout: a plain sum of LayerNorm-ed features has no gradient at all
    readout = [torch.randn(output.shape, dtype=torch.float64) for output in outputs(crop_features, global_tokens,
                                                                                   *gate_inputs)]
    sum((output * weights).sum() for output, weights in zip(outputs(crop_features, global_tokens, *gate_inputs),
                                                             readout, strict=True)).backward()
    # closed gates still pass gradient to themselves, and the crops and patch tokens reach the regions
    assert all(gate.grad.abs().item() > 0 for gate in gate_inputs)
    assert crop_features.grad[mask].abs().amin() > 0 and torch.all(crop_features.grad[~mask] == 0)
    assert global_tokens.grad[:, 1:].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = make_inputs(tiny_config(), [4, 2])
    reference = tiny_model(roi_gate_init=0.5).train()
    checkpointed = tiny_model(roi_gate_init=0.5).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.vision_model.encoder.layers[0].gradient_checkpointing
    expected, actual = _grads(reference, inputs), _grads(checkpointed, inputs)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_only_valid_crops_are_encoded(model, config, monkeypatch):
    seen = []
    original = model.vision_model.forward

    def spy(pixel_values, *flags, **options):
        seen.append(pixel_values.shape[0])
        return original(pixel_values, *flags, **options)

    monkeypatch.setattr(model.vision_model, "forward", spy)
    model(**make_inputs(config, [3, 0, 1], num_slots=4))
    assert seen == [3, 4]  # the global batch, then the 4 valid crops packed together


@pytest.mark.parametrize("num_slots", [0, 3])
def test_a_batch_without_valid_rois_gives_zero_regions(num_slots):
    model = tiny_model(region_pool_gate_init=1.0)
    out = model(**make_inputs(model.config, [0, 0], num_slots=num_slots))
    assert out.region_embeds.shape == (2, num_slots, model.config.projection_dim)
    assert torch.all(out.region_embeds == 0)
    torch.testing.assert_close(out.image_embeds, out.box_free_image_embeds)


def test_feature_getters_agree_with_forward(model, config):
    inputs = make_inputs(config, [2, 1])
    with torch.no_grad():
        out = model(**inputs)
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
        region_output = model.get_region_features(
            inputs["pixel_values"], inputs["roi_pixel_values"], inputs["roi_boxes"], inputs["roi_mask"]
        )
        image_output = model.get_image_features(inputs["pixel_values"], inputs["roi_pixel_values"],
                                                inputs["roi_boxes"], inputs["roi_mask"])
    regions = region_output.pooler_output
    # v5's convention: the tower output, its pooler_output the projected embedding
    assert image_output.last_hidden_state.shape[0] == 2 and region_output.pooler_output.shape[:2] == (2, 2)
    torch.testing.assert_close(torch.nn.functional.normalize(image_output.pooler_output, dim=-1), out.image_embeds)
    torch.testing.assert_close(torch.nn.functional.normalize(text, dim=-1), out.text_embeds)
    torch.testing.assert_close(
        torch.nn.functional.normalize(regions, dim=-1) * inputs["roi_mask"][..., None], out.region_embeds
    )


def test_logit_scale_is_clamped_at_100(model, config):
    inputs = make_inputs(config, [1, 1])
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        out = model(**inputs)
    cosine = out.text_embeds @ out.image_embeds.t()
    torch.testing.assert_close(out.logits_per_text, 100 * cosine)


def _bilinear(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """`feature (C, H, W)` at pixel coordinates (y, x), pixel i centred at i; outside, the border pixel."""
    height, width = feature.shape[1:]
    y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
    top, left = math.floor(y), math.floor(x)
    bottom, right = min(top + 1, height - 1), min(left + 1, width - 1)
    dy, dx = y - top, x - left
    return ((1 - dy) * (1 - dx) * feature[:, top, left] + (1 - dy) * dx * feature[:, top, right]
            + dy * (1 - dx) * feature[:, bottom, left] + dy * dx * feature[:, bottom, right])


def _roi_align_oracle(feature: torch.Tensor, box: list[float], output_size: int, sampling_ratio: int) -> torch.Tensor:
    """RoIAlign from its definition: the box (normalised xyxy) cut into `output_size` x `output_size` bins,
    each the mean of `sampling_ratio` x `sampling_ratio` bilinear samples at its sub-bin centres.
    Normalised coordinate u is pixel coordinate u * size - 0.5 (pixel i covers [i, i + 1))."""
    height, width = feature.shape[1:]
    x0, y0, x1, y1 = box
    side = output_size * sampling_ratio
    out = torch.zeros(output_size, output_size, feature.shape[0], dtype=feature.dtype)
    for row, col, i, j in itertools.product(range(output_size), range(output_size), range(sampling_ratio),
                                            range(sampling_ratio)):
        y = (y0 + (y1 - y0) * (row * sampling_ratio + i + 0.5) / side) * height - 0.5
        x = (x0 + (x1 - x0) * (col * sampling_ratio + j + 0.5) / side) * width - 0.5
        out[row, col] += _bilinear(feature, y, x) / sampling_ratio**2
    return out


@pytest.mark.parametrize(("output_size", "sampling_ratio"), [(2, 2), (3, 1), (3, 3)])
def test_roi_align_matches_an_independent_oracle_on_asymmetric_boxes(output_size, sampling_ratio):
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 3, 5, 7, generator=generator, dtype=torch.float64)  # (B, C, H, W): not square
    boxes = [[[0.05, 0.1, 0.8, 0.45], [0.31, 0.52, 0.97, 0.93]],  # wide, tall, off-centre; touching borders
             [[0.0, 0.0, 1.0, 1.0], [0.6, 0.02, 0.74, 0.99]]]
    pooled = roi_align(feature, torch.tensor(boxes, dtype=torch.float64), output_size, sampling_ratio)
    assert pooled.shape == (2, 2, output_size, output_size, 3)
    for image, image_boxes in enumerate(boxes):
        for index, box in enumerate(image_boxes):
            expected = _roi_align_oracle(feature[image], box, output_size, sampling_ratio)
            torch.testing.assert_close(pooled[image, index], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"roi_boxes": torch.zeros(2, 4, 3)}, "roi_boxes must be"),
        ({"roi_mask": torch.ones(2, 5, dtype=torch.bool)}, "roi_mask must be"),
        ({"roi_pixel_values": torch.zeros(3, 4, 3, 32, 32)}, "roi_pixel_values must be"),
        ({"roi_boxes": None}, "roi_boxes is required"),
    ],
)
def test_bad_roi_inputs_name_the_argument(model, config, change, message):
    inputs = make_inputs(config, [4, 4])
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_nan_box_in_a_valid_roi_is_rejected(model, config):
    inputs = make_inputs(config, [4, 4])
    inputs["roi_boxes"][0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(**inputs)


def test_text_longer_than_positions_is_rejected(model, config):
    too_long = torch.ones(1, config.text_config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=too_long)


def test_return_tuple(model, config):
    inputs = make_inputs(config, [1, 1])
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], model(**inputs).logits_per_image)


def test_model_type_registered_for_auto_classes():
    assert RegionMedCLIPModel._auto_class == "AutoModel"


def test_an_image_without_valid_rois_gets_nothing_from_the_pool():
    model = tiny_model(region_pool_gate_init=1.0)
    out = model(**make_inputs(model.config, [3, 0]))
    torch.testing.assert_close(out.image_embeds[1], out.box_free_image_embeds[1])
    assert not torch.allclose(out.image_embeds[0], out.box_free_image_embeds[0])


def test_input_embeddings_are_the_text_tokens_and_resize_keeps_them():
    model = tiny_model()
    embeddings = model.get_input_embeddings()
    assert embeddings is model.text_model.embeddings.word_embeddings
    before = embeddings.weight.detach().clone()
    model.resize_token_embeddings(before.shape[0] + 7)
    after = model.get_input_embeddings().weight
    assert after.shape[0] == model.config.text_config.vocab_size == before.shape[0] + 7
    assert torch.equal(after[: before.shape[0]], before)
    ids = torch.tensor([[model.config.text_config.cls_token_id, before.shape[0] + 6]])  # a new token works
    assert torch.isfinite(model.get_text_features(ids).pooler_output).all()


def test_return_loss_is_clips_symmetric_cross_entropy(config):
    model = tiny_model()
    out = model(**make_inputs(config, [2, 0, 1]), return_loss=True)
    targets = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(out.logits_per_text, targets)
                + torch.nn.functional.cross_entropy(out.logits_per_image, targets)) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.logit_scale.item() == pytest.approx(math.exp(config.logit_scale_init_value), rel=1e-6)
    with pytest.raises(ValueError, match="one report caption per image"):
        inputs = make_inputs(config, [1, 1])
        model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"][:1], return_loss=True)


def test_token_type_ids_are_accepted_and_zero_means_a_single_segment(config):
    model = tiny_model()
    inputs = make_inputs(config, [1, 1])
    with torch.no_grad():
        plain = model(**inputs).text_embeds
        zeros = model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"])).text_embeds
        ones = model(**inputs, token_type_ids=torch.ones_like(inputs["input_ids"])).text_embeds
    torch.testing.assert_close(zeros, plain)  # what the pipeline passes for a BERT tokenizer changes nothing
    assert not torch.allclose(ones, plain)  # the segment embedding is really read
    with pytest.raises(ValueError, match="must match input_ids"):
        model(input_ids=inputs["input_ids"], token_type_ids=torch.zeros(1, 3, dtype=torch.long))


def test_hidden_states_and_attentions_of_both_towers(config):
    model = RegionMedCLIPModel(tiny_config()).eval()
    model.set_attn_implementation("eager")
    inputs = make_inputs(config, [2, 1])
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        plain = model(**inputs)
    vision, text = out.vision_model_output, out.text_model_output
    layers_v, layers_t = config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers
    tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    assert len(vision.hidden_states) == layers_v + 1 and len(text.hidden_states) == layers_t + 1
    assert vision.hidden_states[0].shape == (2, tokens, config.vision_config.hidden_size)
    assert text.hidden_states[-1].shape == text.last_hidden_state.shape == (*inputs["input_ids"].shape,
                                                                             config.text_config.hidden_size)
    heads = config.vision_config.num_attention_heads
    assert len(vision.attentions) == layers_v and vision.attentions[0].shape == (2, heads, tokens, tokens)
    torch.testing.assert_close(text.attentions[0].sum(-1), torch.ones_like(text.attentions[0].sum(-1)))
    assert plain.vision_model_output.hidden_states is None and plain.text_model_output.attentions is None
    torch.testing.assert_close(out.image_embeds, plain.image_embeds)  # asking for them changes nothing
    as_tuple = model(**inputs, return_dict=False)
    assert torch.equal(as_tuple[0], plain.logits_per_image)


def test_towers_are_models_with_their_own_attention_backend(tmp_path):
    from transformers import PreTrainedModel

    from regionmed_clip.modeling_regionmed_clip.modeling_regionmed_clip import RegionMedCLIPVisionModel

    model = tiny_model()
    assert isinstance(model.vision_model, PreTrainedModel) and isinstance(model.text_model, PreTrainedModel)
    model.save_pretrained(tmp_path / "model")
    mixed = RegionMedCLIPModel.from_pretrained(tmp_path / "model",
                                               attn_implementation={"vision_config": "eager", "text_config": "sdpa"})
    assert mixed.vision_model.encoder.layers[0].self_attn.config._attn_implementation == "eager"
    assert mixed.text_model.encoder.layers[0].self_attn.config._attn_implementation == "sdpa"
    inputs = make_inputs(model.config, [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(mixed(**inputs).image_embeds, model(**inputs).image_embeds, atol=1e-5, rtol=1e-5)
    # a tower saves and loads on its own, with its own config
    model.vision_model.save_pretrained(tmp_path / "vision")
    vision = RegionMedCLIPVisionModel.from_pretrained(tmp_path / "vision").eval()
    with torch.no_grad():
        torch.testing.assert_close(vision(inputs["pixel_values"]).pooler_output,
                                   model.vision_model(inputs["pixel_values"]).pooler_output)


def test_with_projection_towers_load_from_a_full_folder(tmp_path):
    from regionmed_clip.modeling_regionmed_clip import (
        RegionMedCLIPTextModelWithProjection,
        RegionMedCLIPVisionTowerWithProjection,
    )

    model = tiny_model()
    model.save_pretrained(tmp_path)
    text = RegionMedCLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
    vision = RegionMedCLIPVisionTowerWithProjection.from_pretrained(tmp_path).eval()
    assert text.config.projection_dim == vision.config.projection_dim == model.config.projection_dim
    inputs = make_inputs(model.config, [1, 1])
    with torch.no_grad():
        full = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).text_embeds
        alone = text(inputs["input_ids"], inputs["attention_mask"]).text_embeds
        torch.testing.assert_close(torch.nn.functional.normalize(alone, dim=-1), full)  # the same caption embeddings
        pooled = model.visual_projection(model.vision_model(inputs["pixel_values"]).pooler_output)
        torch.testing.assert_close(vision(inputs["pixel_values"]).image_embeds, pooled)


def test_feature_getters_follow_the_config_flags_like_transformers(config):
    model = tiny_model()
    inputs = make_inputs(config, [1, 1])
    model.config.text_config.output_hidden_states = True  # a tower's config may ask, as transformers allows
    text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    assert len(text.hidden_states) == config.text_config.num_hidden_layers + 1
    as_tuple = model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], model.get_image_features(inputs["pixel_values"]).pooler_output)


@pytest.mark.parametrize(
    "box", [[10.0, 20.0, 60.0, 90.0], [0.6, 0.2, 0.3, 0.5], [0.1, 0.5, 0.4, 0.5]],
    ids=["pixel box", "swapped x", "no height"],
)
def test_roi_boxes_that_are_not_normalised_xyxy_are_refused(model, config, box):
    inputs = make_inputs(config, [2, 1])
    inputs["roi_boxes"][0, 1] = torch.tensor(box)
    with pytest.raises(ValueError, match=r"roi_boxes must be normalised xyxy in \[0, 1\] with x1 > x0 and y1 > y0"):
        model(**inputs)
    inputs["roi_boxes"][1, 1] = torch.tensor(box)  # the same box in a padding slot is ignored
    inputs["roi_boxes"][0, 1] = torch.tensor([0.1, 0.1, 0.3, 0.3])
    model(**inputs)


def test_a_broken_xformers_install_does_not_break_importing_the_model(tmp_path):
    fake = tmp_path / "xformers"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "ops.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    code = "import modeling_regionmed_clip as m; print('available', m.XFORMERS_AVAILABLE)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[1]}"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "available False" in result.stdout
    assert "xformers is installed but does not import (libcudart.so.12" in result.stderr
