"""What every checkpoint converter shares (`regionmed-convert`, `training_scripts/convert.py`): reading a source
state dict safely, accounting for every source weight, and writing the converted folder.

A converter returns a `Conversion`: the RegionMed-CLIP model and processor, and for every source weight either
its use or the reason it was dropped, so that nothing is lost silently."""

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from regionmed_clip.modeling_regionmed_clip import RegionMedCLIPModel
from regionmed_clip.processing import RegionMedCLIPProcessor

__all__ = ["CONVERSION_REPORT", "EQUAL_AT_CONVERSION", "Conversion", "load_state_dict", "rename_weights", "save_conversion",
           "unaccounted_keys"]

CONVERSION_REPORT = "conversion.json"

# The `RegionMedCLIPConfig` fields that make a converted model equal its source with no boxes (docs/PRETRAINED.md):
# the box-free whole-image term is the tower's pooled token through the source's projection (no dense window
# term), minus a centre that starts at zero and does not move (training keeps the source's embedding space), plus
# the proposal / region pool gated by tanh(0) = 0 until training opens it.
EQUAL_AT_CONVERSION: dict[str, Any] = {"proposal_window_sizes": [], "box_free_center_momentum": 0.0,
                                       "region_pool_gate_init": 0.0, "roi_gate_init": 0.0}


@dataclasses.dataclass
class Conversion:
    """A converted model, its processor, and the account of the source's weights: `used` (source names that
    went into the model) and `dropped` (source name -> why it is not needed, e.g. a pooler the model never reads)."""

    source: str
    model: RegionMedCLIPModel
    processor: RegionMedCLIPProcessor
    used: list[str]
    dropped: dict[str, str]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file, or of a pickled `.bin` / `.pt` read with `torch.load(weights_only=True)`
    (tensors and plain containers only: a pickle can run code, and this refuses what is not data)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError and others for non-tensor pickles
        raise ValueError(f"{str(path)!r} does not load as a state dict with weights_only=True "
                         f"(only tensors are read from a pickle): {error}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{str(path)!r} holds no flat state dict of tensors")
    return dict(state)


def unaccounted_keys(source_keys: Iterable[str], used: Iterable[str], dropped: Mapping[str, str]) -> list[str]:
    """Source keys neither used nor dropped with a reason (the converter then refuses the checkpoint)."""
    known = set(used) | set(dropped)
    return sorted(key for key in source_keys if key not in known)


def rename_weights(
    state: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]], dropped_rules: Sequence[tuple[str, str]],
    source: str,
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """`(our name -> tensor, source names used, source name -> why dropped)`. A source name that fully matches a
    `dropped_rules` pattern is dropped with its reason; else the first `rules` pattern that fully matches renames it
    (`re.sub` replacement); a name neither covers is a ValueError naming every such weight of `source`."""
    mapped: dict[str, torch.Tensor] = {}
    used: list[str] = []
    dropped: dict[str, str] = {}
    for key, tensor in state.items():
        why = next((reason for pattern, reason in dropped_rules if re.fullmatch(pattern, key)), None)
        if why is not None:
            dropped[key] = why
            continue
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                mapped[re.sub(pattern, replacement, key)] = tensor
                used.append(key)
                break
    unknown = unaccounted_keys(state, used, dropped)
    if unknown:
        shown = f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        raise ValueError(f"{source}: the converter cannot map {len(unknown)} checkpoint weight(s): {shown}")
    return mapped, used, dropped


def save_conversion(conversion: Conversion, output_dir: str | Path, source_dir: str | Path) -> dict[str, Any]:
    """Write the converted model (safetensors, config, remote code), its processor and `conversion.json` (the
    source, and every source weight used or dropped with its reason) into `output_dir`; returns the report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    conversion.model.save_pretrained(output_dir)
    conversion.processor.save_pretrained(output_dir)
    report = {"source": conversion.source, "source_dir": str(Path(source_dir).resolve()),
              "weights_used": len(conversion.used), "weights_dropped": conversion.dropped}
    (output_dir / CONVERSION_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
