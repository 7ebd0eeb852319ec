"""Bad input to `regionmed-export`, `regionmed-push` and `regionmed-train-vqa` (issue 21): each ends on one
error line naming the argument or file, exit 2 for an argument and 1 for a bad file, never a traceback,
and a failed export leaves no folder behind."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
import yaml
from cli_helpers import run_failing
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from test_export import make_run_folder, results_file, run_config

import regionmed_clip.apps.export as export
import regionmed_clip.apps.push as push
import regionmed_clip.training_scripts.vqa as vqa
from regionmed_clip.apps.export import export_model
from regionmed_clip.apps.push import HubUploadError, push_folder


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """A run folder (test_export's), its export `hub/`, and a results file."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    made = make_run_folder(tmp)
    export_model(made["model_dir"], tmp / "hub", [results_file(tmp / "zs", "zero-shot", "chexpert", 0.71)])
    return {**made, "tmp": tmp, "hub": tmp / "hub", "results": tmp / "zs" / "results.json"}


# --- regionmed-export ---------------------------------------------------------------------------------------------
# Each case: (made, tmp_path) -> (argv, expected exit code, names the error line must hold).

def _export(made: dict, tmp: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["--model", str(model or made["model_dir"]), "--output", str(tmp / "out"), *extra]


def _results_with(tmp: Path, made: dict, change: Callable[[dict], object]) -> Path:
    record = json.loads(made["results"].read_text())
    change(record)
    path = tmp / "res" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(record))
    return path


def _run_with_config(tmp: Path, made: dict, text: str) -> Path:
    run = tmp / "run"
    shutil.copytree(made["model_dir"], run / "final")
    (run / "run_config.yaml").write_text(text)
    return run / "final"


def _model_without(tmp: Path, made: dict, *names: str, **texts: str) -> Path:
    """A copy of the run's model folder without the files `names`, and with `texts` ({stem: text}) written."""
    folder = tmp / "model"
    shutil.copytree(made["model_dir"], folder)
    for name in names:
        (folder / name).unlink()
    for stem, text in texts.items():
        (folder / f"{stem}.json").write_text(text)
    return folder


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _model_folder_cases(command) -> dict:
    """The bad `--model` folders every command that loads a saved model refuses, for `command(made, tmp, model=...)`."""
    return {
        "model-missing": lambda m, t: (command(m, t, model=t / "nowhere"), 2, ["--model", "not a folder"]),
        "model-not-a-model-folder": lambda m, t: (command(m, t, model=t), 2, ["--model", "config.json"]),
        "model-without-weights": lambda m, t: (command(m, t, model=_model_without(t, m, "model.safetensors")), 1,
                                               ["--model", "does not load"]),
        "model-without-tokenizer": lambda m, t: (command(m, t, model=_model_without(
            t, m, "tokenizer.json", "tokenizer_config.json")), 1, ["--model", "processor"]),
    }


EXPORT_CASES = {
    "unknown-task": lambda m, t: (_export(m, t, "--eval-results", str(_results_with(
        t, m, lambda r: r.update(task="no-such-task")).parent)), 1, ["results.json", "'no-such-task'", "zero-shot"]),
    "results-dataset-not-a-mapping": lambda m, t: (_export(m, t, "--eval-results", str(_results_with(
        t, m, lambda r: r.update(dataset="chexpert")))), 1, ["results.json", "dataset"]),
    "results-headline-not-numbers": lambda m, t: (_export(m, t, "--eval-results", str(_results_with(
        t, m, lambda r: r.update(headline={"auroc": "high"})))), 1, ["results.json", "headline"]),
    "results-folder-without-results-json": lambda m, t: (_export(m, t, "--eval-results", str(t)), 1,
                                                         [str(t / "results.json")]),
    "results-json-corrupt": lambda m, t: (_export(m, t, "--eval-results", str(_file(t / "r.json", "{nope"))), 1,
                                          ["r.json", "not valid JSON"]),
    "results-json-a-list": lambda m, t: (_export(m, t, "--eval-results", str(_file(t / "r.json", "[]"))), 1,
                                         ["r.json", "not a regionmed-eval results file"]),
    **_model_folder_cases(_export),
    "model-config-corrupt": lambda m, t: (_export(m, t, model=_model_without(t, m, config="{")), 1,
                                          ["--model", "config.json"]),
    "output-a-file": lambda m, t: (["--model", str(m["model_dir"]), "--output", str(_file(t / "out", "x"))], 2,
                                   ["--output", "existing file"]),
    "output-not-empty": lambda m, t: (["--model", str(m["model_dir"]), "--output", str(m["hub"])], 2,
                                      ["--output", "not empty"]),
    "repo-id-invalid": lambda m, t: (_export(m, t, "--repo-id", "org/bad name"), 2, ["--repo-id", "'org/bad name'"]),
    "repo-id-no-org": lambda m, t: (_export(m, t, "--repo-id", "a/b/c"), 2, ["--repo-id"]),
    "benchmarks-missing": lambda m, t: (_export(m, t, "--benchmarks", str(t / "b.yaml")), 1,
                                        ["--benchmarks", "b.yaml", "no such file"]),
    "benchmarks-malformed-yaml": lambda m, t: (_export(m, t, "--benchmarks", str(_file(t / "b.yaml", "- [task: {"))),
                                               1, ["--benchmarks", "b.yaml", "not valid YAML", "line"]),
    "benchmarks-not-a-list": lambda m, t: (_export(m, t, "--benchmarks", str(_file(t / "b.yaml", "task: vqa"))), 1,
                                           ["--benchmarks", "b.yaml", "YAML list"]),
    "benchmarks-item-lacks-fields": lambda m, t: (_export(m, t, "--benchmarks", str(_file(
        t / "b.yaml", "- {task: vqa}"))), 1, ["--benchmarks", "item 0", "hub_dataset_id"]),
    "benchmarks-unknown-task": lambda m, t: (_export(m, t, "--benchmarks", str(_file(t / "b.yaml", yaml.safe_dump(
        [{"task": "nope", "dataset": "d", "hub_dataset_id": "o/d", "hub_task_id": "t"}])))), 1,
        ["--benchmarks", "'nope'", "zero-shot"]),
    "run-config-malformed-yaml": lambda m, t: (_export(m, t, model=_run_with_config(t, m, "data: [path: {")), 1,
                                               ["run_config.yaml", "not valid YAML"]),
    "run-config-not-a-mapping": lambda m, t: (_export(m, t, model=_run_with_config(t, m, "- 1\n")), 1,
                                              ["run_config.yaml", "mapping"]),
    "provenance-not-json": lambda m, t: (_export(m, t, model=_run_with_config(t, m, yaml.safe_dump(run_config(
        _data_with(t, m, lambda d: _file(d / "provenance.json", "{")))))), 1, ["provenance.json", "not valid JSON"]),
    "training-shard-corrupt": lambda m, t: (_export(m, t, model=_run_with_config(t, m, yaml.safe_dump(run_config(
        _data_with(t, m, lambda d: _file(min(d.glob("train-*.parquet")), "not parquet")))))), 1,
        ["train-", ".parquet", "not a readable parquet file"]),
    "run-config-bad-schedule": lambda m, t: (_export(m, t, model=_run_with_config(t, m, yaml.safe_dump(
        {**run_config(m["data_dir"]), "schedule": [{"name": "joint"}]}))), 1, ["run_config.yaml", "schedule[0] ('joint')"]),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_bad_input_is_one_line(case, made, tmp_path, capsys):
    argv, rc, names = EXPORT_CASES[case](made, tmp_path)
    run_failing(export.main, argv, capsys, rc, *names)
    assert not (tmp_path / "out").is_dir()  # nothing written
    assert not list(tmp_path.glob(".out.partial-*"))


def test_run_config_without_data_section_exports_with_a_warning(made, tmp_path, capsys):
    """No `data` in run_config.yaml: the export proceeds, warns, and the card claims no training data."""
    config = {key: value for key, value in run_config(made["data_dir"]).items() if key != "data"}
    model_dir = _run_with_config(tmp_path, made, yaml.safe_dump(config))
    assert export.main(["--model", str(model_dir), "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "run_config.yaml" in err and "'data'" in err
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "has no `data.path`" in card.text and "Preset `tiny`, 12 steps of batch 8" in card.text
    assert "synth" not in card.text and "No real patient data" not in card.text


def test_run_config_naming_absent_data_claims_no_provenance(made, tmp_path, capsys):
    """A dataset folder that is not on this machine is named, never described (no 'written before provenance')."""
    config = {**run_config(made["data_dir"]), "data": {"path": str(tmp_path / "gone" / "chest"), "split": "train"}}
    model_dir = _run_with_config(tmp_path, made, yaml.safe_dump(config))
    assert export.main(["--model", str(model_dir), "--output", str(tmp_path / "out")]) == 0
    assert "not on this machine" in capsys.readouterr().err
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "`chest`" in text and "not available at export" in text and "provenance.json" not in text


@pytest.mark.parametrize("step", ["eval_result_entries", "save_card"])
def test_export_failing_midway_leaves_no_folder(step, made, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if step == "save_card":
        monkeypatch.setattr(ModelCard, "save", fail)
    else:
        monkeypatch.setattr(export, step, fail)
    output = tmp_path / "nested" / "hub"
    run_failing(export.main, ["--model", str(made["model_dir"]), "--output", str(output),
                              "--eval-results", str(made["results"])], capsys, 1, "No space left on device")
    assert not output.exists() and list(output.parent.iterdir()) == []  # no folder, no staging left over


def test_export_into_an_empty_existing_folder(made, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert export.main(["--model", str(made["model_dir"]), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not list(tmp_path.glob(".out.partial-*"))


# --- regionmed-push -----------------------------------------------------------------------------------------------

def _hub_copy(made: dict, tmp: Path, change: Callable[[Path], object]) -> str:
    folder = tmp / "hub"
    shutil.copytree(made["hub"], folder)
    change(folder)
    return str(folder)


PUSH_FOLDER_CASES = {
    "folder-missing": (lambda m, t: str(t / "nowhere"), 2, ["folder", "nowhere"]),
    "folder-a-file": (lambda m, t: str(_file(t / "f", "x")), 2, ["folder", "is not a folder"]),
    "no-weights": (lambda m, t: _hub_copy(m, t, lambda f: (f / "model.safetensors").unlink()), 1,
                   ["hub", ".safetensors"]),
    "no-config": (lambda m, t: _hub_copy(m, t, lambda f: (f / "config.json").unlink()), 1, ["hub/config.json"]),
    "config-not-json": (lambda m, t: _hub_copy(m, t, lambda f: _file(f / "config.json", "{")), 1,
                        ["config.json", "not valid JSON"]),
    "config-a-list": (lambda m, t: _hub_copy(m, t, lambda f: _file(f / "config.json", "[]")), 1,
                      ["config.json", "auto_map"]),
    "auto-map-not-a-mapping": (lambda m, t: _hub_copy(m, t, lambda f: _file(f / "config.json", '{"auto_map": 3}')),
                               1, ["config.json", "auto_map"]),
    "no-card": (lambda m, t: _hub_copy(m, t, lambda f: (f / "README.md").unlink()), 1, ["README.md", "missing"]),
    "card-metadata-not-yaml": (lambda m, t: _hub_copy(m, t, lambda f: _file(f / "README.md", "---\nlicense: [\n---\n")),
                               1, ["README.md", "does not parse"]),
    "card-model-index-broken": (lambda m, t: _hub_copy(m, t, lambda f: _file(
        f / "README.md", "---\nlicense: mit\nmodel-index: 3\n---\n")), 1, ["README.md", "does not parse"]),
    "pickle": (lambda m, t: _hub_copy(m, t, lambda f: _file(f / "optimizer.pt", "x")), 1, ["optimizer.pt"]),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "upload"])
@pytest.mark.parametrize("case", sorted(PUSH_FOLDER_CASES))
def test_push_bad_folder_is_one_line(case, dry_run, made, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(push, "HfApi", _no_network)
    folder, rc, names = PUSH_FOLDER_CASES[case]
    run_failing(push.main, [folder(made, tmp_path), "--repo-id", "org/model", *(["--dry-run"] if dry_run else [])],
                capsys, rc, *names)


@pytest.mark.parametrize("repo_id", ["just-a-name", "a/b/c", "org/bad name", "org/-x", "/x"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "upload"])
def test_push_invalid_repo_id_is_a_usage_error(repo_id, dry_run, made, capsys, monkeypatch):
    monkeypatch.setattr(push, "HfApi", _no_network)
    run_failing(push.main, [str(made["hub"]), "--repo-id", repo_id, *(["--dry-run"] if dry_run else [])], capsys, 2,
                "--repo-id", repr(repo_id))


def _no_network(*args, **kwargs):
    raise AssertionError("no Hub client may be made for this input")


def test_push_offline_without_token_says_so(made, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(push, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    line = run_failing(push.main, [str(made["hub"]), "--repo-id", "org/model"], capsys, 1,
                       "offline (HF_HUB_OFFLINE=1)", "--dry-run")
    assert line == f"regionmed-push: error: {push.OFFLINE_MESSAGE}"


def test_push_without_token_says_so(made, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(push, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run_failing(push.main, [str(made["hub"]), "--repo-id", "org/model"], capsys, 1, "no token", "hf auth login",
                "HF_TOKEN")


def _http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error\n\nmore detail", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(("raised", "names"), [
    (OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."), ["offline", "--dry-run"]),
    (_http_error(401), ["refused the token", "hf auth login"]),
    (_http_error(403), ["'org/model'", "write access"]),
    (_http_error(500), ["'org/model'", "500 Client Error"]),
    (httpx2.ConnectError("[Errno -2] Name or service not known"), ["cannot reach the Hub", "--dry-run"]),
], ids=["offline", "401", "403", "500", "unreachable"])
def test_push_hub_failures_are_one_line(raised, names, made, capsys, monkeypatch):
    class FailingApi:
        token = "hf_test"

        def create_repo(self, *args, **kwargs):
            raise raised

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(push, "HfApi", FailingApi)
    run_failing(push.main, [str(made["hub"]), "--repo-id", "org/model"], capsys, 1, *names)
    with pytest.raises(HubUploadError):  # the library call says the same
        push_folder(made["hub"], "org/model", api=FailingApi())


# --- regionmed-train-vqa ------------------------------------------------------------------------------------------

def _vqa(made: dict, tmp: Path, *extra: str, data: Path | None = None, model: Path | None = None,
         output: Path | None = None) -> list[str]:
    return ["--model", str(model or made["model_dir"]), "--data", str(data or made["data_dir"]),
            "--output-dir", str(output or tmp / "vqa"), "--max-steps", "1", "--batch-size", "4", *extra]


def _data_with(tmp: Path, made: dict, change: Callable[[Path], object]) -> Path:
    data = tmp / "data"
    shutil.copytree(made["data_dir"], data)
    change(data)
    return data


def _with_final(tmp: Path) -> Path:
    (tmp / "vqa" / "final").mkdir(parents=True)
    _file(tmp / "vqa" / "final" / "config.json", "{}")
    return tmp / "vqa"


VQA_CASES = {
    "max-steps-0": lambda m, t: (_vqa(m, t, "--max-steps", "0"), 2, ["--max-steps", "positive"]),
    "max-steps-not-a-number": lambda m, t: (_vqa(m, t, "--max-steps", "many"), 2, ["--max-steps", "'many'"]),
    "batch-size-0": lambda m, t: (_vqa(m, t, "--batch-size", "0"), 2, ["--batch-size", "positive"]),
    "learning-rate-0": lambda m, t: (_vqa(m, t, "--learning-rate", "0"), 2, ["--learning-rate"]),
    "learning-rate-nan": lambda m, t: (_vqa(m, t, "--learning-rate", "nan"), 2, ["--learning-rate"]),
    "backbone-lr-scale-2": lambda m, t: (_vqa(m, t, "--backbone-lr-scale", "2"), 2, ["--backbone-lr-scale", "[0, 1]"]),
    **_model_folder_cases(_vqa),
    "data-missing": lambda m, t: (_vqa(m, t, data=t / "nowhere"), 2, ["--data", "not a folder"]),
    "data-without-vqa-sidecar": lambda m, t: (_vqa(m, t, data=_data_with(t, m, lambda d: shutil.rmtree(d / "vqa"))),
                                              1, ["vqa/train.json", "does not exist", "sidecar"]),
    "vqa-json-corrupt": lambda m, t: (_vqa(m, t, data=_data_with(t, m, lambda d: _file(
        d / "vqa" / "train.json", "[{"))), 1, ["vqa/train.json", "not valid JSON"]),
    "vqa-record-without-answer": lambda m, t: (_vqa(m, t, data=_data_with(t, m, lambda d: _file(
        d / "vqa" / "train.json", json.dumps([{"qid": 1, "image_name": "x", "question": "q?",
                                               "answer_type": "OPEN"}])))), 1,
        ["vqa/train.json", "record 0", "'answer'"]),
    "vqa-no-questions": lambda m, t: (_vqa(m, t, data=_data_with(t, m, lambda d: _file(
        d / "vqa" / "train.json", "[]"))), 1, ["no training questions"]),
    "data-without-train-split": lambda m, t: (_vqa(m, t, data=_data_with(t, m, lambda d: [
        shard.unlink() for shard in d.glob("train-*.parquet")])), 1, ["split 'train'"]),
    "output-dir-a-file": lambda m, t: (_vqa(m, t, output=_file(t / "vqa", "x")), 2, ["--output-dir", "a file"]),
    "output-dir-holds-a-model": lambda m, t: (_vqa(m, t, output=_with_final(t)), 2, ["--output-dir", "final/"]),
}


@pytest.mark.parametrize("case", sorted(VQA_CASES))
def test_train_vqa_bad_input_is_one_line(case, made, tmp_path, capsys):
    argv, rc, names = VQA_CASES[case](made, tmp_path)
    run_failing(vqa.main, argv, capsys, rc, *names)
    assert not (tmp_path / "vqa" / "final" / "model.safetensors").exists()


def test_train_vqa_failing_while_saving_leaves_no_final(made, tmp_path, capsys, monkeypatch):
    """The processor's save fails after the model's: no `final/` that looks trained is left."""
    from transformers import ProcessorMixin

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ProcessorMixin, "save_pretrained", fail)
    run_failing(vqa.main, _vqa(made, tmp_path), capsys, 1, "No space left on device")
    assert not (tmp_path / "vqa" / "final").exists() and not list((tmp_path / "vqa").glob(".final.partial-*"))
