"""RegionMed-CLIP model package. The files beside this one travel to the Hub as remote code."""

from .attention_regionmed_clip import XFORMERS_AVAILABLE
from .configuration_regionmed_clip import (
    PRESETS,
    RegionMedCLIPConfig,
    RegionMedCLIPTextConfig,
    RegionMedCLIPVisionConfig,
)
from .loss_regionmed_clip import DEFAULT_LOSS_WEIGHTS, LOSS_TERMS, regionmed_clip_loss
from .modeling_regionmed_clip import RegionMedCLIPModel, RegionMedCLIPOutput, RegionMedCLIPPreTrainedModel
from .modeling_regionmed_clip_vqa import RegionMedCLIPForVQA, RegionMedCLIPVQAOutput

# save_pretrained then writes `auto_map` and copies the flat module files next to the weights.
RegionMedCLIPConfig.register_for_auto_class()
RegionMedCLIPModel.register_for_auto_class("AutoModel")
RegionMedCLIPForVQA.register_for_auto_class("AutoModelForVisualQuestionAnswering")

__all__ = [
    "PRESETS",
    "XFORMERS_AVAILABLE",
    "RegionMedCLIPConfig",
    "RegionMedCLIPForVQA",
    "RegionMedCLIPModel",
    "RegionMedCLIPOutput",
    "RegionMedCLIPPreTrainedModel",
    "RegionMedCLIPTextConfig",
    "RegionMedCLIPVQAOutput",
    "RegionMedCLIPVisionConfig",
    "DEFAULT_LOSS_WEIGHTS",
    "LOSS_TERMS",
    "regionmed_clip_loss",
]
