"""`regionmed-convert`: a public CLIP-style checkpoint -> a RegionMed-CLIP folder that `AutoModel` /
`AutoProcessor` load with `trust_remote_code=True`.

    regionmed-convert --from biomedclip BIOMEDCLIP_DIR OUT [--tokenizer DIR]   # open_clip folder (BiomedCLIP)
    regionmed-convert --from clip CLIP_DIR OUT                                 # a transformers CLIPModel folder
    regionmed-convert --from vit-bert VIT_DIR OUT --text-source BERT_DIR       # a ViT / CLIP-vision and a BERT

The converted model starts equal to the source (docs/PRETRAINED.md says how with the box-free design); its
region modules start closed and open in training (`regionmed-train` with `model: {pretrained: OUT}`).
`OUT/conversion.json` lists the source and every source weight dropped, with why; a source weight the
converter cannot place is an error naming it.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from regionmed_clip.cli import UsageError, console_script, folder

from .conversion import Conversion, save_conversion
from .tower_conversion import convert_vit_bert

__all__ = ["CONVERTERS", "main"]


def _biomedclip(source: Path, tokenizer: Path | None, text_source: Path | None) -> Conversion:
    from .convert_biomedclip import convert_biomedclip

    return convert_biomedclip(source, tokenizer=tokenizer)


def _clip(source: Path, tokenizer: Path | None, text_source: Path | None) -> Conversion:
    from .convert_clip import convert_clip

    return convert_clip(source, tokenizer=tokenizer)


def _vit_bert(source: Path, tokenizer: Path | None, text_source: Path | None) -> Conversion:
    if text_source is None:
        raise UsageError("--from vit-bert needs --text-source BERT_DIR (the text tower's checkpoint folder)")
    return convert_vit_bert(source, text_source, tokenizer=tokenizer)


# --from name -> converter(source_dir, tokenizer_dir, text_source_dir)
CONVERTERS: dict[str, Callable[[Path, Path | None, Path | None], Conversion]] = {
    "biomedclip": _biomedclip, "clip": _clip, "vit-bert": _vit_bert}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionmed-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source_kind", choices=sorted(CONVERTERS), required=True,
                        help="the source checkpoint's kind")
    parser.add_argument("source", type=folder, help="the source checkpoint folder")
    parser.add_argument("output", type=Path, help="the RegionMed-CLIP folder to write (new or empty)")
    parser.add_argument("--tokenizer", type=folder, default=None,
                        help="tokenizer files (vocab.txt, tokenizer.json, ...) when the source folder holds none")
    parser.add_argument("--text-source", type=folder, default=None, help="--from vit-bert: the BERT folder")
    return parser


@console_script("regionmed-convert")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise UsageError(f"output {str(args.output)!r} exists and is not an empty folder")
    conversion = CONVERTERS[args.source_kind](args.source, args.tokenizer, args.text_source)
    report = save_conversion(conversion, args.output, args.source)
    print(json.dumps({"output": str(args.output), **report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
