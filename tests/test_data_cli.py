import json

import pytest

from training_scripts.data_cli import main
from training_scripts.data_schema import load_canonical


def test_synth_and_to_disk(tmp_path, capsys):
    assert main(["synth", "--n", "12", "--seed", "1", "--output", str(tmp_path / "synth")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["rows"].values()) == 12 and (tmp_path / "synth" / "vqa" / "train.json").exists()
    assert main(["to-disk", "--input", str(tmp_path / "synth"), "--output", str(tmp_path / "arrow")]) == 0
    assert len(load_canonical(tmp_path / "arrow", "train")) == summary["rows"]["train"]


def test_convert_a_coco_file(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (40, 30)).save(images / "a.png")
    annotations = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                   "annotations": [{"image_id": 1, "bbox": [2, 3, 10, 8], "category_id": 5}],
                   "categories": [{"id": 5, "name": "nodule"}]}
    (tmp_path / "val.json").write_text(json.dumps(annotations))
    code = main(["convert", "--format", "coco", "--input", str(tmp_path / "val.json"), "--images", str(images),
                 "--output", str(tmp_path / "out"), "--split", "test", "--modality", "ct"])
    assert code == 0
    row = load_canonical(tmp_path / "out", "test")[0]
    assert row["modality"] == "ct" and row["regions"][0]["bbox"] == [2, 3, 12, 11]


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["convert", "--format", "coco", "--input", str(tmp_path / "missing.json"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "--format", "not-a-format", "--input", "x", "--output", "y"])
