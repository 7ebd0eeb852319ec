"""Host syncs of a training step, counted on the CPU as a GPU would make them (`HostSyncCounter`):
a ratchet at today's count, so that a new wait fails the test and a removed one asks for the ratchet
to be lowered."""

import copy

import pytest
import torch
from host_sync_counter import HostSyncCounter

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel
from regionmed_clip.training_scripts.losses import training_loss
from regionmed_clip.training_scripts.synthetic_batch import synthetic_batch

# Forward, `training_loss` (every term) and backward of the tiny preset, 8 images with 4 ROIs and every
# caption level. It was 124 before the losses stopped indexing by masks (and reading `any()` per
# InfoNCE) and the model read each mask once. The 14 of today (measured): 6 transformers' mask checks
# (`create_bidirectional_mask`, one per text-tower pass), 4 `valid_rows` (one `nonzero` each for the
# valid ROI crops, region captions, negatives and region negatives), 1 `trim_padding`, 1 plan of the
# caption-length passes (`_encode_by_length`), 1 check of the ROI boxes, and 1 in the losses
# (`roi_mask.nonzero`, read once for every region term).
HOST_SYNCS = 14


def test_the_counter_sees_reads_of_device_tensors_only():
    device, host = torch.ones(3), torch.ones(3)
    with HostSyncCounter([device]) as counter:
        (device * 2).sum().item()  # a read
        device[device > 0]  # a data-dependent size
        (device + 1).tolist()  # a read that is not dispatched
        host.sum().item()  # made on the host: free
        device[torch.tensor([0, 2])]  # an index of known size: no wait
    assert counter.total == 3


def test_a_training_step_waits_on_the_device_exactly_as_often_as_today():
    torch.manual_seed(0)
    model = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset("tiny"))
    batch = synthetic_batch(model.config, 8, 4, all_levels=True)
    with HostSyncCounter([*model.parameters(), *batch.values()]) as counter:
        outputs = model(**batch)
        loss, _ = training_loss(outputs, batch, outputs.logit_scale, model.config.text_config.pad_token_id)
        loss.backward()
    where = ", ".join(f"{line} x{count}" for line, count in counter.syncs.most_common())
    assert counter.total <= HOST_SYNCS, (
        f"a training step now waits on the device {counter.total} times, more than the {HOST_SYNCS} of "
        f"HOST_SYNCS (tests/test_host_syncs.py): remove the new read ({where})")
    assert counter.total == HOST_SYNCS, (
        f"a training step now waits on the device {counter.total} times, fewer than HOST_SYNCS = {HOST_SYNCS}: "
        f"lower HOST_SYNCS in tests/test_host_syncs.py to {counter.total} (and say in its comment what went) "
        f"so that the ratchet holds the gain ({where})")


def test_the_trainers_loss_adds_no_wait_to_the_step(tmp_path):
    """`RegionMedCLIPTrainer.compute_loss` keeps the logged loss terms and cosines on the device (read on
    logging steps only): its step waits exactly as often as the bare one above."""
    from transformers import TrainingArguments

    from regionmed_clip.training_scripts.schedule import StagedSchedule
    from regionmed_clip.training_scripts.trainer import RegionMedCLIPTrainer

    torch.manual_seed(0)
    model = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset("tiny"))
    batch = synthetic_batch(model.config, 8, 4, all_levels=True)
    trainer = RegionMedCLIPTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                                                       use_cpu=True, max_steps=1),
                                   schedule=StagedSchedule("joint", max_steps=1))
    twin = copy.deepcopy(model)  # a training forward moves the box-free centre (a running mean): keep its state
    torch.manual_seed(1)  # the same ROI box dropout in both passes
    with HostSyncCounter([*model.parameters(), *batch.values()]) as counter:
        trainer.compute_loss(model, dict(batch)).backward()
    assert counter.total == HOST_SYNCS, (
        f"the trainer's loss step waits on the device {counter.total} times, the bare step {HOST_SYNCS}: "
        f"{counter.syncs.most_common()}")
    # the terms were kept, not dropped: the next training log reads them, the step's own values
    torch.manual_seed(1)
    with torch.no_grad():
        outputs = twin(**batch)
        _, terms = training_loss(outputs, batch, outputs.logit_scale, model.config.text_config.pad_token_id)
    trainer.log({"loss": 0.0})
    logged = trainer.state.log_history[-1]
    assert {f"loss_{name}": logged[f"loss_{name}"] for name in terms} == pytest.approx(
        {f"loss_{name}": value.item() for name, value in terms.items()}, abs=1e-5)
