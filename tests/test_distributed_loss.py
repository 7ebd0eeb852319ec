"""Two gloo processes on CPU: gathered losses and gradients equal one process on the union batch,
with a bounded number of collectives."""

import collections
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regionmed_clip.training_scripts.losses import (
    ContrastiveLossConfig,
    global_contrastive_loss,
    hard_negative_loss,
    image_region_loss,
    region_contrastive_loss,
)

from conftest import free_port

WORLD = 2
ROWS_PER_RANK = 3
# Collectives of `losses` forward and backward (4 terms), per rank, by `local_loss`. Before the sizes
# were read once per loss (`rank_sizes`) they were 28 and 20; a change that adds some fails here.
MAX_COLLECTIVES = {False: 17, True: 14}


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


def count_collectives() -> collections.Counter:
    """Count, from now on in this process, the calls of every collective the losses may use."""
    calls: collections.Counter = collections.Counter()
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter", "reduce_scatter_tensor",
                 "broadcast", "all_to_all_single"):
        original = getattr(dist, name)

        def counted(*args, name=name, original=original, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        setattr(dist, name, counted)  # torch.distributed.nn.functional looks them up here too
    return calls


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
        collectives = count_collectives()
        # The ROI counts are ragged across ranks (the local loss must still weight every anchor alike).
        loss = losses(batch, ContrastiveLossConfig(local_loss=local_loss))
        loss.backward()
        # NumPy arrays travel by value: torch tensors would be shared through file descriptors
        # that vanish when this process exits before the parent has read them.
        grads = {key: batch[key].grad.numpy() for key in ("image", "text", "regions", "region_text", "negatives")
                 if batch[key].grad is not None}
        queue.put((rank, loss.item(), grads, sum(collectives.values())))
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
    received = [queue.get(timeout=120) for _ in range(WORLD)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    results = {rank: (loss, grads) for rank, loss, grads, _ in received}
    collectives = {count for *_, count in received}
    assert len(collectives) == 1 and collectives.pop() <= MAX_COLLECTIVES[local_loss]

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
