"""Behaviour: a short training of the default recipe on the synthetic films teaches the box-free path, and
its background windows teach the full-resolution proposals what is not a finding (against the same
training without them)."""

import numpy as np
import pytest
import torch
from datasets import concatenate_datasets

from regionmed_clip.data.schema import load_canonical
from regionmed_clip.evaluation.embeddings import encode_proposals, encode_texts
from regionmed_clip.scoring import auroc, mean_pairwise_cosine
from regionmed_clip.training_scripts.collator import AMBIGUOUS, BACKGROUND, label_windows
from regionmed_clip.training_scripts.train import build_trainer

from conftest import SHORT_TRAINING_STEPS, default_recipe_run

pytestmark = pytest.mark.slow

# measured over steps 10-30 -> 100-120: 2.81 -> 1.99, 1.55 -> 1.02, 0.99 -> 0.85, 1.55 -> 1.05, 3.10 -> 2.67
LEARNT_TERMS = ("loss_global_report", "loss_region", "loss_image_region", "loss_dense_region", "loss_hard_negative")
COLLAPSED = 0.9  # mean pairwise cosine of box-free embeddings above this counts as collapsed
RANK_FRACTION = 0.8  # a caption's own film must rank, on average, within 80% of the chance rank


@torch.no_grad()
def box_free_embeds(trainer, rows) -> torch.Tensor:
    model = trainer.model.eval()  # the box-free embedding a user gets: the view and its proposals pooled
    return model(**trainer.processing_class.image_processor(rows["image"], return_tensors="pt")).image_embeds


@torch.no_grad()
def region_caption_ranks(trainer, rows, image_embeds) -> torch.Tensor:
    """For every region caption, the rank (0 = first) of its own film among `image_embeds` by cosine."""
    captions = [region["caption"] for regions in rows["regions"] for region in regions]
    owners = torch.tensor([index for index, regions in enumerate(rows["regions"]) for _ in regions])
    tokens = trainer.processing_class(text=captions)
    text = trainer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
    similarity = text @ image_embeds.t()
    own = similarity[torch.arange(len(captions)), owners]
    return (similarity > own[:, None]).sum(1).float()


@torch.no_grad()
def background_separation(trainer, rows) -> float:
    """AUROC with which a proposal's cosine with the model's background caption tells the background
    windows of held-out films from the windows that hold a lesion (`label_windows`)."""
    model, processor = trainer.model.eval(), trainer.processing_class
    proposals = encode_proposals(model, processor, list(rows["image"]), 16, torch.device("cpu"))
    background = encode_texts(model, processor, [model.config.background_caption], 1, torch.device("cpu"))[0]
    scores, is_background = [], []
    for index, regions in enumerate(rows["regions"]):
        valid = proposals["proposal_mask"][index]
        windows = proposals["proposal_boxes"][index][valid].numpy()
        crops = np.array([processor.image_processor.crop_box(window, 256, 256) for window in windows])
        labels = label_windows(windows, np.array([region["bbox"] for region in regions]).reshape(-1, 4), crops)
        known = labels != AMBIGUOUS
        scores += (proposals["proposal_embeds"][index][valid] @ background)[torch.from_numpy(known)].tolist()
        is_background += (labels[known] == BACKGROUND).tolist()
    return auroc(np.array(scores), np.array(is_background, dtype=float))


def test_a_short_training_leaves_collapse_and_its_windows_teach_the_proposals_what_is_not_a_finding(
        short_training, tmp_path):
    data_dir = short_training.data_dir  # the default recipe, trained SHORT_TRAINING_STEPS steps (conftest)
    rows = load_canonical(data_dir, "train")[:48]
    held_out = concatenate_datasets([load_canonical(data_dir, split) for split in ("validation", "test")])
    untrained, _ = build_trainer(default_recipe_run(tmp_path / "untrained", data_dir))  # the same seed, step 0
    before = box_free_embeds(untrained, rows)
    ranks_before = region_caption_ranks(untrained, rows, before)
    after = box_free_embeds(short_training.trainer, rows)
    ranks_after = region_caption_ranks(short_training.trainer, rows, after)
    without_background, _ = build_trainer(default_recipe_run(tmp_path / "no_background", data_dir, windows_per_image=0))
    without_background.train()
    separation = {"windows": background_separation(short_training.trainer, held_out),
                  "no_background": background_separation(without_background, held_out)}
    # the box-free embedding is no longer one shared vector ...
    assert mean_pairwise_cosine(before) > 0.95
    assert mean_pairwise_cosine(after) < COLLAPSED
    # ... and the spread is about the findings: a region caption finds its own film better than by chance
    chance_rank = (len(rows["image"]) - 1) / 2
    assert ranks_after.mean() < min(RANK_FRACTION * chance_rank, ranks_before.mean())
    # the same short training without background windows never learns what a lesion-free window is
    # (measured: 0.756 against 0.586 at SHORT_TRAINING_STEPS = 120)
    assert separation["windows"] > 0.7 and separation["windows"] > separation["no_background"] + 0.1, separation


def test_every_loss_term_of_the_short_training_goes_down(short_training):
    logged = [entry for entry in short_training.trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(10, SHORT_TRAINING_STEPS + 1, 10))
    first, last = logged[:3], logged[-3:]

    def mean(entries, term):
        return sum(float(entry[term]) for entry in entries) / len(entries)

    assert mean(last, "loss") < 0.9 * mean(first, "loss")
    for term in LEARNT_TERMS:  # the terms that must move in 120 steps, not only their sum
        assert mean(last, term) < mean(first, term) - 0.05, (term, mean(first, term), mean(last, term))
