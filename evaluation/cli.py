"""`regionmed-eval`: evaluate a saved RegionMed-CLIP model folder on a canonical dataset split.

    regionmed-eval zero-shot --model DIR --data DIR --output OUT [--classes a,b] [--prompts YAML]
                             [--mode auto|multilabel|multiclass] [--uncertain ignore|positive|negative] [--regions]
                             [--scoring best-region|pooled]
    regionmed-eval region    --model DIR --data DIR --output OUT [--classes a,b] [--prompts YAML]
    regionmed-eval grounding --model DIR --data DIR --output OUT [--window-sizes 0.125,0.25] [--stride 0.5] [--iou 0.5]
    regionmed-eval retrieval --model DIR --data DIR --output OUT [--captions report,summary] [--ks 1,5,10]
    regionmed-eval vqa       --model VQA_DIR --data DIR --output OUT [--regions] [--blank-images]
    regionmed-eval report    OUT [OUT ...] [--output table.md]
    regionmed-eval probe     --model DIR --data DIR [--baseline DIR] [--parts zero_shot,retrieval,regions]
                             [--output probe.json]

Every task also takes [--split test] [--batch-size N] [--device cpu|cuda] [--limit N] [--cache-dir DIR]
[--resamples N] [--seed N] [--no-progress], writes OUT/results.json and its PNG figures (see
`evaluation/results.py` for the fields, `evaluation/tasks.py` for what each number means) and keeps
the embeddings in OUT/embeddings (or --cache-dir) so that re-scoring does not re-encode. `report`
merges results into markdown tables. `probe` is the region-aware diagnostic with its controls
(`evaluation/probe.py`); it writes one JSON report. Rows a task cannot use (an image that does not
decode, a null field it needs) are skipped and counted, and every figure says over how many rows it
was computed (`evaluation/rows.py`). Exit code 0; 2 on a bad argument; 1 on a file or row that
cannot be read (one line naming it; `--debug` shows the traceback; see `regionmed_clip.cli`).
"""

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from regionmed_clip.cli import UsageError, console_script, positive_int

from .probe import CONDITIONS, PARTS, run_probe
from .results import load_results, markdown_report, to_json, write_results
from .rows import EvaluationInputError, describe
from .tasks import (
    CAPTION_COLUMNS,
    SCORINGS,
    ZERO_SHOT_MODES,
    EvalSettings,
    run_grounding,
    run_region,
    run_retrieval,
    run_vqa,
    run_zero_shot,
)
from .zero_shot import DEFAULT_PROMPTS, UNCERTAIN_POLICIES

__all__ = ["format_report", "main"]

TASKS = ("zero-shot", "region", "grounding", "retrieval", "vqa")


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _box_free_lines(block: dict[str, Any], indent: str = "  ") -> list[str]:
    lines = []
    zero_shot = block.get("zero_shot")
    if zero_shot is not None:
        scored = " (each class's best-matching proposal)" if "zero_shot_pooled" in block else ""
        lines.append(f"{indent}zero-shot macro AUROC {_number(zero_shot['macro_auroc'])}{scored} "
                     f"over {len(zero_shot['classes_evaluated'])} classes")
        for name, entry in zero_shot["per_class"].items():
            lines.append(f"{indent}  {name:24s} AUROC {_number(entry['auroc'])}  "
                         f"(+{entry['positives']} / -{entry['negatives']})")
    for key, what in (("zero_shot_pooled", "the pooled image embedding"), ("zero_shot_global_view", "the global view alone")):
        if key in block:
            lines.append(f"{indent}  scored from {what}: macro AUROC {_number(block[key]['macro_auroc'])}")
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
        lines.append("box-free (no boxes: the global view and the processor's proposals):")
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


def _names(text: str, flag: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not names or any(not name for name in names):
        raise EvaluationInputError(f"{flag} must be comma-separated non-empty names, got {text!r}")
    return names


def _argument_error(message: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(message)


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise _argument_error(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise _argument_error(f"must be >= 0, got {text!r}")
    return value


def _unit_fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise _argument_error(f"must be a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise _argument_error(f"must be in (0, 1], got {text!r}")
    return value


def _list_of(kind: Any, what: str) -> Any:
    """argparse type: comma-separated values of `kind` (an argparse type), at least one."""

    def parse(text: str) -> list[Any]:
        parts = [part.strip() for part in text.split(",")]
        if not parts or any(not part for part in parts):
            raise _argument_error(f"must be comma-separated {what}, got {text!r}")
        try:
            return [kind(part) for part in parts]
        except argparse.ArgumentTypeError as error:
            raise _argument_error(f"must be comma-separated {what}: {error}") from None

    return parse


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", type=Path, required=True, help="saved model folder (AutoModel/AutoProcessor)")
    sub.add_argument("--data", type=Path, required=True, help="canonical dataset folder (parquet shards)")
    sub.add_argument("--split", default="test")
    sub.add_argument("--batch-size", type=positive_int, default=32)
    sub.add_argument("--limit", type=positive_int, default=None, help="only the first N images of the split")
    sub.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in TASKS:
        sub = commands.add_parser(name, help=f"the {name} task (writes OUT/results.json and figures)")
        _common(sub)
        sub.add_argument("--output", type=Path, required=True, help="output folder")
        sub.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default OUT/embeddings)")
        sub.add_argument("--resamples", type=_non_negative_int, default=1000,
                         help="bootstrap resamples for the 95%% intervals (0: none)")
        sub.add_argument("--seed", type=int, default=0, help="bootstrap seed")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name in ("zero-shot", "region"):
            sub.add_argument("--classes", default=None, help="comma-separated class names (default: the split's)")
            sub.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="prompt-template YAML")
        if name == "zero-shot":
            sub.add_argument("--mode", choices=ZERO_SHOT_MODES, default="auto")
            sub.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                             help="policy for uncertain labels (CheXpert -1)")
            sub.add_argument("--regions", action="store_true", help="also score with the dataset's boxes pooled in")
            sub.add_argument("--scoring", choices=SCORINGS, default=SCORINGS[0],
                             help="box-free class scores from each class's best-matching proposal (default) or "
                                  "from the pooled image embedding; the other is reported beside it")
        if name == "vqa":
            sub.add_argument("--regions", action="store_true", help="give the dataset's boxes as ROI inputs")
            sub.add_argument("--blank-images", action="store_true",
                             help="the question-only control: every image replaced by a black one")
        if name == "grounding":
            sub.add_argument("--window-sizes", type=_list_of(_unit_fraction, "fractions in (0, 1]"),
                             help="proposal window sides (fractions of the shorter side; default: the model's "
                                  "image processor's proposal_sizes)")
            sub.add_argument("--stride", type=_unit_fraction,
                             help="window step as a fraction of its side, in (0, 1] (default: the image processor's "
                                  "proposal_stride)")
            sub.add_argument("--iou", type=_unit_fraction, default=0.5, help="IoU threshold for a top-1 hit, in (0, 1]")
        if name == "retrieval":
            sub.add_argument("--captions", default="report", help=f"caption levels among {sorted(CAPTION_COLUMNS)}")
            sub.add_argument("--ks", type=_list_of(positive_int, "positive integers"), default=[1, 5, 10],
                             help="the K of Recall@K")
    report = commands.add_parser("report", help="merge results into markdown tables")
    report.add_argument("results", type=Path, nargs="+", help="results.json files or the folders holding them")
    report.add_argument("--output", type=Path, default=None, help="write the markdown here too")
    probe = commands.add_parser("probe", help="the region-aware diagnostic with controls (one JSON report)")
    _common(probe)
    probe.set_defaults(batch_size=64)
    probe.add_argument("--baseline", type=Path, default=None,
                       help="a second model folder (e.g. the global-only ablation) for the box-free comparison")
    probe.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among {list(PARTS)}")
    probe.add_argument("--classes", default=None, help="comma-separated class names (default: the split's labels)")
    probe.add_argument("--output", type=Path, default=Path("probe.json"), help="JSON report path")
    return parser


def _run_task(args: argparse.Namespace, command: str) -> dict[str, Any]:
    settings = EvalSettings(args.model, args.data, args.output, split=args.split, batch_size=args.batch_size,
                            device=args.device, limit=args.limit, cache_dir=args.cache_dir,
                            progress=not args.no_progress, resamples=args.resamples, seed=args.seed, command=command)
    if args.command == "zero-shot":
        classes = None if args.classes is None else _names(args.classes, "--classes")
        return run_zero_shot(settings, classes, args.prompts, args.mode, args.uncertain, args.regions, args.scoring)
    if args.command == "region":
        classes = None if args.classes is None else _names(args.classes, "--classes")
        return run_region(settings, classes, args.prompts)
    if args.command == "grounding":
        return run_grounding(settings, args.window_sizes, args.stride, args.iou)
    if args.command == "vqa":
        return run_vqa(settings, args.regions, args.blank_images)
    return run_retrieval(settings, _names(args.captions, "--captions"), args.ks)


def _run_probe(args: argparse.Namespace, command: str) -> int:
    if args.output.is_dir():
        raise EvaluationInputError(f"--output {str(args.output)!r} is a folder")
    if args.output.parent.exists() and not args.output.parent.is_dir():
        raise EvaluationInputError(f"--output {str(args.output)!r}: {str(args.output.parent)!r} is not a folder")
    classes = None if args.classes is None else _names(args.classes, "--classes")
    report = run_probe(args.model, args.data, split=args.split, batch_size=args.batch_size, limit=args.limit,
                       baseline_dir=args.baseline, classes=classes, parts=_names(args.parts, "--parts"),
                       device=args.device, command=command)
    print(format_report(report))
    print(f"rows: {describe(report['metadata']['rows'])}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_json(report))
    print(f"report: {args.output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.is_dir():
        raise UsageError(f"--output {str(args.output)!r} is a folder")
    for path in args.results:
        if not path.exists() or (path.is_dir() and not (path / "results.json").is_file()):
            raise UsageError(f"results: no results file at {str(path if not path.is_dir() else path / 'results.json')!r}")
    table = markdown_report([load_results(path) for path in args.results])  # a corrupt file: ValueError naming it
    print(table, end="")
    if args.output is not None:
        args.output.write_text(table)
    return 0


@console_script("regionmed-eval")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the message
        return int(exit_.code or 0) if exit_.code in (0, None) else 2
    command = shlex.join(["regionmed-eval", *argv])
    if args.command == "probe":
        return _run_probe(args, command)
    if args.command == "report":
        return _report(args)
    record = _run_task(args, command)
    path = write_results(args.output, record)
    print(markdown_report([record], notes=False), end="")
    print(f"rows: {describe(record['rows'])}")
    print(f"results: {path}" + "".join(f"\nfigure: {args.output / name}" for name in record["figures"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
