"""COCO: a COCO detection JSON, images `file_name`."""

import itertools
from collections.abc import Iterator
from pathlib import Path

from .captions import NO_FINDING, _unique
from .geometry import _Box, _declared_size, _xywh
from .inputs import _grouped, _load_json
from .rows import SkipCounter, _converter, _Draft
from .splits import _split_from_path

__all__ = ["_coco"]


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
