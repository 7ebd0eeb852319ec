"""CPU training-step benchmark of RegionMed-CLIP against transformers' CLIPModel with identical towers.

Sizes: the presets `tiny` and `small` (4 x 256 towers, 224 px view, 112 px crops). In one run,
each figure a median over interleaved repeats, fp32, AdamW:

* like-for-like: RegionMed-CLIP with no ROIs and the report captions only (CLIP's loss) against
  CLIPModel of the same tower sizes: the step-time ratio (target <= 1.05);
* RegionMed-CLIP's full objective with 0 / 2 / 4 / 8 ROIs and one or all caption levels: step time,
  peak RSS rise, FLOPs (torch's counter) and the achieved fraction of the matmul peak measured here;
* packed captions (`caption_length_buckets` 6) against one padded pass (1) at 4 ROIs, all levels:
  the speed-up (target >= 1.25 at small) and the share of real tokens the text tower computes
  (target >= 80%);
* text dropout: the step with the text tower's `hidden_dropout` 0.1 (BERT's) against the presets' 0;
* scaling (`--scaling-size`, the tiny preset by default): step time and peak RSS rise of the full
  objective as the batch (8 -> 32), the view (224 -> 448 px) and the ROI count (0 -> 8) grow, drawn
  with `--figures DIR` as PNGs (ratios to the smallest setting).

    python benchmarks/bench_train.py --threads 2 --output benchmarks/results/bench_train.json --figures docs/figures
"""

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import cpu_model, proc_status_bytes, release_free_heap, reset_peak_rss, write_report  # noqa: E402
from training_step import step_flops, timed_steps, training_step  # noqa: E402

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPConfig, RegionMedCLIPModel  # noqa: E402
from regionmed_clip.training_scripts.synthetic_batch import synthetic_batch  # noqa: E402

ROI_COUNTS = (0, 2, 4, 8)


def clip_twin(config: RegionMedCLIPConfig) -> CLIPModel:
    """CLIPModel whose towers have RegionMed-CLIP's sizes (widths, depths, heads, view, vocabulary)."""
    vision, text = config.vision_config, config.text_config
    return CLIPModel(CLIPConfig(
        vision_config={name: getattr(vision, name) for name in ("image_size", "patch_size", "hidden_size",
                                                                 "num_hidden_layers", "num_attention_heads",
                                                                 "intermediate_size")},
        text_config={name: getattr(text, name) for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                             "num_attention_heads", "intermediate_size",
                                                             "max_position_embeddings")},
        projection_dim=config.projection_dim))


def clip_loss_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor]) -> None:
    model(**inputs, return_loss=True).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Case:
    """One model and batch, its step timed in rounds (so that cases interleave)."""

    def __init__(self, name: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor], clip_loss: bool):
        self.name, self.model, self.inputs = name, model.train(), inputs
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        self.times: list[float] = []
        self.step = (lambda: clip_loss_step(model, self.optimizer, inputs)) if clip_loss else \
            (lambda: training_step(model, self.optimizer, inputs))

    def round(self, steps: int) -> None:
        self.times += timed_steps(self.step, steps=steps, warmup=1, synchronize=lambda: None)

    def peak_rss_rise(self) -> int:
        release_free_heap()
        reset_peak_rss()
        before = proc_status_bytes("VmRSS")
        self.step()
        return proc_status_bytes("VmHWM") - before

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def real_token_share(model: RegionMedCLIPModel, inputs: dict[str, torch.Tensor]) -> float:
    """Real tokens over tokens computed by the text tower in one forward."""
    seen = {"real": 0, "computed": 0}

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids, mask = args[0], (args[1] if len(args) > 1 else kwargs.get("attention_mask"))
        seen["computed"] += ids.numel()
        seen["real"] += ids.numel() if mask is None else int(mask.sum())

    handle = model.text_model.register_forward_pre_hook(count, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["real"] / seen["computed"]


def measure(model: RegionMedCLIPModel, inputs: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """Median step time and peak RSS rise of the full objective on `inputs`."""
    case = Case("scaling", model, inputs, clip_loss=False)
    case.round(steps)
    return {"seconds": round(case.seconds, 4), "peak_rss_rise_mib": round(case.peak_rss_rise() / 2**20)}


def scaling(size: str, batch: int, steps: int) -> dict[str, dict[str, dict[str, float]]]:
    """The full objective (4 ROIs, all levels unless the ROI count varies) as one setting grows."""
    config = RegionMedCLIPConfig.from_preset(size)
    model = RegionMedCLIPModel(config)
    figures: dict[str, dict[str, dict[str, float]]] = {"batch": {}, "image_size": {}, "rois": {}}
    for images in (batch // 2, batch, 2 * batch):
        figures["batch"][str(images)] = measure(model, synthetic_batch(config, images, 4), steps)
    for side in (224, 448):
        wide = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset(size, vision_config={"image_size": side}))
        figures["image_size"][str(side)] = measure(wide, synthetic_batch(wide.config, batch, 4), steps)
    for rois in ROI_COUNTS:
        figures["rois"][str(rois)] = measure(model, synthetic_batch(config, batch, rois), steps)
    return figures


def draw(figures: dict[str, dict[str, dict[str, float]]], folder: Path, size: str) -> list[Path]:
    """One PNG per setting: step time and peak RSS rise as ratios to the smallest setting."""
    from regionmed_clip.figures import plot_lines

    labels = {"batch": "images per step", "image_size": "view side (px)", "rois": "ROIs per image"}
    paths = []
    for setting, points in figures.items():
        first = next(iter(points.values()))
        series = {name: [(float(x), value[key] / max(first[key], 1e-9)) for x, value in points.items()]
                  for name, key in (("step time", "seconds"), ("peak RSS rise", "peak_rss_rise_mib"))}
        paths.append(plot_lines(series, folder / f"performance_{setting}.png",
                                f"{size} preset, full objective: growth with {labels[setting]}", labels[setting]))
    return paths


def run_rounds(cases: list[Case], rounds: int, steps: int) -> None:
    for _ in range(rounds):
        for case in cases:
            case.round(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per comparison")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case per round")
    parser.add_argument("--scaling-size", default="tiny", choices=["tiny", "small", "none"])
    parser.add_argument("--figures", type=Path, default=None, help="folder for the scaling PNGs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    peak = 2 * 1024**3 / statistics.median(timed_steps(lambda: a @ b, steps=20, warmup=3,
                                                       synchronize=lambda: None)) / 1e9

    results: dict[str, Any] = {}
    for size in args.sizes:
        torch.manual_seed(0)
        figures: dict[str, Any] = {}
        # Like-for-like: no ROIs, report captions only, CLIP's loss on both.
        ours = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset(size))
        plain = synthetic_batch(ours.config, args.batch, 0, all_levels=False)
        twin_inputs = {"pixel_values": plain["pixel_values"], "input_ids": plain["input_ids"],
                       "attention_mask": plain["attention_mask"]}
        like = [Case("regionmed", ours, twin_inputs, clip_loss=True),
                Case("clip", clip_twin(ours.config), twin_inputs, clip_loss=True)]
        run_rounds(like, args.rounds, args.steps)
        figures["like_for_like"] = {"regionmed_seconds": round(like[0].seconds, 4),
                                    "clip_seconds": round(like[1].seconds, 4),
                                    "ratio": round(like[0].seconds / like[1].seconds, 3)}
        # The full objective by ROI count and caption levels.
        objective = {}
        for rois in ROI_COUNTS:
            for all_levels in (False, True):
                inputs = synthetic_batch(ours.config, args.batch, rois, all_levels=all_levels)
                case = Case(f"{rois}-rois-{'all' if all_levels else 'report'}", ours, inputs, clip_loss=False)
                run_rounds([case], 1, args.steps)
                flops = step_flops(ours, inputs)
                objective[case.name] = {"seconds": round(case.seconds, 4), "gflop": round(flops / 1e9, 2),
                                        "fraction_of_peak": round(flops / case.seconds / 1e9 / peak, 3),
                                        "peak_rss_rise_mib": round(case.peak_rss_rise() / 2**20)}
        figures["full_objective"] = objective
        # Packed captions against one padded pass, 4 ROIs, all levels.
        inputs = synthetic_batch(ours.config, args.batch, 4, all_levels=True)
        one_pass = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset(size, caption_length_buckets=1))
        one_pass.load_state_dict(ours.state_dict())
        packing = [Case("packed", ours, inputs, clip_loss=False), Case("one_pass", one_pass, inputs, clip_loss=False)]
        run_rounds(packing, args.rounds, args.steps)
        figures["packed_captions"] = {
            "packed_seconds": round(packing[0].seconds, 4), "one_pass_seconds": round(packing[1].seconds, 4),
            "speedup": round(packing[1].seconds / packing[0].seconds, 3),
            "real_token_share_packed": round(real_token_share(ours, inputs), 3),
            "real_token_share_one_pass": round(real_token_share(one_pass, inputs), 3)}
        dropout = RegionMedCLIPModel(RegionMedCLIPConfig.from_preset(size, text_config={"hidden_dropout": 0.1}))
        dropout.load_state_dict(ours.state_dict())
        assert ours.config.text_config.hidden_dropout == 0.0
        text_dropout = [Case("no_dropout", ours, inputs, clip_loss=False), Case("dropout", dropout, inputs, clip_loss=False)]
        run_rounds(text_dropout, args.rounds, args.steps)
        figures["text_dropout"] = {"hidden_dropout_0_seconds": round(text_dropout[0].seconds, 4),
                                   "hidden_dropout_0.1_seconds": round(text_dropout[1].seconds, 4),
                                   "speedup": round(text_dropout[1].seconds / text_dropout[0].seconds, 3)}
        results[size] = figures
        print(size, figures, flush=True)

    report = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "batch": args.batch,
              "matmul_peak_gflops": round(peak, 1), "results": results}
    if args.scaling_size != "none":
        report["scaling"] = {"preset": args.scaling_size, **scaling(args.scaling_size, args.batch, args.steps)}
        print("scaling", report["scaling"], flush=True)
        if args.figures:
            draw({key: report["scaling"][key] for key in ("batch", "image_size", "rois")}, args.figures,
                 args.scaling_size)
    write_report(report, args.output)


if __name__ == "__main__":
    main()
