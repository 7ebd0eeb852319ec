"""A converted folder reloaded as a user's fresh, offline process would: the converter tests' shared oracle."""

import os
import subprocess
import sys
from pathlib import Path

import torch

# Runs in the fresh process: AutoModel / AutoProcessor with remote code, then the embeddings of a film and
# captions (and of given pixels), saved for the test to compare.
_RELOAD = """
import sys, torch
from transformers import AutoModel, AutoProcessor
from PIL import Image
folder, inputs_path, outputs_path = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = torch.load(inputs_path)
text_inputs = processor(text=inputs["captions"], return_tensors="pt")
outputs = {"ids": text_inputs["input_ids"], "tokenizer": type(processor.tokenizer).__name__,
           "max_length": processor.tokenizer.model_max_length}
with torch.no_grad():
    film = Image.fromarray(inputs["film"].numpy())
    outputs["image"] = model.get_image_features(**processor(images=[film], return_tensors="pt")).pooler_output
    outputs["text"] = model.get_text_features(**text_inputs).pooler_output
    if "pixels" in inputs:
        outputs["pixels"] = model.get_image_features(pixel_values=inputs["pixels"]).pooler_output
torch.save(outputs, outputs_path)
"""


def reload_in_fresh_process(folder: Path, tmp_path: Path, film: torch.Tensor, captions: list[str],
                            pixels: torch.Tensor | None = None) -> dict:
    """Embeddings of `film` (uint8 `(H, W[, 3])`), `captions` and optional `pixels` `(N, 3, S, S)` from `folder`
    loaded in a new offline Python process started in an unrelated folder (no project path on sys.path)."""
    inputs = {"film": film, "captions": captions, **({"pixels": pixels} if pixels is not None else {})}
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "reload.py").write_text(_RELOAD)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "reload.py"), str(folder), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "outputs.pt")], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt")
