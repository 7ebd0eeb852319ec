"""Converter throughput and memory on synthetic VinDr-CXR inputs of 5,000 and 20,000 CSV rows, in one run.

Each input has three reader rows per image (boxes of one class that overlap and are fused, or "No finding" with
empty coordinates), in shuffled order so the grouping has real work to do, and one 32x32 PNG per image. Each size
is converted in a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own: streaming means the 20,000-row
peak should match the 5,000-row one. The `tracemalloc` peak is taken in a second, traced conversion of the same
input (tracing slows Python down, so the throughput comes from the untraced one).

    python benchmarks/bench_converters.py --output benchmarks/results/bench_converters.json
"""

import argparse
import csv
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import write_report  # noqa: E402

from regionmed_clip.data.converters import convert  # noqa: E402

CLASSES = ("Aortic enlargement", "Atelectasis", "Cardiomegaly", "Nodule/Mass", "Pleural effusion", "Pneumothorax")
READERS = ("R8", "R9", "R10")
IMAGE_SIZE = 32


def png_variants(count: int = 16) -> list[bytes]:
    """A few distinct tiny PNGs, so decoding is real but generation stays fast."""
    rng = np.random.default_rng(0)
    variants = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8), mode="L").save(buffer, "PNG")
        variants.append(buffer.getvalue())
    return variants


def write_input(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path, int]:
    """A VinDr-CXR train.csv with exactly `rows` rows (3 per image) and its PNG folder; returns (csv, images, n)."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    variants = png_variants()
    records = []
    n_images = -(-rows // len(READERS))
    for index in range(n_images):
        image_id = f"{index:08x}"
        (images / f"{image_id}.png").write_bytes(variants[index % len(variants)])
        finding = rng.random() < 0.4
        label = rng.choice(CLASSES)
        x0, y0 = rng.uniform(0, 18), rng.uniform(0, 18)
        x1, y1 = x0 + rng.uniform(6, 12), y0 + rng.uniform(6, 12)
        for reader in READERS[: rows - len(records)]:
            if finding:
                jitter = [round(value + rng.uniform(-1, 1), 1) for value in (x0, y0, x1, y1)]
                records.append([image_id, label, str(CLASSES.index(label)), reader, *map(str, jitter)])
            else:
                records.append([image_id, "No finding", "14", reader, "", "", "", ""])
    rng.shuffle(records)
    csv_path = folder / "train.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"])
        writer.writerows(records)
    return csv_path, images, n_images


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(rows: int, rows_per_shard: int) -> dict:
    """Generate one input, convert it untraced (time, RSS) then traced (tracemalloc peak); return the figures."""
    with tempfile.TemporaryDirectory(prefix="bench-converters-") as tmp:
        folder = Path(tmp)
        csv_path, images, n_images = write_input(folder, rows)
        rss_before = max_rss_mb()
        start = time.perf_counter()
        stats = convert("vindr-cxr", csv_path, images, folder / "out", rows_per_shard=rows_per_shard)
        seconds = time.perf_counter() - start
        rss_after = max_rss_mb()
        tracemalloc.start()
        traced = convert("vindr-cxr", csv_path, images, folder / "out-traced", rows_per_shard=rows_per_shard)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert traced.rows_written == stats.rows_written and stats.rows_skipped == 0
    return {
        "csv_rows": rows,
        "images": n_images,
        "rows_written": sum(stats.rows_written.values()),
        "regions_dropped": stats.regions_dropped,
        "seconds": round(seconds, 3),
        "csv_rows_per_s": round(rows / seconds, 1),
        "canonical_rows_per_s": round(stats.rows_per_second, 1),
        "max_rss_before_conversion_mb": round(rss_before, 1),
        "max_rss_after_conversion_mb": round(rss_after, 1),
        "conversion_rss_growth_mb": round(rss_after - rss_before, 1),
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 20000], help="CSV rows per input")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.rows_per_shard)))
        return

    results = []
    for rows in args.rows:
        # A fresh interpreter per size: ru_maxrss is a high-water mark and would carry over otherwise.
        command = [sys.executable, __file__, "--worker", str(rows), "--rows-per-shard", str(args.rows_per_shard)]
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result))

    first, last = results[0], results[-1]
    report = write_report({
        "format": "vindr-cxr",
        "image_size": IMAGE_SIZE,
        "rows_per_shard": args.rows_per_shard,
        "results": results,
        "rss_ratio_largest_to_smallest": round(
            last["max_rss_after_conversion_mb"] / first["max_rss_after_conversion_mb"], 3),
        "tracemalloc_ratio_largest_to_smallest": round(last["tracemalloc_peak_mb"] / first["tracemalloc_peak_mb"], 3),
    }, args.output)
    print(json.dumps({key: report[key] for key in report if key.endswith("smallest")}))

if __name__ == "__main__":
    main()
