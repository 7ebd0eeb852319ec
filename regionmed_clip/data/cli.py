"""`regionmed-data`: make canonical region-annotated datasets.

    regionmed-data synth --n 2000 --seed 0 --output data/synth
    regionmed-data convert --format vindr-cxr --input train.csv --images train_png/ --output data/vindr
    regionmed-data convert --format chexpert --input CheXpert-v1.0-small/ --output data/chexpert --frontal-only
    regionmed-data to-disk --input data/synth --output data/synth_arrow     # for datasets.load_from_disk
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from regionmed_clip.cli import UsageError, console_script, positive_int

__all__ = ["main"]


def _check_paths(args: argparse.Namespace) -> None:
    """The path arguments a command cannot use, as usage errors naming the argument (exit 2): an `--input` that
    does not exist, an `--images` that is not a folder, an `--output` that is a file or a folder already holding
    something (a dataset is written into a new or empty folder)."""
    input_path = getattr(args, "input", None)
    if input_path is not None and not input_path.exists():
        raise UsageError(f"--input {str(input_path)!r} does not exist")
    images = getattr(args, "images", None)
    if images is not None and not images.is_dir():
        raise UsageError(f"--images {str(images)!r} is not a folder" + ("" if images.exists() else " (it does not exist)"))
    output = args.output
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} is an existing file; give a new or empty folder")
    if output.is_dir() and any(output.iterdir()):
        raise UsageError(f"--output {str(output)!r} is not empty; give a new or empty folder (datasets are not mixed)")
    if output.parent.exists() and not output.parent.is_dir():
        raise UsageError(f"--output {str(output)!r}: {str(output.parent)!r} is a file, not a folder")


def _synth(args: argparse.Namespace) -> dict:
    from .synthetic import write_synthetic_dataset

    return write_synthetic_dataset(args.output, n=args.n, seed=args.seed, image_size=args.image_size,
                                   rows_per_shard=args.rows_per_shard)


def _convert(args: argparse.Namespace) -> dict:
    from .converters import check_options, convert

    options = {name: getattr(args, name) for name in ("split", "modality") if getattr(args, name) is not None}
    if args.frontal_only:
        options["frontal_only"] = True
    check_options(args.format, options)
    stats = convert(args.format, args.input, args.images, args.output, rows_per_shard=args.rows_per_shard,
                    seed=args.seed, **options)
    return {
        "rows": stats.rows_written,
        "rows_skipped": stats.rows_skipped,
        "skip_reasons": dict(stats.skip_reasons),
        "seconds": round(stats.seconds, 2),
        "rows_per_second": round(stats.rows_per_second, 1),
        "output_dir": str(args.output),
    }


def _to_disk(args: argparse.Namespace) -> dict:
    from regionmed_clip.data.schema import export_to_disk

    if not args.input.is_dir():
        raise UsageError(f"--input {str(args.input)!r} is not a folder of canonical parquet shards")
    export_to_disk(args.input, args.output)
    return {"output_dir": str(args.output)}


MIN_IMAGE_SIZE = 64  # the synthetic films' lesions need it (synthetic._generate)


def _image_size(text: str) -> int:
    """argparse type: a synthetic image size, at least `MIN_IMAGE_SIZE` pixels."""
    value = positive_int(text)
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_IMAGE_SIZE} pixels, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .converters import CONVERTERS

    parser = argparse.ArgumentParser(prog="regionmed-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="generate the embedded synthetic chest-film dataset")
    synth.add_argument("--n", type=positive_int, required=True, help="number of images")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=_image_size, default=256, help=f"pixels, at least {MIN_IMAGE_SIZE}")
    synth.add_argument("--output", type=Path, required=True)
    synth.add_argument("--rows-per-shard", type=positive_int, default=1000)
    synth.set_defaults(run=_synth)

    convert = commands.add_parser("convert", help="convert a public dataset's annotations")
    convert.add_argument("--format", required=True, choices=sorted(CONVERTERS))
    convert.add_argument("--input", type=Path, required=True, help="the annotation file (csv / json / txt)")
    convert.add_argument("--images", type=Path, default=None, help="folder holding the images")
    convert.add_argument("--output", type=Path, required=True)
    convert.add_argument("--seed", type=int, default=0, help="seed of the hard-negative rules")
    convert.add_argument("--rows-per-shard", type=positive_int, default=1000)
    convert.add_argument("--split", choices=["train", "validation", "test"], default=None,
                         help="force one split for every row (default: from the source where it has one)")
    convert.add_argument("--modality", default=None, help="modality of every row (coco only; default 'unknown')")
    convert.add_argument("--frontal-only", action="store_true",
                         help="keep frontal views only, the others counted as skipped (chexpert and mimic-cxr only)")
    convert.set_defaults(run=_convert)

    to_disk = commands.add_parser("to-disk", help="export parquet shards as a datasets save_to_disk folder")
    to_disk.add_argument("--input", type=Path, required=True)
    to_disk.add_argument("--output", type=Path, required=True)
    to_disk.set_defaults(run=_to_disk)
    return parser


@console_script("regionmed-data")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    _check_paths(args)
    summary = args.run(args)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
