"""`regionmed-eval`: probe a trained RegionMed-CLIP model folder on a canonical dataset split.

    regionmed-eval probe     --model DIR --data DIR [--split test] [--baseline DIR] [--output OUT.json]
                             [--batch-size N] [--limit N] [--classes a,b,c] [--device cpu|cuda]
    regionmed-eval zero-shot ...   (box-free zero-shot AUROC only; same flags)
    regionmed-eval regions   ...   (region hard-negative accuracy under the controls, and the verdicts)
    regionmed-eval retrieval ...   (box-free image<->report Recall@K only)

Prints a compact table and writes the JSON report (default: OUT = probe.json in the current folder
for `probe`, `{subcommand}.json` otherwise). Exit code 0, or 2 on a user error (the message names
the bad argument). See `evaluation/probe.py` for what every number means.
"""

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from .probe import CONDITIONS, PARTS, ProbeInputError, run_probe, to_json

__all__ = ["format_report", "main"]

SUBCOMMANDS = {
    "probe": PARTS,
    "zero-shot": ("zero_shot",),
    "regions": ("regions",),
    "retrieval": ("retrieval",),
}


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _box_free_lines(block: dict[str, Any], indent: str = "  ") -> list[str]:
    lines = []
    zero_shot = block.get("zero_shot")
    if zero_shot is not None:
        lines.append(f"{indent}zero-shot macro AUROC {_number(zero_shot['macro_auroc'])} "
                     f"over {len(zero_shot['classes_evaluated'])} classes")
        for name, entry in zero_shot["per_class"].items():
            lines.append(f"{indent}  {name:24s} AUROC {_number(entry['auroc'])}  "
                         f"(+{entry['positives']} / -{entry['negatives']})")
    retrieval = block.get("retrieval")
    if retrieval is not None:
        if retrieval["n_pairs"]:
            for direction in ("image_to_text", "text_to_image"):
                values = "  ".join(f"R@{k}={_number(retrieval[f'{direction}_R@{k}'], 1)}" for k in (1, 5, 10))
                lines.append(f"{indent}retrieval {direction:13s} {values}")
            lines.append(f"{indent}  over {retrieval['n_pairs']} unique reports, chance R@1 = "
                         f"{_number(retrieval['chance_R@1'], 1)} (percent)")
        else:
            lines.append(f"{indent}retrieval: no image has a unique report in this split")
    cosine = block["mean_pairwise_cosine"]
    lines.append(f"{indent}mean pairwise cosine: image {_number(cosine['image'], 4)}  text {_number(cosine['text'], 4)}"
                 "  (1.0 = collapsed)")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The compact human-readable table of a probe report."""
    meta = report["metadata"]
    lines = [f"model {meta['model']}", f"data  {meta['data']}  split={meta['split']}  images={meta['n_images']}"
             + (f"  lesions={meta['n_lesions']}" if meta.get("n_lesions") is not None else "")]
    if "box_free" in report:
        lines.append("box-free (global view only):")
        lines += _box_free_lines(report["box_free"])
    if "with_boxes" in report:
        lines.append("with the true boxes pooled into the image embedding:")
        lines += _box_free_lines(report["with_boxes"])
    if "regions" in report:
        regions = report["regions"]
        lines.append(f"regions: hard-negative accuracy (fraction; chance {regions['chance_accuracy']} per kind), "
                     f"{regions['n_lesions']} lesions, {regions['lesions_dropped_over_max_rois']} dropped over max_rois")
        lines.append(f"  negatives: {meta['region_negatives']['source']}")
        if regions["conditions"]:
            kinds = list(regions["conditions"]["true"])
            lines.append("  " + f"{'condition':22s}" + "".join(f"{kind:>12s}" for kind in kinds))
            for condition in CONDITIONS:
                entry = regions["conditions"][condition]
                lines.append("  " + f"{condition:22s}" + "".join(
                    f"{_number(entry[kind]['accuracy']):>7s} n={entry[kind]['n']:<3d}" for kind in kinds))
        by_label = regions.get("by_label")
        if by_label:
            lines.append("  type accuracy by lesion label (true / crops blanked): " + "  ".join(
                f"{label} {_number(entry['type']['accuracy'], 2)}/"
                f"{_number(by_label['crops_blanked'][label]['type']['accuracy'], 2)}"
                for label, entry in by_label["true"].items() if entry["type"]["n"]))
        for name, verdict in report.get("verdicts", {}).items():
            if isinstance(verdict, dict):
                lines.append(f"  verdict {name}: {verdict['statement']}")
    if "baseline" in report:
        baseline = report["baseline"]
        lines.append(f"baseline {baseline['model']}:")
        lines += _box_free_lines(baseline["box_free"])
        differences = baseline["differences_model_minus_baseline"]
        if differences:
            lines.append("  model - baseline: " + "  ".join(
                f"{key}={_number(value, 3 if key == 'macro_auroc' else 1)}" for key, value in differences.items()))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name in SUBCOMMANDS:
        sub = commands.add_parser(name, help=f"run the {name} part" if name != "probe" else "run every part")
        sub.add_argument("--model", type=Path, required=True, help="saved model folder (AutoModel/AutoProcessor)")
        sub.add_argument("--data", type=Path, required=True, help="canonical dataset folder (parquet shards)")
        sub.add_argument("--split", default="test")
        sub.add_argument("--baseline", type=Path, default=None,
                         help="a second model folder (e.g. the global-only ablation) for the box-free comparison")
        sub.add_argument("--output", type=Path, default=None, help="JSON report path")
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
        sub.add_argument("--classes", default=None, help="comma-separated class names (default: the split's labels)")
        sub.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the message
        return int(exit_.code or 0) if exit_.code in (0, None) else 2
    classes = None
    if args.classes is not None:
        classes = [name.strip() for name in args.classes.split(",")]
        if not any(classes) or any(not name for name in classes):
            print(f"regionmed-eval: error: --classes must be comma-separated non-empty names, got {args.classes!r}",
                  file=sys.stderr)
            return 2
    output = args.output if args.output is not None else Path(f"{args.command}.json")
    if output.exists() and output.is_dir():
        print(f"regionmed-eval: error: --output {str(output)!r} is a folder", file=sys.stderr)
        return 2
    try:
        report = run_probe(args.model, args.data, split=args.split, batch_size=args.batch_size, limit=args.limit,
                           baseline_dir=args.baseline, classes=classes, parts=SUBCOMMANDS[args.command],
                           device=args.device, command=shlex.join(["regionmed-eval", *argv]))
    except ProbeInputError as error:
        print(f"regionmed-eval: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(to_json(report))
    print(f"report: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
