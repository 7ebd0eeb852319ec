"""The region-aware probe (evaluation/probe.py, evaluation/cli.py): metrics on planted embeddings with
known answers, the controls on processor batches, the region negatives, and the CLI end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionmed_clip.data.negatives import FINDINGS
from regionmed_clip.data.schema import load_canonical
from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.evaluation.cli import main
from regionmed_clip.evaluation.probe import (
    NEGATIVE_KINDS,
    _region_plan,
    accuracy_by_label,
    best_region_scores,
    blank_crops,
    class_names,
    load_region_negatives,
    mirror_boxes,
    paired_difference,
    region_negative_accuracy,
    remove_box_geometry,
    rule_based_negatives,
    zero_shot_auroc,
    zero_shot_scores,
)
from regionmed_clip.evaluation.retrieval import retrieval_recall_at_k
from regionmed_clip.evaluation.zero_shot import load_prompt_templates, prompts_for
from regionmed_clip.processing import RegionMedCLIPImageProcessor
from regionmed_clip.scoring import auroc, mean_pairwise_cosine

from conftest import build_saved_model


def unit(index: int, dim: int = 8) -> torch.Tensor:
    vector = torch.zeros(dim)
    vector[index] = 1.0
    return vector


# -- auroc --------------------------------------------------------------------------------------------


def test_auroc_known_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # hand-computed: positives 0.35, 0.8 vs negatives 0.1, 0.4 -> wins 1 + 2 of 4 pairs
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts 1/2: pos {3, 2} vs neg {2, 1} -> (2 + 1.5) / 4
    assert auroc(torch.tensor([3.0, 2.0, 2.0, 1.0]), torch.tensor([True, True, False, False])) == pytest.approx(0.875)


def test_auroc_without_both_classes_is_nan_and_bad_input_raises():
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    assert math.isnan(auroc([0.1, 0.2], [0, 0]))
    with pytest.raises(ValueError, match="NaN"):
        auroc([float("nan"), 0.2], [0, 1])
    with pytest.raises(ValueError, match="shape"):
        auroc([0.1, 0.2, 0.3], [0, 1])


# -- zero-shot ------------------------------------------------------------------------------------------


def test_zero_shot_on_planted_class_directions_is_perfect():
    # class c lives along e_c; "no c" along e_{c+3}; images are normalised mixes of the present classes
    present = [[0], [1], [0, 1], [2], [], [0, 2]]
    images = torch.stack([torch.nn.functional.normalize(sum((unit(c) for c in row), unit(6)), dim=0)
                          for row in present])
    positive = {f"c{c}": torch.stack([unit(c) + 0.3 * unit(7), unit(c) - 0.3 * unit(7)]) for c in range(3)}
    negative = {f"c{c}": torch.stack([unit(c + 3), 2 * unit(c + 3)]) for c in range(3)}
    scores = zero_shot_scores(images, positive, negative)
    labels = {f"c{c}": torch.tensor([c in row for row in present]) for c in range(3)}
    result = zero_shot_auroc(scores, labels)
    assert result["macro_auroc"] == 1.0
    assert {name: entry["auroc"] for name, entry in result["per_class"].items()} == {"c0": 1.0, "c1": 1.0, "c2": 1.0}
    assert result["per_class"]["c0"]["positives"] == 3 and result["per_class"]["c0"]["negatives"] == 3


def test_zero_shot_scores_use_normalised_ensembles_and_a_known_intermediate_auroc():
    # ensemble = mean of NORMALISED prompts: (2 e0, e1) -> (e0 + e1) / sqrt(2), not (2 e0 + e1) / sqrt(5)
    scores = zero_shot_scores(unit(0)[None], {"a": torch.stack([2 * unit(0), unit(1)])}, {"a": unit(2)[None]})
    assert scores["a"].item() == pytest.approx(1 / math.sqrt(2))
    # image = a e0 + sqrt(1 - a^2) e3 with pos e0, neg e2 -> score exactly a
    strengths = [0.9, 0.2, 0.5, 0.5, 0.1]
    images = torch.stack([a * unit(0) + math.sqrt(1 - a * a) * unit(3) for a in strengths])
    scores = zero_shot_scores(images, {"a": unit(0)[None], "b": unit(0)[None]}, {"a": unit(2)[None], "b": unit(2)[None]})
    assert scores["a"].tolist() == pytest.approx(strengths)
    # positives {0.9, 0.5} vs negatives {0.2, 0.5, 0.1}: 3 + (1 + 0.5 + 1) wins of 6 pairs
    labels = {"a": torch.tensor([1, 0, 1, 0, 0]), "b": torch.zeros(5)}
    result = zero_shot_auroc(scores, labels)
    assert result["per_class"]["a"]["auroc"] == pytest.approx(5.5 / 6)
    assert math.isnan(result["per_class"]["b"]["auroc"])  # no positive: skipped from the macro mean
    assert result["classes_evaluated"] == ["a"] and result["classes_skipped"] == ["b"]
    assert result["macro_auroc"] == pytest.approx(5.5 / 6)


def test_class_names_and_prompts():
    assert class_names([["No finding"], ["nodule", "mass"], ["mass"]]) == ["mass", "nodule"]
    prompts = prompts_for(load_prompt_templates(), ["nodule"])
    assert "There is a nodule." in prompts["positive"]["nodule"]
    assert "No nodule." in prompts["negative"]["nodule"] and "Normal chest X-ray." in prompts["negative"]["nodule"]


# -- region hard negatives --------------------------------------------------------------------------------


def test_region_negative_accuracy_planted_with_ties_and_missing_negatives():
    regions = torch.stack([unit(0, 4), unit(0, 4), unit(1, 4), unit(2, 4)])
    true = torch.stack([unit(0, 4), 0.6 * unit(0, 4) + 0.8 * unit(1, 4), unit(1, 4), 3 * unit(2, 4)])
    nan = torch.full((4,), float("nan"))
    negatives = {
        # lesion 0 wins (cos 0 < 1); lesion 1 loses (cos 1 > 0.6); 2 and 3 have none (NaN rows)
        "side": torch.stack([unit(1, 4), unit(0, 4), nan, nan]),
        # lesion 0 ties its true caption exactly: a failure; lesion 1 wins
        "zone": torch.stack([unit(0, 4), unit(2, 4), nan, nan]),
        # lesions 1 and 2 win; 0 and 3 have none
        "type": torch.stack([nan, unit(3, 4), unit(0, 4), nan]),
    }
    valid = {"side": torch.tensor([1, 1, 0, 0]), "zone": torch.tensor([1, 1, 0, 0]), "type": torch.tensor([0, 1, 1, 0])}
    result = region_negative_accuracy(regions, true, negatives, valid)
    assert result["side"] == {"accuracy": 0.5, "n": 2}
    assert result["zone"] == {"accuracy": 0.5, "n": 2}
    assert result["type"] == {"accuracy": 1.0, "n": 2}
    # all: lesion 0 fails zone, lesion 1 fails side, lesion 2 wins its only negative, lesion 3 has none
    assert result["all"]["n"] == 3 and result["all"]["accuracy"] == pytest.approx(1 / 3)


def test_region_negative_accuracy_with_no_valid_lesion_is_nan():
    result = region_negative_accuracy(unit(0)[None], unit(0)[None], {"side": unit(1)[None]}, {"side": torch.tensor([0])})
    assert result["side"]["n"] == 0 and math.isnan(result["side"]["accuracy"])


def test_paired_difference():
    result = paired_difference(torch.tensor([1, 1, 1, 0]), torch.tensor([0, 0, 1, 0]))
    assert result["delta"] == 0.5 and result["n"] == 4
    assert result["se"] == pytest.approx(float(torch.tensor([1.0, 1, 0, 0]).std()) / 2)
    assert paired_difference(torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([False, True]))["delta"] == 0.0


def test_rule_based_fallback_gives_side_zone_and_type_negatives():
    caption = "small nodule in the left upper zone"
    negatives = rule_based_negatives(caption)
    assert negatives["side"] == "small nodule in the right upper zone"
    assert negatives["zone"] == "small nodule in the left lower zone"
    finding = negatives["type"].removeprefix("small ").removesuffix(" in the left upper zone")
    assert finding in FINDINGS and finding != "nodule"
    assert rule_based_negatives(caption) == negatives  # deterministic
    assert rule_based_negatives(caption, vocabulary=["nodule", "mass"])["type"] == "small mass in the left upper zone"
    assert rule_based_negatives("small mass in the right middle zone")["zone"] is None  # "middle" has no swap


def test_sidecar_negatives_and_region_plan(tmp_path):
    records = [
        {"image_id": "a", "region_index": 0, "caption": "small nodule in the left upper zone", "label": "nodule",
         "side": "left", "zone": "upper",
         "negatives": {"side": "small nodule in the right upper zone", "zone": "small nodule in the left lower zone",
                       "type": None}},
        {"image_id": "a", "region_index": 2, "caption": "mass in the right lower zone", "label": "mass",
         "side": "right", "zone": "lower", "negatives": {"side": "s", "zone": "z", "type": "t"}},
        {"image_id": "zzz", "region_index": 0, "caption": "x", "label": "x", "side": "left", "zone": "upper",
         "negatives": {"side": "s", "zone": "", "type": "t"}},
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    sidecar = load_region_negatives(path)
    assert set(sidecar) == {("a", 0), ("a", 2), ("zzz", 0)}
    region = {"bbox": [0.0, 0.0, 4.0, 4.0], "label": "nodule"}
    rows = {"image_id": ["a", "b"],
            "regions": [[{**region, "caption": "small nodule in the left upper zone"},
                         {**region, "caption": "other caption"}, {**region, "caption": "third"}], []]}
    plan = _region_plan(rows, max_rois=2, sidecar=sidecar, vocabulary=FINDINGS)
    assert plan["dropped"] == 1 and len(plan["boxes"][0]) == 2 and plan["boxes"][1] == []
    first, second = plan["lesions"]
    assert first["negatives"] == {"side": "small nodule in the right upper zone",
                                  "zone": "small nodule in the left lower zone", "type": None}
    assert second["negatives"] == dict.fromkeys(NEGATIVE_KINDS)  # no record for region 1: nothing to test
    assert plan["caption_mismatches"] == 0 and plan["sidecar_records_unused"] == 2
    path.write_text(json.dumps(records + [records[0]]))
    with pytest.raises(ValueError, match="second record"):
        load_region_negatives(path)


# -- controls ---------------------------------------------------------------------------------------------


@pytest.fixture
def roi_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(2, 3, 16, 16, generator=generator),
        "input_ids": torch.randint(0, 50, (2, 7), generator=generator),
        "roi_pixel_values": torch.randn(2, 3, 3, 8, 8, generator=generator),
        "roi_boxes": torch.tensor([[[0.1, 0.2, 0.4, 0.3], [0.5, 0.5, 0.9, 1.0], [0.3, 0.3, 0.6, 0.7]],
                                   [[0.0, 0.0, 0.25, 0.5], [0.2, 0.2, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]]),
        "roi_mask": torch.tensor([[True, True, False], [True, False, False]]),
    }


def _copy(batch):
    return {key: value.clone() for key, value in batch.items()}


def _assert_same(batch, other, keys):
    for key in keys:
        assert torch.equal(batch[key], other[key]), key


def test_blank_crops_makes_every_crop_constant_and_changes_nothing_else(roi_batch):
    before = _copy(roi_batch)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    out = blank_crops(roi_batch, mean, std)
    _assert_same(roi_batch, before, before)  # the input is untouched
    _assert_same(out, before, ("pixel_values", "input_ids", "roi_boxes", "roi_mask"))
    expected = torch.tensor([(0 - m) / s for m, s in zip(mean, std, strict=True)])
    mask = before["roi_mask"]
    for crop in out["roi_pixel_values"][mask]:
        assert torch.allclose(crop, expected[:, None, None].expand_as(crop))
    assert torch.equal(out["roi_pixel_values"][~mask], before["roi_pixel_values"][~mask])  # padding slots untouched


def test_blank_crop_equals_the_processor_output_for_a_black_region():
    processor = RegionMedCLIPImageProcessor(image_size=32, roi_size=16, max_rois=2)
    black = np.zeros((40, 40), dtype=np.uint8)
    real = processor(black, regions=[[[5, 5, 20, 20]]], return_tensors="pt")
    textured = {**real, "roi_pixel_values": torch.randn_like(real["roi_pixel_values"])}
    blanked = blank_crops(textured, processor.image_mean, processor.image_std, processor.pad_value)
    assert torch.allclose(blanked["roi_pixel_values"], real["roi_pixel_values"], atol=1e-6)


def test_mirror_boxes_reflects_through_the_centre_and_is_an_involution(roi_batch):
    before = _copy(roi_batch)
    out = mirror_boxes(roi_batch)
    _assert_same(roi_batch, before, before)
    _assert_same(out, before, ("pixel_values", "input_ids", "roi_pixel_values", "roi_mask"))
    assert torch.allclose(out["roi_boxes"][0, 0], torch.tensor([0.6, 0.7, 0.9, 0.8]))
    assert torch.allclose(out["roi_boxes"][0, 1], torch.tensor([0.1, 0.0, 0.5, 0.5]))
    assert torch.allclose(out["roi_boxes"][1, 0], torch.tensor([0.75, 0.5, 1.0, 1.0]))
    # padding boxes unchanged; valid boxes keep x0 < x1 and y0 < y1
    mask = before["roi_mask"]
    assert torch.equal(out["roi_boxes"][~mask], before["roi_boxes"][~mask])
    valid = out["roi_boxes"][mask]
    assert (valid[:, 2] > valid[:, 0]).all() and (valid[:, 3] > valid[:, 1]).all()
    assert torch.allclose(mirror_boxes(out)["roi_boxes"], before["roi_boxes"], atol=1e-7)


def test_remove_box_geometry_sets_valid_boxes_to_the_whole_view(roi_batch):
    before = _copy(roi_batch)
    out = remove_box_geometry(roi_batch)
    _assert_same(roi_batch, before, before)
    _assert_same(out, before, ("pixel_values", "input_ids", "roi_pixel_values", "roi_mask"))
    mask = before["roi_mask"]
    assert torch.equal(out["roi_boxes"][mask], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * int(mask.sum())))
    assert torch.equal(out["roi_boxes"][~mask], before["roi_boxes"][~mask])


def test_controls_need_roi_inputs():
    with pytest.raises(KeyError, match="roi_boxes"):
        mirror_boxes({"pixel_values": torch.zeros(1, 3, 4, 4), "roi_pixel_values": torch.zeros(1), "roi_mask": None})


# -- CLI ---------------------------------------------------------------------------------------------------


def test_cli_user_errors_name_the_bad_argument(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "regionmed_clip"}')  # fails only once loaded
    data_dir = tmp_path / "data"
    write_synthetic_dataset(data_dir, n=5)  # rows 0-4: train only

    def error_of(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "--model" in error_of(["probe", "--model", str(tmp_path / "nope"), "--data", str(data_dir)])
    assert "--data" in error_of(["probe", "--model", str(model_dir), "--data", str(tmp_path / "nope")])
    assert "--split" in error_of(["probe", "--model", str(model_dir), "--data", str(data_dir)])  # no test rows
    assert "--limit" in error_of(["probe", "--model", str(model_dir), "--data", str(data_dir), "--split", "train",
                                  "--limit", "0"])
    assert "--classes" in error_of(["probe", "--model", str(model_dir), "--data", str(data_dir), "--classes", ","])
    assert "--parts" in error_of(["probe", "--model", str(model_dir), "--data", str(data_dir), "--parts", "regions,"])
    assert "--model" in error_of(["probe", "--data", str(data_dir)])  # argparse: required


def _run_cli(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`main(argv)` in a fresh process with its own HF_HOME, offline: only the folder supplies the code."""
    env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    code = "import sys; from regionmed_clip.evaluation.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cli_probe_end_to_end_matches_direct_computation(tmp_path):
    model_dir, data_dir, model, processor = build_saved_model(tmp_path)
    output = tmp_path / "report.json"
    result = _run_cli(tmp_path, ["probe", "--model", str(model_dir), "--data", str(data_dir), "--baseline",
                                 str(model_dir), "--output", str(output), "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zero-shot macro AUROC" in result.stdout and "box_geometry_removed" in result.stdout
    assert (tmp_path / "hf_home" / "modules" / "transformers_modules").is_dir()
    report = json.loads(output.read_text())
    assert {"metadata", "box_free", "with_boxes", "regions", "verdicts", "baseline"} <= set(report)

    rows = load_canonical(data_dir, "test")
    assert len(rows) == 4 == report["metadata"]["n_images"]
    assert report["metadata"]["split"] == "test" and report["metadata"]["command"].startswith("regionmed-eval probe")
    max_rois = processor.image_processor.max_rois
    lesions = [region for regions in rows["regions"] for region in regions[:max_rois]]
    assert report["metadata"]["n_lesions"] == report["regions"]["n_lesions"] == len(lesions) > 0
    assert report["metadata"]["region_negatives"]["source"].startswith("rule-based")

    # Recompute from the saved model's own forward outputs, the same batch as the probe (one of 4 films).
    boxes = [[region["bbox"] for region in regions[:max_rois]] for regions in rows["regions"]]
    with torch.no_grad():
        inputs = processor(images=list(rows["image"]), text=list(rows["report_caption"]), regions=boxes)
        box_free = model(**processor.image_processor(list(rows["image"]), return_tensors="pt"))  # with its proposals
        images = box_free.image_embeds
        texts = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).text_embeds
    reports = list(rows["report_caption"])
    unique = torch.tensor([reports.count(report) == 1 for report in reports])
    expected = retrieval_recall_at_k(images[unique] @ texts[unique].t(), ks=(1, 5, 10))
    retrieval = report["box_free"]["retrieval"]
    for key, value in expected.items():
        assert retrieval[key] == pytest.approx(value), key
    assert retrieval["n_pairs"] == int(unique.sum()) and retrieval["chance_R@1"] == pytest.approx(100 / int(unique.sum()))
    # With boxes: the same retrieval from the image embeddings with the true boxes pooled into them.
    with torch.no_grad():
        pooled = model(**{key: inputs[key] for key in ("pixel_values", "roi_pixel_values", "roi_boxes", "roi_mask")})
    expected_with_boxes = retrieval_recall_at_k(pooled.image_embeds[unique] @ texts[unique].t(), ks=(1, 5, 10))
    for key, value in expected_with_boxes.items():
        assert report["with_boxes"]["retrieval"][key] == pytest.approx(value), key
    assert report["with_boxes"]["mean_pairwise_cosine"]["image"] == pytest.approx(
        float(mean_pairwise_cosine(pooled.image_embeds)), abs=1e-6)
    cosine = report["box_free"]["mean_pairwise_cosine"]
    assert cosine["image"] == pytest.approx(float(mean_pairwise_cosine(images)), abs=1e-6)
    assert cosine["text"] == pytest.approx(float(mean_pairwise_cosine(texts)), abs=1e-6)

    # Zero-shot: the classes are the split's labels; counts and macro mean are consistent.
    zero_shot = report["box_free"]["zero_shot"]
    assert report["metadata"]["classes"] == class_names(rows["labels"]) == list(zero_shot["per_class"])
    for name, entry in zero_shot["per_class"].items():
        assert entry["positives"] == sum(name in labels for labels in rows["labels"])
        assert entry["positives"] + entry["negatives"] == 4
    evaluated = [zero_shot["per_class"][name]["auroc"] for name in zero_shot["classes_evaluated"]]
    assert zero_shot["macro_auroc"] == pytest.approx(sum(evaluated) / len(evaluated))

    # Regions, exactly: each lesion's region embedding from the model's forward on the processor's batch
    # under each control (made as its definition says, not by the probe's helpers), against the model's
    # text embeddings of its caption and of its rule-based negatives; a win is a strictly nearer caption.
    vocabulary = sorted({region["label"] for region in lesions})
    fallback = [rule_based_negatives(region["caption"], vocabulary if len(vocabulary) >= 2 else FINDINGS)
                for region in lesions]
    images, image_processor = list(rows["image"]), processor.image_processor
    mirrored = [[[image.size[0] - x1, image.size[1] - y1, image.size[0] - x0, image.size[1] - y0]
                 for x0, y0, x1, y1 in image_boxes] for image, image_boxes in zip(images, boxes, strict=True)]
    uniform = [Image.new(image.mode, image.size, image_processor.pad_value) for image in images]
    valid = inputs["roi_mask"].bool()
    roi = {key: inputs[key] for key in ("pixel_values", "roi_pixel_values", "roi_boxes", "roi_mask")}
    variants = {
        "true": roi,
        "crops_blanked": {**roi, "roi_pixel_values": processor(images=uniform, regions=boxes)["roi_pixel_values"]},
        "boxes_mirrored": {**roi, "roi_boxes": processor(images=images, regions=mirrored)["roi_boxes"]},
        "box_geometry_removed": {**roi, "roi_boxes": torch.where(valid[..., None], torch.tensor([0.0, 0.0, 1.0, 1.0]),
                                                                 inputs["roi_boxes"])},
    }
    texts = sorted({region["caption"] for region in lesions}
                   | {text for negatives in fallback for text in negatives.values() if text is not None})
    with torch.no_grad():
        region_embeds = {condition: model(**variant).region_embeds[valid] for condition, variant in variants.items()}
        text_embeds = dict(zip(texts, model(**processor(text=texts)).text_embeds, strict=True))
    conditions = report["regions"]["conditions"]
    assert set(conditions) == set(variants)
    for condition, regions in region_embeds.items():
        assert regions.shape[0] == len(lesions)
        wins = {kind: [] for kind in NEGATIVE_KINDS}
        every = []  # lesions with a negative: did they beat each of them
        for region, lesion, negatives in zip(regions, lesions, fallback, strict=True):
            true_cosine = float(region @ text_embeds[lesion["caption"]])
            beats = {kind: true_cosine > float(region @ text_embeds[text])
                     for kind, text in negatives.items() if text is not None}
            for kind, won in beats.items():
                wins[kind].append(won)
            if beats:
                every.append(all(beats.values()))
        for kind, outcome in (*wins.items(), ("all", every)):
            got = conditions[condition][kind]
            assert got["n"] == len(outcome), (condition, kind)
            if outcome:
                assert got["accuracy"] == pytest.approx(np.mean(outcome)), (condition, kind, outcome)
            else:
                assert got["accuracy"] is None, (condition, kind)  # NaN, written as null

    # Verdicts restate the region table: delta = true - control accuracy on the same lesions.
    for name, control, kind in (("crop_carries_type", "crops_blanked", "type"),
                                ("coordinates_carry_side", "boxes_mirrored", "side"),
                                ("coordinates_carry_zone", "boxes_mirrored", "zone")):
        verdict = report["verdicts"][name]
        if conditions["true"][kind]["n"]:
            assert verdict["delta"] == pytest.approx(conditions["true"][kind]["accuracy"]
                                                     - conditions[control][kind]["accuracy"])
            assert verdict["holds"] == (verdict["delta"] > 2 * verdict["se"] and verdict["delta"] > 0)

    # The baseline is the same folder: the same box-free numbers, zero retrieval differences, and the
    # zero-shot difference taken against the baseline's pooled embedding (a global-only ablation has no
    # region path to score proposals with): here the model's best-proposal score minus its own pooled one.
    baseline = report["baseline"]
    assert baseline["box_free"] == report["box_free"]
    box_free = report["box_free"]
    assert baseline["differences_model_minus_baseline"] == {
        "macro_auroc": pytest.approx(box_free["zero_shot"]["macro_auroc"] - box_free["zero_shot_pooled"]["macro_auroc"]),
        "image_to_text_R@1": 0.0, "text_to_image_R@1": 0.0}


@pytest.mark.slow
def test_cli_probe_regions_part_reads_the_sidecar(tmp_path):
    model_dir, data_dir, _, _ = build_saved_model(tmp_path)
    rows = load_canonical(data_dir, "test").remove_columns("image")
    records = []
    for row in rows:
        for index, region in enumerate(row["regions"]):
            records.append({"image_id": row["image_id"], "region_index": index, "caption": region["caption"],
                            "label": region["label"], "side": "", "zone": "",
                            # every side negative equals the true caption: a tie, so always a failure
                            "negatives": {"side": region["caption"], "zone": "something else entirely",
                                          "type": None if not records else "a different finding"}})
    (data_dir / "region_negatives").mkdir()
    (data_dir / "region_negatives" / "test.json").write_text(json.dumps(records))
    output = tmp_path / "regions.json"
    result = _run_cli(tmp_path, ["probe", "--parts", "regions", "--model", str(model_dir), "--data", str(data_dir),
                                 "--output", str(output), "--batch-size", "3", "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert "box_free" not in report and "baseline" not in report and "verdicts" in report
    assert report["metadata"]["region_negatives"]["source"].endswith("region_negatives/test.json")
    assert report["metadata"]["region_negatives"]["sidecar_caption_mismatches"] == 0
    true = report["regions"]["conditions"]["true"]
    assert true["side"] == {"accuracy": 0.0, "n": len(records)}  # ties count as failures
    assert true["zone"]["n"] == len(records) and true["type"]["n"] == len(records) - 1
    assert true["all"]["accuracy"] == 0.0


def test_accuracy_by_label_exposes_a_pair_the_mean_hides():
    # Four lesions: "a" always wins its type negative, "b" never; the mean (0.5) says nothing of that.
    outcomes = {"type": {"correct": torch.tensor([True, True, False, False]), "valid": torch.ones(4, dtype=torch.bool)},
                "side": {"correct": torch.tensor([True, False, True, True]),
                         "valid": torch.tensor([True, True, True, False])}}
    table = accuracy_by_label(outcomes, ["a", "a", "b", "b"])
    assert table["a"]["type"] == {"accuracy": 1.0, "n": 2} and table["b"]["type"] == {"accuracy": 0.0, "n": 2}
    assert table["a"]["side"] == {"accuracy": 0.5, "n": 2} and table["b"]["side"] == {"accuracy": 1.0, "n": 1}


def test_best_region_scores_find_the_planted_proposal_among_the_valid_ones():
    basis = torch.eye(4)
    classes = {"nodule": basis[:1], "mass": basis[1:2]}
    background = basis[2:3]
    proposals = torch.stack([torch.stack([basis[2], basis[0], basis[1]]),  # image 0: background, nodule, mass
                             torch.stack([basis[2], basis[2], basis[0]])])  # image 1: its nodule is padding
    mask = torch.tensor([[True, True, True], [True, True, False]])
    best = best_region_scores(proposals * 3.0, mask, classes, background, logit_scale=10.0)  # norm is irrelevant
    winner = math.exp(10) / (math.exp(10) + 2)  # a proposal equal to one ensemble, orthogonal to the other two
    assert best["nodule"][1].tolist()[0] == 1 and best["mass"][1].tolist()[0] == 2
    assert best["nodule"][0].tolist() == pytest.approx([winner, 1 / (math.exp(10) + 2)])  # image 1: background only
    with pytest.raises(ValueError, match="at least one valid proposal"):
        best_region_scores(proposals, torch.tensor([[True, True, True], [False, False, False]]), classes, background,
                           10.0)
