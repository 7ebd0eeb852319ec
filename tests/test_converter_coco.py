"""The coco converter (COCO detection JSON)."""

from pathlib import Path

import pytest
from converter_helpers import FIXTURES, boxes, make_coco_images, reasons, run


@pytest.fixture
def coco_images(tmp_path: Path) -> Path:
    return make_coco_images(tmp_path / "images")


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
