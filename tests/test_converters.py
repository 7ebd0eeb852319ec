"""Dataset converters: the shared machinery, on the fixtures in the public formats (tests/fixtures/formats/).

The registry and its errors, lazy iteration, the sqlite spill, the summary log, errors that name the file and
line, a failed or empty conversion leaving no dataset, box fusion and EXIF-rotated images. Each format's own tests
are in test_converter_<format>.py; the helpers they share are in converter_helpers.py.
"""

import logging
import tempfile

import pytest
from converter_helpers import FIXTURES, make_coco_images, make_rsna_images, write_image

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


def test_fuse_boxes_threshold_is_inclusive():
    # IoU exactly 0.4: [0,0,10,10] vs [0,0,10,4] -> 40 / 100
    assert geometry._fuse_boxes([[0, 0, 10, 10], [0, 0, 10, 4]]) == [[0, 0, 10, 7]]
    assert geometry._fuse_boxes([[0, 0, 10, 10], [0, 0, 10, 3.9]]) == [[0, 0, 10, 10], [0, 0, 10, 3.9]]
