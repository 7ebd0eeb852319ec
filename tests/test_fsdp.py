"""FSDP (FULL_SHARD, use_orig_params) as the shipped accelerate config sets it up, on CPU with gloo.

accelerate's FSDP needs an accelerator device, so this wraps the model with torch's FSDP directly,
with the config's wrap classes: the model must wrap (FSDP refuses 0-d parameters), train with
every loss term, keep a frozen schedule group still, read the sharded temperature on every rank,
and gather a full state dict like the bare one.
"""

import functools
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from regionmed_clip.training_scripts.losses import training_loss
from regionmed_clip.training_scripts.schedule import parameter_group_of
from regionmed_clip.training_scripts.trainer import mean_over_ranks

from conftest import free_port, make_inputs, tiny_model

WORLD = 2
CONFIG = Path(__file__).resolve().parents[1] / "training_scripts" / "configs" / "accelerate_fsdp.yaml"


def _worker(rank: int, port: int, queue) -> None:
    from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    import regionmed_clip.modeling_regionmed_clip.modeling_regionmed_clip as modeling

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fsdp = yaml.safe_load(CONFIG.read_text())["fsdp_config"]
        layer_classes = {getattr(modeling, name) for name in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")}
        model = tiny_model(seed=0, roi_gate_init=0.1, region_pool_gate_init=0.1).train()
        bare_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}  # weights + buffers
        roi_parameters = [p for name, p in model.named_parameters() if parameter_group_of(name) == "roi"]
        roi_before = [p.detach().clone() for p in roi_parameters]
        wrapped = FSDP(
            model,
            auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes),
            sharding_strategy=ShardingStrategy[fsdp["fsdp_sharding_strategy"]],
            use_orig_params=fsdp["fsdp_use_orig_params"],
            device_id=torch.device("cpu"),
        )
        groups = {parameter_group_of(name) for name, _ in wrapped.named_parameters()}
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
        config = model.config
        inputs = make_inputs(config, [2, 1], seed=rank)
        texts = make_inputs(config, [1, 1], seed=10 + rank)
        inputs.update(
            region_input_ids=texts["input_ids"][:, None].expand(-1, 2, -1).clone(),
            region_attention_mask=texts["attention_mask"][:, None].expand(-1, 2, -1).clone(),
            summary_input_ids=texts["input_ids"], summary_attention_mask=texts["attention_mask"],
        )
        weights = {"global_report": 1.0, "global_summary": 0.5, "region": 0.5}
        losses = []
        for _ in range(2):
            outputs = wrapped(**inputs)
            loss, _ = training_loss(outputs, inputs, outputs.logit_scale, config.text_config.pad_token_id, weights)
            loss.backward()
            for parameter in roi_parameters:  # a frozen group, dropped as the trainer does after backward
                parameter.grad = None
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        # one rank's shard view of the (1,) temperature is empty: the trainer's log reads it on every rank
        temperature = (model.logit_scale.numel(), mean_over_ranks(model.logit_scale).item())
        with FSDP.summon_full_params(wrapped):
            roi_still = all(torch.equal(p, before) for p, before in zip(roi_parameters, roi_before, strict=True))
            temperature += (model.logit_scale.item(),)
        policy = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)  # already on CPU
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, policy):
            state = wrapped.state_dict()
        shapes = {name: tuple(value.shape) for name, value in state.items()}
        queue.put((rank, losses, roi_still, sorted(groups), temperature, shapes, bare_shapes))
    except Exception:  # report it, so the test fails now rather than at the queue's timeout
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_model_trains_under_fsdp_full_shard_with_the_shipped_wrap_classes():
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_worker, args=(rank, port, queue)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    first = queue.get(timeout=300)
    assert len(first) > 2, f"rank {first[0]} failed:\n{first[1]}"
    second = queue.get(timeout=300)
    assert len(second) > 2, f"rank {second[0]} failed:\n{second[1]}"
    results = {result[0]: result[1:] for result in (first, second)}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for rank, (losses, roi_still, groups, (_, read, full), _, _) in results.items():
        assert all(torch.isfinite(torch.tensor(losses))), (rank, losses)
        assert losses[1] != losses[0], "the weights did not change between the steps"
        assert roi_still, f"rank {rank}: the frozen ROI processor moved under FSDP"
        assert groups == ["projections", "roi", "temperature", "text", "vision"]
        assert read == pytest.approx(full, abs=1e-6), rank
    assert sorted(result[3][0] for result in results.values()) == [0, 1]  # the shard split the test is about
    _, _, _, _, shapes, bare_shapes = results[0]
    assert shapes == bare_shapes  # a full state dict with the bare names and shapes: a plain Hub folder
