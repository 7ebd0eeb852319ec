import logging

import numpy as np
import pytest
import torch
from PIL import Image

from regionmed_clip.processing import RegionMedCLIPImageProcessor, proposal_heatmap, proposal_windows


def make_processor(**overrides) -> RegionMedCLIPImageProcessor:
    settings = {"image_size": 64, "roi_size": 32, "max_rois": 4, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return RegionMedCLIPImageProcessor(**{**settings, **overrides})


def to_intensity(normalised: np.ndarray) -> np.ndarray:
    """Undo mean/std 0.5: back to [0, 1] intensities."""
    return normalised * 0.5 + 0.5


def bright_square_image(width=300, height=200, box=(180, 50, 220, 90)) -> np.ndarray:
    image = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 255
    return image


def bright_extent(view: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(view > 0.5)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


@pytest.mark.parametrize("resize_mode", ["pad", "center_crop"])
@pytest.mark.parametrize(("width", "height"), [(300, 200), (200, 300), (256, 256)])
def test_box_lands_on_the_same_pixels_of_the_global_view(resize_mode, width, height):
    box = (110, 90, 150, 130)
    processor = make_processor(resize_mode=resize_mode)
    out = processor(bright_square_image(width, height, box), regions=[[list(box)]])
    view = to_intensity(out["pixel_values"][0, 0])
    drawn = np.array(bright_extent(view))
    mapped = out["roi_boxes"][0, 0] * processor.image_size
    assert np.all(np.abs(drawn - mapped) <= 1.0), (drawn, mapped)
    crop = to_intensity(out["roi_pixel_values"][0, 0, 0])
    centre = crop[12:20, 12:20]
    assert centre.min() > 0.9  # the ROI crop shows the bright square


def test_pad_mode_keeps_the_whole_film_and_pads_the_short_side():
    image = np.full((100, 200), 200, dtype=np.uint8)  # wide: padded above and below
    out = make_processor()(image)
    view = to_intensity(out["pixel_values"][0, 0]) * 255
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert np.allclose(view[:16], 0, atol=1) and np.allclose(view[-16:], 0, atol=1)
    assert np.allclose(view[17:47], 200, atol=1)
    assert "roi_pixel_values" not in out


def test_grayscale_is_repeated_to_three_normalised_channels():
    processor = RegionMedCLIPImageProcessor(image_size=32, roi_size=16)
    out = processor(np.full((40, 40), 255, dtype=np.uint8))
    expected = (1.0 - np.array(processor.image_mean)) / np.array(processor.image_std)
    np.testing.assert_allclose(out["pixel_values"][0, :, 16, 16], expected, rtol=1e-5)


def test_crops_come_from_the_original_resolution():
    image = np.zeros((1024, 1024), dtype=np.uint8)
    image[500:540, 500:540] = (np.indices((40, 40)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    out = make_processor(roi_context_factor=1.0, roi_size=40)(image, regions=[[[500, 500, 540, 540]]])
    crop = to_intensity(out["roi_pixel_values"][0, 0, 0])
    view = to_intensity(out["pixel_values"][0, 0])
    assert crop.std() > 0.4  # the pattern survives in the crop
    assert abs(view[32, 32] - 0.5) < 0.15  # the downsized view has averaged it to grey


def test_box_formats_and_normalised_coordinates_agree():
    image = bright_square_image()
    processor = make_processor()
    xyxy = processor(image, regions=[[[180, 50, 220, 90]]])
    xywh = processor(image, regions=[[[180, 50, 40, 40]]], box_format="xywh")
    normalised = processor(image, regions=[[[0.6, 0.25, 220 / 300, 0.45]]], normalized_boxes=True)
    as_dict = processor(image, regions=[[{"box": [180, 50, 220, 90]}]])
    for other in (xywh, normalised, as_dict):
        np.testing.assert_allclose(other["roi_boxes"], xyxy["roi_boxes"], atol=1e-6)
        np.testing.assert_allclose(other["roi_pixel_values"], xyxy["roi_pixel_values"], atol=1e-5)


def test_mask_prompt_gives_its_tight_box_and_can_blank_the_crop():
    image = np.full((200, 200), 120, dtype=np.uint8)
    mask = np.zeros((200, 200), dtype=bool)
    yy, xx = np.mgrid[:200, :200]
    mask[(yy - 100) ** 2 + (xx - 60) ** 2 <= 20**2] = True
    plain = make_processor()(image, regions=[[mask]])
    np.testing.assert_allclose(plain["roi_boxes"][0, 0] * 200, [40, 80, 81, 121], atol=1e-4)
    blanked = make_processor(mask_crop=True)(image, regions=[[{"mask": mask}]])
    crop = to_intensity(blanked["roi_pixel_values"][0, 0, 0]) * 255
    assert crop[0, 0] < 5 and abs(crop[16, 16] - 120) < 2  # corner outside the disk is blanked


def test_point_prompt_is_a_box_of_configured_extent():
    image = np.zeros((200, 400), dtype=np.uint8)
    out = make_processor(point_extent=0.2)(image, regions=[[[100, 100]]])
    # side = 0.2 * min(H, W) = 40 pixels, centred on the point; the view scale is 64 / 400
    np.testing.assert_allclose(out["roi_boxes"][0, 0] * 400, [80, 80 + 100, 120, 120 + 100], atol=1e-4)


def test_partly_outside_boxes_are_clipped():
    processor = make_processor()
    outside = processor(bright_square_image(), regions=[[[-50, -20, 40, 30], [280, 190, 350, 260]]])
    inside = processor(bright_square_image(), regions=[[[0, 0, 40, 30], [280, 190, 300, 200]]])
    for key in ("roi_boxes", "roi_pixel_values"):
        np.testing.assert_allclose(outside[key], inside[key], atol=1e-6)


# A 300 x 100 (W x H) film in a 64 centre-cropped view: scale 0.64, so the view shows only the
# original's x in [100, 200] (all of y).
CROP_SCENE = {"width": 300, "height": 100, "box": (120, 20, 180, 80)}


@pytest.mark.parametrize(
    "region",
    [
        [0, 10, 20, 90],  # inside the image, left of the view: used to give a zero-width box
        [250, 10, 290, 90],  # right of the view
        [50, 10, 100, 90],  # only touches the view's left edge: zero area after clipping
        [200, 10, 260, 90],  # only touches the right edge
        {"point": [10, 50]},
        {"mask": np.pad(np.ones((100, 30), dtype=bool), ((0, 0), (0, 270)))},
    ],
)
def test_centre_crop_rejects_regions_outside_the_view(region):
    inside = [130, 20, 170, 80]
    with pytest.raises(
        ValueError,
        match=r"regions\[0\]\[2\]: .*outside the centre-cropped 64x64 view, which shows only the original's "
        r"pixel box \[100, 0, 200, 100\].*resize_mode='pad'",
    ):
        make_processor(resize_mode="center_crop")(bright_square_image(**CROP_SCENE), regions=[[inside, inside, region]])


def test_centre_crop_clips_partly_outside_regions_to_the_view_and_keeps_their_crop():
    image = bright_square_image(**CROP_SCENE)
    regions = [[[50, 10, 150, 90], [180, 0, 300, 100], [99.5, 10, 100.5, 90]]]
    cropped = make_processor(resize_mode="center_crop")(image, regions=regions)
    boxes = cropped["roi_boxes"][0]
    assert cropped["roi_mask"].all()
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    # view x = 0.64 * x - 64, y = 0.64 * y; then clipped to [0, 64] and divided by 64
    np.testing.assert_allclose(
        boxes * 64, [[0, 6.4, 32, 57.6], [51.2, 0, 64, 64], [0, 6.4, 0.32, 57.6]], atol=1e-4
    )
    # The crop is cut from the original image, not from the view: the same as in pad mode.
    padded = make_processor()(image, regions=regions)
    np.testing.assert_allclose(cropped["roi_pixel_values"], padded["roi_pixel_values"], atol=1e-6)


def test_pad_mode_keeps_regions_the_centre_crop_would_cut():
    out = make_processor()(bright_square_image(**CROP_SCENE), regions=[[[0, 10, 20, 90], [50, 10, 100, 90]]])
    assert out["roi_mask"].all()
    # pad: scale 64 / 300; the 21-pixel-high film is padded by 21 pixels on top
    scale = 64 / 300
    expected = [[0, 10 * 0.21 + 21, 20 * scale, 90 * 0.21 + 21], [50 * scale, 10 * 0.21 + 21, 100 * scale, 90 * 0.21 + 21]]
    np.testing.assert_allclose(out["roi_boxes"][0] * 64, expected, atol=1e-4)


def test_pad_mode_rejects_a_box_too_small_for_the_view():
    with pytest.raises(ValueError, match=r"regions\[0\]\[0\]: .*too small to cover any of the view"):
        make_processor()(bright_square_image(), regions=[[[10, 10, 10 + 1e-7, 40]]])


def test_more_regions_than_max_rois_keep_the_first_and_warn(caplog):
    boxes = [[10 * i, 10, 10 * i + 20, 40] for i in range(1, 7)]
    with caplog.at_level(logging.WARNING):
        out = make_processor(max_rois=4)(bright_square_image(), regions=[boxes])
    assert out["roi_mask"].shape == (1, 4) and out["roi_mask"].all()
    np.testing.assert_allclose(out["roi_boxes"][0, :, 0] * 300, [10, 20, 30, 40], atol=1e-4)
    assert "keeping the first max_rois=4, dropping 2" in caplog.text


def test_ragged_regions_are_padded_and_masked():
    image = bright_square_image()
    out = make_processor()([image, image, image], regions=[[[0, 0, 50, 50]], [], [[0, 0, 9, 9], [5, 5, 60, 60]]])
    assert out["roi_pixel_values"].shape == (3, 2, 3, 32, 32)
    assert out["roi_mask"].tolist() == [[True, False], [False, False], [True, True]]
    assert np.all(out["roi_boxes"][~out["roi_mask"]] == 0)


def test_return_tensors_pt_and_medical_modes():
    torch = pytest.importorskip("torch")
    sixteen_bit = Image.fromarray(np.arange(0, 60000, 15, dtype=np.uint16).reshape(80, 50))
    colour = Image.new("RGB", (50, 70), (10, 200, 30))
    out = make_processor()([sixteen_bit, colour], regions=[[[0, 0, 20, 20]], []], return_tensors="pt")
    assert isinstance(out["pixel_values"], torch.Tensor) and out["pixel_values"].dtype == torch.float32
    assert out["roi_mask"].dtype == torch.bool


def test_real_dicoms_go_through_the_processor():
    data = pytest.importorskip("pydicom.data")
    paths = [data.get_testdata_file("CT_small.dcm"), data.get_testdata_file("MR_small.dcm")]
    out = make_processor()(paths, regions=[[[10, 10, 40, 40]], [[0, 0, 30, 20]]])
    assert out["pixel_values"].shape == (2, 3, 64, 64)
    assert np.isfinite(out["roi_pixel_values"]).all()
    assert out["pixel_values"][0].std() > 0.1  # windowed to a visible range, not a flat image


@pytest.mark.parametrize(
    ("region", "message"),
    [
        ([1, 2, 3], r"regions\[0\]\[0\]: expected a box of 4 numbers"),
        ({"box": [1, 2, 3]}, r"regions\[0\]\[0\]: a box needs 4 numbers"),
        ([10, float("nan"), 20, 30], "NaN or inf"),
        ([10, 10, float("inf"), 30], "NaN or inf"),
        ([50, 10, 20, 30], "inverted or has zero area"),
        ([10, 10, 10, 30], "inverted or has zero area"),
        ([400, 10, 450, 30], "entirely outside"),
        ([-40, -40, -1, -1], "entirely outside"),
        (np.zeros((200, 300), dtype=bool), "mask is empty"),
        (np.ones((20, 30), dtype=bool), r"mask shape \(20, 30\) differs"),
        ({"point": [500, 10]}, "outside"),
        ({"box": [1, 2, 3, 4], "point": [1, 2]}, "exactly one of"),
        ("abc", "cannot read the region"),
    ],
)
def test_bad_regions_name_the_region(region, message):
    with pytest.raises(ValueError, match=message):
        make_processor()(bright_square_image(), regions=[[region]])


def test_region_lists_must_match_images():
    with pytest.raises(ValueError, match="one list of regions per image: 2 images, got 1"):
        make_processor()([bright_square_image()] * 2, regions=[[[0, 0, 5, 5]]])


def test_bad_images_name_the_index():
    with pytest.raises(TypeError, match=r"images\[1\]"):
        make_processor()([bright_square_image(), 42])
    with pytest.raises(ValueError, match=r"images\[0\].*max_image_pixels"):
        make_processor(max_image_pixels=1000)(bright_square_image())


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"resize_mode": "stretch"}, "resize_mode"), ({"box_format": "cxcywh"}, "box_format"),
     ({"roi_size": 0}, "roi_size"), ({"roi_context_factor": 0.5}, "roi_context_factor"),
     ({"image_std": [0.5, 0.5, 0]}, "image_std"), ({"proposal_sizes": [0.25, 0.0]}, "proposal_sizes"),
     ({"proposal_sizes": []}, "proposal_sizes"), ({"proposal_stride": 1.5}, "proposal_stride")],
)
def test_bad_settings_are_named(setting, message):
    with pytest.raises(ValueError, match=message):
        make_processor(**setting)


def test_unknown_call_arguments_are_rejected():
    with pytest.raises(TypeError, match="box_fmt"):
        make_processor()(bright_square_image(), box_fmt="xywh")


def test_save_and_load_round_trip(tmp_path):
    processor = make_processor(resize_mode="center_crop", roi_context_factor=1.5, mask_crop=True)
    processor.save_pretrained(tmp_path)
    loaded = RegionMedCLIPImageProcessor.from_pretrained(tmp_path)
    image = bright_square_image()
    # x in [100, 150]: inside the centre-cropped view (x in [50, 250] of this 300 x 200 film)
    a = processor(image, regions=[[[100, 0, 150, 50]]])
    b = loaded(image, regions=[[[100, 0, 150, 50]]])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_a_probability_mask_is_thresholded_not_spread_over_the_image():
    processor = RegionMedCLIPImageProcessor(image_size=32, roi_size=16, max_rois=2)
    image = Image.new("L", (40, 40), 100)
    probabilities = np.full((40, 40), 0.02, dtype=np.float32)  # a segmentation output: never exactly 0
    probabilities[10:20, 5:15] = 0.9
    out = processor(image, regions=[[{"mask": probabilities}]], return_tensors="pt")
    expected = processor(image, regions=[[[5, 10, 15, 20]]], return_tensors="pt")
    torch.testing.assert_close(out["roi_boxes"], expected["roi_boxes"])


def test_a_float_mask_outside_zero_one_is_refused():
    processor = RegionMedCLIPImageProcessor(image_size=32, roi_size=16, max_rois=2)
    mask = np.zeros((40, 40), dtype=np.float32)
    mask[10:20, 5:15] = 255.0
    with pytest.raises(ValueError, match=r"a float mask must hold 0/1 or probabilities in \[0, 1\], got values in \[0, 255\]"):
        processor(Image.new("L", (40, 40)), regions=[[{"mask": mask}]])


def test_stacking_one_image_outputs_equals_preprocessing_the_batch():
    processor = RegionMedCLIPImageProcessor(image_size=32, roi_size=16, max_rois=3)
    images = [Image.new("L", (40, 30), 50), Image.new("L", (20, 60), 200), Image.new("L", (50, 50), 120)]
    regions = [[[1, 2, 20, 25], [5, 5, 30, 20]], [], [[10, 10, 40, 40]]]
    whole = processor(images, regions=regions)
    stacked = processor.stack([processor(image, regions=[boxes]) for image, boxes in zip(images, regions, strict=True)])
    assert set(stacked) == set(whole)
    for key in whole:
        np.testing.assert_array_equal(stacked[key], whole[key], err_msg=key)


# -- box-free proposals ----------------------------------------------------------------------------


@pytest.mark.parametrize(("area", "sizes", "stride"), [((0, 0, 100, 60), [0.5, 1.0], 0.5),
                                                        ((10, 20, 310, 220), [0.125, 0.25], 0.5),
                                                        ((0, 0, 256, 256), [0.3], 0.75)])
def test_proposal_windows_cover_every_pixel_of_the_area_at_each_scale(area, sizes, stride):
    windows = proposal_windows(area, sizes, stride)
    x0, y0, x1, y1 = area
    short = min(x1 - x0, y1 - y0)
    for size in sizes:
        side = size * short
        scale = windows[np.isclose(windows[:, 2] - windows[:, 0], side)]
        assert np.allclose(scale[:, 3] - scale[:, 1], side)  # square
        assert scale[:, :2].min(0).tolist() == [x0, y0] and np.allclose(scale[:, 2:].max(0), [x1, y1])  # flush
        starts = np.unique(np.round(scale[:, 0], 6))
        assert np.diff(starts).max() <= stride * side + 1e-6  # at most `stride` sides apart
        covered = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for wx0, wy0, wx1, wy1 in scale:
            covered[int(np.floor(wy0 - y0)) : int(np.ceil(wy1 - y0)), int(np.floor(wx0 - x0)) : int(np.ceil(wx1 - x0))] = True
        assert covered.all(), size
    assert len(windows) == sum(len(windows[np.isclose(windows[:, 2] - windows[:, 0], size * short)]) for size in sizes)
    with pytest.raises(ValueError, match="window sizes"):
        proposal_windows(area, [0.0], 0.5)
    with pytest.raises(ValueError, match="stride"):
        proposal_windows(area, [0.5], 1.5)


def test_an_image_without_regions_gets_proposals_read_from_the_full_resolution_film():
    image = np.zeros((1024, 1024), dtype=np.uint8)
    image[520:560, 520:560] = (np.indices((40, 40)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    processor = make_processor(proposal_sizes=[0.0625], proposal_stride=1.0, roi_context_factor=1.0, roi_size=64)
    out = processor(image)
    boxes = processor.proposal_boxes(1024, 1024)
    assert out["proposal_pixel_values"].shape == (1, 16 * 16, 3, 64, 64) and out["proposal_mask"].all()
    np.testing.assert_allclose(out["proposal_boxes"][0], boxes / 1024, atol=1e-6)  # the view is the whole film
    holding = boxes.tolist().index([512, 512, 576, 576])
    crop = to_intensity(out["proposal_pixel_values"][0, holding, 0])
    # the window is 64 px of the original cut at 64 px: the 1-pixel pattern is there, as in the original
    np.testing.assert_allclose(crop[8:48, 8:48], image[520:560, 520:560] / 255, atol=0.02)
    assert to_intensity(out["pixel_values"][0, 0]).std() < 0.1  # the 64 px view has averaged it away
    assert set(processor(image, proposals=False)) == {"pixel_values"}
    assert "proposal_mask" not in processor(image, regions=[[[0, 0, 10, 10]]])  # given regions replace them


def test_proposals_cover_only_what_a_centre_cropped_view_shows():
    processor = make_processor(resize_mode="center_crop", proposal_sizes=[0.5], proposal_stride=1.0)
    boxes = processor.proposal_boxes(200, 300)  # the view shows x in [50, 250]
    assert boxes.tolist() == [[50, 0, 150, 100], [150, 0, 250, 100], [50, 100, 150, 200], [150, 100, 250, 200]]
    out = processor(np.zeros((200, 300), dtype=np.uint8))
    np.testing.assert_allclose(out["proposal_boxes"][0], [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1],
                                                          [0.5, 0.5, 1, 1]], atol=1e-6)


def test_images_of_different_shapes_pad_their_proposals():
    processor = make_processor(proposal_sizes=[0.5], proposal_stride=1.0)
    out = processor([np.zeros((100, 100), dtype=np.uint8), np.zeros((100, 200), dtype=np.uint8)])
    assert out["proposal_mask"].sum(1).tolist() == [4, 8]
    stacked = processor.stack([processor(np.zeros((100, 100), dtype=np.uint8)),
                               processor(np.zeros((100, 200), dtype=np.uint8))])
    for key in out:
        np.testing.assert_array_equal(stacked[key], out[key], err_msg=key)


def test_a_16_bit_3000_px_film_gets_its_proposals_in_bounded_memory():
    import tracemalloc

    film = (np.random.default_rng(0).random((3000, 3000)) * 65535).astype(np.uint16)
    processor = make_processor(image_size=128, roi_size=32)

    def peak_bytes(**options) -> tuple[int, dict]:
        tracemalloc.start()
        out = processor(film, **options)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, out

    view_only, _ = peak_bytes(proposals=False)
    with_proposals, out = peak_bytes()
    count = len(processor.proposal_boxes(3000, 3000))
    assert out["proposal_pixel_values"].shape == (1, count, 3, 32, 32) and count == 15 * 15 + 7 * 7
    # the crops are cut one at a time from the decoded 8-bit film: the proposals add their own output
    # (274 x 3 x 32 x 32 float32, 3.4 MB) and a few crops' worth, never a copy of the 9 MB film
    crops = out["proposal_pixel_values"].nbytes
    assert with_proposals - view_only < crops + 2 * 2**20, (view_only, with_proposals)


def test_proposal_heatmap_paints_each_pixel_with_the_mean_of_its_proposals():
    boxes = np.array([[0, 0, 4, 4], [2, 0, 6, 4], [0, 0, 6, 4]], dtype=float)
    heat = proposal_heatmap(boxes, np.array([1.0, 3.0, 5.0]), height=6, width=6)
    assert heat.shape == (6, 6)
    assert heat[0, 0] == 3.0 and heat[0, 3] == 3.0 and heat[0, 5] == 4.0  # (1+5)/2, (1+3+5)/3, (3+5)/2
    assert (heat[4:] == 1.0).all()  # covered by none: the lowest score
    big = proposal_heatmap(np.array([[0, 0, 3000, 1500]]), np.array([2.0]), height=3000, width=6000)
    assert big.shape == (256, 512) and (big == 2.0).all()  # a huge film costs a 512 px map
