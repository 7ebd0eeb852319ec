"""RegionMed-CLIP model package. The files beside this one travel to the Hub as remote code."""

from .attention_regionmed_clip import XFORMERS_AVAILABLE
from .configuration_regionmed_clip import (
    CONFIG_ERRORS,
    DEFAULT_BACKGROUND_CAPTION,
    PRESETS,
    RegionMedCLIPConfig,
    RegionMedCLIPTextConfig,
    RegionMedCLIPVisionConfig,
)
from .modeling_regionmed_clip import (
    RegionMedCLIPModel,
    RegionMedCLIPOutput,
    RegionMedCLIPPreTrainedModel,
    RegionMedCLIPTextModel,
    RegionMedCLIPTextModelOutput,
    RegionMedCLIPTextModelWithProjection,
    RegionMedCLIPVisionModel,
    RegionMedCLIPVisionModelOutput,
    RegionMedCLIPVisionTowerWithProjection,
)
from .modeling_regionmed_clip_vqa import RegionMedCLIPForVQA, RegionMedCLIPVQAOutput

# save_pretrained then writes `auto_map` and copies the flat module files next to the weights.
RegionMedCLIPConfig.register_for_auto_class()
RegionMedCLIPModel.register_for_auto_class("AutoModel")
RegionMedCLIPForVQA.register_for_auto_class("AutoModelForVisualQuestionAnswering")

__all__ = [
    "CONFIG_ERRORS",
    "DEFAULT_BACKGROUND_CAPTION",
    "PRESETS",
    "XFORMERS_AVAILABLE",
    "RegionMedCLIPConfig",
    "RegionMedCLIPForVQA",
    "RegionMedCLIPModel",
    "RegionMedCLIPOutput",
    "RegionMedCLIPPreTrainedModel",
    "RegionMedCLIPTextConfig",
    "RegionMedCLIPTextModel",
    "RegionMedCLIPTextModelWithProjection",
    "RegionMedCLIPTextModelOutput",
    "RegionMedCLIPVQAOutput",
    "RegionMedCLIPVisionConfig",
    "RegionMedCLIPVisionModel",
    "RegionMedCLIPVisionModelOutput",
    "RegionMedCLIPVisionTowerWithProjection",
]
