import io
import json

import numpy as np
import pytest

from training_scripts.data_schema import load_canonical, validate_row
from training_scripts.synthetic import LESION_TYPES, generate_rows, render_phantom, write_synthetic_dataset


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_bytes_different_seed_different_images():
    first = [(png_bytes(row["image"]), {k: v for k, v in row.items() if k != "image"}, vqa)
             for row, vqa in generate_rows(6, seed=3)]
    again = [(png_bytes(row["image"]), {k: v for k, v in row.items() if k != "image"}, vqa)
             for row, vqa in generate_rows(6, seed=3)]
    assert first == again
    other = [png_bytes(row["image"]) for row, _ in generate_rows(6, seed=4)]
    assert all(a[0] != b for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("index", range(12))
def test_region_boxes_contain_the_drawn_lesions(index):
    with_lesions, lesions = render_phantom(seed=0, index=index)
    twin, _ = render_phantom(seed=0, index=index, draw_lesions=False)
    difference = np.abs(np.asarray(with_lesions, dtype=np.int16) - np.asarray(twin, dtype=np.int16))
    changed = difference > 0  # both renders share the noise exactly: any difference is the lesion
    inside = np.zeros_like(changed)
    size = changed.shape[0]
    for lesion in lesions:
        x0, y0, x1, y1 = lesion.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert (x1 - x0) * (y1 - y0) <= 0.06 * size * size  # a <= 3% footprint, boxed, grown by the blur reach
        assert changed[y0:y1, x0:x1].sum() > 0, f"lesion {lesion.caption} not visible in its box"
        inside[y0:y1, x0:x1] = True
    assert not np.any(changed & ~inside), "a lesion pixel lies outside every region box"
    if not lesions:
        assert not changed.any()


def test_captions_are_derived_from_the_lesions():
    seen_sites, seen_kinds = set(), set()
    for row, vqa in generate_rows(40, seed=1):
        validate_row(row)
        for region in row["regions"]:
            assert region["caption"] in row["report_caption"]
            assert region["label"] in row["summary_caption"]
            assert region["label"] in row["labels"]
            seen_sites.add(region["caption"].split(" in the ")[1])
            seen_kinds.add(region["label"])
        if not row["regions"]:
            assert row["labels"] == ["No finding"] and row["summary_caption"] == "Normal chest X-ray."
        assert row["negative_captions"] and row["report_caption"] not in row["negative_captions"]
        assert vqa and all(record["image_name"] == f"{row['image_id']}.png" for record in vqa)
    # locality matters: the same finding appears on both sides
    assert {"left upper zone", "right upper zone", "left lower zone", "right lower zone"} <= seen_sites
    assert seen_kinds == set(LESION_TYPES)


def test_vqa_split_follows_vqa_rad_format(tmp_path):
    summary = write_synthetic_dataset(tmp_path, n=20, seed=0)
    assert sum(summary["rows"].values()) == 20
    records = json.loads((tmp_path / "vqa" / "train.json").read_text())
    vqa_rad_keys = {"qid", "phrase_type", "qid_linked_id", "image_case_url", "image_name", "image_organ", "evaluation",
                    "question", "question_rephrase", "question_relation", "question_frame", "question_type", "answer",
                    "answer_type"}
    assert all(set(record) == vqa_rad_keys for record in records)
    closed = [r for r in records if r["answer_type"] == "CLOSED"]
    assert {r["answer"] for r in closed} == {"yes", "no"}
    assert any(r["answer_type"] == "OPEN" and r["question"].startswith("Where") for r in records)
    assert len({r["qid"] for r in records}) == len(records)
    train = load_canonical(tmp_path, "train")
    assert train[0]["image"].size == (256, 256) and train[0]["image"].mode == "L"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n must be positive"):
        next(generate_rows(0))
    with pytest.raises(ValueError, match="image_size"):
        next(generate_rows(1, image_size=32))
