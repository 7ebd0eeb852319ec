"""VQA: RegionMedCLIPForVQA (loading a pretrained backbone, masking invariances, remote code), the
fine-tuning pieces (answer set, collator, per-group learning rates) and the `vqa` task on planted answers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import regionmed_clip.evaluation.tasks as tasks
from regionmed_clip.data.vqa import VQAExample, load_vqa_examples
from regionmed_clip.evaluation.tasks import EvalSettings
from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPForVQA, RegionMedCLIPModel
from regionmed_clip.scoring import normalize_answer
from regionmed_clip.training_scripts.vqa import IGNORE_INDEX, VQACollator, answer_vocabulary, build_vqa_trainer

from conftest import build_saved_model, make_inputs

REPO = Path(__file__).resolve().parents[1]
ANSWERS = {0: "no", 1: "yes", 2: "left upper zone"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("vqa")
    model_dir, data_dir, _, processor = build_saved_model(tmp_path, n=60)
    return {"model_dir": model_dir, "data_dir": data_dir, "processor": processor, "tmp": tmp_path}


def _vqa_model(model_dir: Path) -> RegionMedCLIPForVQA:
    return RegionMedCLIPForVQA.from_pretrained(model_dir, id2label=ANSWERS,
                                               label2id={v: k for k, v in ANSWERS.items()}).eval()


def test_vqa_model_starts_from_the_pretrained_backbone(saved):
    clip = RegionMedCLIPModel.from_pretrained(saved["model_dir"])
    vqa = _vqa_model(saved["model_dir"])
    backbone = vqa.regionmed_clip.state_dict()
    assert all(torch.equal(value, backbone[name]) for name, value in clip.state_dict().items())
    assert vqa.config.num_labels == 3 and vqa.config.id2label[2] == "left upper zone"


@torch.no_grad()
def test_padding_questions_and_roi_slots_change_nothing(saved):
    vqa = _vqa_model(saved["model_dir"])
    inputs = make_inputs(vqa.config, [2, 1], num_slots=3)
    questions = inputs["input_ids"][:2, :10].clone()
    mask = torch.ones_like(questions)
    base = vqa(pixel_values=inputs["pixel_values"], input_ids=questions, attention_mask=mask,
               roi_pixel_values=inputs["roi_pixel_values"], roi_boxes=inputs["roi_boxes"], roi_mask=inputs["roi_mask"])
    pad = vqa.config.text_config.pad_token_id
    padded = vqa(pixel_values=inputs["pixel_values"],
                 input_ids=torch.cat([questions, torch.full((2, 5), pad)], 1),
                 attention_mask=torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], 1),
                 roi_pixel_values=inputs["roi_pixel_values"], roi_boxes=inputs["roi_boxes"], roi_mask=inputs["roi_mask"])
    torch.testing.assert_close(padded.logits, base.logits, atol=1e-5, rtol=1e-5)
    # A padded ROI slot holding noise is masked out of the image tokens.
    noisy = inputs["roi_pixel_values"].clone()
    noisy[~inputs["roi_mask"]] = torch.randn_like(noisy[~inputs["roi_mask"]])
    masked = vqa(pixel_values=inputs["pixel_values"], input_ids=questions, attention_mask=mask,
                 roi_pixel_values=noisy, roi_boxes=inputs["roi_boxes"], roi_mask=inputs["roi_mask"])
    torch.testing.assert_close(masked.logits, base.logits, atol=1e-5, rtol=1e-5)
    # ... while the image itself matters
    other = vqa(pixel_values=inputs["pixel_values"].flip(0), input_ids=questions, attention_mask=mask)
    assert not torch.allclose(other.logits, vqa(pixel_values=inputs["pixel_values"], input_ids=questions,
                                                attention_mask=mask).logits)
    labels = torch.tensor([1, IGNORE_INDEX])
    loss = vqa(pixel_values=inputs["pixel_values"], input_ids=questions, attention_mask=mask, labels=labels).loss
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(base.logits[:1], labels[:1]).item(), rel=0.05)


@pytest.mark.slow
def test_vqa_folder_loads_as_remote_code_in_a_fresh_process(saved, tmp_path):
    vqa = _vqa_model(saved["model_dir"])
    vqa.save_pretrained(tmp_path / "vqa")
    inputs = make_inputs(vqa.config, [0])
    torch.save({"pixel_values": inputs["pixel_values"][:1], "input_ids": inputs["input_ids"][:1]}, tmp_path / "in.pt")
    expected = vqa(pixel_values=inputs["pixel_values"][:1], input_ids=inputs["input_ids"][:1]).logits
    code = (f"import torch; from transformers import AutoModelForVisualQuestionAnswering as A; "
            f"m = A.from_pretrained({str(tmp_path / 'vqa')!r}, trust_remote_code=True).eval(); "
            f"x = torch.load({str(tmp_path / 'in.pt')!r}); torch.save(m(**x).logits, {str(tmp_path / 'out.pt')!r}); "
            "print(type(m).__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("transformers_modules.")  # the folder's code, not this checkout's
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=1e-5)


def test_answer_vocabulary_most_frequent_first_after_normalisation():
    examples = [VQAExample(str(i), "a", "q?", answer, "open") for i, answer in
                enumerate(["Yes", "yes.", "No", "the left lung", "Left lung", "left lung", "  "])]
    assert answer_vocabulary(examples) == ["left lung", "yes", "no"]


def test_collator_maps_answers_and_ignores_unknown_ones(saved):
    rows = {"a": {"image": np.zeros((40, 40), dtype=np.uint8), "boxes": [[2.0, 2.0, 20.0, 20.0]]}}
    collator = VQACollator(saved["processor"], {"yes": 0, "left lung": 1}, rows, use_regions=True)
    batch = collator([VQAExample("1", "a", "Where?", "The left lung.", "open"),
                      VQAExample("2", "a", "Is it?", "Maybe", "closed")])
    assert batch["labels"].tolist() == [1, IGNORE_INDEX]
    assert batch["input_ids"].shape[0] == 2 and batch["roi_mask"].tolist() == [[True], [True]]


def test_backbone_learning_rate_scale_and_freezing(saved, tmp_path):
    args = {"max_steps": 2, "per_device_train_batch_size": 4, "disable_tqdm": True, "logging_steps": 10}
    trainer, _ = build_vqa_trainer(saved["model_dir"], saved["data_dir"], tmp_path / "a", args, backbone_lr_scale=0.1)
    optimizer = trainer.create_optimizer()
    backbone = {id(p) for p in trainer.model.regionmed_clip.parameters()}
    rates = {id(p) in backbone: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates == {True: pytest.approx(1e-4), False: pytest.approx(1e-3)}

    frozen, _ = build_vqa_trainer(saved["model_dir"], saved["data_dir"], tmp_path / "b", args, backbone_lr_scale=0.0)
    before = {name: value.clone() for name, value in frozen.model.state_dict().items()}
    frozen.train()
    after = frozen.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(not name.startswith("regionmed_clip.") for name in changed)
    assert any(name.startswith("classifier.") for name in changed)


def test_vqa_task_on_planted_answers(saved, tmp_path):
    # A model that always answers "yes": its accuracy is the share of "yes" references, per type.
    vqa = _vqa_model(saved["model_dir"])
    with torch.no_grad():
        vqa.classifier.weight.zero_()
        vqa.classifier.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    vqa.save_pretrained(tmp_path / "vqa")
    saved["processor"].save_pretrained(tmp_path / "vqa")
    record = tasks.run_vqa(EvalSettings(tmp_path / "vqa", saved["data_dir"], tmp_path / "out", batch_size=8,
                                        device="cpu", resamples=20))
    examples = load_vqa_examples(saved["data_dir"], "test")
    hits = np.array([normalize_answer(e.answer) == "yes" for e in examples])
    kinds = np.array([e.answer_type for e in examples])
    metrics = record["metrics"]
    assert record["n_examples"] == len(examples) and metrics["overall_accuracy"]["value"] == pytest.approx(hits.mean())
    for kind in ("closed", "open"):
        assert metrics[f"{kind}_accuracy"]["value"] == pytest.approx(hits[kinds == kind].mean())
        assert metrics[f"{kind}_accuracy"]["n"] == int((kinds == kind).sum())
    assert metrics["majority_answer_accuracy"]["answer"] == "no"  # id 0 of the planted answer set
    assert record["dataset"]["files"][-1]["name"] == "vqa/test.json" and record["figures"] == ["vqa_confusion.png"]
    with pytest.raises(tasks.EvaluationInputError, match="not a VQA model folder"):
        tasks.run_vqa(EvalSettings(saved["model_dir"], saved["data_dir"], tmp_path / "clip", device="cpu"))


def test_vqa_blank_images_control_feeds_constant_images(saved, tmp_path, monkeypatch):
    import regionmed_clip.evaluation.probe as probe

    vqa = _vqa_model(saved["model_dir"])
    vqa.save_pretrained(tmp_path / "vqa")
    saved["processor"].save_pretrained(tmp_path / "vqa")
    seen = []
    forward = vqa.forward

    def spy(**inputs):
        pixels = inputs["pixel_values"]
        seen.append((pixels - pixels[:1]).abs().amax(dim=(1, 2, 3)))  # how far each image is from the first
        return forward(**inputs)

    monkeypatch.setattr(vqa, "forward", spy)
    monkeypatch.setattr(probe, "_load", lambda model_dir, device, auto_class: (vqa, saved["processor"]))
    settings = EvalSettings(tmp_path / "vqa", saved["data_dir"], tmp_path / "out", batch_size=8, device="cpu", resamples=0)
    tasks.run_vqa(settings, blank_images=True)
    assert seen and all(torch.all(distance == 0) for distance in seen)
    seen.clear()
    record = tasks.run_vqa(settings)
    # (consecutive questions often share an image, so only some rows differ from the first)
    assert torch.cat(seen).max() > 0.1 and record["settings"]["blank_images"] is False


def test_train_vqa_cli_writes_a_complete_final_and_refuses_to_overwrite_it(saved, tmp_path, capsys):
    from regionmed_clip.training_scripts.vqa import main

    argv = ["--model", str(saved["model_dir"]), "--data", str(saved["data_dir"]), "--output-dir", str(tmp_path / "vqa"),
            "--max-steps", "1", "--batch-size", "4"]
    assert main(argv) == 0
    final = tmp_path / "vqa" / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in final.iterdir()}
    assert (tmp_path / "vqa" / "train_log.jsonl").is_file() and not list((tmp_path / "vqa").glob(".final.partial-*"))
    capsys.readouterr()
    assert main(argv) == 2  # a second run into the same folder is refused before training
    assert "--output-dir" in capsys.readouterr().err and (final / "model.safetensors").is_file()
