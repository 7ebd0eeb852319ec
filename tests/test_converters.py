"""Dataset converters: the shared machinery, on the fixtures in the public formats (tests/fixtures/formats/).

The registry and its errors, lazy iteration, the sqlite spill, the summary log, errors that name the file and
line, a failed or empty conversion leaving no dataset, box fusion and EXIF-rotated images. Each format's own tests
are in test_converter_<format>.py; the helpers they share are in converter_helpers.py.
"""

import json
import logging
import tempfile

import pytest
from converter_helpers import FIXTURES, boxes, make_coco_images, make_rsna_images, run, write_image
from PIL import Image

from training_scripts.converters import CONVERTERS, SkipCounter, convert, geometry, iter_rows


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


def test_convert_logs_summary_and_stats(tmp_path, caplog):
    coco_images = make_coco_images(tmp_path / "images")
    with caplog.at_level(logging.INFO, logger="training_scripts.converters"):
        stats = convert("coco", FIXTURES / "coco/instances_val.json", coco_images, tmp_path / "out")
    assert stats.seconds > 0 and stats.rows_per_second == pytest.approx(3 / stats.seconds)
    messages = " | ".join(record.getMessage() for record in caplog.records)
    assert "skipped 2 rows, dropped 1 regions" in messages
    assert "missing image: 1 (e.g. missing.png (tried" in messages  # each reason with an example row
    # negatives depend on the seed only through make_hard_negatives: same seed -> same rows
    again = convert("coco", FIXTURES / "coco/instances_val.json", coco_images, tmp_path / "again")
    assert again.rows_written == stats.rows_written


def test_a_failed_conversion_leaves_no_dataset_behind(tmp_path):
    rsna_images = make_rsna_images(tmp_path / "stage_2_train_images")
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


def test_fuse_boxes_threshold_is_inclusive():
    # IoU exactly 0.4: [0,0,10,10] vs [0,0,10,4] -> 40 / 100
    assert geometry._fuse_boxes([[0, 0, 10, 10], [0, 0, 10, 4]]) == [[0, 0, 10, 7]]
    assert geometry._fuse_boxes([[0, 0, 10, 10], [0, 0, 10, 3.9]]) == [[0, 0, 10, 10], [0, 0, 10, 3.9]]


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
