"""Stage-aware data: a batch holds what the stages it can be used in need, no more, and never less.

The collator reads the trainer's global step from shared memory, so its copies in DataLoader workers
follow it; batches are built ahead of the step that uses them, within `prefetch_lookahead_steps`.
"""

import pytest
import torch

from regionmed_clip.data.schema import load_canonical
from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.training_scripts.collator import RegionMedCLIPCollator, prefetch_lookahead_steps
from regionmed_clip.training_scripts.schedule import PROGRESSIVE_STAGES, StagedSchedule
from regionmed_clip.training_scripts.train import DEFAULT_TRAINING_ARGS, build_trainer
from regionmed_clip.training_scripts.trainer import stage_input_names

from conftest import collator_processor

GLOBAL_ONLY = {"loss_weights": {"global_report": 1.0}, "use_rois": False}
FULL = {"loss_weights": {"global_report": 1.0, "global_summary": 0.5, "region": 0.5, "hard_negative": 0.5,
                         "region_hard_negative": 0.5}, "use_rois": True}
ROI_ROWS = {"roi_pixel_values", "roi_boxes", "roi_mask", "region_input_ids"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(path, n=40, seed=0)
    return path


@pytest.fixture(scope="module")
def rows(data_dir):
    return list(load_canonical(data_dir, "train", decode_images=False))


@pytest.fixture(scope="module")
def processor(rows):
    return collator_processor(rows)


def model_inputs(batch) -> set[str]:
    return set(batch) - {"skip_report"}


def test_each_paper_stage_gets_exactly_its_inputs(processor, rows):
    schedule = StagedSchedule(PROGRESSIVE_STAGES, max_steps=100)  # warmup 0-9, refine 10-19, roi 20-59, joint
    collator = RegionMedCLIPCollator(processor, schedule=schedule, lookahead_steps=0)
    for step in (0, 15, 30, 80):
        collator.set_step(step)
        assert model_inputs(collator(rows[:6])) == set(stage_input_names(schedule.stage_at(step))), step
    # without a schedule every part is built, as before
    assert model_inputs(RegionMedCLIPCollator(processor)(rows[:6])) == set(stage_input_names(schedule.stage_at(30)))


def test_a_batch_built_within_the_lookahead_of_a_switch_holds_the_next_stages_inputs(processor, rows):
    schedule = StagedSchedule(PROGRESSIVE_STAGES, max_steps=100)
    collator = RegionMedCLIPCollator(processor, schedule=schedule, lookahead_steps=3)
    collator.set_step(16)  # refine, and the roi stage starts at 20: out of reach
    assert not ROI_ROWS & model_inputs(collator(rows[:4]))
    collator.set_step(17)  # 17 + 3 reaches step 20
    assert ROI_ROWS <= model_inputs(collator(rows[:4]))


def test_a_row_is_checked_only_for_what_its_batch_uses(processor, rows):
    schedule = StagedSchedule([{"name": "global", "steps": 5, **GLOBAL_ONLY}, {"name": "full", "steps": 5, **FULL}], 10)
    broken = {**rows[0], "negative_captions": None, "regions": "not a list"}
    collator = RegionMedCLIPCollator(processor, schedule=schedule, lookahead_steps=0)
    assert collator([broken, rows[1]])["pixel_values"].shape[0] == 2
    collator.set_step(5)
    batch = collator([broken, rows[1]])
    assert batch["pixel_values"].shape[0] == 1
    assert batch["skip_report"]["reasons"] == {"row: negative_captions is missing or null, not a list": 1}


def test_the_stand_in_for_an_unusable_batch_serves_every_stage(processor, rows):
    schedule = StagedSchedule([{"name": "global", "steps": 5, **GLOBAL_ONLY}, {"name": "full", "steps": 5, **FULL}], 10)
    collator = RegionMedCLIPCollator(processor, schedule=schedule, lookahead_steps=0)
    collator.prime(rows)
    collator(rows[3:5])  # a global-only batch: its rows lack the regions, so they cannot stand in later
    collator.set_step(5)
    corrupt = {**rows[0], "image": {"bytes": b"garbage", "path": None}}
    assert set(stage_input_names(schedule.stage_at(5))) <= model_inputs(collator([corrupt]))


def alternating_schedule(length: int) -> list[dict]:
    return [{"name": name, "steps": length, **spec}
            for name, spec in (("global_a", GLOBAL_ONLY), ("full_a", FULL), ("global_b", GLOBAL_ONLY), ("full_b", FULL))]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_worker_batches_hold_what_the_step_that_uses_them_needs(processor, rows, num_workers):
    schedule = StagedSchedule(alternating_schedule(2), max_steps=20)

    def first_short_batch(lookahead: int) -> int | None:
        collator = RegionMedCLIPCollator(processor, schedule=schedule, lookahead_steps=lookahead)
        loader = torch.utils.data.DataLoader(rows[:36], batch_size=2, collate_fn=collator, num_workers=num_workers,
                                             prefetch_factor=2 if num_workers else None)
        for step, batch in enumerate(loader):  # as the Trainer: the step begins once its batch is fetched
            collator.set_step(step)
            if not set(stage_input_names(schedule.stage_at(step))) <= model_inputs(batch):
                return step
        return None

    assert first_short_batch(prefetch_lookahead_steps(num_workers, 2)) is None
    if num_workers:  # the control: workers build ahead, so without the look-ahead a switch comes too late
        assert first_short_batch(0) is not None


def run_trainer(data_dir, output_dir, max_steps, resume=None, **training_args):
    run = {
        "model": {"preset": "tiny"},
        "data": {"path": str(data_dir), "split": "train"},
        "schedule": alternating_schedule(4),
        "training_args": {**DEFAULT_TRAINING_ARGS, "output_dir": str(output_dir), "max_steps": max_steps,
                          "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 4,
                          "warmup_steps": 0, "seed": 0, "disable_tqdm": True, **training_args},
    }
    trainer, _ = build_trainer(run)
    seen: list[tuple[int, set[str]]] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        seen.append((trainer.state.global_step, set(inputs)))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train(resume_from_checkpoint=resume)
    return seen


@pytest.mark.slow
def test_training_across_stage_switches_with_workers_and_a_resume(data_dir, tmp_path):
    # 32 train rows in batches of 4: 8 steps an epoch, so the run also crosses an epoch (new workers)
    out = tmp_path / "run"
    seen = run_trainer(data_dir, out, max_steps=12, dataloader_num_workers=2)
    assert [step for step, _ in seen] == list(range(12))  # every stage switch found its inputs
    # resumed at step 4, the first step of a stage with ROIs: its first batches are built for it
    resumed = run_trainer(data_dir, out, max_steps=12, resume=str(out / "checkpoint-4"), dataloader_num_workers=2)
    assert resumed[0][0] == 4 and ROI_ROWS <= resumed[0][1]


@pytest.mark.slow
def test_a_global_only_stage_builds_no_crops_in_the_main_process(data_dir, tmp_path):
    seen = run_trainer(data_dir, tmp_path / "run", max_steps=8)
    # steps 0-3 train global-only, 4-7 with ROIs: a step's batch is built two steps ahead at most (the
    # Trainer fetches it before the step begins, accelerate one more), so the look-ahead wastes none
    assert [step for step, inputs in seen if ROI_ROWS <= inputs] == [4, 5, 6, 7]
