"""Convert public medical-image annotation formats into the canonical region-annotated schema.

Formats (keys of `CONVERTERS`; layouts as in the datasets' public releases):

    ms-cxr          MS_CXR_Local_Alignment_v1.x.0.csv, images at `images_dir / path`
    vindr-cxr       VinBigData train.csv, images `{image_id}.dicom|.dcm|.png|.jpg|.jpeg`
    rsna-pneumonia  stage_2_train_labels.csv (+ stage_2_detailed_class_info.csv beside it), images `{patientId}.dcm`
    chestxray14     BBox_List_2017.csv, images `Image Index`
    chexpert        train.csv / valid.csv / test.csv (or their folder), images `Path`, as written or without its
                    first folder
    mimic-cxr       mimic-cxr-2.0.0-chexpert.csv or -negbio.csv (+ -metadata.csv, optionally -split.csv, beside it;
                    each may be .csv.gz), images `files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`
    siim-acr        train-rle.csv, images `{ImageId}.dcm|.png`
    slake           train.json / validate.json / test.json (or their folder), images `imgs/{img_name}`
    vqa-rad         VQA_RAD Dataset Public.json (or its folder), images `{image_name}` in `VQA_RAD Image Folder/`
    roco            captions.txt (or a folder searched for captions.txt), dlinks.txt beside it; images
                    `{PMCid}_{name}|{name}|{ROCO_xxxxx}.jpg|.png` in `images/` beside captions.txt
    coco            a COCO detection JSON, images `file_name`

`images_dir` defaults to the input's folder (the input itself when it is a folder); for ROCO, to each
captions.txt's `images/` folder; for VQA-RAD, to `VQA_RAD Image Folder` beside the JSON.

Streaming: CSV and text files are read row by row. Formats with several annotation rows per image are grouped
by spilling the parsed annotations into a temporary on-disk sqlite database read back `ORDER BY image_id`, so
memory holds one image's annotations (plus the writer's one shard), whatever the dataset size. JSON formats
(SLAKE, VQA-RAD, COCO) are single documents and are loaded whole, then grouped the same way.

VQA formats (SLAKE, VQA-RAD) also write their questions, with `vqa_dir`, to `vqa_dir/{split}.json`: a JSON list of
VQA-RAD-style records `{qid, image_name, question, answer, answer_type, question_type, phrase_type, image_organ}`
whose `image_name` is the `image_id` of the canonical row of that split the question is about
(`training_scripts.vqa_data` reads them back).

Bad input never raises and never ends a run; everything left out is counted in a `SkipCounter`:

* a whole ROW is skipped for a missing or undecodable image, an annotation without an image id, a malformed
  ROCO line, COCO annotations of an unknown image id, a CheXpert label value other than 1 / 0 / -1 / blank (the
  reason names the column and value), a MIMIC-CXR study without images or image without labels, a lateral view
  with `frontal_only`, or a row failing `validate_row` (e.g. an unknown split);
* a single REGION is dropped (the row is kept, with its labels) for missing or unparsable coordinates, a
  zero-area or inverted box, a box wholly outside the image, an invalid or empty SIIM RLE mask, a COCO
  category that is not declared, or a malformed SLAKE detection.json entry;
* a single QUESTION (VQA formats) is left out of the VQA records when its image's row was skipped (the reason
  names the image) or, VQA-RAD, when it has no qid, image_name, question text or answer, or an answer_type other
  than OPEN / CLOSED.

Boxes end up as [x0, y0, x1, y1] pixels of the STORED image: DICOMs become 8-bit PNGs of the same size
(`load_medical_image`, windowed), other files are embedded as their own bytes; boxes are rescaled when a format
declares the annotated image size (MS-CXR `image_width/height`, COCO `width/height`) and it differs from the
file, then clipped to the image.

Caption templates (the dataset's own text wins where there is one):

* summary: "{Modality} with {findings}." ("Chest X-ray with pleural effusion and nodule/mass.",
  "Chest X-ray with no finding."); CheXpert / MIMIC-CXR the positive classes only (uncertain ones are in
  `uncertain_labels`, never in a caption), "Chest X-ray." when none is positive; ROCO: the caption's first
  sentence; SLAKE and VQA-RAD: "{Modality} of the {location}." (VQA-RAD: "Radiology image of the chest.");
* report: MS-CXR the `label_text` phrases as sentences; ROCO the caption; SLAKE "The liver, the spleen and the left
  kidney are seen." (the detection.json organs, else "The {location} is seen."); VQA-RAD "The {organ} is seen.";
  otherwise the region captions as sentences, "No abnormality is seen." for a no-finding image, or the summary;
* region caption: MS-CXR `label_text`; chest X-rays "{finding} in the {right|left} {upper|middle|lower} zone"
  (patient's side: the image's left half is the patient's right; zones are thirds of the image height);
  other modalities "{label} in the {upper|middle|lower} {left|centre|right} of the image";
* negative_captions: `make_hard_negatives(report, num=3, seed=seed)`; it may give fewer than 3, or none for a
  dataset text no rule applies to (a ROCO caption such as "Axial MRI of the brain.").
"""

import collections
import contextlib
import csv
import functools
import gzip
import hashlib
import inspect
import itertools
import json
import logging
import math
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from processing.medical_image_io import is_dicom_file, load_medical_image
from training_scripts.data_schema import SPLITS, ShardedParquetWriter, dataset_output, validate_row, write_provenance
from training_scripts.negatives import make_hard_negatives
from training_scripts.skips import EXAMPLES_PER_REASON

__all__ = ["CONVERTERS", "VQA_RAD_VALIDATION_FRACTION", "ConversionStats", "SkipCounter", "convert", "iter_rows"]

logger = logging.getLogger(__name__)

CXR = "chest_xray"
NO_FINDING = "No finding"
NUM_NEGATIVES = 3
FUSION_IOU = 0.4  # VinDr-CXR: same-class boxes of different readers overlapping this much are one finding
VQA_RAD_VALIDATION_FRACTION = 0.1  # VQA-RAD: share of the non-test paraphrase groups made validation (by hash)

_VQA_FORMATS = frozenset({"slake", "vqa-rad"})  # formats that also write `vqa/{split}.json`
_MODALITY_NAMES = {
    CXR: "Chest X-ray",
    "xray": "X-ray",
    "ct": "CT scan",
    "mri": "MRI scan",
    "radiology": "Radiology image",
}
_NO_FINDING_LABELS = frozenset({"no finding", "normal"})
# Dataset class names that do not read as a finding phrase once lower-cased.
_LABEL_PHRASES = {
    "No Lung Opacity / Not Normal": "no lung opacity but another abnormality",
    "Pleural Other": "another pleural abnormality",
}
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validate": "validation",
    "validation": "validation",
    "test": "test",
}
_SPLIT_TOKEN = re.compile(r"(?<![a-z])(training|train|validation|validate|valid|val|test)(?![a-z])")


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


class SkipCounter:
    """Counts what a conversion leaves out, by reason: whole rows, single regions and single VQA questions.

    Region and question reasons are stored as "region dropped: {reason}" and "question skipped: {reason}" in the
    same `reasons` counter.
    """

    def __init__(self) -> None:
        self.reasons: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}  # the first few `where` of each reason
        self.rows = 0
        self.regions = 0
        self.questions = 0

    def _note(self, reason: str, where: str) -> None:
        self.reasons[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(str(where))

    def skip_row(self, reason: str, where: str) -> None:
        """Count one skipped row; `where` identifies it (kept as an example of the reason)."""
        self.rows += 1
        self._note(reason, where)
        logger.debug("skipped row %s: %s", where, reason)

    def drop_region(self, reason: str, where: str) -> None:
        """Count one dropped region of a row that is kept."""
        self.regions += 1
        self._note(f"region dropped: {reason}", where)
        logger.debug("dropped a region of %s: %s", where, reason)

    def skip_question(self, reason: str, where: str) -> None:
        """Count one VQA question left out of the VQA records (its image's row may still be written)."""
        self.questions += 1
        self._note(f"question skipped: {reason}", where)
        logger.debug("skipped question %s: %s", where, reason)

    def describe(self) -> str:
        """Each reason with its count and first example, most common first."""
        return "; ".join(f"{reason}: {count} (e.g. {self.examples[reason][0]})"
                         for reason, count in self.reasons.most_common())


@dataclass
class ConversionStats:
    """What `convert` did: rows written per split, rows skipped, regions dropped and VQA questions skipped (all by
    reason, in `skip_reasons`), time taken."""

    rows_written: dict[str, int]
    rows_skipped: int
    skip_reasons: collections.Counter[str]
    seconds: float
    regions_dropped: int = 0
    questions_skipped: int = 0

    @property
    def rows_per_second(self) -> float:
        """Canonical rows (images) written per second."""
        return sum(self.rows_written.values()) / self.seconds if self.seconds > 0 else 0.0


def iter_rows(
    format: str,
    input_path: Path,
    images_dir: Path | None,
    *,
    seed: int = 0,
    skipped: SkipCounter,
    **options: Any,
) -> Iterator[dict[str, Any]]:
    """Stream the canonical rows of one dataset in `format` (a key of `CONVERTERS`).

    Every converter accepts `split=` (force one split for all rows); `coco` also `modality=` (default
    "unknown"), `slake` and `vqa-rad` also `vqa_dir=` (where `{split}.json` VQA records are written; none when
    omitted), `vqa-rad` also `validation_fraction=` (default `VQA_RAD_VALIDATION_FRACTION`), `chexpert` and
    `mimic-cxr` also `frontal_only=` (skip lateral views, counted; default False).
    Unknown formats and missing inputs raise at once; bad rows are counted in `skipped`.
    """
    if format not in CONVERTERS:
        raise ValueError(f"unknown format {format!r}; known formats: {sorted(CONVERTERS)}")
    input_path = Path(input_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input {str(input_path)!r} does not exist")
    images = Path(images_dir) if images_dir is not None else None
    _check_options(format, options)
    return CONVERTERS[format](input_path, images, seed=seed, skipped=skipped, **options)


def _check_options(format: str, options: dict[str, Any]) -> None:
    """A clear error for an option the format does not take (`--modality` with `ms-cxr`), instead of a
    TypeError from deep inside the generator; formats that forward `**options` check their own."""
    parameters = inspect.signature(CONVERTERS[format]).parameters
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    accepted = {name for name, parameter in parameters.items() if parameter.kind is parameter.KEYWORD_ONLY}
    accepted = (accepted - {"skipped"}) | {"split"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"format {format!r} takes no option {unknown}; its options: {sorted(accepted)}")


def convert(
    format: str,
    input_path: str | Path,
    images_dir: str | Path | None,
    output_dir: str | Path,
    *,
    rows_per_shard: int = 1000,
    seed: int = 0,
    **options: Any,
) -> ConversionStats:
    """Convert one dataset into canonical parquet shards in `output_dir`; logs and returns the statistics.

    `options` go to the converter (see `iter_rows`). For `slake` (English only) and `vqa-rad`, VQA records go to
    `output_dir/vqa`.
    """
    output_dir = Path(output_dir)
    skipped = SkipCounter()
    start = time.perf_counter()
    with dataset_output(output_dir) as partial:
        if format in _VQA_FORMATS:
            # The questions are a second output, written next to the shards as the synthetic set does.
            options["vqa_dir"] = partial / "vqa" if options.get("vqa_dir") in (None, output_dir / "vqa") else options["vqa_dir"]
        rows = iter_rows(format, Path(input_path), images_dir, seed=seed, skipped=skipped, **options)
        with ShardedParquetWriter(partial, rows_per_shard) as writer:
            for row in rows:
                writer.write(row)
        if not writer.counts:
            raise ValueError(f"{format}: no row could be converted from {input_path} (skipped {skipped.rows}: "
                             f"{skipped.describe() or 'no rows in the input'})")
        write_provenance(partial, format, real_patient_data=True, input=str(input_path),
                         images=None if images_dir is None else str(images_dir), rows=dict(writer.counts))
    stats = ConversionStats(
        rows_written=dict(writer.counts),
        rows_skipped=skipped.rows,
        skip_reasons=collections.Counter(skipped.reasons),
        seconds=time.perf_counter() - start,
        regions_dropped=skipped.regions,
        questions_skipped=skipped.questions,
    )
    logger.info(
        "%s: wrote %s to %s in %.1f s (%.0f rows/s); skipped %d rows, dropped %d regions, skipped %d questions",
        format, stats.rows_written, output_dir, stats.seconds, stats.rows_per_second,
        stats.rows_skipped, stats.regions_dropped, stats.questions_skipped,
    )
    if stats.skip_reasons:
        logger.warning("%s: left out %s", format, skipped.describe())
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Shared machinery: drafts, image loading, region checks, captions
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Box:
    """A region as the source gives it: xyxy in the source's pixel frame; `bbox` None when unusable.

    `caption` None means the position template; `invalid` names why a region must be dropped.
    """

    bbox: list[float] | None
    label: str
    caption: str | None = None
    invalid: str | None = None


# Boxes known only once the image size is (SIIM masks are decoded on the real image grid).
_BoxSource = list[_Box] | Callable[[tuple[int, int]], list[_Box]]


@dataclass
class _Draft:
    """What a format knows about one image before the shared steps (image lookup, region checks, captions)."""

    image_id: str
    candidates: list[Path]  # image files to try, the first that exists wins
    split: str
    modality: str = CXR
    labels: list[str] = field(default_factory=list)
    uncertain_labels: list[str] = field(default_factory=list)  # classes the source marks uncertain (CheXpert -1)
    boxes: _BoxSource = field(default_factory=list)
    summary: str | None = None  # the dataset's own text, else a template
    report: str | None = None
    declared_size: tuple[float, float] | None = None  # (W, H) the boxes refer to, when the format says
    kept: bool = False  # set once its row was yielded (VQA records are written only about kept rows)


@dataclass
class _LoadedImage:
    value: Any  # a path (embedded as its bytes) or a PIL image (a DICOM rendered to 8 bits, or an EXIF-rotated
    # image turned upright; embedded as PNG)
    size: tuple[int, int]  # (W, H)


def _converter(drafts: Callable[..., Iterable[_Draft]]) -> Callable[..., Iterator[dict[str, Any]]]:
    """Wrap a format's draft generator into a row converter that applies the shared steps."""

    @functools.wraps(drafts)
    def rows(
        input_path: Path,
        images_dir: Path | None,
        *,
        seed: int = 0,
        skipped: SkipCounter,
        split: str | None = None,
        **options: Any,
    ) -> Iterator[dict[str, Any]]:
        if images_dir is None:
            images_dir = input_path if input_path.is_dir() else input_path.parent
        for draft in drafts(input_path, images_dir, skipped=skipped, **options):
            if split is not None:
                draft.split = _split_name(split)
            image = _load_image(draft, skipped)
            if image is not None and (row := _to_row(draft, image, skipped, seed)) is not None:
                draft.kept = True
                yield row

    return rows


def _load_image(draft: _Draft, skipped: SkipCounter) -> _LoadedImage | None:
    """Find and fully decode the draft's image; a missing or undecodable one skips the row."""
    path = next((candidate for candidate in draft.candidates if candidate.is_file()), None)
    if path is None:
        skipped.skip_row("missing image", f"{draft.image_id} (tried {[str(c) for c in draft.candidates]})")
        return None
    try:
        if is_dicom_file(path):
            # The canonical image must decode with PIL: render the DICOM to 8 bits; its size is kept, so boxes hold.
            image = Image.fromarray(load_medical_image(path))
            return _LoadedImage(image, image.size)
        with Image.open(path) as image:
            image.load()  # a full decode, so a truncated file is caught here rather than in training
            upright = ImageOps.exif_transpose(image)
            if upright.size != image.size and draft.declared_size != image.size:
                # EXIF-rotated, and the annotation does not say it used the stored pixels: it was made on
                # the image as viewers show it. Store those pixels (as PNG), so boxes are mapped, never
                # rescaled across the swapped axes.
                return _LoadedImage(upright, upright.size)
            return _LoadedImage(path, image.size)
    except Exception as error:  # any decoder failure (PIL, pydicom, numpy) leaves this image unusable
        skipped.skip_row("undecodable image", f"{draft.image_id} ({path}: {error})")
        return None


def _to_row(draft: _Draft, image: _LoadedImage, skipped: SkipCounter, seed: int) -> dict[str, Any] | None:
    """Build and validate the canonical row; bad regions are dropped, an invalid row is skipped (both counted)."""
    boxes = draft.boxes(image.size) if callable(draft.boxes) else draft.boxes
    regions = []
    for box in boxes:
        bbox = _fit_box(box, image.size, draft.declared_size, skipped, draft.image_id)
        if bbox is not None:
            caption = box.caption or _position_caption(box.label, bbox, image.size, draft.modality)
            regions.append({"bbox": bbox, "caption": caption, "label": box.label})
    summary = draft.summary or _summary(draft.modality, draft.labels)
    report = draft.report or _default_report(regions, draft.labels, summary)
    row = {
        "image": image.value,
        "image_id": draft.image_id,
        "modality": draft.modality,
        "summary_caption": summary,
        "report_caption": report,
        "regions": regions,
        "negative_captions": make_hard_negatives(report, num=NUM_NEGATIVES, seed=seed),
        "labels": draft.labels,
        "uncertain_labels": draft.uncertain_labels,
        "split": draft.split,
    }
    try:
        validate_row(row, where=f"row {draft.image_id!r}")
    except ValueError as error:
        skipped.skip_row("invalid row", str(error))
        return None
    return row


def _fit_box(
    box: _Box, size: tuple[int, int], declared: tuple[float, float] | None, skipped: SkipCounter, where: str
) -> list[float] | None:
    """The box in pixels of the stored image (rescaled from `declared`, clipped), or None once counted as dropped."""
    if box.invalid is not None or box.bbox is None:
        skipped.drop_region(box.invalid or "missing or invalid coordinates", where)
        return None
    x0, y0, x1, y1 = box.bbox
    if x1 <= x0 or y1 <= y0:
        skipped.drop_region("zero-area or inverted box", where)
        return None
    width, height = size
    if declared is not None and declared != (width, height):
        sx, sy = width / declared[0], height / declared[1]
        x0, y0, x1, y1 = x0 * sx, y0 * sy, x1 * sx, y1 * sy
    x0, x1 = max(x0, 0.0), min(x1, float(width))
    y0, y1 = max(y0, 0.0), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        skipped.drop_region("box outside the image", where)
        return None
    return [x0, y0, x1, y1]


def _numbers(*values: Any) -> list[float] | None:
    """Finite floats from numbers or numeric strings; None if any value is empty or unparsable."""
    try:
        parsed = [float(value) for value in values]
    except (TypeError, ValueError):
        return None
    return parsed if all(math.isfinite(value) for value in parsed) else None


def _xywh(*values: Any) -> list[float] | None:
    """[x, y, w, h] -> [x0, y0, x1, y1], or None if unparsable."""
    numbers = _numbers(*values) if len(values) == 4 else None
    if numbers is None:
        return None
    x, y, w, h = numbers
    return [x, y, x + w, y + h]


def _declared_size(width: Any, height: Any) -> tuple[float, float] | None:
    numbers = _numbers(width, height)
    return (numbers[0], numbers[1]) if numbers is not None and min(numbers) > 0 else None


def _unique(values: Iterable[str]) -> list[str]:
    """Distinct non-empty values in first-seen order."""
    return [value for value in dict.fromkeys(values) if value]


def _phrase(label: str) -> str:
    """A class name as it reads inside a sentence; acronyms (ILD) keep their case."""
    return _LABEL_PHRASES.get(label, label if label.isupper() else label.lower())


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else f"{text}."


def _join(words: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _modality_name(modality: str) -> str:
    return _MODALITY_NAMES.get(modality, "Medical image")


def _is_no_finding(label: str) -> bool:
    return label.lower() in _NO_FINDING_LABELS


def _summary(modality: str, labels: Sequence[str]) -> str:
    findings = [_phrase(label) for label in labels if not _is_no_finding(label)]
    return f"{_modality_name(modality)} with {_join(findings) if findings else 'no finding'}."


def _organ_captions(modality: str, location: str, organs: Sequence[str] = ()) -> tuple[str, str | None]:
    """(summary, report) of an image known by the body part it shows: "{Modality} of the {location}." and "The
    liver and the spleen are seen." (the `organs`), else "The {location} is seen."; report None if neither is known."""
    seen = [f"the {_phrase(name)}" for name in organs] or ([f"the {location}"] if location else [])
    summary = f"{_modality_name(modality)} of the {location}." if location else f"{_modality_name(modality)}."
    # "... is/are seen." reads as a statement the negation rules can flip ("is not seen")
    report = _sentence(f"{_join(seen)} {'are' if len(seen) > 1 else 'is'} seen") if seen else None
    return summary, report


def _default_report(regions: Sequence[dict[str, Any]], labels: Sequence[str], summary: str) -> str:
    """The region captions as sentences; a fixed sentence for a no-finding image; else the summary."""
    if regions:
        return " ".join(_unique(_sentence(region["caption"]) for region in regions))
    if labels and all(_is_no_finding(label) for label in labels):
        return "No abnormality is seen."
    return summary


def _position_caption(label: str, bbox: Sequence[float], size: tuple[int, int], modality: str) -> str:
    """Where the box centre lies: lung zones for chest X-rays, a 3x3 grid of the image otherwise."""
    cx = (bbox[0] + bbox[2]) / 2 / size[0]
    cy = (bbox[1] + bbox[3]) / 2 / size[1]
    vertical = ("upper", "middle", "lower")[min(int(cy * 3), 2)]
    if modality == CXR:
        # A frontal film shows the patient's right on the image's left.
        return f"{_phrase(label)} in the {'right' if cx < 0.5 else 'left'} {vertical} zone"
    horizontal = ("left", "centre", "right")[min(int(cx * 3), 2)]
    return f"{_phrase(label)} in the {vertical} {horizontal} of the image"


def _split_name(value: str) -> str:
    """A split as a dataset spells it ("val") -> the canonical name; unknown names pass through (and fail later)."""
    return _SPLIT_ALIASES.get(value.strip().lower(), value)


def _split_from_path(path: Path) -> str:
    """The split a file name (as a token: `instances_val2017.json`, `validate.json`) or, nearest first, a folder
    named exactly like a split (`data/test/radiology/captions.txt`) names; "train" when none does."""
    match = _SPLIT_TOKEN.search(path.stem.lower())
    if match:
        return _SPLIT_ALIASES[match.group(1)]
    for part in reversed(path.parent.parts):
        if part.lower() in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[part.lower()]
    return "train"


def _load_json(path: Path) -> Any:
    """A JSON document, with errors that name the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno} column {error.colno}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def _utf8_lines(handle: Iterable[bytes], path: Path) -> Iterator[str]:
    """The lines of a binary file as text (a leading BOM dropped); a line that is not UTF-8 is an error
    that names it (decoding the whole stream would only say which buffer failed)."""
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}, line {number}: not UTF-8 text ({error.reason})") from None


class _CsvRow(dict):
    """A CSV row (column -> stripped value) that knows its line in the file, for errors that name it."""

    line: int = 0


def _binary_flag(row: _CsvRow, column: str, path: Path) -> bool:
    """A 0 / 1 column read as a number, so a pandas float export ("1.0") means the same as "1"."""
    value = row[column]
    number = (_numbers(value) or [math.nan])[0]
    if number not in (0.0, 1.0):
        raise ValueError(f"{path}, line {row.line}: {column} must be 0 or 1, got {value!r}")
    return number == 1.0


def _read_csv(path: Path, required: Sequence[str]) -> Iterator[_CsvRow]:
    """Stream a CSV's rows as dicts with stripped header names and values (SIIM writes `ImageId, EncodedPixels`);
    a `.gz` file is read as gzip (MIMIC-CXR-JPG ships its CSVs so).

    Raises ValueError when a required column is missing: the file is not in the expected format.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        reader = csv.reader(_utf8_lines(handle, path))
        line = 1
        try:
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in required if name not in header]
            if missing:
                raise ValueError(f"{str(path)!r} lacks the columns {missing}; its header is {header}")
            for values in reader:
                if reader.line_num > line + 1 and any("\n" in value or "\r" in value for value in values):
                    # An annotation field never spans lines: this is an unterminated quote that swallowed rows.
                    raise ValueError(f"{path}, line {line + 1}: a quoted field runs to line {reader.line_num} "
                                     "(an unterminated quote?)")
                line = reader.line_num
                if any(value.strip() for value in values):
                    row = _CsvRow(itertools.zip_longest(header, (value.strip() for value in values), fillvalue=""))
                    row.line = line
                    yield row
        except csv.Error as error:
            raise ValueError(f"{path}, line {line + 1}: {error}") from None


def _grouped(records: Iterable[tuple[str, dict[str, Any]]], skipped: SkipCounter) -> Iterator[tuple[str, list[dict]]]:
    """Group (image_id, record) pairs by image id without holding them in memory.

    The records are spilled into a temporary on-disk sqlite table and read back `ORDER BY image_id` (then input
    order), so only one group is ever in memory. Records without an image id are skipped and counted.
    """

    def encoded() -> Iterator[tuple[str, str]]:
        for image_id, record in records:
            if image_id:
                yield image_id, json.dumps(record)
            else:
                skipped.skip_row("annotation without an image id", json.dumps(record))

    with (
        tempfile.TemporaryDirectory(prefix="regionmed-convert-") as folder,
        contextlib.closing(sqlite3.connect(Path(folder) / "spill.sqlite")) as db,
    ):
        # A throw-away file: no journal or fsync; the ORDER BY sort spills to temporary files, not memory.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA temp_store = FILE")
        db.execute("CREATE TABLE spill (image_id TEXT NOT NULL, record TEXT NOT NULL)")
        db.executemany("INSERT INTO spill VALUES (?, ?)", encoded())  # consumes the iterator lazily
        cursor = db.execute("SELECT image_id, record FROM spill ORDER BY image_id, rowid")
        for image_id, rows in itertools.groupby(cursor, key=itemgetter(0)):
            yield image_id, [json.loads(record) for _, record in rows]


class _JsonArrayWriter:
    """Write a JSON array element by element; the file appears (renamed from `.partial`) only when complete."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._partial = path.with_name(path.name + ".partial")
        self._handle = open(self._partial, "w", encoding="utf-8")
        self._handle.write("[")
        self._count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(("," if self._count else "") + "\n" + json.dumps(record, ensure_ascii=False))
        self._count += 1

    def __enter__(self) -> "_JsonArrayWriter":
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        self._handle.write("\n]\n")
        self._handle.close()
        if exc_type is None:
            self._partial.replace(self._path)
        else:
            self._partial.unlink()


def _vqa_question(
    qid: Any, question: Any, answer: Any, answer_type: Any, question_type: Any, phrase_type: Any, image_organ: Any
) -> dict[str, Any]:
    """One VQA record's fields but `image_name`, which `_VQAWriter` sets to the image_id of the row it is about."""
    return {
        "qid": qid,
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "question_type": question_type,
        "phrase_type": phrase_type,
        "image_organ": image_organ,
    }


class _VQAWriter:
    """The VQA records of a converter: `folder/{split}.json`, one `_JsonArrayWriter` per split opened on first use.

    With `folder` None nothing is written or counted. Use as a context manager around the draft loop.
    """

    def __init__(self, folder: Path | None, skipped: SkipCounter) -> None:
        self._folder = Path(folder) if folder is not None else None
        self._skipped = skipped
        self._files: dict[str, _JsonArrayWriter] = {}
        self._stack = contextlib.ExitStack()

    def write(self, draft: _Draft, questions: Iterable[dict[str, Any]]) -> None:
        """Write `questions` (from `_vqa_question`) about the row of `draft`, once it was yielded: `image_name` is its
        image_id, the file its split. A question about a skipped row is counted instead, so none points at nothing."""
        if self._folder is None:
            return
        if not draft.kept:
            for question in questions:
                reason = f"no row for image {draft.image_id!r} (missing or undecodable)"
                self._skipped.skip_question(reason, f"qid {question['qid']}")
            return
        if draft.split not in self._files:
            writer = _JsonArrayWriter(self._folder / f"{draft.split}.json")
            self._files[draft.split] = self._stack.enter_context(writer)
        for question in questions:
            self._files[draft.split].write({"qid": question["qid"], "image_name": draft.image_id} | question)

    def __enter__(self) -> "_VQAWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)


# ---------------------------------------------------------------------------------------------------------------
# Box fusion (VinDr-CXR) and RLE masks (SIIM-ACR)
# ---------------------------------------------------------------------------------------------------------------


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _mean_box(boxes: Sequence[Sequence[float]]) -> list[float]:
    return [sum(box[i] for box in boxes) / len(boxes) for i in range(4)]


def _fuse_boxes(boxes: Sequence[list[float]], threshold: float = FUSION_IOU) -> list[list[float]]:
    """Greedy IoU merge of one class's boxes drawn by several readers.

    In input order, each box joins the cluster whose current mean box it overlaps most, if that IoU is
    >= `threshold` (0.4), else it starts a new cluster; each cluster becomes the coordinate-wise mean of its boxes.
    """
    clusters: list[list[list[float]]] = []
    for box in boxes:
        overlaps = [_iou(box, _mean_box(cluster)) for cluster in clusters]
        best = max(range(len(clusters)), key=overlaps.__getitem__, default=None)
        if best is not None and overlaps[best] >= threshold:
            clusters[best].append(box)
        else:
            clusters.append([box])
    return [_mean_box(cluster) for cluster in clusters]


def _decode_rle(rle: str, width: int, height: int) -> np.ndarray:
    """SIIM's RLE -> an (H, W) bool mask, as the reference `rle2mask` does it.

    Pairs (start, length) where each start counts from the END of the previous run, over a flat array that is
    column-major in the image: `flat.reshape(width, height).T`. Raises ValueError for a malformed RLE.
    """
    values = [int(value) for value in rle.split()]
    if not values or len(values) % 2 or min(values) < 0:
        raise ValueError(f"an RLE needs non-negative (start, length) pairs, got {len(values)} values")
    flat = np.zeros(width * height, dtype=bool)
    position = 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        position += start
        if position + length > flat.size:
            raise ValueError(f"RLE run ends at {position + length}, past the {width}x{height} image")
        flat[position : position + length] = True
        position += length
    return flat.reshape(width, height).T


def _rle_boxes(rles: Sequence[str], label: str, size: tuple[int, int]) -> list[_Box]:
    """One tight box [x0, y0, x1, y1] (x1, y1 exclusive) per mask, decoded on the real image grid."""
    boxes = []
    for rle in rles:
        try:
            mask = _decode_rle(rle, *size)
        except ValueError:
            boxes.append(_Box(None, label, invalid="invalid RLE"))
            continue
        columns, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        if columns.size == 0:
            boxes.append(_Box(None, label, invalid="empty mask"))
            continue
        boxes.append(_Box([float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1)], label))
    return boxes


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------


@_converter
def _ms_cxr(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """MS-CXR v1.0.0 (no `split` column: "train") and v1.1.0 (`split`, "val" -> "validation")."""
    columns = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
    records = ((row["dicom_id"], row) for row in _read_csv(input_path, columns))
    for image_id, group in _grouped(records, skipped):
        first = group[0]
        if len({row["path"] for row in group}) > 1:
            # Which boxes belong to which file is unknowable: both images are left out, counted.
            skipped.skip_row("dicom_id listed with two image paths", image_id)
            continue
        yield _Draft(
            image_id,
            [images_dir / first["path"]],
            split=_split_name(first.get("split") or "train"),
            labels=_unique(row["category_name"] for row in group),
            boxes=[
                _Box(_xywh(row["x"], row["y"], row["w"], row["h"]), row["category_name"], row["label_text"] or None)
                for row in group
            ],
            report=" ".join(_unique(_sentence(row["label_text"]) for row in group)) or None,
            declared_size=_declared_size(first["image_width"], first["image_height"]),
        )


_VINDR_NO_FINDING_ID = "14"
_VINDR_EXTENSIONS = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")


@_converter
def _vindr_cxr(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """VinDr-CXR: same-class boxes of the readers fused by `_fuse_boxes`; "No finding" (class 14) has no box.

    Labels are the finding classes; ["No finding"] only when no reader marked a finding.
    """
    columns = ("image_id", "class_name", "class_id", "x_min", "y_min", "x_max", "y_max")
    records = (
        (row["image_id"], {
            "label": row["class_name"],
            "finding": row["class_id"] != _VINDR_NO_FINDING_ID,
            "box": _numbers(row["x_min"], row["y_min"], row["x_max"], row["y_max"]),
        })
        for row in _read_csv(input_path, columns)
    )
    for image_id, group in _grouped(records, skipped):
        findings = [record for record in group if record["finding"]]
        labels = _unique(record["label"] for record in findings)
        boxes = []
        for label in labels:
            drawn = [record["box"] for record in findings if record["label"] == label]
            boxes += [_Box(box, label) for box in _fuse_boxes([box for box in drawn if box is not None])]
            boxes += [_Box(None, label) for box in drawn if box is None]  # dropped and counted later
        yield _Draft(
            image_id,
            [images_dir / f"{image_id}{extension}" for extension in _VINDR_EXTENSIONS],
            split="train",
            labels=labels or [NO_FINDING],
            boxes=boxes,
        )


_RSNA_CLASS_FILE = "stage_2_detailed_class_info.csv"
_RSNA_OPACITY = "Lung Opacity"


@_converter
def _rsna_pneumonia(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """RSNA Pneumonia: one box per Target=1 row; labels from the detailed class file when it sits beside the input,
    else "Lung Opacity" / "No Lung Opacity" from Target (Target=0 mixes Normal and other abnormalities)."""
    boxes = (
        (row["patientId"], {"target": _binary_flag(row, "Target", input_path),
                            "box": _xywh(*itemgetter("x", "y", "width", "height")(row))})
        for row in _read_csv(input_path, ("patientId", "x", "y", "width", "height", "Target"))
    )
    class_file = input_path.parent / _RSNA_CLASS_FILE
    classes = (
        ((row["patientId"], {"class": row["class"]}) for row in _read_csv(class_file, ("patientId", "class")))
        if class_file.is_file()
        else ()
    )
    for patient_id, group in _grouped(itertools.chain(boxes, classes), skipped):
        targets = [record for record in group if record.get("target")]
        labels = _unique(record["class"] for record in group if "class" in record)
        yield _Draft(
            patient_id,
            [images_dir / f"{patient_id}.dcm"],
            split="train",
            labels=labels or [_RSNA_OPACITY if targets else f"No {_RSNA_OPACITY}"],
            boxes=[_Box(record["box"], _RSNA_OPACITY) for record in targets],
        )


# The header "Bbox [x,y,w,h]" is not quoted, so csv reads it as four columns with these names.
_CXR14_BOX_COLUMNS = ("Bbox [x", "y", "w", "h]")


@_converter
def _chestxray14(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """ChestX-ray14 BBox_List_2017.csv (no split in the file: "train" unless `split=` is given)."""
    records = (
        (row["Image Index"], {"label": row["Finding Label"], "box": _xywh(*(row[c] for c in _CXR14_BOX_COLUMNS))})
        for row in _read_csv(input_path, ("Image Index", "Finding Label", *_CXR14_BOX_COLUMNS))
    )
    for image_id, group in _grouped(records, skipped):
        yield _Draft(
            image_id,
            [images_dir / image_id],
            split="train",
            labels=_unique(record["label"] for record in group),
            boxes=[_Box(record["box"], record["label"]) for record in group],
        )


# The 14 classes of the CheXpert labeler, as CheXpert's and MIMIC-CXR-JPG's label files name their columns.
_CHEXPERT_CLASSES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
# Labeler values: 1 positive, 0 negative, -1 uncertain, blank not mentioned (read as negative). The releases write
# floats; other exports (pandas integer columns) write integers.
_CHEXPERT_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "": 0, "-1.0": -1, "-1": -1}
_CHEXPERT_FILES = ("train.csv", "valid.csv", "test.csv")


def _chexpert_labels(row: dict[str, str]) -> tuple[list[str], list[str]]:
    """(positive classes, uncertain classes) of a labeler row; ValueError naming the column for any other value."""
    positive, uncertain = [], []
    for name in _CHEXPERT_CLASSES:
        value = _CHEXPERT_VALUES.get(row[name])
        if value is None:
            raise ValueError(f"unknown label value {name}={row[name]!r}")
        if value == 1:
            positive.append(name)
        elif value == -1:
            uncertain.append(name)
    return positive, uncertain


def _labelled_draft(image_id: str, candidates: list[Path], split: str, labels: tuple[list[str], list[str]]) -> _Draft:
    """A chest X-ray known only by its labeler classes; captions name the positive ones, never the uncertain ones."""
    positive, uncertain = labels
    return _Draft(
        image_id,
        candidates,
        split=split,
        labels=positive,
        uncertain_labels=uncertain,
        # Nothing positive (only uncertain or unmentioned classes) is not "no finding": the caption claims nothing.
        summary=None if positive else f"{_modality_name(CXR)}.",
    )


@_converter
def _chexpert(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, frontal_only: bool = False
) -> Iterator[_Draft]:
    """CheXpert train.csv / valid.csv / test.csv (or their folder): one row per image, split from the file name.

    `Path` ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg") is looked for in `images_dir` as
    written, then without its first folder (`images_dir` = the CheXpert-v1.0-small folder itself). A label value
    other than 1 / 0 / -1 / blank skips the row; `frontal_only` skips lateral views (both counted).
    """
    files = [input_path / name for name in _CHEXPERT_FILES] if input_path.is_dir() else [input_path]
    required = ("Path", *_CHEXPERT_CLASSES, *(["Frontal/Lateral"] if frontal_only else []))
    for path in filter(Path.is_file, files):
        split = _split_from_path(path)
        for row in _read_csv(path, required):
            image_id = row["Path"]
            if not image_id:
                skipped.skip_row("annotation without an image id", json.dumps(row))
                continue
            if frontal_only and row["Frontal/Lateral"] != "Frontal":
                skipped.skip_row("not a frontal view", image_id)
                continue
            try:
                labels = _chexpert_labels(row)
            except ValueError as error:
                skipped.skip_row(str(error), image_id)
                continue
            relative = Path(image_id)
            candidates = [images_dir / relative]
            if len(relative.parts) > 1:
                candidates.append(images_dir.joinpath(*relative.parts[1:]))
            yield _labelled_draft(image_id, candidates, split, labels)


_MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
_MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
_MIMIC_FRONTAL = frozenset({"PA", "AP"})  # ViewPosition values of frontal films


def _beside(path: Path, name: str) -> Path | None:
    """`name` or `name.gz` (as PhysioNet ships it) in the folder of `path`; None when neither is there."""
    return next((file for file in (path.parent / name, path.parent / f"{name}.gz") if file.is_file()), None)


@_converter
def _mimic_cxr(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, frontal_only: bool = False
) -> Iterator[_Draft]:
    """MIMIC-CXR-JPG: labels per study from mimic-cxr-2.0.0-chexpert.csv or -negbio.csv (the input), given to every
    image of the study in mimic-cxr-2.0.0-metadata.csv (required beside the input), stored at
    `files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`; image id = dicom_id. Split per image from
    mimic-cxr-2.0.0-split.csv when it is beside the input ("validate" -> validation), else "train". Each file may
    also be `.csv.gz`.

    Counted skips, once per study: an unknown label value, several label rows, no image in the metadata; once per
    image: its study has no label row, it is not in the split file, or (`frontal_only`) its ViewPosition is not
    PA / AP.
    """
    metadata = _beside(input_path, _MIMIC_METADATA)
    if metadata is None:
        raise FileNotFoundError(f"{_MIMIC_METADATA} (or .gz) must be beside {str(input_path)!r}")
    split_file = _beside(input_path, _MIMIC_SPLIT)

    def label_records() -> Iterator[tuple[str, dict[str, Any]]]:
        for row in _read_csv(input_path, ("study_id", *_CHEXPERT_CLASSES)):
            try:
                positive, uncertain = _chexpert_labels(row)
            except ValueError as error:
                yield row["study_id"], {"kind": "labels", "invalid": str(error)}
                continue
            yield row["study_id"], {"kind": "labels", "invalid": None, "positive": positive, "uncertain": uncertain}

    image_records = (
        (row["study_id"], {"kind": "image", **{key: row[key] for key in ("dicom_id", "subject_id", "ViewPosition")}})
        for row in _read_csv(metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    )
    split_records = (
        (row["study_id"], {"kind": "split", "dicom_id": row["dicom_id"], "split": row["split"]})
        for row in (_read_csv(split_file, ("dicom_id", "study_id", "split")) if split_file is not None else ())
    )
    for study_id, group in _grouped(itertools.chain(label_records(), image_records, split_records), skipped):
        label_rows = [record for record in group if record["kind"] == "labels"]
        study_images = [record for record in group if record["kind"] == "image"]
        image_splits = {record["dicom_id"]: record["split"] for record in group if record["kind"] == "split"}
        if not label_rows:
            for image in study_images:
                skipped.skip_row("image of a study without labels", image["dicom_id"])
            continue
        if len(label_rows) > 1:
            skipped.skip_row("several label rows for one study", study_id)
            continue
        [study] = label_rows
        if study["invalid"] or not study_images:
            skipped.skip_row(study["invalid"] or "study without images in the metadata", study_id)
            continue
        for image in study_images:
            dicom_id, subject_id = image["dicom_id"], image["subject_id"]
            if frontal_only and image["ViewPosition"] not in _MIMIC_FRONTAL:
                skipped.skip_row("not a frontal view", dicom_id)
                continue
            if split_file is not None and dicom_id not in image_splits:
                skipped.skip_row("image not in the split file", dicom_id)
                continue
            folder = images_dir / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"
            split = _split_name(image_splits.get(dicom_id, "train"))
            labels = (study["positive"], study["uncertain"])
            yield _labelled_draft(dicom_id, [folder / f"{dicom_id}.jpg"], split, labels)


_SIIM_LABEL = "pneumothorax"


@_converter
def _siim_acr(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """SIIM-ACR: each mask row -> a tight box labelled "pneumothorax"; "-1" rows mean no mask.

    Masks are decoded on the real image's size (1024x1024 in the release), not an assumed one.
    """
    rows = _read_csv(input_path, ("ImageId", "EncodedPixels"))
    records = ((row["ImageId"], {"rle": row["EncodedPixels"]}) for row in rows)
    for image_id, group in _grouped(records, skipped):
        rles = [record["rle"] for record in group if record["rle"] != "-1"]
        yield _Draft(
            image_id,
            [images_dir / f"{image_id}.dcm", images_dir / f"{image_id}.png"],
            split="train",
            labels=[_SIIM_LABEL] if rles else [NO_FINDING],
            boxes=functools.partial(_rle_boxes, rles, _SIIM_LABEL),
        )


_SLAKE_FILES = ("train.json", "validate.json", "test.json")
_SLAKE_MODALITIES = {"ct": "ct", "mri": "mri", "x-ray": "xray"}


def _slake_modality(modality: str, location: str) -> str:
    kind = _SLAKE_MODALITIES.get(modality.lower(), modality.lower() or "unknown")
    return CXR if kind == "xray" and any(word in location.lower() for word in ("chest", "lung")) else kind


def _slake_organs(path: Path) -> list[_Box]:
    """Organ boxes of one SLAKE image from its detection.json (absent file: none).

    Assumed layout (unverified upstream): a list of {organ: [x, y, w, h]} dicts in absolute pixels; a single
    {organ: [x, y, w, h]} dict is accepted too. Unreadable files and malformed entries become dropped regions.
    """
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [_Box(None, "", invalid="unreadable detection.json")]
    boxes = []
    for entry in data if isinstance(data, list) else [data]:
        if not isinstance(entry, dict):
            boxes.append(_Box(None, "", invalid="malformed detection.json entry"))
            continue
        for organ, xywh in entry.items():
            boxes.append(_Box(_xywh(*xywh) if isinstance(xywh, list) else None, str(organ)))
    return boxes


def _slake_vqa(question: dict[str, Any]) -> dict[str, Any] | None:
    """An English SLAKE question as VQA record fields; None for other languages."""
    if question.get("q_lang") != "en":
        return None
    return _vqa_question(
        qid=question.get("qid"),
        question=question.get("question"),
        answer=question.get("answer"),
        answer_type=question.get("answer_type"),
        question_type=question.get("content_type"),
        phrase_type="freeform",
        image_organ=question.get("location"),
    )


@_converter
def _slake(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, vqa_dir: Path | None = None
) -> Iterator[_Draft]:
    """SLAKE: one row per image (questions grouped by `img_name`), split from the file name; regions and labels are
    the detection.json organs. With `vqa_dir`, the English questions of every KEPT image go to
    `vqa_dir/{split}.json` (one file per split with rows); those of a skipped image are counted."""
    files = [input_path / name for name in _SLAKE_FILES] if input_path.is_dir() else [input_path]

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for path in filter(Path.is_file, files):
            split = _split_from_path(path)
            # One JSON document per split (a few MB): it can only be read whole; the grouping still streams.
            questions = _load_json(path)
            if not isinstance(questions, list):
                raise ValueError(f"{path}: a SLAKE split file is a JSON list of questions, got a {type(questions).__name__}")
            for question in questions:
                about = {key: question.get(key) or "" for key in ("modality", "location")}
                yield question.get("img_name") or "", {"split": split, "vqa": _slake_vqa(question), **about}

    with _VQAWriter(vqa_dir, skipped) as vqa:
        for img_name, group in _grouped(records(), skipped):
            first = group[0]
            location = first["location"].replace("_", " ").lower()
            modality = _slake_modality(first["modality"], location)
            organs = _slake_organs(images_dir / "imgs" / Path(img_name).parent / "detection.json")
            names = _unique(box.label for box in organs)
            summary, report = _organ_captions(modality, location, names)
            draft = _Draft(
                img_name,
                [images_dir / "imgs" / img_name],
                split=first["split"],
                modality=modality,
                labels=names,
                boxes=organs,
                summary=summary,
                report=report,
            )
            yield draft
            vqa.write(draft, [record["vqa"] for record in group if record["vqa"] is not None])


_VQA_RAD_FILE = "VQA_RAD Dataset Public.json"
_VQA_RAD_IMAGES = "VQA_RAD Image Folder"
_VQA_RAD_ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
_VQA_RAD_MODALITY = "radiology"  # image_organ names a body part, not a modality: CHEST holds X-rays and CTs
_VQA_ANSWER_TYPES = frozenset({"OPEN", "CLOSED"})
_NO_LINKED_ID = frozenset({"", "null", "none", "nan"})


def _vqa_rad_group(record: dict[str, Any]) -> str:
    """A question's paraphrase group: its `qid_linked_id`, or "qid:{qid}" (a group of its own) when that is blank."""
    linked = str(record.get("qid_linked_id") or "").strip()
    return f"qid:{record.get('qid')}" if linked.lower() in _NO_LINKED_ID else linked


def _hash_fraction(key: str) -> float:
    """A uniform number in [0, 1) fixed by `key` (its SHA-256): the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _vqa_rad_fields(record: Any) -> dict[str, Any] | str:
    """One VQA-RAD question as VQA record fields (answer and question stripped, answer_type upper-cased), or the
    reason it is left out."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    # None is absent; anything else is read as text (a numeric answer such as 2 becomes "2")
    qid, image_name, question, answer, answer_type = (
        "" if record.get(key) is None else str(record[key]).strip()
        for key in ("qid", "image_name", "question", "answer", "answer_type")
    )
    if not qid:
        return "question without a qid"
    if not image_name:
        return "question without an image_name"
    if not question:
        return "question without text"
    if not answer:
        return "question without an answer"
    if answer_type.upper() not in _VQA_ANSWER_TYPES:
        return f"answer_type {record.get('answer_type')!r} is not OPEN or CLOSED"
    organ = str(record.get("image_organ") or "").strip()
    # qid as the release gives it (an int): the records' ids stay the release's
    return _vqa_question(record["qid"], question, answer, answer_type.upper(), record.get("question_type"),
                         record.get("phrase_type"), organ)


@_converter
def _vqa_rad_drafts(
    input_path: Path,
    images_dir: Path,
    *,
    skipped: SkipCounter,
    forced_split: str | None = None,
    vqa_dir: Path | None = None,
    validation_fraction: float = VQA_RAD_VALIDATION_FRACTION,
) -> Iterator[_Draft]:
    """VQA-RAD drafts: one per (image, split with questions on it); see `_vqa_rad` for the split rule."""
    records = _load_json(input_path)  # one document of ~2,200 questions
    if not isinstance(records, list):
        raise ValueError(f"{str(input_path)!r} is not VQA-RAD: expected a JSON list of question records")
    # Over every record, kept or not: a group is test when the release made any of its questions a test question.
    test_groups = {
        _vqa_rad_group(record)
        for record in records
        if isinstance(record, dict) and str(record.get("phrase_type") or "").strip().lower().startswith("test")
    }

    def split_of(group: str) -> str:
        if forced_split is not None:
            return forced_split
        if group in test_groups:
            return "test"
        return "validation" if _hash_fraction(group) < validation_fraction else "train"

    def questions() -> Iterator[tuple[str, dict[str, Any]]]:
        for index, record in enumerate(records):
            fields = _vqa_rad_fields(record)
            if isinstance(fields, str):
                skipped.skip_question(fields, f"{input_path}[{index}]")
                continue
            yield str(record["image_name"]).strip(), {"split": split_of(_vqa_rad_group(record)), "vqa": fields}

    with _VQAWriter(vqa_dir, skipped) as vqa:
        for image_name, group in _grouped(questions(), skipped):
            organ = next((record["vqa"]["image_organ"] for record in group if record["vqa"]["image_organ"]), "")
            summary, report = _organ_captions(_VQA_RAD_MODALITY, _VQA_RAD_ORGANS.get(organ.upper(), organ.lower()))
            for split in SPLITS:
                asked = [record["vqa"] for record in group if record["split"] == split]
                if not asked:
                    continue
                draft = _Draft(
                    f"{split}/{image_name}",  # unique within the dataset: the image may have a row in every split
                    [images_dir / image_name],
                    split=split,
                    modality=_VQA_RAD_MODALITY,
                    summary=summary,
                    report=report,
                )
                yield draft
                vqa.write(draft, asked)


def _vqa_rad(
    input_path: Path, images_dir: Path | None, *, split: str | None = None, **options: Any
) -> Iterator[dict[str, Any]]:
    """VQA-RAD `VQA_RAD Dataset Public.json` (or its folder): a canonical row per image and split with questions on
    it, no regions, no labels, image id "{split}/{image_name}"; images in `images_dir`, by default
    `VQA_RAD Image Folder` beside the JSON.

    Split per paraphrase group (`qid_linked_id`; a blank or NULL id is a group of its own, keyed by qid): "test" when
    any question of the group has a `phrase_type` starting with "test" (test_freeform, test_para: the release's test
    set), else "validation" when SHA-256 of the group id puts it in the first `validation_fraction` (0.1), else
    "train". So paraphrases never cross splits, and the split does not depend on the seed. `split=` forces one
    split for every question.
    """
    json_path = input_path / _VQA_RAD_FILE if input_path.is_dir() else input_path
    if not json_path.is_file():
        raise FileNotFoundError(f"no {_VQA_RAD_FILE!r} in {str(input_path)!r}")
    images = images_dir if images_dir is not None else json_path.parent / _VQA_RAD_IMAGES
    forced = _split_name(split) if split is not None else None
    return _vqa_rad_drafts(json_path, images, split=split, forced_split=forced, **options)


_ROCO_ARCHIVE = re.compile(r"([^/\s]+)\.tar\.gz\b")


def _roco_dlinks(path: Path) -> dict[str, tuple[str | None, str]]:
    """ROCO id -> (archive id, image file name) from a dlinks.txt; {} when the file is absent.

    Lines are "ROCO_xxxxx<TAB>wget -r ftp://.../PMCxxxx.tar.gz -P /path/to/Dir<TAB>name.jpg": the archive id is the
    archive's file name without ".tar.gz" (as the release's scripts/fetch.py takes it), the image name the last
    column. A line without an image name is ignored (its caption row then falls back to the id-named files).
    """
    links: dict[str, tuple[str | None, str]] = {}
    if not path.is_file():
        return links
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            columns = line.rstrip("\r\n").split("\t")
            name, image = columns[0].strip(), columns[-1].strip()
            if len(columns) < 2 or not (name and image):
                if line.strip():
                    logger.debug("ignored dlinks line %s:%d", path, number)
                continue
            archive = _ROCO_ARCHIVE.search(columns[1]) if len(columns) > 2 else None
            links[name] = (archive.group(1) if archive else None, image)
    return links


def _roco_candidates(name: str, link: tuple[str | None, str] | None, folder: Path) -> list[Path]:
    """Where ROCO image `name` may be: fetch.py's "{PMCid}_{image}", the bare dlinks name, then "{name}.jpg|.png"."""
    candidates = []
    if link is not None:
        archive, image = link
        if archive:
            candidates.append(folder / f"{archive}_{image}")
        candidates.append(folder / image)
    return candidates + [folder / f"{name}.jpg", folder / f"{name}.png"]


@_converter
def _roco_drafts(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, given_images: Path | None = None
) -> Iterator[_Draft]:
    """ROCO drafts; `given_images` is the images folder the caller passed (None: each captions file's `images/`)."""
    files = sorted(input_path.rglob("captions.txt")) if input_path.is_dir() else [input_path]
    for path in files:
        split = _split_from_path(path)
        modality = "non_radiology" if "non-radiology" in path.parts else "radiology"
        folder = given_images if given_images is not None else path.parent / "images"
        links = _roco_dlinks(path.parent / "dlinks.txt")  # one id -> name dict per captions file
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                name, tab, caption = line.partition("\t")
                name, caption = name.strip(), " ".join(caption.split())  # lines are "ROCO_00001\t caption"
                if not (tab and name and caption):
                    skipped.skip_row("malformed captions line", f"{path}:{number}")
                    continue
                yield _Draft(
                    name,
                    _roco_candidates(name, links.get(name), folder),
                    split=split,
                    modality=modality,
                    summary=_sentence(re.split(r"(?<=[.!?])\s", caption, maxsplit=1)[0]),
                    report=caption,
                )


def _roco(input_path: Path, images_dir: Path | None, **options: Any) -> Iterator[dict[str, Any]]:
    """ROCO captions.txt (or every captions.txt under a folder): one row per line, no regions, no labels.

    Layout of the release (razorx89/roco-dataset): `data/{train,validation,test}/{radiology,non-radiology}/` holds
    `captions.txt` ("ROCO_xxxxx<TAB> caption") and `dlinks.txt` (id, download command, image name); its
    scripts/fetch.py saves each image as `images/{PMCid}_{image name}` beside them. An image is looked for in
    `images_dir` when given, else in the captions file's own `images/` folder, as `{PMCid}_{name}`, then `{name}`
    (from the sibling dlinks.txt, when there is one), then `{ROCO_id}.jpg|.png` (mirrors that rename by id); a row
    whose image is in none of them is skipped as "missing image" (the debug log lists the paths tried).

    Split from the path; modality "radiology" ("non_radiology" under a `non-radiology` folder).
    """
    return _roco_drafts(input_path, images_dir, given_images=images_dir, **options)


@_converter
def _coco(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, modality: str = "unknown"
) -> Iterator[_Draft]:
    """COCO detection JSON: regions labelled with category names (`segmentation` is ignored); split from the file
    name (`instances_val2017.json` -> validation), else "train"; image id = `file_name`."""
    # A COCO file is one JSON document and has to be loaded whole; the per-image grouping still goes through sqlite.
    document = _load_json(input_path)
    if not isinstance(document, dict):
        raise ValueError(f"{input_path}: a COCO file is a JSON object with 'images' and 'annotations', "
                         f"got a {type(document).__name__}")
    categories = {category["id"]: category["name"] for category in document.get("categories", [])}
    split = _split_from_path(input_path)
    images = ((str(image.get("id", "")), {"image": image}) for image in document.get("images", []))
    annotations = ((str(ann.get("image_id", "")), {"annotation": ann}) for ann in document.get("annotations", []))
    file_names: set[str] = set()
    for coco_id, group in _grouped(itertools.chain(images, annotations), skipped):
        entries = [record["image"] for record in group if "image" in record]
        if not entries:
            skipped.skip_row("annotations of an unknown image id", coco_id)
            continue
        if len({str(entry.get("file_name") or coco_id) for entry in entries}) > 1:
            skipped.skip_row("image id listed for two files", coco_id)  # whose annotations are whose is unknowable
            continue
        info = entries[0]
        if str(info.get("file_name") or coco_id) in file_names:
            skipped.skip_row("file listed under two image ids", info.get("file_name"))
            continue
        file_names.add(str(info.get("file_name") or coco_id))
        boxes = []
        for record in group:
            if "annotation" not in record:
                continue
            annotation = record["annotation"]
            bbox = annotation.get("bbox")
            xyxy = _xywh(*bbox) if isinstance(bbox, list) else None
            name = categories.get(annotation.get("category_id"))
            boxes.append(_Box(xyxy, name) if name is not None else _Box(None, "", invalid="unknown category"))
        file_name = str(info.get("file_name") or coco_id)
        yield _Draft(
            file_name,
            [images_dir / file_name],
            split=split,
            modality=modality,
            labels=_unique(box.label for box in boxes) or [NO_FINDING],
            boxes=boxes,
            declared_size=_declared_size(info.get("width"), info.get("height")),
        )


CONVERTERS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "ms-cxr": _ms_cxr,
    "vindr-cxr": _vindr_cxr,
    "rsna-pneumonia": _rsna_pneumonia,
    "chestxray14": _chestxray14,
    "chexpert": _chexpert,
    "mimic-cxr": _mimic_cxr,
    "siim-acr": _siim_acr,
    "slake": _slake,
    "vqa-rad": _vqa_rad,
    "roco": _roco,
    "coco": _coco,
}
