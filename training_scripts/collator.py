"""Collator for the Trainer: canonical rows -> `RegionMedCLIPProcessor` -> model inputs.

Rows come from `load_canonical(..., decode_images=False)`, so images arrive as encoded bytes and
are decoded HERE, where a corrupt one can be skipped: with decoding inside `datasets`, the error
would surface in the DataLoader and end the run.

Per step, each row contributes 1..K of its regions (K = `max_regions`, default the image
processor's `max_rois`): how many and which are drawn from `random.Random(f"{seed}:{image_id}:{epoch}")`,
a pure function of the row and the epoch, so a resumed run samples exactly what an uninterrupted
one would. Regions whose box does not overlap the decoded image, or has no area in the processor's
global view (a centre-crop view cuts the image's edges off), are dropped and counted.

Windows (box-free training): with `windows_per_image` W > 0, each row that uses regions also gets
up to W windows of the grid the processor proposes at inference (`image_processor.proposal_boxes`),
as extra ROI slots after its regions: up to W // 2 that hold a lesion (at least `WINDOW_MIN_COVER` of
its box, possibly off-centre or cut by the window's edge; one per lesion first), captioned with that
lesion's caption, and background windows whose crop touches no lesion box, captioned
`background_caption` (the model config's, `DEFAULT_BACKGROUND_CAPTION` by default; `label_windows` decides; a window that holds part of a lesion, or two lesions,
is left out). Their negatives: a lesion window's are its caption's (below) plus the background caption;
a background window's are the row's lesion captions and "{finding} in this region" for two findings.
In `window_only_fraction` of the rows the lesion boxes are left out, so the pool of the ROI
processor also learns from windows alone: what box-free inference will give it. Every lesion ROI
gets the background caption as one more negative.

Each sampled region also gets its caption's rule-based negatives (`negatives.region_hard_negatives`:
side, zone, presence, size and finding edits; finding swaps drawn from `finding_vocabulary`, by
default `negatives.FINDINGS`) for the region-level hard-negative loss.

Stage-aware: given the run's `StagedSchedule`, a batch holds only what the stages it can be used in
need. A stage without ROIs gets no ROI crops, region captions or region negatives; one whose loss
terms read no summary or negative captions gets none. The trainer writes its global step into
shared memory (`set_step`), which DataLoader workers (copies of the collator) read too; as workers
build batches ahead of the step that uses them, a batch holds what any stage within
`lookahead_steps` of the current step needs (`prefetch_lookahead_steps`), so the switch to a stage
that needs more is never late.

Rows are validated in full for what the batch uses (see `RegionMedCLIPCollator`): what cannot be
used is skipped and counted by reason with example row ids (`skips.SkipLedger`), never the end of the
run. A batch with no usable row is replaced by the last good row built with every part;
`prime(dataset)` finds a first good row up front, so that holds for the very first batch of every
DataLoader worker too. Use the default non-persistent DataLoader workers: persistent ones would keep
the epoch of their first copy of the collator.
"""

import io
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature

from regionmed_clip.data.negatives import FINDINGS, REGION_FINDING_SWAPS, region_hard_negatives
from regionmed_clip.data.schema import region_problem, text_problem
from regionmed_clip.data.skips import SkipLedger
from regionmed_clip.modeling_regionmed_clip import DEFAULT_BACKGROUND_CAPTION
from regionmed_clip.processing import RegionMedCLIPProcessor

from .schedule import StagedSchedule

__all__ = ["AMBIGUOUS", "BACKGROUND", "BatchParts", "RegionMedCLIPCollator", "label_windows", "prefetch_lookahead_steps"]

logger = logging.getLogger(__name__)
# A window holds a lesion when it covers at least this fraction of the lesion's box.
WINDOW_MIN_COVER = 0.6
DEFAULT_WINDOWS_PER_IMAGE = 4
DEFAULT_WINDOW_ONLY_FRACTION = 0.5
BACKGROUND = -1  # `label_windows`: a window that touches no lesion
AMBIGUOUS = -2  # `label_windows`: part of a lesion, or more than one


def _covered_fraction(windows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """`(W, L)`: the fraction of each box `(L, 4)` xyxy inside each window `(W, 4)` xyxy."""
    low = np.maximum(windows[:, None, :2], boxes[None, :, :2])
    high = np.minimum(windows[:, None, 2:], boxes[None, :, 2:])
    inside = np.clip(high - low, 0, None).prod(-1)
    area = np.clip(boxes[:, 2:] - boxes[:, :2], 1e-9, None).prod(-1)
    return inside / area[None, :]


def label_windows(windows: np.ndarray, lesion_boxes: np.ndarray, crop_boxes: np.ndarray,
                  min_cover: float = WINDOW_MIN_COVER) -> np.ndarray:
    """`(W,)` int per window: the index of the ONE lesion box (of `(L, 4)` xyxy) it holds (at least
    `min_cover` of it, and no part of another), `BACKGROUND` when its crop box (`crop_boxes (W, 4)`,
    the window grown by the processor's context) touches no lesion box, else `AMBIGUOUS`."""
    labels = np.full(len(windows), AMBIGUOUS, dtype=np.int64)
    if len(lesion_boxes) == 0:
        labels[:] = BACKGROUND
        return labels
    cover = _covered_fraction(windows, lesion_boxes)
    touched = _covered_fraction(crop_boxes, lesion_boxes) > 0
    labels[~touched.any(axis=1)] = BACKGROUND
    held = cover >= min_cover
    one = held.sum(axis=1) == 1
    alone = (cover > 0).sum(axis=1) == 1
    labels[one & alone] = held[one & alone].argmax(axis=1)
    return labels


def _decode(image: Any) -> Image.Image:
    """A PIL image, or `{"bytes": ..., "path": ...}` as `datasets` stores it undecoded."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Mapping) and image.get("bytes"):
        decoded = Image.open(io.BytesIO(image["bytes"]))
        decoded.load()  # force the decode now: a truncated file fails here, not inside the processor
        return decoded
    raise ValueError(f"no image bytes (got {type(image).__name__})")


def _labels_problem(labels: Any) -> str | None:
    """Why `labels` is not a list of class names (it may be empty), or None."""
    if not isinstance(labels, (list, tuple)):
        return f"labels is {'missing or null' if labels is None else type(labels).__name__}, not a list"
    return next((f"labels[{index}] is {'null' if label is None else type(label).__name__}, not text"
                 for index, label in enumerate(labels) if not isinstance(label, str)), None)


class BatchParts(NamedTuple):
    """Which optional parts a batch is built with (the global image and report caption always)."""

    regions: bool  # sampled regions: ROI crops and region captions
    summary: bool
    negatives: bool
    region_negatives: bool


def prefetch_lookahead_steps(num_workers: int, prefetch_factor: int | None = None) -> int:
    """How many optimizer steps past the trainer's current one a batch being built may be used at.

    transformers fetches a step's whole accumulation window before the step begins and accelerate's
    loader holds one batch more: a batch built in the main process (`num_workers=0`) is used up to two
    steps later (measured: tests/test_stage_aware_data.py). Workers add the `num_workers x
    prefetch_factor` batches they are asked for ahead."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return num_workers * (prefetch_factor or 2) + 2 if num_workers else 2


class RegionMedCLIPCollator:
    """Callable collator. Every row is validated in full: a row it cannot use (an image that does not
    decode or that the processor rejects, a report / summary / negative caption that is not text,
    `regions` that is not a list) is skipped, a region it cannot use (no or bad `bbox`, no caption,
    a box off the image or its view) is dropped; each is counted by reason with example row ids, in
    `ledger` (this process's total) and in the `skip_report` of the batch (what the Trainer adds up:
    in DataLoader workers the collator is a copy).

    The `use_*` switches say what the run can use; with a `schedule`, each batch holds only what the
    stages within `lookahead_steps` of the trainer's step (`set_step`) need of it."""

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
        schedule: StagedSchedule | None = None,
        lookahead_steps: int = prefetch_lookahead_steps(0),
        windows_per_image: int = DEFAULT_WINDOWS_PER_IMAGE,
        window_only_fraction: float = DEFAULT_WINDOW_ONLY_FRACTION,
        background_caption: str = DEFAULT_BACKGROUND_CAPTION,
    ):
        self.max_regions = max_regions or processor.image_processor.max_rois
        if self.max_regions <= 0:
            raise ValueError(f"max_regions must be positive, got {self.max_regions}")
        if isinstance(windows_per_image, bool) or not isinstance(windows_per_image, int) or windows_per_image < 0:
            raise ValueError(f"windows_per_image must be an int >= 0, got {windows_per_image!r}")
        if isinstance(window_only_fraction, bool) or not isinstance(window_only_fraction, (int, float)) \
                or not 0.0 <= window_only_fraction <= 1.0:
            raise ValueError(f"window_only_fraction must be in [0, 1], got {window_only_fraction!r}")
        self.windows_per_image = windows_per_image
        self.window_only_fraction = window_only_fraction
        self.background_caption = background_caption
        # Regions and windows share the ROI slots: the processor must keep all of them.
        self.processor = processor.with_max_rois(self.max_regions + windows_per_image)
        self.seed = seed
        self.epoch = 0
        self.use_regions = use_regions
        self.use_summary = use_summary
        self.use_negatives = use_negatives
        self.use_region_negatives = use_region_negatives
        self.finding_vocabulary = tuple(finding_vocabulary) if finding_vocabulary else FINDINGS
        self.region_finding_swaps = region_finding_swaps
        self.schedule = schedule
        if lookahead_steps < 0:
            raise ValueError(f"lookahead_steps must be >= 0, got {lookahead_steps}")
        self.lookahead_steps = lookahead_steps
        # The trainer's global step, in shared memory: DataLoader workers hold copies of the collator.
        self._step = torch.zeros((), dtype=torch.int64).share_memory_()
        self.ledger = SkipLedger()
        self._last_good: dict[str, Any] | None = None  # the processor-call piece of the last usable row
        self._window_grids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_step(self, step: int) -> None:
        """The trainer's global step, seen by every DataLoader worker's copy of the collator."""
        self._step.fill_(step)

    def all_parts(self) -> BatchParts:
        """What the switches allow: every batch's parts without a schedule."""
        return BatchParts(self.use_regions, self.use_summary, self.use_negatives,
                          self.use_regions and self.use_region_negatives)

    def batch_parts(self) -> BatchParts:
        """What a batch built now needs: `all_parts` narrowed to the stages it can be used in."""
        allowed = self.all_parts()
        if self.schedule is None:
            return allowed
        step = int(self._step)
        stages = self.schedule.stages_between(step, step + self.lookahead_steps)
        levels = frozenset().union(*(stage.caption_levels() for stage in stages))
        regions = allowed.regions and any(stage.uses_regions() for stage in stages)
        return BatchParts(regions, allowed.summary and "summary" in levels, allowed.negatives and "negative" in levels,
                          regions and allowed.region_negatives and "region_negative" in levels)

    def prime(self, rows: Iterable[Mapping[str, Any]], max_rows: int = 1000) -> None:
        """Keep the first usable row of `rows` (e.g. the train dataset) as the stand-in for a batch
        with no usable row, so no batch (the first of each DataLoader worker included) ends the run.
        Call before training: workers get copies of the collator."""
        for index, row in enumerate(rows):
            if index >= max_rows:
                break
            piece = self._piece(row, SkipLedger(), self.all_parts())
            if piece is not None:
                self._last_good = piece
                return
        raise ValueError(f"none of the first {max_rows} rows is usable (text fields, image); is the dataset corrupt?")

    @staticmethod
    def _row_problem(row: Mapping[str, Any], parts: BatchParts) -> str | None:
        """Why a row's text fields cannot give `parts` (the image is checked by decoding it), or None.
        `image_id` (the row's name, and its region sampling's seed) and `labels` (its classes) are
        checked whatever the parts: a row without them is not a canonical row."""
        problem = text_problem(row.get("image_id"), "image_id") or _labels_problem(row.get("labels"))
        if problem is None:
            problem = text_problem(row.get("report_caption"), "report_caption")
        if problem is None and parts.summary:
            problem = text_problem(row.get("summary_caption"), "summary_caption")
        if problem is None and parts.negatives:
            negatives = row.get("negative_captions")
            if not isinstance(negatives, (list, tuple)):
                return f"negative_captions is {'missing or null' if negatives is None else type(negatives).__name__}, not a list"
            problem = next((found for index, text in enumerate(negatives)
                            if (found := text_problem(text, f"negative_captions[{index}]"))), None)
        if problem is None and parts.regions and not isinstance(row.get("regions"), (list, tuple)):
            regions = row.get("regions")
            problem = f"regions is {'missing or null' if regions is None else type(regions).__name__}, not a list"
        return problem

    def _sample_regions(self, row: Mapping[str, Any], image: Image.Image, report: SkipLedger,
                        negatives: bool) -> list[dict[str, Any]]:
        """The row's ROI slots: `{"bbox", "caption"}` and, with `negatives`, `"negatives"`: 1..K of its
        usable regions, then its windows (see the module docstring)."""
        usable, located = [], []  # located: every region with a usable box, captioned when usable
        for region in row["regions"]:
            problem = region_problem(region, *image.size, self.processor.image_processor, caption=True)
            if problem is None:
                usable.append(region)
                located.append(region)
                continue
            report.skip_region(problem, row.get("image_id"))
            if region_problem(region, *image.size, self.processor.image_processor, caption=False) is None:
                located.append({"bbox": region["bbox"], "caption": None})  # still keeps background windows off it
        rng = random.Random(f"{self.seed}:{row['image_id']}:{self.epoch}")
        slots: list[dict[str, Any]] = []
        window_only = rng.random() < self.window_only_fraction  # drawn always: the regions drawn after it do not
        if usable and not (self.windows_per_image and window_only):  # depend on the window settings
            count = rng.randint(1, min(self.max_regions, len(usable)))
            chosen = sorted(rng.sample(range(len(usable)), count))  # keep the row's own order
            slots = [{"bbox": usable[index]["bbox"], "caption": usable[index]["caption"]} for index in chosen]
        if negatives:
            for slot in slots:
                slot["negatives"] = [*self._caption_negatives(slot["caption"]), self.background_caption]
        return slots + self._sample_windows(located, image, rng, negatives)

    def _caption_negatives(self, caption: str) -> list[str]:
        return list(region_hard_negatives(caption, self.seed, self.finding_vocabulary, self.region_finding_swaps))

    def _window_grid(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The inference proposal grid of a `height x width` image and each window's crop box (both
        `(P, 4)` pixel xyxy), computed once per image size: films of one dataset mostly share it."""
        key = (height, width)
        if key not in self._window_grids:
            image_processor = self.processor.image_processor
            windows = image_processor.proposal_boxes(height, width)
            crops = np.asarray([image_processor.crop_box(window, height, width) for window in windows])
            self._window_grids[key] = windows, crops
        return self._window_grids[key]

    def _sample_windows(self, located: Sequence[Mapping[str, Any]], image: Image.Image, rng: random.Random,
                        negatives: bool) -> list[dict[str, Any]]:
        """Up to `windows_per_image` windows of the inference grid: lesion windows (one per captioned
        lesion first, at most half) with the lesion's caption, the rest background: clear of every
        located region (captioned or not)."""
        if not self.windows_per_image:
            return []
        width, height = image.size
        windows, crops = self._window_grid(height, width)
        boxes = np.asarray([np.clip(np.asarray(region["bbox"], dtype=np.float64), 0, [width, height] * 2)
                            for region in located]).reshape(-1, 4)
        labels = label_windows(windows, boxes, crops)
        captioned = [index for index, region in enumerate(located) if region["caption"] is not None]
        by_lesion = {index: np.flatnonzero(labels == index).tolist() for index in captioned}
        picked: list[int] = []
        for index in rng.sample(captioned, len(captioned)):  # one window per lesion first
            if by_lesion[index] and len(picked) < self.windows_per_image // 2:
                picked.append(rng.choice(by_lesion[index]))
        background = np.flatnonzero(labels == BACKGROUND).tolist()
        picked += rng.sample(background, min(len(background), self.windows_per_image - len(picked)))
        lesion_captions = [located[index]["caption"] for index in captioned]
        slots = []
        for index in picked:
            label = int(labels[index])
            slot: dict[str, Any] = {"bbox": windows[index].tolist(),
                                    "caption": self.background_caption if label == BACKGROUND else located[label]["caption"]}
            if negatives and label == BACKGROUND:
                findings = rng.sample(self.finding_vocabulary, min(2, len(self.finding_vocabulary)))
                slot["negatives"] = [*lesion_captions[:2], *(f"{finding} in this region" for finding in findings)]
            elif negatives:
                slot["negatives"] = [*self._caption_negatives(slot["caption"]), self.background_caption]
            slots.append(slot)
        return slots

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> BatchFeature:
        """Model inputs for the usable `rows`, plus `skip_report`: this batch's `SkipLedger.to_dict()`.

        Each image is reduced to its global view and ROI crops right after it is decoded, so memory
        holds one decoded image at a time, not a batch of them."""
        report = SkipLedger(rows_seen=len(rows))
        parts = self.batch_parts()
        pieces = []
        try:
            for row in rows:
                piece = self._piece(row, report, parts) if isinstance(row, Mapping) else None
                if piece is not None:
                    pieces.append(piece)
                elif not isinstance(row, Mapping):
                    report.skip_row(f"row is {type(row).__name__}", None)
            if pieces:
                if parts == self.all_parts():  # a stand-in must serve every stage
                    self._last_good = pieces[-1]
            elif self._last_good is None:
                raise RuntimeError(f"none of these {report.rows_seen} rows is usable and the collator has no "
                                   f"stand-in: call prime(dataset) before training\n{report.summary()}")
            else:  # a batch with no usable row repeats the last good one rather than end the run
                pieces = [self._last_good]
        finally:
            self.ledger.merge(report)
        batch = self._call(pieces)
        batch["skip_report"] = report.to_dict()
        return batch

    def _piece(self, row: Mapping[str, Any], report: SkipLedger, parts: BatchParts) -> dict[str, Any] | None:
        """One row's share of the processor call with `parts`, its image already reduced to view and
        crops; None (counted in `report`) when the row cannot be used."""
        row_id = row.get("image_id")
        problem = self._row_problem(row, parts)
        if problem is None:
            try:
                image = _decode(row["image"])
            except Exception as error:  # any decoder failure (PIL raises many types) skips the row
                problem = f"image does not decode ({type(error).__name__})"
                logger.debug("row %s: %s", row_id, error)
        if problem is not None:
            report.skip_row(problem, row_id)
            return None
        piece: dict[str, Any] = {"text": row["report_caption"]}
        if parts.summary:
            piece["summary_text"] = row["summary_caption"]
        # Dropped regions are counted only once the row is used: a row skipped after all drops none.
        region_report = SkipLedger()
        regions = self._sample_regions(row, image, region_report, parts.region_negatives) if parts.regions else None
        try:
            piece["image_features"] = self.processor.image_processor(
                image, regions=None if regions is None else [[region["bbox"] for region in regions]], proposals=False)
        except Exception as error:  # e.g. a float image holding NaN
            report.skip_row(f"image rejected by the processor ({type(error).__name__})", row_id)
            logger.debug("row %s: %s", row_id, error)
            return None
        report.merge(region_report)
        if regions is not None:
            piece["regions"] = [region["bbox"] for region in regions]
            piece["region_text"] = [region["caption"] for region in regions]
            if parts.region_negatives:
                piece["region_negative_text"] = [region["negatives"] for region in regions]
        if parts.negatives:
            piece["negative_text"] = list(row["negative_captions"])
        return piece

    def _call(self, pieces: Sequence[dict[str, Any]]) -> BatchFeature:
        features = self.processor.image_processor.stack([piece["image_features"] for piece in pieces])
        texts = {key: [piece[key] for piece in pieces] for key in pieces[0] if key != "image_features"}
        return self.processor(image_features=features, **texts, return_tensors="pt")
