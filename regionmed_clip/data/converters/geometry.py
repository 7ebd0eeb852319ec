"""Region geometry: the `_Box` a format gives for a region (xyxy in the source's pixel frame), coordinates parsed
from text (`_numbers`, [x, y, w, h] -> [x0, y0, x1, y1], a declared image size), the IoU and greedy fusion of
several readers' boxes (VinDr-CXR), a box turned upright with its image (`_orient_box`, an EXIF orientation), and
RLE masks decoded on the image grid into tight boxes (SIIM-ACR)."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["_Box", "_declared_size", "_fuse_boxes", "_numbers", "_orient_box", "_rle_boxes", "_xywh"]

FUSION_IOU = 0.4  # VinDr-CXR: same-class boxes of different readers overlapping this much are one finding


@dataclass
class _Box:
    """A region as the source gives it: xyxy in the source's pixel frame; `bbox` None when unusable.

    `caption` None means the position template; `invalid` names why a region must be dropped.
    """

    bbox: list[float] | None
    label: str
    caption: str | None = None
    invalid: str | None = None


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


def _orient_box(bbox: Sequence[float], orientation: int, size: tuple[int, int]) -> list[float]:
    """An xyxy box on an image of `size` (W, H) whose EXIF orientation is `orientation` (1..8), in the pixels of the
    upright image (as `PIL.ImageOps.exif_transpose` makes it)."""
    width, height = size
    # Where a point (x, y) of the file's pixels lands in the upright image, per orientation.
    moves = {
        1: lambda x, y: (x, y),
        2: lambda x, y: (width - x, y),  # mirrored left-right
        3: lambda x, y: (width - x, height - y),  # rotated 180
        4: lambda x, y: (x, height - y),  # mirrored top-bottom
        5: lambda x, y: (y, x),  # transposed
        6: lambda x, y: (height - y, x),  # rotated 90 clockwise to display
        7: lambda x, y: (height - y, width - x),  # transversed
        8: lambda x, y: (y, width - x),  # rotated 90 counter-clockwise to display
    }
    move = moves[orientation]
    (ax, ay), (bx, by) = move(bbox[0], bbox[1]), move(bbox[2], bbox[3])
    return [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]


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
