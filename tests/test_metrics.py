"""The metric functions (regionmed_clip.scoring, evaluation.retrieval) and their local `evaluate` modules:
planted answers, agreement with scikit-learn, and loading by path with the Hub switched off."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from regionmed_clip.evaluation.metrics import METRIC_NAMES, load_metric
from regionmed_clip.evaluation.retrieval import best_positive_ranks, rank_summary
from regionmed_clip.scoring import (
    auroc,
    bootstrap_interval,
    classification_accuracy,
    macro_f1,
    mean_pairwise_cosine,
    normalize_answer,
    vqa_accuracy,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # loading by path must not need the Hub


# --- AUROC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_planted_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0 and auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auroc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5  # all tied: a coin
    assert np.isnan(auroc([0.2, 0.3], [1, 1]))  # no negative


def test_bootstrap_interval_brackets_the_value_and_narrows_with_more_data():
    rng = np.random.default_rng(0)

    def interval(count):
        labels = rng.integers(0, 2, count)
        scores = rng.normal(labels, 1.0)
        low, high = bootstrap_interval(auroc, scores, labels, resamples=300, seed=1)
        return auroc(scores, labels), low, high

    value, low, high = interval(100)
    assert low < value < high
    _, big_low, big_high = interval(2000)
    assert big_high - big_low < 0.5 * (high - low)  # ~1/sqrt(20) of the width in theory
    # deterministic for a seed
    labels, scores = np.array([0, 1] * 20), np.arange(40.0)
    assert bootstrap_interval(auroc, scores, labels, resamples=50, seed=3) == bootstrap_interval(
        auroc, scores, labels, resamples=50, seed=3)


def test_bootstrap_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="share their length"):
        bootstrap_interval(auroc, [0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(auroc, [0.1, 0.2], [0, 1], confidence=1.5)


def test_auroc_module_binary_and_multilabel_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (120, 3))
    scores = rng.normal(labels * [0.2, 1.0, 3.0], 1.0)
    binary = load_metric("auroc").compute(prediction_scores=scores[:, 1], references=labels[:, 1])
    assert binary["roc_auc"] == pytest.approx(roc_auc_score(labels[:, 1], scores[:, 1]))
    multi = load_metric("auroc", "multilabel").compute(prediction_scores=scores.tolist(), references=labels.tolist(),
                                                       bootstrap_resamples=200)
    expected = [roc_auc_score(labels[:, c], scores[:, c]) for c in range(3)]
    assert multi["per_class"] == pytest.approx(expected)
    assert multi["roc_auc"] == pytest.approx(np.mean(expected))
    assert all(low < value < high for low, value, high in zip(multi["per_class_low"], expected, multi["per_class_high"], strict=True))
    assert multi["per_class"][0] < multi["per_class"][1] < multi["per_class"][2]  # the planted separations


# --- classification ------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_match_scikit_learn():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 300)
    predicted = np.where(rng.random(300) < 0.6, true, rng.integers(0, 4, 300))
    assert classification_accuracy(predicted, true) == pytest.approx((predicted == true).mean())
    assert macro_f1(predicted, true) == pytest.approx(f1_score(true, predicted, average="macro"))
    # a class never predicted nor present counts 0 when named
    assert macro_f1([0, 0], [0, 0], classes=[0, 1]) == 0.5


# --- retrieval -----------------------------------------------------------------------------------


def test_ranks_with_several_captions_per_image():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0],    # positives 2, 3: best is 0.1, two others above -> rank 2
                           [0.1, 0.9, 0.2, 0.95]])  # positive 1 (0.9) below 3 (0.95), which is also positive -> 0
    positives = torch.tensor([[False, False, True, True], [False, True, False, True]])
    assert best_positive_ranks(scores, positives).tolist() == [2, 0]
    assert rank_summary(torch.tensor([0, 2, 9, 30]), ks=(1, 10)) == {"R@1": 25.0, "R@10": 75.0, "median_rank": 6.5}
    with pytest.raises(ValueError, match="at least one positive"):
        best_positive_ranks(scores, torch.zeros_like(positives))


def test_recall_at_k_module_planted_ranks():
    # 4 queries over 5 candidates; true candidate ranks 0, 1, 3 (tie counted against), 4
    predictions = [[0.9, 0.1, 0.1, 0.1, 0.1],
                   [0.5, 0.9, 0.1, 0.1, 0.1],
                   [0.5, 0.5, 0.5, 0.5, 0.1],
                   [0.5, 0.6, 0.7, 0.8, 0.1]]
    references = [[0], [0], [3], [4]]
    result = load_metric("recall_at_k").compute(predictions=predictions, references=references, ks=[1, 2, 4])
    assert result == {"R@1": 25.0, "R@2": 50.0, "R@4": 75.0, "median_rank": 3.0}
    with pytest.raises(ValueError, match="references\\[0\\]"):
        load_metric("recall_at_k").compute(predictions=[[0.1, 0.2]], references=[[5]])


# --- VQA -----------------------------------------------------------------------------------------


def test_vqa_accuracy_normalises_and_splits_by_answer_type():
    assert normalize_answer("  The LEFT lung. ") == "left lung"
    result = vqa_accuracy(["Yes", "no", "the left lung", "nodule"], ["yes", "yes", "Left lung!", "mass"],
                          ["closed", "closed", "open", "open"])
    assert result == {"accuracy": 0.5, "n": 4, "closed_accuracy": 0.5, "closed_n": 2, "open_accuracy": 0.5, "open_n": 2}
    with pytest.raises(ValueError, match="answer types must be in"):
        vqa_accuracy(["yes"], ["yes"], ["maybe"])
    module = load_metric("vqa_accuracy").compute(predictions=["Yes", "x"], references=["yes", "y"],
                                                answer_types=["closed", "open"])
    assert module["closed_accuracy"] == 1.0 and module["open_accuracy"] == 0.0


def test_load_metric_names_the_available_modules():
    assert set(METRIC_NAMES) == {"auroc", "recall_at_k", "vqa_accuracy"}
    with pytest.raises(ValueError, match="available"):
        load_metric("accuracy")


# --- mean pairwise cosine (the collapse alarm) ----------------------------------------------------


def test_mean_pairwise_cosine_on_planted_rows():
    unit = torch.eye(8)
    assert float(mean_pairwise_cosine(torch.ones(5, 3) * torch.tensor([[1.0], [2], [3], [4], [5]]))) == pytest.approx(1.0)
    assert float(mean_pairwise_cosine(torch.eye(4))) == pytest.approx(0.0)
    # pairs (0, 1) = 1, (0, 2) = 0, (1, 2) = 0: the norm of a row does not count
    assert float(mean_pairwise_cosine(torch.stack([unit[0], 2 * unit[0], unit[1]]))) == pytest.approx(1 / 3)
    assert math.isnan(float(mean_pairwise_cosine(unit[:1])))


def test_mean_pairwise_cosine_matches_the_pairwise_loop():
    embeds = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(embeds.double(), dim=-1)
    pairs = [float(unit[i] @ unit[j]) for i in range(7) for j in range(7) if i != j]
    assert float(mean_pairwise_cosine(embeds)) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
