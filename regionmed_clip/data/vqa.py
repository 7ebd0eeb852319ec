"""Read a canonical dataset's VQA sidecar `DATA/vqa/{split}.json` for training and evaluation.

Three writers produce it, all as a JSON list of VQA-RAD-style records `{qid, image_name, question, answer,
answer_type (OPEN|CLOSED), ...}`: the synthetic generator, and the `slake` and `vqa-rad` converters.

`image_name` -> canonical `image_id`, one rule for all three: the image_id of the split equal to `image_name`, else
equal to `image_name` without its last file extension. So the converters' records (`image_name` IS the image_id:
"xmlab0/source.jpg", "test/synpic100.jpg") and the synthetic set's (`image_name` = "{image_id}.png":
"synth-0-000000.png" -> "synth-0-000000") both resolve; an exact match wins over the stripped one.

Records with a language field (SLAKE's `q_lang`) are kept only when it is "en"; records without one are kept.
Every error names the file, the record index and the field.
"""

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from regionmed_clip.data.schema import load_canonical
from regionmed_clip.scoring import ANSWER_TYPES

__all__ = ["ANSWER_TYPES", "VQAExample", "load_vqa_examples", "resolve_image_name", "vqa_images", "vqa_path"]

_LANGUAGE_FIELD = "q_lang"


@dataclasses.dataclass(frozen=True)
class VQAExample:
    """One question about one canonical row."""

    question_id: str  # the record's qid, as text
    image_id: str  # the canonical row's image_id the question is about (same split)
    question: str
    answer: str  # as given; normalisation for scoring is `regionmed_clip.scoring.normalize_answer`'s
    answer_type: str  # "closed" | "open"


def vqa_path(data_dir: str | Path, split: str) -> Path:
    """Where the VQA records of `split` live: `data_dir/vqa/{split}.json`."""
    return Path(data_dir) / "vqa" / f"{split}.json"


def resolve_image_name(image_name: str, image_ids: set[str] | frozenset[str]) -> str | None:
    """The image_id `image_name` refers to (itself, else itself without its last extension); None if neither is."""
    if image_name in image_ids:
        return image_name
    path = PurePosixPath(image_name)
    stem = str(path.with_suffix("")) if path.suffix else None
    return stem if stem in image_ids else None


def _split_image_ids(data_dir: Path, split: str) -> frozenset[str]:
    """The image_ids of one split's canonical rows (the image column is not decoded)."""
    return frozenset(load_canonical(data_dir, split, decode_images=False)["image_id"])


def _text(record: dict[str, Any], name: str, where: str) -> str:
    """A required non-empty text field; a number (an answer of 2) is read as its text."""
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return str(value)


def load_vqa_examples(data_dir: str | Path, split: str) -> list[VQAExample]:
    """The questions of `data_dir/vqa/{split}.json` about rows of `split`, in file order.

    English only where a record has `q_lang`; `answer_type` OPEN/CLOSED (any case) -> "open"/"closed"; qids must
    be unique in the file. Raises FileNotFoundError for a missing file and ValueError, naming file, record index
    and field, for anything else that does not fit (not a JSON list, no question / answer / qid / image_name, an
    unknown answer_type, an image_name that is no image of the split).
    """
    path = vqa_path(data_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"no VQA records for split {split!r}: {str(path)!r} does not exist (the dataset has "
                                "no VQA sidecar; `regionmed-data synth` and the slake / vqa-rad converters write one)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise ValueError(f"{str(path)!r} must hold a JSON list of records, got a {type(records).__name__}")
    image_ids = _split_image_ids(Path(data_dir), split)
    examples: list[VQAExample] = []
    first_index: dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"{str(path)!r} record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: must be a JSON object, got a {type(record).__name__}")
        if _LANGUAGE_FIELD in record and record[_LANGUAGE_FIELD] != "en":
            continue
        question_id = _text(record, "qid", where)
        if question_id in first_index:
            raise ValueError(f"{where}: field 'qid' {question_id!r} repeats record {first_index[question_id]}")
        first_index[question_id] = index
        question, answer = _text(record, "question", where), _text(record, "answer", where)
        answer_type = _text(record, "answer_type", where).strip().lower()
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"{where}: field 'answer_type' must be OPEN or CLOSED, got {record['answer_type']!r}")
        image_name = _text(record, "image_name", where)
        image_id = resolve_image_name(image_name, image_ids)
        if image_id is None:
            raise ValueError(f"{where}: field 'image_name' {image_name!r} matches no image_id of split {split!r} "
                             f"(tried it as is and without its extension)")
        examples.append(VQAExample(question_id, image_id, question, answer, answer_type))
    return examples


def vqa_images(data_dir: str | Path, split: str, image_ids: Iterable[str]) -> dict[str, Image.Image]:
    """`{image_id: decoded PIL image}` for the asked rows of `split` only; raises ValueError naming any id the split
    does not have. Only the selected rows' images are decoded."""
    wanted = set(image_ids)
    dataset = load_canonical(data_dir, split)
    all_ids = dataset["image_id"]  # one column: no image is decoded here
    missing = sorted(wanted - set(all_ids))
    if missing:
        shown = ", ".join(repr(image_id) for image_id in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{len(missing)} image id(s) not in split {split!r} of {str(data_dir)!r}: {shown}")
    rows = dataset.select([index for index, image_id in enumerate(all_ids) if image_id in wanted])
    return {row["image_id"]: row["image"] for row in rows.select_columns(["image_id", "image"])}
