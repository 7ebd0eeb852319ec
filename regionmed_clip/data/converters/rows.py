"""The row pipeline every format shares. `SkipCounter` counts what a conversion leaves out, by reason, and
`ConversionStats` reports what it did; a format yields one `_Draft` per image (what it knows before the shared
steps), and `_converter` turns that draft generator into a row converter: refuse an image path outside the images
folder, find and fully decode the image (DICOMs rendered to 8 bits, images with an EXIF orientation stored upright),
fit each region to the stored image (rescaled from a declared size, clipped, or dropped and counted), fill in the
caption templates and hard negatives, and validate the canonical row (an invalid one is skipped and counted).
`_listed_once` is the one rule for a source that lists what should be listed once (an image, a study, a qid) more
than once."""

import collections
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from regionmed_clip.data.negatives import make_hard_negatives
from regionmed_clip.data.schema import validate_row
from regionmed_clip.data.skips import EXAMPLES_PER_REASON
from regionmed_clip.processing.medical_image_io import is_dicom_file, load_medical_image

from .captions import CXR, _default_report, _position_caption, _summary
from .geometry import _Box, _orient_box
from .splits import _split_name

__all__ = ["ConversionStats", "SkipCounter", "_Draft", "_converter", "_inside", "_listed_once"]

logger = logging.getLogger(__name__)

NUM_NEGATIVES = 3
OUTSIDE_IMAGES = "path outside --images"  # the skip reason of an image path that leaves the images folder
_EXIF_ORIENTATION = 0x0112


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
    value: Any  # a path (embedded as its bytes) or a PIL image (a DICOM rendered to 8 bits, or an image with an
    # EXIF orientation turned upright; embedded as PNG)
    size: tuple[int, int]  # (W, H)
    orientation: int = 1  # the EXIF orientation the file's pixels were turned upright from (1: none)
    file_size: tuple[int, int] | None = None  # (W, H) of the file's pixels before they were turned upright


def _listed_once(
    records: Sequence[Any], what: str, where: str, skip: Callable[[str, str], None],
    same: Callable[[Any], Any] | None = None,
) -> Any | None:
    """The one record of something a source should list once (an image, a study's label row, a question's qid).

    The rule every format follows: repeats that agree with the first (`same(record)` equal; default the record) are
    duplicates: the first is kept and each repeat counted as "duplicate {what}"; repeats that disagree are not
    guessed between: none is kept, counted once as "{what} listed twice, disagreeing". `skip` is the SkipCounter's
    `skip_row` or `skip_question`; `where` names the key.
    """
    if len(records) == 1:
        return records[0]
    key = same or (lambda record: record)
    first = key(records[0])
    if any(key(record) != first for record in records[1:]):
        skip(f"{what} listed twice, disagreeing", f"{where} ({len(records)} times)")
        return None
    for _ in records[1:]:
        skip(f"duplicate {what}", where)
    return records[0]


def _inside(folder: Path, path: Path) -> bool:
    """Whether `path` (a file named by the source, joined to `folder`) stays inside `folder`: not absolute elsewhere
    and no `..` part. Decided on the names alone, without touching the file system: a symlink the user put inside
    the folder is followed, a name in the annotations cannot leave it."""
    try:
        relative = Path(path).relative_to(folder)
    except ValueError:
        return False
    return ".." not in relative.parts


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
            outside = next((str(path) for path in draft.candidates if not _inside(images_dir, path)), None)
            if outside is not None:  # never opened, nor looked for
                skipped.skip_row(OUTSIDE_IMAGES, f"{draft.image_id} ({outside} is not inside {str(images_dir)!r})")
                continue
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
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            if orientation not in range(2, 9):
                return _LoadedImage(path, image.size)
            # An EXIF orientation (2..8: mirrored, rotated or both): viewers show the pixels turned by it, and that
            # is what the annotation was drawn on. Store those upright pixels (as PNG, the tag gone), never the
            # file's, which a reader without EXIF handling would show otherwise than its boxes.
            upright = ImageOps.exif_transpose(image)
            if upright.mode == "CMYK":  # PNG has no CMYK
                upright = upright.convert("RGB")
            return _LoadedImage(upright, upright.size, orientation, image.size)
    except Exception as error:  # any decoder failure (PIL, pydicom, numpy) leaves this image unusable
        skipped.skip_row("undecodable image", f"{draft.image_id} ({path}: {error})")
        return None


def _to_row(draft: _Draft, image: _LoadedImage, skipped: SkipCounter, seed: int) -> dict[str, Any] | None:
    """Build and validate the canonical row; bad regions are dropped, an invalid row is skipped (both counted)."""
    boxes = draft.boxes(image.size) if callable(draft.boxes) else draft.boxes
    declared = draft.declared_size
    if image.orientation > 1 and declared == image.file_size != image.size:
        # The annotation declares the size of the file's own pixels, which the orientation swaps: its boxes were
        # drawn on those pixels; turn them upright with the image.
        boxes = [_Box(_orient_box(box.bbox, image.orientation, image.file_size), box.label, box.caption, box.invalid)
                 if box.bbox is not None else box for box in boxes]
        declared = image.size
    regions = []
    for box in boxes:
        bbox = _fit_box(box, image.size, declared, skipped, draft.image_id)
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
