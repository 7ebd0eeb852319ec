"""Which rows of a split an evaluation can use, and why the others were skipped.

Evaluation reads a split as training does: a row it cannot use (an image that does not decode or
that the processor rejects, a caption or `labels` / `regions` field the task needs that is null or
not text) is skipped, never the end of the run; for the region-level uses (region boxes pooled into
an image, region classification, grounding, the probe's lesions) a region it cannot use (no or bad
`bbox`, an inverted box or one off the image or its view, a null caption or label the task needs)
is dropped and its row kept. Each is counted by reason with example row ids (`SkipLedger`), and
every figure says over how many rows it was computed (`describe`).

The counting (`SkipLedger`) and the text checks (`text_problem`) are the data layer's, shared with
training's collator, so a skipped row reads the same in a training log and an evaluation.
"""

import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from regionmed_clip.cli import UsageError
from regionmed_clip.data.schema import region_problem, text_problem
from regionmed_clip.data.skips import SkipLedger

__all__ = [
    "EvaluationInputError",
    "RowNeeds",
    "Screened",
    "decode_image",
    "describe",
    "image_problem",
    "screen_rows",
]

def describe(rows: Mapping[str, Any] | None) -> str | None:
    """"over N of M rows; K skipped: reason x2, ..." for a `SkipLedger.to_dict()`; None when there
    is no record (an older results file)."""
    if not rows:
        return None
    text = f"over {rows['rows_used']} of {rows['rows_seen']} rows"
    reasons = rows.get("reasons") or {}
    if rows.get("rows_skipped") or rows.get("regions_skipped"):
        text += f"; {rows['rows_skipped']} skipped"
        if rows.get("regions_skipped"):
            text += f" and {rows['regions_skipped']} regions dropped"
        text += ": " + ", ".join(f"{reason} x{count}" for reason, count in reasons.items())
    return text


class EvaluationInputError(UsageError):
    """A user error in any evaluation task or the probe (an argument naming a missing folder, an empty or absent split, a bad value): the
    console-script boundary (`regionmed_clip.cli`) prints it on one line with exit code 2. A file that is
    there but unusable (corrupt, malformed) raises a plain ValueError / OSError instead (exit 1)."""


# -- checks -----------------------------------------------------------------------------------------


def _list_problem(value: Any, name: str) -> str | None:
    if not isinstance(value, (list, tuple)):
        return f"{name} is {'missing or null' if value is None else type(value).__name__}, not a list"
    if not all(isinstance(item, str) for item in value):
        return f"{name} holds a null or non-text entry"
    return None


def decode_image(value: Any, image_processor: Any = None) -> Any:
    """A PIL image of mode "L" or "RGB", as the processor would read it, from a decoded image or
    `{"bytes", "path"}` as `datasets` stores it undecoded. Raises on bytes that do not decode (a
    truncated file) or pixels the processor refuses (a float image holding NaN)."""
    from PIL import Image

    from regionmed_clip.processing.medical_image_io import load_medical_pil

    if isinstance(value, Mapping) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
        image.load()  # force the decode now: a truncated file fails here, not inside the processor
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise ValueError(f"no image bytes (got {type(value).__name__})")
    options = {} if image_processor is None else {"dicom_frame": image_processor.dicom_frame,
                                                  "max_image_pixels": image_processor.max_image_pixels}
    return load_medical_pil(image, **options)


def image_problem(value: Any, image_processor: Any = None) -> tuple[tuple[int, int] | None, str | None]:
    """`((width, height), None)` for an image the processor can use, else `(None, why)`."""
    from PIL import Image

    try:
        if isinstance(value, Mapping) and value.get("bytes"):
            opened = Image.open(io.BytesIO(value["bytes"]))
            opened.load()
            value = opened
    except Exception as error:  # noqa: BLE001 - any decoder failure (PIL raises many types) skips the row
        return None, f"image does not decode ({type(error).__name__})"
    try:
        image = decode_image(value, image_processor)
    except Exception as error:  # noqa: BLE001 - e.g. a float image holding NaN
        return None, f"image rejected by the processor ({type(error).__name__})"
    return image.size, None


# -- a split, screened --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowNeeds:
    """What a task reads of each row besides its image."""

    texts: tuple[str, ...] = ()  # text columns that must hold text (e.g. "report_caption")
    labels: bool = False  # `labels` must be a list of text
    regions: bool = False  # `regions` must be a list; each region needs a usable box
    region_caption: bool = False  # ... and a caption
    region_label: bool = False  # ... and a label


@dataclasses.dataclass
class Screened:
    """The usable rows: their indices in the split, their fields (no image; `regions` holding only the
    usable regions), image sizes `(width, height)`, and the skip counts."""

    indices: list[int]
    meta: list[dict[str, Any]]
    sizes: list[tuple[int, int]]
    skips: SkipLedger
    skipped_ids: set[str]


def screen_rows(
    meta: Sequence[Mapping[str, Any]],
    image_checks: Sequence[tuple[Sequence[int] | None, str | None]],
    needs: RowNeeds,
    image_processor: Any = None,
    what: Callable[[], str] = lambda: "the split",
) -> Screened:
    """Screen the rows' fields (`meta`, one mapping per row without its image) and their image checks
    (`image_problem`'s result per row) against `needs`. Raises ValueError when no row is usable."""
    skips = SkipLedger(rows_seen=len(meta))
    indices, kept, sizes, skipped_ids = [], [], [], set()
    for index, (row, (size, problem)) in enumerate(zip(meta, image_checks, strict=True)):
        row_id = row.get("image_id", index)
        if problem is None:
            problem = next((found for name in needs.texts if (found := text_problem(row.get(name), name))), None)
        if problem is None and needs.labels:
            problem = _list_problem(row.get("labels"), "labels")
        if problem is None and needs.regions and not isinstance(row.get("regions"), (list, tuple)):
            regions = row.get("regions")
            problem = f"regions is {'missing or null' if regions is None else type(regions).__name__}, not a list"
        if problem is not None:
            skips.skip_row(problem, row_id)
            skipped_ids.add(str(row_id))
            continue
        row = dict(row)
        if needs.regions:
            usable = []
            for region in row["regions"]:
                found = region_problem(region, *size, image_processor, needs.region_caption, needs.region_label)
                if found is None:
                    usable.append(region)
                else:
                    skips.skip_region(found, row_id)
            row["regions"] = usable
        indices.append(index)
        kept.append(row)
        sizes.append((int(size[0]), int(size[1])))
    if not indices:
        raise ValueError(f"--data: none of the {len(meta)} rows of {what()} is usable ({describe(skips.to_dict())})")
    return Screened(indices, kept, sizes, skips, skipped_ids)
