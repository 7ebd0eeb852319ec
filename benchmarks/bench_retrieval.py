"""Retrieval at scale: wall time and peak extra memory of the chunked `retrieval_metrics` at 10k and 100k
images, against the full-similarity-matrix path at 10k.

Data: random unit image embeddings (D=512, the default projection size; `--dim 64` for the tiny preset's),
`--texts-per-image` texts per image, each the normalised sum of its image and Gaussian noise of norm
about `--noise` (so recalls are neither 0 nor 100), texts in shuffled order.

Memory method: each (size, path) runs in a fresh subprocess. It creates the embeddings in place, 8,192
rows at a time (no temporary larger than a block), warms the code up on a tiny input (one-time library
buffers are not the call's), returns freed heap pages to the kernel (glibc `malloc_trim(0)`: else the call
could reuse pages already counted in VmRSS and look smaller), resets the kernel's peak-RSS mark
(`echo 5 > /proc/self/clear_refs`; where the kernel refuses, `hwm_reset` is false and the in-place creation
keeps the mark close to the RSS anyway), reads VmRSS, runs the call, reads VmHWM. peak_extra_bytes = VmHWM
after the call minus VmRSS before it: the call's own peak, embeddings excluded (/proc/self/status, Linux).

The full-matrix path is the rule written out densely (as `retrieval_recall_at_k` did before it was
chunked): `images @ texts.T`, a dense `(N_i, N_t)` positives mask and `best_positive_ranks` both ways;
its recalls must equal the chunked ones.

    OMP_NUM_THREADS=1 python benchmarks/bench_retrieval.py --sizes 10000 100000 --threads 1 \\
        --output benchmarks/results/bench_retrieval.json
"""

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import cpu_model, proc_status_bytes, release_free_heap, reset_peak_rss, write_report  # noqa: E402

from regionmed_clip.evaluation.retrieval import (  # noqa: E402
    DEFAULT_MEMORY_BUDGET_BYTES,
    best_positive_ranks,
    rank_summary,
    retrieval_metrics,
)

KS = (1, 5, 10)
BLOCK_ROWS = 8192
TARGET_SIZE, TARGET_EXTRA_BYTES = 100_000, 2 * 2**30  # 100k x 100k with < 2 GiB extra memory


def make_embeddings(n_images: int, dim: int, texts_per_image: int, noise: float, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit images `(N, D)`, unit noisy texts `(N * texts_per_image, D)` in shuffled order, their image indices."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.empty(n_images, dim)
    for first in range(0, n_images, BLOCK_ROWS):
        block = torch.randn(min(BLOCK_ROWS, n_images - first), dim, generator=generator)
        images[first:first + len(block)] = torch.nn.functional.normalize(block, dim=1)
    n_texts = n_images * texts_per_image
    text_to_image = torch.arange(n_images).repeat_interleave(texts_per_image)[torch.randperm(n_texts, generator=generator)]
    texts = torch.empty(n_texts, dim)
    for first in range(0, n_texts, BLOCK_ROWS):
        owners = text_to_image[first:first + BLOCK_ROWS]
        block = images[owners] + noise / dim**0.5 * torch.randn(len(owners), dim, generator=generator)
        texts[first:first + len(owners)] = torch.nn.functional.normalize(block, dim=1)
    return images, texts, text_to_image


def full_matrix_metrics(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor,
                        ks: tuple[int, ...] = KS) -> dict[str, Any]:
    """The dense reference: the whole similarity matrix and positives mask, `best_positive_ranks` both ways."""
    similarity = images @ texts.T
    positives = text_to_image[None, :] == torch.arange(len(images))[:, None]
    has_text = positives.any(1)
    return {"image_to_text": rank_summary(best_positive_ranks(similarity[has_text], positives[has_text]), ks),
            "text_to_image": rank_summary(best_positive_ranks(similarity.T, positives.T), ks),
            "n_images": len(images), "n_texts": len(texts), "n_images_with_text": int(has_text.sum())}


def worker(path: str, n_images: int, dim: int, texts_per_image: int, noise: float, seed: int, threads: int,
           budget: int) -> dict[str, Any]:
    """One measurement in this (fresh) process: see the module docstring for the memory method."""
    torch.set_num_threads(threads)

    def call(images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, Any]:
        if path == "chunked":
            return retrieval_metrics(images, texts, text_to_image, ks=KS, memory_budget_bytes=budget)
        return full_matrix_metrics(images, texts, text_to_image)

    call(*make_embeddings(64, dim, texts_per_image, noise, seed + 1))  # warm-up: one-time library buffers
    images, texts, text_to_image = make_embeddings(n_images, dim, texts_per_image, noise, seed)
    gc.collect()
    release_free_heap()
    hwm_reset = reset_peak_rss()
    rss_before, hwm_before = proc_status_bytes("VmRSS"), proc_status_bytes("VmHWM")
    start = time.perf_counter()
    metrics = call(images, texts, text_to_image)
    seconds = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM")
    return {
        "path": path,
        "n": n_images,
        "n_texts": len(texts),
        "d": dim,
        "seconds": round(seconds, 2),
        "peak_extra_bytes": peak - rss_before,
        "peak_extra_mib": round((peak - rss_before) / 2**20, 1),
        "rss_before_bytes": rss_before,
        "embeddings_bytes": images.nbytes + texts.nbytes,
        "hwm_reset": hwm_reset,
        "hwm_minus_rss_before_call_bytes": hwm_before - rss_before,
        "recalls": metrics,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="numbers of images")
    parser.add_argument("--dim", type=int, default=512, help="embedding size (512 default preset, 64 tiny)")
    parser.add_argument("--texts-per-image", type=int, default=1)
    parser.add_argument("--noise", type=float, default=5.0, help="norm of the noise added to each text's image")
    parser.add_argument("--full-matrix-max", type=int, default=10_000,
                        help="also run the full-matrix path for sizes up to this many images")
    parser.add_argument("--budget-mib", type=float, default=DEFAULT_MEMORY_BUDGET_BYTES / 2**20,
                        help="memory_budget_bytes of retrieval_metrics, in MiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 when another job shares the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: "path:n"
    args = parser.parse_args(argv)
    budget = int(args.budget_mib * 2**20)

    if args.worker is not None:
        path, n_images = args.worker.split(":")
        print(json.dumps(worker(path, int(n_images), args.dim, args.texts_per_image, args.noise, args.seed,
                                args.threads, budget)))
        return 0

    load_before = os.getloadavg()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    options = ["--dim", str(args.dim), "--texts-per-image", str(args.texts_per_image), "--noise", str(args.noise),
               "--budget-mib", str(args.budget_mib), "--threads", str(args.threads), "--seed", str(args.seed)]
    results = []
    for n_images in args.sizes:
        for path in ("chunked", "full_matrix") if n_images <= args.full_matrix_max else ("chunked",):
            # A fresh interpreter per measurement: VmHWM is a high-water mark of the whole process.
            command = [sys.executable, __file__, "--worker", f"{path}:{n_images}", *options]
            completed = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            results.append(result)
            print(json.dumps({key: value for key, value in result.items() if key != "recalls"}), flush=True)

    comparisons = {}
    for full in (r for r in results if r["path"] == "full_matrix"):
        chunked = next(r for r in results if r["path"] == "chunked" and r["n"] == full["n"])
        comparisons[str(full["n"])] = {
            "same_recalls": chunked["recalls"] == full["recalls"],
            "seconds_chunked_over_full": round(chunked["seconds"] / full["seconds"], 3),
            "peak_extra_full_over_chunked": round(full["peak_extra_bytes"] / chunked["peak_extra_bytes"], 2),
        }
    target = next((r for r in results if r["path"] == "chunked" and r["n"] == TARGET_SIZE), None)
    report = write_report({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": {"count": os.cpu_count(), "model": cpu_model()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "torch_threads": args.threads,
        "load_average_before": [round(load, 2) for load in load_before],
        "memory_method": "fresh subprocess per measurement; embeddings made in place in 8192-row blocks; "
                         "malloc_trim(0), then VmHWM reset via /proc/self/clear_refs after warm-up and embedding creation; "
                         "peak_extra_bytes = VmHWM after the call - VmRSS before it",
        "dim": args.dim,
        "texts_per_image": args.texts_per_image,
        "noise": args.noise,
        "memory_budget_bytes": budget,
        "results": results,
        "full_matrix_comparison": comparisons,
        "target": {"n": TARGET_SIZE, "peak_extra_bytes_below": TARGET_EXTRA_BYTES,
                   "met": None if target is None else target["peak_extra_bytes"] < TARGET_EXTRA_BYTES},
    }, args.output)
    print(json.dumps({"full_matrix_comparison": report["full_matrix_comparison"], "target": report["target"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
