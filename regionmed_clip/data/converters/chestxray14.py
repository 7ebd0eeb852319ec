"""ChestX-ray14: BBox_List_2017.csv, images `Image Index`."""

from collections.abc import Iterator
from pathlib import Path

from .captions import _unique
from .geometry import _Box, _xywh
from .inputs import _grouped, _read_csv
from .rows import SkipCounter, _converter, _Draft

__all__ = ["_chestxray14"]

# The header "Bbox [x,y,w,h]" is not quoted, so csv reads it as four columns with these names.
_CXR14_BOX_COLUMNS = ("Bbox [x", "y", "w", "h]")


@_converter
def _chestxray14(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """ChestX-ray14 BBox_List_2017.csv (no split in the file: "train" unless `split=` is given)."""
    records = (
        (row["Image Index"], {"label": row["Finding Label"], "box": _xywh(*(row[c] for c in _CXR14_BOX_COLUMNS))})
        for row in _read_csv(input_path, ("Image Index", "Finding Label", *_CXR14_BOX_COLUMNS), skipped)
    )
    for image_id, group in _grouped(records, skipped):
        yield _Draft(
            image_id,
            [images_dir / image_id],
            split="train",
            labels=_unique(record["label"] for record in group),
            boxes=[_Box(record["box"], record["label"]) for record in group],
        )
