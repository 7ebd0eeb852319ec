"""Tests for processing.medical_image_io: PIL modes, numpy dtypes, paths, DICOM, errors and the size limit."""

import copy
import warnings

import numpy as np
import pytest
from PIL import Image

from regionmed_clip.processing.medical_image_io import is_dicom_file, load_medical_image, load_medical_pil


def assert_fresh_uint8(out: np.ndarray, shape: tuple[int, ...]) -> None:
    assert out.dtype == np.uint8
    assert out.shape == shape
    assert out.flags.c_contiguous
    assert out.flags.writeable


# ---------------------------------------------------------------------------------------------------------------
# PIL images
# ---------------------------------------------------------------------------------------------------------------


def test_pil_l_is_returned_as_is():
    values = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_medical_image(Image.fromarray(values))
    assert_fresh_uint8(out, (3, 4))
    np.testing.assert_array_equal(out, values)


def test_pil_mode_1_becomes_0_and_255():
    image = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    assert image.mode == "1"
    out = load_medical_image(image)
    assert_fresh_uint8(out, (2, 2))
    np.testing.assert_array_equal(out, [[0, 255], [255, 0]])


def test_pil_la_drops_alpha():
    image = Image.new("LA", (3, 2), (77, 0))
    out = load_medical_image(image)
    assert_fresh_uint8(out, (2, 3))
    assert (out == 77).all()


def test_pil_rgb_and_rgba_keep_colour_channels_uncomposited():
    rgb = load_medical_image(Image.new("RGB", (3, 2), (10, 20, 30)))
    assert_fresh_uint8(rgb, (2, 3, 3))
    # Fully transparent: compositing onto black/white would change the colour; the rule keeps it.
    rgba = load_medical_image(Image.new("RGBA", (3, 2), (10, 20, 30, 0)))
    assert_fresh_uint8(rgba, (2, 3, 3))
    np.testing.assert_array_equal(rgba, rgb)
    assert (rgba == [10, 20, 30]).all()


def test_pil_palette_becomes_rgb():
    source = Image.new("RGB", (4, 2), (200, 10, 10))
    image = source.convert("P")
    assert image.mode == "P"
    out = load_medical_image(image)
    assert_fresh_uint8(out, (2, 4, 3))
    np.testing.assert_array_equal(out, np.array(image.convert("RGB")))


def test_pil_cmyk_becomes_rgb():
    image = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # no cyan, full magenta and yellow, no black: red
    out = load_medical_image(image)
    assert_fresh_uint8(out, (2, 3, 3))
    assert (out == [255, 0, 0]).all()


def test_pil_ycbcr_becomes_rgb():
    image = Image.new("RGB", (3, 2), (0, 128, 255)).convert("YCbCr")
    out = load_medical_image(image)
    assert_fresh_uint8(out, (2, 3, 3))
    np.testing.assert_array_equal(out, np.array(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_pil_16_bit_modes_use_min_max(mode):
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    image = Image.fromarray(values) if mode == "I;16" else Image.new(mode, (2, 2))
    if mode != "I;16":
        for (y, x), value in np.ndenumerate(values):
            image.putpixel((x, y), int(value))
    assert image.mode == mode
    out = load_medical_image(image)
    assert_fresh_uint8(out, (2, 2))
    # 1000 / 4000 * 255 = 63.75 -> 64; 2000 / 4000 * 255 = 127.5 -> 128 (halves round up).
    np.testing.assert_array_equal(out, [[0, 64], [128, 255]])


def test_pil_mode_i_int32_uses_min_max():
    image = Image.fromarray(np.array([[-1000, 0], [1000, 3000]], dtype=np.int32))
    assert image.mode == "I"
    out = load_medical_image(image)
    # (v + 1000) / 4000 * 255: 0, 63.75 -> 64, 127.5 -> 128, 255.
    np.testing.assert_array_equal(out, [[0, 64], [128, 255]])


def test_pil_mode_f_float32():
    image = Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32))
    assert image.mode == "F"
    np.testing.assert_array_equal(load_medical_image(image), [[0, 128], [64, 255]])
    wide = Image.fromarray(np.array([[-2.0, 0.0], [2.0, 6.0]], dtype=np.float32))
    np.testing.assert_array_equal(load_medical_image(wide), [[0, 64], [128, 255]])


def test_pil_size_is_checked_before_conversion():
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match=r"100 pixels.*max_image_pixels=99"):
        load_medical_image(image, max_image_pixels=99)
    assert load_medical_image(image, max_image_pixels=100).shape == (10, 10, 3)


@pytest.mark.parametrize("mode", ["L", "I;16"])
@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_a_truncated_lazily_opened_pil_image_is_a_value_error(mode, image_format):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).convert(mode).save(
        buffer, image_format)
    for load in (load_medical_image, load_medical_pil):
        image = Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))  # header whole, pixels cut
        with pytest.raises(ValueError, match=r"Cannot decode the PIL image: "):
            load(image)


def test_pil_mode_that_cannot_become_rgb_is_a_value_error():
    image = Image.new("La", (2, 2))
    with pytest.raises(ValueError, match="'La'"):
        load_medical_image(image)


# ---------------------------------------------------------------------------------------------------------------
# numpy arrays
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1), (2, 3, 3)])
def test_numpy_uint8_is_copied_as_is(shape):
    values = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape) * 10
    original = values.copy()
    out = load_medical_image(values)
    expected_shape = shape[:2] if len(shape) == 3 and shape[2] == 1 else shape
    assert_fresh_uint8(out, expected_shape)
    np.testing.assert_array_equal(out, values.reshape(expected_shape))
    assert not np.shares_memory(out, values)
    out[...] = 0
    np.testing.assert_array_equal(values, original)


def test_numpy_non_contiguous_input_gives_contiguous_output():
    values = np.arange(24, dtype=np.uint8).reshape(4, 6)[:, ::2]
    out = load_medical_image(values)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("shape", [(2, 2), (2, 2, 1)])
def test_numpy_uint16_min_max_hand_computed(shape):
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16).reshape(shape)
    original = values.copy()
    out = load_medical_image(values)
    assert_fresh_uint8(out, (2, 2))
    np.testing.assert_array_equal(out, [[0, 64], [128, 255]])
    np.testing.assert_array_equal(values, original)


def test_numpy_min_max_has_no_offset_and_no_clipping():
    values = np.array([[1000, 1100], [1200, 1400]], dtype=np.uint16)
    # (v - 1000) / 400 * 255: 0, 63.75 -> 64, 127.5 -> 128, 255.
    np.testing.assert_array_equal(load_medical_image(values), [[0, 64], [128, 255]])


def test_numpy_uint16_colour_uses_one_range_for_all_channels():
    values = np.zeros((1, 2, 3), dtype=np.uint16)
    values[0, 0] = [0, 1000, 2000]
    values[0, 1] = [4000, 4000, 4000]
    out = load_medical_image(values)
    assert_fresh_uint8(out, (1, 2, 3))
    np.testing.assert_array_equal(out, [[[0, 64, 128], [255, 255, 255]]])


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (np.int16, [[-100, 0], [100, 300]]),
        (np.int32, [[-100, 0], [100, 300]]),
        (np.int64, [[-100, 0], [100, 300]]),
        (np.uint32, [[100, 200], [300, 500]]),
    ],
)
def test_numpy_other_integer_dtypes_use_min_max(dtype, values):
    values = np.array(values, dtype=dtype)
    # (v - min) / 400 * 255: 0, 63.75 -> 64, 127.5 -> 128, 255.
    np.testing.assert_array_equal(load_medical_image(values), [[0, 64], [128, 255]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 2), (2, 2, 1)])
def test_numpy_float_in_unit_range_is_multiplied_by_255(dtype, shape):
    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=dtype).reshape(shape)
    # 63.75 -> 64, 127.5 -> 128; no min-max stretch (0.25..1.0 would otherwise change).
    np.testing.assert_array_equal(load_medical_image(values), [[0, 64], [128, 255]])
    partial = np.array([[0.2, 0.4]], dtype=dtype)
    np.testing.assert_array_equal(load_medical_image(partial), np.floor(partial.astype(np.float64) * 255 + 0.5))


def test_numpy_float_outside_unit_range_uses_min_max():
    values = np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(load_medical_image(values), [[0, 64], [128, 255]])
    colour = np.stack([values, values * 0 + 3.0, values * 0 - 1.0], axis=-1)
    out = load_medical_image(colour)
    assert_fresh_uint8(out, (2, 2, 3))
    np.testing.assert_array_equal(out[..., 0], [[0, 64], [128, 255]])
    assert (out[..., 1] == 255).all() and (out[..., 2] == 0).all()


def test_constant_images():
    np.testing.assert_array_equal(load_medical_image(np.full((2, 3), 1234, dtype=np.uint16)), np.zeros((2, 3)))
    np.testing.assert_array_equal(load_medical_image(np.full((2, 3), 7.5)), np.zeros((2, 3)))
    # A constant float inside [0, 1] is an intensity already.
    np.testing.assert_array_equal(load_medical_image(np.full((2, 3), 0.5, dtype=np.float32)), np.full((2, 3), 128))


def test_numpy_bool():
    out = load_medical_image(np.array([[True, False], [False, True]]))
    assert_fresh_uint8(out, (2, 2))
    np.testing.assert_array_equal(out, [[255, 0], [0, 255]])


def test_rounding_is_to_nearest_not_truncation():
    # 1 / 3 * 255 = 85.0; 2 / 7 * 255 = 72.857 -> 73 (truncation would give 72).
    out = load_medical_image(np.array([[0, 2, 7]], dtype=np.uint16))
    np.testing.assert_array_equal(out, [[0, 73, 255]])


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [[[0, 1], [2, 3]], 3, b"\x89PNG", None])
def test_unsupported_types(bad):
    with pytest.raises(TypeError, match=rf"Unsupported image type {type(bad).__qualname__}.*PIL\.Image\.Image"):
        load_medical_image(bad)


def test_torch_tensor_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"torch\.Tensor.*numpy\.ndarray"):
        load_medical_image(torch.zeros(2, 2))


def test_rgba_array_is_rejected_with_advice():
    with pytest.raises(ValueError, match=r"\(2, 2, 4\).*drop the alpha channel"):
        load_medical_image(np.zeros((2, 2, 4), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), (1, 2, 2, 3)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match=rf"shape \({shape[0]},"):
        load_medical_image(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3"])
def test_bad_dtypes(dtype):
    with pytest.raises(ValueError, match=rf"dtype {np.dtype(dtype)}"):
        load_medical_image(np.zeros((2, 2), dtype=dtype))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_float(bad):
    values = np.array([[0.0, 0.5], [bad, 1.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="image holds NaN or inf"):
        load_medical_image(values)


def test_array_over_max_image_pixels():
    with pytest.raises(ValueError, match=r"4x5 = 20 pixels.*max_image_pixels=19"):
        load_medical_image(np.zeros((4, 5), dtype=np.uint8), max_image_pixels=19)
    assert load_medical_image(np.zeros((4, 5), dtype=np.uint8), max_image_pixels=None).shape == (4, 5)


def test_empty_array():
    with pytest.raises(ValueError, match="empty"):
        load_medical_image(np.zeros((0, 3), dtype=np.uint8))


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_max_image_pixels(bad):
    with pytest.raises(ValueError, match="max_image_pixels must be"):
        load_medical_image(np.zeros((2, 2), dtype=np.uint8), max_image_pixels=bad)


# ---------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------


def test_png_path_str_and_pathlib(tmp_path):
    values = np.arange(30, dtype=np.uint8).reshape(5, 6) * 7
    path = tmp_path / "slice.png"
    Image.fromarray(values).save(path)
    assert not is_dicom_file(path)
    for form in (path, str(path)):
        out = load_medical_image(form)
        assert_fresh_uint8(out, (5, 6))
        np.testing.assert_array_equal(out, values)


def test_rgba_png_path(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 3), (1, 2, 3, 4)).save(path)
    out = load_medical_image(path)
    assert_fresh_uint8(out, (3, 4, 3))
    assert (out == [1, 2, 3]).all()


def test_16_bit_png_path(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(path)
    np.testing.assert_array_equal(load_medical_image(path), [[0, 64], [128, 255]])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_medical_image(path)
    assert not is_dicom_file(path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image at all\n" * 20)
    with pytest.raises(ValueError, match="notes.txt"):
        load_medical_image(str(path))


def test_truncated_image_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png"):
        load_medical_image(path)


def test_path_over_max_image_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (10, 8)).save(path)
    with pytest.raises(ValueError, match=r"80 pixels.*max_image_pixels=79"):
        load_medical_image(path, max_image_pixels=79)


def test_pil_own_bomb_limit_does_not_pre_empt_ours(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("L", (100, 100), 9).save(path)
    # PIL raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS (here 2000 < 10000 pixels).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"10,000 pixels.*max_image_pixels=5,000"):
        load_medical_image(path, max_image_pixels=5000)
    out = load_medical_image(path, max_image_pixels=None)
    assert out.shape == (100, 100) and (out == 9).all()
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    # Between 1x and 2x PIL's limit it only warns; with warnings as errors that must not break loading either.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_medical_image(path).shape == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 6000


def test_is_dicom_file(tmp_path):
    dicom = tmp_path / "x.dcm"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 8)
    short = tmp_path / "short.bin"
    short.write_bytes(b"DICM")
    assert is_dicom_file(dicom) and is_dicom_file(str(dicom))
    assert not is_dicom_file(short)
    assert not is_dicom_file(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# DICOM (pydicom's bundled test files; get_testdata_file with download=False never touches the network)
# ---------------------------------------------------------------------------------------------------------------


def dicom_path(name: str) -> str:
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled")
    return path


def read_dicom(name: str):
    pydicom = pytest.importorskip("pydicom")
    return pydicom.dcmread(dicom_path(name))


def standard_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window functions of DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3, output range y_min = 0, y_max = 255."""
    x = np.asarray(x, dtype=np.float64)
    if function == "SIGMOID":  # C.11.2.1.3.1
        return 255 / (1 + np.exp(-4 * (x - center) / width))
    if function == "LINEAR":  # C.11.2.1.2.1
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    elif function == "LINEAR_EXACT":  # C.11.2.1.3.2
        low, high = center - width / 2, center + width / 2
        y = ((x - center) / width + 0.5) * 255
    else:
        raise ValueError(function)
    return np.where(x <= low, 0.0, np.where(x > high, 255.0, y))


def round_half_up(values: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(values) + 0.5)


def test_ct_small_modality_lut_and_min_max():
    path = dicom_path("CT_small.dcm")
    assert is_dicom_file(path)
    ds = read_dicom("CT_small.dcm")
    assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == -1024.0
    assert "WindowCenter" not in ds  # so the min-max rule applies
    out = load_medical_image(path)
    assert_fresh_uint8(out, (ds.Rows, ds.Columns))
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 100  # uses a good part of the range
    # Min-max after a linear rescale equals min-max of the stored values.
    raw = ds.pixel_array.astype(np.float64)
    expected = np.floor((raw - raw.min()) * 255 / (raw.max() - raw.min()) + 0.5)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_path_and_dataset_forms_agree(name):
    ds = read_dicom(name)
    from_path = load_medical_image(dicom_path(name))
    from_dataset = load_medical_image(ds)
    assert_fresh_uint8(from_dataset, (ds.Rows, ds.Columns))
    np.testing.assert_array_equal(from_path, from_dataset)


def test_mr_small_uses_its_window():
    ds = read_dicom("MR_small.dcm")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert (center, width) == (600.0, 1600.0)
    assert "VOILUTFunction" not in ds  # so LINEAR: (x + 200) / 1599, -200 and below black, 1399 and above white
    out = load_medical_image(ds)
    raw = ds.pixel_array.astype(np.float64)  # no rescale in this file
    expected = np.floor(np.clip((raw + 200) * 255 / 1599, 0, 255) + 0.5)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, round_half_up(standard_window(raw, center, width)))
    assert len(np.unique(out)) > 50


def test_hand_computed_window_after_rescale():
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    ds.set_pixel_data(np.array([[0, 50, 100], [150, 200, 60000]], dtype=np.uint16), "MONOCHROME2", 16)
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    ds.WindowCenter = [100, 999]  # multi-valued: the first pair is used
    ds.WindowWidth = [200, 1]
    # Modality values: -100, 0, 100, 200, 300, 119900; window [0, 200]: clipped, then v / 200 * 255.
    np.testing.assert_array_equal(load_medical_image(ds), [[0, 0, 128], [255, 255, 255]])


def test_a_window_of_no_width_is_ignored_with_a_warning(caplog):
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    ds.set_pixel_data(np.array([[0, 50], [100, 200]], dtype=np.uint16), "MONOCHROME2", 16)
    ds.WindowCenter, ds.WindowWidth = 100, -5
    with caplog.at_level("WARNING", logger="regionmed_clip.processing.medical_image_io"):
        out = load_medical_image(ds)
    np.testing.assert_array_equal(out, [[0, 64], [128, 255]])  # min-max, as without a window
    assert "DICOM dataset: WindowWidth -5 is not positive: the window (center 100) is ignored" in caplog.text


def test_ct_small_window_copy():
    ds = read_dicom("CT_small.dcm")
    original = load_medical_image(ds)
    windowed = copy.deepcopy(ds)
    windowed.WindowCenter = 40  # soft-tissue window in HU: -160 and below black, 239 and above white
    windowed.WindowWidth = 400
    out = load_medical_image(windowed)
    raw = ds.pixel_array
    hu = raw.astype(np.float64) - 1024  # RescaleSlope 1, RescaleIntercept -1024
    for y, x in [(0, 0), (64, 64), (40, 90), (100, 30)]:
        expected = min(255.0, max(0.0, (hu[y, x] + 160) * 255 / 399))  # LINEAR: (x - (c - w/2)) / (w - 1)
        assert out[y, x] == int(np.floor(expected + 0.5)), (y, x, raw[y, x])
    assert (out[hu <= -160] == 0).all() and (out[hu >= 240] == 255).all()
    assert not np.array_equal(out, original)
    np.testing.assert_array_equal(load_medical_image(ds), original)  # the source dataset is untouched


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_monochrome1_is_inverted(name):
    ds = read_dicom(name)
    mono1 = copy.deepcopy(ds)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(load_medical_image(mono1), 255 - load_medical_image(ds))


# VOI LUT functions and sequences (PS3.3 C.11.2), on files built here and read back from disk.
RAMP = np.arange(0, 399, 7, dtype=np.uint16).reshape(3, 19)  # modality values 2v - 100: -100 .. 684


def write_dicom_file(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> str:
    """A secondary-capture DICOM file (explicit VR little endian) of `pixels` with `tags` set; its path."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.set_pixel_data(pixels, photometric, 16)
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT"])
def test_voi_lut_function_follows_the_standard(tmp_path, function):
    path = write_dicom_file(tmp_path / "film.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-100,
                            WindowCenter=300, WindowWidth=400, VOILUTFunction=function)
    modality = 2.0 * RAMP - 100
    out = load_medical_image(path)
    assert_fresh_uint8(out, RAMP.shape)
    np.testing.assert_array_equal(out, round_half_up(standard_window(modality, 300, 400, function)))
    # The function changes the picture: without it (LINEAR), the same window gives other pixels.
    linear = round_half_up(standard_window(modality, 300, 400, "LINEAR"))
    assert (out != linear).sum() >= (10 if function == "SIGMOID" else 3)


def test_sigmoid_window_by_hand():
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    ds.set_pixel_data(np.array([[0, 100, 200]], dtype=np.uint16), "MONOCHROME2", 16)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 100, 200, "SIGMOID"
    # 255 / (1 + e^(-4 (x - 100) / 200)): e^2 = 7.389 -> 30.41; 127.5; 255 / (1 + e^-2) = 224.59.
    np.testing.assert_array_equal(load_medical_image(ds), [[30, 128, 225]])


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    path = write_dicom_file(tmp_path / "mono1.dcm", RAMP, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100,
                            WindowCenter=100, WindowWidth=300, VOILUTFunction="SIGMOID")
    windowed = round_half_up(standard_window(2.0 * RAMP - 100, 100, 300, "SIGMOID"))
    # Inverting the stored values before windowing would give another picture (the window is not centred).
    np.testing.assert_array_equal(load_medical_image(path), 255 - windowed)


def voi_lut_item(entries: list[int], first_mapped: int, bits: int, vr: str):
    """A VOI LUT Sequence item: LUT Descriptor [len(entries), first_mapped, bits], its LUT Data as `vr`."""
    pydicom = pytest.importorskip("pydicom")
    item = pydicom.Dataset()
    item.LUTDescriptor = [len(entries), first_mapped, bits]
    data = entries if vr == "US" else np.array(entries, dtype="<u2").tobytes()
    item.add_new("LUTData", vr, data)
    return item


@pytest.mark.parametrize(("bits", "vr"), [(8, "US"), (16, "OW")])
def test_voi_lut_sequence_takes_precedence_over_the_window(tmp_path, bits, vr):
    scale = (2**bits - 1) // 255  # 1 for 8-bit entries, 257 for 16-bit ones: the same picture
    # Not monotonic and not spanning 0..255: no window and no min-max could give it.
    lut = voi_lut_item([10 * scale, 50 * scale, 200 * scale, 30 * scale], 0, bits, vr)
    pixels = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint16)
    path = write_dicom_file(tmp_path / "lut.dcm", pixels, RescaleSlope=1, RescaleIntercept=-2,
                            VOILUTSequence=[lut], WindowCenter=0, WindowWidth=4)
    # Modality values -2..3: below the first mapped value (0) take entry 0, 0..3 their own entries.
    np.testing.assert_array_equal(load_medical_image(path), [[10, 10, 10], [50, 200, 30]])


def test_no_window_falls_back_to_min_max(tmp_path):
    # A VOI LUT Function with no window describes no window.
    path = write_dicom_file(tmp_path / "plain.dcm", RAMP, RescaleSlope=2, RescaleIntercept=-100,
                            VOILUTFunction="SIGMOID")
    raw = RAMP.astype(np.float64)
    np.testing.assert_array_equal(load_medical_image(path), round_half_up((raw - raw.min()) * 255 / np.ptp(raw)))


def test_a_linear_window_narrower_than_1_is_ignored_but_a_sigmoid_one_is_not(caplog):
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    ds.set_pixel_data(np.array([[0, 50], [100, 200]], dtype=np.uint16), "MONOCHROME2", 16)
    ds.WindowCenter, ds.WindowWidth = 60, 0.5  # LINEAR needs a width of at least 1 (PS3.3 C.11.2.1.2.1)
    with caplog.at_level("WARNING", logger="regionmed_clip.processing.medical_image_io"):
        np.testing.assert_array_equal(load_medical_image(ds), [[0, 64], [128, 255]])
    assert "WindowWidth 0.5 is below 1, the least a LINEAR window may have: the window (center 60)" in caplog.text
    ds.VOILUTFunction = "SIGMOID"  # any width > 0: a step at 60
    np.testing.assert_array_equal(load_medical_image(ds), [[0, 0], [255, 255]])


def test_an_unknown_voi_lut_function_is_an_error_naming_the_file(tmp_path):
    path = write_dicom_file(tmp_path / "log.dcm", RAMP, WindowCenter=100, WindowWidth=50, VOILUTFunction="LOG")
    with pytest.raises(ValueError, match=r"log\.dcm'.*VOI LUT Function value 'LOG'"):
        load_medical_image(path)


def test_multi_frame_selection_and_range():
    ds = read_dicom("rtdose.dcm")  # 15 frames of 10x10 uint32, no window
    assert int(ds.NumberOfFrames) == 15
    frames = ds.pixel_array
    for index in (0, 7, 14):
        out = load_medical_image(ds, dicom_frame=index)
        assert_fresh_uint8(out, (10, 10))
        frame = frames[index].astype(np.float64)
        expected = np.floor((frame - frame.min()) * 255 / (frame.max() - frame.min()) + 0.5)
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(
        load_medical_image(dicom_path("rtdose.dcm"), dicom_frame=7), load_medical_image(ds, dicom_frame=7)
    )
    for bad in (15, -1):
        with pytest.raises(ValueError, match=rf"dicom_frame={bad}.*15 frame"):
            load_medical_image(ds, dicom_frame=bad)


def test_hand_built_multi_frame():
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    frames = np.stack([np.array([[0, 10], [20, 40]]) * (k + 1) for k in range(3)]).astype(np.uint16)
    ds.set_pixel_data(frames, "MONOCHROME2", 16)
    assert int(ds.NumberOfFrames) == 3
    for k in range(3):
        np.testing.assert_array_equal(load_medical_image(ds, dicom_frame=k), [[0, 64], [128, 255]])
    with pytest.raises(ValueError, match=r"dicom_frame=3.*3 frame"):
        load_medical_image(ds, dicom_frame=3)


# Enhanced multi-frame DICOM keeps the rescale and the window in functional groups, not at the top level.
ENHANCED_FRAME = np.array([[0, 50, 100], [150, 200, 60000]], dtype=np.uint16)


def functional_group(rescale=None, window=None, function=None):
    """A functional-groups item with an optional (slope, intercept) and (center, width[, VOI LUT function]) macro."""
    pydicom = pytest.importorskip("pydicom")
    group = pydicom.Dataset()
    if rescale is not None:
        transform = pydicom.Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = rescale
        transform.RescaleType = "HU"
        group.PixelValueTransformationSequence = [transform]
    if window is not None:
        voi = pydicom.Dataset()
        voi.WindowCenter, voi.WindowWidth = window
        voi.WindowCenterWidthExplanation = "TEST"
        if function is not None:
            voi.VOILUTFunction = function
        group.FrameVOILUTSequence = [voi]
    return group


def enhanced_ct(frames, shared, per_frame=None):
    """An in-memory Enhanced CT dataset; ``per_frame`` defaults to groups holding neither macro."""
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.Dataset()
    ds.SOPClassUID = pydicom.uid.EnhancedCTImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.set_pixel_data(frames, "MONOCHROME2", 16)
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = per_frame or [functional_group() for _ in frames]
    return ds


def test_enhanced_shared_group_matches_classic_top_level_tags(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    frames = np.stack([ENHANCED_FRAME + 25 * k for k in range(3)])
    ds = enhanced_ct(frames, functional_group(rescale=(2, -100), window=(100, 200)))
    assert "RescaleSlope" not in ds and "WindowCenter" not in ds
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    # Modality values 2v - 100, LINEAR window [0, 200), m / 199 * 255: frame 1 is -50, 50, 150, 250 -> 0, 64, 192, 255.
    hand_computed = [[[0, 0, 128], [255, 255, 255]], [[0, 64, 192], [255, 255, 255]], [[0, 128, 255], [255, 255, 255]]]
    for k in range(3):
        classic = pydicom.Dataset()
        classic.set_pixel_data(frames[k], "MONOCHROME2", 16)
        classic.RescaleSlope, classic.RescaleIntercept = 2, -100
        classic.WindowCenter, classic.WindowWidth = 100, 200
        out = load_medical_image(ds, dicom_frame=k)
        assert_fresh_uint8(out, (2, 3))
        np.testing.assert_array_equal(out, hand_computed[k])
        np.testing.assert_array_equal(out, load_medical_image(classic))
        np.testing.assert_array_equal(load_medical_image(path, dicom_frame=k), out)


def test_enhanced_per_frame_windows_are_each_frames_own():
    frames = np.stack([ENHANCED_FRAME] * 3)  # identical pixels: only the windows tell the frames apart
    # LINEAR windows (c, w) map [c - w/2, c + w/2 - 1] as (v - c + w/2) / (w - 1).
    per_frame = [
        functional_group(window=(100, 200)),  # [0, 199]
        functional_group(window=([1000, 5], [2000, 1])),  # multi-valued: the first pair, [0, 1999]
        functional_group(window=(100, 100)),  # [50, 149]
    ]
    ds = enhanced_ct(frames, functional_group(), per_frame)
    expected = [
        [[0, 64, 128], [192, 255, 255]],  # v / 199 * 255: 64.07, 128.14, 192.21
        [[0, 6, 13], [19, 26, 255]],  # v / 1999 * 255: 6.38, 12.76, 19.13, 25.51
        [[0, 0, 129], [255, 255, 255]],  # (100 - 50) / 99 * 255 = 128.79
    ]
    for k in range(3):
        np.testing.assert_array_equal(load_medical_image(ds, dicom_frame=k), expected[k])


def test_enhanced_per_frame_group_overrides_shared_and_shared_overrides_top_level():
    frames = np.stack([ENHANCED_FRAME] * 4)
    per_frame = [
        functional_group(),  # both from the shared group
        functional_group(window=(0, 400)),  # own window [-200, 200], shared rescale
        functional_group(rescale=(1, 0)),  # own rescale, shared window
        functional_group(rescale=(1, -50), window=(0, 400)),  # both its own
    ]
    ds = enhanced_ct(frames, functional_group(rescale=(2, -100), window=(100, 200)), per_frame)
    # Top-level tags that would give other results if they were used instead of the groups.
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 5000, 10
    # LINEAR windows: (100, 200) maps m / 199 * 255, (0, 400) maps (m + 200) / 399 * 255.
    expected = [
        [[0, 0, 128], [255, 255, 255]],  # m = 2v - 100 in window (100, 200)
        [[64, 128, 192], [255, 255, 255]],  # m = 2v - 100 in window (0, 400)
        [[0, 64, 128], [192, 255, 255]],  # m = v in window (100, 200)
        [[96, 128, 160], [192, 224, 255]],  # m = v - 50 in window (0, 400)
    ]
    for k in range(4):
        np.testing.assert_array_equal(load_medical_image(ds, dicom_frame=k), expected[k])
    # Without functional groups the top-level tags apply: window [4995, 5005] on v leaves only 60000 white.
    del ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence
    np.testing.assert_array_equal(load_medical_image(ds, dicom_frame=1), [[0, 0, 0], [0, 0, 255]])


def test_enhanced_voi_lut_function_is_the_window_items_own():
    frames = np.stack([ENHANCED_FRAME] * 2)
    per_frame = [functional_group(), functional_group(window=(100, 200))]  # frame 1: its own window, no function
    ds = enhanced_ct(frames, functional_group(window=(100, 200), function="SIGMOID"), per_frame)
    ds.VOILUTFunction = "LINEAR_EXACT"  # top level: used by neither frame
    values = ENHANCED_FRAME.astype(np.float64)
    np.testing.assert_array_equal(load_medical_image(ds, dicom_frame=0),
                                  round_half_up(standard_window(values, 100, 200, "SIGMOID")))
    np.testing.assert_array_equal(load_medical_image(ds, dicom_frame=1),
                                  round_half_up(standard_window(values, 100, 200, "LINEAR")))


def test_single_frame_accepts_only_frame_0():
    ds = read_dicom("CT_small.dcm")
    with pytest.raises(ValueError, match=r"dicom_frame=1.*1 frame"):
        load_medical_image(ds, dicom_frame=1)


def test_dicom_over_max_image_pixels():
    ds = read_dicom("CT_small.dcm")
    with pytest.raises(ValueError, match=r"128x128 = 16,384 pixels.*max_image_pixels=1,000"):
        load_medical_image(ds, max_image_pixels=1000)


def test_colour_rgb_dicom():
    ds = read_dicom("SC_rgb_rle.dcm")
    out = load_medical_image(ds)
    assert_fresh_uint8(out, (100, 100, 3))
    np.testing.assert_array_equal(out, ds.pixel_array)
    np.testing.assert_array_equal(out[0, 50], [255, 0, 0])  # the top band is pure red


def test_colour_ybr_dicom_is_converted_once():
    ybr = read_dicom("SC_ybr_full_422_uncompressed.dcm")
    assert ybr.PhotometricInterpretation == "YBR_FULL_422"
    out = load_medical_image(ybr)
    assert_fresh_uint8(out, (100, 100, 3))
    reference = read_dicom("SC_rgb_rle.dcm").pixel_array.astype(int)  # the same picture stored as RGB
    # YBR round-trip error is at most 6 levels here; converting twice would be off by up to 255.
    assert np.abs(out.astype(int) - reference).max() <= 8


def test_colour_16_bit_dicom_min_max():
    ds = read_dicom("SC_rgb_rle_16bit.dcm")
    out = load_medical_image(ds)
    assert_fresh_uint8(out, (ds.Rows, ds.Columns, 3))
    raw = ds.pixel_array.astype(np.float64)
    expected = np.floor((raw - raw.min()) * 255 / (raw.max() - raw.min()) + 0.5)
    np.testing.assert_array_equal(out, expected)


def test_multi_frame_colour_dicom():
    ds = read_dicom("SC_rgb_rle_2frame.dcm")
    out = load_medical_image(ds, dicom_frame=1)
    assert_fresh_uint8(out, (100, 100, 3))
    np.testing.assert_array_equal(out, ds.pixel_array[1])


def test_duck_typed_ybr_dataset_uses_convert_color_space():
    pydicom = pytest.importorskip("pydicom")
    path = dicom_path("SC_ybr_full_422_uncompressed.dcm")
    ds = pydicom.dcmread(path)
    raw_ybr = pydicom.pixels.pixel_array(path, raw=True)  # still YBR: the duck object claims so too

    class DuckDataset:
        """Not a pydicom Dataset: exposes a header and pixel_array that match each other."""

        def __init__(self, source, pixel_array):
            self._source = source
            self.pixel_array = pixel_array

        def __getattr__(self, name):
            return getattr(self._source, name)

        def __contains__(self, key):
            return key in self._source

        def get(self, key, default=None):
            return self._source.get(key, default)

    out = load_medical_image(DuckDataset(ds, raw_ybr))
    assert_fresh_uint8(out, (100, 100, 3))
    np.testing.assert_array_equal(out, load_medical_image(ds))


def test_palette_colour_dicom():
    pydicom = pytest.importorskip("pydicom")
    ds = read_dicom("examples_palette.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    out = load_medical_image(ds)
    assert_fresh_uint8(out, (ds.Rows, ds.Columns, 3))
    rgb16 = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(out, rgb16 >> 8)


def test_missing_pydicom_gives_install_hint(monkeypatch):
    import builtins

    ds = read_dicom("CT_small.dcm")
    path = dicom_path("CT_small.dcm")
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"regionmed-clip\[dicom\]"):
        load_medical_image(ds)
    with pytest.raises(ImportError, match=r"regionmed-clip\[dicom\]"):
        load_medical_image(path)


def _sources(tmp_path) -> dict[str, object]:
    """One image of each kind `load_medical_pil` takes that is not already "L" / "RGB" PIL."""
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 255, (5, 7), dtype=np.uint8)
    colour = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(colour).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(tmp_path / "deep.png")
    return {
        "grey-png-path": tmp_path / "grey.png",
        "rgba-png-path": str(tmp_path / "rgba.png"),
        "16-bit-png-path": tmp_path / "deep.png",
        "uint8-array": grey,
        "uint16-colour-array": rng.integers(0, 4000, (5, 7, 3)).astype(np.uint16),
        "float-array": rng.random((5, 7)),
        "palette-pil": Image.fromarray(colour).convert("P"),
        "mode-1-pil": Image.fromarray(grey > 128),
    }


@pytest.mark.parametrize("kind", ["grey-png-path", "rgba-png-path", "16-bit-png-path", "uint8-array",
                                  "uint16-colour-array", "float-array", "palette-pil", "mode-1-pil"])
def test_pil_form_holds_the_array_rules_pixels(tmp_path, kind):
    source = _sources(tmp_path)[kind]
    image = load_medical_pil(source)
    expected = load_medical_image(source)
    assert image.mode == ("L" if expected.ndim == 2 else "RGB")
    np.testing.assert_array_equal(np.asarray(image), expected)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pil_form_of_a_dicom_path_follows_the_dicom_rules(name):
    path = dicom_path(name)
    np.testing.assert_array_equal(np.asarray(load_medical_pil(path)), load_medical_image(path))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pil_form_returns_an_l_or_rgb_image_itself_untouched(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 4, 3), dtype=np.uint8)).convert(mode)
    before = np.asarray(image).copy()
    assert load_medical_pil(image) is image
    np.testing.assert_array_equal(np.asarray(image), before)


def test_pil_form_keeps_the_checks_and_their_messages(tmp_path):
    with pytest.raises(ValueError, match=r"80 pixels.*max_image_pixels=79"):
        load_medical_pil(Image.new("L", (10, 8)), max_image_pixels=79)
    Image.new("RGB", (10, 8)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"80 pixels.*max_image_pixels=79"):
        load_medical_pil(tmp_path / "big.png", max_image_pixels=79)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_medical_pil(tmp_path / "nope.png")
    (tmp_path / "notes.txt").write_text("not an image at all\n" * 20)
    with pytest.raises(ValueError, match="notes.txt"):
        load_medical_pil(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="dicom_frame must be an int"):
        load_medical_pil(Image.new("L", (2, 2)), dicom_frame=1.0)


def test_pil_form_of_a_file_leaves_no_file_open(tmp_path):
    Image.new("RGB", (8, 8), (9, 8, 7)).save(tmp_path / "film.tiff")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        image = load_medical_pil(tmp_path / "film.tiff")
        assert image.getpixel((3, 3)) == (9, 8, 7)
        assert image.fp is None
