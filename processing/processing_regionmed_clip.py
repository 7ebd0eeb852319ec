"""RegionMed-CLIP processor: images + regions through the image processor, four caption levels
through the tokenizer, in one `BatchFeature` whose shapes line up with the model's forward."""

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_regionmed_clip import RegionMedCLIPImageProcessor
from .tokenization_regionmed_clip import load_tokenizer

__all__ = ["CAPTION_LEVELS", "CaptionLevel", "RegionMedCLIPProcessor", "caption_level"]


@dataclass(frozen=True)
class CaptionLevel:
    """One caption level: the processor argument that takes it, the model inputs it becomes and their
    shape, and the canonical dataset column it comes from. Which loss terms need it is said on the
    training side (`training_scripts.losses.TERM_CAPTION_LEVELS`)."""

    name: str
    argument: str  # the processor's keyword
    prefix: str  # of the model inputs: f"{prefix}input_ids", f"{prefix}attention_mask"
    shape: str  # of `input_ids`
    mask: str | None  # the validity mask of ragged levels
    source: str  # where the canonical rows keep it

    @property
    def input_names(self) -> tuple[str, ...]:
        return (f"{self.prefix}input_ids", f"{self.prefix}attention_mask", *((self.mask,) if self.mask else ()))


# The one table of caption levels: the processor's outputs, the model's text inputs and the Trainer's
# batch keys all derive from it.
CAPTION_LEVELS: tuple[CaptionLevel, ...] = (
    CaptionLevel("report", "text", "", "(T, L)", None, "report_caption"),
    CaptionLevel("summary", "summary_text", "summary_", "(B, L)", None, "summary_caption"),
    CaptionLevel("region", "region_text", "region_", "(B, K, L)", None, "regions[].caption (aligned with roi_mask)"),
    CaptionLevel("negative", "negative_text", "negative_", "(B, M, L)", "negative_mask", "negative_captions"),
    CaptionLevel("region_negative", "region_negative_text", "region_negative_", "(B, K, M, L)", "region_negative_mask",
                 "made per region caption by regionmed_clip.data.negatives"),
)


def caption_level(name: str) -> CaptionLevel:
    """The level called `name`; KeyError naming the known ones otherwise."""
    for level in CAPTION_LEVELS:
        if level.name == name:
            return level
    raise KeyError(f"unknown caption level {name!r}; known: {[level.name for level in CAPTION_LEVELS]}")


def _as_text_list(value: str | Sequence[str], name: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate, e.g. from a bad decode: the tokenizer cannot take it
            raise ValueError(f"{name}[{index}] cannot be encoded as UTF-8 ({error.reason} at character {error.start}: "
                             f"{text[error.start]!r}); fix or drop the character") from None
    return texts


def _as_ragged(value: Sequence[Sequence[str]], name: str, batch: int) -> list[list[str]]:
    """Per-image lists of captions; validates the nesting and the count of images."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list with one list of captions per image, got {type(value).__name__}")
    if len(value) != batch:
        raise ValueError(f"{name} needs one list per image: {batch} images, got {len(value)} lists")
    rows = []
    for index, row in enumerate(value):
        if isinstance(row, str) or not isinstance(row, (list, tuple)):
            raise TypeError(f"{name}[{index}] must be a list of str, got {type(row).__name__}")
        rows.append(_as_text_list(row, f"{name}[{index}]"))
    return rows


class RegionMedCLIPProcessor(ProcessorMixin):
    """Wraps a `RegionMedCLIPImageProcessor` and a BERT-style tokenizer.

    `processor(images=..., text=..., regions=..., region_text=..., negative_text=...,
    summary_text=..., return_tensors="pt")` returns any subset of:

    - `pixel_values (B, 3, S, S)`, `roi_pixel_values (B, K, 3, R, R)`, `roi_boxes (B, K, 4)`,
      `roi_mask (B, K)` from the image processor;
    - `input_ids`, `attention_mask (T, L)` for `text` (report captions);
    - `summary_input_ids`, `summary_attention_mask (B, L)` for `summary_text`;
    - `region_input_ids`, `region_attention_mask (B, K, L)`: the caption of ROI slot k of image b,
      aligned with `roi_mask` (padding slots are all padding);
    - `negative_input_ids`, `negative_attention_mask (B, M, L)` and `negative_mask (B, M)` for the
      per-image hard-negative captions (ragged counts, padded to the most in the batch);
    - `region_negative_input_ids`, `region_negative_attention_mask (B, K, M, L)` and
      `region_negative_mask (B, K, M)` for `region_negative_text`: per image, per region, that
      region caption's negatives.

    Captions are padded to the longest in each group and truncated at the tokenizer's
    `model_max_length` (256 by default).
    """

    def __init__(self, image_processor: RegionMedCLIPImageProcessor | None = None, tokenizer: Any = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def _load_tokenizer_from_pretrained(cls, sub_processor_type: str, pretrained_model_name_or_path: Any,
                                        subfolder: str = "", **kwargs: Any) -> Any:
        # A local folder loads through `load_tokenizer`: a missing tokenizer is named ("no tokenizer in DIR",
        # not a message about sentencepiece), and the folder's config.json is not read (AutoTokenizer's
        # reading of it asks on stdin whether to trust the remote code when the caller did not say).
        folder = Path(str(pretrained_model_name_or_path)) / subfolder
        if sub_processor_type == "tokenizer" and folder.is_dir():
            return load_tokenizer(folder)
        return super()._load_tokenizer_from_pretrained(sub_processor_type, pretrained_model_name_or_path,
                                                       subfolder=subfolder, **kwargs)

    def with_max_rois(self, max_rois: int) -> "RegionMedCLIPProcessor":
        """This processor, or a copy whose image processor keeps up to `max_rois` regions per image
        when that is more than it keeps (the saved processor keeps the training `max_rois`)."""
        if max_rois <= self.image_processor.max_rois:
            return self
        widened = copy.copy(self)
        widened.image_processor = copy.copy(self.image_processor)
        widened.image_processor.max_rois = max_rois
        return widened

    def _tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer(
            texts, padding="longest", truncation=True, return_token_type_ids=False, return_tensors="np"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _tokenize_grid(self, rows: list[list[str]], slots: int) -> dict[str, np.ndarray]:
        """Ragged per-image captions -> `(B, slots, L)` ids and masks; empty slots are all padding."""
        flat = [text for row in rows for text in row]
        length = 0
        if flat:
            encoded = self._tokenize(flat)
            length = encoded["input_ids"].shape[1]
        ids = np.full((len(rows), slots, length), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), slots, length), dtype=np.int64)
        cursor = 0
        for row_index, row in enumerate(rows):
            count = len(row)
            if count:
                ids[row_index, :count] = encoded["input_ids"][cursor : cursor + count]
                mask[row_index, :count] = encoded["attention_mask"][cursor : cursor + count]
            cursor += count
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        regions: Sequence[Sequence[Any]] | None = None,
        region_text: Sequence[Sequence[str]] | None = None,
        negative_text: Sequence[Sequence[str]] | None = None,
        summary_text: str | Sequence[str] | None = None,
        region_negative_text: Sequence[Sequence[Sequence[str]]] | None = None,
        return_tensors: str | None = "pt",
        image_features: Mapping[str, Any] | None = None,
        **image_kwargs: Any,
    ) -> BatchFeature:
        """`image_features`: the image processor's output for these images, made beforehand (e.g.
        `image_processor.stack` of one-image outputs), in place of `images`; `regions` then only
        align the region captions with the ROI slots."""
        if images is not None and image_features is not None:
            raise ValueError("give images or image_features, not both")
        if images is None and image_features is None and text is None and summary_text is None:
            raise ValueError("the processor needs images, text or summary_text")
        data: dict[str, Any] = {}
        batch = None
        if images is not None:
            data.update(self.image_processor(images, regions=regions, **image_kwargs))
            batch = data["pixel_values"].shape[0]
        elif image_features is not None:
            if image_kwargs:
                raise TypeError(f"image arguments {sorted(image_kwargs)} were given with image_features")
            data.update(image_features)
            batch = data["pixel_values"].shape[0]
        else:
            for name, value in (("regions", regions), ("region_text", region_text), ("negative_text", negative_text),
                                ("region_negative_text", region_negative_text)):
                if value is not None:
                    raise ValueError(f"{name} needs images: they are per-image")
            if image_kwargs:
                raise TypeError(f"image arguments {sorted(image_kwargs)} were given without images")

        if text is not None:
            data.update(self._tokenize(_as_text_list(text, "text")))
        if summary_text is not None:
            summaries = _as_text_list(summary_text, "summary_text")
            if batch is not None and len(summaries) != batch:
                raise ValueError(f"summary_text needs one caption per image: {batch} images, got {len(summaries)}")
            encoded = self._tokenize(summaries)
            data["summary_input_ids"], data["summary_attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        if region_text is not None:
            if regions is None:
                raise ValueError("region_text needs regions: each caption describes one region")
            rows = _as_ragged(region_text, "region_text", batch)
            for index, (row, image_regions) in enumerate(zip(rows, regions, strict=True)):
                if len(row) != len(image_regions):
                    raise ValueError(
                        f"region_text[{index}] has {len(row)} captions but regions[{index}] has {len(image_regions)} regions"
                    )
            # The image processor keeps the first max_rois regions; keep the same captions.
            rows = [row[: self.image_processor.max_rois] for row in rows]
            grid = self._tokenize_grid(rows, data["roi_mask"].shape[1])
            data["region_input_ids"], data["region_attention_mask"] = grid["input_ids"], grid["attention_mask"]
        if region_negative_text is not None:
            data.update(self._region_negatives(region_negative_text, region_text, data["roi_mask"].shape[1]))
        if negative_text is not None:
            rows = _as_ragged(negative_text, "negative_text", batch)
            slots = max((len(row) for row in rows), default=0)
            grid = self._tokenize_grid(rows, slots)
            data["negative_input_ids"], data["negative_attention_mask"] = grid["input_ids"], grid["attention_mask"]
            counts = np.array([len(row) for row in rows])
            data["negative_mask"] = np.arange(slots)[None, :] < counts[:, None]
        return BatchFeature(data=dict(data), tensor_type=return_tensors)

    def _region_negatives(
        self, region_negative_text: Sequence[Sequence[Sequence[str]]], region_text: Any, slots: int
    ) -> dict[str, np.ndarray]:
        """Per image, per region, a list of negative captions -> `(B, K, M, L)` ids and masks and the
        `(B, K, M)` validity mask, aligned with the region captions' slots."""
        if region_text is None:
            raise ValueError("region_negative_text needs region_text: its captions are negatives of region captions")
        if isinstance(region_negative_text, str) or len(region_negative_text) != len(region_text):
            raise ValueError(f"region_negative_text needs one list per image like region_text ({len(region_text)})")
        per_region: list[list[str]] = []
        for index, (negatives, captions) in enumerate(zip(region_negative_text, region_text, strict=True)):
            if isinstance(negatives, str) or len(negatives) != len(captions):
                raise ValueError(f"region_negative_text[{index}] needs one list of negatives per region "
                                 f"({len(captions)}), got {negatives!r}")
            rows = _as_ragged(negatives, f"region_negative_text[{index}]", len(captions))[: self.image_processor.max_rois]
            per_region += rows + [[] for _ in range(slots - len(rows))]
        most = max((len(row) for row in per_region), default=0)
        grid = self._tokenize_grid(per_region, most)
        batch = len(region_text)
        counts = np.array([len(row) for row in per_region]).reshape(batch, slots)
        shape = (batch, slots, most, grid["input_ids"].shape[-1])
        return {
            "region_negative_input_ids": grid["input_ids"].reshape(shape),
            "region_negative_attention_mask": grid["attention_mask"].reshape(shape),
            "region_negative_mask": np.arange(most)[None, None, :] < counts[..., None],
        }

    @property
    def model_input_names(self) -> list[str]:
        return [*RegionMedCLIPImageProcessor.model_input_names,
                *(name for level in CAPTION_LEVELS for name in level.input_names)]
