"""The rsna-pneumonia converter (RSNA Pneumonia)."""

import shutil
from pathlib import Path

import pytest
from converter_helpers import FIXTURES, boxes, make_rsna_images, reasons, run


@pytest.fixture
def rsna_images(tmp_path: Path) -> Path:
    return make_rsna_images(tmp_path / "stage_2_train_images")


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
