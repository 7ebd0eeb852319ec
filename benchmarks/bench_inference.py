"""Inference throughput: embeddings per second of RegionMed-CLIP, in eval mode without gradients, per
preset: box-free image embeddings (the global view with its proposal windows), image embeddings with
4 ROIs pooled in, report-caption text embeddings, and CLIPModel's image and text embeddings with
identical towers for scale. Medians of interleaved repeats, in one run.

    python benchmarks/bench_inference.py --threads 2 --output benchmarks/results/bench_inference.json
"""

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import clip_twin  # noqa: E402
from benchmark_report import cpu_model, write_report  # noqa: E402
from training_step import synthetic_batch, timed_steps  # noqa: E402

from modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel  # noqa: E402


def encoders(size: str, batch: int) -> dict[str, Callable[[], Any]]:
    """Name -> a call that embeds `batch` images or captions."""
    torch.manual_seed(0)
    model = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset(size)).eval()
    clip = clip_twin(model.config).eval()
    inputs = synthetic_batch(model.config, batch, 4, all_levels=False)
    rois = {key: inputs[key] for key in ("roi_pixel_values", "roi_boxes", "roi_mask")}
    return {
        "image_box_free": lambda: model.get_image_features(inputs["pixel_values"]),
        "image_with_4_rois": lambda: model.get_image_features(inputs["pixel_values"], **rois),
        "text_report": lambda: model.get_text_features(inputs["input_ids"], inputs["attention_mask"]),
        "clip_image": lambda: clip.get_image_features(pixel_values=inputs["pixel_values"]),
        "clip_text": lambda: clip.get_text_features(input_ids=inputs["input_ids"],
                                                    attention_mask=inputs["attention_mask"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for size in args.sizes:
        calls = encoders(size, args.batch)
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, call in calls.items():
                    times[name] += timed_steps(call, steps=args.steps, warmup=1, synchronize=lambda: None)
        results[size] = {name: {"seconds_per_batch": round(statistics.median(values), 4),
                                "embeddings_per_second": round(args.batch / statistics.median(values), 1)}
                         for name, values in times.items()}
        print(size, results[size], flush=True)
    write_report({"cpu": cpu_model(), "threads": torch.get_num_threads(), "batch": args.batch, "results": results},
                 args.output)


if __name__ == "__main__":
    main()
