"""COCO: a COCO detection JSON, images `file_name`."""

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .captions import NO_FINDING, _unique
from .geometry import _Box, _declared_size, _xywh
from .inputs import _grouped, _load_json
from .rows import SkipCounter, _converter, _Draft
from .splits import _split_from_path

__all__ = ["_coco"]


def _entries(document: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    """The list `document[key]` (absent: empty), each entry a JSON object; ValueError naming the file and entry."""
    entries = document.get(key) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: {key!r} must be a JSON list, got a {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {key}[{index}] must be a JSON object, got a {type(entry).__name__} "
                             f"({json.dumps(entry)[:60]})")
    return entries


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
    categories = {}
    for index, category in enumerate(_entries(document, "categories", input_path)):
        missing = [key for key in ("id", "name") if key not in category]
        if missing:
            raise ValueError(f"{input_path}: categories[{index}] has no {' or '.join(map(repr, missing))}")
        if not isinstance(category["id"], (int, str)):
            raise ValueError(f"{input_path}: categories[{index}] id must be a number or text, got {category['id']!r}")
        categories[category["id"]] = category["name"]
    split = _split_from_path(input_path)
    images = ((str(image.get("id", "")), {"image": image}) for image in _entries(document, "images", input_path))
    annotations = ((str(ann.get("image_id", "")), {"annotation": ann})
                   for ann in _entries(document, "annotations", input_path))
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
            category_id = annotation.get("category_id")
            name = categories.get(category_id) if isinstance(category_id, (int, str)) else None
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
