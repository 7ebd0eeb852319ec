"""`regionmed-data` on bad input (issue 21): every case ends in one error line that names the argument, file, entry
or line, with exit code 2 for a bad command-line argument and 1 for bad input, never a traceback or an internal
error. Each case builds its input under tmp_path and returns the command line; `run_failing` runs `main` in process.
"""

import gzip
import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_failing
from converter_helpers import FIXTURES

from regionmed_clip.data.cli import main

USAGE, INPUT = 2, 1
MIMIC = FIXTURES / "mimic_cxr"
COCO_IMAGE = {"id": 1, "file_name": "a.png", "width": 40, "height": 30}


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _convert(fmt: str, input_path: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--format", fmt, "--input", str(input_path), "--output", str(out), *extra]


def _coco(tmp: Path, document: dict) -> list[str]:
    return _convert("coco", _write(tmp / "bad.json", json.dumps(document)), tmp / "out")


def _mimic_gz(tmp: Path, cut: bool) -> list[str]:
    """The MIMIC-CXR fixture with its label file gzipped (as PhysioNet ships it) and cut short / not gzip at all."""
    for name in ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-split.csv"):
        shutil.copy(MIMIC / name, tmp / name)
    data = gzip.compress((MIMIC / "mimic-cxr-2.0.0-chexpert.csv").read_bytes() * 50)
    labels = _write(tmp / "mimic-cxr-2.0.0-chexpert.csv.gz", data[: len(data) // 2] if cut else b"not gzip at all\n")
    return _convert("mimic-cxr", labels, tmp / "out")


def _mimic_without_metadata(tmp: Path) -> list[str]:
    return _convert("mimic-cxr", shutil.copy(MIMIC / "mimic-cxr-2.0.0-chexpert.csv", tmp), tmp / "out")


def _output_is_a_file(tmp: Path, command: str) -> list[str]:
    out = _write(tmp / "out.txt", "a file")
    if command == "synth":
        return ["synth", "--n", "2", "--output", str(out)]
    if command == "to-disk":
        return ["to-disk", "--input", str(tmp), "--output", str(out)]
    return _convert("coco", _write(tmp / "a.json", json.dumps({"images": [COCO_IMAGE]})), out)


def _output_not_empty(tmp: Path) -> list[str]:
    _write(tmp / "out" / "train-00000.parquet", b"an earlier dataset")
    return ["synth", "--n", "2", "--output", str(tmp / "out")]


def _vindr(tmp: Path, content: str) -> list[str]:
    return _convert("vindr-cxr", _write(tmp / "train.csv", content), tmp / "out")


CASES = {
    # item 1: COCO entries of the wrong kind
    "coco image entry is a string": (
        lambda tmp: _coco(tmp, {"images": ["a.png"], "annotations": [], "categories": []}),
        INPUT, ["bad.json", "images[0]"]),
    "coco category without id": (
        lambda tmp: _coco(tmp, {"images": [COCO_IMAGE], "categories": [{"id": 1, "name": "a"}, {"name": "nodule"}]}),
        INPUT, ["bad.json", "categories[1]", "'id'"]),
    "coco annotations not a list": (
        lambda tmp: _coco(tmp, {"images": [COCO_IMAGE], "annotations": {"id": 1}}), INPUT, ["bad.json", "annotations"]),
    # item 2: a gzip CSV cut short, or not gzip
    "csv.gz cut short": (lambda tmp: _mimic_gz(tmp, cut=True), INPUT, ["mimic-cxr-2.0.0-chexpert.csv.gz", "gzip"]),
    "csv.gz not gzip": (lambda tmp: _mimic_gz(tmp, cut=False), INPUT, ["mimic-cxr-2.0.0-chexpert.csv.gz", "gzip"]),
    # item 3: --output an existing file, or a folder holding something
    "synth --output a file": (lambda tmp: _output_is_a_file(tmp, "synth"), USAGE, ["--output", "out.txt"]),
    "convert --output a file": (lambda tmp: _output_is_a_file(tmp, "convert"), USAGE, ["--output", "out.txt"]),
    "to-disk --output a file": (lambda tmp: _output_is_a_file(tmp, "to-disk"), USAGE, ["--output", "out.txt"]),
    "--output not empty": (_output_not_empty, USAGE, ["--output", "not empty"]),
    # item 8: the rest of the sweep
    "synth --n 0": (lambda tmp: ["synth", "--n", "0", "--output", str(tmp / "out")], USAGE, ["--n", "positive"]),
    "synth --n negative": (lambda tmp: ["synth", "--n", "-3", "--output", str(tmp / "out")], USAGE, ["--n"]),
    "synth --n not a number": (lambda tmp: ["synth", "--n", "many", "--output", str(tmp / "out")], USAGE, ["--n"]),
    "synth --image-size too small": (
        lambda tmp: ["synth", "--n", "2", "--image-size", "16", "--output", str(tmp / "out")], USAGE,
        ["--image-size", "64"]),
    "synth --rows-per-shard 0": (
        lambda tmp: ["synth", "--n", "2", "--rows-per-shard", "0", "--output", str(tmp / "out")], USAGE,
        ["--rows-per-shard"]),
    "convert --rows-per-shard 0": (
        lambda tmp: _convert("coco", tmp, tmp / "out", "--rows-per-shard", "0"), USAGE, ["--rows-per-shard"]),
    "--input missing": (lambda tmp: _convert("coco", tmp / "missing.json", tmp / "out"), USAGE,
                        ["--input", "missing.json", "does not exist"]),
    "--images missing": (
        lambda tmp: _convert("coco", _write(tmp / "a.json", "{}"), tmp / "out", "--images", str(tmp / "nope")),
        USAGE, ["--images", "nope"]),
    "--images a file": (
        lambda tmp: _convert("coco", _write(tmp / "a.json", "{}"), tmp / "out", "--images", str(tmp / "a.json")),
        USAGE, ["--images", "a.json", "not a folder"]),
    "an option the format does not take (forwarded)": (
        lambda tmp: _convert("roco", _write(tmp / "captions.txt", "ROCO_1\tA CT.\n"), tmp / "out", "--modality", "ct"),
        USAGE, ["roco", "modality"]),
    "--frontal-only with vqa-rad": (
        lambda tmp: _convert("vqa-rad", _write(tmp / "q.json", "[]"), tmp / "out", "--frontal-only"),
        USAGE, ["vqa-rad", "frontal_only"]),
    "empty CSV": (lambda tmp: _vindr(tmp, ""), INPUT, ["train.csv", "empty"]),
    "CSV of another format": (lambda tmp: _vindr(tmp, "a,b\n1,2\n"), INPUT, ["train.csv", "lacks the columns"]),
    "a folder where a CSV is expected": (
        lambda tmp: _convert("vindr-cxr", (tmp / "folder").mkdir() or tmp / "folder", tmp / "out"), INPUT,
        ["folder", "is a folder"]),
    "a folder where a JSON file is expected": (
        lambda tmp: _convert("coco", (tmp / "folder").mkdir() or tmp / "folder", tmp / "out"), INPUT, ["folder"]),
    "empty JSON": (lambda tmp: _convert("coco", _write(tmp / "a.json", ""), tmp / "out"), INPUT,
                   ["a.json", "not valid JSON"]),
    "SLAKE question not an object": (
        lambda tmp: _convert("slake", _write(tmp / "train.json", '["what?"]'), tmp / "out"), INPUT,
        ["train.json", "[0]"]),
    "VQA-RAD not a list": (lambda tmp: _convert("vqa-rad", _write(tmp / "q.json", "{}"), tmp / "out"), INPUT,
                           ["q.json"]),
    "ROCO captions not UTF-8": (
        lambda tmp: _convert("roco", _write(tmp / "captions.txt", b"ROCO_1\tA CT.\nROCO_2\t\xff\n"), tmp / "out"),
        INPUT, ["captions.txt", "line 2", "UTF-8"]),
    "MIMIC-CXR without its metadata": (_mimic_without_metadata, INPUT, ["mimic-cxr-2.0.0-metadata.csv"]),
    "no row converted": (lambda tmp: _vindr(tmp, (FIXTURES / "vindr_cxr/train.csv").read_text()), INPUT,
                         ["no row could be converted", "missing image"]),
    "to-disk --input without shards": (
        lambda tmp: ["to-disk", "--input", str(tmp), "--output", str(tmp / "arrow")], INPUT, ["no canonical parquet"]),
    "to-disk --input a file": (
        lambda tmp: ["to-disk", "--input", str(_write(tmp / "a.parquet", "x")), "--output", str(tmp / "arrow")],
        USAGE, ["--input", "a.parquet"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_error_line(case, tmp_path, capsys):
    build, expected_rc, names = CASES[case]
    argv = build(tmp_path)
    run_failing(main, argv, capsys, expected_rc, *names)
