"""The evaluation tasks (evaluation/tasks.py), their results files, figures and embedding cache, and
`regionmed-eval` end to end: planted answers for the pure parts, equality with a direct computation
from the model's outputs for the tasks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import regionmed_clip.evaluation.tasks as tasks
from regionmed_clip.data.schema import load_canonical, write_rows
from regionmed_clip.evaluation.embeddings import (
    EmbeddingCache,
    encode_images,
    encode_proposals,
    encode_texts,
)
from regionmed_clip.evaluation.probe import _load, best_region_scores, model_logit_scale, zero_shot_scores
from regionmed_clip.evaluation.results import (
    RESULTS_FIELDS,
    load_results,
    markdown_report,
    results_record,
    write_results,
)
from regionmed_clip.evaluation.retrieval import retrieval_recall_at_k
from regionmed_clip.evaluation.tasks import EvalSettings, box_iou, grounding_outcomes
from regionmed_clip.evaluation.zero_shot import load_prompt_templates, prompts_for
from regionmed_clip.figures import roc_curve_points
from regionmed_clip.scoring import auroc

from conftest import build_saved_model

# -- pure parts -----------------------------------------------------------------------------------


def test_box_iou_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(boxes, torch.tensor([0.0, 0.0, 10.0, 10.0]))
    assert iou.tolist() == pytest.approx([1.0, 25 / 175, 0.0])


def test_grounding_outcomes_on_planted_embeddings():
    # Three candidates; phrase 0 matches candidate 1 (inside its box), phrase 1 matches candidate 2 (elsewhere).
    candidates = torch.eye(3, dtype=torch.float64)
    candidate_boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=torch.float64)
    phrases = torch.tensor([[0.1, 1.0, 0.0], [0.0, 0.2, 1.0]], dtype=torch.float64)
    true_boxes = torch.tensor([[19, 19, 31, 31], [0, 0, 12, 12]], dtype=torch.float64)
    outcome = grounding_outcomes(phrases, candidates, candidate_boxes, true_boxes, iou_threshold=0.5)
    assert outcome["top"].tolist() == [1, 2]
    assert outcome["pointing"].tolist() == [True, False] and outcome["iou_hit"].tolist() == [True, False]
    # one of the three candidates would point into (and overlap) each true box
    assert outcome["pointing_chance"].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert outcome["iou_chance"].tolist() == pytest.approx([1 / 3, 1 / 3])


def test_roc_curve_area_equals_auroc_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1)  # many ties
    labels = (rng.random(200) < 0.3 + 0.4 * (scores > 0)).astype(float)
    points = roc_curve_points(scores, labels)
    assert points[0] == (0.0, 0.0) and points[-1] == pytest.approx((1.0, 1.0))
    x, y = np.array(points).T
    assert np.trapezoid(y, x) == pytest.approx(auroc(scores, labels))
    assert roc_curve_points(scores, np.zeros(200)) == []


def _record(task: str, value: float, model: str = "/runs/a/final") -> dict:
    return results_record(task, {"name": "synth", "path": "/data/synth", "split": "test", "files": [], "revision": None},
                          10, {"x": float("nan")}, {"figure": {"value": value, "low": value - 0.1, "high": value + 0.1}},
                          {"path": model, "config_sha256": "c", "weights_sha256": "w"}, "regionmed-eval x", {})


def test_results_round_trip_with_nan_as_null_and_every_field(tmp_path):
    path = write_results(tmp_path / "out", _record("zero-shot", 0.75))
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["metrics"]["x"] is None
    record = load_results(tmp_path / "out")
    assert set(RESULTS_FIELDS) <= set(record) and record["versions"]["torch"] == torch.__version__
    with pytest.raises(ValueError, match="lacks the fields"):
        write_results(tmp_path / "bad", {"task": "x"})
    (tmp_path / "junk.json").write_text('{"task": 1}')
    with pytest.raises(ValueError, match="not a regionmed-eval results file"):
        load_results(tmp_path / "junk.json")


def test_markdown_report_one_table_per_task_with_intervals():
    control = _record("zero-shot", 0.5, "/runs/c/final")
    control["settings"] = {"use_regions": True, "limit": 3}
    table = markdown_report([_record("zero-shot", 0.75), _record("retrieval", 12.5, "/runs/b/final"), control])
    assert table.count("### ") == 2 and table.index("### zero-shot") < table.index("### retrieval")
    assert "| a/final | synth | test | 10 | 0.750 [0.650, 0.850] |" in table
    assert "| c/final (use_regions) | synth | test | 10 | 0.500 [0.400, 0.600] |" in table
    assert "| b/final | synth | test | 10 | 12.5 [12.4, 12.6] |" in table


def test_embedding_cache_reuses_only_a_matching_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"embeds": torch.arange(6.0).reshape(2, 3)}

    first = EmbeddingCache(tmp_path, {"model": "a"}).get_or_compute("images", compute)
    again = EmbeddingCache(tmp_path, {"model": "a"}).get_or_compute("images", compute)
    assert len(calls) == 1 and torch.equal(first["embeds"], again["embeds"])
    EmbeddingCache(tmp_path, {"model": "b"}).get_or_compute("images", compute)  # other inputs: re-encoded
    assert len(calls) == 2 and not list(tmp_path.glob("*.partial"))
    EmbeddingCache(None, {"model": "a"}).get_or_compute("images", compute)  # no folder: never cached
    assert len(calls) == 3
    # damaged files are rebuilt, never read: cut short, or a tensor byte changed (the checksum catches it)
    path = tmp_path / "images.safetensors"
    for damage in (lambda data: data[:-7], lambda data: data[:-1] + bytes([data[-1] ^ 0xFF])):
        path.write_bytes(damage(path.read_bytes()))
        again = EmbeddingCache(tmp_path, {"model": "b"}).get_or_compute("images", compute)
        assert torch.equal(again["embeds"], first["embeds"])
    assert len(calls) == 5
    EmbeddingCache(tmp_path, {"model": "b"}).get_or_compute("images", compute)
    assert len(calls) == 5


# -- tasks on a tiny saved model ------------------------------------------------------------------

CONDITIONS = ("true", "crops_blanked", "boxes_mirrored", "box_geometry_removed")  # the region task's controls


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval")
    model_dir, data_dir, _, _ = build_saved_model(tmp_path, n=60)
    model, processor = _load(model_dir, torch.device("cpu"))
    rows = load_canonical(data_dir, "test")
    return {"model_dir": model_dir, "data_dir": data_dir, "model": model, "processor": processor, "rows": rows,
            "tmp": tmp_path}


def _settings(saved, name: str, **overrides) -> EvalSettings:
    return EvalSettings(saved["model_dir"], saved["data_dir"], saved["tmp"] / name, batch_size=4, device="cpu",
                        resamples=20, **overrides)


def test_zero_shot_equals_direct_computation_and_rescoring_reads_the_cache(saved, monkeypatch):
    record = tasks.run_zero_shot(_settings(saved, "zs"), use_regions=True)
    rows, model, processor = saved["rows"], saved["model"], saved["processor"]
    classes = record["settings"]["classes"]
    assert record["metrics"]["mode"] == "multilabel" and "No finding" not in classes
    assert record["settings"]["scoring"] == "best-region"
    prompts = prompts_for(load_prompt_templates(), classes)
    embed = lambda texts: encode_texts(model, processor, texts, 8, torch.device("cpu"))  # noqa: E731
    positive = {c: embed(prompts["positive"][c]) for c in classes}
    # by default: each class's best-matching proposal, against the model's background caption
    proposals = encode_proposals(model, processor, list(rows["image"]), 4, torch.device("cpu"))
    best = best_region_scores(proposals["proposal_embeds"], proposals["proposal_mask"], positive,
                              embed([model.config.background_caption]), model_logit_scale(model))
    # beside it: the pooled image embedding (get_image_features), positive minus negative prompts
    images = encode_images(model, processor, rows["image"], 4, torch.device("cpu"))
    pooled = zero_shot_scores(images, positive, {c: embed(prompts["negative"][c]) for c in classes})
    for name in classes:
        truth = [name in labels for labels in rows["labels"]]
        for block, scores in (("box_free", best[name][0]), ("box_free_pooled", pooled[name])):
            expected, got = auroc(scores, truth), record["metrics"][block]["per_class"][name]["auroc"]
            assert (np.isnan(expected) and np.isnan(got)) or got == pytest.approx(expected), (block, name)
    assert "macro_auroc_with_regions" in record["headline"]
    assert record["metrics"]["with_regions"]["images_with_boxes"] == sum(1 for r in rows["regions"] if r)
    assert (saved["tmp"] / "zs" / "embeddings" / "proposals.safetensors").is_file()
    assert {"roc_curves.png", "box_free_heatmaps.png"} <= set(record["figures"])
    # the pointing game, by hand: does a class's best proposal's centre fall in a box of that class
    hits = []
    for index, regions in enumerate(rows["regions"]):
        for name in {region["label"] for region in regions} & set(classes):
            box = proposals["proposal_boxes"][index][int(best[name][1][index])]
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            hits.append(any(r["bbox"][0] <= centre[0] <= r["bbox"][2] and r["bbox"][1] <= centre[1] <= r["bbox"][3]
                            for r in regions if r["label"] == name))
    pointing = record["metrics"]["pointing_game"]
    assert pointing["n"] == len(hits) > 0 and pointing["pointing_accuracy"] == pytest.approx(np.mean(hits))
    assert 0 < pointing["chance"] < 0.5 and "pointing_game.png" in record["figures"]

    def no_encoding(*args, **kwargs):
        raise AssertionError("re-scoring re-encoded the images")

    monkeypatch.setattr(tasks, "encode_images", no_encoding)
    monkeypatch.setattr(tasks, "encode_proposals", no_encoding)
    rescored = tasks.run_zero_shot(_settings(saved, "zs"), use_regions=True, uncertain_policy="negative")
    aurocs = lambda report: [entry["auroc"] for entry in report["metrics"]["box_free"]["per_class"].values()]  # noqa: E731
    assert aurocs(rescored) == pytest.approx(aurocs(record), nan_ok=True)
    pooled_first = tasks.run_zero_shot(_settings(saved, "zs"), use_regions=True, scoring="pooled")
    beside = [entry["auroc"] for entry in record["metrics"]["box_free_pooled"]["per_class"].values()]
    assert aurocs(pooled_first) == pytest.approx(beside, nan_ok=True)  # the headline swaps, the figures do not
    with pytest.raises(tasks.EvaluationInputError, match="--scoring"):
        tasks.run_zero_shot(_settings(saved, "zs"), scoring="mean")


def test_zero_shot_uncertain_labels_follow_the_policy(saved, tmp_path):
    # The test films with one class moved from `labels` to `uncertain_labels` on its first two positives.
    rows = [dict(row) for row in load_canonical(saved["data_dir"], "test", decode_images=False)]
    name = next(label for row in rows for label in row["labels"] if label != "No finding")
    moved = [row for row in rows if name in row["labels"]][:2]
    for row in moved:
        row["labels"] = [label for label in row["labels"] if label != name] or ["No finding"]
        row["uncertain_labels"] = [name]
    write_rows(rows, tmp_path / "data")
    positives = sum(name in row["labels"] for row in rows)
    settings = lambda policy: EvalSettings(saved["model_dir"], tmp_path / "data", tmp_path / policy,  # noqa: E731
                                           batch_size=4, device="cpu", resamples=0)
    counts = {policy: tasks.run_zero_shot(settings(policy), classes=[name], uncertain_policy=policy)
              ["metrics"]["box_free"]["per_class"][name] for policy in ("ignore", "positive", "negative")}
    assert (counts["ignore"]["ignored"], counts["ignore"]["positives"]) == (2, positives)
    assert (counts["positive"]["ignored"], counts["positive"]["positives"]) == (0, positives + 2)
    assert (counts["negative"]["positives"], counts["negative"]["negatives"]) == (positives, len(rows) - positives)


def test_device_errors_name_the_flag(saved):
    with pytest.raises(tasks.EvaluationInputError, match="--device"):
        tasks.run_retrieval(EvalSettings(saved["model_dir"], saved["data_dir"], saved["tmp"] / "d", device="gpu7"))
    if not torch.cuda.is_available():
        with pytest.raises(tasks.EvaluationInputError, match="CUDA is not available"):
            tasks.run_retrieval(EvalSettings(saved["model_dir"], saved["data_dir"], saved["tmp"] / "d", device="cuda"))


def test_zero_shot_multiclass_needs_one_label_per_image(saved):
    with pytest.raises(tasks.EvaluationInputError, match="exactly one label per image"):
        tasks.run_zero_shot(_settings(saved, "mc"), mode="multiclass")
    with pytest.raises(tasks.EvaluationInputError, match="--mode"):
        tasks.run_zero_shot(_settings(saved, "mc"), mode="binary")


def test_region_task_equals_the_model_on_processor_inputs_under_each_control(saved):
    """The oracle uses the public API only: `model(**processor(...))` one image at a time, each control
    made as its definition says (a uniform crop of the processor's pad intensity; the boxes of the
    lesions' point-reflected positions; the whole view as every box), the class ensembles from the
    model's text embeddings of the prompts. Nothing of the evaluation package (encode_regions, the
    controls, the ensemble, the report) is reused."""
    record = tasks.run_region(_settings(saved, "region"))
    rows, model, processor = saved["rows"], saved["model"], saved["processor"]
    classes = record["settings"]["classes"]
    assert set(record["metrics"]["conditions"]) == set(CONDITIONS)
    prompts = prompts_for(load_prompt_templates(), classes)["positive"]
    image_processor = processor.image_processor
    with torch.no_grad():
        prompt_embeds = model(**processor(text=[text for name in classes for text in prompts[name]],
                                          return_tensors="pt")).text_embeds
        ensembles, start = [], 0
        for name in classes:  # per class: the mean of its prompts' normalised embeddings, renormalised
            ensembles.append(prompt_embeds[start : start + len(prompts[name])].mean(0))
            start += len(prompts[name])
        class_embeds = torch.nn.functional.normalize(torch.stack(ensembles), dim=-1)

        embeds: dict[str, list[torch.Tensor]] = {condition: [] for condition in CONDITIONS}
        truth = []
        for image, regions in zip(rows["image"], rows["regions"], strict=True):
            kept = [region for region in regions if region["label"] in classes]
            if not kept:
                continue
            truth += [region["label"] for region in kept]
            boxes = [region["bbox"] for region in kept]
            width, height = image.size
            each = processor.with_max_rois(len(boxes))
            true = each(images=[image], regions=[boxes], return_tensors="pt")
            uniform = Image.new(image.mode, image.size, image_processor.pad_value)
            mirrored = [[width - x1, height - y1, width - x0, height - y0] for x0, y0, x1, y1 in boxes]
            inputs = {
                "true": true,
                "crops_blanked": {**true, "roi_pixel_values": each(images=[uniform], regions=[boxes],
                                                                    return_tensors="pt")["roi_pixel_values"]},
                "boxes_mirrored": {**true, "roi_boxes": each(images=[image], regions=[mirrored],
                                                              return_tensors="pt")["roi_boxes"]},
                "box_geometry_removed": {**true, "roi_boxes": torch.tensor([[[0.0, 0.0, 1.0, 1.0]] * len(boxes)])},
            }
            for condition, batch in inputs.items():
                embeds[condition].append(model(**batch).region_embeds[0, : len(boxes)])
    assert record["n_examples"] == len(truth) > 0
    targets = [classes.index(label) for label in truth]
    for condition in CONDITIONS:
        scores = torch.cat(embeds[condition]) @ class_embeds.t()
        correct = [classes[k] == label for k, label in zip(scores.argmax(1).tolist(), truth, strict=True)]
        got = record["metrics"]["conditions"][condition]
        assert got["accuracy"] == pytest.approx(np.mean(correct)), condition
        for column, name in enumerate(classes):
            expected = auroc(scores[:, column].numpy(), [target == column for target in targets])
            assert got["per_class"][name]["auroc"] == pytest.approx(expected, nan_ok=True), (condition, name)
    # every control changed what the model saw: the region embeddings moved
    true = torch.cat(embeds["true"])
    for control in CONDITIONS[1:]:
        assert (torch.cat(embeds[control]) - true).norm(dim=-1).min() > 1e-3, control
    assert set(record["figures"]) == {"roc_curves.png", "region_overlays.png"}


def test_grounding_counts_every_phrase_and_its_chance(saved):
    record = tasks.run_grounding(_settings(saved, "grounding"), window_sizes=[0.25], stride=1.0)
    rows = saved["rows"]
    phrases = sum(len(regions) for regions in rows["regions"])
    multi = sum(len(regions) for regions in rows["regions"] if len(regions) >= 2)
    metrics = record["metrics"]
    assert record["n_examples"] == metrics["proposals"]["pointing_accuracy"]["n"] == phrases
    assert metrics["among_boxes"]["pointing_accuracy"]["n"] == multi
    # a 4 x 4 grid of non-overlapping windows: chance of pointing is the fraction of window centres in the box
    assert metrics["proposals"]["windows_per_image"] == 16
    chances = []
    for image, regions in zip(rows["image"], rows["regions"], strict=True):
        side = min(image.size) / 4
        centres = [(side * (i + 0.5), side * (j + 0.5)) for i in range(4) for j in range(4)]
        chances += [np.mean([x0 <= x <= x1 and y0 <= y <= y1 for x, y in centres])
                    for x0, y0, x1, y1 in (region["bbox"] for region in regions)]
    assert metrics["proposals"]["pointing_chance"] == pytest.approx(np.mean(chances))


def test_retrieval_equals_the_full_matrix_and_leaves_out_shared_texts(saved):
    record = tasks.run_retrieval(_settings(saved, "retrieval"), captions=["report", "summary"])
    rows, model, processor = saved["rows"], saved["model"], saved["processor"]
    images = encode_images(model, processor, rows["image"], 4, torch.device("cpu"))
    owners: dict[str, set] = {}
    for column in ("report_caption", "summary_caption"):
        for index, text in enumerate(rows[column]):
            owners.setdefault(text, set()).add(index)
    texts = [text for text, who in owners.items() if len(who) == 1]
    texts_embeds = encode_texts(model, processor, texts, 8, torch.device("cpu"))
    full = retrieval_recall_at_k(images @ texts_embeds.t(), text_to_image=torch.tensor([min(owners[t]) for t in texts]))
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert record["metrics"][direction][f"R@{k}"] == pytest.approx(full[f"{direction}_R@{k}"])
    assert record["metrics"]["texts"] == len(texts)
    assert record["metrics"]["texts_shared_by_several_images"] == sum(len(w) > 1 for w in owners.values()) > 0
