"""Checkpoint integrity, run-folder refusals, and no pickle in or out of a model folder."""

import ast
import json
import logging
from pathlib import Path

import pytest
import yaml

from regionmed_clip.data.fingerprints import dataset_fingerprint
from regionmed_clip.training_scripts.checkpoints import (
    CHECKPOINT_COMPLETE,
    latest_intact_checkpoint,
    verify_checkpoint,
    write_completion_marker,
)
from regionmed_clip.training_scripts.train import (
    DATA_FINGERPRINT_FILE,
    RUN_CONFIG_FILE,
    config_changes,
    prepare_run_folder,
)

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "optimizer.pt").write_bytes(b"optimizer state" * 10)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_completion_marker(folder, step)
    return folder


def test_an_intact_checkpoint_verifies(tmp_path):
    folder = make_checkpoint(tmp_path / "checkpoint-2", 2)
    record = json.loads((folder / CHECKPOINT_COMPLETE).read_text())
    assert record["global_step"] == 2 and sorted(record["files"]) == ["model.safetensors", "optimizer.pt",
                                                                       "trainer_state.json"]
    assert verify_checkpoint(folder) == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:100]), "model.safetensors: 100 bytes where 2048 were written"),
        (lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]),
         "model.safetensors: contents changed since it was written"),
        (lambda f: f.unlink(), "model.safetensors: missing"),
    ],
    ids=["truncated", "one flipped bit", "deleted"],
)
def test_a_damaged_file_is_named(tmp_path, damage, expected):
    folder = make_checkpoint(tmp_path / "checkpoint-2", 2)
    damage(folder / "model.safetensors")
    problems = verify_checkpoint(folder)
    assert len(problems) == 1 and problems[0].startswith(expected)


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_why(tmp_path, caplog):
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    make_checkpoint(tmp_path / "checkpoint-4", 4)
    newest = make_checkpoint(tmp_path / "checkpoint-6", 6)
    make_checkpoint(tmp_path / "checkpoint-8", 8, complete=False)  # killed while saving
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (newest / "optimizer.pt").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        assert latest_intact_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert "checkpoint-8: no CHECKPOINT_COMPLETE marker" in caplog.text
    assert "checkpoint-6: optimizer.pt: 9 bytes where 150 were written" in caplog.text
    assert latest_intact_checkpoint(tmp_path / "missing") is None


def test_a_marker_from_before_checksums_is_trusted(tmp_path):
    folder = make_checkpoint(tmp_path / "checkpoint-2", 2, complete=False)
    (folder / CHECKPOINT_COMPLETE).write_text(json.dumps({"global_step": 2}))
    assert verify_checkpoint(folder) == []


def saved_run(tmp_path: Path) -> dict:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-00000.parquet").write_bytes(b"rows")
    run = {"model": {"preset": "tiny"}, "data": {"path": str(data), "split": "train"},
           "training_args": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "seed": 0, "learning_rate": 1e-4}}
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run))
    (out / DATA_FINGERPRINT_FILE).write_text(json.dumps(dataset_fingerprint(data, "train")))
    make_checkpoint(out / "checkpoint-4", 4)
    return run


def test_config_changes_are_dotted_keys():
    assert config_changes({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}}) == {"a.c": (2, 3), "a.d": (None, 4)}


def test_resume_refuses_changed_data_unless_allowed(tmp_path):
    run = saved_run(tmp_path)
    prepare_run_folder(run, resume=True)  # unchanged: fine
    (Path(run["data"]["path"]) / "train-00000.parquet").write_bytes(b"other rows")
    with pytest.raises(ValueError, match=r"data \(file contents\).*--allow-config-change"):
        prepare_run_folder(run, resume=True)
    prepare_run_folder(run, resume=True, allow_config_change=True)


def test_resume_refuses_what_the_checkpoint_would_override_even_when_changes_are_allowed(tmp_path):
    run = saved_run(tmp_path)
    changed = {**run, "training_args": {**run["training_args"], "seed": 1}}
    with pytest.raises(ValueError, match=r"would ignore \['training_args.seed'\]"):
        prepare_run_folder(changed, resume=True, allow_config_change=True)


def test_a_fresh_run_into_a_run_folder_needs_overwrite_which_clears_it(tmp_path):
    run = saved_run(tmp_path)
    out = Path(run["training_args"]["output_dir"])
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(ValueError, match="holds a run .*--overwrite"):
        prepare_run_folder(run, resume=False)
    assert (out / "checkpoint-4").exists()
    prepare_run_folder(run, resume=False, overwrite=True)
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


def _unsafe_loads(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        name = f"{owner}.{node.func.attr}"
        safe = any(keyword.arg == "weights_only" and isinstance(keyword.value, ast.Constant)
                   and keyword.value.value is True for keyword in node.keywords)
        if name in ("pickle.load", "pickle.loads") or (name == "torch.load" and not safe):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_no_code_path_unpickles_without_weights_only():
    sources = [path for folder in ("modeling_regionmed_clip", "processing", "training_scripts", "evaluation",
                                   "benchmarks") for path in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 30
    assert [line for path in sources for line in _unsafe_loads(path)] == []
