import json
from pathlib import Path

import pytest

from regionmed_clip.data.cli import main
from regionmed_clip.data.schema import load_canonical

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
    from regionmed_clip.data.cli import main

    annotations = tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv"
    annotations.write_text("dicom_id,path,label_text,category_name,x,y,w,h,image_width,image_height\n")
    assert main(["convert", "--format", "ms-cxr", "--input", str(annotations), "--output", str(tmp_path / "out"),
                 "--modality", "ct"]) == 2
    error = capsys.readouterr().err
    assert "format 'ms-cxr' takes no option ['modality']" in error and "Traceback" not in error


# -- a killed run (issue 21, item 4) ------------------------------------------------------------------------------

KILLED_SYNTH = """
import os, signal, sys
import regionmed_clip.data.synthetic as synthetic
real = synthetic._generate
def dies_after_five(*args, **kwargs):
    for index, item in enumerate(real(*args, **kwargs)):
        if index == 5:
            os.kill(os.getpid(), signal.SIGKILL)  # no handler, no finally: as `kill -9` mid-write
        yield item
synthetic._generate = dies_after_five
synthetic.write_synthetic_dataset(sys.argv[1], n=20, image_size=64, rows_per_shard=2)
"""


def test_a_killed_synth_leaves_nothing_that_stays(tmp_path, capsys):
    """SIGKILL mid-write leaves only a hidden staging folder beside the output (never the output); the next run
    writing that output removes it and writes a complete dataset."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED_SYNTH, str(out)], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    [staging] = tmp_path.glob(".killed.partial-*")  # beside the output, never inside it
    assert list(staging.glob("train-*.parquet"))  # shards were flushed before the kill
    assert main(["synth", "--n", "4", "--image-size", "64", "--output", str(out)]) == 0
    assert list(tmp_path.glob(".killed.partial-*")) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["killed"]
    assert sum(json.loads(capsys.readouterr().out)["rows"].values()) == 4
    assert not (out / ".staging.lock").exists()


def test_a_living_runs_staging_folder_is_left_alone(tmp_path):
    """Only dead runs' staging folders are removed: one whose lock is held (a run still writing) is kept."""
    fcntl = pytest.importorskip("fcntl")
    from regionmed_clip.data.schema import STAGING_LOCK, remove_stale_staging

    living, dead = tmp_path / ".out.partial-living", tmp_path / ".out.partial-dead"
    for folder in (living, dead):
        folder.mkdir()
        (folder / STAGING_LOCK).write_text("1\n")
    other = tmp_path / ".other.partial-x"  # another output's: not ours to judge
    other.mkdir()
    with open(living / STAGING_LOCK) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert remove_stale_staging(tmp_path / "out") == [dead]
    assert living.is_dir() and other.is_dir() and not dead.exists()


def test_a_failed_synth_leaves_nothing(tmp_path, monkeypatch, capsys):
    """An error inside the writer (not a kill) removes the staging folder at once."""
    import regionmed_clip.data.synthetic as synthetic

    real = synthetic._generate

    def fails_after_three(*args, **kwargs):
        for index, item in enumerate(real(*args, **kwargs)):
            if index == 3:
                raise OSError("disk full")
            yield item

    monkeypatch.setattr(synthetic, "_generate", fails_after_three)
    assert main(["synth", "--n", "10", "--image-size", "64", "--rows-per-shard", "1",
                 "--output", str(tmp_path / "out")]) == 1
    assert "disk full" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
