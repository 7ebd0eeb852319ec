"""Host syncs of a training step, counted on the CPU as a GPU would make them (`HostSyncCounter`):
a test that fails if they grow."""

import sys
from pathlib import Path

import torch
from host_sync_counter import HostSyncCounter

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel
from regionmed_clip.training_scripts.losses import training_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from training_step import synthetic_batch  # noqa: E402

# Forward, `training_loss` (every term) and backward of the tiny preset, 8 images with 4 ROIs and every
# caption level. It was 124 before the losses stopped indexing by masks (and reading `any()` per
# InfoNCE) and the model read each mask once: 6 of the 17 left are transformers' mask checks.
MAX_HOST_SYNCS = 17


def test_the_counter_sees_reads_of_device_tensors_only():
    device, host = torch.ones(3), torch.ones(3)
    with HostSyncCounter([device]) as counter:
        (device * 2).sum().item()  # a read
        device[device > 0]  # a data-dependent size
        (device + 1).tolist()  # a read that is not dispatched
        host.sum().item()  # made on the host: free
        device[torch.tensor([0, 2])]  # an index of known size: no wait
    assert counter.total == 3


def test_a_training_step_waits_on_the_device_no_more_than_before():
    torch.manual_seed(0)
    model = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset("tiny"))
    batch = synthetic_batch(model.config, 8, 4, all_levels=True)
    with HostSyncCounter([*model.parameters(), *batch.values()]) as counter:
        outputs = model(**batch)
        loss, _ = training_loss(outputs, batch, outputs.logit_scale, model.config.text_config.pad_token_id)
        loss.backward()
    assert counter.total <= MAX_HOST_SYNCS, counter.syncs.most_common()
