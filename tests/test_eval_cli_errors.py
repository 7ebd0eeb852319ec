"""`regionmed-eval` on bad input (issue 21): every bad argument or file ends in one error line naming it
(exit 2 for an argument, 1 for a file that cannot be used), never a traceback; unusable rows of a split are
skipped and counted by reason, as training does; a damaged embedding cache is rebuilt."""

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import run_failing
from PIL import Image

from regionmed_clip.data.schema import CANONICAL_FEATURES, load_canonical
from regionmed_clip.evaluation.cli import main

from conftest import build_saved_model

FAST = ["--device", "cpu", "--batch-size", "4", "--resamples", "5", "--no-progress"]


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()[:2000]  # the header whole, the pixel data cut


def _nan_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def _write_bad_split(data_dir: Path, folder: Path) -> dict[str, str]:
    """A test split of 12 rows (the train rows), one damaged in each way, written with pyarrow directly
    (the canonical writer refuses such rows). Returns {damage: image_id}."""
    rows = [dict(row) for row in load_canonical(data_dir, "train", decode_images=False)][:12]
    for row in rows:
        row["split"] = "test"
    with_regions = [index for index in range(4, len(rows)) if rows[index]["regions"]]
    assert len(with_regions) >= 3
    damage = {}
    rows[0]["image"] = {"bytes": _truncated_png(), "path": None}
    rows[1]["image"] = {"bytes": _nan_tiff(), "path": None}
    rows[2]["labels"] = None
    rows[3]["regions"] = None
    null_box, inverted, no_caption = with_regions[:3]
    rows[null_box]["regions"][0] = {**rows[null_box]["regions"][0], "bbox": None}
    x0, y0, x1, y1 = rows[inverted]["regions"][0]["bbox"]
    rows[inverted]["regions"][0] = {**rows[inverted]["regions"][0], "bbox": [x1, y1, x0, y0]}
    rows[no_caption]["regions"][0] = {**rows[no_caption]["regions"][0], "caption": None}
    for name, index in (("truncated", 0), ("nan", 1), ("labels", 2), ("regions", 3), ("null_box", null_box),
                        ("inverted", inverted), ("no_caption", no_caption)):
        damage[name] = rows[index]["image_id"]
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_FEATURES.arrow_schema), folder / "test-00000.parquet")
    return damage


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny saved model, its 4-row test split, a 12-row split with bad rows, and broken variants."""
    tmp = tmp_path_factory.mktemp("eval_errors")
    model_dir, data_dir, _, _ = build_saved_model(tmp, n=40)
    damage = _write_bad_split(data_dir, tmp / "bad")
    no_tokenizer = tmp / "no_tokenizer"
    shutil.copytree(model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    for name, config in (("empty_config", "{}"), ("garbage_config", "{not json")):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(config)
    (tmp / "no_config").mkdir()
    (tmp / "empty_data").mkdir()
    (tmp / "malformed.yaml").write_text("default: [positive: {c}\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "a_file").write_text("x")
    (tmp / "no_results").mkdir()
    (tmp / "corrupt_results").mkdir()
    (tmp / "corrupt_results" / "results.json").write_text('{"task": "zero-shot", ')
    (tmp / "odd_results").mkdir()
    fields = {"task": "zero-shot", "dataset": {"name": "d", "split": "test"}, "n_examples": 1, "metrics": {},
              "headline": {"auroc": 0.5}, "prompts": None, "model": {"path": "m"}, "command": "", "versions": {},
              "date": "", "settings": {}, "figures": []}
    (tmp / "odd_results" / "results.json").write_text(json.dumps(fields))
    return {"tmp": tmp, "model": model_dir, "data": data_dir, "bad": tmp / "bad", "damage": damage}


# -- bad arguments and files: one line naming them -------------------------------------------------------------


def _task(task, **flags):
    """argv of `task` on the good model and data, `flags` (`{"--flag": value}`) replacing or adding options;
    a value may be a function of the inputs, or None to leave the option out."""
    def build(inputs):
        options = {"--model": str(inputs["model"]), "--data": str(inputs["data"]), "--device": "cpu",
                   "--batch-size": "4", "--output": str(inputs["tmp"] / "out" / task)}
        if task != "probe":
            options["--resamples"] = "5"
        options.update(flags)
        argv = [task]
        for flag, value in options.items():
            if value is not None:
                argv += [flag, value(inputs) if callable(value) else value]
        return argv
    return build


def _at(name):
    return lambda inputs: str(inputs["tmp"] / name)


CASES = [
    # numeric arguments (argparse): exit 2 naming the flag
    ("stride-zero", _task("grounding", **{"--stride": "0"}), 2, ["--stride"]),
    ("stride-above-one", _task("grounding", **{"--stride": "1.5"}), 2, ["--stride"]),
    ("iou-above-one", _task("grounding", **{"--iou": "1.5"}), 2, ["--iou"]),
    ("iou-zero", _task("grounding", **{"--iou": "0"}), 2, ["--iou"]),
    ("window-sizes-empty", _task("grounding", **{"--window-sizes": ""}), 2, ["--window-sizes"]),
    ("window-sizes-negative", _task("grounding", **{"--window-sizes": "0.25,-0.1"}), 2, ["--window-sizes"]),
    ("window-sizes-text", _task("grounding", **{"--window-sizes": "big"}), 2, ["--window-sizes"]),
    ("batch-size-zero", _task("zero-shot", **{"--batch-size": "0"}), 2, ["--batch-size"]),
    ("resamples-negative", _task("retrieval", **{"--resamples": "-1"}), 2, ["--resamples"]),
    ("ks-zero", _task("retrieval", **{"--ks": "1,0"}), 2, ["--ks"]),
    ("limit-zero", _task("retrieval", **{"--limit": "0"}), 2, ["--limit"]),
    ("probe-limit-zero", _task("probe", **{"--limit": "0"}), 2, ["--limit"]),
    ("captions-unknown", _task("retrieval", **{"--captions": "findings"}), 2, ["--captions"]),
    ("device-unknown", _task("retrieval", **{"--device": "gpu7"}), 2, ["--device"]),
    # the model folder
    ("model-missing", _task("retrieval", **{"--model": _at("nope")}), 2, ["--model", "nope"]),
    ("model-no-config", _task("retrieval", **{"--model": _at("no_config")}), 2, ["--model", "no_config"]),
    ("model-not-a-model", _task("retrieval", **{"--model": _at("empty_config")}), 2, ["--model", "model_type"]),
    ("model-config-not-json", _task("retrieval", **{"--model": _at("garbage_config")}), 1, ["--model", "config.json"]),
    ("model-without-tokenizer", _task("retrieval", **{"--model": _at("no_tokenizer")}), 1,
     ["--model", "no_tokenizer", "tokenizer"]),
    ("probe-baseline-missing", _task("probe", **{"--baseline": _at("nope")}), 2, ["--baseline"]),
    # the data and split
    ("data-missing", _task("retrieval", **{"--data": _at("nope")}), 2, ["--data", "nope"]),
    ("data-without-shards", _task("retrieval", **{"--data": _at("empty_data")}), 2, ["--data", "empty_data"]),
    ("split-missing", _task("region", **{"--split": "holdout"}), 2, ["--split", "holdout"]),
    ("classes-not-in-data", _task("zero-shot", **{"--classes": "Nodule,dragon"}), 2, ["--classes", "dragon"]),
    ("region-classes-not-in-data", _task("region", **{"--classes": "dragon"}), 2, ["--classes", "dragon"]),
    ("probe-classes-not-in-data", _task("probe", **{"--classes": "dragon"}), 2, ["--classes", "dragon"]),
    # prompt templates
    ("prompts-missing", _task("zero-shot", **{"--prompts": _at("nope.yaml")}), 2, ["--prompts", "nope.yaml"]),
    ("prompts-malformed", _task("zero-shot", **{"--prompts": _at("malformed.yaml")}), 1, ["--prompts", "malformed.yaml"]),
    ("prompts-a-list", _task("region", **{"--prompts": _at("list.yaml")}), 1, ["--prompts", "list.yaml"]),
    # outputs
    ("output-is-a-file", _task("retrieval", **{"--output": _at("a_file")}), 2, ["--output", "a_file"]),
    ("probe-output-is-a-folder", _task("probe", **{"--output": _at("no_results")}), 2, ["--output"]),
    ("probe-output-under-a-file", _task("probe", **{"--output": lambda i: str(i["tmp"] / "a_file" / "r.json")}), 2,
     ["--output", "a_file"]),
    # report
    ("report-no-results", lambda i: ["report", str(i["tmp"] / "no_results")], 2, ["results.json", "no_results"]),
    ("report-missing-path", lambda i: ["report", str(i["tmp"] / "nope")], 2, ["nope"]),
    ("report-corrupt-results", lambda i: ["report", str(i["tmp"] / "corrupt_results")], 1,
     ["corrupt_results", "not valid JSON"]),
    ("report-malformed-results", lambda i: ["report", str(i["tmp"] / "odd_results")], 1, ["odd_results", "headline"]),
    ("report-output-a-folder", lambda i: ["report", str(i["tmp"] / "odd_results"), "--output", str(i["tmp"])], 2,
     ["--output"]),
]


@pytest.mark.parametrize(("argv", "rc", "names"), [pytest.param(argv, rc, names, id=name)
                                                   for name, argv, rc, names in CASES])
def test_bad_input_ends_in_one_line_naming_it(inputs, capsys, argv, rc, names):
    run_failing(main, argv(inputs), capsys, rc, *names)


# -- unusable rows: skipped and counted, the figures say over how many rows -----------------------------------

IMAGE_SKIPS = {"row: image does not decode (OSError)": 1, "row: image rejected by the processor (ValueError)": 1}
EXPECTED_SKIPS = {
    # task flags, reasons: what each task reads decides what makes a row (or a region) unusable
    "retrieval": ([], IMAGE_SKIPS),
    "zero-shot": (["--regions"], {**IMAGE_SKIPS, "row: labels is missing or null, not a list": 1,
                                  "row: regions is missing or null, not a list": 1,
                                  "region: bbox missing or null": 1, "region: box inverted or of zero area": 1}),
    "region": ([], {**IMAGE_SKIPS, "row: regions is missing or null, not a list": 1,
                    "region: bbox missing or null": 1, "region: box inverted or of zero area": 1}),
    "grounding": (["--window-sizes", "0.5"], {**IMAGE_SKIPS, "row: regions is missing or null, not a list": 1,
                                              "region: bbox missing or null": 1,
                                              "region: box inverted or of zero area": 1,
                                              "region: region caption is missing or null": 1}),
}


@pytest.mark.parametrize("task", list(EXPECTED_SKIPS))
def test_each_task_skips_and_counts_unusable_rows(inputs, capsys, task):
    flags, reasons = EXPECTED_SKIPS[task]
    output = inputs["tmp"] / "skips" / task
    rc = main([task, "--model", str(inputs["model"]), "--data", str(inputs["bad"]), "--output", str(output),
               *FAST, *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    record = json.loads((output / "results.json").read_text())
    rows = record["rows"]
    skipped = sum(count for reason, count in reasons.items() if reason.startswith("row:"))
    assert rows["reasons"] == reasons
    assert (rows["rows_seen"], rows["rows_skipped"], rows["rows_used"]) == (12, skipped, 12 - skipped)
    assert rows["regions_skipped"] == len(reasons) - skipped
    damage = inputs["damage"]
    assert rows["examples"]["row: image does not decode (OSError)"] == [damage["truncated"]]
    assert f"over {12 - skipped} of 12 rows; {skipped} skipped" in captured.out
    assert "region: bbox missing or null x1" in captured.out or "region" not in str(reasons)
    if task in ("zero-shot", "retrieval"):
        assert record["n_examples"] == 12 - skipped
    # the merged report says so too
    assert main(["report", str(output)]) == 0
    assert f"over {12 - skipped} of 12 rows" in capsys.readouterr().out


def test_probe_skips_and_counts_unusable_rows(inputs, capsys):
    output = inputs["tmp"] / "skips" / "probe.json"
    rc = main(["probe", "--model", str(inputs["model"]), "--data", str(inputs["bad"]), "--output", str(output),
               "--device", "cpu", "--batch-size", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    rows = json.loads(output.read_text())["metadata"]["rows"]
    assert rows["reasons"] == EXPECTED_SKIPS["grounding"][1] | {"row: labels is missing or null, not a list": 1}
    assert rows["rows_used"] == 8 and "rows: over 8 of 12 rows; 4 skipped" in captured.out


# -- a damaged embedding cache is rebuilt ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "byte-flipped"])
def test_a_damaged_embedding_cache_is_rebuilt_with_a_warning(inputs, capsys, caplog, damage):
    output = inputs["tmp"] / "cache" / damage
    argv = ["retrieval", "--model", str(inputs["model"]), "--data", str(inputs["data"]), "--output", str(output), *FAST]
    assert main(argv) == 0
    first = json.loads((output / "results.json").read_text())["metrics"]
    cached = output / "embeddings" / "images.safetensors"
    data = bytearray(cached.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0xFF  # a tensor byte: the file still parses, its checksum does not match
    cached.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="regionmed_clip.evaluation.embeddings"):
        assert main(argv) == 0, capsys.readouterr().err[-3000:]
    assert any("images.safetensors" in message and "damaged" in message for message in caplog.messages), caplog.text
    assert json.loads((output / "results.json").read_text())["metrics"] == first
    assert main(argv) == 0  # rebuilt: read back without a warning
