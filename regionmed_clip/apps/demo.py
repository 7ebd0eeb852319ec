"""`regionmed-demo`: the main job on the embedded default data, on CPU.

1. generates a fresh synthetic chest-film dataset (`regionmed-data synth`);
2. trains the default recipe (`regionmed-train --preset tiny`) and, with the same steps, data and
   seed, two ablations: global-only (`configs/global_only.yaml`) and no background training
   (`configs/no_background_windows.yaml`: proposals at inference, but the region path never
   trained on windows); two processes at a time, one thread each;
3. reloads them as a user would (`AutoModel` / `AutoProcessor` with `trust_remote_code`) and runs
   the probe (`regionmed-eval probe`) on the test split: box-free zero-shot AUROC and retrieval
   (the processor's full-resolution proposals pooled) against the global-only ablation, and region
   hard-negative accuracy per kind with the controls (crops blanked, boxes mirrored, box geometry
   removed); the box-free probe of the no-background ablation beside it;
4. evaluates the default recipe with `regionmed-eval zero-shot --regions` and `region`, and exports
   it with those results to a Hub folder (`regionmed-export`);
5. reloads the export in a fresh offline process through `AutoModel` (same embeddings) and the
   zero-shot pipeline, then prints a summary table: stage times, figures and output paths, and
   writes the headline figures to `summary.json` in the output folder.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from regionmed_clip.cli import console_script, positive_int
from regionmed_clip.data.schema import load_canonical
from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.evaluation.cli import format_report
from regionmed_clip.evaluation.probe import run_probe
from regionmed_clip.evaluation.results import to_json, write_results
from regionmed_clip.evaluation.tasks import EvalSettings, run_region, run_zero_shot
from regionmed_clip.training_scripts.launch import (
    GLOBAL_ONLY_CONFIG,
    NO_BACKGROUND_CONFIG,
    StepFailedError,
    train_in_subprocesses,
)

from .export import export_model

__all__ = ["main"]

# The three trainings, two at a time, fit the 10-minute budget of `make demo` on 2 cores.
DEMO_STEPS = 450
RUNS = ("run", "global_only", "no_background")


def _train_all(data_dir: Path, output_dir: Path, max_steps: int, seed: int) -> dict[str, Path]:
    """Train the default recipe and its two ablations, two at a time; returns their run folders."""
    common = ["--preset", "tiny", "--data", str(data_dir), "--max-steps", str(max_steps), "--seed", str(seed),
              "--save-steps", str(max_steps), "--logging-steps", str(max(1, min(20, max_steps // 20)))]
    runs = {"run": common, "global_only": [*common, "--config", str(GLOBAL_ONLY_CONFIG)],
            "no_background": [*common, "--config", str(NO_BACKGROUND_CONFIG)]}
    train_in_subprocesses({output_dir / name: args for name, args in runs.items()}, jobs=2)
    return {name: output_dir / name for name in runs}


def headline_summary(report: dict[str, Any], zero_shot: dict[str, Any], no_background: dict[str, Any]) -> dict[str, Any]:
    """The figures `summary.json` holds: the probe's box-free figures of the default recipe (zero-shot
    scored from each class's best-matching proposal, as `regionmed-eval zero-shot` does by default),
    its with-boxes zero-shot (`regionmed-eval zero-shot --regions`), and the two ablations'."""
    box_free = report["box_free"]
    return {
        "box_free_zero_shot_macro_auroc": box_free["zero_shot"]["macro_auroc"],
        "with_boxes_zero_shot_macro_auroc": zero_shot["headline"]["macro_auroc_with_regions"]["value"],
        "box_free_zero_shot_auroc_per_class": {name: entry["auroc"]
                                               for name, entry in box_free["zero_shot"]["per_class"].items()},
        "box_free_pooled_zero_shot_macro_auroc": box_free["zero_shot_pooled"]["macro_auroc"],
        "box_free_t2i_recall_at_1": box_free["retrieval"]["text_to_image_R@1"],
        "box_free_image_mean_pairwise_cosine": box_free["mean_pairwise_cosine"]["image"],
        # the ablation has no region path: its figure is its pooled (global-view) embedding's
        "global_only_zero_shot_macro_auroc": report["baseline"]["box_free"]["zero_shot_pooled"]["macro_auroc"],
        "global_only_t2i_recall_at_1": report["baseline"]["box_free"]["retrieval"]["text_to_image_R@1"],
        "no_background_zero_shot_macro_auroc": no_background["box_free"]["zero_shot"]["macro_auroc"],
        "no_background_pooled_zero_shot_macro_auroc": no_background["box_free"]["zero_shot_pooled"]["macro_auroc"],
        "box_free_pointing_game": zero_shot["metrics"]["pointing_game"]["pointing_accuracy"],
        "box_free_pointing_game_chance": zero_shot["metrics"]["pointing_game"]["chance"],
    }


def _evaluate_and_export(model_dir: Path, data_dir: Path, output_dir: Path, command: str) -> dict[str, Any]:
    """`regionmed-eval zero-shot --regions` and `region` on the test split, then `regionmed-export` with
    their results; returns the two records and the export summary."""
    records = {}
    for task, run in (("zero-shot", lambda s: run_zero_shot(s, use_regions=True)), ("region", run_region)):
        settings = EvalSettings(model_dir, data_dir, output_dir / "eval" / task, batch_size=64, device="cpu",
                                resamples=200, command=f"{command} (regionmed-eval {task})")
        records[task] = run(settings)
        write_results(settings.output_dir, records[task])
    export = export_model(model_dir, output_dir / "hub", [output_dir / "eval" / task for task in records],
                          model_name="regionmed-clip-demo")
    return {"records": records, "export": export}


_RELOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModel, AutoProcessor, pipeline
hub, film, labels = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
model = AutoModel.from_pretrained(hub, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(hub, trust_remote_code=True)
with torch.no_grad():
    embeds = model(**processor(images=[film])).image_embeds[0].tolist()
ranked = pipeline("zero-shot-image-classification", model=hub, trust_remote_code=True)(film, candidate_labels=labels)
print(json.dumps({"embeds": embeds, "pipeline": ranked, "module": type(model).__module__}))
"""


def _reload_check(model_dir: Path, hub_dir: Path, film: Path, labels: list[str]) -> dict[str, Any]:
    """Load the export in a fresh offline process as a user would; its box-free embedding of `film`
    must equal the trained model's. Returns the largest difference and the pipeline's ranking."""
    from transformers import AutoModel, AutoProcessor

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(hub_dir), str(film), ",".join(labels)],
                            env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        log = hub_dir.with_name("reload.log")
        log.write_text(result.stdout + result.stderr)
        raise StepFailedError(f"the exported folder did not reload in a fresh process: see {log}")
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with torch.no_grad():
        original = model(**processor(images=[str(film)])).image_embeds[0]
    difference = (original - torch.tensor(reloaded["embeds"])).abs().max().item()
    if difference > 1e-4:
        raise StepFailedError(f"the reloaded export's embedding differs from the trained model's by {difference:.2e}")
    return {"max_difference": difference, "pipeline": reloaded["pipeline"], "module": reloaded["module"]}


@console_script("regionmed-demo")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regionmed-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--n", type=positive_int, default=2000, help="synthetic images to generate")
    parser.add_argument("--max-steps", type=positive_int, default=DEMO_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data_dir = args.output_dir / "data"
    for name in ("data", *RUNS, "eval", "hub"):  # the demo always starts fresh
        shutil.rmtree(args.output_dir / name, ignore_errors=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    summary = write_synthetic_dataset(data_dir, n=args.n, seed=args.seed)
    times["generate data"] = time.perf_counter() - start
    print(f"[1/5] generated {summary['rows']} synthetic films in {summary['seconds']}s -> {data_dir}", flush=True)
    runs = _train_all(data_dir, args.output_dir, args.max_steps, args.seed)  # StepFailedError: exit 1
    print(f"[2/5] trained the default recipe and its global-only and no-background ablations ({args.max_steps} "
          f"steps each) in {time.perf_counter() - start:.0f}s so far", flush=True)
    times["train (three, two at a time)"] = time.perf_counter() - start - sum(times.values())
    command = " ".join(["regionmed-demo", *(argv if argv is not None else sys.argv[1:])])
    report = run_probe(runs["run"] / "final", data_dir, split="test", baseline_dir=runs["global_only"] / "final",
                       command=command)
    report_path = args.output_dir / "probe.json"
    report_path.write_text(to_json(report))
    no_background = run_probe(runs["no_background"] / "final", data_dir, split="test", parts=("zero_shot", "retrieval"),
                              command=command)
    (args.output_dir / "probe_no_background.json").write_text(to_json(no_background))
    print("[3/5] probe on the test split (regionmed-eval probe --baseline <global-only>):")
    print(format_report(report), flush=True)
    times["probe"] = time.perf_counter() - start - sum(times.values())
    evaluated = _evaluate_and_export(runs["run"] / "final", data_dir, args.output_dir, command)
    times["evaluate + export"] = time.perf_counter() - start - sum(times.values())
    print(f"[4/5] evaluated and exported {len(evaluated['export']['files'])} files -> {args.output_dir / 'hub'}",
          flush=True)
    test_row = load_canonical(data_dir, "test")[0]
    film = args.output_dir / "example_film.png"
    test_row["image"].save(film)
    labels = report["metadata"]["classes"]
    reload = _reload_check(runs["run"] / "final", args.output_dir / "hub", film, labels)
    times["fresh-process reload"] = time.perf_counter() - start - sum(times.values())
    print(f"[5/5] the export reloads in a fresh offline process ({reload['module'].split('.')[0]}): same "
          f"embedding (max difference {reload['max_difference']:.1e}); the zero-shot pipeline on one test film "
          f"(labels {test_row['labels']}): " + ", ".join(f"{entry['label']} {entry['score']:.2f}"
                                                         for entry in reload["pipeline"][:3]))
    zero_shot, region = evaluated["records"]["zero-shot"], evaluated["records"]["region"]
    summary = headline_summary(report, zero_shot, no_background)
    (args.output_dir / "summary.json").write_text(to_json(summary))
    per_class = ", ".join(f"{name} {value:.2f}" for name, value in summary["box_free_zero_shot_auroc_per_class"].items())
    rows = [(f"stage: {name}", f"{seconds:.0f} s") for name, seconds in times.items()]
    rows += [("box-free zero-shot macro AUROC", f"{summary['box_free_zero_shot_macro_auroc']:.3f} ({per_class})"),
             ("  from the pooled image embedding", f"{summary['box_free_pooled_zero_shot_macro_auroc']:.3f}"),
             ("  with the boxes pooled in", f"{summary['with_boxes_zero_shot_macro_auroc']:.3f}"),
             ("  global-only ablation", f"{summary['global_only_zero_shot_macro_auroc']:.3f}"),
             ("  no-background ablation (best proposal / pooled)",
              f"{summary['no_background_zero_shot_macro_auroc']:.3f} / "
              f"{summary['no_background_pooled_zero_shot_macro_auroc']:.3f}"),
             ("box-free text->image R@1 (global-only)", f"{summary['box_free_t2i_recall_at_1']:.1f}% "
              f"({summary['global_only_t2i_recall_at_1']:.1f}%)"),
             ("box-free image mean pairwise cosine", f"{summary['box_free_image_mean_pairwise_cosine']:.3f}"),
             ("box-free pointing game (chance)", f"{summary['box_free_pointing_game']:.3f} "
              f"({summary['box_free_pointing_game_chance']:.3f})"),
             ("region zero-shot accuracy (crops blanked)", f"{region['headline']['accuracy']['value']:.3f} "
              f"({region['headline']['accuracy_crops_blanked']['value']:.3f})"),
             ("model + processor", str(runs["run"] / "final")), ("global-only ablation", str(runs["global_only"] / "final")),
             ("summary", str(args.output_dir / "summary.json")),
             ("Hub folder (regionmed-push --dry-run)", str(args.output_dir / "hub")),
             ("probe report", str(report_path)), ("evaluation results", str(args.output_dir / "eval")),
             ("loss curves", str(runs["run"] / "loss_curves.png")),
             ("total time", f"{time.perf_counter() - start:.0f} s")]
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
