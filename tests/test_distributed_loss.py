"""Two gloo processes on CPU: gathered losses and gradients equal one process on the union batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training_scripts.losses import (
    ContrastiveLossConfig,
    global_contrastive_loss,
    hard_negative_loss,
    image_region_loss,
    region_contrastive_loss,
)

from conftest import free_port

WORLD = 2
ROWS_PER_RANK = 3


def union_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = WORLD * ROWS_PER_RANK

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)

    return {
        "image": unit(batch, 8),
        "text": unit(batch, 8),
        "regions": unit(batch, 4, 8),
        "region_text": unit(batch, 4, 8),
        # ragged: rank 0 holds 5 valid ROIs, rank 1 holds 2
        "roi_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).bool(),
        "negatives": unit(batch, 2, 8),
        # rank 1's images have at most one negative: its processor pads to M=1, rank 0's to M=2
        "negative_mask": torch.tensor([[1, 1], [1, 0], [0, 0], [1, 0], [1, 0], [1, 0]]).bool(),
        "groups": torch.tensor([5, 6, 9, 7, 8, 9]),  # rows 2 and 5 share a caption, on different ranks
    }


def losses(batch: dict[str, torch.Tensor], config: ContrastiveLossConfig) -> torch.Tensor:
    scale = torch.tensor(10.0, dtype=torch.float64)
    total = global_contrastive_loss(batch["image"], batch["text"], scale, batch["groups"], config)
    total = total + hard_negative_loss(batch["image"], batch["text"], batch["negatives"], batch["negative_mask"], scale,
                                       batch["groups"], config)
    total = total + image_region_loss(batch["image"], batch["region_text"], batch["roi_mask"], scale, config=config)
    return total + region_contrastive_loss(batch["regions"], batch["region_text"], batch["roi_mask"], scale,
                                           config=config)


def _worker(rank: int, port: int, local_loss: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        batch = {key: value[rows].clone() for key, value in union_batch().items()}
        if rank == 1:
            batch["negatives"], batch["negative_mask"] = batch["negatives"][:, :1], batch["negative_mask"][:, :1]
        for key in ("image", "text", "regions", "region_text", "negatives"):
            batch[key].requires_grad_(True)
        # The ROI counts are ragged across ranks (the local loss must still weight every anchor alike).
        loss = losses(batch, ContrastiveLossConfig(local_loss=local_loss))
        loss.backward()
        # NumPy arrays travel by value: torch tensors would be shared through file descriptors
        # that vanish when this process exits before the parent has read them.
        grads = {key: batch[key].grad.numpy() for key in ("image", "text", "regions", "region_text", "negatives")
                 if batch[key].grad is not None}
        queue.put((rank, loss.item(), grads))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("local_loss", [False, True])
def test_two_processes_match_one_process_on_the_union_batch(local_loss):
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_worker, args=(rank, port, local_loss, queue)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    results = dict((rank, (loss, grads)) for rank, loss, grads in (queue.get(timeout=120) for _ in range(WORLD)))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    union = union_batch()
    for key in ("image", "text", "regions", "region_text", "negatives"):
        union[key].requires_grad_(True)
    expected = losses(union, ContrastiveLossConfig())
    expected.backward()
    ranks_mean = sum(loss for loss, _ in results.values()) / WORLD
    assert abs(ranks_mean - expected.item()) <= 1e-6
    for rank, (_, grads) in results.items():
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        for key, grad in grads.items():
            grad = torch.from_numpy(grad)
            # each rank's features get the sum over ranks: WORLD x the gradient of the mean loss
            expected_grad = union[key].grad[rows][:, : grad.shape[1]] if key == "negatives" else union[key].grad[rows]
            torch.testing.assert_close(grad / WORLD, expected_grad, rtol=0, atol=1e-6, msg=f"{key} rank {rank}")
