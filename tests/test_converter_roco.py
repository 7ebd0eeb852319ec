"""The roco converter (ROCO): captions.txt, dlinks.txt and the release's image names."""

import logging
import shutil
from pathlib import Path

import pytest
from converter_helpers import FIXTURES, reasons, run, write_corrupt, write_image

from regionmed_clip.data import converters
from regionmed_clip.data.converters import roco


def test_roco(tmp_path):
    images = tmp_path / "images"
    for name in ("ROCO_00002", "ROCO_00003", "ROCO_00010", "ROCO_00020"):
        write_image(images / f"{name}.jpg")
    write_corrupt(images / "ROCO_00005.jpg")  # ROCO_00004 is missing
    stats, rows = run("roco", FIXTURES / "roco/data", images, tmp_path / "out")
    assert stats.rows_written == {"train": 2, "validation": 1, "test": 1}
    assert reasons(stats) == {"missing image": 1, "undecodable image": 1, "malformed captions line": 1}
    first = rows["ROCO_00002"]
    # the space after the tab is stripped
    assert first["report_caption"] == ("Computed tomography of the chest showing a right upper lobe mass. "
                                       "Note the small pleural effusion.")
    assert first["summary_caption"] == "Computed tomography of the chest showing a right upper lobe mass."
    assert (first["modality"], first["regions"], first["labels"]) == ("radiology", [], [])
    assert rows["ROCO_00010"]["split"] == "validation"
    # a dataset caption no negative rule applies to keeps no negatives
    assert rows["ROCO_00003"]["negative_captions"] == []
    assert (rows["ROCO_00020"]["split"], rows["ROCO_00020"]["modality"]) == ("test", "non_radiology")


def test_roco_single_file(tmp_path):
    images = tmp_path / "images"
    write_image(images / "ROCO_00010.jpg")
    stats, rows = run("roco", FIXTURES / "roco/data/validation/radiology/captions.txt", images, tmp_path / "out")
    assert stats.rows_written == {"validation": 1}
    assert rows["ROCO_00010"]["report_caption"] == "Chest radiograph with a left pneumothorax."


@pytest.fixture
def roco_release(tmp_path) -> Path:
    """A copy of the release-layout fixture (captions.txt + dlinks.txt per split folder) to write images into."""
    root = tmp_path / "roco"
    shutil.copytree(FIXTURES / "roco_release", root)
    return root / "data"


def test_roco_release_layout_default_images(roco_release, tmp_path, caplog):
    train = roco_release / "train/radiology/images"
    write_image(train / "PMC4327453_kju-56-811-g001.jpg", (48, 32))  # as scripts/fetch.py saves it
    write_image(train / "gr1.jpg", (40, 40))  # the bare dlinks name (a mirror without the PMC prefix)
    write_image(train / "ROCO_00033.png")  # a mirror renaming by id: its dlinks name is not on disk
    # ROCO_00034's image is missing; validation/non-radiology's image is named as fetch.py does too
    write_image(roco_release / "validation/non-radiology/images/PMC3286503_10561_2011_9244_Fig1_HTML.jpg")
    write_image(roco_release / "ROCO_00034.jpg")  # the input folder itself is not looked in
    caplog.set_level(logging.DEBUG, logger=converters.__name__)
    stats, rows = run("roco", roco_release, None, tmp_path / "out")
    assert stats.rows_written == {"train": 3, "validation": 1}
    assert reasons(stats) == {"missing image": 1}
    assert rows["ROCO_00031"]["image"].size == (48, 32) and rows["ROCO_00032"]["image"].size == (40, 40)
    assert rows["ROCO_00031"]["report_caption"] == "Computed tomography of the abdomen showing a left renal mass."
    assert (rows["ROCO_00041"]["split"], rows["ROCO_00041"]["modality"]) == ("validation", "non_radiology")
    # the skip names the id and every path tried, in order
    [message] = [record.getMessage() for record in caplog.records
                 if record.levelno == logging.DEBUG and "ROCO_00034" in record.getMessage()]
    assert "missing image" in message
    for name in ("PMC3280110_pone.0031179.g007.jpg", "pone.0031179.g007.jpg", "ROCO_00034.jpg", "ROCO_00034.png"):
        assert str(train / name) in message


def test_roco_release_layout_given_images(roco_release, tmp_path):
    """--images replaces the per-split images/ folders; names come from each split's dlinks.txt."""
    images = tmp_path / "flat"
    write_image(images / "PMC3015224_gr1.jpg")
    write_image(images / "ROCO_00033.jpg")
    write_image(images / "PMC3286503_10561_2011_9244_Fig1_HTML.jpg")
    write_image(roco_release / "train/radiology/images/PMC4327453_kju-56-811-g001.jpg")  # not looked at
    stats, rows = run("roco", roco_release, images, tmp_path / "out")
    assert sorted(rows) == ["ROCO_00032", "ROCO_00033", "ROCO_00041"]
    assert reasons(stats) == {"missing image": 2}


def test_roco_release_single_captions_file(roco_release, tmp_path):
    """A captions.txt given alone still reads the dlinks.txt and images/ beside it."""
    write_image(roco_release / "validation/non-radiology/images/PMC3286503_10561_2011_9244_Fig1_HTML.jpg")
    stats, rows = run("roco", roco_release / "validation/non-radiology/captions.txt", None, tmp_path / "out")
    assert stats.rows_written == {"validation": 1} and list(rows) == ["ROCO_00041"]


def test_roco_dlinks_parsing(tmp_path):
    dlinks = tmp_path / "dlinks.txt"
    dlinks.write_text(
        "ROCO_00001\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/cb/dd/PMC4327453.tar.gz -P /path/to/Dir"
        "\tpone.0031179.g007.jpg\n"
        "ROCO_00002\tgr1.jpg\n"  # no download column: the name alone
        "\n"
        "ROCO_00003\n",  # no image name: ignored
        encoding="utf-8",
    )
    links = roco._roco_dlinks(dlinks)
    assert links == {"ROCO_00001": ("PMC4327453", "pone.0031179.g007.jpg"), "ROCO_00002": (None, "gr1.jpg")}
    assert roco._roco_dlinks(tmp_path / "absent.txt") == {}
    assert roco._roco_candidates("ROCO_00002", links["ROCO_00002"], tmp_path) == [
        tmp_path / "gr1.jpg", tmp_path / "ROCO_00002.jpg", tmp_path / "ROCO_00002.png"]


def test_roco_an_id_listed_twice(tmp_path):
    """The shared duplicate rule: the same line twice keeps one (counted); two captions for one id keep none."""
    folder = tmp_path / "data" / "train" / "radiology"
    for name in ("ROCO_1", "ROCO_2", "ROCO_3"):
        write_image(folder / "images" / f"{name}.jpg")
    (folder / "captions.txt").write_text("ROCO_1\t A CT of the chest.\nROCO_1\t A CT of the chest.\n"
                                         "ROCO_2\t An MRI of the knee.\nROCO_2\t An X-ray of the hand.\n"
                                         "ROCO_3\t An ultrasound of the liver.\n")
    stats, rows = run("roco", tmp_path / "data", None, tmp_path / "out")
    assert sorted(rows) == ["ROCO_1", "ROCO_3"]
    assert reasons(stats) == {"duplicate ROCO id": 1, "ROCO id listed twice, disagreeing": 1}
