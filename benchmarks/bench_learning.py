"""The learning benchmark (issues 8 and 22): the default recipe against its ablations, several seeds,
same steps and data, each judged by the probe (`regionmed-eval probe --baseline`).

For every seed it trains `regionmed-train --preset tiny` (the default recipe, no config file), the
global-only ablation (`training_scripts/configs/global_only.yaml`) and the no-background ablation
(`training_scripts/configs/no_background_windows.yaml`: proposals at inference, the region path never
trained on windows) on the same data for the same steps, `--jobs` trainings at a time with one
thread each; then probes each full run on the test split with the global-only ablation as the
baseline, and the no-background run box-free, and writes the per-seed figures, their mean and
standard deviation and issue 22's targets met. A run folder that already holds `final/` is reused
(the command is the same).

    regionmed-data synth --n 2000 --seed 0 --output data/synth
    python benchmarks/bench_learning.py --data data/synth --runs runs/learning --seeds 0 1 2 --max-steps 1200 \\
        --output benchmarks/results/bench_learning.json
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import seed_parser, seed_summary, train_minutes, write_report  # noqa: E402

from regionmed_clip.evaluation.probe import run_probe  # noqa: E402
from regionmed_clip.evaluation.results import to_json  # noqa: E402
from regionmed_clip.training_scripts.launch import GLOBAL_ONLY_CONFIG, NO_BACKGROUND_CONFIG, train_in_subprocesses  # noqa: E402

# Issue 22's targets (test split, tiny preset, mean of the seeds): figure -> (comparison, threshold).
TARGETS = {
    "box_free_macro_auroc": (">=", 0.85),
    "with_boxes_minus_box_free_macro_auroc": ("<=", 0.03),
    "box_free_min_class_auroc": (">=", 0.75),
    "box_free_text_to_image_R@1": (">=", 20.0),
    "region_type": (">=", 0.90),
    "region_side": (">=", 0.95),
    "region_zone": (">=", 0.95),
    "region_type_crops_blanked": ("<=", 0.60),
    "box_free_image_mean_cosine": ("<=", 0.7),
}
VARIANTS = {"full": [], "global_only": ["--config", str(GLOBAL_ONLY_CONFIG)],
            "no_background": ["--config", str(NO_BACKGROUND_CONFIG)]}


def _train(runs: Path, data: Path, seeds: list[int], max_steps: int, jobs: int) -> None:
    """Train every (seed, variant) that has no `final/` yet, `jobs` at a time, one thread each."""
    pending = {}
    # Every seed's default run first, then the ablations: the two longest runs share the machine
    # first, and the shorter ablations pair up at the end instead of idling a core beside a long run.
    for variant, extra in VARIANTS.items():
        for seed in seeds:
            run_dir = runs / f"{variant}_s{seed}"
            if not (run_dir / "final").is_dir():
                pending[run_dir] = ["--preset", "tiny", "--data", str(data), "--max-steps", str(max_steps),
                                    "--seed", str(seed), "--save-steps", str(max_steps), *extra]
    train_in_subprocesses(pending, jobs)


def _figures(report: dict[str, Any], no_background: dict[str, Any]) -> dict[str, float]:
    box_free, baseline = report["box_free"], report["baseline"]["box_free"]
    retrieval = box_free["retrieval"]
    true, blanked = report["regions"]["conditions"]["true"], report["regions"]["conditions"]["crops_blanked"]
    mirrored = report["regions"]["conditions"]["boxes_mirrored"]
    removed = report["regions"]["conditions"]["box_geometry_removed"]
    return {
        "region_type": true["type"]["accuracy"],
        "region_side": true["side"]["accuracy"],
        "region_zone": true["zone"]["accuracy"],
        "region_all": true["all"]["accuracy"],
        "region_type_crops_blanked": blanked["type"]["accuracy"],
        "region_side_boxes_mirrored": mirrored["side"]["accuracy"],
        "region_zone_boxes_mirrored": mirrored["zone"]["accuracy"],
        "region_type_boxes_mirrored": mirrored["type"]["accuracy"],
        "region_side_box_geometry_removed": removed["side"]["accuracy"],
        "region_zone_box_geometry_removed": removed["zone"]["accuracy"],
        "box_free_macro_auroc": box_free["zero_shot"]["macro_auroc"],
        "box_free_min_class_auroc": min(entry["auroc"] for entry in box_free["zero_shot"]["per_class"].values()),
        "box_free_pooled_macro_auroc": box_free["zero_shot_pooled"]["macro_auroc"],
        "box_free_global_view_macro_auroc": box_free["zero_shot_global_view"]["macro_auroc"],
        "global_only_macro_auroc": baseline["zero_shot_pooled"]["macro_auroc"],
        "box_free_macro_auroc_minus_global_only": box_free["zero_shot"]["macro_auroc"]
        - baseline["zero_shot_pooled"]["macro_auroc"],
        "no_background_macro_auroc": no_background["box_free"]["zero_shot"]["macro_auroc"],
        "no_background_pooled_macro_auroc": no_background["box_free"]["zero_shot_pooled"]["macro_auroc"],
        "no_background_text_to_image_R@1": no_background["box_free"]["retrieval"]["text_to_image_R@1"],
        "box_free_text_to_image_R@1": retrieval["text_to_image_R@1"],
        "box_free_image_to_text_R@1": retrieval["image_to_text_R@1"],
        "global_only_text_to_image_R@1": baseline["retrieval"]["text_to_image_R@1"],
        "chance_R@1": retrieval["chance_R@1"],
        "box_free_text_to_image_R@1_over_chance": retrieval["text_to_image_R@1"] / retrieval["chance_R@1"],
        "box_free_image_mean_cosine": box_free["mean_pairwise_cosine"]["image"],
        "with_boxes_macro_auroc": report["with_boxes"]["zero_shot"]["macro_auroc"],
        "with_boxes_minus_box_free_macro_auroc": report["with_boxes"]["zero_shot"]["macro_auroc"]
        - box_free["zero_shot"]["macro_auroc"],
        "with_boxes_text_to_image_R@1": report["with_boxes"]["retrieval"]["text_to_image_R@1"],
        "global_only_image_mean_cosine": baseline["mean_pairwise_cosine"]["image"],
        **{f"auroc_{name}": entry["auroc"] for name, entry in box_free["zero_shot"]["per_class"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = seed_parser(__doc__, "folder for the training runs and probe reports", 1200).parse_args(argv)
    args.runs.mkdir(parents=True, exist_ok=True)
    _train(args.runs, args.data, args.seeds, args.max_steps, args.jobs)
    per_seed = {}
    for seed in args.seeds:
        report = run_probe(args.runs / f"full_s{seed}" / "final", args.data, split="test",
                           baseline_dir=args.runs / f"global_only_s{seed}" / "final")
        (args.runs / f"probe_s{seed}.json").write_text(to_json(report))
        no_background = run_probe(args.runs / f"no_background_s{seed}" / "final", args.data, split="test",
                                  parts=("zero_shot", "retrieval"))
        (args.runs / f"probe_no_background_s{seed}.json").write_text(to_json(no_background))
        per_seed[seed] = {**_figures(report, no_background),
                          "train_minutes": train_minutes(args.runs / f"full_s{seed}"),
                          "global_only_train_minutes": train_minutes(args.runs / f"global_only_s{seed}")}
    summary = seed_summary(per_seed)
    mean, spread = summary["mean"], summary["std"]
    met = {name: (mean[name] >= threshold if comparison == ">=" else mean[name] <= threshold)
           for name, (comparison, threshold) in TARGETS.items()}
    for name, (comparison, threshold) in TARGETS.items():
        print(f"{name:42s} {mean[name]:8.3f} +/- {spread[name]:.3f}   target {comparison} {threshold}  "
              f"{'met' if met[name] else 'NOT met'}")
    write_report({"data": str(args.data), "seeds": args.seeds, "max_steps": args.max_steps,
                  "per_seed": {str(seed): figures for seed, figures in per_seed.items()},
                  "mean": mean, "std": spread,
                  "targets": {name: {"comparison": c, "threshold": t, "met": met[name]}
                              for name, (c, t) in TARGETS.items()}}, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
