"""The bad-input corpus: malformed inputs users have met, written as files by this script (nothing is
hand-kept), each with what its layer must do: raise a clear ERROR (type, and a message naming the
file, field or value) or make a documented REPAIR (and what the repaired result is).

    python tests/corpus/generate.py OUT_DIR    # OUT_DIR/<layer>/<case>.* and OUT_DIR/manifest.json

Layers, and the call the input goes through (tests/test_corpus.py, one parametrised test each):

    image        processing.load_medical_image(path)
    dicom        processing.load_medical_image(path) on DICOM files
    regions      RegionMedCLIPImageProcessor(max_rois=8) on a 64 x 48 film with the region of the file
    processor    RegionMedCLIPProcessor(...)(**the file's JSON arguments); each name in its `images` is an
                 image file beside it, passed as `Image.open(file)` (a lazily decoded PIL object)
    tokenizer    processing.load_tokenizer(folder)
    dataset      list(regionmed_clip.data.schema.load_canonical(folder, "train"))
    writer       regionmed_clip.data.schema.write_rows([a row holding the file's bytes])
    rows         RegionMedCLIPCollator on a good row and the row of the file (a JSON row; its `image`
                 names an image file of the corpus)
    checkpoints  training_scripts.checkpoints.latest_intact_checkpoint(run folder) whose newest
                 checkpoint is damaged; an intact checkpoint-1 lies beside it
    converters   regionmed_clip.data.converters.convert(format, input, None, out), the format being the
                 case name up to its first "."; a failed conversion leaves no output folder
    model        RegionMedCLIPModel.forward with the file's roi_boxes
"""

import io
import json
import math
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS.parent)]  # run as a script: converter_helpers and the project
from converter_helpers import (  # noqa: E402
    FIXTURES,
    boxes,
    make_coco_images,
    make_ms_cxr_images,
    make_rsna_images,
    reasons,
    write_dicom,
    write_image,
)

__all__ = ["CASES", "LAYERS", "Case", "Error", "Repair", "dicom_with", "generate"]

LAYERS = ("image", "dicom", "regions", "processor", "tokenizer", "dataset", "writer", "rows", "checkpoints", "converters", "model")
FILM_SIZE = (64, 48)  # (W, H) of the film the `regions` layer cuts regions from


@dataclass(frozen=True)
class Error:
    """The layer raises `type` with a message matching the regex `match`."""

    type: type[BaseException]
    match: str


@dataclass(frozen=True)
class Repair:
    """The layer goes on, doing what `description` documents; `check(result)` asserts what it gave, and
    with `warns` its logged warnings match that regex (a repair that must be said)."""

    description: str
    check: Callable[[Any], None]
    warns: str | None = None


@dataclass(frozen=True)
class Case:
    layer: str
    name: str
    build: Callable[[Path], Path]  # writes the input at or under the path it is given, returns the input
    expect: Error | Repair


def _equal(expected: Any) -> Callable[[Any], None]:
    def check(result: Any) -> None:
        np.testing.assert_array_equal(np.asarray(result), np.asarray(expected))
    return check


def _shape(expected: tuple[int, ...]) -> Callable[[Any], None]:
    def check(result: Any) -> None:
        assert np.asarray(result).shape == expected, np.asarray(result).shape
    return check


# -- image ----------------------------------------------------------------------------------------------------

_GREY = (np.add.outer(np.arange(6), np.arange(8)) * 5).astype(np.uint8)  # (H, W) = (6, 8)


def _save(array: np.ndarray, mode: str | None = None) -> Callable[[Path], Path]:
    """`array` as an image file (by the suffix), converted to `mode` first if given."""
    def build(path: Path) -> Path:
        image = Image.fromarray(array)
        (image.convert(mode) if mode else image).save(path)
        return path
    return build


def _truncated_png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])  # the header whole, the pixel data cut
    return path


def _png_claiming(width: int, height: int) -> Callable[[Path], Path]:
    """A 1 x 1 PNG whose header declares `width x height`: a decompression bomb, refused unread."""
    def build(path: Path) -> Path:
        write_image(path, size=(1, 1))
        data = bytearray(path.read_bytes())
        header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
        data[12:29], data[29:33] = header, struct.pack(">I", zlib.crc32(header))
        path.write_bytes(bytes(data))
        return path
    return build


def _nan_tiff(path: Path) -> Path:
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(path)
    return path


def _two_frame_tiff(path: Path) -> Path:
    first, second = Image.fromarray(_GREY), Image.fromarray(255 - _GREY)
    first.save(path, save_all=True, append_images=[second])
    return path


def _exif_rotated_jpeg(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("L", (8, 6), 128).save(path, exif=exif, quality=95)
    return path


def _text_file(text: str) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        path.write_text(text)
        return path
    return build


_RGBA = np.dstack([_GREY, 255 - _GREY, _GREY // 2, np.full_like(_GREY, 7)])

IMAGE_CASES = [
    Case("image", "truncated.png", _truncated_png, Error(ValueError, r"Cannot decode image file '.*truncated\.png'")),
    Case("image", "text-named-png.png", _text_file("not an image\n" * 20),
         Error(ValueError, r"Cannot read '.*text-named-png\.png' as an image")),
    Case("image", "empty.png", _text_file(""), Error(ValueError, r"Cannot read '.*empty\.png' as an image")),
    Case("image", "bomb-header.png", _png_claiming(30000, 30000),
         Error(ValueError, r"30000x30000 = 900,000,000 pixels, more than max_image_pixels=178,956,970")),
    Case("image", "nan-float.tiff", _nan_tiff, Error(ValueError, r"image file '.*nan-float\.tiff': image holds NaN")),
    Case("image", "rgba.png", _save(_RGBA), Repair("alpha dropped, colour kept uncomposited", _equal(_RGBA[..., :3]))),
    Case("image", "16-bit.png", _save(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)),
         Repair("min-max scaled to 8 bits", _equal([[0, 64], [128, 255]]))),
    Case("image", "palette.png", _save(_RGBA[..., :3], "P"), Repair("palette applied: RGB", _shape((6, 8, 3)))),
    Case("image", "one-bit.png", _save(_GREY > 30, "1"), Repair("mode 1 as 0 / 255", _equal((_GREY > 30) * 255))),
    Case("image", "two-frames.tiff", _two_frame_tiff, Repair("the first frame only", _equal(_GREY))),
    Case("image", "exif-rotated.jpg", _exif_rotated_jpeg,
         Repair("EXIF orientation not applied (the converters apply it)", _shape((6, 8)))),
]


# -- dicom ----------------------------------------------------------------------------------------------------


def dicom_with(path: Path, **tags: Any) -> Path:
    """A small valid 12-bit DICOM (16 x 12) at `path`, then `tags` set (None deletes a tag)."""
    import pydicom

    write_dicom(path, size=(16, 12))
    dataset = pydicom.dcmread(path)
    for tag, value in tags.items():
        if value is None:
            delattr(dataset, tag)
        else:
            setattr(dataset, tag, value)
    dataset.save_as(path)
    return path


def _dicom(**tags: Any) -> Callable[[Path], Path]:
    return lambda path: dicom_with(path, **tags)


def _window_centre_text(path: Path) -> Path:
    """WindowCenter "abcd.0": pydicom refuses to write it, so the valid file's bytes are edited."""
    dicom_with(path)
    element = b"\x28\x00\x50\x10DS\x06\x00"  # (0028,1050) explicit VR little endian, 6 bytes: "2048.0"
    data = path.read_bytes()
    assert data.count(element + b"2048.0") == 1
    path.write_bytes(data.replace(element + b"2048.0", element + b"abcd.0"))
    return path


def _without_preamble(path: Path) -> Path:
    dicom_with(path)
    path.write_bytes(path.read_bytes()[132:])  # neither the 128-byte preamble nor "DICM"
    return path


# write_dicom's pixels are (row + column) * 16 % 4096, 12 bits, with window centre 2048 / width 4096.
_DICOM_VALUES = (np.add.outer(np.arange(12), np.arange(16)) * 16 % 4096).astype(np.float64)


def _windowed(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    low = centre - width / 2
    return np.floor(np.clip((values - low) / width, 0, 1) * 255 + 0.5).astype(np.uint8)


DICOM_CASES = [
    Case("dicom", "rescale-slope-zero.dcm", _dicom(RescaleSlope=0, RescaleIntercept=0),
         Error(ValueError, r"rescale-slope-zero\.dcm': RescaleSlope is 0")),
    Case("dicom", "no-rows.dcm", _dicom(Rows=None),
         Error(ValueError, r"DICOM file '.*no-rows\.dcm': a required tag is missing or malformed")),
    Case("dicom", "two-samples-per-pixel.dcm", _dicom(SamplesPerPixel=2),
         Error(ValueError, r"DICOM file '.*two-samples-per-pixel\.dcm': .*'Samples per Pixel' value of '2'")),
    Case("dicom", "window-not-a-number.dcm", _window_centre_text,
         Error(ValueError, r"DICOM file '.*window-not-a-number\.dcm'")),
    Case("dicom", "no-preamble.dcm", _without_preamble,
         Error(ValueError, r"no-preamble\.dcm' as an image.*pydicom\.dcmread\(path, force=True\)")),
    Case("dicom", "monochrome1.dcm", _dicom(PhotometricInterpretation="MONOCHROME1"),
         Repair("inverted after windowing: bright means dense", _equal(255 - _windowed(_DICOM_VALUES, 2048, 4096)))),
    Case("dicom", "narrow-window.dcm", _dicom(WindowCenter=1000, WindowWidth=200),
         Repair("clipped into the window", _equal(_windowed(_DICOM_VALUES, 1000, 200)))),
    Case("dicom", "window-width-zero.dcm", _dicom(WindowWidth=0),
         Repair("no window: min-max scaled, with a warning naming the file",
                _equal(np.floor(_DICOM_VALUES * 255 / _DICOM_VALUES.max() + 0.5)),
                warns=r"window-width-zero\.dcm': WindowWidth 0 is not positive: the window \(center 2048\) is ignored")),
]


# -- regions --------------------------------------------------------------------------------------------------


def _region(spec: Any) -> Callable[[Path], Path]:
    """A region spec as JSON, or a mask as .npy (by the case name's suffix)."""
    def build(path: Path) -> Path:
        if path.suffix == ".npy":
            np.save(path, spec)
        else:
            path.write_text(json.dumps(spec))
        return path
    return build


def _mask(value: float, rows: slice = slice(12, 24), cols: slice = slice(16, 40), dtype: Any = np.float32,
          background: float = 0.0) -> np.ndarray:
    mask = np.full(FILM_SIZE[::-1], background, dtype=dtype)
    mask[rows, cols] = value
    return mask


def _roi_boxes(expected: list[list[float]]) -> Callable[[Any], None]:
    def check(features: Any) -> None:
        np.testing.assert_allclose(features["roi_boxes"][0][: len(expected)], expected, atol=1e-6)
        assert int(features["roi_mask"][0].sum()) == len(expected), features["roi_mask"]
    return check


_SOFT_MASK = _mask(0.9, background=0.2)  # a segmentation model's probabilities: 0.2 everywhere, 0.9 on the lesion
_NINE_BOXES = [[i, i, i + 10, i + 10] for i in range(9)]

REGION_CASES = [
    Case("regions", "nan-box.json", _region([1, 2, math.nan, 9]), Error(ValueError, r"regions\[0\]\[0\]: box coordinates hold NaN")),
    Case("regions", "inverted-box.json", _region([30, 20, 10, 40]),
         Error(ValueError, r"regions\[0\]\[0\]: box \[30, 20, 10, 40\] \(xyxy\) is inverted or has zero area")),
    Case("regions", "zero-area-box.json", _region([10, 10, 10, 30]), Error(ValueError, r"is inverted or has zero area")),
    Case("regions", "box-off-the-image.json", _region([70, 50, 90, 60]),
         Error(ValueError, r"lies entirely outside the 64x48 image")),
    Case("regions", "three-numbers.json", _region([1, 2, 3]),
         Error(ValueError, r"expected a box of 4 numbers, a point of 2 numbers or a 2-D mask, got shape \(3,\)")),
    Case("regions", "strings.json", _region(["a", "b", "c", "d"]), Error(ValueError, r"cannot read the region as numbers")),
    Case("regions", "point-off-the-image.json", _region({"point": [80, 10]}),
         Error(ValueError, r"point \[80, 10\] lies outside the 64x48 image")),
    Case("regions", "box-and-point.json", _region({"box": [1, 2, 3, 4], "point": [1, 2]}),
         Error(ValueError, r"needs exactly one of 'box', 'mask', 'point'; got keys \['box', 'point'\]")),
    Case("regions", "mask-of-another-size.npy", _region(np.ones((10, 10), dtype=bool)),
         Error(ValueError, r"mask shape \(10, 10\) differs from the image's \(H, W\) = \(48, 64\)")),
    Case("regions", "empty-mask.npy", _region(_mask(0, dtype=bool)), Error(ValueError, r"the mask is empty")),
    Case("regions", "nan-mask.npy", _region(_mask(np.nan)),
         Error(ValueError, r"regions\[0\]\[0\]: the float mask holds NaN or inf \(288 of 3072 pixels\)")),
    Case("regions", "mask-beyond-one.npy", _region(_mask(2.0)),
         Error(ValueError, r"a float mask must hold 0/1 or probabilities in \[0, 1\], got values in \[0, 2\]")),
    Case("regions", "box-partly-off-the-image.json", _region([-8, 24, 32, 60]),
         Repair("clipped to the image", _roi_boxes([[0, 32 / 64, 32 / 64, 56 / 64]]))),  # 8 px of padding above
    Case("regions", "probability-mask.npy", _region(_SOFT_MASK),
         Repair("thresholded at 0.5: the lesion's box, not the whole image",
                _roi_boxes([[16 / 64, (8 + 12) / 64, 40 / 64, (8 + 24) / 64]]))),
    Case("regions", "nine-boxes.json", _region(_NINE_BOXES),
         Repair("the first max_rois=8 kept, in order, with a warning",
                _roi_boxes([[i / 64, (8 + i) / 64, (i + 10) / 64, (8 + i + 10) / 64] for i in range(8)]),
                warns=r"has 9 regions; keeping the first max_rois=8, dropping 1")),
]


# -- processor ------------------------------------------------------------------------------------------------


def _cut(image_format: str) -> Callable[[Path], None]:
    """A 64 x 64 noise image saved as `image_format`, then cut in half (the header whole)."""
    def write(path: Path) -> None:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path, image_format)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return write


_IMAGE_FILES: dict[str, Callable[[Path], Any]] = {
    "film.png": lambda path: write_image(path, size=(64, 48)), "cut.png": _cut("PNG"), "cut.jpg": _cut("JPEG")}


def _call(**arguments: Any) -> Callable[[Path], Path]:
    """Processor arguments as JSON (ensure_ascii keeps a lone surrogate); the images it names written beside it."""
    def build(path: Path) -> Path:
        for name in arguments.get("images", []):
            _IMAGE_FILES[name](path.parent / name)
        path.write_text(json.dumps(arguments))
        return path
    return build


PROCESSOR_CASES = [
    Case("processor", "truncated-png-object.json", _call(images=["film.png", "cut.png"], text=["a", "b"]),
         Error(ValueError, r"images\[1\]: Cannot decode the PIL image of file '.*cut\.png': image file is truncated")),
    Case("processor", "truncated-jpeg-object.json", _call(images=["cut.jpg"], text=["a"]),
         Error(ValueError, r"images\[0\]: Cannot decode the PIL image of file '.*cut\.jpg': image file is truncated")),
    Case("processor", "lone-surrogate-text.json", _call(text=["nodule", "nodule \ud800"]),
         Error(ValueError, r"text\[1\] cannot be encoded as UTF-8 \(surrogates not allowed at character 7: '\\ud800'\)")),
    Case("processor", "lone-surrogate-summary.json", _call(summary_text="left \udc80 lung"),
         Error(ValueError, r"summary_text\[0\] cannot be encoded as UTF-8")),
    Case("processor", "lone-surrogate-negative.json",
         _call(images=["film.png"], text=["nodule"], negative_text=[["no nodule", "left \ud83d"]]),
         Error(ValueError, r"negative_text\[0\]\[1\] cannot be encoded as UTF-8")),
]


# -- tokenizer ------------------------------------------------------------------------------------------------


def _saved_processor_without(*names: str) -> Callable[[Path], Path]:
    """A model folder as RegionMedCLIPProcessor.save_pretrained writes it, then the files `names` deleted."""
    def build(folder: Path) -> Path:
        from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, build_tokenizer

        tokenizer = build_tokenizer(["a nodule in the right upper zone"], vocab_size=64)
        RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(), tokenizer).save_pretrained(folder)
        for name in names:
            (folder / name).unlink()
        return folder
    return build


TOKENIZER_CASES = [
    Case("tokenizer", "tokenizer-files-deleted", _saved_processor_without("tokenizer.json", "tokenizer_config.json"),
         Error(FileNotFoundError, r"no tokenizer in '.*tokenizer-files-deleted' \(expected tokenizer\.json or vocab\.txt")),
    Case("tokenizer", "only-tokenizer-json-deleted", _saved_processor_without("tokenizer.json"),
         Error(FileNotFoundError, r"no tokenizer in .* it holds \[.*'tokenizer_config\.json'\]")),
]


# -- dataset (load_canonical) and writer ----------------------------------------------------------------------


def _canonical_row(image_bytes: bytes, image_id: str = "film-1") -> dict[str, Any]:
    return {"image": {"bytes": image_bytes, "path": None}, "image_id": image_id, "modality": "chest_xray",
            "summary_caption": "Chest X-ray with nodule.", "report_caption": "A nodule in the right upper zone.",
            "regions": [{"bbox": [4.0, 4.0, 20.0, 20.0], "caption": "nodule in the right upper zone",
                         "label": "nodule"}],
            "negative_captions": ["A nodule in the left upper zone."], "labels": ["nodule"], "uncertain_labels": [],
            "split": "train"}


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(**columns: Any) -> Callable[[Path], Path]:
    """A one-shard dataset folder holding the canonical row with `columns` replaced or added (a value
    typed as pyarrow infers it, or a `(value, pyarrow type)` pair) or dropped (`_DROP`)."""
    def build(folder: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from regionmed_clip.data.schema import CANONICAL_FEATURES

        folder.mkdir()
        table = pa.Table.from_pylist([_canonical_row(_png_bytes())], schema=CANONICAL_FEATURES.arrow_schema)
        for name, value in columns.items():
            if name in table.column_names:
                table = table.drop_columns(name)
            if value is not _DROP:
                value, kind = value if isinstance(value, tuple) else (value, None)
                table = table.append_column(name, pa.array([value], type=kind))
        pq.write_table(table, folder / "train-00000.parquet")
        return folder
    return build


_DROP = object()


def _variable_length_regions(bbox: list[float] | None = None, kind: str = "float64") -> tuple[list[dict[str, Any]], Any]:
    """The canonical row's regions (its bbox replaced by `bbox`), typed with a variable-length bbox list."""
    import pyarrow as pa

    region = pa.struct([("bbox", pa.list_(pa.from_numpy_dtype(np.dtype(kind)))), ("caption", pa.string()),
                        ("label", pa.string())])
    regions = _canonical_row(b"")["regions"]
    return ([{**regions[0], "bbox": bbox}] if bbox is not None else regions), pa.list_(region)


def _rows_with_ids(*image_ids: str) -> Callable[[Path], Path]:
    """A dataset folder of canonical rows with these image ids, two shards."""
    def build(folder: Path) -> Path:
        from regionmed_clip.data.schema import write_rows

        write_rows([_canonical_row(_png_bytes(), image_id) for image_id in image_ids], folder, rows_per_shard=2)
        return folder
    return build


def _ids(expected: list[str]) -> Callable[[Any], None]:
    def check(rows: list[dict[str, Any]]) -> None:
        assert [row["image_id"] for row in rows] == expected, [row["image_id"] for row in rows]
    return check


DATASET_CASES = [
    Case("dataset", "missing-column", _shard(report_caption=_DROP),
         Error(ValueError, r"train-00000\.parquet: column 'report_caption' is missing")),
    Case("dataset", "numbers-for-text", _shard(summary_caption=3),
         Error(ValueError, r"train-00000\.parquet: column 'summary_caption' is int64, expected string")),
    Case("dataset", "extra-column", _shard(notes="seen by Dr X"),
         Error(ValueError, r"train-00000\.parquet: columns \['notes'\] are not canonical")),
    Case("dataset", "other-region-keys", _shard(regions=[{"box": [1.0, 2.0, 3.0, 4.0], "caption": "x", "label": "y"}]),
         Error(ValueError, r"train-00000\.parquet: column 'regions' is list<element: struct<box")),
    Case("dataset", "three-number-boxes", _shard(regions=_variable_length_regions([1.0, 2.0, 3.0], "float32")),
         Error(ValueError, r"train-00000\.parquet: column 'regions': 1 bbox value\(s\) do not hold 4 numbers "
                           r"\(the first: row 0 of the shard, 3 numbers\)")),
    Case("dataset", "duplicate-image-ids", _rows_with_ids("a", "b", "a", "c", "a"),
         Repair("every row of an id found in more than one row left out, with a warning", _ids(["b", "c"]),
                warns=r"split 'train': 1 image_id\(s\) appear in more than one row \(3 rows, e\.g\. 'a'\)")),
    Case("dataset", "float64-boxes", _shard(regions=_variable_length_regions()),
         Repair("float64 boxes read as float32, values kept",
                lambda rows: _equal([[4.0, 4.0, 20.0, 20.0]])([region["bbox"] for region in rows[0]["regions"]]))),
]


WRITER_CASES = [
    Case("writer", "dicom-bytes.dcm", _dicom(),
         Error(ValueError, r"row 'film-1': image: bytes that PIL cannot read \(DICOM: convert it with `regionmed-data convert`\)")),
    Case("writer", "text-bytes.png", _text_file("not an image\n"),
         Error(ValueError, r"row 'film-1': image: bytes that PIL cannot read: cannot identify image file")),
]


# -- rows (the collator) --------------------------------------------------------------------------------------


def _row(image: str = "film.png", **change: Any) -> Callable[[Path], Path]:
    """A JSON row (its `image` names a file beside it, written here); `change` replaces fields, and
    `region=` comes first in `regions`, before a good one."""
    def build(path: Path) -> Path:
        images = {"film.png": lambda p: write_image(p, size=(64, 64)), "nan-float.tiff": _nan_tiff,
                  "truncated.png": _truncated_png}
        images[image](path.parent / image)
        row = {key: value for key, value in _canonical_row(b"").items() if key != "image"}
        if "region" in change:
            row["regions"] = [change.pop("region"), *row["regions"]]
        path.write_text(json.dumps({**row, **change, "image": image}))  # ensure_ascii keeps a lone surrogate
        return path
    return build


def _skipped(reason: str, row_id: str = "film-1") -> Repair:
    """Checked on the batch of a good row then this one: the row left out, or only its bad region."""
    def check(batch: dict[str, Any]) -> None:
        report = batch["skip_report"]
        assert report["reasons"] == {reason: 1}, report["reasons"]
        assert report["examples"] == {reason: [row_id]}, report["examples"]
        if reason.startswith("row:"):
            assert batch["pixel_values"].shape[0] == 1
        else:
            assert batch["pixel_values"].shape[0] == 2 and batch["roi_mask"][1].sum() == 1  # its good region kept
    kind = "row skipped" if reason.startswith("row:") else "region dropped, the row and its good regions kept"
    return Repair(f"{kind}, counted as {reason!r}", check)


_BOX = [4.0, 4.0, 20.0, 20.0]
ROW_CASES = [
    Case("rows", "null-image-id.json", _row(image_id=None), _skipped("row: image_id is missing or null", "None")),
    Case("rows", "empty-image-id.json", _row(image_id=""), _skipped("row: image_id is empty", "")),
    Case("rows", "null-labels.json", _row(labels=None), _skipped("row: labels is missing or null, not a list")),
    Case("rows", "null-label.json", _row(labels=["nodule", None]), _skipped("row: labels[1] is null, not text")),
    Case("rows", "null-report.json", _row(report_caption=None), _skipped("row: report_caption is missing or null")),
    Case("rows", "numeric-report.json", _row(report_caption=42), _skipped("row: report_caption is int, not text")),
    Case("rows", "blank-summary.json", _row(summary_caption="   "), _skipped("row: summary_caption is empty")),
    Case("rows", "lone-surrogate.json", _row(report_caption="left \ud800 lung"),
         _skipped("row: report_caption is not valid UTF-8 (a lone surrogate)")),
    Case("rows", "null-negatives.json", _row(negative_captions=None),
         _skipped("row: negative_captions is missing or null, not a list")),
    Case("rows", "null-negative.json", _row(negative_captions=["fine", None]),
         _skipped("row: negative_captions[1] is missing or null")),
    Case("rows", "null-regions.json", _row(regions=None), _skipped("row: regions is missing or null, not a list")),
    Case("rows", "nan-float-image.json", _row("nan-float.tiff", regions=[]),
         _skipped("row: image rejected by the processor (ValueError)")),
    Case("rows", "truncated-image.json", _row("truncated.png"), _skipped("row: image does not decode (OSError)")),
    Case("rows", "null-bbox.json", _row(region={"bbox": None, "caption": "x", "label": "nodule"}),
         _skipped("region: bbox missing or null")),
    Case("rows", "no-bbox.json", _row(region={"caption": "x", "label": "nodule"}), _skipped("region: bbox missing or null")),
    Case("rows", "bbox-of-strings.json", _row(region={"bbox": ["a", "b", "c", "d"], "caption": "x", "label": "nodule"}),
         _skipped("region: bbox is not 4 numbers")),
    Case("rows", "nan-bbox.json", _row(region={"bbox": [1.0, 2.0, math.nan, 9.0], "caption": "x", "label": "nodule"}),
         _skipped("region: bbox holds NaN or inf")),
    Case("rows", "no-region-caption.json", _row(region={"bbox": _BOX, "label": "nodule"}),
         _skipped("region: region caption is missing or null")),
    Case("rows", "inverted-box.json", _row(region={"bbox": [40.0, 40.0, 10.0, 10.0], "caption": "x", "label": "nodule"}),
         _skipped("region: box inverted or of zero area")),
    Case("rows", "box-off-the-image.json", _row(region={"bbox": [900.0, 900.0, 950.0, 950.0], "caption": "x",
                                                        "label": "nodule"}),
         _skipped("region: box outside the image")),
]


# -- checkpoints ----------------------------------------------------------------------------------------------


def _damaged_checkpoint(damage: Callable[[Path], None]) -> Callable[[Path], Path]:
    """A run folder with intact checkpoint-1 and checkpoint-2, then `damage(checkpoint-2)`."""
    def build(run: Path) -> Path:
        import torch
        from safetensors.torch import save_file

        from regionmed_clip.training_scripts.checkpoints import write_completion_marker

        for step in (1, 2):
            folder = run / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            save_file({"weight": torch.full((64, 64), float(step))}, folder / "model.safetensors")
            torch.save({"state": {0: {"exp_avg": torch.ones(64)}}}, folder / "optimizer.pt")
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            write_completion_marker(folder, step)
        damage(run / "checkpoint-2")
        return run
    return build


def _flip_byte(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[len(data) - 9] ^= 0x40  # inside the weights: the file still parses, with a wrong value
        (folder / name).write_bytes(bytes(data))
    return damage


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def _fall_back(failed: str) -> Repair:
    def check(result: tuple[Path | None, str]) -> None:
        chosen, log = result
        assert chosen is not None and chosen.name == "checkpoint-1", chosen
        assert "checkpoint-2" in log and failed in log, log
    return Repair(f"checkpoint-2 skipped, the warning naming {failed!r}; resumes from checkpoint-1", check)


CHECKPOINT_CASES = [
    Case("checkpoints", "flipped-byte-in-weights", _damaged_checkpoint(_flip_byte("model.safetensors")),
         _fall_back("model.safetensors: contents changed since it was written")),
    Case("checkpoints", "truncated-optimizer", _damaged_checkpoint(_truncate("optimizer.pt")),
         _fall_back("optimizer.pt: ")),
    Case("checkpoints", "truncated-trainer-state", _damaged_checkpoint(_truncate("trainer_state.json")),
         _fall_back("trainer_state.json: ")),
    Case("checkpoints", "missing-weights", _damaged_checkpoint(lambda folder: (folder / "model.safetensors").unlink()),
         _fall_back("model.safetensors: missing")),
    Case("checkpoints", "killed-while-saving", _damaged_checkpoint(
        lambda folder: (folder / "CHECKPOINT_COMPLETE").unlink()), _fall_back("no CHECKPOINT_COMPLETE marker")),
    Case("checkpoints", "unreadable-marker", _damaged_checkpoint(
        lambda folder: (folder / "CHECKPOINT_COMPLETE").write_text("{\"files\": ")),
         _fall_back("CHECKPOINT_COMPLETE is unreadable")),
]


# -- converters -----------------------------------------------------------------------------------------------


def _release(name: str, content: bytes | Callable[[], bytes], images: Callable[[Path], Any] = lambda folder: None
             ) -> Callable[[Path], Path]:
    """A release folder: the annotation file `name` holding `content`, and `images(folder)` beside it."""
    def build(folder: Path) -> Path:
        folder.mkdir()
        images(folder)
        (folder / name).write_bytes(content() if callable(content) else content)
        return folder / name
    return build


_RSNA = "stage_2_train_labels.csv"
_RSNA_HEADER = b"patientId,x,y,width,height,Target\n"


def _rsna_float_export() -> bytes:
    """The RSNA fixture as a pandas float export writes it: Target 1.0 / 0.0."""
    source = (FIXTURES / "rsna_pneumonia" / _RSNA).read_text()
    return source.replace(",1\n", ",1.0\n").replace(",0\n", ",0.0\n").encode()


def _coco_document(**change: Any) -> Callable[[], bytes]:
    def content() -> bytes:
        document = json.loads((FIXTURES / "coco" / "instances_val.json").read_text())
        for key, extra in change.items():
            document[key] = document[key] + extra
        return json.dumps(document).encode()
    return content


def _exif_portrait(folder: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 20 landscape; viewers rotate it to 20 x 40 portrait
    Image.new("L", (40, 20), 0).save(folder / "a.jpg", exif=exif)


_EXIF_COCO = json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 40}],
                         "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 4, 10, 30], "category_id": 1}],
                         "categories": [{"id": 1, "name": "nodule"}]}).encode()


def _ms_cxr_two_paths() -> bytes:
    """The MS-CXR fixture with d1's second row naming d3's image path."""
    source = (FIXTURES / "ms_cxr" / "MS_CXR_Local_Alignment_v1.0.0.csv").read_text().splitlines()
    moved = source[2].replace("p10/p10000032/s50414267/d1.jpg", "p12/p12000012/s52000001/d3.jpg")
    return ("\n".join([source[0], source[1], moved, *source[3:]]) + "\n").encode()


def _converted(check: Callable[[Any, dict[str, dict]], None], description: str) -> Repair:
    """A repair checked on `(stats, rows by image id)` of the conversion."""
    return Repair(description, lambda result: check(*result))


def _labels_and_boxes(stats: Any, rows: dict[str, dict]) -> None:
    assert {pid: row["labels"] for pid, row in rows.items()} == {
        "p1": ["No Lung Opacity"], "p2": ["Lung Opacity"], "p3": ["No Lung Opacity"]}
    assert boxes(rows["p2"]) == [[10, 20, 25, 50], [40, 22, 56, 50]]


def _coco_duplicates_counted(stats: Any, rows: dict[str, dict]) -> None:
    assert "b.png" not in rows and set(rows) == {"a.png", "c.png"}
    assert reasons(stats)["image id listed for two files"] == 1
    assert reasons(stats)["file listed under two image ids"] == 1


def _upright(stats: Any, rows: dict[str, dict]) -> None:
    assert rows["a.jpg"]["image"].size == (20, 40)  # the pixels the annotation was made on
    assert boxes(rows["a.jpg"]) == [[2, 4, 12, 34]]  # as annotated, not rescaled by (2, 0.5)


def _two_paths_counted(stats: Any, rows: dict[str, dict]) -> None:
    assert "d1" not in rows and reasons(stats)["dicom_id listed with two image paths"] == 1


CONVERTER_CASES = [
    Case("converters", "rsna-pneumonia.unterminated-quote",
         _release(_RSNA, _RSNA_HEADER + b'p1,,,,,0\np2,10,20,"15,30,1\np3,,,,,0\np4,5,5,10,10,1\n'),
         Error(ValueError, r"stage_2_train_labels.csv, line 3: a quoted field runs to line")),
    Case("converters", "rsna-pneumonia.not-utf8", _release(_RSNA, _RSNA_HEADER + b"p1,,,,,0\np2,10,20,15,30,\xff\n"),
         Error(ValueError, r"stage_2_train_labels.csv, line 3: not UTF-8 text")),
    Case("converters", "rsna-pneumonia.huge-field",
         _release(_RSNA, _RSNA_HEADER + b"p1,,,,,0\np2," + b"9" * 140_000 + b",20,15,30,1\n"),
         Error(ValueError, r"stage_2_train_labels.csv, line 3: field larger than field limit")),
    Case("converters", "rsna-pneumonia.no-image-decodes", _release(_RSNA, (FIXTURES / "rsna_pneumonia" / _RSNA).read_bytes),
         Error(ValueError, r"no row could be converted .* \(skipped 4: missing image: 4 \(e\.g\. p1 \(tried")),
    Case("converters", "rsna-pneumonia.target-as-float", _release(_RSNA, _rsna_float_export, make_rsna_images),
         _converted(_labels_and_boxes, "Target read as a number: 1.0 stays positive, 0.0 negative")),
    Case("converters", "coco.truncated-json", _release("instances_val.json", b'{"images": ['),
         Error(ValueError, r"instances_val.json, line 1 column 13: not valid JSON")),
    Case("converters", "coco.a-list", _release("instances_val.json", b"[1, 2]"),
         Error(ValueError, r"a COCO file is a JSON object .* got a list")),
    Case("converters", "coco.duplicate-ids", _release("instances_val.json", _coco_document(images=[
        {"id": 2, "file_name": "c.png", "width": 64, "height": 64},  # id 2 names two files
        {"id": 7, "file_name": "a.png", "width": 64, "height": 64}]), make_coco_images),  # a.png under two ids
         _converted(_coco_duplicates_counted, "an image id naming two files, a file under two ids: left out, counted")),
    Case("converters", "coco.exif-rotated", _release("instances_train.json", _EXIF_COCO, _exif_portrait),
         _converted(_upright, "stored upright as EXIF says; boxes kept, not stretched")),
    Case("converters", "ms-cxr.two-paths-one-id", _release("two_paths.csv", _ms_cxr_two_paths, make_ms_cxr_images),
         _converted(_two_paths_counted, "a dicom_id listed with two image paths: left out, counted")),
]


# -- model ----------------------------------------------------------------------------------------------------

MODEL_CASES = [
    Case("model", "boxes-beyond-one.json", _region([[[0.1, 0.1, 1.4, 0.5]]]),
         Error(ValueError, r"roi_boxes must be normalised xyxy in \[0, 1\] with x1 > x0 and y1 > y0")),
    Case("model", "inverted-boxes.json", _region([[[0.6, 0.1, 0.2, 0.5]]]),
         Error(ValueError, r"roi_boxes must be normalised xyxy in \[0, 1\] with x1 > x0 and y1 > y0")),
    Case("model", "pixel-boxes.json", _region([[[12.0, 8.0, 40.0, 30.0]]]),
         Error(ValueError, r"roi_boxes must be normalised xyxy in \[0, 1\]")),
    Case("model", "nan-boxes.json", _region([[[0.1, math.nan, 0.4, 0.5]]]),
         Error(ValueError, r"roi_boxes holds NaN or inf in a valid slot")),
]


CASES: list[Case] = [*IMAGE_CASES, *DICOM_CASES, *REGION_CASES, *PROCESSOR_CASES, *TOKENIZER_CASES, *DATASET_CASES, *WRITER_CASES, *ROW_CASES,
                     *CHECKPOINT_CASES, *CONVERTER_CASES, *MODEL_CASES]


def generate(out: Path, cases: list[Case] | None = None) -> dict[str, Path]:
    """Write every case's input under `out/<layer>/` and `out/manifest.json`; returns {layer/name: input}."""
    cases = CASES if cases is None else cases
    written = {}
    for case in cases:
        folder = out / case.layer
        folder.mkdir(parents=True, exist_ok=True)
        written[f"{case.layer}/{case.name}"] = case.build(folder / case.name)
    manifest = [{"layer": case.layer, "name": case.name, "input": str(written[f"{case.layer}/{case.name}"].relative_to(out)),
                 **({"outcome": "error", "error": case.expect.type.__name__, "message": case.expect.match}
                    if isinstance(case.expect, Error) else {"outcome": "repair", "repair": case.expect.description,
                                                            **({"warns": case.expect.warns} if case.expect.warns else {})})}
                for case in cases]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT_DIR")
    target = Path(sys.argv[1])
    if target.exists():
        shutil.rmtree(target)
    print(f"wrote {len(generate(target))} cases to {target}")
