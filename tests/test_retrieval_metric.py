import pytest
import torch

from regionmed_clip.evaluation.retrieval import retrieval_recall_at_k


def test_perfect_and_reversed_rankings():
    perfect = torch.eye(4)
    assert retrieval_recall_at_k(perfect, ks=(1,)) == {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100.0}
    # every true pair scores lowest: found only at K = N
    worst = 1 - torch.eye(4)
    scores = retrieval_recall_at_k(worst, ks=(1, 3, 4))
    assert scores["image_to_text_R@3"] == 0.0 and scores["image_to_text_R@4"] == 100.0


def test_hand_computed_mixed_case():
    similarity = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.2, 0.3], [0.0, 0.1, 0.5]])
    # image 0 -> text 0 rank 0; image 1 -> text 1 rank 2; image 2 -> text 2 rank 0
    # text 0 -> image 0 rank 1 (image 1 scores .95); text 1 -> image 1 rank 1; text 2 -> image 2 rank 0
    scores = retrieval_recall_at_k(similarity, ks=(1, 2))
    assert scores["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert scores["image_to_text_R@2"] == pytest.approx(200 / 3)
    assert scores["text_to_image_R@1"] == pytest.approx(100 / 3)
    assert scores["text_to_image_R@2"] == pytest.approx(100.0)


def test_ties_are_not_counted_as_hits():
    assert retrieval_recall_at_k(torch.ones(3, 3), ks=(1,))["text_to_image_R@1"] == 0.0


def test_several_texts_per_image():
    similarity = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.0, 0.7]])
    scores = retrieval_recall_at_k(similarity, ks=(1,), text_to_image=torch.tensor([0, 0, 1]))
    # image 0's best text (1) ranks first; image 1's only text (2) loses to text 0
    assert scores["image_to_text_R@1"] == 50.0
    # text 0 prefers image 1; texts 1 and 2 find their images first
    assert scores["text_to_image_R@1"] == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"similarity": torch.ones(2, 3)}, "text_to_image is required"),
        ({"similarity": torch.ones(3)}, "must be \\(N_images, N_texts\\)"),
        ({"similarity": torch.eye(2), "ks": (0,)}, "ks must be positive"),
        ({"similarity": torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])}, "NaN"),
        ({"similarity": torch.eye(2), "text_to_image": torch.tensor([0, 2])}, "image indices"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_recall_at_k(**kwargs)
