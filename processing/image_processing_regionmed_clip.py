"""Image processor of RegionMed-CLIP: the global view, ROI crops and their boxes (PIL + NumPy, no torchvision).

Rules (they are the documentation):

* **Global view.** `resize_mode="pad"` (default) resizes so the LONGER side equals `image_size`,
  keeping the aspect ratio, and pads the shorter side equally on both ends with `pad_value` to
  a square: nothing of the film is cut away (a centre crop would remove costophrenic angles).
  `resize_mode="center_crop"` resizes the SHORTER side to `image_size` and crops the centre.
* **Regions** per image, each one of
  - a box: 4 numbers (or `{"box": [...]}`) in `box_format` `"xyxy"` (default) or `"xywh"`,
    in pixels of the original image, or fractions of its width/height with `normalized_boxes=True`;
  - a binary mask `(H, W)` (or `{"mask": m}`) of the original image's size: its tight box is the
    region; with `mask_crop=True` the crop is also blanked outside the mask; a float mask of
    probabilities (a segmentation model's output) is thresholded at 0.5;
  - a point: 2 numbers `(x, y)` (or `{"point": [...]}`): a square box of side
    `point_extent x min(H, W)` centred on it.
  A box partly outside the image is clipped to it; one entirely outside is an error.
* **ROI crops.** Each region box is expanded about its centre by `roi_context_factor` (1.2),
  clamped to the image, cut from the ORIGINAL full-resolution image (not the downsized view)
  and letterboxed (aspect kept, padded) to `roi_size x roi_size`.
* **roi_boxes** are the (clipped, unexpanded) region boxes mapped through exactly the same
  resize and pad as the global view and normalised by `image_size`: a box drawn on the input
  lands on the same pixels of `pixel_values`. In centre-crop mode a region partly outside the
  view keeps its full ROI crop (cut from the original image) and only its box is clipped to the
  view; a region with no area inside the view (entirely outside it, or only touching its edge)
  is an error naming the region, since its box would be degenerate (use `resize_mode="pad"`).
* **More than `max_rois` regions**: the FIRST `max_rois`, in the order given, are kept (order is
  the caller's priority) and a warning says how many were dropped.
* Images are decoded by `medical_image_io.load_medical_pil` (PIL modes, NumPy, DICOM; high
  bit depths windowed to 8 bits by the rules documented there). Grayscale stays one channel
  until the end, then is repeated to 3 channels. An "L" / "RGB" PIL image or image file is
  resampled where it is, never copied whole: one huge image costs about its decoded size.

* **Proposals** (box-free inference): without `regions`, and unless `proposals=False`, each image
  also gets region proposals that the model reads as it reads ROIs (crop encoder + ROI processor)
  and pools per image beside the global view (the whole-image term): for each of `proposal_sizes`
  (fractions of the shorter side of the part the view shows) square windows `proposal_stride x side` apart, the last
  flush with the far edge, so that each scale covers every pixel (`proposal_windows`). They are
  cut exactly as region crops are (context factor, letterbox) from the ORIGINAL image, one at a time:
  memory holds the decoded image and the `R x R` crops, whatever the film's size.

Outputs: `pixel_values (B, 3, S, S)`, and with `regions`: `roi_pixel_values (B, K, 3, R, R)`,
`roi_boxes (B, K, 4)` normalised xyxy, `roi_mask (B, K)` bool, with K the most regions of any
image in the batch (after the `max_rois` cut); without them, `proposal_pixel_values (B, P, 3, R, R)`,
`proposal_boxes (B, P, 4)` and `proposal_mask (B, P)` (`proposal_boxes(height, width)` gives their
pixel boxes on the original).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import logging

from .medical_image_io import load_medical_pil

__all__ = [
    "PROPOSAL_INPUT_NAMES",
    "ROI_INPUT_NAMES",
    "RegionMedCLIPImageProcessor",
    "ViewTransform",
    "proposal_heatmap",
    "proposal_windows",
]

logger = logging.get_logger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("pad", "center_crop")
# The model inputs of given regions, and of the box-free proposals made without them.
ROI_INPUT_NAMES = ("roi_pixel_values", "roi_boxes", "roi_mask")
PROPOSAL_INPUT_NAMES = ("proposal_pixel_values", "proposal_boxes", "proposal_mask")
BOX_FORMATS = ("xyxy", "xywh")
# Smallest width/height (fraction of the view side) a mapped region box may have. Not zero: a box
# that only touches a centre-cropped view's edge maps to float-rounding noise (~1e-16), which is
# as degenerate as exactly zero. 1e-6 also survives the float32 cast of `roi_boxes` near 1.0.
MIN_VIEW_BOX_EXTENT = 1e-6


@dataclass(frozen=True)
class ViewTransform:
    """Where the original image lands in the square global view: `view = original * scale + offset`."""

    scale_x: float
    scale_y: float
    offset_x: int
    offset_y: int
    resized_width: int
    resized_height: int

    @classmethod
    def for_image(cls, height: int, width: int, view_size: int, resize_mode: str) -> "ViewTransform":
        if resize_mode == "pad":
            scale = view_size / max(height, width)
            resized_width, resized_height = max(1, round(width * scale)), max(1, round(height * scale))
            # Padding split equally between both sides.
            offset_x, offset_y = (view_size - resized_width) // 2, (view_size - resized_height) // 2
        else:
            # transformers' CLIPImageProcessor and torchvision's Resize: the shorter side becomes the view size
            # exactly and the longer one floors; the crop starts at (resized - view) // 2, as CLIP's centre crop.
            # The same pixels as the CLIP checkpoints' own preprocessing, whatever the aspect ratio.
            if width <= height:
                resized_width, resized_height = view_size, max(1, int(view_size * height / width))
            else:
                resized_width, resized_height = max(1, int(view_size * width / height)), view_size
            offset_x, offset_y = -((resized_width - view_size) // 2), -((resized_height - view_size) // 2)
        return cls(
            scale_x=resized_width / width,
            scale_y=resized_height / height,
            offset_x=offset_x,
            offset_y=offset_y,
            resized_width=resized_width,
            resized_height=resized_height,
        )

    def visible_box(self, view_size: int) -> np.ndarray:
        """The part of the original image the view shows, as pixel xyxy of the original.

        The whole image in pad mode; the central part in centre-crop mode.
        """
        return np.array(
            [
                max(0.0, -self.offset_x / self.scale_x),
                max(0.0, -self.offset_y / self.scale_y),
                min(self.resized_width, view_size - self.offset_x) / self.scale_x,
                min(self.resized_height, view_size - self.offset_y) / self.scale_y,
            ]
        )

    def map_box(self, box: np.ndarray, view_size: int) -> np.ndarray:
        """Pixel xyxy in the original -> xyxy in `[0, 1]` of the view (clipped to it).

        The result has zero width or height when the box lies outside a centre-cropped view;
        `RegionMedCLIPImageProcessor` rejects such regions before they reach the model.
        """
        x0, y0, x1, y1 = box
        mapped = np.array(
            [
                x0 * self.scale_x + self.offset_x,
                y0 * self.scale_y + self.offset_y,
                x1 * self.scale_x + self.offset_x,
                y1 * self.scale_y + self.offset_y,
            ]
        )
        return np.clip(mapped / view_size, 0.0, 1.0)


def proposal_windows(area: Sequence[float], sizes: Sequence[float], stride: float) -> np.ndarray:
    """`(P, 4)` pixel xyxy square windows over the `area` box (xyxy): for each of `sizes` (a fraction
    of the area's shorter side), windows `stride` sides apart along each axis (evenly spread, the
    last flush with the far edge), row-major. Each scale covers every pixel of the area."""
    if not len(sizes) or any(not 0 < size <= 1 for size in sizes):
        raise ValueError(f"proposal window sizes must be fractions of the shorter side in (0, 1], got {list(sizes)}")
    if not 0 < stride <= 1:
        raise ValueError(f"proposal stride must be a fraction of the window side in (0, 1], got {stride}")
    x0, y0, x1, y1 = (float(value) for value in area)
    windows = []
    for size in sizes:
        side = size * min(x1 - x0, y1 - y0)

        def starts(low: float, high: float, side: float = side) -> np.ndarray:
            # ceil: the fewest windows at most `stride` sides apart that still reach the far edge
            count = int(np.ceil((high - low - side) / (stride * side) - 1e-9)) + 1
            return np.linspace(low, high - side, max(count, 1))

        ys, xs = np.meshgrid(starts(y0, y1), starts(x0, x1), indexing="ij")
        corners = np.stack([xs.ravel(), ys.ravel()], axis=-1)
        windows.append(np.concatenate([corners, corners + side], axis=-1))
    return np.concatenate(windows) if windows else np.zeros((0, 4))


def proposal_heatmap(boxes: np.ndarray, scores: np.ndarray, height: int, width: int, max_side: int = 512) -> np.ndarray:
    """Proposal scores painted back onto an image: `(h, w)` float64, each pixel the mean score of the
    proposals that cover it (the lowest score where none does), on the `height x width` image scaled
    so that its longer side is at most `max_side` (a 3000 px film costs a 512 px map, not 9M cells).

    boxes `(P, 4)` pixel xyxy on the image; scores `(P,)`."""
    boxes, scores = np.asarray(boxes, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1] or not len(scores):
        raise ValueError(f"proposal_heatmap needs boxes (P >= 1, 4) and scores (P,), got {boxes.shape} and {scores.shape}")
    scale = min(1.0, max_side / max(height, width))
    rows, cols = max(1, round(height * scale)), max(1, round(width * scale))
    total, cover = np.zeros((rows, cols)), np.zeros((rows, cols))
    cells = np.rint(boxes * scale).astype(np.int64)
    for score, (x0, y0, x1, y1) in zip(scores, cells, strict=True):
        # at least one cell each way: a proposal smaller than a cell of a downscaled map still paints
        total[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] += score
        cover[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] += 1
    return np.where(cover > 0, total / np.maximum(cover, 1), scores.min())


def _binary_mask(array: np.ndarray, where: str) -> np.ndarray:
    """A region mask as bool: nonzero pixels of an integer / bool mask; a float mask of probabilities
    (values between 0 and 1) is thresholded at 0.5, since every nonzero probability would otherwise
    spread the region over the whole image."""
    if not np.issubdtype(array.dtype, np.floating) or np.isin(array, (0.0, 1.0)).all():
        return array.astype(bool)
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{where}: the float mask holds NaN or inf ({bad} of {array.size} pixels); a mask must hold "
                         "0/1 or probabilities in [0, 1]")
    if array.min() < 0 or array.max() > 1:
        raise ValueError(f"{where}: a float mask must hold 0/1 or probabilities in [0, 1], got values in "
                         f"[{array.min():g}, {array.max():g}]")
    return array >= 0.5


def _has_view_area(view_box: np.ndarray) -> bool:
    """Whether a normalised xyxy view box is wider and taller than `MIN_VIEW_BOX_EXTENT`."""
    return min(view_box[2] - view_box[0], view_box[3] - view_box[1]) > MIN_VIEW_BOX_EXTENT


def _letterbox(image: Image.Image, box: tuple[float, float, float, float], size: int, pad_value: int,
               resample: int) -> np.ndarray:
    """Resample the float `box` region of `image` into a `size x size` canvas, aspect kept, centred."""
    box_width, box_height = box[2] - box[0], box[3] - box[1]
    scale = size / max(box_width, box_height)
    width, height = max(1, round(box_width * scale)), max(1, round(box_height * scale))
    # `resize(box=...)` samples straight from the source region: no intermediate crop copy.
    region = image.resize((width, height), resample=resample, box=box)
    canvas = Image.new(image.mode, (size, size), color=pad_value if image.mode == "L" else (pad_value,) * 3)
    canvas.paste(region, ((size - width) // 2, (size - height) // 2))
    return np.asarray(canvas)


class RegionMedCLIPImageProcessor(BaseImageProcessor):
    """Global view + ROI crops for RegionMed-CLIP. See the module docstring for the rules."""

    model_input_names = ["pixel_values", *ROI_INPUT_NAMES, *PROPOSAL_INPUT_NAMES]

    def __init__(
        self,
        image_size: int = 224,
        roi_size: int = 112,
        max_rois: int = 8,
        resize_mode: str = "pad",
        resample: int = Image.Resampling.BICUBIC,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        pad_value: int = 0,
        roi_context_factor: float = 1.2,
        box_format: str = "xyxy",
        point_extent: float = 0.1,
        mask_crop: bool = False,
        max_image_pixels: int | None = 178_956_970,
        dicom_frame: int = 0,
        proposals: bool = True,
        proposal_sizes: Sequence[float] = (0.125, 0.25),
        proposal_stride: float = 0.5,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.roi_size = roi_size
        self.max_rois = max_rois
        self.resize_mode = resize_mode
        self.resample = int(resample)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.pad_value = pad_value
        self.roi_context_factor = roi_context_factor
        self.box_format = box_format
        self.point_extent = point_extent
        self.mask_crop = mask_crop
        self.max_image_pixels = max_image_pixels
        self.dicom_frame = dicom_frame
        self.proposals = proposals
        self.proposal_sizes = [float(size) for size in proposal_sizes]
        self.proposal_stride = float(proposal_stride)
        self._validate_settings()

    def _validate_settings(self) -> None:
        for name in ("image_size", "roi_size", "max_rois"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {self.box_format!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean and image_std need 3 values (std > 0), got {self.image_mean}, {self.image_std}")
        if not 1.0 <= self.roi_context_factor <= 10.0:
            raise ValueError(f"roi_context_factor must be in [1, 10], got {self.roi_context_factor!r}")
        if not 0.0 < self.point_extent <= 1.0:
            raise ValueError(f"point_extent must be in (0, 1], got {self.point_extent!r}")
        if not self.proposal_sizes or not all(0.0 < size <= 1.0 for size in self.proposal_sizes):
            raise ValueError(f"proposal_sizes must be fractions of the image side in (0, 1], got {self.proposal_sizes!r}")
        if not 0.0 < self.proposal_stride <= 1.0:
            raise ValueError(f"proposal_stride must be a fraction of the window side in (0, 1], got {self.proposal_stride!r}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"pad_value must be an 8-bit intensity in [0, 255], got {self.pad_value!r}")

    # -- regions -----------------------------------------------------------------------------

    def _region_box(
        self, region: Any, where: str, height: int, width: int, box_format: str, normalized_boxes: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One region spec -> (clipped pixel xyxy box `(4,)` float64, mask `(H, W)` bool or None)."""
        kind, value = None, region
        if isinstance(region, dict):
            keys = set(region) & {"box", "mask", "point"}
            if len(keys) != 1 or len(region) != 1:
                raise ValueError(f"{where}: a region dict needs exactly one of 'box', 'mask', 'point'; got keys {sorted(region)}")
            kind = keys.pop()
            value = region[kind]
        try:
            array = np.asarray(value, dtype=np.float64) if kind != "mask" else np.asarray(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: cannot read the region as numbers ({error})") from None
        if kind is None:
            kind = {(4,): "box", (2,): "point"}.get(array.shape, "mask" if array.ndim == 2 else None)
            if kind is None:
                raise ValueError(
                    f"{where}: expected a box of 4 numbers, a point of 2 numbers or a 2-D mask, got shape {array.shape}"
                )

        if kind == "mask":
            if array.shape != (height, width):
                raise ValueError(f"{where}: mask shape {array.shape} differs from the image's (H, W) = {(height, width)}")
            mask = _binary_mask(array, where)
            rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            if rows.size == 0:
                raise ValueError(f"{where}: the mask is empty (no pixel set)")
            return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64), mask

        expected = (4,) if kind == "box" else (2,)
        if array.shape != expected:
            raise ValueError(f"{where}: a {kind} needs {expected[0]} numbers, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: {kind} coordinates hold NaN or inf: {array.tolist()}")
        if normalized_boxes:
            array = array * (np.array([width, height, width, height]) if kind == "box" else np.array([width, height]))

        if kind == "point":
            x, y = array
            if not (0 <= x <= width and 0 <= y <= height):
                raise ValueError(f"{where}: point {value!r} lies outside the {width}x{height} image")
            half = self.point_extent * min(height, width) / 2
            box = np.array([x - half, y - half, x + half, y + half])
        else:
            box = array.copy()
            if box_format == "xywh":
                box[2:] += box[:2]
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"{where}: box {value!r} ({box_format}) is inverted or has zero area")
            if box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
                raise ValueError(f"{where}: box {value!r} ({box_format}) lies entirely outside the {width}x{height} image")
        return np.clip(box, 0, [width, height, width, height]), None

    def region_has_view_area(self, box: Sequence[float], height: int, width: int) -> bool:
        """Whether an xyxy pixel `box` on a `height x width` image keeps an area in the global view.

        `preprocess` rejects a region that does not (see `_view_box`); callers that would rather
        drop such regions (the training collator) ask here first.
        """
        transform = ViewTransform.for_image(height, width, self.image_size, self.resize_mode)
        clipped = np.clip(np.asarray(box, dtype=np.float64), 0, [width, height, width, height])
        return _has_view_area(transform.map_box(clipped, self.image_size))

    def _view_box(self, box: np.ndarray, transform: ViewTransform, where: str) -> np.ndarray:
        """Clipped pixel box -> normalised view box; an error if it has no area in the view.

        Only centre-crop mode can cut a region that lies inside the image out of the view. Its box
        would be degenerate while `roi_mask` says the slot is real, and the model would pool
        context from nothing: the region is rejected, never silently dropped or moved.
        """
        view_box = transform.map_box(box, self.image_size)
        if _has_view_area(view_box):
            return view_box
        shown = ", ".join(f"{value:g}" for value in transform.visible_box(self.image_size))
        described = ", ".join(f"{value:g}" for value in box)
        if self.resize_mode == "center_crop":
            raise ValueError(
                f"{where}: region (pixel box [{described}] (xyxy) of the original image) falls outside the "
                f"centre-cropped {self.image_size}x{self.image_size} view, which shows only the original's pixel "
                f"box [{shown}] (xyxy); use resize_mode='pad' (the default) to keep the whole image in the view"
            )
        # Pad mode shows the whole image, so only a box far below one view pixel gets here.
        raise ValueError(f"{where}: region (pixel box [{described}]) is too small to cover any of the view")

    def crop_box(self, box: np.ndarray, height: int, width: int) -> tuple[float, float, float, float]:
        """The pixel box a region's crop is cut from: `box` expanded by the context factor about its
        centre and clamped to the image. The crop
        always covers the (clamped) box: `min` / `max` with its edges absorb float rounding, which
        could otherwise put a crop edge an ulp inside the box at a context factor of 1."""
        centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        half_w = (box[2] - box[0]) * self.roi_context_factor / 2
        half_h = (box[3] - box[1]) * self.roi_context_factor / 2
        return (
            max(0.0, min(float(box[0]), centre_x - half_w)),
            max(0.0, min(float(box[1]), centre_y - half_h)),
            min(float(width), max(float(box[2]), centre_x + half_w)),
            min(float(height), max(float(box[3]), centre_y + half_h)),
        )

    # -- pixels ------------------------------------------------------------------------------

    def _normalise(self, array: np.ndarray) -> np.ndarray:
        """uint8 `(H, W)` or `(H, W, 3)` -> float32 `(3, H, W)` normalised by mean/std."""
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        scaled = array.astype(np.float32) * (1 / 255)
        if scaled.ndim == 2:  # grayscale: one channel until here, then one normalisation per output channel
            return (scaled[None] - mean[:, None, None]) / std[:, None, None]
        return (scaled.transpose(2, 0, 1) - mean[:, None, None]) / std[:, None, None]

    def _global_view(self, image: Image.Image, transform: ViewTransform) -> np.ndarray:
        resized = image.resize((transform.resized_width, transform.resized_height), resample=self.resample)
        fill = self.pad_value if image.mode == "L" else (self.pad_value,) * 3
        canvas = Image.new(image.mode, (self.image_size, self.image_size), color=fill)
        canvas.paste(resized, (transform.offset_x, transform.offset_y))  # negative offsets crop
        return np.asarray(canvas)

    def preprocess(
        self,
        images: Any,
        regions: Sequence[Sequence[Any]] | None = None,
        box_format: str | None = None,
        normalized_boxes: bool = False,
        return_tensors: str | None = None,
        proposals: bool | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """images: one image or a list; regions: one list of region specs per image (ragged).
        `proposals` (default: the processor's `proposals`) adds the box-free proposals when no
        `regions` are given."""
        if kwargs:
            raise TypeError(f"RegionMedCLIPImageProcessor got unexpected arguments {sorted(kwargs)}")
        box_format = box_format or self.box_format
        if box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if not image_list:
            raise ValueError("images is empty")
        if regions is not None:
            if not isinstance(regions, (list, tuple)) or len(regions) != len(image_list):
                count = len(regions) if isinstance(regions, (list, tuple)) else type(regions).__name__
                raise ValueError(f"regions needs one list of regions per image: {len(image_list)} images, got {count}")

        with_proposals = regions is None and (self.proposals if proposals is None else proposals)
        pixel_values, roi_pixels, roi_boxes, pixel_boxes = [], [], [], []
        for index, raw in enumerate(image_list):
            try:
                image = load_medical_pil(raw, dicom_frame=self.dicom_frame, max_image_pixels=self.max_image_pixels)
            except (TypeError, ValueError) as error:
                raise type(error)(f"images[{index}]: {error}") from error
            width, height = image.size
            transform = ViewTransform.for_image(height, width, self.image_size, self.resize_mode)
            pixel_values.append(self._normalise(self._global_view(image, transform)))
            if with_proposals:
                windows = self.proposal_boxes(height, width)
                roi_pixels.append([self._crop(image, box) for box in windows])
                roi_boxes.append([transform.map_box(box, self.image_size) for box in windows])
                pixel_boxes.append(windows)
            if regions is None:
                continue
            specs = list(regions[index])
            if len(specs) > self.max_rois:
                logger.warning(
                    f"images[{index}] has {len(specs)} regions; keeping the first max_rois={self.max_rois}, "
                    f"dropping {len(specs) - self.max_rois}"
                )
                specs = specs[: self.max_rois]
            crops, boxes = [], []
            for region_index, spec in enumerate(specs):
                where = f"regions[{index}][{region_index}]"
                box, mask = self._region_box(spec, where, height, width, box_format, normalized_boxes)
                boxes.append(self._view_box(box, transform, where))  # checked before the (costlier) crop
                source = image
                if mask is not None and self.mask_crop:
                    pixels = np.asarray(image)
                    blanked = np.where(mask if pixels.ndim == 2 else mask[..., None], pixels, self.pad_value)
                    source = Image.fromarray(blanked.astype(np.uint8), mode=image.mode)
                crops.append(self._crop(source, box))
            roi_pixels.append(crops)
            roi_boxes.append(boxes)

        data: dict[str, Any] = {"pixel_values": np.stack(pixel_values)}
        if regions is not None:
            data.update(self._pad_regions(roi_pixels, roi_boxes))
        elif with_proposals:
            data.update(self._pad_regions(roi_pixels, roi_boxes, prefix="proposal"))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def proposal_boxes(self, height: int, width: int) -> np.ndarray:
        """`(P, 4)` pixel xyxy proposals of a `height x width` image: `proposal_windows` over the part
        the view shows, at `proposal_sizes` and `proposal_stride` (the whole image is the global view's)."""
        visible = ViewTransform.for_image(height, width, self.image_size, self.resize_mode).visible_box(self.image_size)
        return proposal_windows(visible, self.proposal_sizes, self.proposal_stride)

    def _crop(self, image: Image.Image, box: np.ndarray) -> np.ndarray:
        """The normalised `(3, R, R)` crop of the pixel `box` of `image`: grown by the context factor,
        clamped, letterboxed."""
        width, height = image.size
        crop_box = self.crop_box(box, height, width)
        return self._normalise(_letterbox(image, crop_box, self.roi_size, self.pad_value, self.resample))

    def _pad_regions(self, roi_pixels: list[list[np.ndarray]], roi_boxes: list[list[np.ndarray]],
                     prefix: str = "roi") -> dict[str, np.ndarray]:
        """Ragged per-image crops/boxes -> padded `(B, K, ...)` arrays and the `(B, K)` mask, named
        `{prefix}_pixel_values`, `{prefix}_boxes`, `{prefix}_mask`."""
        batch = len(roi_pixels)
        slots = max((len(crops) for crops in roi_pixels), default=0)
        pixels = np.zeros((batch, slots, 3, self.roi_size, self.roi_size), dtype=np.float32)
        boxes = np.zeros((batch, slots, 4), dtype=np.float32)
        mask = np.zeros((batch, slots), dtype=bool)
        for row, (crops, row_boxes) in enumerate(zip(roi_pixels, roi_boxes, strict=True)):
            for slot, (crop, box) in enumerate(zip(crops, row_boxes, strict=True)):
                pixels[row, slot], boxes[row, slot], mask[row, slot] = crop, box, True
        return {f"{prefix}_pixel_values": pixels, f"{prefix}_boxes": boxes, f"{prefix}_mask": mask}

    def stack(self, rows: Sequence[Mapping[str, np.ndarray]], return_tensors: str | None = None) -> BatchFeature:
        """Outputs of `preprocess` for one image each (numpy) -> one batch, region (or proposal) slots
        padded as `preprocess` pads them. Lets a caller reduce every image to its view and crops as it
        decodes it, instead of holding a batch of decoded images (the training collator does)."""
        data: dict[str, Any] = {"pixel_values": np.concatenate([row["pixel_values"] for row in rows])}
        for prefix in ("roi", "proposal"):
            present = {f"{prefix}_mask" in row for row in rows}
            if present == {True}:
                valid = [(row, row[f"{prefix}_mask"][0]) for row in rows]
                data.update(self._pad_regions([list(row[f"{prefix}_pixel_values"][0][mask]) for row, mask in valid],
                                              [list(row[f"{prefix}_boxes"][0][mask]) for row, mask in valid],
                                              prefix=prefix))
            elif present == {True, False}:
                raise ValueError(f"stack needs every row with {'regions' if prefix == 'roi' else 'proposals'} or none")
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

