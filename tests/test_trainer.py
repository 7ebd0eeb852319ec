"""The staged Trainer in-process: freezing, learning-rate multipliers, non-finite steps, checkpoints."""

import math

import pytest
import torch

from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.training_scripts.checkpoints import CHECKPOINT_COMPLETE, latest_intact_checkpoint, verify_checkpoint
from regionmed_clip.training_scripts.train import DEFAULT_TRAINING_ARGS, build_trainer
from regionmed_clip.training_scripts.trainer import NonFiniteLossError

TWO_STAGES = [
    {"name": "global", "steps": 3, "loss_weights": {"global_report": 1.0}, "lr_multipliers": {"roi": 0.0}},
    {"name": "regions", "steps": 3, "loss_weights": {"global_report": 1.0, "region": 0.5, "hard_negative": 0.5,
                                                     "global_summary": 0.5},
     "lr_multipliers": {"vision": 0.1}, "use_rois": True},
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(path, n=40, seed=0)
    return path


def make_trainer(data_dir, output_dir, max_steps=6, schedule=TWO_STAGES, **training_args):
    run = {
        "model": {"preset": "tiny", "overrides": {"roi_gate_init": 0.1, "region_pool_gate_init": 0.1}},
        "data": {"path": str(data_dir), "split": "train"},
        "schedule": schedule,
        "training_args": {**DEFAULT_TRAINING_ARGS, "output_dir": str(output_dir), "max_steps": max_steps,
                          "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 100,
                          "warmup_steps": 0, "lr_scheduler_type": "constant", "seed": 0, "disable_tqdm": True,
                          **training_args},
    }
    trainer, _ = build_trainer(run)
    return trainer


def poison_losses(monkeypatch, trainer, poisoned) -> dict[str, int]:
    """Make the loss of the compute_loss calls numbered (from 1) where `poisoned(n)` holds NaN; returns the counter."""
    original = type(trainer).compute_loss
    calls = {"count": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        calls["count"] += 1
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if poisoned(calls["count"]) else loss

    monkeypatch.setattr(type(trainer), "compute_loss", compute_loss)
    return calls


def roi_state(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if name.startswith("roi_processor.")}


def test_frozen_groups_do_not_move_and_keep_no_adam_state(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, max_steps=3)  # the whole run is the "global" stage
    before = roi_state(trainer)
    vision_before = trainer.model.vision_model.embeddings.class_embedding.detach().clone()
    trainer.train()
    for name, value in roi_state(trainer).items():
        assert torch.equal(value, before[name]), name
    roi_params = {id(p) for n, p in trainer.model.named_parameters() if n.startswith("roi_processor.")}
    assert not any(id(p) in roi_params for p in trainer.optimizer.state)  # Adam never saw them
    assert not torch.equal(trainer.model.vision_model.embeddings.class_embedding, vision_before)


def test_stage_change_unfreezes_and_scales_learning_rates(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, max_steps=6)
    before = roi_state(trainer)
    trainer.train()
    moved = [name for name, value in roi_state(trainer).items() if not torch.equal(value, before[name])]
    assert moved, "the ROI processor must train once its stage starts"
    rates = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    base = trainer.args.learning_rate
    assert rates["vision"] == pytest.approx(0.1 * base) and rates["roi"] == pytest.approx(base)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stage"] for entry in logged] == ["global"] * 3 + ["regions"] * 3
    assert "loss_region" in logged[-1] and "loss_region" not in logged[0]
    # the collapse monitor logs the box-free image side and the text side in every stage
    assert all("box_free_image_mean_cosine" in entry and "text_mean_cosine" in entry for entry in logged)


def test_nonfinite_losses_are_skipped_then_stop_the_run(data_dir, tmp_path, monkeypatch):
    trainer = make_trainer(data_dir, tmp_path, max_steps=6)
    trainer.max_consecutive_nonfinite = 3
    poison_losses(monkeypatch, trainer, lambda call: call in (2, 4, 5, 6))
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        trainer.train()
    assert trainer.nonfinite_steps == 4
    checkpoint = latest_intact_checkpoint(tmp_path)
    assert checkpoint is not None and (checkpoint / CHECKPOINT_COMPLETE).exists()
    # steps 1 and 3 trained, the poisoned ones did not touch the weights
    assert any(not torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())
    assert all(math.isfinite(p.detach().abs().sum().item()) for p in trainer.model.parameters())


def test_a_nonfinite_micro_batch_skips_its_whole_accumulation_window(data_dir, tmp_path, monkeypatch):
    trainer = make_trainer(data_dir, tmp_path, max_steps=1, gradient_accumulation_steps=2)
    calls = poison_losses(monkeypatch, trainer, lambda call: call == 1)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert calls["count"] == 2 and trainer.nonfinite_steps == 1  # one optimizer step skipped, counted once
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, weights[name]), name  # the finite second half did not step alone


def test_the_nonfinite_stop_does_not_rewrite_a_complete_checkpoint(data_dir, tmp_path, monkeypatch):
    trainer = make_trainer(data_dir, tmp_path, max_steps=6, save_steps=2)
    trainer.max_consecutive_nonfinite = 3
    poison_losses(monkeypatch, trainer, lambda call: call >= 3)
    original_save, saves = type(trainer)._save_checkpoint, []

    def recorded_save(self, model, trial):
        saves.append(self.state.global_step)
        original_save(self, model, trial)

    monkeypatch.setattr(type(trainer), "_save_checkpoint", recorded_save)
    with pytest.raises(NonFiniteLossError, match="checkpoint-4"):
        trainer.train()
    # steps 3-5 were skipped, the stop came at step 4 whose checkpoint was already complete
    assert saves == [2, 4] and (tmp_path / "checkpoint-4" / CHECKPOINT_COMPLETE).exists()


def test_the_nonfinite_stop_saves_over_an_earlier_runs_checkpoint(data_dir, tmp_path, monkeypatch):
    stale = tmp_path / "checkpoint-2"  # left by an earlier run in the same output folder
    stale.mkdir()
    (stale / CHECKPOINT_COMPLETE).write_text("{}")
    trainer = make_trainer(data_dir, tmp_path, max_steps=6)
    trainer.max_consecutive_nonfinite = 3
    poison_losses(monkeypatch, trainer, lambda call: True)
    with pytest.raises(NonFiniteLossError, match="checkpoint-2"):
        trainer.train()
    assert (stale / "model.safetensors").exists() and (stale / CHECKPOINT_COMPLETE).read_text() != "{}"


def test_temperature_and_gates_get_no_weight_decay(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, weight_decay=0.2)
    optimizer = trainer.create_optimizer()
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    named = dict(trainer.model.named_parameters())
    for name in ("logit_scale", "roi_processor.pool_gate", "roi_processor.fusion_layers.0.attn_gate",
                 "vision_model.embeddings.class_embedding"):
        assert id(named[name]) not in decayed, name
    assert id(named["visual_projection.weight"]) in decayed


def test_the_temperature_is_clamped_in_place_after_each_step(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, max_steps=1)
    with torch.no_grad():
        trainer.model.logit_scale.fill_(math.log(100.0) + 0.5)
    trainer.train()
    assert trainer.model.logit_scale.item() <= math.log(100.0) + 1e-6


def test_a_scheduler_behind_the_global_step_is_put_back_on_it(data_dir, tmp_path):
    # fp16's GradScaler can skip optimizer steps, and transformers then skips the scheduler step
    trainer = make_trainer(data_dir, tmp_path, max_steps=6)
    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    trainer.state.global_step = 4  # the scheduler is still at step 0; the run is in the "regions" stage
    trainer._sync_lr_schedule()
    rates = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    base = trainer.args.learning_rate
    assert rates["roi"] == pytest.approx(base) and rates["vision"] == pytest.approx(0.1 * base)
    assert trainer.lr_scheduler.last_epoch == 4


def test_checkpoints_carry_the_marker_and_rotate_after_it(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path, max_steps=6, save_steps=2, save_total_limit=2)
    trainer.train()
    folders = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert folders == ["checkpoint-4", "checkpoint-6"]
    assert all(verify_checkpoint(tmp_path / name) == [] for name in folders)  # marker present, files as recorded


def test_pretrained_towers_bring_their_tokenizer_and_normalisation(data_dir, tmp_path):
    import json

    from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel

    vit_dir, bert_dir = tmp_path / "vit", tmp_path / "bert"
    ViTModel(ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)).save_pretrained(vit_dir)
    (vit_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "nodule", "left", "right", "upper", "lower", "zone"]
    BertTokenizer(vocab={word: index for index, word in enumerate(words)}).save_pretrained(bert_dir)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(bert_dir)
    run = {
        "model": {"vision_path": str(vit_dir), "text_path": str(bert_dir),
                  "overrides": {"roi_image_size": 32, "roi_fusion_heads": 4, "projection_dim": 16}},
        "data": {"path": str(data_dir), "split": "train"},
        "schedule": TWO_STAGES,
        "training_args": {**DEFAULT_TRAINING_ARGS, "output_dir": str(tmp_path / "out"), "max_steps": 2,
                          "per_device_train_batch_size": 4, "disable_tqdm": True},
    }
    trainer, _ = build_trainer(run)
    assert len(trainer.processing_class.tokenizer) == len(words)  # BERT's vocabulary, not a new one
    assert trainer.processing_class.image_processor.image_mean == [0.5] * 3
    trainer.train()
