"""MS-CXR: MS_CXR_Local_Alignment_v1.x.0.csv, images at `images_dir / path`."""

from collections.abc import Iterator
from pathlib import Path

from .captions import _sentence, _unique
from .geometry import _Box, _declared_size, _xywh
from .inputs import _grouped, _read_csv
from .rows import SkipCounter, _converter, _Draft
from .splits import _split_name

__all__ = ["_ms_cxr"]


@_converter
def _ms_cxr(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """MS-CXR v1.0.0 (no `split` column: "train") and v1.1.0 (`split`, "val" -> "validation")."""
    columns = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
    records = ((row["dicom_id"], row) for row in _read_csv(input_path, columns, skipped))
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
