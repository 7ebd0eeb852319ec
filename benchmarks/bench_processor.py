"""Processor throughput: one grayscale image WITH 4 ROIs through RegionMedCLIPImageProcessor vs the
same image ALONE through transformers' CLIPImageProcessorPil, as a time ratio measured in one run.

Target (issue 3): ratio <= 1.5 at 1024x1024 and 2048x2048.

    python benchmarks/bench_processor.py --output benchmarks/results/bench_processor.json
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import write_report  # noqa: E402

from regionmed_clip.processing import RegionMedCLIPImageProcessor  # noqa: E402

TARGET_RATIO = 1.5


def chest_like(size: int, seed: int) -> Image.Image:
    """A smooth grayscale film with texture, so resampling does real work."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    film = 120 + 80 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 12, (size, size))
    return Image.fromarray(np.clip(film, 0, 255).astype(np.uint8), mode="L")


def four_boxes(size: int) -> list[list[float]]:
    side = size * 0.12
    return [[x * size, y * size, x * size + side, y * size + side] for x, y in ((0.2, 0.2), (0.6, 0.25), (0.3, 0.6), (0.65, 0.7))]


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    ours = RegionMedCLIPImageProcessor(image_size=224, roi_size=112, max_rois=8)
    clip = CLIPImageProcessorPil()  # resize shortest edge 224, centre crop 224, rescale, normalise
    results = []
    for size in args.sizes:
        image = chest_like(size, seed=size)
        regions = [four_boxes(size)]
        run_ours = functools.partial(ours, image, regions=regions, return_tensors="np")
        run_clip = functools.partial(clip, image, return_tensors="np")
        run_ours(), run_clip()  # warm-up
        # Interleave the two so drift in machine load hits both alike; keep the minimum,
        # the least disturbed measurement on a shared machine.
        ours_times, clip_times = [], []
        for _ in range(args.repeats):
            ours_times.append(timed(run_ours))
            clip_times.append(timed(run_clip))
        ours_s, clip_s = min(ours_times), min(clip_times)
        row = {
            "size": size,
            "ours_with_4_rois_s": round(ours_s, 5),
            "clip_image_alone_s": round(clip_s, 5),
            "ours_images_per_s": round(1 / ours_s, 2),
            "clip_images_per_s": round(1 / clip_s, 2),
            "ratio": round(ours_s / clip_s, 3),
            "meets_target": ours_s / clip_s <= TARGET_RATIO,
        }
        results.append(row)
        print(json.dumps(row))

    write_report({"target_ratio": TARGET_RATIO, "results": results}, args.output)


if __name__ == "__main__":
    main()
