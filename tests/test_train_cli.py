"""`regionmed-train` end to end: outputs, kill -9 and resume, two-process torchrun (that it learns:
test_learning.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from regionmed_clip.data.synthetic import write_synthetic_dataset
from regionmed_clip.training_scripts.checkpoints import CHECKPOINT_COMPLETE
from regionmed_clip.training_scripts.train import main

from conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHORT_SCHEDULE = [
    {"name": "warmup", "steps": 2, "loss_weights": {"global_report": 1.0}, "lr_multipliers": {"roi": 0.0}},
    {"name": "joint", "steps": 10, "loss_weights": {"global_report": 1.0, "global_summary": 0.5, "region": 0.5,
                                                    "hard_negative": 0.5}, "use_rois": True},
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(path, n=64, seed=0)
    return path


def run_config(tmp_path, schedule=SHORT_SCHEDULE, **training_args) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "schedule": schedule,
        "training_args": {"per_device_train_batch_size": 8, "logging_steps": 1, "warmup_steps": 0,
                          "disable_tqdm": True, **training_args},
    }))
    return path


def command(data_dir, output_dir, config, max_steps=8, save_steps=2, extra=()):
    return [sys.executable, "-m", "regionmed_clip.training_scripts.train", "--preset", "tiny", "--data", str(data_dir),
            "--output-dir", str(output_dir), "--max-steps", str(max_steps), "--save-steps", str(save_steps),
            "--seed", "0", "--config", str(config), *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_outputs_of_a_run(data_dir, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(command(data_dir, out, run_config(tmp_path), max_steps=4), cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "loss_curves.png").stat().st_size > 1000
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {entry["stage"] for entry in log if "stage" in entry} == {"warmup", "joint"}
    assert any("loss_region" in entry for entry in log)
    final = out / "final"
    for name in ("model.safetensors", "modeling_regionmed_clip.py", "processor_config.json", "tokenizer.json"):
        assert (final / name).exists(), name
    assert "stage 'joint' from step 2" in result.stderr
    assert str(final) in result.stdout
    assert f"loss curves: {out / 'loss_curves.png'}" in result.stdout


def test_a_run_too_short_to_log_says_why_it_has_no_loss_curves(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # in process: the command's own output is what is checked, not a training
    code = main(command(data_dir, out, run_config(tmp_path, logging_steps=10), max_steps=2)[3:])
    assert code == 0
    assert ("loss curves: not drawn, no step logged its losses (logging every 10 steps, 2 steps run: lower "
            "--logging-steps)") in capsys.readouterr().out
    assert not (out / "loss_curves.png").exists()


def test_kill_then_resume_ends_with_the_same_weights(data_dir, tmp_path):
    config = run_config(tmp_path)
    straight = tmp_path / "straight"
    # 16 steps with a checkpoint every 4: the kill lands after checkpoint-4 with 12 steps to go,
    # so even a fast machine cannot finish before it.
    subprocess.run(command(data_dir, straight, config, max_steps=16, save_steps=4), cwd=ROOT, env=env(), check=True,
                   capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(data_dir, killed, config, max_steps=16, save_steps=4), cwd=ROOT, env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / CHECKPOINT_COMPLETE).exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()

    resumed = subprocess.run(command(data_dir, killed, config, max_steps=16, save_steps=4, extra=["--resume"]),
                             cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = weights(straight / "final"), weights(killed / "final")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    steps = [json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()
             if "\"loss\"" in line]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the killed run's extra lines were dropped


def test_a_run_folder_is_never_silently_reused_or_trained_past_its_end(data_dir, tmp_path, capsys):
    config, out = run_config(tmp_path), tmp_path / "run"

    def train(max_steps=4, extra=()):
        return subprocess.run(command(data_dir, out, config, max_steps=max_steps, save_steps=2, extra=extra),
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)

    def refused(max_steps=4, extra=()) -> tuple[int, str]:
        """The command in process: a refusal comes before any training (a subprocess would only add start-up)."""
        code = main(command(data_dir, out, config, max_steps=max_steps, save_steps=2, extra=extra)[3:])
        return code, capsys.readouterr().err

    assert train().returncode == 0
    last_state = (out / "checkpoint-4" / "trainer_state.json").read_text()
    final_weights = weights(out / "final")
    for folder in (out / "final", out / "checkpoint-4"):  # the training arguments as JSON, nothing pickled
        assert not (folder / "training_args.bin").exists()
        assert json.loads((folder / "training_args.json").read_text())["max_steps"] == 4

    # resumed at max_steps (a scheduler re-running the same command): no step past the end; the
    # missing final model is written from the last checkpoint
    shutil.rmtree(out / "final")
    again = train(extra=["--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint-4 is at or past max_steps=4: nothing to train" in again.stdout
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "trainer_state.json").read_text() == last_state
    resumed_weights = weights(out / "final")
    assert all(torch.equal(final_weights[name], resumed_weights[name]) for name in final_weights)

    refusals = {
        "--overwrite": refused(),  # a fresh run into the folder of a run
        "--resume would ignore ['training_args.learning_rate']": refused(extra=["--resume", "--learning-rate", "0.5"]),
        "training_args.max_steps: 4 -> 6": refused(max_steps=6, extra=["--resume"]),
    }
    for message, (code, stderr) in refusals.items():
        assert code == 2 and message in stderr, (message, stderr[-2000:])
    assert (out / "checkpoint-4" / "trainer_state.json").read_text() == last_state  # nothing was touched

    longer = train(max_steps=6, extra=["--resume", "--allow-config-change"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    fresh = train(max_steps=2, extra=["--overwrite"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_moved_run_folder_resumes_where_it_now_lives(data_dir, tmp_path):
    config, scratch = run_config(tmp_path), tmp_path / "scratch" / "run"
    first = subprocess.run(command(data_dir, scratch, config, max_steps=6, save_steps=2), cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    straight = weights(scratch / "final")
    shutil.rmtree(scratch / "checkpoint-6")  # as if killed after checkpoint-4
    shutil.rmtree(scratch / "final")
    # the run folder and the data both move (scratch disk to persistent disk); the old places are gone
    persistent, data = tmp_path / "persistent" / "run", tmp_path / "persistent" / "data"
    shutil.copytree(scratch, persistent)
    shutil.copytree(data_dir, data)
    shutil.rmtree(scratch.parent)

    resumed = subprocess.run(command(data, persistent, config, max_steps=6, save_steps=2, extra=["--resume"]),
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--resume of a moved run" in resumed.stderr and "changed run configuration" not in resumed.stderr
    assert json.loads((persistent / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    moved_weights = weights(persistent / "final")
    assert all(torch.equal(straight[name], moved_weights[name]) for name in straight)  # steps 5-6 as if never moved
    saved = yaml.safe_load((persistent / "run_config.yaml").read_text())
    assert saved["training_args"]["output_dir"] == str(persistent) and saved["data"]["path"] == str(data)

    (data / "train-00000.parquet").write_bytes((data / "train-00000.parquet").read_bytes()[:-1] + b"\0")
    changed = subprocess.run(command(data, persistent, config, max_steps=8, save_steps=2, extra=["--resume"]),
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2 and "data (file contents)" in changed.stderr  # moved data is compared by content


def plant_bad_rows(source: Path, target: Path) -> dict[str, int]:
    """A copy of `source` whose train shard has 3 undecodable images and 2 null report captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(source, target)
    (shard,) = sorted(target.glob("train-*.parquet"))
    table = pq.read_table(shard)
    images, reports = table.column("image").to_pylist(), table.column("report_caption").to_pylist()
    for index in (3, 17, 40):
        images[index] = {"bytes": b"not an image", "path": None}
    for index in (8, 50):
        reports[index] = None
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, table.schema.field("image").type))
    table = table.set_column(table.schema.get_field_index("report_caption"), "report_caption",
                             pa.array(reports, pa.string()))
    pq.write_table(table, shard)
    return {"row: image does not decode (UnidentifiedImageError)": 3, "row: report_caption is missing or null": 2}


def test_skipped_rows_add_up_across_workers_and_a_resume(data_dir, tmp_path):
    bad_data = tmp_path / "bad"
    planted = plant_bad_rows(data_dir, bad_data)
    config = run_config(tmp_path, dataloader_num_workers=2)
    out = tmp_path / "run"

    def train(max_steps, extra=()):
        return subprocess.run(command(bad_data, out, config, max_steps=max_steps, save_steps=4, extra=extra),
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)

    # one epoch (52 train rows, batches of 8: 7 steps) in two parts: the resumed part continues the counts
    half = train(4, extra=["--max-skip-fraction", "0.2"])
    assert half.returncode == 0, half.stderr[-3000:]
    whole = train(7, extra=["--max-skip-fraction", "0.2", "--resume", "--allow-config-change"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("skip_reasons" in entry for entry in log)  # every logging step and the summary
    assert log[-1]["skip_reasons"] == planted and log[-1]["skipped_rows"] == 5 and log[-1]["rows_seen"] == 52
    assert "data: skipped 5 of 52 rows (9.6%)" in whole.stdout
    assert json.loads((out / "checkpoint-7" / "skips.json").read_text())["rows_skipped"] == 5

    # the default threshold (5%) stops the same data with an error that says why
    strict = subprocess.run(command(bad_data, tmp_path / "strict", config, max_steps=7, save_steps=7), cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=600)
    assert strict.returncode == 3 and "more than --max-skip-fraction=0.05" in strict.stderr
    assert "2 x row: report_caption is missing or null (e.g. rows" in strict.stderr
    assert not (tmp_path / "strict" / "final").exists()


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(port)],
    "accelerate": lambda port: [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "2",
                                "--num_machines", "1", "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_run_across_a_stage_boundary(data_dir, tmp_path, launcher):
    out = tmp_path / "ddp"
    result = subprocess.run(LAUNCHERS[launcher](free_port()) + command(data_dir, out, run_config(tmp_path), max_steps=4)[1:],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["stage"] for entry in log if "stage" in entry] == ["warmup", "warmup", "joint", "joint"]
    assert (out / "final" / "model.safetensors").exists()

    # Under DDP the frozen ROI processor did not move during warm-up, and Adam kept no state for it.
    from regionmed_clip.training_scripts.train import build_trainer, parse_command, resolve_run_config

    args = parse_command(command(data_dir, out, run_config(tmp_path), max_steps=4)[3:])
    fresh = build_trainer(resolve_run_config(*args))[0].model  # same seed, same tokenizer -> the initial weights
    after_warmup = weights(out / "checkpoint-2")
    for name, value in fresh.state_dict().items():
        if name.startswith("roi_processor."):
            assert torch.equal(after_warmup[name], value), name
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=False)
    roi_indices = {i for group in optimizer["param_groups"] if group["name"] == "roi" for i in group["params"]}
    assert roi_indices and not roi_indices & set(optimizer["state"])
