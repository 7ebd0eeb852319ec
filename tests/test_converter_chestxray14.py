"""The chestxray14 converter (ChestX-ray14 BBox_List_2017.csv)."""

import pytest
from converter_helpers import FIXTURES, boxes, reasons, run, write_image


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
