"""VQA-RAD: VQA_RAD Dataset Public.json (or its folder), images `{image_name}` in `VQA_RAD Image Folder/`; the
questions also go to `vqa_dir/{split}.json`."""

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from regionmed_clip.data.schema import SPLITS

from .captions import _organ_captions
from .inputs import _grouped, _load_json
from .rows import SkipCounter, _converter, _Draft, _listed_once
from .splits import _split_name
from .vqa_records import _vqa_question, _VQAWriter

__all__ = ["VQA_RAD_VALIDATION_FRACTION", "_vqa_rad"]

VQA_RAD_VALIDATION_FRACTION = 0.1  # VQA-RAD: share of the non-test paraphrase groups made validation (by hash)
_VQA_RAD_FILE = "VQA_RAD Dataset Public.json"
_VQA_RAD_IMAGES = "VQA_RAD Image Folder"
_VQA_RAD_ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
_VQA_RAD_MODALITY = "radiology"  # image_organ names a body part, not a modality: CHEST holds X-rays and CTs
_VQA_ANSWER_TYPES = frozenset({"OPEN", "CLOSED"})
_NO_LINKED_ID = frozenset({"", "null", "none", "nan"})


def _vqa_rad_group(record: dict[str, Any]) -> str:
    """A question's paraphrase group: its `qid_linked_id`, or "qid:{qid}" (a group of its own) when that is blank."""
    linked = str(record.get("qid_linked_id") or "").strip()
    return f"qid:{record.get('qid')}" if linked.lower() in _NO_LINKED_ID else linked


def _hash_fraction(key: str) -> float:
    """A uniform number in [0, 1) fixed by `key` (its SHA-256): the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _vqa_rad_fields(record: Any) -> dict[str, Any] | str:
    """One VQA-RAD question as VQA record fields (answer and question stripped, answer_type upper-cased), or the
    reason it is left out."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    # None is absent; anything else is read as text (a numeric answer such as 2 becomes "2")
    qid, image_name, question, answer, answer_type = (
        "" if record.get(key) is None else str(record[key]).strip()
        for key in ("qid", "image_name", "question", "answer", "answer_type")
    )
    if not qid:
        return "question without a qid"
    if not image_name:
        return "question without an image_name"
    if not question:
        return "question without text"
    if not answer:
        return "question without an answer"
    if answer_type.upper() not in _VQA_ANSWER_TYPES:
        return f"answer_type {record.get('answer_type')!r} is not OPEN or CLOSED"
    organ = str(record.get("image_organ") or "").strip()
    # qid as the release gives it (an int): the records' ids stay the release's
    return _vqa_question(record["qid"], question, answer, answer_type.upper(), record.get("question_type"),
                         record.get("phrase_type"), organ)


@_converter
def _vqa_rad_drafts(
    input_path: Path,
    images_dir: Path,
    *,
    skipped: SkipCounter,
    forced_split: str | None = None,
    vqa_dir: Path | None = None,
    validation_fraction: float = VQA_RAD_VALIDATION_FRACTION,
) -> Iterator[_Draft]:
    """VQA-RAD drafts: one per (image, split with questions on it); see `_vqa_rad` for the split rule."""
    records = _load_json(input_path)  # one document of ~2,200 questions
    if not isinstance(records, list):
        raise ValueError(f"{str(input_path)!r} is not VQA-RAD: expected a JSON list of question records")
    # Over every record, kept or not: a group is test when the release made any of its questions a test question.
    test_groups = {
        _vqa_rad_group(record)
        for record in records
        if isinstance(record, dict) and str(record.get("phrase_type") or "").strip().lower().startswith("test")
    }

    def split_of(group: str) -> str:
        if forced_split is not None:
            return forced_split
        if group in test_groups:
            return "test"
        return "validation" if _hash_fraction(group) < validation_fraction else "train"

    def questions() -> Iterator[tuple[str, dict[str, Any]]]:
        by_qid: dict[str, list[dict[str, Any]]] = {}  # a qid names one question: `_listed_once` for repeats
        for index, record in enumerate(records):
            fields = _vqa_rad_fields(record)
            if isinstance(fields, str):
                skipped.skip_question(fields, f"{input_path}[{index}]")
                continue
            by_qid.setdefault(str(fields["qid"]).strip(), []).append(record)
        for qid, listed in by_qid.items():
            record = _listed_once(listed, "qid", f"qid {qid}", skipped.skip_question)
            if record is not None:
                fields = _vqa_rad_fields(record)
                yield str(record["image_name"]).strip(), {"split": split_of(_vqa_rad_group(record)), "vqa": fields}

    with _VQAWriter(vqa_dir, skipped) as vqa:
        for image_name, group in _grouped(questions(), skipped):
            organ = next((record["vqa"]["image_organ"] for record in group if record["vqa"]["image_organ"]), "")
            summary, report = _organ_captions(_VQA_RAD_MODALITY, _VQA_RAD_ORGANS.get(organ.upper(), organ.lower()))
            for split in SPLITS:
                asked = [record["vqa"] for record in group if record["split"] == split]
                if not asked:
                    continue
                draft = _Draft(
                    f"{split}/{image_name}",  # unique within the dataset: the image may have a row in every split
                    [images_dir / image_name],
                    split=split,
                    modality=_VQA_RAD_MODALITY,
                    summary=summary,
                    report=report,
                )
                yield draft
                vqa.write(draft, asked)


def _vqa_rad(
    input_path: Path, images_dir: Path | None, *, split: str | None = None, **options: Any
) -> Iterator[dict[str, Any]]:
    """VQA-RAD `VQA_RAD Dataset Public.json` (or its folder): a canonical row per image and split with questions on
    it, no regions, no labels, image id "{split}/{image_name}"; images in `images_dir`, by default
    `VQA_RAD Image Folder` beside the JSON.

    Split per paraphrase group (`qid_linked_id`; a blank or NULL id is a group of its own, keyed by qid): "test" when
    any question of the group has a `phrase_type` starting with "test" (test_freeform, test_para: the release's test
    set), else "validation" when SHA-256 of the group id puts it in the first `validation_fraction` (0.1), else
    "train". So paraphrases never cross splits, and the split does not depend on the seed. `split=` forces one
    split for every question. A qid listed twice is a duplicate (identical records: the first kept) or, when the
    records disagree, none is kept (counted).
    """
    json_path = input_path / _VQA_RAD_FILE if input_path.is_dir() else input_path
    if not json_path.is_file():
        raise FileNotFoundError(f"no {_VQA_RAD_FILE!r} in {str(input_path)!r}")
    images = images_dir if images_dir is not None else json_path.parent / _VQA_RAD_IMAGES
    forced = _split_name(split) if split is not None else None
    return _vqa_rad_drafts(json_path, images, split=split, forced_split=forced, **options)


_vqa_rad.forwards_to = _vqa_rad_drafts  # type: ignore[attr-defined]  # what `check_options` reads
