"""Export to a Hub folder (regionmed_clip/apps/export.py), the checks and upload of regionmed-push, and the
exported folder used as a user would: AutoModel and the zero-shot pipeline in a fresh offline process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, parse_eval_result_entries

from regionmed_clip.apps.export import AUTO_MAP, CUSTOM_PIPELINES, export_model
from regionmed_clip.apps.push import HubFolderError, check_hub_folder, push_folder
from regionmed_clip.cli import UsageError
from regionmed_clip.evaluation.results import results_record, write_results
from regionmed_clip.processing import build_tokenizer
from regionmed_clip.training_scripts.schedule import resolve_schedule

from conftest import build_saved_model

REPO = Path(__file__).resolve().parents[1]


def results_file(folder: Path, task: str, dataset: str, value: float) -> Path:
    """`folder/results.json`: a regionmed-eval record of `task` on `dataset` with one headline figure."""
    record = results_record(task, {"name": dataset, "path": f"/data/{dataset}", "split": "test", "files": [],
                                   "revision": None}, 20, {}, {"macro_auroc": {"value": value, "low": 0.6, "high": 0.8}},
                            {"path": "/runs/a/final", "config_sha256": "c", "weights_sha256": "w"},
                            f"regionmed-eval {task}", {})
    return write_results(folder, record)


def run_config(data_dir: Path) -> dict:
    """A `run_config.yaml` as regionmed-train writes it (the parts the export reads)."""
    return {"model": {"preset": "tiny"}, "data": {"path": str(data_dir), "split": "train"},
            "schedule": resolve_schedule("progressive"),
            "training_args": {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 0.002,
                              "lr_scheduler_type": "cosine", "seed": 0}}


def make_run_folder(tmp: Path) -> dict:
    """A regionmed-train run folder `tmp/run` (`final/` with a tiny untrained model, `run_config.yaml`) over a
    40-row synthetic dataset `tmp/data`: `{"run", "model_dir" (run/final), "data_dir", "model"}`."""
    model_dir, data_dir, model, _ = build_saved_model(tmp, n=40)
    run = tmp / "run"
    shutil.copytree(model_dir, run / "final")
    (run / "run_config.yaml").write_text(yaml.safe_dump(run_config(data_dir)))
    (run / "final" / "training_args.bin").write_bytes(b"pickle")  # what Trainer.save_model leaves: must not ship
    return {"run": run, "model_dir": run / "final", "data_dir": data_dir, "model": model}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    made = make_run_folder(tmp)
    run, data_dir, model = made["run"], made["data_dir"], made["model"]
    results = [results_file(tmp / "zs", "zero-shot", "chexpert", 0.71),
               results_file(tmp / "rt", "retrieval", "mimic", 12.0)]
    benchmarks = tmp / "benchmarks.yaml"
    benchmarks.write_text(yaml.safe_dump([{"task": "zero-shot", "dataset": "chexpert", "hub_dataset_id": "org/chexpert",
                                           "hub_task_id": "five_findings"}]))
    summary = export_model(run / "final", tmp / "hub", results, repo_id="org/regionmed-tiny",
                           benchmarks_path=benchmarks, space_dir=tmp / "space")
    return {"tmp": tmp, "hub": tmp / "hub", "space": tmp / "space", "summary": summary, "model": model,
            "data_dir": data_dir}


def test_export_writes_safetensors_remote_code_and_auto_map_only(exported):
    hub, files = exported["hub"], exported["summary"]["files"]
    assert "model.safetensors" in files and not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    config = json.loads((hub / "config.json").read_text())
    assert AUTO_MAP.items() <= config["auto_map"].items() and config["custom_pipelines"] == CUSTOM_PIPELINES
    for module in ("modeling_regionmed_clip", "modeling_regionmed_clip_vqa", "configuration_regionmed_clip",
                   "attention_regionmed_clip", "layers_regionmed_clip", "roi_regionmed_clip", "box_free_regionmed_clip",
                   "packing_regionmed_clip", "processing_regionmed_clip", "image_processing_regionmed_clip",
                   "pipeline_regionmed_clip"):
        assert f"{module}.py" in files, module
    tokenizer_config = json.loads((hub / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]


def test_model_card_metadata_training_data_and_results(exported):
    card = ModelCard.load(exported["hub"] / "README.md")
    assert (card.data.license, card.data.pipeline_tag, card.data.library_name) == (
        "apache-2.0", "zero-shot-image-classification", "transformers")
    assert "not-for-clinical-use" in card.data.tags and "**Not for clinical use.**" in card.text
    assert "made by `regionmed-data synth` (seed 0)" in card.text and "**No real patient data**" in card.text
    assert "Preset `tiny`, 12 steps of batch 8" in card.text
    assert "stages: warmup (steps 0-0), refine (steps 1-1), roi (steps 2-6), joint (steps 7-11)" in card.text
    assert 'from_pretrained("org/regionmed-tiny"' in card.text
    assert "| a/final | chexpert | test | 20 | 0.710 [0.600, 0.800] |" in card.text
    metrics = {(result.task_type, result.metric_type): result.metric_value for result in card.data.eval_results}
    assert metrics == {("zero-shot-image-classification", "zero-shot/macro_auroc"): 0.71,
                       ("image-feature-extraction", "retrieval/macro_auroc"): 12.0}


def test_eval_results_yaml_only_for_registered_benchmarks(exported):
    path = exported["hub"] / ".eval_results" / "zero-shot.yaml"
    entries = parse_eval_result_entries(yaml.safe_load(path.read_text()))
    assert [(e.dataset_id, e.task_id, e.value) for e in entries] == [("org/chexpert", "five_findings", 0.71)]
    assert not (exported["hub"] / ".eval_results" / "retrieval.yaml").exists()
    assert exported["summary"]["notes"] == ["retrieval on 'mimic': no Hub benchmark registered, left out of .eval_results/"]


def test_export_refuses_a_folder_that_is_not_empty(exported):
    with pytest.raises(ValueError, match="is not empty"):
        export_model(exported["tmp"] / "run" / "final", exported["hub"])


def test_push_dry_run_checks_offline_and_lists_files(exported):
    summary = push_folder(exported["hub"], "org/regionmed-tiny", dry_run=True)
    assert summary["files"] == exported["summary"]["files"]
    assert (summary["model_index_results"], summary["eval_result_entries"]) == (2, 1)


def test_push_check_names_what_is_wrong(exported, tmp_path):
    def broken(change) -> str:
        folder = tmp_path / f"hub{len(list(tmp_path.iterdir()))}"
        shutil.copytree(exported["hub"], folder)
        change(folder)
        with pytest.raises(HubFolderError) as error:
            check_hub_folder(folder)
        return str(error.value)

    assert "optimizer.pt" in broken(lambda f: (f / "optimizer.pt").write_bytes(b"x"))
    assert "AutoModelForZeroShotImageClassification" in broken(lambda f: (f / "config.json").write_text(json.dumps(
        {**json.loads((f / "config.json").read_text()), "auto_map": {"AutoModel": AUTO_MAP["AutoModel"]}})))
    assert "modeling_regionmed_clip_vqa.py" in broken(lambda f: (f / "modeling_regionmed_clip_vqa.py").unlink())
    assert "zero-shot.yaml" in broken(lambda f: (f / ".eval_results" / "zero-shot.yaml").write_text("[{nope: 1}]"))
    assert "license" in broken(lambda f: (f / "README.md").write_text(
        (f / "README.md").read_text().replace("license: apache-2.0\n", "")))
    with pytest.raises(UsageError, match="--repo-id must be ORG/NAME"):
        push_folder(exported["hub"], "just-a-name", dry_run=True)


@pytest.mark.parametrize(("folder", "space", "created_as"), [
    ("hub", False, {"repo_type": "model", "space_sdk": None}),
    ("space", True, {"repo_type": "space", "space_sdk": "gradio"}),
])
def test_push_creates_the_repo_then_uploads_the_folder(exported, folder, space, created_as):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    summary = push_folder(exported[folder], "org/m", private=True, revision="v1", api=FakeApi(), space=space)
    assert [call[:2] for call in calls] == [("create_repo", "org/m"), ("create_branch", "org/m"),
                                            ("upload_folder", "org/m")]
    assert calls[0][2] == {"private": True, "exist_ok": True, **created_as} and calls[2][2]["revision"] == "v1"
    assert calls[1][2]["repo_type"] == calls[2][2]["repo_type"] == created_as["repo_type"]
    assert calls[2][2]["folder_path"] == str(exported[folder]) and summary["url"] == "https://hub/commit/1"


def test_tokenizer_never_emits_token_type_ids(tmp_path):
    tokenizer = build_tokenizer(["a small nodule in the left upper zone"] * 2, vocab_size=120)
    assert set(tokenizer("nodule")) == {"input_ids", "attention_mask"}
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert set(AutoTokenizer.from_pretrained(tmp_path)("nodule")) == {"input_ids", "attention_mask"}


@pytest.mark.slow
def test_exported_folder_in_a_fresh_offline_process(exported, tmp_path):
    """AutoModel gives the original outputs; the zero-shot pipeline ranks labels for a PIL image, a path
    and a DICOM file box-free, and per region with boxes= / points=."""
    import pydicom.data

    from regionmed_clip.data.schema import load_canonical

    row = load_canonical(exported["data_dir"], "test")[0]
    row["image"].save(tmp_path / "film.png")
    with torch.no_grad():
        pixels = torch.rand(1, 3, 128, 128)
        torch.save(pixels, tmp_path / "pixels.pt")
        expected = exported["model"](pixel_values=pixels).image_embeds
    boxes = [region["bbox"] for region in row["regions"]][:2]
    dicom = pydicom.data.get_testdata_file("CT_small.dcm")
    script = f"""
import json, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline
hub = {str(exported["hub"])!r}
model = AutoModel.from_pretrained(hub, trust_remote_code=True).eval()
torch.save(model(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r})).image_embeds, {str(tmp_path / "out.pt")!r})
classifier = pipeline("zero-shot-image-classification", model=hub, trust_remote_code=True)
labels = ["nodule", "mass", "effusion"]
film = {str(tmp_path / "film.png")!r}

def best_boxes():
    # each label's best-matching proposal, from the model's own outputs
    processor = AutoProcessor.from_pretrained(hub, trust_remote_code=True)
    image = Image.open(film)
    with torch.no_grad():
        texts = [f"There is a {{label}}." for label in labels] + [model.config.background_caption]
        out = model(**processor(images=image, text=texts))
    best = (out.proposal_embeds[0] @ out.text_embeds.t() * out.logit_scale).softmax(-1)[:, :3].argmax(0)
    boxes = processor.image_processor.proposal_boxes(image.height, image.width)
    return {{label: boxes[int(index)].tolist() for label, index in zip(labels, best)}}

print(json.dumps({{
    "pipeline": type(classifier).__name__, "module": type(model).__module__,
    "pil": classifier(Image.open(film), candidate_labels=labels),
    "path": classifier(film, candidate_labels=labels),
    "dicom": classifier({dicom!r}, candidate_labels=labels),
    "boxes": classifier(film, candidate_labels=labels, boxes={boxes!r}),
    "points": classifier(film, candidate_labels=labels, points=[[40, 40]]),
    "heatmap": [entry["heatmap"].shape for entry in classifier(film, candidate_labels=labels, heatmap=True)],
    "best": best_boxes(),
}}))
"""
    env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["pipeline"] == "RegionMedCLIPZeroShotPipeline" and out["module"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=1e-5)
    for key in ("pil", "path", "dicom"):
        assert sorted(entry["label"] for entry in out[key]) == ["effusion", "mass", "nodule"]
        assert sum(entry["score"] for entry in out[key]) == pytest.approx(1.0, abs=1e-4)
        assert out[key] == sorted(out[key], key=lambda entry: -entry["score"])
    ranked = lambda key: [(entry["label"], round(entry["score"], 5)) for entry in out[key]]  # noqa: E731
    assert ranked("pil") == ranked("path")  # a path and the decoded image are the same input
    assert len(out["boxes"]) == len(boxes) and len(out["points"]) == 1  # one ranking per region
    # box-free: each label's box is its best-matching proposal; the heat map is the film's shape
    assert {entry["label"]: entry["box"] for entry in out["path"]} == out["best"]
    assert all(entry.get("box") is None for region in out["boxes"] for entry in region)
    assert out["heatmap"] == [list(row["image"].size)[::-1]] * 3
    assert all(len(ranking) == 3 for ranking in out["boxes"])
