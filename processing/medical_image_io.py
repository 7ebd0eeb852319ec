"""Decode medical images (PIL images, numpy arrays, image files, DICOM) into uint8 arrays.

`load_medical_image` turns one image into a new C-contiguous ``uint8`` array, shaped ``(H, W)`` for grayscale
or ``(H, W, 3)`` for colour (RGB). `load_medical_pil` gives the same pixels as a PIL image of mode ``"L"`` or
``"RGB"`` for callers that resample (the image processor): an ``"L"`` / ``"RGB"`` PIL image is returned as it
is (the caller's image, read, never modified), and an image file of those modes as PIL decoded it, so a huge
image is not copied into an array and back. These rules are the documentation of what both do:

PIL images (``PIL.Image.Image``)
    * ``"1"``, ``"L"``, ``"LA"`` -> grayscale; ``"1"`` becomes 0/255. The alpha of ``"LA"`` is discarded.
    * ``"RGB"`` -> as is. ``"RGBA"``: the alpha channel is discarded; the colour channels are kept as they are,
      *not* composited onto a background.
    * ``"P"``, ``"CMYK"`` and every other mode that PIL can convert to RGB -> RGB via ``Image.convert("RGB")``.
      A mode PIL cannot convert raises ``ValueError`` naming the mode.
    * ``"I;16"`` (and ``I;16B``/``I;16L``/``I;16N``), ``"I"`` (int32), ``"F"`` (float32) -> high-bit-depth rule.
    * Only the current frame of a multi-frame image (GIF, TIFF) is read; EXIF orientation is not applied.
    * A lazily opened image (``Image.open``) is decoded here: pixel data PIL cannot decode (a truncated file)
      raises ``ValueError`` ("Cannot decode the PIL image"), not PIL's ``OSError``.

numpy arrays
    * Shapes ``(H, W)``, ``(H, W, 1)`` (returned as ``(H, W)``) and ``(H, W, 3)``. ``(H, W, 4)`` raises
      ``ValueError``: drop the alpha channel yourself (e.g. ``arr[..., :3]``). Other shapes raise ``ValueError``.
    * ``uint8`` -> copied as is; ``bool`` -> True is 255, False is 0; any other integer dtype and
      ``float16/32/64`` -> high-bit-depth rule. Other dtypes (complex, object, ...) raise ``ValueError``.

High-bit-depth rule (integers other than uint8, floats, DICOM without a window)
    * Min-max: the image's own value range is scaled linearly onto 0..255 with no clipping, so the darkest
      pixel becomes 0 and the brightest 255. Colour images are scaled with one range over all channels,
      which keeps the colour balance. A constant image becomes all zeros.
    * Exception: a float image whose values all lie in [0, 1] is taken as intensities already and is
      multiplied by 255 (this includes a constant float image such as all 0.5 -> all 128).
    * A float image holding NaN or inf raises ``ValueError``.
    * Results are rounded to the nearest integer (halves round up), never truncated.

Paths (``str`` / ``os.PathLike``)
    * A missing file raises ``FileNotFoundError``. A file with ``b"DICM"`` at bytes 128:132 (`is_dicom_file`)
      is read with pydicom and follows the DICOM rules; any other file is opened with PIL and follows the PIL
      rules. A file PIL cannot identify or decode raises ``ValueError`` naming the path. A DICOM file without
      the 128-byte preamble is not recognised: read it with ``pydicom.dcmread(path, force=True)`` and pass
      the dataset instead.

DICOM (a ``pydicom.Dataset`` or a DICOM path; needs the optional ``pydicom>=3``, ``regionmed-clip[dicom]``)
    1. Multi-frame data (``NumberOfFrames > 1``): only frame ``dicom_frame`` (0-based) is decoded; an index
       outside ``0..NumberOfFrames-1`` raises ``ValueError``. Single-frame data accepts only ``dicom_frame=0``.
    2. Colour (``SamplesPerPixel == 3``): YBR data is converted to RGB (pydicom's decoder usually does this
       already; ``pydicom.pixels.convert_color_space`` handles what it left as YBR). 8-bit data is returned as
       is; deeper data is min-max scaled to 8 bits. ``PALETTE COLOR`` data goes through its palette
       (``apply_color_lut``); 16-bit palette entries keep their high byte.
    3. Grayscale: the modality LUT (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence) is applied
       first, so windows are in modality units (e.g. Hounsfield units); a ``RescaleSlope`` of 0 (every pixel
       the same value) is an error, not a blank image. Then, in order of preference (as pydicom's
       ``apply_voi_lut``, which prefers the LUT):
       a VOI LUT Sequence -> its first LUT (``apply_voi``), whose output range ``0..2**n - 1`` (``n`` the third
       LUT Descriptor value) is mapped onto 0..255; ``WindowCenter``/``WindowWidth`` (the first value when
       multi-valued) -> the window function of ``VOILUTFunction`` (PS3.3 C.11.2.1.2), computed by
       ``apply_windowing`` onto 0..255: ``LINEAR`` (the default) and ``LINEAR_EXACT`` clip into the window
       (everything below it black, everything above it white) and map it linearly, ``SIGMOID`` maps
       ``255 / (1 + exp(-4 (x - c) / w))``. A width the standard does not allow (<= 0; below 1 for ``LINEAR``)
       is ignored with a logged warning naming the file, and an unknown ``VOILUTFunction`` is a ``ValueError``.
       Without a VOI LUT or a usable window: min-max.
       Enhanced multi-frame data (e.g. Enhanced CT/MR) keeps the rescale and the window in functional groups:
       the chosen frame's ``PerFrameFunctionalGroupsSequence`` item is looked up first, then the
       ``SharedFunctionalGroupsSequence`` item, then the top level, each separately for the rescale
       (``PixelValueTransformationSequence``) and for the window and its ``VOILUTFunction``
       (``FrameVOILUTSequence``). A VOI LUT Sequence is read from the top level only.
    4. ``MONOCHROME1`` is inverted after windowing (``255 - x``), so bright always means dense.

Size limit
    If ``H * W > max_image_pixels`` (unless it is ``None``) a ``ValueError`` naming the pixel count and
    ``max_image_pixels`` is raised before any pixel is decoded (a decompression-bomb guard). PIL's own, different
    limit (``Image.MAX_IMAGE_PIXELS``) never pre-empts this check with an error of its own.

Anything else (a torch tensor, a list, bytes, ...) raises ``TypeError``. The caller's array is never modified
and never shared: the result is always a new, writeable, C-contiguous ``uint8`` array.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["is_dicom_file", "load_medical_image", "load_medical_pil"]

logger = logging.getLogger(__name__)

_SUPPORTED_TYPES = (
    "a PIL.Image.Image, a numpy.ndarray, a str or os.PathLike path to an image or DICOM file, or a pydicom Dataset"
)

# Temporarily lifting PIL's global MAX_IMAGE_PIXELS must not interleave between our own threads.
_PIL_LIMIT_LOCK = threading.Lock()


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True if the file has the DICOM magic ``b"DICM"`` at bytes 128:132 (after the preamble).

    A file that is missing, unreadable or shorter than 132 bytes is not a DICOM file: returns False.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def load_medical_image(
    image: Any,
    *,
    dicom_frame: int = 0,
    max_image_pixels: int | None = 178_956_970,
) -> np.ndarray:
    """Decode one image into a uint8 array: (H, W) for grayscale, (H, W, 3) for colour.

    Args:
        image: a ``PIL.Image.Image``, a ``numpy.ndarray`` of shape (H, W), (H, W, 1) or (H, W, 3), a path
            (``str`` / ``os.PathLike``) to an image or DICOM file, or a ``pydicom.Dataset``.
        dicom_frame: 0-based frame of a multi-frame DICOM to decode; ignored for non-DICOM inputs.
        max_image_pixels: refuse images with more than this many pixels (H * W); ``None`` disables the check.
            The default equals PIL's own decompression-bomb error threshold.

    Returns:
        A new C-contiguous ``np.uint8`` array of shape (H, W) or (H, W, 3). See the module docstring for the rules.
    """
    _check_arguments(dicom_frame, max_image_pixels)
    if isinstance(image, Image.Image):
        return _from_pil(image, max_image_pixels)
    if isinstance(image, np.ndarray):
        return _from_array(image, max_image_pixels)
    if isinstance(image, (str, os.PathLike)):
        return _from_path(Path(os.fsdecode(image)), int(dicom_frame), max_image_pixels)
    if _looks_like_dicom_dataset(image):
        with _named_dicom_errors("DICOM dataset"):
            return _from_dicom(image, int(dicom_frame), max_image_pixels, "DICOM dataset")

    kind = type(image)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise TypeError(f"Unsupported image type {name}; expected {_SUPPORTED_TYPES} (convert tensors with .numpy() first)")


def load_medical_pil(
    image: Any,
    *,
    dicom_frame: int = 0,
    max_image_pixels: int | None = 178_956_970,
) -> Image.Image:
    """Decode one image into a PIL image of mode ``"L"`` (grayscale) or ``"RGB"``: the pixels of
    `load_medical_image`, with the same arguments and errors.

    An ``"L"`` / ``"RGB"`` PIL image is returned itself and a non-DICOM file of those modes as PIL
    decoded it: no copy. Anything else is decoded by the array rules, then wrapped (a grayscale array
    is shared, not copied).
    """
    _check_arguments(dicom_frame, max_image_pixels)
    if isinstance(image, Image.Image) and image.mode in _PIL_MODES:
        width, height = image.size
        _check_size(height, width, max_image_pixels)
        _load_pil(image)
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(os.fsdecode(image))
        if path.exists() and not is_dicom_file(path):
            decoded = _decode_image_file(path, max_image_pixels)
            return decoded if decoded.mode in _PIL_MODES else _array_as_pil(_file_pixels(decoded, path, max_image_pixels))
    return _array_as_pil(load_medical_image(image, dicom_frame=dicom_frame, max_image_pixels=max_image_pixels))


# ----------------------------------------------------------------------------------------------------------------
# Shared checks and the numeric rules
# ----------------------------------------------------------------------------------------------------------------

_PIL_MODES = ("L", "RGB")  # the modes `load_medical_pil` returns: grayscale and colour


def _check_arguments(dicom_frame: Any, max_image_pixels: Any) -> None:
    if max_image_pixels is not None and (
        isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels <= 0
    ):
        raise ValueError(f"max_image_pixels must be a positive int or None, got {max_image_pixels!r}")
    if isinstance(dicom_frame, bool) or not isinstance(dicom_frame, (int, np.integer)):
        raise TypeError(f"dicom_frame must be an int, got {type(dicom_frame).__name__}")


def _array_as_pil(array: np.ndarray) -> Image.Image:
    """uint8 (H, W) or (H, W, 3) -> PIL "L" / "RGB" (PIL shares a grayscale array's memory)."""
    return Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB")


def _check_size(height: int, width: int, max_image_pixels: int | None) -> None:
    """Raise ValueError for an empty image or one with more than ``max_image_pixels`` pixels."""
    if height <= 0 or width <= 0:
        raise ValueError(f"Image is empty: {height}x{width} pixels")
    pixels = height * width
    if max_image_pixels is not None and pixels > max_image_pixels:
        raise ValueError(
            f"Image has {height}x{width} = {pixels:,} pixels, more than max_image_pixels={max_image_pixels:,} "
            "(a decompression-bomb guard); pass a larger max_image_pixels, or None, for trusted images"
        )


def _as_finite_float64(values: np.ndarray) -> np.ndarray:
    """A new float64 copy of ``values`` (any shape); raises ValueError if it holds NaN or inf."""
    out = np.array(values, dtype=np.float64, order="C", copy=True)
    if values.dtype.kind == "f" and not np.isfinite(out).all():
        raise ValueError("image holds NaN or inf; clean or mask it before loading")
    return out


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    """float64 array already in [0, 255] (any shape) -> uint8, rounding halves up; ``values`` is overwritten."""
    np.floor(values + 0.5, out=values)
    # Only guards against float error at the ends; the callers already map into [0, 255].
    np.clip(values, 0.0, 255.0, out=values)
    return values.astype(np.uint8)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Any real array -> uint8 of the same shape, its own [min, max] scaled linearly onto [0, 255]."""
    out = _as_finite_float64(values)
    low, high = float(out.min()), float(out.max())
    if high == low:
        return np.zeros(out.shape, dtype=np.uint8)
    out -= low
    # Multiply before dividing: for integer inputs the product is exact, so halves (e.g. 127.5) stay exact.
    out *= 255.0
    out /= high - low
    return _round_to_uint8(out)


def _array_to_uint8(values: np.ndarray) -> np.ndarray:
    """Apply the numpy dtype rules to a (H, W) or (H, W, 3) array; always returns a new uint8 array."""
    kind = values.dtype.kind
    if values.dtype == np.uint8:
        return np.array(values, dtype=np.uint8, order="C", copy=True)
    if kind == "b":
        return np.where(values, np.uint8(255), np.uint8(0))
    if kind in "iu":
        return _minmax_to_uint8(values)
    if kind == "f":
        out = _as_finite_float64(values)
        if out.min() >= 0.0 and out.max() <= 1.0:
            # Already intensities in [0, 1]: stretching them would change the image's brightness.
            out *= 255.0
            return _round_to_uint8(out)
        return _minmax_to_uint8(out)
    raise ValueError(f"Unsupported array dtype {values.dtype}; expected uint8, bool, an integer dtype or float16/32/64")


# ----------------------------------------------------------------------------------------------------------------
# numpy and PIL inputs
# ----------------------------------------------------------------------------------------------------------------


def _from_array(values: np.ndarray, max_image_pixels: int | None) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) array of a supported dtype -> new uint8 (H, W) or (H, W, 3)."""
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    if values.ndim == 3 and values.shape[2] == 4:
        raise ValueError(
            f"Unsupported array shape {values.shape}: 4 channels (RGBA?) are ambiguous; drop the alpha channel "
            "yourself (e.g. arr[..., :3]) or composite it onto a background first"
        )
    if not (values.ndim == 2 or (values.ndim == 3 and values.shape[2] == 3)):
        raise ValueError(f"Unsupported array shape {values.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")
    if values.dtype.kind not in "biuf":
        raise ValueError(
            f"Unsupported array dtype {values.dtype}; expected uint8, bool, an integer dtype or float16/32/64"
        )
    _check_size(values.shape[0], values.shape[1], max_image_pixels)
    return _array_to_uint8(values)


def _load_pil(image: Image.Image) -> None:
    """Decode a lazily opened PIL image now (a no-op once loaded): a truncated or corrupt file then fails
    here as a ValueError, not as PIL's OSError inside a later resize or conversion."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot decode the PIL image{_pil_source(image)}: {error}") from error


def _pil_source(image: Image.Image) -> str:
    """" of file '...'" for a PIL image opened from a named file, else ""."""
    name = getattr(image, "filename", None)
    return f" of file '{name}'" if isinstance(name, (str, os.PathLike)) and str(name) else ""


def _from_pil(image: Image.Image, max_image_pixels: int | None) -> np.ndarray:
    """PIL image -> new uint8 (H, W) or (H, W, 3); the size is checked before any pixel is touched."""
    width, height = image.size
    _check_size(height, width, max_image_pixels)
    _load_pil(image)
    mode = image.mode
    if mode in ("L", "RGB"):
        return np.array(image, dtype=np.uint8, order="C", copy=True)
    if mode in ("1", "LA"):
        # PIL's L conversion maps "1" to 0/255 and simply drops the alpha of "LA".
        return np.array(image.convert("L"), dtype=np.uint8, order="C", copy=True)
    if mode.startswith("I;16") or mode in ("I", "F"):
        # np.array gives uint16 (possibly big-endian), int32 or float32; the dtype rules handle all of them.
        return _array_to_uint8(np.array(image))
    try:
        # Drops alpha without compositing (RGBA, PA), applies palettes (P) and colour transforms (CMYK, YCbCr, ...).
        rgb = image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"Unsupported PIL image mode {mode!r}: PIL cannot convert it to RGB ({error})") from error
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------


def _from_path(path: Path, dicom_frame: int, max_image_pixels: int | None) -> np.ndarray:
    """Image or DICOM file on disk -> new uint8 (H, W) or (H, W, 3)."""
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    if is_dicom_file(path):
        pydicom = _import_pydicom()
        try:
            dataset = pydicom.dcmread(path)
        except Exception as error:  # pydicom raises many types for corrupt files; all mean "cannot read it"
            raise ValueError(f"Cannot read DICOM file '{path}': {error}") from error
        with _named_dicom_errors(f"DICOM file '{path}'"):
            return _from_dicom(dataset, dicom_frame, max_image_pixels, f"DICOM file '{path}'")
    return _file_pixels(_decode_image_file(path, max_image_pixels), path, max_image_pixels)


def _file_pixels(image: Image.Image, path: Path, max_image_pixels: int | None) -> np.ndarray:
    """`_from_pil` of a decoded file, its errors (a float image holding NaN, a mode PIL cannot
    convert) naming the file."""
    try:
        return _from_pil(image, max_image_pixels)
    except ValueError as error:
        raise ValueError(f"image file '{path}': {error}") from error


def _decode_image_file(path: Path, max_image_pixels: int | None) -> Image.Image:
    """A non-DICOM image file -> its PIL image, decoded, the file closed (leaving ``with`` closes only
    the file, never the pixels)."""
    try:
        image = _open_with_pil(path)
    except UnidentifiedImageError as error:
        raise ValueError(
            f"Cannot read '{path}' as an image: PIL does not recognise it (a DICOM file without the 128-byte "
            "preamble must be read with pydicom.dcmread(path, force=True) and passed as a Dataset)"
        ) from error
    with image:
        # Image.open only parsed the header: check the size before .load() decodes anything.
        width, height = image.size
        _check_size(height, width, max_image_pixels)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"Cannot decode image file '{path}': {error}") from error
    return image


def _open_with_pil(path: Path) -> Image.Image:
    """``Image.open`` (header only) that never fails because of PIL's own decompression-bomb limit.

    PIL refuses images above ``Image.MAX_IMAGE_PIXELS`` (warning) or twice that (error) with its own message and
    limit, while ours is ``max_image_pixels``. On a refusal, reopen with PIL's guard lifted so that our check,
    which runs before ``.load()``, decides with one uniform error. Reopening only re-reads the header.
    """
    try:
        return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # The warning arrives here as an exception only when warnings are turned into errors (-W error).
        pass
    with _PIL_LIMIT_LOCK:
        saved_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit


# ----------------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _named_dicom_errors(source: str) -> Iterator[None]:
    """Errors from a DICOM's tags or pixel data as ValueErrors that name the file (or dataset): a
    missing tag is an AttributeError, a malformed number a ValueError, a missing pixel decoder a
    RuntimeError, none of which says where it came from."""
    try:
        yield
    except (AttributeError, KeyError, TypeError) as error:
        raise ValueError(f"{source}: a required tag is missing or malformed ({error})") from error
    except RuntimeError as error:
        raise ValueError(f"{source}: cannot decode its pixel data ({error}); a compressed transfer syntax "
                         "needs its decoder plugin, e.g. `pip install pylibjpeg pylibjpeg-libjpeg`") from error
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def _import_pydicom() -> Any:
    """Import pydicom (an optional extra) lazily, with an install hint when it is missing or too old."""
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (pydicom >= 3 only; holds the decoders and LUT helpers)
    except ImportError as error:
        raise ImportError(
            "pydicom >= 3 is required to read DICOM: install regionmed-clip[dicom] (pydicom) to read DICOM files "
            "and datasets"
        ) from error
    return pydicom


def _is_pydicom_dataset(obj: Any) -> bool:
    """True for pydicom Dataset/FileDataset instances, without importing pydicom."""
    return any(cls.__name__ == "Dataset" and cls.__module__.startswith("pydicom") for cls in type(obj).__mro__)


def _looks_like_dicom_dataset(obj: Any) -> bool:
    """A pydicom Dataset, or a duck-typed stand-in with PhotometricInterpretation and pixel_array."""
    # The class check comes first because hasattr(ds, "pixel_array") would decode a real Dataset's pixels.
    return _is_pydicom_dataset(obj) or (hasattr(obj, "PhotometricInterpretation") and hasattr(obj, "pixel_array"))


def _first_value(value: Any) -> float | None:
    """First of a possibly multi-valued DICOM number (e.g. WindowCenter), or None when absent/empty."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    return float(value)


def _functional_group_items(dataset: Any, dicom_frame: int, macro: str) -> list[Any]:
    """First items of functional-group macro ``macro`` (e.g. FrameVOILUTSequence) for one frame, most specific first.

    Enhanced multi-frame DICOM keeps frame attributes such as the rescale and the window in functional groups, which
    pydicom's LUT helpers do not read: the frame's own PerFrameFunctionalGroupsSequence item overrides the
    SharedFunctionalGroupsSequence item. Returns [] for data without functional groups (classic single-frame DICOM).
    """
    per_frame = getattr(dataset, "PerFrameFunctionalGroupsSequence", None) or []
    shared = getattr(dataset, "SharedFunctionalGroupsSequence", None) or []
    # A per-frame sequence shorter than NumberOfFrames is malformed; the shared group still applies then.
    groups = ([per_frame[dicom_frame]] if dicom_frame < len(per_frame) else []) + list(shared[:1])
    items: list[Any] = []
    for group in groups:
        macro_items = getattr(group, macro, None)
        if macro_items:
            items.append(macro_items[0])
    return items


def _rescale_source(dataset: Any, dicom_frame: int) -> Any:
    """Where the frame's modality transform is: a functional-group PixelValueTransformation item, else the dataset."""
    for item in _functional_group_items(dataset, dicom_frame, "PixelValueTransformationSequence"):
        if getattr(item, "RescaleSlope", None) is not None and getattr(item, "RescaleIntercept", None) is not None:
            return item
    return dataset


@dataclass(frozen=True)
class _Window:
    """One VOI window (PS3.3 C.11.2.1.2): the first WindowCenter / WindowWidth and the VOILUTFunction beside them."""

    center: float
    width: float
    function: str  # LINEAR (the default when absent), LINEAR_EXACT or SIGMOID

    def problem(self) -> str | None:
        """Why the standard allows no such window (pydicom's `apply_windowing` would raise), else None."""
        if self.width <= 0:
            return "is not positive"
        if self.function == "LINEAR" and self.width < 1:
            return "is below 1, the least a LINEAR window may have"
        return None


def _frame_window(dataset: Any, dicom_frame: int) -> _Window | None:
    """The frame's window: per-frame group, shared group, then top level; None when there is none."""
    for source in [*_functional_group_items(dataset, dicom_frame, "FrameVOILUTSequence"), dataset]:
        center = _first_value(getattr(source, "WindowCenter", None))
        width = _first_value(getattr(source, "WindowWidth", None))
        if center is not None and width is not None:
            # The Frame VOI LUT macro carries its own VOILUTFunction: read it from the item the window came from.
            function = str(getattr(source, "VOILUTFunction", None) or "LINEAR").strip().upper()
            return _Window(center, width, function)
    return None


def _apply_voi_lut_sequence(values: np.ndarray, dataset: Any) -> np.ndarray:
    """Modality values -> uint8 through the dataset's first VOI LUT (``pydicom.pixels.apply_voi``).

    Its entries are n-bit values, n being the third LUT Descriptor value (PS3.3 C.11.2.1.1), so its output range is
    0..2**n - 1: that range, not the image's own, is mapped onto 0..255, so the LUT's brightness is kept.
    """
    if values.dtype.kind == "f":
        # A LUT is indexed by integer input values; a rescale hands them over as floats, which pydicom warns about.
        values = np.rint(_as_finite_float64(values)).astype(np.int64)
    try:
        mapped = _import_pydicom().pixels.apply_voi(values, dataset)
    except NotImplementedError as error:  # an entry size other than 8 or 10..16 bits; not a missing decoder
        raise ValueError(f"Unsupported VOI LUT: {error}") from error
    bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
    out = mapped.astype(np.float64)
    # Multiply before dividing: the product of integers is exact, so halves round as halves.
    out *= 255.0
    out /= 2**bits - 1
    return _round_to_uint8(out)


def _apply_window(values: np.ndarray, window: _Window, photometric: str) -> np.ndarray:
    """Modality values -> uint8 through one window, computed by ``pydicom.pixels.apply_windowing``.

    pydicom reads the window from a dataset holding a VOI LUT Module and maps it onto the range of the stored values
    (BitsStored, PixelRepresentation, the rescale). The window here may come from a functional group, which pydicom
    does not read, and the output is an 8-bit display: so it gets a dataset with just that window and an 8-bit
    unsigned range without rescale, its y_min..y_max being 0..255.
    """
    pydicom = _import_pydicom()
    module = pydicom.Dataset()
    module.PhotometricInterpretation = photometric  # pydicom windows only MONOCHROME1 / MONOCHROME2
    module.BitsStored, module.PixelRepresentation = 8, 0
    module.WindowCenter, module.WindowWidth = window.center, window.width
    module.VOILUTFunction = window.function
    return _round_to_uint8(pydicom.pixels.apply_windowing(_as_finite_float64(values), module))


def _decode_frame(dataset: Any, dicom_frame: int, num_frames: int) -> tuple[np.ndarray, str]:
    """Decode one frame: (rows, cols) or (rows, cols, samples) array, and the colour space it is in."""
    pixels = _import_pydicom().pixels
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = getattr(file_meta, "TransferSyntaxUID", None) if file_meta is not None else None
    if _is_pydicom_dataset(dataset) and transfer_syntax:
        # The decoder decodes only the requested frame, and its metadata says which colour space it returned:
        # it converts YBR_FULL(_422) to RGB itself while the dataset still says YBR, and converting twice is wrong.
        values, meta = pixels.get_decoder(transfer_syntax).as_array(dataset, index=dicom_frame)
        photometric = str(meta.get("photometric_interpretation", dataset.PhotometricInterpretation))
        return values, photometric
    # Duck-typed datasets (or ones without file meta): their pixel_array is taken to match their header.
    values = np.asarray(dataset.pixel_array)
    if num_frames > 1:
        values = values[dicom_frame]
    return values, str(dataset.PhotometricInterpretation)


def _from_dicom(dataset: Any, dicom_frame: int, max_image_pixels: int | None, source: str) -> np.ndarray:
    """pydicom Dataset (or duck-typed stand-in) -> new uint8 (H, W) or (H, W, 3), following the DICOM rules.
    `source` names it in warnings (e.g. "DICOM file '...'")."""
    pixels = _import_pydicom().pixels
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    _check_size(rows, columns, max_image_pixels)
    num_frames = int(getattr(dataset, "NumberOfFrames", None) or 1)
    if not 0 <= dicom_frame < num_frames:
        raise ValueError(
            f"dicom_frame={dicom_frame} is out of range: the DICOM data has {num_frames} frame(s) "
            f"(valid: 0..{num_frames - 1})"
        )
    samples_per_pixel = int(getattr(dataset, "SamplesPerPixel", None) or 1)
    values, photometric = _decode_frame(dataset, dicom_frame, num_frames)

    if samples_per_pixel == 3:
        if photometric.startswith("YBR"):
            try:
                values = pixels.convert_color_space(values, photometric, "RGB")
            except (ValueError, NotImplementedError) as error:
                raise ValueError(f"Cannot convert DICOM colour space {photometric} to RGB: {error}") from error
        elif photometric != "RGB":
            raise ValueError(f"Unsupported DICOM PhotometricInterpretation {photometric!r} for colour data")
        if values.dtype == np.uint8:
            return np.array(values, dtype=np.uint8, order="C", copy=True)
        return _minmax_to_uint8(values)

    if samples_per_pixel != 1:
        raise ValueError(f"Unsupported DICOM SamplesPerPixel={samples_per_pixel}; expected 1 or 3")

    if photometric == "PALETTE COLOR":
        rgb = pixels.apply_color_lut(values, dataset)
        if rgb.dtype == np.uint8:
            return np.array(rgb, dtype=np.uint8, order="C", copy=True)
        # 16-bit palette entries span 0..65535; their high byte is the 8-bit colour.
        return np.ascontiguousarray((rgb >> 8).astype(np.uint8))

    # Windows and VOI LUTs are defined on modality values (e.g. Hounsfield units), so rescale first.
    # apply_modality_lut reads only the rescale tags of what it is given: hand it the frame's functional-group item.
    rescale = _rescale_source(dataset, dicom_frame)
    if getattr(rescale, "RescaleSlope", None) is not None and float(rescale.RescaleSlope) == 0:
        raise ValueError("RescaleSlope is 0: every pixel would map to RescaleIntercept (a blank image); "
                         "the header is wrong")
    values = pixels.apply_modality_lut(values, rescale)
    window = _frame_window(dataset, dicom_frame)
    if getattr(dataset, "VOILUTSequence", None):
        # As pydicom's apply_voi_lut (prefer_lut=True): a VOI LUT Sequence takes precedence over a window.
        out = _apply_voi_lut_sequence(values, dataset)
    elif window is None:
        out = _minmax_to_uint8(values)
    elif problem := window.problem():
        # A window the standard does not allow describes no window: min-max the image instead, and say so.
        logger.warning("%s: WindowWidth %g %s: the window (center %g) is ignored and the image min-max scaled",
                       source, window.width, problem, window.center)
        out = _minmax_to_uint8(values)
    else:
        out = _apply_window(values, window, photometric)

    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores dense tissue as dark; invert so bright always means dense, as in MONOCHROME2.
        out = 255 - out
    return out
