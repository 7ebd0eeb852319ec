"""Every console script, end to end, as the README shows it: in a subprocess, stdin closed, offline,
with its defaults on the tiny preset (only the scale shrunk: fewer films and steps), past at least one
logging and one save step. A prompt, a traceback or a FutureWarning in the output fails it; so does a
FutureWarning raised from any of our modules (turned into an error in the child process)."""

import configparser
import json
import math
import pkgutil
import urllib.request
from pathlib import Path

import pytest
import yaml
from cli_helpers import assert_clean_exit, run_console_script
from PIL import Image
from safetensors.torch import load_file

from regionmed_clip.apps.app import default_findings
from regionmed_clip.apps.app_driver import start_app, stop_app
from regionmed_clip.apps.push import check_hub_folder
from regionmed_clip.evaluation.results import RESULTS_FIELDS
from regionmed_clip.training_scripts.checkpoints import CHECKPOINT_COMPLETE

from conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Installed package -> repository folder (setup.cfg's package_dir).
OUR_PACKAGES = {"regionmed_clip": "regionmed_clip", "regionmed_clip.modeling_regionmed_clip": "modeling_regionmed_clip",
                "regionmed_clip.processing": "processing", "regionmed_clip.training_scripts": "training_scripts",
                "regionmed_clip.evaluation": "evaluation"}
FILMS = 150  # the synthetic generator puts every 10th film in the test split
STEPS = 12  # past the default logging step (10); --save-steps 10 puts a checkpoint there too
EVAL_TASKS = ("zero-shot", "region", "grounding", "retrieval")
# Every console script in setup.cfg must have its end-to-end test here (test_every_console_script_is_covered).
COVERED = {"regionmed-data", "regionmed-train", "regionmed-finetune", "regionmed-train-vqa", "regionmed-eval",
           "regionmed-export", "regionmed-push", "regionmed-demo", "regionmed-convert", "regionmed-app"}


def _our_module_names() -> list[str]:
    names = []
    for package, folder in OUR_PACKAGES.items():
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages([str(ROOT / folder)], prefix=f"{package}.")]
    return names


def run(name: str, *args: str, cwd: Path) -> str:
    """`name args` as a user types it; asserts a clean exit and no warning of ours; returns stdout + stderr."""
    # -W's module field is an exact module name: one filter per module of ours.
    filters = ",".join(f"error::FutureWarning:{module}" for module in _our_module_names())
    result = run_console_script(name, args, cwd=cwd, env={"PYTHONWARNINGS": filters})
    assert_clean_exit(result)
    output = result.stdout + result.stderr
    assert "FutureWarning" not in output, output[-4000:]
    return output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A synthetic dataset and a trained tiny run, made with the console scripts themselves."""
    root = tmp_path_factory.mktemp("console")
    out = run("regionmed-data", "synth", "--n", str(FILMS), "--seed", "0", "--output", "data", cwd=root)
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert sum(summary["rows"].values()) == FILMS and summary["rows"]["test"] == FILMS // 10
    run("regionmed-train", "--preset", "tiny", "--data", "data", "--output-dir", "run", "--max-steps", str(STEPS),
        "--save-steps", "10", cwd=root)
    return root


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_every_console_script_is_covered():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    scripts = {line.split("=")[0].strip() for line in parser["options.entry_points"]["console_scripts"].splitlines()
               if line.strip()}
    assert scripts == COVERED


def test_data_and_train(workspace):
    assert (workspace / "data" / "provenance.json").is_file() and list((workspace / "data").glob("train-*.parquet"))
    run_dir = workspace / "run"
    logged = [entry for entry in train_log(run_dir) if "loss" in entry]
    assert [entry["step"] for entry in logged] == [10]
    # ten steps from chance: the report loss is near ln(batch 32) = 3.47, the temperature near 1 / 0.07
    assert 1.0 < logged[0]["loss_global_report"] < math.log(32) + 0.3
    assert 10.0 < logged[0]["logit_scale"] < 20.0
    assert (run_dir / "checkpoint-10" / CHECKPOINT_COMPLETE).is_file()
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "loss_curves.png").is_file()
    saved = (run_dir / "run_config.yaml").read_text()
    assert "name: joint" in saved  # the default schedule, saved resolved


def test_train_with_the_progressive_schedule_by_name(workspace):
    run("regionmed-train", "--preset", "tiny", "--data", "data", "--output-dir", "progressive", "--max-steps", "10",
        "--schedule", "progressive", cwd=workspace)
    stages = [entry["stage"] for entry in train_log(workspace / "progressive") if "stage" in entry]
    assert stages == ["joint"]  # logged at step 10: the last of the paper's four stages (10/10/40/40 %)


def test_finetune_with_its_defaults(workspace):
    out = run("regionmed-finetune", "--model", "run/final", "--data", "data", "--output-dir", "lora",
              "--max-steps", str(STEPS), "--merge", cwd=workspace)
    assert "[y/N]" not in out and "instantiate a model of type" not in out
    lora = workspace / "lora"
    assert {path.name for path in (lora / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert (lora / "merged" / "model.safetensors").is_file() and (lora / "merged" / "tokenizer.json").is_file()
    logged = [entry for entry in train_log(lora) if "loss" in entry]
    assert [entry["step"] for entry in logged] == [10]
    # under LoRA the temperature is frozen: the log reports the base model's, unchanged
    base_scale = load_file(workspace / "run" / "final" / "model.safetensors")["logit_scale"].exp().item()
    assert logged[0]["logit_scale"] == pytest.approx(base_scale, abs=1e-4)
    summary = json.loads((lora / "lora_summary.json").read_text())
    assert summary["towers"] == "vision,text" and summary["rank"] == 8 and summary["modules_to_save"] == []
    assert summary["layers"] == "attention,mlp,projections,context"


@pytest.mark.parametrize("task", EVAL_TASKS)
def test_eval_task(workspace, task):
    out = run("regionmed-eval", task, "--model", "run/final", "--data", "data", "--output", f"eval/{task}",
              cwd=workspace)
    record = json.loads((workspace / "eval" / task / "results.json").read_text())
    assert set(RESULTS_FIELDS) <= set(record) and record["task"] == task
    assert record["command"].startswith(f"regionmed-eval {task}") and record["n_examples"] >= FILMS // 10
    assert record["dataset"]["files"] and len(record["dataset"]["files"][0]["sha256"]) == 64
    assert record["model"]["config_sha256"] and record["settings"]["device"] == "cpu"
    assert record["headline"] and all(entry["value"] is not None for entry in record["headline"].values())
    assert f"over {FILMS // 10} of {FILMS // 10} rows" in out  # no row of the synthetic test split is skipped
    for figure in record["figures"]:
        with Image.open(workspace / "eval" / task / figure) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_eval_report_and_probe(workspace):
    for task in ("zero-shot", "retrieval"):
        if not (workspace / "eval" / task / "results.json").is_file():
            run("regionmed-eval", task, "--model", "run/final", "--data", "data", "--output", f"eval/{task}",
                cwd=workspace)
    out = run("regionmed-eval", "report", "eval/zero-shot", "eval/retrieval", "--output", "table.md", cwd=workspace)
    zero_shot = json.loads((workspace / "eval" / "zero-shot" / "results.json").read_text())
    macro = zero_shot["metrics"]["box_free"]["macro_auroc"]
    assert f"{macro:.3f}" in out  # the table shows the figure results.json holds
    table = (workspace / "table.md").read_text()
    assert "### zero-shot" in table and "### retrieval" in table and table in out
    run("regionmed-eval", "probe", "--model", "run/final", "--data", "data", "--output", "probe.json", cwd=workspace)
    report = json.loads((workspace / "probe.json").read_text())
    assert report["metadata"]["n_images"] == FILMS // 10
    assert set(report["regions"]["conditions"]) == {"true", "crops_blanked", "boxes_mirrored", "box_geometry_removed"}


def test_vqa_train_and_eval(workspace):
    run("regionmed-train-vqa", "--model", "run/final", "--data", "data", "--output-dir", "vqa", "--max-steps", "20",
        cwd=workspace)
    assert (workspace / "vqa" / "final" / "model.safetensors").is_file()
    run("regionmed-eval", "vqa", "--model", "vqa/final", "--data", "data", "--output", "eval/vqa", cwd=workspace)
    record = json.loads((workspace / "eval" / "vqa" / "results.json").read_text())
    assert set(RESULTS_FIELDS) <= set(record) and record["task"] == "vqa" and record["n_examples"] > 0
    assert record["headline"] and all(entry["value"] is not None for entry in record["headline"].values())


def test_export_and_push_dry_run(workspace):
    for task in ("zero-shot", "region"):
        if not (workspace / "eval" / task / "results.json").is_file():
            run("regionmed-eval", task, "--model", "run/final", "--data", "data", "--output", f"eval/{task}",
                cwd=workspace)
    run("regionmed-export", "--model", "run/final", "--output", "hub", "--eval-results", "eval/zero-shot",
        "eval/region", "--repo-id", "org/regionmed-tiny", "--space", "space", cwd=workspace)
    checked = check_hub_folder(workspace / "hub")
    assert checked["model_index_results"] > 0
    out = run("regionmed-push", "hub", "--repo-id", "org/regionmed-tiny", "--dry-run", cwd=workspace)
    assert "model.safetensors" in out and "README.md" in out
    out = run("regionmed-push", "space", "--space", "--repo-id", "org/regionmed-tiny-demo", "--dry-run", cwd=workspace)
    assert "app.py" in out and "a Gradio Space of the model(s) ['org/regionmed-tiny']" in out


def test_app_serves_the_exported_model(workspace):
    """`regionmed-app --model HUBDIR` with its defaults (the prompt file's findings) serves its page until stopped;
    tests/test_app_browser.py uses the page."""
    if not (workspace / "hub").is_dir():
        run("regionmed-export", "--model", "run/final", "--output", "hub", cwd=workspace)
    port = free_port()
    process = start_app(workspace / "hub", port, (), workspace / "app.log")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            page = json.loads(response.read())
    finally:
        stop_app(process)
    findings = next(component["props"]["value"] for component in page["components"]
                    if component["props"].get("elem_id") == "findings")
    assert findings == ", ".join(default_findings())  # the findings box holds the prompt file's classes
    log = (workspace / "app.log").read_text()
    assert f"regionmed-app: serving {workspace / 'hub'} on http://127.0.0.1:{port} (Ctrl+C to stop)" in log, log[-3000:]
    assert "Traceback" not in log and "FutureWarning" not in log, log[-3000:]


def test_convert_vit_bert_then_train_from_it(workspace, tmp_path):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(tmp_path / "bert")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                  [f"w{i}" for i in range(55)]))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    out = run("regionmed-convert", "--from", "vit-bert", str(tmp_path / "vit"), str(tmp_path / "converted"),
              "--text-source", str(tmp_path / "bert"), cwd=tmp_path)
    assert json.loads(out[out.index("{"):out.rindex("}") + 1])["source"] == "vit-bert"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(tmp_path / "converted")}}))
    run("regionmed-train", "--config", "run.yaml", "--data", str(workspace / "data"), "--output-dir", "run",
        "--max-steps", "2", "--batch-size", "8", cwd=tmp_path)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_demo(tmp_path):
    out = run("regionmed-demo", "--output-dir", "demo", "--n", "60", "--max-steps", "6", cwd=tmp_path)
    demo = tmp_path / "demo"
    assert "[5/5] the export reloads in a fresh offline process" in out and "same embedding" in out
    assert "total time" in out and "demo/run/final" in out
    report = json.loads((demo / "probe.json").read_text())
    # the probe ran on the test split (every 10th film) against the global-only ablation trained beside it
    assert report["metadata"]["n_images"] == 6
    assert report["baseline"]["model"] == str(demo / "global_only" / "final")
    assert set(report["regions"]["conditions"]) == {"true", "crops_blanked", "boxes_mirrored", "box_geometry_removed"}
    for name in ("run", "no_background", "global_only"):
        assert (demo / name / "loss_curves.png").exists()
        logged = train_log(demo / name)
        assert logged[-1]["step"] == 6
    assert not any(key.startswith("loss_region") for key in logged[0])  # the ablation never saw a region term
    assert yaml.safe_load((demo / "no_background" / "run_config.yaml").read_text())["data"]["windows_per_image"] == 0
    # summary.json: the printed headline figures, from the probe and the zero-shot record
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["box_free_zero_shot_macro_auroc"] == report["box_free"]["zero_shot"]["macro_auroc"]
    assert summary["global_only_zero_shot_macro_auroc"] == report["baseline"]["box_free"]["zero_shot_pooled"]["macro_auroc"]
    assert set(summary["box_free_zero_shot_auroc_per_class"]) == set(report["box_free"]["zero_shot"]["per_class"])
    assert summary["box_free_t2i_recall_at_1"] == report["box_free"]["retrieval"]["text_to_image_R@1"]
    zero_shot = json.loads((demo / "eval" / "zero-shot" / "results.json").read_text())
    assert summary["with_boxes_zero_shot_macro_auroc"] == zero_shot["headline"]["macro_auroc_with_regions"]["value"]
    no_background = json.loads((demo / "probe_no_background.json").read_text())
    assert summary["no_background_zero_shot_macro_auroc"] == no_background["box_free"]["zero_shot"]["macro_auroc"]
    if summary["box_free_zero_shot_macro_auroc"] is not None:  # null when 6 test films leave no class both ways
        assert f"{summary['box_free_zero_shot_macro_auroc']:.3f}" in out
    for task in ("zero-shot", "region"):  # evaluated and exported: results for the card, a Hub folder that checks
        assert json.loads((demo / "eval" / task / "results.json").read_text())["task"] == task
    checked = check_hub_folder(demo / "hub")
    assert checked["model_index_results"] > 0 and "model.safetensors" in checked["files"]
