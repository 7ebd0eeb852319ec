"""The slake converter (SLAKE) and its VQA records."""

import json
from pathlib import Path

import pytest
from converter_helpers import boxes, make_slake_release, reasons, run

from regionmed_clip.data.schema import SPLITS


@pytest.fixture
def slake_root(tmp_path: Path) -> Path:
    return make_slake_release(tmp_path / "Slake1.0")


def test_slake_folder(tmp_path, slake_root):
    out = tmp_path / "out"
    stats, rows = run("slake", slake_root, None, out)
    assert stats.rows_written == {"train": 2, "validation": 1, "test": 1}
    assert reasons(stats) == {
        "missing image": 1,
        "region dropped: malformed detection.json entry": 1,
        "region dropped: zero-area or inverted box": 1,
        "question skipped: no row for image 'xmlab3/source.jpg' (missing or undecodable)": 1,  # its English qid 15
    }
    assert stats.questions_skipped == 1
    ct = rows["xmlab0/source.jpg"]
    assert (ct["modality"], ct["split"]) == ("ct", "train")
    assert boxes(ct) == [[10, 12, 30, 28], [40, 20, 50, 32], [38, 36, 50, 46]]
    assert ct["labels"] == ["Liver", "Spleen", "Left Kidney"]
    assert ct["summary_caption"] == "CT scan of the abdomen."
    assert ct["report_caption"] == "The liver, the spleen and the left kidney are seen."
    assert ct["regions"][0]["caption"] == "liver in the upper left of the image"
    mri = rows["xmlab1/source.jpg"]  # detection.json as a single {organ: box} dict
    assert mri["modality"] == "mri" and boxes(mri) == [[8, 8, 56, 56]]
    xray = rows["xmlab2/source.jpg"]  # no detection.json
    assert (xray["modality"], xray["split"], xray["regions"]) == ("chest_xray", "validation", [])
    assert xray["report_caption"] == "The chest heart is seen."
    assert rows["xmlab1/source.jpg"]["report_caption"] == "The brain tissue is seen."
    assert boxes(rows["xmlab4/source.jpg"]) == [[20, 40, 44, 52]]

    vqa = {split: json.loads((out / "vqa" / f"{split}.json").read_text(encoding="utf-8")) for split in SPLITS}
    # English only, and none about xmlab3, whose image is missing
    assert [record["qid"] for record in vqa["train"]] == [11, 14, 13]
    assert [record["qid"] for record in vqa["validation"]] == [21]
    assert [record["qid"] for record in vqa["test"]] == [31]
    assert vqa["train"][0] == {
        "qid": 11, "image_name": "xmlab0/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver",
        "answer_type": "OPEN", "question_type": "Abnormality", "phrase_type": "freeform", "image_organ": "Abdomen"}
    assert not list((out / "vqa").glob("*.partial"))


def test_slake_single_file_split_from_name(tmp_path, slake_root):
    stats, rows = run("slake", slake_root / "validate.json", None, tmp_path / "out")
    assert stats.rows_written == {"validation": 1} and list(rows) == ["xmlab2/source.jpg"]
    assert [r["qid"] for r in json.loads((tmp_path / "out/vqa/validation.json").read_text())] == [21]
