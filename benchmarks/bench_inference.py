"""Inference throughput: embeddings per second of RegionMed-CLIP, in eval mode without gradients, per
preset: box-free image embeddings as `get_image_features(**processor(images=films))` computes them
(the global view and the processor's full-resolution proposals, `proposals` at the default grid;
the model's forward alone, and the processor's cut of the proposals alone), the global view alone
(the previous box-free path), image embeddings with 4 ROIs pooled in, report-caption text
embeddings, and CLIPModel's image and text embeddings with identical towers for scale. Medians of
interleaved repeats, in one run; the films are 256 px synthetic chest films. With `--peak-film N`
it measures instead, in a fresh process per preset, the peak resident memory of the box-free
embedding of one N x N 16-bit film (processor and model).

    python benchmarks/bench_inference.py --threads 2 --output benchmarks/results/bench_inference.json
    python benchmarks/bench_inference.py --threads 2 --peak-film 3000 --output benchmarks/results/bench_inference_peak.json
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train import clip_twin  # noqa: E402
from benchmark_report import cpu_model, proc_status_bytes, write_report  # noqa: E402
from training_step import timed_steps  # noqa: E402

from regionmed_clip.data.synthetic import render_phantom  # noqa: E402
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel  # noqa: E402
from regionmed_clip.processing import RegionMedCLIPImageProcessor  # noqa: E402
from regionmed_clip.training_scripts.synthetic_batch import synthetic_batch  # noqa: E402


def image_processor_for(config: RegionMedCLIPConfig) -> RegionMedCLIPImageProcessor:
    """The processor `regionmed-train` saves with a model of this config (default proposal grid)."""
    return RegionMedCLIPImageProcessor(image_size=config.vision_config.image_size, roi_size=config.roi_image_size,
                                       max_rois=config.max_rois)


def encoders(size: str, batch: int) -> dict[str, Callable[[], Any]]:
    """Name -> a call that embeds `batch` images or captions."""
    torch.manual_seed(0)
    model = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset(size)).eval()
    clip = clip_twin(model.config).eval()
    inputs = synthetic_batch(model.config, batch, 4, all_levels=False)
    rois = {key: inputs[key] for key in ("roi_pixel_values", "roi_boxes", "roi_mask")}
    processor = image_processor_for(model.config)
    films = [render_phantom(0, index)[0] for index in range(batch)]
    proposals = processor(films, return_tensors="pt")
    return {
        "image_box_free": lambda: model.get_image_features(**processor(films, return_tensors="pt")),
        "image_box_free_model_only": lambda: model.get_image_features(**proposals),
        "processor_proposals_only": lambda: processor(films, return_tensors="pt"),
        "image_global_view_only": lambda: model.get_image_features(proposals["pixel_values"]),
        "image_with_4_rois": lambda: model.get_image_features(inputs["pixel_values"], **rois),
        "text_report": lambda: model.get_text_features(inputs["input_ids"], inputs["attention_mask"]),
        "clip_image": lambda: clip.get_image_features(pixel_values=inputs["pixel_values"]),
        "clip_text": lambda: clip.get_text_features(input_ids=inputs["input_ids"],
                                                    attention_mask=inputs["attention_mask"]),
    }


def peak_memory(size: str, side: int) -> dict[str, Any]:
    """Peak resident memory (VmHWM) of the box-free embedding of one `side x side` 16-bit film: the
    process after building the model, then after the processor and the forward."""
    import numpy as np

    torch.manual_seed(0)
    model = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset(size)).eval()
    processor = image_processor_for(model.config)
    film = (np.random.default_rng(0).random((side, side)) * 65535).astype(np.uint16)
    before = proc_status_bytes("VmHWM")
    start = time.perf_counter()
    with torch.no_grad():
        inputs = processor(film, return_tensors="pt")
        model.get_image_features(**inputs)
    return {"film": f"{side}x{side} uint16 ({film.nbytes / 2**20:.1f} MiB)",
            "proposals": int(inputs["proposal_mask"].sum()),
            "proposal_crops_mib": round(inputs["proposal_pixel_values"].nbytes / 2**20, 1),
            "peak_rss_before_mib": round(before / 2**20, 1),
            "peak_rss_after_mib": round(proc_status_bytes("VmHWM") / 2**20, 1),
            "peak_rss_added_mib": round((proc_status_bytes("VmHWM") - before) / 2**20, 1),
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--peak-film", type=int, default=None, help="measure the peak memory of one N x N 16-bit film")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one preset's peak, in this process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_film and args.child:
        print(json.dumps(peak_memory(args.sizes[0], args.peak_film)))
        return
    if args.peak_film:  # a fresh process per preset: VmHWM only grows
        peaks = {}
        for size in args.sizes:
            command = [sys.executable, __file__, "--sizes", size, "--peak-film", str(args.peak_film), "--child",
                       *(["--threads", str(args.threads)] if args.threads else [])]
            peaks[size] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True)
                                     .stdout.strip().splitlines()[-1])
            print(size, peaks[size], flush=True)
        write_report({"cpu": cpu_model(), "threads": torch.get_num_threads(), "peak_memory": peaks}, args.output)
        return
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
        clip_seconds = results[size]["clip_image"]["seconds_per_batch"]
        results[size]["ratios_to_clip_image"] = {name: round(entry["seconds_per_batch"] / clip_seconds, 2)
                                                 for name, entry in results[size].items() if name.startswith(("image", "processor"))}
        results[size]["proposals_per_image"] = int(image_processor_for(RegionMedCLIPConfig.from_preset(size))(
            render_phantom(0, 0)[0])["proposal_mask"].sum())
        print(size, results[size], flush=True)
    write_report({"cpu": cpu_model(), "threads": torch.get_num_threads(), "batch": args.batch, "results": results},
                 args.output)


if __name__ == "__main__":
    main()
