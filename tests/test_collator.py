import io

import numpy as np
import pytest
import torch
from PIL import Image

from regionmed_clip.data.schema import load_canonical
from regionmed_clip.data.skips import SkipLedger
from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.modeling_regionmed_clip import DEFAULT_BACKGROUND_CAPTION as BACKGROUND_CAPTION
from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, build_tokenizer
from regionmed_clip.training_scripts.collator import (
    AMBIGUOUS,
    BACKGROUND,
    RegionMedCLIPCollator,
    label_windows,
)

from conftest import collator_processor


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(path, n=30, seed=0)
    return list(load_canonical(path, "train", decode_images=False))


@pytest.fixture(scope="module")
def processor(rows):
    return collator_processor(rows)


def test_batch_has_every_model_input(processor, rows):
    collator = RegionMedCLIPCollator(processor, seed=0, windows_per_image=0)
    batch = collator(rows[:8])
    assert batch["pixel_values"].shape == (8, 3, 64, 64)
    assert batch["input_ids"].shape[0] == 8 and batch["summary_input_ids"].shape[0] == 8
    counts = batch["roi_mask"].sum(1)
    with_regions = torch.tensor([len(row["regions"]) > 0 for row in rows[:8]])
    assert torch.all((counts >= 1) == with_regions)  # 1..K regions per row that has any
    assert torch.all(counts <= torch.tensor([len(row["regions"]) for row in rows[:8]]))
    assert batch["region_input_ids"].shape[:2] == batch["roi_mask"].shape
    assert batch["negative_mask"].any()


def test_region_sampling_is_a_function_of_row_and_epoch(processor, rows):
    many = [row for row in rows if len(row["regions"]) >= 2]
    first = RegionMedCLIPCollator(processor, seed=0)(many)
    again = RegionMedCLIPCollator(processor, seed=0)(many)
    assert torch.equal(first["roi_boxes"], again["roi_boxes"])  # windows included
    draws = set()
    collator = RegionMedCLIPCollator(processor, seed=0, windows_per_image=0)
    for epoch in range(12):
        collator.set_epoch(epoch)
        draws.add(tuple(collator(many)["roi_mask"].sum(1).tolist()))
    assert len(draws) > 1  # the count of sampled regions varies across epochs


def test_a_corrupt_image_is_skipped_and_counted(processor, rows):
    corrupt = {**rows[0], "image": {"bytes": b"\x89PNG not really", "path": None}}
    collator = RegionMedCLIPCollator(processor)
    batch = collator([rows[1], corrupt, rows[2]])
    assert batch["pixel_values"].shape[0] == 2
    report = batch["skip_report"]
    assert (report["rows_seen"], report["rows_skipped"]) == (3, 1)
    assert report["reasons"] == {"row: image does not decode (UnidentifiedImageError)": 1}
    assert report["examples"] == {"row: image does not decode (UnidentifiedImageError)": [rows[0]["image_id"]]}
    assert collator.ledger.rows_skipped == 1


def _nan_tiff() -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    pixels = np.full((40, 40), np.nan, dtype=np.float32)
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def test_a_batch_of_only_corrupt_rows_repeats_the_last_good_row(processor, rows):
    corrupt = {**rows[0], "image": {"bytes": b"garbage", "path": None}}
    collator = RegionMedCLIPCollator(processor)
    with pytest.raises(RuntimeError, match="call prime"):
        collator([corrupt])
    collator(rows[3:5])
    batch = collator([corrupt, corrupt])
    assert batch["pixel_values"].shape[0] == 1 and collator.ledger.rows_skipped == 3


def test_a_primed_collator_survives_a_corrupt_first_batch_in_a_worker(processor, rows):
    corrupt = {**rows[0], "image": {"bytes": b"garbage", "path": None}}
    collator = RegionMedCLIPCollator(processor)
    collator.prime([corrupt, rows[4], rows[5]])  # the first decodable row is the stand-in
    # a DataLoader worker gets a pickled copy: its very first batch is all corrupt
    loader = torch.utils.data.DataLoader([corrupt], batch_size=1, collate_fn=collator, num_workers=1)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape[0] == 1 and batch["skip_report"]["rows_skipped"] == 1
    expected = collator([rows[4]])["input_ids"]
    assert torch.equal(batch["input_ids"], expected)
    with pytest.raises(ValueError, match="none of the first 2 rows is usable"):
        RegionMedCLIPCollator(processor).prime([corrupt, corrupt, rows[4]], max_rows=2)


def test_regions_outside_a_centre_cropped_view_are_dropped_and_counted(rows):
    processor = RegionMedCLIPProcessor(
        RegionMedCLIPImageProcessor(image_size=64, roi_size=32, max_rois=4, resize_mode="center_crop"),
        build_tokenizer(["a b c"], vocab_size=100),
    )
    row = next(row for row in rows if row["regions"])
    wide = {**row, "image": {"bytes": _png(300, 100), "path": None},  # the view shows x in [100, 200]
            "regions": [{"bbox": [0.0, 10.0, 20.0, 90.0], "caption": "cut", "label": "nodule"},
                        {"bbox": [120.0, 10.0, 180.0, 90.0], "caption": "kept", "label": "nodule"}]}
    collator = RegionMedCLIPCollator(processor, max_regions=1, windows_per_image=0)
    batch = collator([wide])  # without the filter the processor would raise on the first region
    assert batch["roi_mask"].tolist() == [[True]] and batch["region_input_ids"].shape[:2] == (1, 1)
    assert batch["skip_report"]["reasons"] == {"region: box outside the global view (cut off by its crop)": 1}


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_region_boxes_outside_the_image_are_dropped_and_counted(processor, rows):
    row = next(row for row in rows if row["regions"])
    outside = {**row, "regions": [{"bbox": [900.0, 900.0, 950.0, 950.0], "caption": "x", "label": "nodule"}]}
    collator = RegionMedCLIPCollator(processor, windows_per_image=0)
    batch = collator([outside, row])
    assert not batch["roi_mask"][0].any() and batch["roi_mask"][1].any()
    assert collator.ledger.regions_skipped == 1


def test_switches_leave_out_caption_levels(processor, rows):
    batch = RegionMedCLIPCollator(processor, use_regions=False, use_summary=False, use_negatives=False)(rows[:2])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "skip_report"}


def test_the_collator_batch_is_the_processor_on_the_decoded_rows(processor, rows):
    # the collator reduces each image to its view and crops as it decodes it; the batch must be the same
    chosen = [row for row in rows if row["regions"]][:3]
    collator = RegionMedCLIPCollator(processor, use_region_negatives=False)
    batch = collator(chosen)
    images = [Image.open(io.BytesIO(row["image"]["bytes"])) for row in chosen]
    # the regions it samples are a pure function of (seed, row, epoch): ask for them again
    sampled = [collator._sample_regions(row, image, SkipLedger(), negatives=False)
               for row, image in zip(chosen, images, strict=True)]
    direct = collator.processor(images=images, text=[row["report_caption"] for row in chosen],
                       summary_text=[row["summary_caption"] for row in chosen],
                       regions=[[region["bbox"] for region in regions] for regions in sampled],
                       region_text=[[region["caption"] for region in regions] for regions in sampled],
                       negative_text=[list(row["negative_captions"]) for row in chosen], return_tensors="pt")
    assert set(batch) - {"skip_report"} == set(direct)
    for key in direct:
        torch.testing.assert_close(batch[key], direct[key], msg=key)


def test_regions_of_a_row_skipped_later_are_not_counted(processor, rows):
    # the NaN image is 40 x 40, so the row's regions fall off it; the row is then rejected as a whole
    row = next(row for row in rows if row["regions"])
    nan_row = {**row, "image": {"bytes": _nan_tiff(), "path": None}}
    batch = RegionMedCLIPCollator(processor)([rows[1], nan_row])
    assert batch["skip_report"]["reasons"] == {"row: image rejected by the processor (ValueError)": 1}
    assert batch["skip_report"]["regions_skipped"] == 0


# -- windows: what box-free inference will show the region path ------------------------------------


def test_label_windows_by_hand():
    lesions = np.array([[10, 10, 20, 20], [60, 60, 70, 70]], dtype=float)
    windows = np.array([
        [0, 0, 32, 32],  # holds all of lesion 0 -> 0
        [14, 0, 46, 32],  # holds 60% of lesion 0 (x 14..20), off-centre and cut -> 0
        [16, 0, 48, 32],  # holds 40% of it: part of a lesion -> ambiguous
        [32, 32, 50, 50],  # its crop (x1.2 about the centre) stays clear of both -> background
        [51, 51, 59.5, 59.5],  # clear, but its crop (x 49.9..60.4) reaches lesion 1 -> ambiguous
        [0, 0, 80, 80],  # holds both -> ambiguous
    ], dtype=float)
    crops = np.array([_grown(window, 1.2) for window in windows])
    assert label_windows(windows, lesions, crops).tolist() == [0, 0, AMBIGUOUS, BACKGROUND, AMBIGUOUS, AMBIGUOUS]
    assert label_windows(windows, np.zeros((0, 4)), crops).tolist() == [BACKGROUND] * len(windows)


def _grown(box, factor):
    centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) * factor / 2
    return np.concatenate([centre - half, centre + half])


def test_background_windows_never_hold_a_lesion_and_lesion_windows_carry_its_caption(processor, rows):
    collator = RegionMedCLIPCollator(processor, seed=0, windows_per_image=6, window_only_fraction=1.0)
    seen = {"background": 0, "lesion": 0}
    for epoch in range(3):
        collator.set_epoch(epoch)
        for row in rows:
            image = Image.open(io.BytesIO(row["image"]["bytes"]))
            slots = collator._sample_regions(row, image, SkipLedger(), negatives=True)
            assert len(slots) <= 6
            lesions = {region["caption"]: np.asarray(region["bbox"], dtype=float) for region in row["regions"]}
            for slot in slots:
                window = np.asarray(slot["bbox"], dtype=float)
                crop = np.asarray(processor.image_processor.crop_box(window, image.height, image.width))
                if slot["caption"] == BACKGROUND_CAPTION:
                    seen["background"] += 1
                    # the whole crop the model will see is clear of every lesion box of the row
                    for box in lesions.values():
                        assert (np.minimum(crop[2:], box[2:]) <= np.maximum(crop[:2], box[:2])).any()
                    assert BACKGROUND_CAPTION not in slot["negatives"]
                    assert set(slot["negatives"]) >= set(list(lesions)[:2])  # the row's lesions are what it is not
                else:
                    seen["lesion"] += 1
                    box = lesions[slot["caption"]]  # the caption of a lesion of this row ...
                    inside = np.clip(np.minimum(window[2:], box[2:]) - np.maximum(window[:2], box[:2]), 0, None).prod()
                    assert inside >= 0.6 * (box[2:] - box[:2]).prod()  # ... that the window holds
                    assert BACKGROUND_CAPTION in slot["negatives"]
    assert seen["background"] > 50 and seen["lesion"] > 10


def test_windows_join_the_roi_slots_and_window_only_rows_drop_the_lesion_boxes(processor, rows):
    with_lesions = [row for row in rows if row["regions"]][:6]
    only_windows = RegionMedCLIPCollator(processor, windows_per_image=4, window_only_fraction=1.0)(with_lesions)
    never = RegionMedCLIPCollator(processor, windows_per_image=4, window_only_fraction=0.0)(with_lesions)
    lesion_boxes = RegionMedCLIPCollator(processor, windows_per_image=0)(with_lesions)
    # every row gets its windows (background ones at least); with boxes kept they come after the same regions
    # (the region draw does not depend on the windows)
    assert (only_windows["roi_mask"].sum(1) >= 2).all()
    first = lesion_boxes["roi_mask"].sum(1)
    windows = never["roi_mask"].sum(1) - first
    assert ((windows >= 2) & (windows <= 4)).all()
    for row in range(len(with_lesions)):
        torch.testing.assert_close(never["roi_boxes"][row, : first[row]], lesion_boxes["roi_boxes"][row, : first[row]])
    assert never["region_negative_input_ids"].shape[:2] == never["roi_mask"].shape
