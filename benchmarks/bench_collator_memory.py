"""Collator and processor memory on large images, in one run:

* the peak RSS of one training batch collated the way the collator does it (each image reduced to
  its view and crops as it is decoded) against the way it did before (every image of the batch
  decoded first, then the processor on the list);
* the peak RSS of the image processor on ONE image with one region, given as a file path and as an
  already decoded PIL image, in multiples of the decoded image's size (H x W x 3 bytes): what the
  processor adds on top of what the caller holds.

Each variant runs in a fresh subprocess (so neither inherits the other's heap); the figure is the
rise of VmHWM over the RSS just before collating. Rows hold RGB PNGs of a smooth film (small files,
large decoded images), 4 per batch, as a large-image dataset would.

    python benchmarks/bench_collator_memory.py --output benchmarks/results/bench_collator_memory.json
"""

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import cpu_model, write_report  # noqa: E402

VARIANTS = ("per_row", "whole_batch", "processor_path", "processor_pil")


def film_png(side: int, seed: int) -> bytes:
    yy, xx = np.mgrid[:side, :side].astype(np.float32) / side
    film = 120 + 80 * np.sin(6 * xx + seed) * np.cos(4 * yy)
    rgb = np.clip(np.stack([film, film * 0.9, film * 0.8], axis=-1), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def batch_rows(folder: Path) -> list[dict]:
    """One row per PNG in `folder`, with a lesion box in the upper left quarter."""
    rows = []
    for path in sorted(folder.glob("film-*.png")):
        side = Image.open(path).size[0]
        rows.append({"image": {"bytes": path.read_bytes(), "path": None}, "image_id": path.stem,
                     "report_caption": "a film", "summary_caption": "a film", "negative_captions": [],
                     "regions": [{"bbox": [side * 0.2, side * 0.2, side * 0.4, side * 0.4], "caption": "a lesion",
                                  "label": "nodule"}]})
    return rows


def measure(variant: str, folder: Path) -> int:
    """Peak RSS rise (bytes) of collating the batch in `folder` once, in this process."""
    from benchmark_report import proc_status_bytes, release_free_heap, reset_peak_rss

    from regionmed_clip.processing import RegionMedCLIPImageProcessor, RegionMedCLIPProcessor, build_tokenizer
    from regionmed_clip.training_scripts.collator import RegionMedCLIPCollator, _decode

    rows = batch_rows(folder)
    processor = RegionMedCLIPProcessor(RegionMedCLIPImageProcessor(image_size=224, roi_size=112, max_rois=4),
                                       build_tokenizer([row["report_caption"] for row in rows], vocab_size=200))
    collator = RegionMedCLIPCollator(processor, use_summary=False, use_negatives=False, use_region_negatives=False)
    first = sorted(folder.glob("film-*.png"))[0]
    decoded = _decode(rows[0]["image"]) if variant == "processor_pil" else None  # held by the caller
    release_free_heap()
    reset_peak_rss()
    before = proc_status_bytes("VmRSS")
    if variant.startswith("processor"):
        processor.image_processor(str(first) if decoded is None else decoded, regions=[[rows[0]["regions"][0]["bbox"]]])
    elif variant == "per_row":
        collator(rows)
    else:  # the earlier collator: decode the whole batch, then one processor call on the list
        images = [_decode(row["image"]) for row in rows]
        processor(images=images, text=[row["report_caption"] for row in rows],
                  regions=[[region["bbox"] for region in row["regions"]] for row in rows], return_tensors="pt")
    return proc_status_bytes("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=6000, help="image side in pixels (RGB)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--measure", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, default=None, help=argparse.SUPPRESS)  # the folder of PNGs
    args = parser.parse_args()
    if args.measure:
        print(measure(args.measure, args.rows))
        return

    side = args.side
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.batch):
            (Path(scratch) / f"film-{seed}.png").write_bytes(film_png(side, seed))
        encoded = (Path(scratch) / "film-0.png").stat().st_size
        peaks = {}
        for variant in VARIANTS:
            result = subprocess.run([sys.executable, __file__, "--measure", variant, "--rows", scratch],
                                    capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
            peaks[variant] = int(result.stdout.strip().splitlines()[-1])
    decoded = side * side * 3
    figures = {
        "cpu": cpu_model(),
        "image": f"{side}x{side} RGB PNG, {encoded / 2**20:.1f} MiB encoded, "
                 f"{decoded / 2**20:.0f} MiB decoded",
        "batch": args.batch,
        "peak_rss_rise_mib": {variant: round(peak / 2**20) for variant, peak in peaks.items()},
        "ratio_per_row_to_whole_batch": round(peaks["per_row"] / peaks["whole_batch"], 3),
        "processor_one_image_peak_in_decoded_copies": {
            source: round(peaks[f"processor_{source}"] / decoded, 2) for source in ("path", "pil")},
    }
    print(figures)
    write_report(figures, args.output)


if __name__ == "__main__":
    main()
