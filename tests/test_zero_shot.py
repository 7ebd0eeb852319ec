"""Zero-shot building blocks: prompt templates from YAML, uncertain-label policies, and the
multi-label / multi-class reports on planted scores."""

import numpy as np
import pytest

from regionmed_clip.evaluation.zero_shot import (
    DEFAULT_PROMPTS,
    label_matrix,
    load_prompt_templates,
    multiclass_report,
    multilabel_report,
    prompts_for,
)


def test_shipped_templates_fill_the_class_and_apply_overrides():
    templates = load_prompt_templates(DEFAULT_PROMPTS)
    prompts = prompts_for(templates, ["Nodule", "Pneumothorax"])
    assert prompts["positive"]["Nodule"][:2] == ["Nodule.", "There is a Nodule."]
    assert "Normal chest X-ray." in prompts["negative"]["Nodule"]
    assert prompts["positive"]["Pneumothorax"][0] == "Pneumothorax."  # its own entry
    assert "There is no pneumothorax." in prompts["negative"]["Pneumothorax"]


@pytest.mark.parametrize("text, message", [
    ("classes: {}", "needs a 'default' mapping"),
    ("default: {positive: ['There is {c}.']}", "default.negative is missing"),
    ("default: {positive: ['Abnormal.'], negative: ['No {c}.']}", "placeholder"),
    ("default: {positive: ['{c}.'], negative: []}", "non-empty list"),
    ("default: {positive: ['{c}.'], negative: ['No {c}.']}\nclasses: {A: {postive: ['x']}}", "classes.A"),
])
def test_bad_templates_are_named(tmp_path, text, message):
    path = tmp_path / "prompts.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompt_templates(path)


def test_uncertain_label_policies():
    positives = [["A"], [], ["B"]]
    uncertain = [[], ["A"], ["A"]]
    labels, valid = label_matrix(positives, ["A", "B"], uncertain, "ignore")
    assert labels.tolist() == [[1, 0], [0, 0], [0, 1]]
    assert valid.tolist() == [[True, True], [False, True], [False, True]]
    labels, valid = label_matrix(positives, ["A", "B"], uncertain, "positive")
    assert labels[:, 0].tolist() == [1, 1, 1] and valid.all()
    labels, valid = label_matrix(positives, ["A", "B"], uncertain, "negative")
    assert labels[:, 0].tolist() == [1, 0, 0] and valid.all()
    with pytest.raises(ValueError, match="both positive and uncertain"):
        label_matrix([["A"]], ["A"], [["A"]])
    with pytest.raises(ValueError, match="policy must be one of"):
        label_matrix(positives, ["A"], uncertain, "zeros")


def test_multilabel_report_ignores_uncertain_rows_and_brackets_with_intervals():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (300, 2)).astype(float)
    scores = np.stack([labels[:, 0] * 2 + rng.normal(0, 1, 300), rng.normal(0, 1, 300)], 1)  # class 1 is noise
    valid = np.ones_like(labels, dtype=bool)
    valid[:50, 0] = False
    scores[:50, 0] = -labels[:50, 0] * 10  # planted: these rows would ruin class 0 if they were counted
    report = multilabel_report(scores, labels, valid, ["A", "B"], resamples=200)
    a, b = report["per_class"]["A"], report["per_class"]["B"]
    assert a["ignored"] == 50 and a["auroc"] > 0.85 and a["low"] < a["auroc"] < a["high"]
    assert abs(b["auroc"] - 0.5) < 0.1 and b["low"] < 0.5 < b["high"]
    assert report["macro_auroc"] == pytest.approx((a["auroc"] + b["auroc"]) / 2)
    interval = report["macro_auroc_interval"]
    assert interval["low"] < report["macro_auroc"] < interval["high"]


def test_multiclass_report_planted_predictions():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    targets = [0, 1, 2, 2]  # the last is predicted 0: 3 of 4 right
    report = multiclass_report(scores, targets, ["a", "b", "c"], resamples=100)
    assert report["accuracy"] == 0.75 and report["chance_accuracy"] == 0.5
    # F1: a = 2/3 (1 TP, 1 FP), b = 1, c = 2/3 (1 TP, 1 FN)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert report["per_class"]["b"] == {"auroc": 1.0, "support": 1}
    with pytest.raises(ValueError, match="class indices"):
        multiclass_report(scores, [0, 1, 2, 3], ["a", "b", "c"])
