"""Packed captions: the text tower encodes the caption levels in length groups, not one padded pass."""

import itertools
import random

import pytest
import torch

from regionmed_clip.data.schema import load_canonical
from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.modeling_regionmed_clip.packing_regionmed_clip import length_groups
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, build_tokenizer
from regionmed_clip.training_scripts.collator import RegionMedCLIPCollator
from regionmed_clip.training_scripts.losses import training_loss

from conftest import tiny_model

EMBEDDINGS = ("text_embeds", "summary_text_embeds", "region_text_embeds", "negative_text_embeds",
              "region_negative_text_embeds")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A collated batch of 16 synthetic rows with every caption level."""
    path = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(path, n=24, seed=0)
    rows = list(load_canonical(path, "train", decode_images=False))
    corpus = [text for row in rows for text in (row["report_caption"], row["summary_caption"],
                                                 *(region["caption"] for region in row["regions"]))]
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(image_size=128, roi_size=32, max_rois=4),
                                       build_tokenizer(corpus, vocab_size=600))
    batch = RegionMedCLIPCollator(processor, seed=0)(rows[:16])
    batch.pop("skip_report")
    return dict(batch)


def text_tower_calls(model, inputs):
    """(ids shape, mask or None) of every text-tower call in one forward."""
    calls = []
    handle = model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((tuple(args[0].shape), args[1] if len(args) > 1 else None)),
        with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return calls


def real_share(calls) -> float:
    computed = sum(shape[0] * shape[1] for shape, _ in calls)
    real = sum(shape[0] * shape[1] if mask is None else int(mask.sum()) for shape, mask in calls)
    return real / computed


def test_packing_keeps_every_embedding_and_gradient(batch):
    packed, one_pass = tiny_model(), tiny_model(caption_length_buckets=1)
    assert packed.config.caption_length_buckets == 6
    outputs = {}
    for name, model in (("packed", packed), ("one_pass", one_pass)):
        model.train()
        output = model(**batch)
        loss, _ = training_loss(output, batch, output.logit_scale, model.config.text_config.pad_token_id)
        loss.backward()
        outputs[name] = output
    for field in EMBEDDINGS:
        torch.testing.assert_close(getattr(outputs["packed"], field), getattr(outputs["one_pass"], field),
                                   rtol=0, atol=2e-6, msg=field)
    for (name, first), second in zip(packed.named_parameters(), one_pass.parameters(), strict=True):
        if first.grad is not None:
            torch.testing.assert_close(first.grad, second.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_text_tower_computes_mostly_real_tokens_on_the_synthetic_data(batch):
    packed_calls = text_tower_calls(tiny_model(), batch)
    one_pass_calls = text_tower_calls(tiny_model(caption_length_buckets=1), batch)
    assert len(one_pass_calls) == 1 and len(packed_calls) <= 6
    assert real_share(packed_calls) >= 0.8
    assert real_share(one_pass_calls) < 0.5  # every level padded to the longest negative report


def test_a_pass_of_equal_lengths_runs_without_a_mask():
    model = tiny_model()
    ids = torch.randint(5, 100, (6, 9))
    ids[:, 0] = model.config.text_config.cls_token_id
    mask = torch.ones_like(ids)
    calls = text_tower_calls(model, {"input_ids": ids[:2], "attention_mask": mask[:2],
                                     "summary_input_ids": ids[2:], "summary_attention_mask": mask[2:]})
    assert [mask is None for _, mask in calls] == [False, True]  # the report pass keeps its mask


def test_length_groups_are_the_fewest_tokens_any_split_computes():
    def tokens(lengths, bounds):
        return sum((end - start) * lengths[end - 1] for start, end in itertools.pairwise(bounds))

    generator = random.Random(0)
    for _ in range(200):
        lengths = sorted(generator.choice([generator.randint(1, 9), generator.randint(20, 30)])
                         for _ in range(generator.randint(1, 8)))
        groups = generator.randint(1, 4)
        bounds = length_groups(lengths, groups)
        assert bounds[0] == 0 and bounds[-1] == len(lengths) and len(bounds) - 1 <= groups
        assert all(start < end for start, end in itertools.pairwise(bounds))
        best = min(tokens(lengths, [0, *cuts, len(lengths)])
                   for count in range(groups) for cuts in itertools.combinations(range(1, len(lengths)), count))
        assert tokens(lengths, bounds) == best, (lengths, groups, bounds)
