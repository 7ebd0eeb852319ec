"""The vindr-cxr converter (VinDr-CXR)."""

from converter_helpers import FIXTURES, boxes, reasons, run, write_corrupt, write_dicom, write_image


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
