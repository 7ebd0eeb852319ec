"""Collator for the Trainer: canonical rows -> `RegionMedCLIPProcessor` -> model inputs.

Rows come from `load_canonical(..., decode_images=False)`, so images arrive as encoded bytes and
are decoded HERE, where a corrupt one can be skipped: with decoding inside `datasets`, the error
would surface in the DataLoader and end the run.

Per step, each row contributes 1..K of its regions (K = `max_regions`, default the image
processor's `max_rois`): how many and which are drawn from `random.Random(f"{seed}:{image_id}:{epoch}")`,
a pure function of the row and the epoch, so a resumed run samples exactly what an uninterrupted
one would. Regions whose box does not overlap the decoded image, or has no area in the processor's
global view (a centre-crop view cuts the image's edges off), are dropped and counted.

Each sampled region also gets its caption's rule-based negatives (`negatives.region_hard_negatives`:
side, zone, presence, size and finding edits; finding swaps drawn from `finding_vocabulary`, by
default `negatives.FINDINGS`) for the region-level hard-negative loss.

A batch in which no image decodes is replaced by the last good row; `prime(dataset)` decodes a
first good row up front, so that holds for the very first batch of every DataLoader worker too.
Use the default non-persistent DataLoader workers: persistent ones would keep the epoch of
their first copy of the collator.
"""

import io
import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature

from processing import RegionMedCLIPProcessor
from processing.image_processing_regionmed_clip import RegionMedCLIPImageProcessor

from .negatives import FINDINGS, REGION_FINDING_SWAPS, region_hard_negatives

__all__ = ["RegionMedCLIPCollator"]

logger = logging.getLogger(__name__)


def _decode(image: Any) -> Image.Image:
    """A PIL image, or `{"bytes": ..., "path": ...}` as `datasets` stores it undecoded."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Mapping) and image.get("bytes"):
        decoded = Image.open(io.BytesIO(image["bytes"]))
        decoded.load()  # force the decode now: a truncated file fails here, not inside the processor
        return decoded
    raise ValueError(f"no image bytes (got {type(image).__name__})")


def _box_is_usable(bbox: Sequence[float], width: int, height: int, image_processor: RegionMedCLIPImageProcessor) -> bool:
    """Whether the processor will accept `bbox` (xyxy pixels) on a `width x height` image."""
    if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
        return False
    x0, y0, x1, y1 = bbox
    if not (x1 > x0 and y1 > y0 and x1 > 0 and y1 > 0 and x0 < width and y0 < height):
        return False
    return image_processor.region_has_view_area(bbox, height, width)  # else the processor would reject it


class RegionMedCLIPCollator:
    """Callable collator; `skipped_rows`, `skipped_regions` and `skip_reasons` count what was dropped."""

    def __init__(
        self,
        processor: RegionMedCLIPProcessor,
        max_regions: int | None = None,
        seed: int = 0,
        use_regions: bool = True,
        use_summary: bool = True,
        use_negatives: bool = True,
        use_region_negatives: bool = True,
        finding_vocabulary: Sequence[str] | None = None,
        region_finding_swaps: int = REGION_FINDING_SWAPS,
    ):
        self.processor = processor
        self.max_regions = max_regions or processor.image_processor.max_rois
        if self.max_regions <= 0:
            raise ValueError(f"max_regions must be positive, got {self.max_regions}")
        self.seed = seed
        self.epoch = 0
        self.use_regions = use_regions
        self.use_summary = use_summary
        self.use_negatives = use_negatives
        self.use_region_negatives = use_region_negatives
        self.finding_vocabulary = tuple(finding_vocabulary) if finding_vocabulary else FINDINGS
        self.region_finding_swaps = region_finding_swaps
        self.skipped_rows = 0
        self.skipped_regions = 0
        self.skip_reasons: Counter[str] = Counter()
        self._last_good: tuple[dict[str, Any], Image.Image] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prime(self, rows: Iterable[Mapping[str, Any]], max_rows: int = 1000) -> None:
        """Decode the first good row of `rows` (e.g. the train dataset) as the stand-in for a batch
        whose images all fail, so no batch (the first of each DataLoader worker included) ends the run.
        Call before training: workers get copies of the collator."""
        for index, row in enumerate(rows):
            if index >= max_rows:
                break
            try:
                self._last_good = (row, _decode(row["image"]))
                return
            except Exception as error:  # PIL raises many types; the reason is in the error below
                logger.debug("prime: row %s does not decode: %s", row.get("image_id"), error)
        raise ValueError(f"none of the first {max_rows} rows has a decodable image; is the dataset corrupt?")

    def _sample_regions(self, row: Mapping[str, Any], image: Image.Image) -> list[Mapping[str, Any]]:
        usable = []
        for region in row["regions"]:
            if _box_is_usable(region["bbox"], *image.size, self.processor.image_processor):
                usable.append(region)
            else:
                self.skipped_regions += 1
                self.skip_reasons["region box outside the image or its global view, or degenerate"] += 1
        if not usable:
            return []
        rng = random.Random(f"{self.seed}:{row['image_id']}:{self.epoch}")
        count = rng.randint(1, min(self.max_regions, len(usable)))
        chosen = sorted(rng.sample(range(len(usable)), count))  # keep the row's own order
        return [usable[index] for index in chosen]

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> BatchFeature:
        """Model inputs for `rows`, plus `skipped_rows`: how many of these rows were dropped (in
        DataLoader workers the collator's own counters are copies the main process never sees)."""
        skipped_before = self.skipped_rows
        good: list[tuple[Mapping[str, Any], Image.Image]] = []
        for row in rows:
            try:
                good.append((row, _decode(row["image"])))
            except Exception as error:  # any decoder failure (PIL raises many types) skips the row
                self.skipped_rows += 1
                self.skip_reasons[f"image failed to decode: {type(error).__name__}"] += 1
                logger.debug("skipping row %s: %s", row.get("image_id"), error)
        if good:
            self._last_good = good[-1]
        elif self._last_good is not None:
            # A batch with no decodable image: repeat the last good row rather than end the run.
            good = [self._last_good]
        else:
            raise RuntimeError(f"none of these {len(rows)} rows has a decodable image and the collator has no "
                               "stand-in: call prime(dataset) before training")

        images = [image for _, image in good]
        call: dict[str, Any] = {"images": images, "text": [row["report_caption"] for row, _ in good]}
        if self.use_summary:
            call["summary_text"] = [row["summary_caption"] for row, _ in good]
        if self.use_regions:
            sampled = [self._sample_regions(row, image) for row, image in good]
            call["regions"] = [[region["bbox"] for region in regions] for regions in sampled]
            call["region_text"] = [[region["caption"] for region in regions] for regions in sampled]
            if self.use_region_negatives:
                call["region_negative_text"] = [
                    [list(region_hard_negatives(region["caption"], self.seed, self.finding_vocabulary,
                                                self.region_finding_swaps))
                     for region in regions]
                    for regions in sampled
                ]
        if self.use_negatives:
            call["negative_text"] = [list(row["negative_captions"]) for row, _ in good]
        batch = self.processor(**call, return_tensors="pt")
        batch["skipped_rows"] = torch.tensor(self.skipped_rows - skipped_before)
        return batch

    def log_summary(self) -> None:
        """Log what was skipped (call at the end of a run)."""
        if self.skipped_rows or self.skipped_regions:
            logger.warning(
                "collator skipped %d rows and %d regions: %s",
                self.skipped_rows,
                self.skipped_regions,
                dict(self.skip_reasons),
            )
