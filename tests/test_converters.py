"""Dataset converters on hand-written fixtures in the public formats (tests/fixtures/formats/).

The annotation files are committed; the images are generated per test (tiny PNG/JPEG files, DICOMs built
with pydicom), including a missing and a corrupt image where a format's skip handling is checked.
"""

import gzip
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training_scripts import converters
from training_scripts.converters import CONVERTERS, ConversionStats, SkipCounter, convert, iter_rows
from training_scripts.data_schema import SPLITS, load_canonical, validate_row

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
# Formats whose captions may be ones no hard-negative rule applies to: ROCO's own text, "Chest X-ray." for a
# labeler row without a positive class.
NEGATIVES_OPTIONAL = {"roco", "chexpert", "mimic-cxr"}


# ---------------------------------------------------------------------------------------------------------------
# Helpers: images and running a conversion
# ---------------------------------------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A grayscale gradient image (W, H) = size, PNG or JPEG by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 4)
    return path


def write_dicom(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A minimal valid 12-bit MONOCHROME2 secondary-capture DICOM with a window."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), pydicom.Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = (np.add.outer(np.arange(height), np.arange(width)) * 16 % 4096).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def run(fmt: str, input_path: Path, images_dir: Path | None, out: Path, **options) -> tuple[ConversionStats, dict]:
    """convert() then read every split back with load_canonical: {image_id: row}."""
    stats = convert(fmt, input_path, images_dir, out, rows_per_shard=2, **options)
    rows = {}
    for split in SPLITS:
        if any(out.glob(f"{split}-*.parquet")):
            for row in load_canonical(out, split):
                assert row["split"] == split
                rows[row["image_id"]] = row
    assert len(rows) == sum(stats.rows_written.values())
    for row in rows.values():
        check_row(row, negatives_required=fmt not in NEGATIVES_OPTIONAL)
    return stats, rows


def check_row(row: dict, negatives_required: bool = True) -> None:
    """What every converted row must satisfy."""
    validate_row(row)
    assert row["summary_caption"].strip() and row["report_caption"].strip()
    assert row["negative_captions"] or not negatives_required, row["report_caption"]
    assert all(negative != row["report_caption"] for negative in row["negative_captions"])
    for region in row["regions"]:
        assert region["caption"].strip() and region["label"].strip()
        x0, y0, x1, y1 = region["bbox"]
        assert 0 <= x0 < x1 <= row["image"].width and 0 <= y0 < y1 <= row["image"].height


def boxes(row: dict) -> list[list[float]]:
    return [region["bbox"] for region in row["regions"]]


def reasons(stats: ConversionStats) -> dict[str, int]:
    return dict(stats.skip_reasons)


# ---------------------------------------------------------------------------------------------------------------
# MS-CXR
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ms_cxr_images(tmp_path: Path) -> Path:
    images = tmp_path / "mimic-cxr-jpg"
    for dicom_id, folder in (("d1", "p10/p10000032/s50414267"), ("d2", "p11/p11000011/s51029426"),
                             ("d3", "p12/p12000012/s52000001")):
        write_image(images / "files" / folder / f"{dicom_id}.jpg")
    return images  # d4 is missing


def test_ms_cxr_v1_0_0(tmp_path, ms_cxr_images):
    stats, rows = run("ms-cxr", FIXTURES / "ms_cxr/MS_CXR_Local_Alignment_v1.0.0.csv", ms_cxr_images, tmp_path / "out")
    assert stats.rows_written == {"train": 3}  # v1.0.0 has no split column
    assert reasons(stats) == {"missing image": 1, "region dropped: zero-area or inverted box": 1}
    assert (stats.rows_skipped, stats.regions_dropped) == (1, 1)

    d1 = rows["d1"]
    assert d1["image"].size == (64, 64) and d1["modality"] == "chest_xray"
    # x,y,w,h -> xyxy; the CSV rows of d1 are not contiguous, grouping keeps their order
    assert boxes(d1) == [[40, 4, 60, 16], [4, 44, 24, 60], [44, 16, 56, 22]]
    assert [r["caption"] for r in d1["regions"]] == ["small left apical pneumothorax", "right basal consolidation",
                                                     "small left apical pneumothorax"]
    assert [r["label"] for r in d1["regions"]] == ["Pneumothorax", "Consolidation", "Pneumothorax"]
    assert d1["labels"] == ["Pneumothorax", "Consolidation"]
    assert d1["report_caption"] == "Small left apical pneumothorax. Right basal consolidation."
    assert d1["summary_caption"] == "Chest X-ray with pneumothorax and consolidation."
    # declared 128x128, stored 64x64: the box is rescaled onto the stored image
    assert boxes(rows["d2"]) == [[16, 20, 40, 35]]
    # the zero-area box is dropped, the other box of d3 is kept
    assert boxes(rows["d3"]) == [[10, 10, 40, 30]]


def test_ms_cxr_v1_1_0_splits(tmp_path, ms_cxr_images):
    stats, rows = run("ms-cxr", FIXTURES / "ms_cxr/MS_CXR_Local_Alignment_v1.1.0.csv", ms_cxr_images, tmp_path / "out")
    assert stats.rows_written == {"train": 1, "validation": 1, "test": 1}
    assert {image_id: row["split"] for image_id, row in rows.items()} == {
        "d1": "train", "d2": "validation", "d3": "test"}
    assert stats.rows_skipped == 0 and not stats.skip_reasons


def test_ms_cxr_invalid_split_and_missing_id_are_skipped(tmp_path, ms_cxr_images):
    lines = (FIXTURES / "ms_cxr/MS_CXR_Local_Alignment_v1.1.0.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",test", ",holdout")  # d3: not a canonical split -> validate_row fails
    lines.append(",Edema,edema,files/x.jpg,1,1,5,5,64,64,train")  # no dicom_id
    csv_path = tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    stats, rows = run("ms-cxr", csv_path, ms_cxr_images, tmp_path / "out")
    assert sorted(rows) == ["d1", "d2"]
    assert reasons(stats) == {"invalid row": 1, "annotation without an image id": 1}


# ---------------------------------------------------------------------------------------------------------------
# VinDr-CXR
# ---------------------------------------------------------------------------------------------------------------


def test_vindr_cxr_fusion_no_finding_and_skips(tmp_path):
    images = tmp_path / "train"
    write_image(images / "img_a.png")
    write_dicom(images / "img_b.dicom")
    write_image(images / "img_c.jpg")
    write_corrupt(images / "img_e.png")
    write_image(images / "img_f.png")  # img_d is missing
    stats, rows = run("vindr-cxr", FIXTURES / "vindr_cxr/train.csv", images, tmp_path / "out")

    assert stats.rows_written == {"train": 4}
    assert reasons(stats) == {
        "missing image": 1,
        "undecodable image": 1,
        "region dropped: zero-area or inverted box": 1,
        "region dropped: missing or invalid coordinates": 1,
    }
    # img_a, Nodule/Mass: R8 [10,10,30,30] and R9 [12,12,32,32] have IoU 324/476 = 0.68 -> mean [11,11,31,31];
    # R10 [40,40,50,50] does not overlap -> its own box. Pleural effusion: the three boxes (IoU 0.82, then 0.75
    # with the running mean) fuse into the mean [5,30,20,60].
    a = rows["img_a"]
    assert a["labels"] == ["Nodule/Mass", "Pleural effusion"]
    assert boxes(a) == [[11, 11, 31, 31], [40, 40, 50, 50], [5, 30, 20, 60]]
    assert [r["label"] for r in a["regions"]] == ["Nodule/Mass", "Nodule/Mass", "Pleural effusion"]
    # box centres: (21, 21) image-left upper third -> patient's right upper zone
    assert [r["caption"] for r in a["regions"]] == [
        "nodule/mass in the right upper zone", "nodule/mass in the left lower zone",
        "pleural effusion in the right lower zone"]
    assert a["summary_caption"] == "Chest X-ray with nodule/mass and pleural effusion."
    assert a["report_caption"].startswith("Nodule/mass in the right upper zone.")

    # all three readers: "No finding" with empty coordinates; the DICOM is stored as a PNG of the same size
    b = rows["img_b"]
    assert b["labels"] == ["No finding"] and b["regions"] == []
    assert b["image"].format == "PNG" and b["image"].size == (64, 64)
    assert b["summary_caption"] == "Chest X-ray with no finding."

    # Cardiomegaly: IoU 360/600 = 0.6 -> mean [23,30,47,50]; Lung Opacity: IoU 50/150 = 1/3 < 0.4 -> kept apart.
    # One reader's "No finding" does not make it into the labels next to findings.
    c = rows["img_c"]
    assert c["labels"] == ["Cardiomegaly", "Lung Opacity"]
    assert boxes(c) == [[23, 30, 47, 50], [0, 0, 10, 10], [5, 0, 15, 10]]

    # a zero-area box and empty coordinates of a finding: regions dropped, labels kept
    f = rows["img_f"]
    assert f["labels"] == ["Other lesion", "Atelectasis"] and f["regions"] == []


def test_fuse_boxes_threshold_is_inclusive():
    # IoU exactly 0.4: [0,0,10,10] vs [0,0,10,4] -> 40 / 100
    assert converters._fuse_boxes([[0, 0, 10, 10], [0, 0, 10, 4]]) == [[0, 0, 10, 7]]
    assert converters._fuse_boxes([[0, 0, 10, 10], [0, 0, 10, 3.9]]) == [[0, 0, 10, 10], [0, 0, 10, 3.9]]


# ---------------------------------------------------------------------------------------------------------------
# RSNA Pneumonia
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def rsna_images(tmp_path: Path) -> Path:
    images = tmp_path / "stage_2_train_images"
    for patient in ("p1", "p2", "p3"):
        write_dicom(images / f"{patient}.dcm")
    return images  # p4 is missing


def test_rsna_pneumonia_with_class_info(tmp_path, rsna_images):
    stats, rows = run("rsna-pneumonia", FIXTURES / "rsna_pneumonia/stage_2_train_labels.csv", rsna_images,
                      tmp_path / "out")
    assert stats.rows_written == {"train": 3} and reasons(stats) == {"missing image": 1}
    assert rows["p1"]["labels"] == ["Normal"] and rows["p1"]["regions"] == []
    assert rows["p1"]["summary_caption"] == "Chest X-ray with no finding."
    p2 = rows["p2"]
    assert p2["labels"] == ["Lung Opacity"]
    assert boxes(p2) == [[10, 20, 25, 50], [40, 22, 56, 50]]
    assert [r["caption"] for r in p2["regions"]] == ["lung opacity in the right middle zone",
                                                     "lung opacity in the left middle zone"]
    assert p2["image"].size == (64, 64)
    assert rows["p3"]["labels"] == ["No Lung Opacity / Not Normal"] and rows["p3"]["regions"] == []


def test_rsna_pneumonia_without_class_info(tmp_path, rsna_images):
    labels = tmp_path / "labels_only" / "stage_2_train_labels.csv"
    labels.parent.mkdir()
    shutil.copy(FIXTURES / "rsna_pneumonia/stage_2_train_labels.csv", labels)
    _, rows = run("rsna-pneumonia", labels, rsna_images, tmp_path / "out")
    assert {pid: row["labels"] for pid, row in rows.items()} == {
        "p1": ["No Lung Opacity"], "p2": ["Lung Opacity"], "p3": ["No Lung Opacity"]}


def test_rsna_pneumonia_reads_target_as_a_number(tmp_path, rsna_images):
    # a pandas float export writes Target as 1.0 / 0.0: those studies must stay positive / negative
    labels = tmp_path / "float_export" / "stage_2_train_labels.csv"
    labels.parent.mkdir()
    source = (FIXTURES / "rsna_pneumonia/stage_2_train_labels.csv").read_text()
    labels.write_text(source.replace(",1\n", ",1.0\n").replace(",0\n", ",0.0\n"))
    _, rows = run("rsna-pneumonia", labels, rsna_images, tmp_path / "out")
    assert {pid: row["labels"] for pid, row in rows.items()} == {
        "p1": ["No Lung Opacity"], "p2": ["Lung Opacity"], "p3": ["No Lung Opacity"]}
    assert boxes(rows["p2"]) == [[10, 20, 25, 50], [40, 22, 56, 50]]


def test_a_failed_conversion_leaves_no_dataset_behind(tmp_path, rsna_images):
    labels = tmp_path / "bad" / "stage_2_train_labels.csv"
    labels.parent.mkdir()
    source = (FIXTURES / "rsna_pneumonia/stage_2_train_labels.csv").read_text()
    labels.write_text(source.replace("p3,,,,,0", "p3,,,,,yes"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"stage_2_train_labels.csv, line 5: Target must be 0 or 1, got 'yes'"):
        convert("rsna-pneumonia", labels, rsna_images, out, rows_per_shard=1)  # p1, p2 shards were written
    assert not out.exists() and list(tmp_path.glob(".out.partial-*")) == []


def test_a_conversion_that_can_read_no_image_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no row could be converted .* \(skipped 4: missing image: 4 \(e\.g\. p1 \(tried"):
        convert("rsna-pneumonia", FIXTURES / "rsna_pneumonia/stage_2_train_labels.csv", tmp_path / "no_images",
                tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# ChestX-ray14
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trailing", ["", ",,,"], ids=["plain-header", "trailing-empty-columns"])
def test_chestxray14_bbox_header_quirk(tmp_path, trailing):
    source = (FIXTURES / "chestxray14/BBox_List_2017.csv").read_text().splitlines()
    csv_path = tmp_path / "BBox_List_2017.csv"
    csv_path.write_text("\n".join([source[0] + trailing, *source[1:]]) + "\n")
    images = tmp_path / "images"
    write_image(images / "00013118_008.png")
    write_image(images / "00014716_007.png")  # 00029817_009.png is missing
    stats, rows = run("chestxray14", csv_path, images, tmp_path / "out")
    assert stats.rows_written == {"train": 2} and reasons(stats) == {"missing image": 1}
    assert boxes(rows["00013118_008.png"]) == [[5.5, 10.25, 25.5, 18.25]]
    second = rows["00014716_007.png"]
    assert boxes(second) == [[40, 8, 46.5, 14.5], [10, 40, 30, 52]]
    assert second["labels"] == ["Nodule", "Mass"]
    assert second["summary_caption"] == "Chest X-ray with nodule and mass."


# ---------------------------------------------------------------------------------------------------------------
# CheXpert
# ---------------------------------------------------------------------------------------------------------------

CHEXPERT = FIXTURES / "chexpert/CheXpert-v1.0-small"


def chexpert_paths() -> list[str]:
    """Every `Path` of the fixture CSVs but patient00007's (its image is the missing one)."""
    paths = [line.split(",")[0] for name in ("train.csv", "valid.csv")
             for line in (CHEXPERT / name).read_text().splitlines()[1:]]
    return [path for path in paths if "patient00007" not in path]


def chexpert_row(patient: str, study: str = "study1", view: str = "view1_frontal", split: str = "train") -> str:
    return f"CheXpert-v1.0-small/{split}/{patient}/{study}/{view}.jpg"


def test_chexpert_folder_with_images_beside_the_csvs(tmp_path):
    """The input is the CheXpert-v1.0-small folder; images default to it: `Path` minus its first folder."""
    root = shutil.copytree(CHEXPERT, tmp_path / "CheXpert-v1.0-small")
    for path in chexpert_paths():
        write_image(root / Path(path).relative_to("CheXpert-v1.0-small"))
    stats, rows = run("chexpert", root, None, tmp_path / "out")
    assert stats.rows_written == {"train": 6, "validation": 1}
    assert reasons(stats) == {"unknown label value Edema='2.0'": 1, "missing image": 1}

    def labels(patient, **where):
        row = rows[chexpert_row(patient, **where)]
        return row["labels"], row["uncertain_labels"]

    # 1.0 / 0.0 / blank: positives only; "No Finding" is the dataset's own class
    assert labels("patient00001") == (["No Finding", "Support Devices"], [])
    assert labels("patient00002", study="study2") == (
        ["Lung Opacity", "Fracture"], ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"])
    assert labels("patient00002", view="view2_lateral") == (["Lung Opacity", "Fracture"], [])
    assert labels("patient00003") == (["Edema"], [])
    assert labels("patient00004") == (["Lung Opacity"], ["Edema"])  # written 0 / 1 / -1
    assert labels("patient00005") == ([], ["Pneumonia"])
    assert labels("patient64541", split="valid") == (["No Finding"], [])

    first = rows[chexpert_row("patient00001")]
    assert (first["modality"], first["regions"], first["image"].size) == ("chest_xray", [], (64, 64))
    assert first["summary_caption"] == first["report_caption"] == "Chest X-ray with support devices."
    uncertain = rows[chexpert_row("patient00002", study="study2")]
    assert uncertain["summary_caption"] == "Chest X-ray with lung opacity and fracture."
    assert uncertain["report_caption"] == uncertain["summary_caption"]  # the uncertain classes are not named
    edema = rows[chexpert_row("patient00003")]
    assert edema["summary_caption"] == "Chest X-ray with edema." and edema["negative_captions"]
    # nothing positive is not "no finding"; a "No Finding" row is
    only_uncertain = rows[chexpert_row("patient00005")]
    assert only_uncertain["summary_caption"] == only_uncertain["report_caption"] == "Chest X-ray."
    normal = rows[chexpert_row("patient64541", split="valid")]
    assert (normal["split"], normal["summary_caption"], normal["report_caption"]) == (
        "validation", "Chest X-ray with no finding.", "No abnormality is seen.")


def test_chexpert_file_with_images_under_the_parent_folder(tmp_path):
    """`Path` as written, relative to the folder that holds CheXpert-v1.0-small; a lateral view kept by default."""
    images = tmp_path / "chexpert"
    for path in chexpert_paths():
        write_image(images / path, size=(40, 32))
    stats, rows = run("chexpert", CHEXPERT / "train.csv", images, tmp_path / "out")
    assert stats.rows_written == {"train": 6} and stats.rows_skipped == 2
    lateral = rows[chexpert_row("patient00002", view="view2_lateral")]
    assert lateral["image"].size == (40, 32) and lateral["labels"] == ["Lung Opacity", "Fracture"]


def test_chexpert_frontal_only_and_unknown_values(tmp_path):
    lines = (CHEXPERT / "valid.csv").read_text().splitlines()
    lines += [lines[1].replace("1.0,0.0,", f"{value},0.0,", 1).replace("patient64541", f"patient9{index}")
              for index, value in enumerate(["yes", "1.00", "nan"])]
    csv_path = tmp_path / "valid.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    images = tmp_path / "images"
    for path in [*chexpert_paths(), *(chexpert_row(f"patient9{index}", split="valid") for index in range(3))]:
        write_image(images / path)
    stats, rows = run("chexpert", csv_path, images, tmp_path / "out")
    assert list(rows) == [chexpert_row("patient64541", split="valid")]
    assert reasons(stats) == {"unknown label value No Finding='yes'": 1, "unknown label value No Finding='1.00'": 1,
                              "unknown label value No Finding='nan'": 1}

    stats, rows = run("chexpert", CHEXPERT / "train.csv", images, tmp_path / "frontal", frontal_only=True)
    assert stats.rows_written == {"train": 5} and chexpert_row("patient00002", view="view2_lateral") not in rows
    assert reasons(stats) == {"not a frontal view": 1, "unknown label value Edema='2.0'": 1, "missing image": 1}


def test_chexpert_labels_parsing():
    row = dict.fromkeys(converters._CHEXPERT_CLASSES, "")
    assert converters._chexpert_labels(row) == ([], [])
    row.update({"Edema": "1", "Atelectasis": "-1.0", "Fracture": "0", "Cardiomegaly": "-1", "Pneumonia": "1.0"})
    assert converters._chexpert_labels(row) == (["Edema", "Pneumonia"], ["Cardiomegaly", "Atelectasis"])
    with pytest.raises(ValueError, match=r"unknown label value Fracture='0.5'"):
        converters._chexpert_labels({**row, "Fracture": "0.5"})


# ---------------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# ---------------------------------------------------------------------------------------------------------------

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
    assert reasons(stats)["several label rows for one study"] == 1
    (mimic_root / MIMIC_FILES[1]).unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        list(iter_rows("mimic-cxr", mimic_root / MIMIC_FILES[0], None, skipped=SkipCounter()))


# ---------------------------------------------------------------------------------------------------------------
# SIIM-ACR
# ---------------------------------------------------------------------------------------------------------------

SIIM_RECT = "1.2.276.0.7230010.3.1.4.8323329.12743.1517875241.599591"


def test_siim_rle_orientation_on_a_non_square_image():
    # 40 wide x 24 high; a 4-wide x 12-high rectangle at x 10..13, y 5..16. Column-major: column x starts at
    # x*24; starts are relative to the end of the previous run: 245 = 10*24+5, then 12 = (11*24+5) - (245+12).
    mask = converters._decode_rle("245 12 12 12 12 12 12 12", width=40, height=24)
    expected = np.zeros((24, 40), dtype=bool)
    expected[5:17, 10:14] = True
    np.testing.assert_array_equal(mask, expected)
    [box] = converters._rle_boxes(["245 12 12 12 12 12 12 12"], "pneumothorax", (40, 24))
    assert box.bbox == [10, 5, 14, 17]


@pytest.mark.parametrize("rle", ["1 2 3", "4090 10", "a b", "", "-1 2"])
def test_siim_rle_malformed(rle):
    with pytest.raises(ValueError):
        converters._decode_rle(rle, 64, 64)


def test_siim_acr(tmp_path):
    images = tmp_path / "dicom-images-train"
    write_image(images / "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090.png")
    write_image(images / f"{SIIM_RECT}.png", size=(40, 24))  # not 1024: the size comes from the image
    write_dicom(images / "1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709.dcm")
    write_image(images / "1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027.png", size=(1024, 1024))
    write_image(images / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.png")
    stats, rows = run("siim-acr", FIXTURES / "siim_acr/train-rle.csv", images, tmp_path / "out")

    assert stats.rows_written == {"train": 5}
    assert reasons(stats) == {"missing image": 1, "region dropped: invalid RLE": 2}
    empty = rows["1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090"]
    assert empty["labels"] == ["No finding"] and empty["regions"] == []
    rect = rows[SIIM_RECT]
    assert rect["image"].size == (40, 24) and boxes(rect) == [[10, 5, 14, 17]]
    assert rect["labels"] == ["pneumothorax"] and rect["regions"][0]["label"] == "pneumothorax"
    # two masks of one image (two CSV rows): a run wrapping from column 5 into column 6, and one pixel
    two = rows["1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709"]
    assert boxes(two) == [[5, 0, 7, 64], [44, 26, 45, 27]]
    # 1024x1024: relative starts -> pixels (x=1, y=0) and x=2, y=1021..1023
    assert boxes(rows["1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027"]) == [[1, 0, 3, 1024]]
    broken = rows["1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"]
    assert broken["labels"] == ["pneumothorax"] and broken["regions"] == []


# ---------------------------------------------------------------------------------------------------------------
# SLAKE
# ---------------------------------------------------------------------------------------------------------------


def make_slake_release(root: Path) -> Path:
    """The SLAKE fixture copied to `root` with its images written; xmlab3's image is missing."""
    root = shutil.copytree(FIXTURES / "slake", root)
    for lab in ("xmlab0", "xmlab1", "xmlab2", "xmlab4"):
        write_image(root / "imgs" / lab / "source.jpg")
    return root


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


# ---------------------------------------------------------------------------------------------------------------
# VQA-RAD
# ---------------------------------------------------------------------------------------------------------------

VQA_RAD = FIXTURES / "vqa_rad" / "VQA_RAD Dataset Public.json"
# The fixture's questions by split (in output order: by image name, then file order). L1 has one test_para
# member, so all of L1 (qids 1-3) is test; qid 7 (test_freeform, NULL linked id) is test alone; L4 (13, 14) via 13.
# L10 (10, 11) hashes into validation (SHA-256 fraction 0.03 < 0.1); everything else hashes into train.
VQA_RAD_SPLITS = {"train": [4, 5, 6, 8, 9], "validation": [10, 11], "test": [1, 2, 3, 7, 13, 14]}


def make_vqa_rad_release(root: Path) -> Path:
    """The VQA-RAD fixture in the release layout under `root`, with tiny JPEGs; synpic500.jpg is missing."""
    root.mkdir(parents=True)
    shutil.copy(VQA_RAD, root)
    for name in ("synpic100.jpg", "synpic200.jpg", "synpic300.jpg", "synpic400.jpg"):
        write_image(root / "VQA_RAD Image Folder" / name, size=(48, 40))
    return root


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


# ---------------------------------------------------------------------------------------------------------------
# ROCO
# ---------------------------------------------------------------------------------------------------------------


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
    links = converters._roco_dlinks(dlinks)
    assert links == {"ROCO_00001": ("PMC4327453", "pone.0031179.g007.jpg"), "ROCO_00002": (None, "gr1.jpg")}
    assert converters._roco_dlinks(tmp_path / "absent.txt") == {}
    assert converters._roco_candidates("ROCO_00002", links["ROCO_00002"], tmp_path) == [
        tmp_path / "gr1.jpg", tmp_path / "ROCO_00002.jpg", tmp_path / "ROCO_00002.png"]


# ---------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def coco_images(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    for name in ("a.png", "b.png", "c.png"):
        write_image(images / name)
    return images  # missing.png is missing


def test_coco(tmp_path, coco_images):
    stats, rows = run("coco", FIXTURES / "coco/instances_val.json", coco_images, tmp_path / "out")
    assert stats.rows_written == {"validation": 3}  # from the file name
    assert reasons(stats) == {"missing image": 1, "annotations of an unknown image id": 1,
                              "region dropped: unknown category": 1}
    a = rows["a.png"]
    assert boxes(a) == [[4, 6, 14, 26], [30, 30, 38, 38]] and a["labels"] == ["nodule", "effusion"]
    assert [r["caption"] for r in a["regions"]] == ["nodule in the upper left of the image",
                                                    "effusion in the middle centre of the image"]
    assert a["modality"] == "unknown" and a["summary_caption"] == "Medical image with nodule and effusion."
    assert boxes(rows["b.png"]) == [[10, 20, 30, 30]]  # declared 128x128, stored 64x64
    assert rows["c.png"]["labels"] == ["No finding"] and rows["c.png"]["regions"] == []
    assert all(row["uncertain_labels"] == [] for row in rows.values())  # written by the shared row step


def test_coco_options(tmp_path, coco_images):
    stats, rows = run("coco", FIXTURES / "coco/instances_val.json", coco_images, tmp_path / "out",
                      split="test", modality="chest_xray")
    assert stats.rows_written == {"test": 3}
    assert rows["a.png"]["regions"][0]["caption"] == "nodule in the right upper zone"
    assert rows["a.png"]["summary_caption"] == "Chest X-ray with nodule and effusion."


# ---------------------------------------------------------------------------------------------------------------
# API behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_registry_and_errors(tmp_path):
    assert set(CONVERTERS) == {"ms-cxr", "vindr-cxr", "rsna-pneumonia", "chestxray14", "chexpert", "mimic-cxr",
                               "siim-acr", "slake", "vqa-rad", "roco", "coco"}
    with pytest.raises(ValueError, match="unknown format"):
        iter_rows("nope", FIXTURES, None, skipped=SkipCounter())
    with pytest.raises(FileNotFoundError):
        iter_rows("vindr-cxr", tmp_path / "absent.csv", None, skipped=SkipCounter())
    with pytest.raises(ValueError, match="lacks the columns"):  # a file of another format
        list(iter_rows("vindr-cxr", FIXTURES / "rsna_pneumonia/stage_2_train_labels.csv", None, skipped=SkipCounter()))


def test_iter_rows_is_lazy_and_counts(tmp_path):
    images = tmp_path / "images"
    write_image(images / "img_a.png")
    skipped = SkipCounter()
    rows = iter_rows("vindr-cxr", FIXTURES / "vindr_cxr/train.csv", images, seed=3, skipped=skipped)
    first = next(rows)
    assert first["image_id"] == "img_a" and first["image"] == images / "img_a.png"  # file bytes embedded later
    assert skipped.rows == 0
    remaining = list(rows)
    assert remaining == [] and skipped.rows == 5 and skipped.reasons["missing image"] == 5


def test_grouping_spills_to_a_temporary_sqlite_file(tmp_path, monkeypatch):
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    images = tmp_path / "images"
    write_image(images / "img_a.png")
    rows = iter_rows("vindr-cxr", FIXTURES / "vindr_cxr/train.csv", images, skipped=SkipCounter())
    assert not list(spill_root.iterdir())  # nothing is read before the first row is asked for
    next(rows)
    assert [path.name for path in spill_root.glob("regionmed-convert-*/*")] == ["spill.sqlite"]
    rows.close()  # abandoning the iterator removes the spill
    assert not list(spill_root.iterdir())


def test_convert_logs_summary_and_stats(tmp_path, caplog, coco_images):
    with caplog.at_level(logging.INFO, logger="training_scripts.converters"):
        stats = convert("coco", FIXTURES / "coco/instances_val.json", coco_images, tmp_path / "out")
    assert stats.seconds > 0 and stats.rows_per_second == pytest.approx(3 / stats.seconds)
    messages = " | ".join(record.getMessage() for record in caplog.records)
    assert "skipped 2 rows, dropped 1 regions" in messages
    assert "missing image: 1 (e.g. missing.png (tried" in messages  # each reason with an example row
    # negatives depend on the seed only through make_hard_negatives: same seed -> same rows
    again = convert("coco", FIXTURES / "coco/instances_val.json", coco_images, tmp_path / "again")
    assert again.rows_written == stats.rows_written


# ---------------------------------------------------------------------------------------------------------------
# Inputs that used to be mislabelled or lost silently
# ---------------------------------------------------------------------------------------------------------------


def test_ms_cxr_dicom_id_with_two_image_paths_is_left_out_and_counted(tmp_path, ms_cxr_images):
    source = (FIXTURES / "ms_cxr/MS_CXR_Local_Alignment_v1.0.0.csv").read_text().splitlines()
    header, first, second = source[0], source[1], source[2]
    moved = second.replace("p10/p10000032/s50414267/d1.jpg", "p12/p12000012/s52000001/d3.jpg")
    csv_path = tmp_path / "two_paths.csv"
    csv_path.write_text("\n".join([header, first, moved, *source[3:]]) + "\n")
    stats, rows = run("ms-cxr", csv_path, ms_cxr_images, tmp_path / "out")
    assert "d1" not in rows and reasons(stats)["dicom_id listed with two image paths"] == 1


def test_coco_duplicate_ids_and_file_names_are_counted_not_lost(tmp_path, coco_images):
    document = json.loads((FIXTURES / "coco/instances_val.json").read_text())
    document["images"] += [{"id": 2, "file_name": "c.png", "width": 64, "height": 64},  # id 2 names two files
                           {"id": 7, "file_name": "a.png", "width": 64, "height": 64}]  # a.png under two ids
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(document))
    stats, rows = run("coco", path, coco_images, tmp_path / "out")
    assert "b.png" not in rows and set(rows) == {"a.png", "c.png"}
    assert reasons(stats)["image id listed for two files"] == 1
    assert reasons(stats)["file listed under two image ids"] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [('{"images": [', r"instances_val.json, line 1 column 13: not valid JSON"),
     ("[1, 2]", r"a COCO file is a JSON object .* got a list")],
    ids=["truncated", "a list"],
)
def test_malformed_coco_json_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "instances_val.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        convert("coco", path, tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("body", "message"),
    [(b'p1,,,,,0\np2,10,20,"15,30,1\np3,,,,,0\np4,5,5,10,10,1\n', r"line 3: a quoted field runs to line"),
     (b"p1,,,,,0\np2,10,20,15,30,\xff\n", r"line 3: not UTF-8 text"),
     (b"p1,,,,,0\np2," + b"9" * 140_000 + b",20,15,30,1\n", r"line 3: field larger than field limit")],
    ids=["unterminated quote", "not UTF-8", "huge field"],
)
def test_csv_errors_name_the_file_and_line(tmp_path, body, message):
    labels = tmp_path / "stage_2_train_labels.csv"
    labels.write_bytes(b"patientId,x,y,width,height,Target\n" + body)
    with pytest.raises(ValueError, match=rf"stage_2_train_labels.csv, {message}"):
        convert("rsna-pneumonia", labels, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_exif_rotated_image_is_stored_upright_and_its_boxes_are_not_stretched(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    raw = Image.new("L", (40, 20), 0)  # stored landscape; EXIF 6: viewers rotate it to 20 x 40 portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(images / "a.jpg", exif=exif)
    document = {"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 40}],
                "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 4, 10, 30], "category_id": 1}],
                "categories": [{"id": 1, "name": "nodule"}]}
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(document))
    stats, rows = run("coco", path, images, tmp_path / "out")
    row = rows["a.jpg"]
    assert row["image"].size == (20, 40)  # the pixels the annotation was made on
    assert boxes(row) == [[2, 4, 12, 34]]  # as annotated, not rescaled by (2, 0.5)
