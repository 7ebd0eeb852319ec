"""The console scripts' one error boundary (`regionmed_clip.cli.console_script`), and the fine-tune's and the
demo's bad-input cases through it."""

import argparse
import re

import pytest
import yaml
from cli_helpers import run_failing

from regionmed_clip.cli import (
    DEBUG_ENV,
    UsageError,
    console_script,
    folder,
    fraction,
    model_folder,
    output_folder,
    positive_int,
)


class StoppedByData(RuntimeError):
    exit_code = 3


def command(error: BaseException | None):
    @console_script("regionmed-test")
    def main(argv: list[str] | None = None) -> int:
        if error is not None:
            raise error
        return 0 if argv == [] else len(argv)

    return main


@pytest.mark.parametrize(("error", "rc", "line"), [
    (UsageError("--rank must be positive"), 2, "regionmed-test: error: --rank must be positive"),
    (ValueError("rows.csv line 3: no image"), 1, "regionmed-test: error: rows.csv line 3: no image"),
    (FileNotFoundError("no tokenizer in 'DIR'"), 1, "regionmed-test: error: no tokenizer in 'DIR'"),
    (StoppedByData("skipped 40%\nmore than 5%"), 3, "regionmed-test: error: skipped 40% | more than 5%"),
    (KeyError("data"), 1, "regionmed-test: internal error: KeyError: missing key 'data' (a bug; rerun with --debug"),
])
def test_an_error_is_one_line_with_its_exit_code(capsys, error, rc, line):
    assert command(error)([]) == rc
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [captured.err.strip()]  # one line
    assert captured.err.startswith(line) and "Traceback" not in captured.err


def test_debug_lets_the_traceback_through_and_is_not_passed_on(monkeypatch):
    assert command(None)(["--debug"]) == 0  # the command never saw --debug
    with pytest.raises(ValueError, match="bad"):
        command(ValueError("bad"))(["x", "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        command(KeyError("data"))([])
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert command(KeyError("data"))([]) == 1


def test_interrupt_exits_130(capsys):
    assert command(KeyboardInterrupt())([]) == 130
    assert capsys.readouterr().err.strip() == "regionmed-test: interrupted"


@pytest.mark.parametrize(("parse", "text", "value"), [(positive_int, "3", 3), (fraction, "0.05", 0.05),
                                                      (fraction, "0", 0.0)])
def test_argument_types_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize(("parse", "text", "message"), [
    (positive_int, "0", "must be a positive integer, got '0'"), (positive_int, "2.5", "must be an integer"),
    (fraction, "1.5", r"must be in \[0, 1\), got '1.5'"), (fraction, "high", "must be a number"),
])
def test_argument_types_refuse_naming_the_value(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


def test_path_types(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "a-file").write_text("x")
    assert folder(str(tmp_path)) == tmp_path and model_folder(str(tmp_path / "model")) == tmp_path / "model"
    assert output_folder(str(tmp_path / "new")) == tmp_path / "new" and output_folder(str(tmp_path)) == tmp_path
    for parse, text, message in [(folder, "none", "is not a folder (it does not exist)"),
                                 (folder, "a-file", "is not a folder"),
                                 (model_folder, ".", "is not a saved model folder (it has no config.json)"),
                                 (output_folder, "a-file", "is a file, not a folder")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(str(tmp_path / text))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from conftest import build_saved_model

    model_dir, data_dir, _, _ = build_saved_model(tmp_path_factory.mktemp("finetune"), n=20)
    return model_dir, data_dir


def _finetune_case(tmp_path, saved_model, extra, yaml_text=None):
    model_dir, data_dir = saved_model
    argv = ["--model", str(model_dir), "--data", str(data_dir), "--output-dir", str(tmp_path / "out")]
    if yaml_text is not None:
        (tmp_path / "run.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "run.yaml")]
    return argv + extra


@pytest.mark.parametrize(("extra", "yaml_text", "names"), [
    (["--rank", "0"], None, ["--rank", "positive integer"]),
    (["--max-steps", "0"], None, ["--max-steps"]),
    (["--batch-size", "0"], None, ["--batch-size"]),
    (["--dropout", "1.5"], None, ["--dropout", "[0, 1)"]),
    (["--alpha", "-2"], None, ["--alpha"]),
    (["--towers", "vision,audio"], None, ["--towers", "audio"]),
    (["--modules-to-save", "heads"], None, ["--modules-to-save", "heads"]),
    (["--schedule", "paper"], None, ["--schedule", "progressive"]),
    ([], yaml.safe_dump(["training_args"]), ["run.yaml", "must be a mapping", "got a list"]),
    ([], yaml.safe_dump({"training_args": {"learning_rat": 1}}), ["run.yaml", "unknown training_args ['learning_rat']"]),
    ([], yaml.safe_dump({"schedule": "paper"}), ["run.yaml", "unknown schedule 'paper'"]),
    ([], yaml.safe_dump({"schedule": ["joint"]}), ["run.yaml", "schedule[0]: a stage must be a mapping"]),
    ([], "training_args: {a: [1\n", ["run.yaml", "is not valid YAML"]),
])
def test_finetune_bad_input_is_one_usage_error(tmp_path, capsys, saved_model, extra, yaml_text, names):
    from regionmed_clip.training_scripts.finetune_lora import main

    run_failing(main, _finetune_case(tmp_path, saved_model, extra, yaml_text), capsys, 2, *names)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_finetune_paths_that_are_not_what_they_should_be(tmp_path, capsys, saved_model):
    from regionmed_clip.training_scripts.finetune_lora import main

    model_dir, data_dir = saved_model
    (tmp_path / "a-file").write_text("x")
    cases = {
        "--model": ["--model", str(tmp_path), "--data", str(data_dir), "--output-dir", str(tmp_path / "o")],
        "--data": ["--model", str(model_dir), "--data", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")],
        "--output-dir": ["--model", str(model_dir), "--data", str(data_dir), "--output-dir", str(tmp_path / "a-file")],
    }
    for flag, argv in cases.items():
        run_failing(main, argv, capsys, 2, flag)
    (tmp_path / "earlier" / "adapter").mkdir(parents=True)
    run_failing(main, ["--model", str(model_dir), "--data", str(data_dir), "--output-dir", str(tmp_path / "earlier")],
                capsys, 2, "--output-dir", "holds an earlier fine-tune (adapter)")


@pytest.mark.parametrize("argv", [["--n", "0"], ["--max-steps", "-1"]])
def test_demo_bad_counts_are_usage_errors(tmp_path, capsys, argv):
    from regionmed_clip.apps.demo import main

    run_failing(main, ["--output-dir", str(tmp_path / "demo"), *argv], capsys, 2, argv[0])
    assert not (tmp_path / "demo").exists()
