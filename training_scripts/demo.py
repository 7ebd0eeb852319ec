"""`regionmed-demo`: the main job on the embedded default data, on CPU.

1. generates a fresh synthetic chest-film dataset (`regionmed-data synth`);
2. trains the tiny preset through the four stages (`regionmed-train`);
3. reloads the result as a user would (`AutoModel` / `AutoProcessor` with `trust_remote_code`)
   and measures image<->report retrieval on the held-out validation split, with the regions
   and without them (global view only);
4. prints where the model, the loss log and the loss plot are.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from evaluation import retrieval_recall_at_k

from .data_schema import load_canonical
from .synthetic import write_synthetic_dataset
from .train import main as train_main

__all__ = ["main", "validation_retrieval"]


@torch.no_grad()
def validation_retrieval(model_dir: Path, data_dir: Path, batch_size: int = 64) -> dict[str, object]:
    """Recall@K between validation images and their report captions, with and without ROIs."""
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    rows = load_canonical(data_dir, "validation")
    image_embeds = {"with_regions": [], "global_only": []}
    text_embeds = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs = processor(images=batch["image"], text=batch["report_caption"],
                           regions=[[region["bbox"] for region in regions] for regions in batch["regions"]])
        with_regions = model(**{k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask", "roi_pixel_values",
                                                       "roi_boxes", "roi_mask")})
        image_embeds["with_regions"].append(with_regions.image_embeds)
        image_embeds["global_only"].append(with_regions.global_image_embeds)
        text_embeds.append(with_regions.text_embeds)
    texts = torch.cat(text_embeds)
    # Keep the films whose report is unique in the split: with two identical reports (two normal
    # films, say) no model can tell which image a text belongs to.
    reports = rows["report_caption"]
    unique = torch.tensor([reports.count(report) == 1 for report in reports])
    results = {}
    for name, embeds in image_embeds.items():
        similarity = torch.cat(embeds)[unique] @ texts[unique].t()
        scores = retrieval_recall_at_k(similarity, ks=(1, 5, 10))
        results[name] = {key: round(value, 2) for key, value in scores.items()}
    results["evaluated_pairs"] = int(unique.sum())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regionmed-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--n", type=int, default=2000, help="synthetic images to generate")
    parser.add_argument("--max-steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data_dir, run_dir = args.output_dir / "data", args.output_dir / "run"
    for folder in (data_dir, run_dir):  # the demo always starts fresh
        shutil.rmtree(folder, ignore_errors=True)
    summary = write_synthetic_dataset(data_dir, n=args.n, seed=args.seed)
    print(f"[1/3] generated {summary['rows']} synthetic films in {summary['seconds']}s -> {data_dir}", flush=True)

    code = train_main(["--preset", "tiny", "--data", str(data_dir), "--output-dir", str(run_dir),
                       "--max-steps", str(args.max_steps), "--save-steps", str(args.max_steps // 2),
                       "--seed", str(args.seed), "--logging-steps", str(max(1, min(20, args.max_steps // 20)))])
    if code != 0:
        return code
    print(f"[2/3] trained through all four stages in {time.perf_counter() - start:.0f}s so far", flush=True)

    metrics = validation_retrieval(run_dir / "final", data_dir)
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    pairs = metrics["evaluated_pairs"]
    print(f"[3/3] validation image<->report retrieval over {pairs} films with a unique report "
          f"(percent; chance R@1 = {100 / pairs:.1f}):")
    for name in ("with_regions", "global_only"):
        print(f"      {name:13s} " + "  ".join(f"{key}={value}" for key, value in metrics[name].items()))
    print(f"\nmodel + processor (Hub remote code): {run_dir / 'final'}")
    print(f"loss curves: {run_dir / 'loss_curves.png'}   loss log: {run_dir / 'train_log.jsonl'}")
    print(f"metrics: {args.output_dir / 'metrics.json'}   total time: {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
