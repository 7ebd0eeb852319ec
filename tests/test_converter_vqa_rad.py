"""The vqa-rad converter (VQA-RAD): splits by paraphrase group, rows and VQA records."""

import json
import shutil
from pathlib import Path

import pytest
from converter_helpers import VQA_RAD, VQA_RAD_SPLITS, make_vqa_rad_release, reasons, run, write_corrupt, write_image

from regionmed_clip.data.converters import SkipCounter, iter_rows


@pytest.fixture
def vqa_rad_root(tmp_path: Path) -> Path:
    return make_vqa_rad_release(tmp_path / "vqa_rad")


def read_vqa(out: Path) -> dict[str, list[dict]]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted((out / "vqa").glob("*.json"))}


def test_vqa_rad_splits_rows_and_records(tmp_path, vqa_rad_root):
    out = tmp_path / "out"
    stats, rows = run("vqa-rad", vqa_rad_root, None, out)  # the folder; images default to "VQA_RAD Image Folder"
    vqa = read_vqa(out)
    assert {split: [record["qid"] for record in records] for split, records in vqa.items()} == VQA_RAD_SPLITS

    # paraphrase groups never cross splits (blank / NULL linked ids are a group per qid)
    source = json.loads(VQA_RAD.read_text())
    group = {r["qid"]: r["qid_linked_id"] if r["qid_linked_id"] not in (None, "", "NULL") else r["qid"] for r in source}
    split_of = {record["qid"]: split for split, records in vqa.items() for record in records}
    groups = {}
    for qid, split in split_of.items():
        groups.setdefault(group[qid], set()).add(split)
    assert all(len(splits) == 1 for splits in groups.values()), groups

    # one row per image and split with questions, ids unique across the dataset
    assert stats.rows_written == {"train": 3, "validation": 1, "test": 3}
    assert sorted(rows) == ["test/synpic100.jpg", "test/synpic200.jpg", "test/synpic400.jpg", "train/synpic100.jpg",
                            "train/synpic200.jpg", "train/synpic300.jpg", "validation/synpic300.jpg"]
    for split, records in vqa.items():
        assert {record["image_name"] for record in records} <= {i for i, row in rows.items() if row["split"] == split}
    chest = rows["test/synpic100.jpg"]
    assert (chest["modality"], chest["regions"], chest["labels"]) == ("radiology", [], [])
    assert (chest["summary_caption"], chest["report_caption"]) == ("Radiology image of the chest.", "The chest is seen.")
    assert chest["negative_captions"] == ["The chest is not seen."]
    assert rows["train/synpic300.jpg"]["summary_caption"] == "Radiology image of the abdomen."
    assert (chest["image"].width, chest["image"].height) == (48, 40)

    # records: the slake converter's format, answers stripped, answer_type upper-cased
    train = {record["qid"]: record for record in vqa["train"]}
    assert train[4] == {"qid": 4, "image_name": "train/synpic100.jpg", "question": "Where is the mass?",
                        "answer": "right lung", "answer_type": "OPEN", "question_type": "POS", "phrase_type": "freeform",
                        "image_organ": "CHEST"}
    assert train[9]["answer_type"] == "CLOSED"  # "closed " in the file
    assert [record["answer_type"] for record in vqa["test"]] == ["CLOSED"] * 3 + ["OPEN"] * 3

    # skips: the missing image's row and its question, a bad answer_type, an empty answer
    assert stats.rows_skipped == 1 and stats.questions_skipped == 3
    assert reasons(stats) == {
        "missing image": 1,
        "question skipped: no row for image 'train/synpic500.jpg' (missing or undecodable)": 1,
        "question skipped: answer_type 'YES/NO' is not OPEN or CLOSED": 1,
        "question skipped: question without an answer": 1,
    }
    assert not list((out / "vqa").glob("*.partial"))


def test_vqa_rad_file_input_images_option_and_undecodable_image(tmp_path, vqa_rad_root):
    images = shutil.copytree(vqa_rad_root / "VQA_RAD Image Folder", tmp_path / "elsewhere")
    write_corrupt(images / "synpic300.jpg")  # its train and validation rows are skipped, with their questions
    stats, rows = run("vqa-rad", vqa_rad_root / "VQA_RAD Dataset Public.json", images, tmp_path / "out")
    assert stats.rows_written == {"train": 2, "test": 3}
    assert reasons(stats)["undecodable image"] == 2
    assert reasons(stats)["question skipped: no row for image 'train/synpic300.jpg' (missing or undecodable)"] == 1
    assert reasons(stats)["question skipped: no row for image 'validation/synpic300.jpg' (missing or undecodable)"] == 2
    assert [record["qid"] for record in read_vqa(tmp_path / "out")["train"]] == [4, 5, 6, 8]


def test_vqa_rad_validation_fraction_and_forced_split(tmp_path, vqa_rad_root):
    stats, _ = run("vqa-rad", vqa_rad_root, None, tmp_path / "none", validation_fraction=0.0)
    assert [r["qid"] for r in read_vqa(tmp_path / "none")["train"]] == [4, 5, 6, 8, 9, 10, 11]
    assert "validation" not in stats.rows_written
    stats, rows = run("vqa-rad", vqa_rad_root, None, tmp_path / "forced", split="val")
    # one row per image (synpic500's is missing), every kept question in validation
    assert sorted(rows) == [f"validation/synpic{n}.jpg" for n in (100, 200, 300, 400)]
    assert list(read_vqa(tmp_path / "forced")) == ["validation"]
    assert len(read_vqa(tmp_path / "forced")["validation"]) == 13


def test_vqa_rad_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="VQA_RAD Dataset Public.json"):
        iter_rows("vqa-rad", tmp_path, None, skipped=SkipCounter())
    not_a_list = tmp_path / "VQA_RAD Dataset Public.json"
    not_a_list.write_text('{"qid": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        list(iter_rows("vqa-rad", not_a_list, None, skipped=SkipCounter()))


def test_vqa_rad_questions_sharing_a_qid(tmp_path):
    """The shared duplicate rule on questions: an identical repeat is written once, disagreeing ones not at all."""
    root = tmp_path / "vqa"
    write_image(root / "VQA_RAD Image Folder" / "a.jpg")
    question = {"qid": 1, "image_name": "a.jpg", "question": "Is it?", "answer": "yes", "answer_type": "CLOSED",
                "phrase_type": "freeform", "qid_linked_id": "", "image_organ": "CHEST"}
    records = [question, dict(question), {**question, "qid": 2}, {**question, "qid": 2, "answer": "no"},
               {**question, "qid": 3}]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    stats, rows = run("vqa-rad", root, None, tmp_path / "out", split="train")
    written = json.loads((tmp_path / "out" / "vqa" / "train.json").read_text())
    assert [record["qid"] for record in written] == [1, 3]
    assert reasons(stats) == {"question skipped: duplicate qid": 1, "question skipped: qid listed twice, disagreeing": 1}
