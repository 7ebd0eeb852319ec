"""PEFT LoRA fine-tuning (training_scripts/finetune_lora.py): which modules get adapters, gradients under
both activation-checkpointing modes, and the saved adapter reloaded onto the remote-code AutoModel and merged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPModel
from regionmed_clip.training_scripts.finetune_lora import lora_config, lora_target_regex, main

from conftest import build_saved_model, make_inputs, tiny_model

REPO = Path(__file__).resolve().parents[1]


def _adapted(model) -> set[str]:
    return {name.split(".lora_A")[0].removeprefix("base_model.model.") for name, _ in model.named_parameters()
            if ".lora_A." in name}


def test_lora_targets_exactly_the_chosen_layers_of_the_chosen_towers():
    model = tiny_model()
    layers = model.config.vision_config.num_hidden_layers
    attention = get_peft_model(tiny_model(), lora_config(["vision"], layers=["attention"]))
    adapted = _adapted(attention)
    assert len(adapted) == 4 * layers and all(name.startswith("vision_model.encoder.layers.") for name in adapted)
    assert not any("roi_processor" in name or "text_model" in name for name in adapted)  # fusion cross-attn excluded
    assert all(".lora_" in name for name, p in attention.named_parameters() if p.requires_grad)

    everything = get_peft_model(tiny_model(), lora_config(["vision", "text"]))  # the default layers
    adapted = _adapted(everything)
    per_layer = {name.split(".", 4)[4] for name in adapted if ".encoder.layers." in name}
    assert per_layer == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "mlp.fc1", "mlp.fc2"}
    assert len(adapted) == 6 * (layers + model.config.text_config.num_hidden_layers) + 2
    assert {"text_projection", "roi_processor.context_projection"} <= adapted
    saved_whole = {name.split(".modules_to_save")[0].removeprefix("base_model.model.")
                   for name, p in everything.named_parameters() if p.requires_grad and ".lora_" not in name}
    assert saved_whole == {"visual_projection"}  # the model reads its weight directly: a LoRA layer would be bypassed
    text_only = _adapted(get_peft_model(tiny_model(), lora_config(["text"], layers=["projections", "context"])))
    assert text_only == {"text_projection"}  # the context head belongs to the vision side
    with pytest.raises(ValueError, match="--layers"):
        lora_target_regex(["text"], ["norms"])
    with pytest.raises(ValueError, match="name no layer"):
        lora_target_regex(["text"], ["context"])
    with pytest.raises(ValueError, match="--towers"):
        lora_target_regex(["audio"])
    with pytest.raises(ValueError, match="--modules-to-save"):
        lora_config(["text"], modules_to_save=["heads"])
    with pytest.raises(ValueError, match="--layers projections"):
        lora_config(["text"], modules_to_save=["projections"])


def test_the_roi_processor_saved_whole_holds_each_module_once_and_reloads(tmp_path):
    """PEFT picks `modules_to_save` by name suffix: `text_projection` there also caught
    `roi_processor.context_projection`, and a saved ROI processor then held it twice and did not reload."""
    from peft.utils.other import ModulesToSaveWrapper

    lora = get_peft_model(tiny_model(), lora_config(["vision", "text"], modules_to_save=["roi_processor"]))
    wrapped = [name for name, module in lora.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    assert sorted(wrapped) == ["base_model.model.roi_processor", "base_model.model.visual_projection"]
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                parameter.add_(0.01)  # an adapter that changes the model
    lora.save_pretrained(tmp_path)
    inputs = make_inputs(lora.base_model.model.config, [1, 2])
    reloaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).image_embeds, lora.eval()(**inputs).image_embeds)
        assert not torch.allclose(reloaded(**inputs).image_embeds, tiny_model()(**inputs).image_embeds, atol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_every_lora_tensor_gets_a_gradient_under_checkpointing(reentrant):
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    lora = get_peft_model(model, lora_config(["vision", "text"]))
    lora.train()
    inputs = make_inputs(model.config, [2, 1])
    lora(**inputs, return_loss=True).loss.backward()
    missing = [name for name, p in lora.named_parameters() if ".lora_" in name and (p.grad is None or not p.grad.any())]
    # lora_B starts at zero, so lora_A's gradient is zero at step 0: only B must move now
    assert not [name for name in missing if ".lora_B." in name], missing


@pytest.mark.slow
def test_finetune_saves_an_adapter_that_reloads_on_automodel_and_merges(tmp_path):
    model_dir, data_dir, _, _ = build_saved_model(tmp_path, n=40)
    output = tmp_path / "lora"
    assert main(["--model", str(model_dir), "--data", str(data_dir), "--output-dir", str(output), "--max-steps", "4",
                 "--batch-size", "8", "--learning-rate", "0.01", "--merge",
                 "--activation-checkpointing", "--activation-checkpointing-kwargs", "{\"use_reentrant\": true}"]) == 0
    summary = json.loads((output / "lora_summary.json").read_text())
    assert 0 < summary["trainable_share"] < 0.5
    assert {path.name for path in (output / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    # under reentrant checkpointing every layer's adapter of both towers trained (lora_B starts at zero)
    lora_b = {name: value for name, value in load_file(output / "adapter" / "adapter_model.safetensors").items()
              if ".lora_B." in name}
    # 6 linear layers in each of the 4 encoder layers, the text projection and the box-free dense head
    assert len(lora_b) == 6 * 4 + 2 and all(value.abs().sum() > 0 for value in lora_b.values()), sorted(lora_b)

    inputs = make_inputs(RegionMedCLIPModel.from_pretrained(model_dir).config, [1, 2])
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        base = RegionMedCLIPModel.from_pretrained(model_dir).eval()
        expected_base = base(**inputs).image_embeds
        adapted = PeftModel.from_pretrained(RegionMedCLIPModel.from_pretrained(model_dir), str(output / "adapter")).eval()
        expected = adapted(**inputs).image_embeds
    assert not torch.allclose(expected, expected_base, atol=1e-4)  # the adapter learned something
    script = f"""
import torch
from peft import PeftModel
from transformers import AutoModel
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
base = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
adapted = PeftModel.from_pretrained(base, {str(output / "adapter")!r}).eval()
merged = AutoModel.from_pretrained({str(output / "merged")!r}, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save({{"adapted": adapted(**inputs).image_embeds, "merged": merged(**inputs).image_embeds,
                "module": type(merged).__module__}}, {str(tmp_path / "out.pt")!r})
"""
    env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].startswith("transformers_modules.")
    torch.testing.assert_close(out["adapted"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["merged"], expected, atol=1e-5, rtol=0)  # merged = base + adapter


@pytest.mark.slow
def test_the_model_trained_is_exactly_base_plus_adapter(tmp_path, monkeypatch):
    """Every state the fine-tune changes travels in the adapter: the box-free centre (a buffer PEFT does not
    save) is held at the base's value, so the trained model and base + saved adapter embed alike."""
    import regionmed_clip.training_scripts.finetune_lora as finetune

    built, build_trainer = [], finetune.build_trainer

    def recording_build_trainer(*args, **kwargs):
        built.append(build_trainer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(finetune, "build_trainer", recording_build_trainer)
    model_dir, data_dir, _, _ = build_saved_model(tmp_path, n=40)
    output = tmp_path / "lora"
    assert main(["--model", str(model_dir), "--data", str(data_dir), "--output-dir", str(output), "--max-steps", "4",
                 "--batch-size", "8", "--learning-rate", "0.01"]) == 0
    trained = built[0][0].model.eval()
    inputs = make_inputs(RegionMedCLIPModel.from_pretrained(model_dir).config, [0, 2])
    reloaded = PeftModel.from_pretrained(RegionMedCLIPModel.from_pretrained(model_dir), str(output / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).image_embeds, trained(**inputs).image_embeds, atol=1e-6, rtol=0)
