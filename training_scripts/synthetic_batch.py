"""A synthetic full-objective training batch: the model inputs of every caption level, in the shapes
`training_scripts.collator` yields them, made from random pixels and token ids.

For measuring a training step without a dataset (the benchmarks in benchmarks/, the host-sync count in
tests/test_host_syncs.py); its values mean nothing, its shapes and padding are those of a real batch.
Caption lengths follow the synthetic data (`regionmed-data synth`, as its collated batches come): each
level padded to its own longest caption, real lengths drawn per caption from `CAPTION_LENGTHS`
(tokens, [CLS] and [SEP] included), 3 negatives per report and 9 per region caption by default.
"""

import torch

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig

__all__ = ["CAPTION_LENGTHS", "synthetic_batch"]

# (shortest, longest) real length per caption level, by the model-input prefix of the level: the
# synthetic data's, as a collated batch of 16 rows had them.
CAPTION_LENGTHS = {"": (30, 51), "summary_": (8, 13), "region_": (7, 14), "negative_": (29, 55),
                   "region_negative_": (7, 24)}


def _captions(shape: tuple[int, ...], level: str, config: RegionMedCLIPConfig, generator: torch.Generator
              ) -> dict[str, torch.Tensor]:
    """Token ids and attention mask `(*shape, L)` with real lengths drawn from CAPTION_LENGTHS[level]."""
    shortest, longest = CAPTION_LENGTHS[level]
    text = config.text_config
    lengths = torch.randint(shortest, longest + 1, shape, generator=generator)
    width = int(lengths.max())
    mask = (torch.arange(width) < lengths[..., None]).long()
    ids = torch.randint(5, text.vocab_size, (*shape, width), generator=generator)
    ids[..., 0] = text.cls_token_id
    ids = ids.masked_fill(mask == 0, text.pad_token_id)
    return {f"{level}input_ids": ids, f"{level}attention_mask": mask}


def synthetic_batch(config: RegionMedCLIPConfig, batch: int, num_rois: int, all_levels: bool = True,
                    num_negatives: int = 3, num_region_negatives: int = 9, image_size: int | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for `batch` images at `image_size` (default the config's) with `num_rois` ROIs each;
    the report captions alone, or with `all_levels` every caption level (summary, region, negatives,
    region negatives) as the joint stage trains them. The same `seed` gives the same batch."""
    generator = torch.Generator().manual_seed(seed)
    size = image_size or config.vision_config.image_size
    inputs = {"pixel_values": torch.randn(batch, 3, size, size, generator=generator),
              **_captions((batch,), "", config, generator)}
    if num_rois:
        roi = config.roi_image_size
        corner = torch.rand(batch, num_rois, 2, generator=generator) * 0.6
        extent = 0.1 + torch.rand(batch, num_rois, 2, generator=generator) * 0.3
        inputs |= {"roi_pixel_values": torch.randn(batch, num_rois, 3, roi, roi, generator=generator),
                   "roi_boxes": torch.cat([corner, corner + extent], dim=-1),
                   "roi_mask": torch.ones(batch, num_rois, dtype=torch.long)}
    if all_levels:
        inputs |= _captions((batch,), "summary_", config, generator)
        inputs |= _captions((batch, num_negatives), "negative_", config, generator)
        inputs["negative_mask"] = torch.ones(batch, num_negatives, dtype=torch.long)
        if num_rois:
            inputs |= _captions((batch, num_rois), "region_", config, generator)
            inputs |= _captions((batch, num_rois, num_region_negatives), "region_negative_", config, generator)
            inputs["region_negative_mask"] = torch.ones(batch, num_rois, num_region_negatives, dtype=torch.long)
    return inputs
