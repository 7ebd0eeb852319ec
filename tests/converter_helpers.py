"""Helpers shared by the converter tests (test_converters.py, test_converter_<format>.py) and the tests that
read converted data back: images, fixture releases, running a conversion and checking its rows.

The annotation files are committed (tests/fixtures/formats/); the images are generated per test (tiny PNG/JPEG
files, DICOMs built with pydicom), including a missing and a corrupt image where a format's skip handling is checked.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionmed_clip.data.converters import ConversionStats, convert
from regionmed_clip.data.schema import SPLITS, load_canonical, validate_row

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
# Formats whose captions may be ones no hard-negative rule applies to: ROCO's own text, "Chest X-ray." for a
# labeler row without a positive class.
NEGATIVES_OPTIONAL = {"roco", "chexpert", "mimic-cxr"}


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


def make_slake_release(root: Path) -> Path:
    """The SLAKE fixture copied to `root` with its images written; xmlab3's image is missing."""
    root = shutil.copytree(FIXTURES / "slake", root)
    for lab in ("xmlab0", "xmlab1", "xmlab2", "xmlab4"):
        write_image(root / "imgs" / lab / "source.jpg")
    return root


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


def make_ms_cxr_images(images: Path) -> Path:
    """The MS-CXR fixture's images under `images/files/`: MIMIC-CXR-JPG files of d1, d2 and d3."""
    for dicom_id, folder in (("d1", "p10/p10000032/s50414267"), ("d2", "p11/p11000011/s51029426"),
                             ("d3", "p12/p12000012/s52000001")):
        write_image(images / "files" / folder / f"{dicom_id}.jpg")
    return images  # d4 is missing


def make_rsna_images(images: Path) -> Path:
    """The RSNA Pneumonia fixture's images in `images`: DICOMs of p1, p2 and p3."""
    for patient in ("p1", "p2", "p3"):
        write_dicom(images / f"{patient}.dcm")
    return images  # p4 is missing


def make_coco_images(images: Path) -> Path:
    """The COCO fixture's images in `images`: a.png, b.png and c.png."""
    for name in ("a.png", "b.png", "c.png"):
        write_image(images / name)
    return images  # missing.png is missing
