"""The ms-cxr converter (MS-CXR v1.0.0 and v1.1.0)."""

from pathlib import Path

import pytest
from converter_helpers import FIXTURES, boxes, make_ms_cxr_images, reasons, run


@pytest.fixture
def ms_cxr_images(tmp_path: Path) -> Path:
    return make_ms_cxr_images(tmp_path / "mimic-cxr-jpg")


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
