"""VinDr-CXR: VinBigData train.csv, images `{image_id}.dicom|.dcm|.png|.jpg|.jpeg`."""

from collections.abc import Iterator
from pathlib import Path

from .captions import NO_FINDING, _unique
from .geometry import _Box, _fuse_boxes, _numbers
from .inputs import _grouped, _read_csv
from .rows import SkipCounter, _converter, _Draft

__all__ = ["_vindr_cxr"]

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
        for row in _read_csv(input_path, columns, skipped)
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
