"""SIIM-ACR: train-rle.csv, images `{ImageId}.dcm|.png`."""

import functools
from collections.abc import Iterator
from pathlib import Path

from .captions import NO_FINDING
from .geometry import _rle_boxes
from .inputs import _grouped, _read_csv
from .rows import SkipCounter, _converter, _Draft

__all__ = ["_siim_acr"]

_SIIM_LABEL = "pneumothorax"


@_converter
def _siim_acr(input_path: Path, images_dir: Path, *, skipped: SkipCounter) -> Iterator[_Draft]:
    """SIIM-ACR: each mask row -> a tight box labelled "pneumothorax"; "-1" rows mean no mask.

    Masks are decoded on the real image's size (1024x1024 in the release), not an assumed one.
    """
    rows = _read_csv(input_path, ("ImageId", "EncodedPixels"), skipped)
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
