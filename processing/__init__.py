"""RegionMed-CLIP processing. The files beside this one travel to the Hub as remote code."""

from .image_processing_regionmed_clip import (
    PROPOSAL_INPUT_NAMES,
    ROI_INPUT_NAMES,
    RegionMedCLIPImageProcessor,
    proposal_heatmap,
    proposal_windows,
)
from .medical_image_io import load_medical_image, load_medical_pil
from .processing_regionmed_clip import CAPTION_LEVELS, CaptionLevel, RegionMedCLIPProcessor, caption_level
from .tokenization_regionmed_clip import DEFAULT_MAX_LENGTH, build_tokenizer, load_tokenizer

# save_pretrained then writes `auto_map` and copies the flat module files.
RegionMedCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
RegionMedCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CAPTION_LEVELS",
    "DEFAULT_MAX_LENGTH",
    "PROPOSAL_INPUT_NAMES",
    "ROI_INPUT_NAMES",
    "CaptionLevel",
    "RegionMedCLIPImageProcessor",
    "RegionMedCLIPProcessor",
    "build_tokenizer",
    "caption_level",
    "load_medical_image",
    "load_medical_pil",
    "load_tokenizer",
    "proposal_heatmap",
    "proposal_windows",
]
