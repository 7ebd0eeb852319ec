"""SLAKE: train.json / validate.json / test.json (or their folder), images `imgs/{img_name}`; the English questions
also go to `vqa_dir/{split}.json`."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .captions import CXR, _organ_captions, _unique
from .geometry import _Box, _xywh
from .inputs import _grouped, _load_json
from .rows import SkipCounter, _converter, _Draft, _inside
from .splits import _split_from_path
from .vqa_records import _vqa_question, _VQAWriter

__all__ = ["_slake"]

_SLAKE_FILES = ("train.json", "validate.json", "test.json")
_SLAKE_MODALITIES = {"ct": "ct", "mri": "mri", "x-ray": "xray"}


def _slake_modality(modality: str, location: str) -> str:
    kind = _SLAKE_MODALITIES.get(modality.lower(), modality.lower() or "unknown")
    return CXR if kind == "xray" and any(word in location.lower() for word in ("chest", "lung")) else kind


def _slake_organs(path: Path) -> list[_Box]:
    """Organ boxes of one SLAKE image from its detection.json (absent file: none).

    Assumed layout (unverified upstream): a list of {organ: [x, y, w, h]} dicts in absolute pixels; a single
    {organ: [x, y, w, h]} dict is accepted too. Unreadable files and malformed entries become dropped regions.
    """
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [_Box(None, "", invalid="unreadable detection.json")]
    boxes = []
    for entry in data if isinstance(data, list) else [data]:
        if not isinstance(entry, dict):
            boxes.append(_Box(None, "", invalid="malformed detection.json entry"))
            continue
        for organ, xywh in entry.items():
            boxes.append(_Box(_xywh(*xywh) if isinstance(xywh, list) else None, str(organ)))
    return boxes


def _slake_vqa(question: dict[str, Any]) -> dict[str, Any] | None:
    """An English SLAKE question as VQA record fields; None for other languages."""
    if question.get("q_lang") != "en":
        return None
    return _vqa_question(
        qid=question.get("qid"),
        question=question.get("question"),
        answer=question.get("answer"),
        answer_type=question.get("answer_type"),
        question_type=question.get("content_type"),
        phrase_type="freeform",
        image_organ=question.get("location"),
    )


@_converter
def _slake(
    input_path: Path, images_dir: Path, *, skipped: SkipCounter, vqa_dir: Path | None = None
) -> Iterator[_Draft]:
    """SLAKE: one row per image (questions grouped by `img_name`), split from the file name; regions and labels are
    the detection.json organs. With `vqa_dir`, the English questions of every KEPT image go to
    `vqa_dir/{split}.json` (one file per split with rows); those of a skipped image are counted."""
    files = [input_path / name for name in _SLAKE_FILES] if input_path.is_dir() else [input_path]

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for path in filter(Path.is_file, files):
            split = _split_from_path(path)
            # One JSON document per split (a few MB): it can only be read whole; the grouping still streams.
            questions = _load_json(path)
            if not isinstance(questions, list):
                raise ValueError(f"{path}: a SLAKE split file is a JSON list of questions, got a {type(questions).__name__}")
            for index, question in enumerate(questions):
                if not isinstance(question, dict):
                    raise ValueError(f"{path}: question [{index}] must be a JSON object, got a {type(question).__name__}")
                about = {key: question.get(key) or "" for key in ("modality", "location")}
                yield question.get("img_name") or "", {"split": split, "vqa": _slake_vqa(question), **about}

    with _VQAWriter(vqa_dir, skipped) as vqa:
        for img_name, group in _grouped(records(), skipped):
            first = group[0]
            location = first["location"].replace("_", " ").lower()
            modality = _slake_modality(first["modality"], location)
            detection = images_dir / "imgs" / Path(img_name).parent / "detection.json"
            # An img_name leaving the images folder: nothing read here, the row is skipped by the shared rule.
            organs = _slake_organs(detection) if _inside(images_dir, detection) else []
            names = _unique(box.label for box in organs)
            summary, report = _organ_captions(modality, location, names)
            draft = _Draft(
                img_name,
                [images_dir / "imgs" / img_name],
                split=first["split"],
                modality=modality,
                labels=names,
                boxes=organs,
                summary=summary,
                report=report,
            )
            yield draft
            vqa.write(draft, [record["vqa"] for record in group if record["vqa"] is not None])
