import json
from pathlib import Path

import pytest

from training_scripts.data_cli import main
from training_scripts.data_schema import load_canonical

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


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



def test_convert_chexpert_frontal_only(tmp_path, capsys):
    from PIL import Image

    header, frontal = (FIXTURES / "chexpert/CheXpert-v1.0-small/valid.csv").read_text().splitlines()
    lateral = frontal.replace("view1_frontal", "view2_lateral").replace(",Frontal,AP,", ",Lateral,,")
    root = tmp_path / "CheXpert-v1.0-small"
    for line in (frontal, lateral):
        image = root / line.split(",")[0].removeprefix("CheXpert-v1.0-small/")
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 30)).save(image)
    (root / "valid.csv").write_text("\n".join([header, frontal, lateral]) + "\n")
    code = main(["convert", "--format", "chexpert", "--input", str(root), "--output", str(tmp_path / "out"),
                 "--frontal-only"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == {"validation": 1} and summary["skip_reasons"] == {"not a frontal view": 1}
    row = load_canonical(tmp_path / "out", "validation")[0]
    assert row["image_id"].endswith("view1_frontal.jpg") and row["labels"] == ["No Finding"]


def test_an_option_the_format_does_not_take_is_a_clear_error(tmp_path, capsys):
    from training_scripts.data_cli import main

    annotations = tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv"
    annotations.write_text("dicom_id,path,label_text,category_name,x,y,w,h,image_width,image_height\n")
    assert main(["convert", "--format", "ms-cxr", "--input", str(annotations), "--output", str(tmp_path / "out"),
                 "--modality", "ct"]) == 2
    error = capsys.readouterr().err
    assert "format 'ms-cxr' takes no option ['modality']" in error and "Traceback" not in error
