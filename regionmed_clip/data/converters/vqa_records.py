"""The VQA records of the VQA formats (SLAKE, VQA-RAD): `_vqa_question` builds one record's fields, and `_VQAWriter`
writes them to `vqa_dir/{split}.json`, one JSON array per split that appears only once complete, about the rows
that were kept; the questions about a skipped row are counted instead."""

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .rows import SkipCounter, _Draft

__all__ = ["_VQAWriter", "_vqa_question"]


class _JsonArrayWriter:
    """Write a JSON array element by element; the file appears (renamed from `.partial`) only when complete."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._partial = path.with_name(path.name + ".partial")
        self._handle = open(self._partial, "w", encoding="utf-8")
        self._handle.write("[")
        self._count = 0

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(("," if self._count else "") + "\n" + json.dumps(record, ensure_ascii=False))
        self._count += 1

    def __enter__(self) -> "_JsonArrayWriter":
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        self._handle.write("\n]\n")
        self._handle.close()
        if exc_type is None:
            self._partial.replace(self._path)
        else:
            self._partial.unlink()


def _vqa_question(
    qid: Any, question: Any, answer: Any, answer_type: Any, question_type: Any, phrase_type: Any, image_organ: Any
) -> dict[str, Any]:
    """One VQA record's fields but `image_name`, which `_VQAWriter` sets to the image_id of the row it is about."""
    return {
        "qid": qid,
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "question_type": question_type,
        "phrase_type": phrase_type,
        "image_organ": image_organ,
    }


class _VQAWriter:
    """The VQA records of a converter: `folder/{split}.json`, one `_JsonArrayWriter` per split opened on first use.

    With `folder` None nothing is written or counted. Use as a context manager around the draft loop.
    """

    def __init__(self, folder: Path | None, skipped: SkipCounter) -> None:
        self._folder = Path(folder) if folder is not None else None
        self._skipped = skipped
        self._files: dict[str, _JsonArrayWriter] = {}
        self._stack = contextlib.ExitStack()

    def write(self, draft: _Draft, questions: Iterable[dict[str, Any]]) -> None:
        """Write `questions` (from `_vqa_question`) about the row of `draft`, once it was yielded: `image_name` is its
        image_id, the file its split. A question about a skipped row is counted instead, so none points at nothing."""
        if self._folder is None:
            return
        if not draft.kept:
            for question in questions:
                reason = f"no row for image {draft.image_id!r} (missing or undecodable)"
                self._skipped.skip_question(reason, f"qid {question['qid']}")
            return
        if draft.split not in self._files:
            writer = _JsonArrayWriter(self._folder / f"{draft.split}.json")
            self._files[draft.split] = self._stack.enter_context(writer)
        for question in questions:
            self._files[draft.split].write({"qid": question["qid"], "image_name": draft.image_id} | question)

    def __enter__(self) -> "_VQAWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)
