"""The siim-acr converter (SIIM-ACR) and its RLE decoding."""

import numpy as np
import pytest
from converter_helpers import FIXTURES, boxes, reasons, run, write_dicom, write_image

from regionmed_clip.data.converters import geometry

SIIM_RECT = "1.2.276.0.7230010.3.1.4.8323329.12743.1517875241.599591"


def test_siim_rle_orientation_on_a_non_square_image():
    # 40 wide x 24 high; a 4-wide x 12-high rectangle at x 10..13, y 5..16. Column-major: column x starts at
    # x*24; starts are relative to the end of the previous run: 245 = 10*24+5, then 12 = (11*24+5) - (245+12).
    mask = geometry._decode_rle("245 12 12 12 12 12 12 12", width=40, height=24)
    expected = np.zeros((24, 40), dtype=bool)
    expected[5:17, 10:14] = True
    np.testing.assert_array_equal(mask, expected)
    [box] = geometry._rle_boxes(["245 12 12 12 12 12 12 12"], "pneumothorax", (40, 24))
    assert box.bbox == [10, 5, 14, 17]


@pytest.mark.parametrize("rle", ["1 2 3", "4090 10", "a b", "", "-1 2"])
def test_siim_rle_malformed(rle):
    with pytest.raises(ValueError):
        geometry._decode_rle(rle, 64, 64)


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
