"""Box-free proposals as a knob: accuracy against cost of the processor's proposal grid on a trained model.

For each grid (`proposal_sizes`, `proposal_stride`), on the test split of a canonical dataset, through
`AutoModel` / `AutoProcessor` as a user loads them: zero-shot macro AUROC of the pooled image embedding
(what `get_image_features` returns), of each class's best-matching proposal (`best_region_scores`), and
of the global view alone (no proposals); text->image Recall@1; images per second (processor + model).

    python benchmarks/bench_proposals.py --model outputs/demo/run/final --data outputs/demo/data \
        --threads 2 --output benchmarks/results/bench_proposals.json
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_report import cpu_model, write_report  # noqa: E402

from regionmed_clip.evaluation.embeddings import encode_proposals, encode_texts  # noqa: E402
from regionmed_clip.evaluation.probe import (  # noqa: E402
    _load,
    _load_rows,
    best_region_scores,
    class_names,
    model_logit_scale,
    zero_shot_auroc,
    zero_shot_scores,
)
from regionmed_clip.evaluation.retrieval import retrieval_recall_at_k  # noqa: E402
from regionmed_clip.evaluation.rows import decode_image  # noqa: E402
from regionmed_clip.evaluation.zero_shot import DEFAULT_PROMPTS, load_prompt_templates, prompts_for  # noqa: E402

DEFAULT_GRIDS = ("0.25:0.5", "0.125:1.0", "0.125:0.5", "0.125,0.25:0.5", "0.0625,0.125:0.5")


def parse_grid(text: str) -> tuple[list[float], float]:
    """`"0.125,0.25:0.5"` -> ([0.125, 0.25], 0.5)."""
    sizes, _, stride = text.partition(":")
    return [float(size) for size in sizes.split(",")], float(stride or 0.5)


def _macro(block: dict[str, Any]) -> dict[str, Any]:
    return {"macro_auroc": round(block["macro_auroc"], 4),
            "per_class": {name: round(entry["auroc"], 4) for name, entry in block["per_class"].items()}}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--grids", nargs="+", default=list(DEFAULT_GRIDS), help="SIZES:STRIDE, e.g. 0.125,0.25:0.5")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model, processor = _load(args.model, device)
    rows = _load_rows(args.data, args.split, None)
    images = [decode_image(value, processor.image_processor) for value in rows["image"]]
    label_lists = [labels or [] for labels in rows["labels"]]
    classes = class_names(label_lists)
    prompts = prompts_for(load_prompt_templates(DEFAULT_PROMPTS), classes)
    flat = sorted({text for side in prompts.values() for texts in side.values() for text in texts})
    encoded = dict(zip(flat, encode_texts(model, processor, flat, 64, device), strict=True))
    positive = {name: torch.stack([encoded[text] for text in prompts["positive"][name]]) for name in classes}
    negative = {name: torch.stack([encoded[text] for text in prompts["negative"][name]]) for name in classes}
    labels = {name: torch.tensor([name in row for row in label_lists]) for name in classes}
    background = encode_texts(model, processor, [model.config.background_caption], 1, device)
    logit_scale = model_logit_scale(model)
    reports = list(rows["report_caption"])
    unique = torch.tensor([reports.count(report) == 1 for report in reports])
    texts = encode_texts(model, processor, reports, 64, device)

    def recall_at_1(image_embeds: torch.Tensor) -> float:
        return round(retrieval_recall_at_k(image_embeds[unique] @ texts[unique].t(), ks=(1,))["text_to_image_R@1"], 2)

    image_processor = processor.image_processor
    start = time.perf_counter()
    view = torch.cat([model.get_image_features(**processor(images=images[index : index + args.batch], proposals=False))
                      .pooler_output for index in range(0, len(images), args.batch)])
    view_seconds = time.perf_counter() - start
    results: dict[str, Any] = {"global_view_only": {
        "images_per_second": round(len(images) / view_seconds, 2),
        "zero_shot": _macro(zero_shot_auroc(zero_shot_scores(view, positive, negative), labels)),
        "text_to_image_R@1": recall_at_1(torch.nn.functional.normalize(view, dim=-1))}}
    print("global view only", json.dumps(results["global_view_only"]), flush=True)
    for grid in args.grids:
        image_processor.proposal_sizes, image_processor.proposal_stride = parse_grid(grid)
        start = time.perf_counter()
        out = encode_proposals(model, processor, images, args.batch, device)
        seconds = time.perf_counter() - start
        best = best_region_scores(out["proposal_embeds"], out["proposal_mask"], positive, background, logit_scale)
        results[grid] = {
            "proposals_per_image": int(out["proposal_mask"].sum(1).max()),
            "images_per_second": round(len(images) / seconds, 2),
            "zero_shot_pooled": _macro(zero_shot_auroc(zero_shot_scores(out["image_embeds"], positive, negative), labels)),
            "zero_shot_best_region": _macro(zero_shot_auroc({name: value[0] for name, value in best.items()}, labels)),
            "text_to_image_R@1": recall_at_1(out["image_embeds"]),
        }
        print(grid, json.dumps(results[grid]), flush=True)
    write_report({"cpu": cpu_model(), "threads": torch.get_num_threads(), "model": str(args.model),
                  "data": str(args.data), "split": args.split, "images": len(images), "results": results}, args.output)


if __name__ == "__main__":
    main()
