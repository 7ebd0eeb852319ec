"""save_pretrained -> AutoModel.from_pretrained(trust_remote_code=True) in a fresh, offline process."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from conftest import make_inputs, tiny_model

LOAD_AND_RUN = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoConfig, AutoModel
    model_dir, inputs_path, outputs_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert AutoConfig.from_pretrained(model_dir, trust_remote_code=True).model_type == "regionmed_clip"
    with torch.no_grad():
        out = model(**torch.load(inputs_path))
    torch.save({k: out[k] for k in ("image_embeds", "text_embeds", "region_embeds", "logits_per_image")}, outputs_path)
    """
)


def test_remote_code_round_trip_in_a_fresh_offline_process(tmp_path):
    model = tiny_model(roi_gate_init=0.5, region_pool_gate_init=0.5)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    saved = sorted(os.listdir(model_dir))
    # the model file and every sibling it reaches by relative import (transformers' custom_object_save)
    assert {"config.json", "model.safetensors", "modeling_regionmed_clip.py", "configuration_regionmed_clip.py",
            "attention_regionmed_clip.py", "layers_regionmed_clip.py", "roi_regionmed_clip.py",
            "box_free_regionmed_clip.py", "packing_regionmed_clip.py"} <= set(saved)
    # inference only: no training objective, no torch.distributed, no training knobs in config.json
    assert not [name for name in saved if "loss" in name]
    shipped_code = "".join((model_dir / name).read_text() for name in saved if name.endswith(".py"))
    assert "torch.distributed" not in shipped_code
    config = json.loads((model_dir / "config.json").read_text())
    assert not {"local_loss", "hard_negative_k", "hard_negative_weight", "negative_text_margin"} & set(config)
    auto_map = json.loads((model_dir / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_regionmed_clip.RegionMedCLIPModel"

    inputs = make_inputs(model.config, [4, 1, 0], num_slots=4)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load_and_run.py"
    script.write_text(LOAD_AND_RUN)
    # A clean environment, run from an empty directory: only the saved folder can supply the code.
    env = {
        "PATH": os.environ["PATH"],
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, str(script), str(model_dir), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "hf_home" / "modules" / "transformers_modules").is_dir()

    reloaded = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = model(**inputs)
    # Same weights and code: equal to float rounding. Not bitwise: a CPU kernel may sum in another order
    # in another process (a CI run once differed by 4e-7 in image_embeds); wrong weights or code differ by >> 1e-5.
    for key, value in reloaded.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
