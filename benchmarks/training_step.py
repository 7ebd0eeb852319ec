"""One optimizer step of RegionMed-CLIP on a full-objective batch, shared by the training benchmarks
(bench_train.py, bench_gpu.py, bench_inference.py): the multi-level loss of `training_scripts.losses`,
the step's FLOPs counted by `torch.utils.flop_counter`, and the timing loop. The batch itself comes
from `regionmed_clip.training_scripts.synthetic_batch`.
"""

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPModel
from regionmed_clip.training_scripts.losses import training_loss

__all__ = ["step_flops", "timed_steps", "training_step"]


def training_step(model: RegionMedCLIPModel, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor],
                  autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Forward, the multi-level loss, backward and the optimizer step; returns the loss (not synced)."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        outputs = model(**inputs)
        loss, _ = training_loss(outputs, inputs, outputs.logit_scale, model.config.text_config.pad_token_id)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def step_flops(model: RegionMedCLIPModel, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward + backward (matrix products and attention, as torch's counter counts them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = model(**inputs)
        loss, _ = training_loss(outputs, inputs, outputs.logit_scale, model.config.text_config.pad_token_id)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def timed_steps(step: Callable[[], Any], steps: int, warmup: int, synchronize: Callable[[], None]) -> list[float]:
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return times
