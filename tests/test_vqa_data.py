"""Reading the VQA sidecar `vqa/{split}.json` of all three writers: the vqa-rad and slake converters and the
synthetic generator."""

import json
from pathlib import Path

import pytest
from converter_helpers import VQA_RAD_SPLITS, make_slake_release, make_vqa_rad_release
from PIL import Image

from regionmed_clip.data.converters import convert
from regionmed_clip.data.schema import load_canonical
from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.data.vqa import ANSWER_TYPES, VQAExample, load_vqa_examples, resolve_image_name, vqa_images


def split_ids(data_dir: Path, split: str) -> set[str]:
    return set(load_canonical(data_dir, split, decode_images=False)["image_id"])


@pytest.fixture(scope="module")
def vqa_rad_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa_rad")
    convert("vqa-rad", make_vqa_rad_release(root / "release"), None, root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(out, n=20, image_size=64)
    return out


def test_answer_types_are_the_scorers():
    from regionmed_clip import scoring

    assert ANSWER_TYPES is scoring.ANSWER_TYPES == ("closed", "open")


def test_vqa_rad_output(vqa_rad_data):
    for split, qids in VQA_RAD_SPLITS.items():
        examples = load_vqa_examples(vqa_rad_data, split)
        assert [example.question_id for example in examples] == [str(qid) for qid in qids]
        assert {example.image_id for example in examples} == split_ids(vqa_rad_data, split)
    test = load_vqa_examples(vqa_rad_data, "test")
    assert test[0] == VQAExample("1", "test/synpic100.jpg", "Is there a mass in the right lung?", "Yes", "closed")
    assert [example.answer_type for example in test] == ["closed"] * 3 + ["open"] * 3
    assert load_vqa_examples(vqa_rad_data, "train")[0].answer == "right lung"


def test_synthetic_output_resolves_without_the_extension(synth_data):
    for split in ("train", "validation", "test"):
        records = json.loads((synth_data / "vqa" / f"{split}.json").read_text())
        examples = load_vqa_examples(synth_data, split)
        assert len(examples) == len(records) > 0
        ids = split_ids(synth_data, split)
        for example, record in zip(examples, records, strict=True):
            assert example.image_id in ids and record["image_name"] == f"{example.image_id}.png"
            assert example.answer_type == record["answer_type"].lower() and example.answer == record["answer"]
        assert {example.answer_type for example in examples} == set(ANSWER_TYPES)


def test_slake_output_and_english_filter(tmp_path):
    data = tmp_path / "data"
    convert("slake", make_slake_release(tmp_path / "Slake1.0"), None, data)
    train = load_vqa_examples(data, "train")
    assert [(e.question_id, e.image_id, e.answer_type) for e in train] == [
        ("11", "xmlab0/source.jpg", "open"), ("14", "xmlab0/source.jpg", "open"), ("13", "xmlab1/source.jpg", "closed")]
    # records carrying a language field: only English ones are kept
    path = data / "vqa" / "train.json"
    records = json.loads(path.read_text())
    records[0]["q_lang"], records[1]["q_lang"] = "zh", "en"
    path.write_text(json.dumps(records))
    assert [e.question_id for e in load_vqa_examples(data, "train")] == ["14", "13"]


def test_resolve_image_name_rule():
    ids = {"a/b.jpg", "synth-0-000001", "x.png", "x"}
    assert resolve_image_name("a/b.jpg", ids) == "a/b.jpg"
    assert resolve_image_name("synth-0-000001.png", ids) == "synth-0-000001"
    assert resolve_image_name("x.png", ids) == "x.png"  # an exact match wins over the stripped name
    assert resolve_image_name("a/b", ids) is None and resolve_image_name("synth-0-000001", {"synth"}) is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda records: records[1].pop("question"), r"record 1: field 'question'"),
        (lambda records: records[2].update(answer="  "), r"record 2: field 'answer'"),
        (lambda records: records[0].update(answer_type="YESNO"), r"record 0: field 'answer_type' .*'YESNO'"),
        (lambda records: records[3].update(image_name="nope.jpg"), r"record 3: field 'image_name' 'nope.jpg'"),
        (lambda records: records[4].update(qid=records[0]["qid"]), r"record 4: field 'qid' .*repeats record 0"),
        (lambda records: records.__setitem__(1, "text"), r"record 1: must be a JSON object"),
    ],
)
def test_record_errors_name_file_index_and_field(synth_data, tmp_path, edit, message):
    data = tmp_path / "data"
    data.mkdir()
    for shard in synth_data.glob("train-*.parquet"):
        (data / shard.name).symlink_to(shard)
    records = json.loads((synth_data / "vqa" / "train.json").read_text())
    edit(records)
    path = data / "vqa" / "train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=message) as error:
        load_vqa_examples(data, "train")
    assert str(path) in str(error.value)


def test_file_errors(synth_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vqa/test\.json"):
        load_vqa_examples(tmp_path, "test")
    path = tmp_path / "vqa" / "test.json"
    path.parent.mkdir()
    path.write_text('{"qid": 1}')
    with pytest.raises(ValueError, match="must hold a JSON list") as error:
        load_vqa_examples(tmp_path, "test")
    assert str(path) in str(error.value)


def test_vqa_images(vqa_rad_data):
    images = vqa_images(vqa_rad_data, "test", ["test/synpic400.jpg", "test/synpic100.jpg"])
    assert sorted(images) == ["test/synpic100.jpg", "test/synpic400.jpg"]
    assert all(isinstance(image, Image.Image) and image.size == (48, 40) for image in images.values())
    assert vqa_images(vqa_rad_data, "test", []) == {}
    with pytest.raises(ValueError, match=r"'train/synpic100.jpg'.*split 'test'|split 'test'.*'train/synpic100.jpg'"):
        vqa_images(vqa_rad_data, "test", ["test/synpic100.jpg", "train/synpic100.jpg"])
