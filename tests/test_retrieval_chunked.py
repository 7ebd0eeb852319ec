"""Chunked, memory-bounded retrieval (evaluation.retrieval.retrieval_ranks / retrieval_metrics): the same
ranks as `best_positive_ranks` on the full similarity matrix, whatever the chunk size."""

import pytest
import torch

import regionmed_clip.evaluation.retrieval as retrieval
from regionmed_clip.evaluation.retrieval import (
    best_positive_ranks,
    rank_summary,
    retrieval_metrics,
    retrieval_ranks,
    retrieval_recall_at_k,
)


def full_matrix_ranks(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor) -> dict:
    """The reference: the whole (N_i, N_t) similarity matrix and a dense positives mask."""
    similarity = images @ texts.T
    positives = text_to_image[None, :] == torch.arange(len(images))[:, None]
    has_text = positives.any(1)
    return {"image_to_text": best_positive_ranks(similarity[has_text], positives[has_text]),
            "text_to_image": best_positive_ranks(similarity.T, positives.T)}


def assert_same_ranks(actual: dict, expected: dict) -> None:
    assert set(actual) == {"image_to_text", "text_to_image"}
    for direction in expected:
        assert actual[direction].dtype == torch.int64
        assert actual[direction].tolist() == expected[direction].tolist(), direction


def several_texts_per_image(seed: int, n_images: int = 23, n_texts: int = 41) -> torch.Tensor:
    """Shuffled image indices: every image has a text but 0, 5 and the last; image 1 has at least 5."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(n_images) if i not in (0, 5, n_images - 1)])
    extra = allowed[torch.randint(len(allowed), (n_texts - len(allowed) - 4,), generator=generator)]
    text_to_image = torch.cat([allowed, torch.ones(4, dtype=torch.long), extra])
    return text_to_image[torch.randperm(n_texts, generator=generator)]


BUDGETS = [1, 700, 2**20, retrieval.DEFAULT_MEMORY_BUDGET_BYTES]  # 1 byte: one query row at a time


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_embeddings_match_the_full_matrix(seed, budget):
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(23, 16, generator=generator, dtype=torch.float64), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(41, 16, generator=generator, dtype=torch.float64), dim=1)
    text_to_image = several_texts_per_image(seed)
    ranks = retrieval_ranks(images, texts, text_to_image, memory_budget_bytes=budget)
    assert len(ranks["image_to_text"]) == 20  # images 0, 5 and 22 have no text
    assert_same_ranks(ranks, full_matrix_ranks(images, texts, text_to_image))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_ties_from_repeated_embeddings_match_the_full_matrix(seed, budget, dtype):
    # Small integer embeddings: every dot product is exact whatever the summation order, so chunked and
    # full-matrix scores are bitwise equal and the many ties (repeated rows) must be ranked the same way.
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(-1, 2, (6, 4), generator=generator).to(dtype)[torch.randint(6, (23,), generator=generator)]
    texts = torch.randint(-1, 2, (5, 4), generator=generator).to(dtype)[torch.randint(5, (41,), generator=generator)]
    text_to_image = several_texts_per_image(seed)
    ranks = retrieval_ranks(images, texts, text_to_image, memory_budget_bytes=budget)
    expected = full_matrix_ranks(images, texts, text_to_image)
    assert_same_ranks(ranks, expected)
    assert expected["text_to_image"].unique().numel() > 3  # the data does exercise ties at many ranks


def test_chunks_stay_within_the_budget(monkeypatch):
    """Every score chunk fits the budget; a budget below one row gives one query row at a time."""
    seen = []
    count_at_least = retrieval._count_at_least

    def spy(scores, threshold):
        seen.append(tuple(scores.shape))
        return count_at_least(scores, threshold)

    monkeypatch.setattr(retrieval, "_count_at_least", spy)
    images, texts = torch.randn(30, 8), torch.randn(50, 8)
    text_to_image = torch.arange(50) % 30
    retrieval_ranks(images, texts, text_to_image, memory_budget_bytes=1)
    assert seen == [(1, 50)] * 30 + [(1, 30)] * 50
    seen.clear()
    budget = 10 * (50 * 4 + 8 * 4)  # ten image rows of float32 scores plus their query copies
    retrieval_ranks(images, texts, text_to_image, memory_budget_bytes=budget)
    assert seen[:3] == [(10, 50)] * 3
    assert all(rows * columns * 4 <= budget for rows, columns in seen)
    assert sum(rows for rows, columns in seen if columns == 30) == 50


def test_finite_check_goes_in_blocks_within_the_budget(monkeypatch):
    """isfinite makes an abs() copy and bool masks (~itemsize + 3 bytes an element): blocks sized for that."""
    seen = []
    isfinite = torch.isfinite

    def spy(values):
        seen.append(tuple(values.shape))
        return isfinite(values)

    monkeypatch.setattr(torch, "isfinite", spy)
    retrieval_ranks(torch.randn(25, 8), torch.randn(12, 8), torch.arange(12), memory_budget_bytes=10 * 8 * (4 + 3))
    assert seen == [(10, 8), (10, 8), (5, 8), (10, 8), (2, 8)]


def test_identity_embeddings_rank_everything_first():
    eye = torch.eye(7)
    ranks = retrieval_ranks(eye, eye, torch.arange(7), memory_budget_bytes=1)
    assert ranks["image_to_text"].tolist() == [0] * 7 and ranks["text_to_image"].tolist() == [0] * 7
    metrics = retrieval_metrics(eye, eye, torch.arange(7), ks=(1, 5))
    expected_side = {"R@1": 100.0, "R@5": 100.0, "median_rank": 1.0}
    assert metrics == {"image_to_text": expected_side, "text_to_image": expected_side,
                       "n_images": 7, "n_texts": 7, "n_images_with_text": 7}


def test_known_permutation_gives_known_ranks():
    # text i is image perm[i]'s one-hot but belongs to image i: fixed points score 1 (rank 0); any other
    # true pair scores 0, one wrong item scores 1 and the remaining four tie with it at 0 -> rank 5.
    perm = torch.tensor([0, 2, 1, 3, 5, 4])
    eye = torch.eye(6)
    ranks = retrieval_ranks(eye, eye[perm], torch.arange(6), memory_budget_bytes=50)
    assert ranks["text_to_image"].tolist() == [0, 5, 5, 0, 5, 5]
    assert ranks["image_to_text"].tolist() == [0, 5, 5, 0, 5, 5]
    metrics = retrieval_metrics(eye, eye[perm], torch.arange(6), ks=(1, 6))
    assert metrics["text_to_image"] == {"R@1": pytest.approx(100 / 3), "R@6": 100.0, "median_rank": 6.0}


def test_planted_scores_with_ties_and_several_texts_per_image():
    # One-hot images make each text's embedding its row of scores against the images.
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0],   # text 0 (image 0): best -> rank 0
                           [4.0, 3.0, 2.0, 1.0],   # text 1 (image 1): one above -> rank 1
                           [4.0, 3.0, 2.0, 1.0],   # text 2 (image 2): two above -> rank 2
                           [1.0, 1.0, 1.0, 1.0],   # text 3 (image 0): ties all four -> rank 3
                           [0.0, 0.0, 0.0, 5.0]])  # text 4 (image 3): best -> rank 0
    text_to_image = torch.tensor([0, 1, 2, 0, 3])
    ranks = retrieval_ranks(torch.eye(4), scores, text_to_image, memory_budget_bytes=1)
    assert ranks["text_to_image"].tolist() == [0, 1, 2, 3, 0]
    # image 0 (texts 0, 3): best 4 ties texts 1, 2 -> 2; image 1 (text 1, 3): texts 0, 2 tie -> 2;
    # image 2 (text 2, 2): texts 0, 1 tie -> 2; image 3 (text 4, 5): alone on top -> 0
    assert ranks["image_to_text"].tolist() == [2, 2, 2, 0]
    assert_same_ranks(ranks, full_matrix_ranks(torch.eye(4), scores, text_to_image))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_counts_past_what_half_can_hold(dtype):
    # 3,001 tied texts: a float16 (bfloat16) sum of 0/1 flags is not exact past 2,048 (256): 3,001 -> 3,000 (2,992).
    images, texts = torch.ones(2, 2, dtype=dtype), torch.ones(3001, 2, dtype=dtype)
    text_to_image = torch.zeros(3001, dtype=torch.long)
    text_to_image[-1] = 1
    ranks = retrieval_ranks(images, texts, text_to_image)
    assert ranks["image_to_text"].tolist() == [1, 3000]
    assert ranks["text_to_image"].tolist() == [1] * 3001


def test_metrics_summarise_the_reference_ranks():
    generator = torch.Generator().manual_seed(3)
    images, texts = torch.randn(23, 8, generator=generator), torch.randn(41, 8, generator=generator)
    text_to_image = several_texts_per_image(3)
    expected = full_matrix_ranks(images.double(), texts.double(), text_to_image)
    metrics = retrieval_metrics(images.double(), texts.double(), text_to_image, ks=(1, 3), memory_budget_bytes=900)
    assert metrics == {"image_to_text": rank_summary(expected["image_to_text"], (1, 3)),
                       "text_to_image": rank_summary(expected["text_to_image"], (1, 3)),
                       "n_images": 23, "n_texts": 41, "n_images_with_text": 20}


@pytest.mark.parametrize("budget", [1, 300, retrieval.DEFAULT_MEMORY_BUDGET_BYTES])
def test_recall_at_k_from_a_matrix_is_chunked_and_leaves_the_matrix_alone(budget):
    generator = torch.Generator().manual_seed(4)
    similarity = torch.randint(0, 4, (23, 41), generator=generator).float()  # many ties
    original = similarity.clone()
    text_to_image = several_texts_per_image(4)
    scores = retrieval_recall_at_k(similarity, ks=(1, 5), text_to_image=text_to_image, memory_budget_bytes=budget)
    assert torch.equal(similarity, original)
    positives = text_to_image[None, :] == torch.arange(23)[:, None]
    has_text = positives.any(1)
    image_side = rank_summary(best_positive_ranks(similarity[has_text], positives[has_text]), (1, 5))
    text_side = rank_summary(best_positive_ranks(similarity.T, positives.T), (1, 5))
    assert scores == {"image_to_text_R@1": image_side["R@1"], "text_to_image_R@1": text_side["R@1"],
                      "image_to_text_R@5": image_side["R@5"], "text_to_image_R@5": text_side["R@5"]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(-1, 2, (6, 4), generator=generator).float()[torch.randint(6, (300,), generator=generator)]
    texts = torch.randint(-1, 2, (5, 4), generator=generator).float()[torch.randint(5, (500,), generator=generator)]
    text_to_image = torch.randint(300, (500,), generator=generator)
    cpu = retrieval_ranks(images, texts, text_to_image, memory_budget_bytes=4000)
    cuda = retrieval_ranks(images.cuda(), texts.cuda(), text_to_image.cuda(), memory_budget_bytes=4000)
    assert cuda["image_to_text"].device.type == "cuda"
    assert_same_ranks({key: value.cpu() for key, value in cuda.items()}, cpu)


GOOD = {"image_embeds": torch.eye(3), "text_embeds": torch.eye(3), "text_to_image": torch.arange(3)}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_embeds": torch.ones(3)}, "image_embeds must be a \\(N, D\\) tensor"),
        ({"text_embeds": torch.ones(3, 3, 1)}, "text_embeds must be a \\(N, D\\) tensor"),
        ({"image_embeds": torch.zeros(0, 3)}, "image_embeds is empty"),
        ({"text_embeds": torch.zeros(0, 3), "text_to_image": torch.zeros(0, dtype=torch.long)}, "text_embeds is empty"),
        ({"text_embeds": torch.eye(3)[:, :2]}, "text_embeds has D=2 but image_embeds has D=3"),
        ({"image_embeds": torch.eye(3, dtype=torch.long)}, "image_embeds must be floating point"),
        ({"text_embeds": torch.eye(3, dtype=torch.float64)}, "must share a dtype"),
        ({"image_embeds": torch.tensor([[1.0, 0, 0], [0, float("nan"), 0], [0, 0, 1]])}, "image_embeds holds NaN"),
        ({"text_embeds": torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, float("inf")]])}, "text_embeds holds NaN or inf"),
        ({"text_to_image": torch.tensor([0.0, 1.0, 2.0])}, "text_to_image must hold integer"),
        ({"text_to_image": torch.tensor([True, False, True])}, "text_to_image must hold integer"),
        ({"text_to_image": torch.arange(2)}, "text_to_image must have shape \\(3,\\)"),
        ({"text_to_image": torch.tensor([0, 1, 3])}, "text_to_image must hold 3 image indices in \\[0, 3\\)"),
        ({"text_to_image": torch.tensor([0, -1, 2])}, "text_to_image must hold 3 image indices"),
        ({"memory_budget_bytes": 0}, "memory_budget_bytes must be a positive int"),
        ({"memory_budget_bytes": 1.5}, "memory_budget_bytes must be a positive int"),
    ],
)
def test_bad_input_names_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        retrieval_ranks(**{**GOOD, **changes})


def test_metrics_reject_bad_ks_before_ranking():
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(**GOOD, ks=(0, 1))
