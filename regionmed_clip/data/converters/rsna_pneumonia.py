"""RSNA Pneumonia: stage_2_train_labels.csv (+ stage_2_detailed_class_info.csv beside it), images
`{patientId}.dcm`."""

import itertools
import math
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path

from .captions import _unique
from .geometry import _Box, _numbers, _xywh
from .inputs import _CsvRow, _grouped, _read_csv
from .rows import SkipCounter, _converter, _Draft

__all__ = ["_rsna_pneumonia"]

_RSNA_CLASS_FILE = "stage_2_detailed_class_info.csv"
_RSNA_OPACITY = "Lung Opacity"


def _binary_flag(row: _CsvRow, column: str, path: Path) -> bool:
    """A 0 / 1 column read as a number, so a pandas float export ("1.0") means the same as "1"."""
    value = row[column]
    number = (_numbers(value) or [math.nan])[0]
    if number not in (0.0, 1.0):
        raise ValueError(f"{path}, line {row.line}: {column} must be 0 or 1, got {value!r}")
    return number == 1.0


@_converter
def _rsna_pneumonia(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """RSNA Pneumonia: one box per Target=1 row; labels from the detailed class file when it sits beside the input,
    else "Lung Opacity" / "No Lung Opacity" from Target (Target=0 mixes Normal and other abnormalities)."""
    boxes = (
        (row["patientId"], {"target": _binary_flag(row, "Target", input_path),
                            "box": _xywh(*itemgetter("x", "y", "width", "height")(row))})
        for row in _read_csv(input_path, ("patientId", "x", "y", "width", "height", "Target"), skipped)
    )
    class_file = input_path.parent / _RSNA_CLASS_FILE
    classes = (
        ((row["patientId"], {"class": row["class"]}) for row in _read_csv(class_file, ("patientId", "class"), skipped))
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
