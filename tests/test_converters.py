"""Dataset converters: the shared machinery, on the fixtures in the public formats (tests/fixtures/formats/).

The registry and its errors, lazy iteration, the sqlite spill, the summary log, errors that name the file and
line, a failed or empty conversion leaving no dataset, box fusion, EXIF orientations and image paths outside the
images folder. Each format's own tests are in test_converter_<format>.py; the helpers they share are in
converter_helpers.py.
"""

import io
import json
import logging
import tempfile

import numpy as np
import pytest
from converter_helpers import FIXTURES, make_coco_images, make_rsna_images, write_image
from PIL import Image, ImageOps

from regionmed_clip.data.converters import CONVERTERS, SkipCounter, convert, geometry, iter_rows
from regionmed_clip.data.schema import load_canonical


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
    with caplog.at_level(logging.INFO, logger="regionmed_clip.data.converters"):
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


# -- EXIF orientations (issue 21, item 5): every converter stores upright pixels, its boxes on them ----------------

DISPLAYED = (60, 40)  # (W, H) of the image as a viewer shows it
BRIGHT = (10, 5, 22, 15)  # where the bright square is shown, xyxy: the annotation's box
# The transpose that undoes each orientation's display transpose (exif_transpose applies the display one).
FILE_FROM_DISPLAYED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                       4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
                       7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def write_oriented_jpeg(path, orientation):
    """A JPEG whose pixels, turned by EXIF `orientation`, show a bright square at BRIGHT of a DISPLAYED image."""
    shown = Image.new("L", DISPLAYED, 20)
    shown.paste(235, BRIGHT)
    stored = shown if FILE_FROM_DISPLAYED[orientation] is None else shown.transpose(FILE_FROM_DISPLAYED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, exif=exif, quality=95)
    assert ImageOps.exif_transpose(Image.open(path)).size == DISPLAYED
    return path


def bright_box(image_bytes):
    """xyxy (exclusive) of the bright pixels of the stored bytes decoded WITHOUT any EXIF handling."""
    pixels = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("L")) > 128
    rows, columns = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    return [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_stored_upright_with_its_boxes(tmp_path, orientation):
    """VinDr-CXR (no declared size: boxes drawn on the image as shown): pixels and boxes agree for a reader that
    ignores EXIF. All formats share the image step (`rows._load_image`)."""
    write_oriented_jpeg(tmp_path / "images" / "img.jpg", orientation)
    (tmp_path / "train.csv").write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
                                        "img,Nodule/Mass,8,R8,{},{},{},{}\n".format(*BRIGHT))
    convert("vindr-cxr", tmp_path / "train.csv", tmp_path / "images", tmp_path / "out")
    [row] = load_canonical(tmp_path / "out", "train", decode_images=False)
    stored = row["image"]["bytes"]
    assert Image.open(io.BytesIO(stored)).size == DISPLAYED
    assert Image.open(io.BytesIO(stored)).getexif().get(0x0112, 1) == 1  # no orientation left to apply twice
    assert row["regions"][0]["bbox"] == pytest.approx(list(BRIGHT))
    found = bright_box(stored)
    assert all(abs(a - b) <= 1 for a, b in zip(found, BRIGHT, strict=True)), (found, BRIGHT)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_declared_on_the_files_own_pixels_is_turned_with_them(tmp_path, orientation):
    """COCO declares the annotated size: the file's own (W, H) where the orientation swaps the axes means the box
    was drawn on the file's pixels; it is turned upright with them (otherwise it is the shown image's box)."""
    path = write_oriented_jpeg(tmp_path / "images" / "a.jpg", orientation)
    with Image.open(path) as raw:
        file_size = raw.size
    raw_box = bright_box(path.read_bytes())  # where the square is in the file's own pixels
    declared, box = (file_size, raw_box) if file_size != DISPLAYED else (DISPLAYED, list(BRIGHT))
    x0, y0, x1, y1 = (int(value) for value in box)
    document = {"images": [{"id": 1, "file_name": "a.jpg", "width": declared[0], "height": declared[1]}],
                "annotations": [{"image_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": 1}],
                "categories": [{"id": 1, "name": "nodule"}]}
    (tmp_path / "a.json").write_text(json.dumps(document))
    convert("coco", tmp_path / "a.json", tmp_path / "images", tmp_path / "out")
    [row] = load_canonical(tmp_path / "out", "train", decode_images=False)
    assert Image.open(io.BytesIO(row["image"]["bytes"])).size == DISPLAYED
    found = bright_box(row["image"]["bytes"])
    assert all(abs(a - b) <= 1 for a, b in zip(row["regions"][0]["bbox"], found, strict=True)), (row, found)


def test_orient_box_matches_exif_transpose():
    size = (7, 5)
    for orientation in range(1, 9):
        mask = np.zeros((5, 7), dtype=np.uint8)
        mask[1:3, 4:6] = 255  # xyxy [4, 1, 6, 3]
        image = Image.fromarray(mask)
        exif = image.getexif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", exif=exif)
        upright = np.asarray(ImageOps.exif_transpose(Image.open(buffer))) > 0
        rows, columns = np.flatnonzero(upright.any(axis=1)), np.flatnonzero(upright.any(axis=0))
        expected = [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]
        assert geometry._orient_box([4, 1, 6, 3], orientation, size) == expected, orientation


# -- image paths outside --images (issue 21, item 6): one rule for every format ------------------------------------

def test_an_image_path_outside_the_images_folder_is_skipped_unread(tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_image(images / "a.png")
    secret = write_image(tmp_path / "secret.png")  # a real image: it would convert, if it were opened
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    document = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "../secret.png"},
                           {"id": 3, "file_name": str(secret)}, {"id": 4, "file_name": "sub/../../secret.png"}],
                "annotations": [], "categories": []}
    (tmp_path / "a.json").write_text(json.dumps(document))
    stats = convert("coco", tmp_path / "a.json", images, tmp_path / "out")
    assert stats.rows_written == {"train": 1} and dict(stats.skip_reasons) == {"path outside --images": 3}
    assert not any("secret" in path for path in opened)


def test_the_outside_rule_holds_for_csv_and_vqa_formats(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    header = (FIXTURES / "chexpert/CheXpert-v1.0-small/valid.csv").read_text().splitlines()[0]
    fields = ",Female,68,Frontal,AP" + ",1.0" + "," * 13
    lines = [header, f"CheXpert-v1.0-small/valid/p1/s1/view1_frontal.jpg{fields}", f"../../../../etc/hostname{fields}",
             f"/etc/hostname{fields}"]
    write_image(root / "valid/p1/s1/view1_frontal.jpg")
    (root / "valid.csv").parent.mkdir(parents=True, exist_ok=True)
    (root / "valid.csv").write_text("\n".join(lines) + "\n")
    stats = convert("chexpert", root, None, tmp_path / "out")
    assert stats.rows_written == {"validation": 1} and dict(stats.skip_reasons) == {"path outside --images": 2}

    vqa = tmp_path / "vqa_rad"
    write_image(vqa / "VQA_RAD Image Folder" / "a.jpg")
    question = {"qid": 1, "image_name": "a.jpg", "question": "Is it?", "answer": "yes", "answer_type": "CLOSED",
                "phrase_type": "freeform", "qid_linked_id": "", "image_organ": "CHEST"}
    escape = {**question, "qid": 2, "image_name": "../../secret.jpg"}
    (vqa / "VQA_RAD Dataset Public.json").write_text(json.dumps([question, escape]))
    stats = convert("vqa-rad", vqa, None, tmp_path / "vqa_out")
    assert sum(stats.rows_written.values()) == 1 and stats.skip_reasons["path outside --images"] == 1
    assert stats.questions_skipped == 1  # the question about the refused image
