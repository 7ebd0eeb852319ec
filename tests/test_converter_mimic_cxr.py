"""The mimic-cxr converter (MIMIC-CXR-JPG)."""

import gzip
import shutil
from pathlib import Path

import pytest
from converter_helpers import FIXTURES, reasons, run, write_image

from regionmed_clip.data.converters import SkipCounter, iter_rows

MIMIC = FIXTURES / "mimic_cxr"
MIMIC_FILES = ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-split.csv")
# dicom_id -> the image's folder under files/; a1e3b1a2's image is missing
MIMIC_IMAGES = {
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014": "p10/p10000032/s50414267",
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962": "p10/p10000032/s50414267",
    "fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818": "p10/p10000764/s57375967",
    "b2f4c2b3-1c5d2f6e-0c9b8d7e-6f5a4b3c-2d1e0f9a": "p10/p10000764/s57375967",
    "c3a5d3c4-2d6e3a7f-1d0c9e8f-7a6b5c4d-3e2f1a0b": "p10/p10000898/s50771383",
    "d4b6e4d5-3e7f4b8a-2e1d0f9a-8b7c6d5e-4f3a2b1c": "p10/p10000935/s50578979",
    "e5c7f5e6-4f8a5c9b-3f2e1a0b-9c8d7e6f-5a4b3c2d": "p10/p10001176/s53186264",
}
MIMIC_SKIPS = {
    "missing image": 1,
    "image not in the split file": 1,  # b2f4c2b3
    "unknown label value Pleural Effusion='1.5'": 1,  # study 50578979, counted once
    "study without images in the metadata": 1,  # study 51967283
    "image of a study without labels": 1,  # e5c7f5e6
}


@pytest.fixture
def mimic_root(tmp_path: Path) -> Path:
    """The MIMIC-CXR-JPG layout: the CSVs beside files/."""
    root = shutil.copytree(MIMIC, tmp_path / "mimic-cxr-jpg")
    for dicom_id, folder in MIMIC_IMAGES.items():
        write_image(root / "files" / folder / f"{dicom_id}.jpg")
    return root


@pytest.mark.parametrize("gzipped", [False, True], ids=["csv", "csv.gz"])
def test_mimic_cxr_study_labels_fan_out_to_images(tmp_path, mimic_root, gzipped):
    label_file = mimic_root / MIMIC_FILES[0]
    if gzipped:  # as PhysioNet ships them
        for name in MIMIC_FILES:
            with open(mimic_root / name, "rb") as source, gzip.open(mimic_root / f"{name}.gz", "wb") as target:
                shutil.copyfileobj(source, target)
            (mimic_root / name).unlink()
        label_file = mimic_root / f"{MIMIC_FILES[0]}.gz"
    stats, rows = run("mimic-cxr", label_file, None, tmp_path / "out")
    assert stats.rows_written == {"train": 2, "validation": 1, "test": 1}
    assert reasons(stats) == MIMIC_SKIPS
    assert {image_id: (row["split"], row["labels"], row["uncertain_labels"]) for image_id, row in rows.items()} == {
        # both images of study 50414267 (PA and lateral) get its labels
        "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014": ("train", ["No Finding"], []),
        "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962": ("train", ["No Finding"], []),
        # 1.0 / -1.0 / 0.0 / blank; "validate" -> validation
        "fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818": ("validation", ["Consolidation"], ["Pneumonia"]),
        # 1 / -1 / 0
        "c3a5d3c4-2d6e3a7f-1d0c9e8f-7a6b5c4d-3e2f1a0b": ("test", ["Edema"], ["Cardiomegaly"]),
    }
    assert rows["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]["report_caption"] == "No abnormality is seen."
    assert rows["fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818"]["summary_caption"] == "Chest X-ray with consolidation."


def test_mimic_cxr_without_split_file_and_frontal_only(tmp_path, mimic_root):
    stats, rows = run("mimic-cxr", mimic_root / MIMIC_FILES[0], mimic_root, tmp_path / "out", frontal_only=True)
    assert sorted(rows) == ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
                            "c3a5d3c4-2d6e3a7f-1d0c9e8f-7a6b5c4d-3e2f1a0b",
                            "fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818"]
    # the LATERAL and LL views are counted; the missing image is the LL one, not looked for any more
    frontal_skips = {key: count for key, count in MIMIC_SKIPS.items() if key != "missing image"}
    assert reasons(stats) == {**frontal_skips, "not a frontal view": 2}

    (mimic_root / MIMIC_FILES[2]).unlink()
    stats, rows = run("mimic-cxr", mimic_root / MIMIC_FILES[0], None, tmp_path / "no_split")
    assert stats.rows_written == {"train": 5}  # b2f4c2b3 is kept now
    assert reasons(stats) == {key: count for key, count in MIMIC_SKIPS.items() if key != "image not in the split file"}


def test_mimic_cxr_needs_the_metadata_and_one_label_row_per_study(tmp_path, mimic_root):
    lines = (MIMIC / MIMIC_FILES[0]).read_text().splitlines()
    (mimic_root / MIMIC_FILES[0]).write_text("\n".join([*lines, lines[1].replace(",1.0,", ",0.0,")]) + "\n")
    stats, rows = run("mimic-cxr", mimic_root / MIMIC_FILES[0], None, tmp_path / "out")
    assert "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014" not in rows  # two label rows disagree: not guessed
    assert reasons(stats)["study (label row) listed twice, disagreeing"] == 1
    # the same label row twice: a duplicate, the study kept once (the shared rule, `rows._listed_once`)
    (mimic_root / MIMIC_FILES[0]).write_text("\n".join([*lines, lines[1]]) + "\n")
    stats, rows = run("mimic-cxr", mimic_root / MIMIC_FILES[0], None, tmp_path / "duplicate")
    assert "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014" in rows
    assert reasons(stats)["duplicate study (label row)"] == 1
    (mimic_root / MIMIC_FILES[1]).unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        list(iter_rows("mimic-cxr", mimic_root / MIMIC_FILES[0], None, skipped=SkipCounter()))
