"""RegionMed-CLIP configuration: a ViT vision tower, a BERT-style text tower and the ROI processor."""

import copy
import inspect
import math
from typing import Any

from transformers import PreTrainedConfig

__all__ = [
    "RegionMedCLIPConfig",
    "RegionMedCLIPTextConfig",
    "RegionMedCLIPVisionConfig",
    "PRESETS",
    "check_config_fields",
]


def check_config_fields(config_class: type, fields: Any, where: str, exclude: set[str] = frozenset()) -> None:
    """Raise ValueError naming any key of `fields` that `config_class` does not take: PreTrainedConfig
    would otherwise keep a typo such as `max_roi` as an attribute nobody reads."""
    allowed = (set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"} - set(exclude)) | {
        "attn_implementation", "dtype", "return_dict", "output_hidden_states"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"{where} got unknown config fields {unknown}; allowed: {sorted(allowed)}")


def _require_positive_int(config_name: str, **fields: Any) -> None:
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{config_name}.{name} must be a positive integer, got {value!r}")


def _require_divisible(config_name: str, name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(
            f"{config_name}.{name} ({value}) must be divisible by {config_name}.{divisor_name} ({divisor})"
        )


def _require_probability(config_name: str, **fields: Any) -> None:
    for name, value in fields.items():
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{config_name}.{name} must be in [0, 1), got {value!r}")


# How a tower turns its tokens into one feature: the first ([CLS]) token, as CLIP and BERT
# checkpoints were trained, or the mean of the (valid) tokens. A randomly initialised tower pooled
# at CLS maps every input to almost the same vector (mean pairwise cosine 0.99998 at init, tiny
# preset), which starves contrastive learning; mean pooling starts spread out (docs/TRAINING.md).
POOLING_MODES = ("cls", "mean")


def _require_pooling(config_name: str, pooling: Any) -> None:
    if pooling not in POOLING_MODES:
        raise ValueError(f"{config_name}.pooling must be one of {POOLING_MODES}, got {pooling!r}")


class RegionMedCLIPVisionConfig(PreTrainedConfig):
    """ViT image encoder shared by the global view and the ROI crops.

    `pre_layernorm` follows CLIP (a LayerNorm on the embeddings before the encoder); a ViT
    checkpoint has none, so `from_vision_text_pretrained` turns it off for those.
    """

    model_type = "regionmed_clip_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        pre_layernorm: bool = True,
        pooling: str = "cls",
        initializer_range: float = 0.02,
        projection_dim: int = 512,
        **kwargs: Any,
    ):
        self.projection_dim = projection_dim  # of `RegionMedCLIPVisionModelWithProjection`; the composite config sets it
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.pre_layernorm = pre_layernorm
        self.pooling = pooling
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        name = type(self).__name__
        _require_positive_int(
            name,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
        )
        _require_divisible(name, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        _require_divisible(name, "image_size", self.image_size, "patch_size", self.patch_size)
        _require_probability(name, attention_dropout=self.attention_dropout, hidden_dropout=self.hidden_dropout)
        _require_pooling(name, self.pooling)


class RegionMedCLIPTextConfig(PreTrainedConfig):
    """BERT-style text encoder (post-LayerNorm, learned absolute positions), pooled at the CLS token.

    Parameter names mirror `BertModel`, so a local PubMedBERT checkpoint loads into it directly.
    """

    model_type = "regionmed_clip_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.1,
        pad_token_id: int = 0,
        cls_token_id: int = 2,
        pooling: str = "cls",
        initializer_range: float = 0.02,
        projection_dim: int = 512,
        **kwargs: Any,
    ):
        self.projection_dim = projection_dim  # of `RegionMedCLIPTextModelWithProjection`; the composite config sets it
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.cls_token_id = cls_token_id
        self.pooling = pooling
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.validate()

    def validate(self) -> None:
        name = type(self).__name__
        _require_positive_int(
            name,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
        )
        _require_divisible(name, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        _require_probability(name, attention_dropout=self.attention_dropout, hidden_dropout=self.hidden_dropout)
        _require_pooling(name, self.pooling)
        for field in ("pad_token_id", "cls_token_id"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}.{field} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}")


# Presets are data. `tiny` is for unit tests and the CPU demo (< 1M parameters): a 128 px global view
# (at 64 px most synthetic lesions were 1-5 pixels across), mean pooling (a CLS-pooled fresh tower
# starts collapsed) and box dropout (docs/TRAINING.md has the measurements); `base` is ViT-B/16 at
# 224 px with a PubMedBERT-sized (12 x 768) text tower, CLS-pooled like the checkpoints it can load.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision_config": {
            "image_size": 128,
            "patch_size": 8,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "pooling": "mean",
        },
        "text_config": {
            "vocab_size": 4096,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "max_position_embeddings": 256,
            "pooling": "mean",
        },
        "projection_dim": 64,
        "max_rois": 4,
        "roi_image_size": 32,
        "roi_context_grid": 2,
        "roi_fusion_layers": 1,
        "roi_fusion_heads": 4,
        "roi_box_dropout": 0.5,
    },
    "base": {
        "vision_config": {
            "image_size": 224,
            "patch_size": 16,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
        },
        "text_config": {
            "vocab_size": 30522,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "max_position_embeddings": 512,
        },
        "projection_dim": 512,
        "max_rois": 8,
        "roi_image_size": 112,
        "roi_context_grid": 3,
        "roi_fusion_layers": 2,
        "roi_fusion_heads": 12,
        "roi_box_dropout": 0.5,
    },
}


class RegionMedCLIPConfig(PreTrainedConfig):
    """Composite configuration of RegionMed-CLIP.

    ROI settings:
        max_rois: the most regions per image the processor emits (K in `(B, K, ...)` tensors).
        roi_image_size: side of the square ROI crop fed to the vision tower (position
            embeddings are interpolated to it); must be a multiple of the patch size.
        roi_context_grid: RoIAlign output side G: each ROI pools G x G bins of context from
            the global patch grid.
        roi_fusion_layers / roi_fusion_heads: cross-attention blocks from each ROI token to the
            global patch tokens.
        roi_gate_init: initial value of the gate on the fused (cross-attended) residual;
            `tanh(gate)` scales it, so 0 starts the ROI processor as the identity.
        region_pool_gate_init: initial value of the gate on the attention-pooled regions that
            are added to the global image embedding (0 => image embedding = global embedding).
        roi_box_dropout: in training, the probability that a region's box embedding is dropped
            (zeroed), so that regions cannot answer from the coordinates alone.
        proposal_window_sizes: box-free proposals: sliding square windows of these sides (fractions
            of the view side, stride half a side) are pooled from the global patch grid by the dense
            head and log-sum-exp pooled into the image feature; empty turns them off (plain CLIP pooling).
        box_free_center_momentum: EMA momentum of the running batch mean subtracted from the box-free
            image feature (DINO-style centering, updated in training mode only); 0 disables the update.

    VQA head settings (`RegionMedCLIPForVQA`; the answers are `id2label`):
        vqa_fusion_layers / vqa_fusion_heads: blocks in which the question tokens cross-attend to
            the image tokens, in the shared `projection_dim` space.
    """

    model_type = "regionmed_clip"
    sub_configs = {"vision_config": RegionMedCLIPVisionConfig, "text_config": RegionMedCLIPTextConfig}

    def __init__(
        self,
        vision_config: dict | RegionMedCLIPVisionConfig | None = None,
        text_config: dict | RegionMedCLIPTextConfig | None = None,
        projection_dim: int = 512,
        logit_scale_init_value: float = math.log(1 / 0.07),
        max_rois: int = 8,
        roi_image_size: int = 112,
        roi_context_grid: int = 3,
        roi_fusion_layers: int = 2,
        roi_fusion_heads: int = 12,
        roi_gate_init: float = 0.0,
        region_pool_gate_init: float = 0.0,
        roi_box_dropout: float = 0.0,
        proposal_window_sizes: list[float] | tuple[float, ...] = (0.25, 0.5),
        box_free_center_momentum: float = 0.9,
        vqa_fusion_layers: int = 2,
        vqa_fusion_heads: int = 8,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = RegionMedCLIPVisionConfig(**(vision_config or {}))
        if isinstance(text_config, dict) or text_config is None:
            text_config = RegionMedCLIPTextConfig(**(text_config or {}))
        if not isinstance(vision_config, RegionMedCLIPVisionConfig):
            raise TypeError(f"RegionMedCLIPConfig.vision_config must be a dict or RegionMedCLIPVisionConfig, got {type(vision_config).__name__}")
        if not isinstance(text_config, RegionMedCLIPTextConfig):
            raise TypeError(f"RegionMedCLIPConfig.text_config must be a dict or RegionMedCLIPTextConfig, got {type(text_config).__name__}")
        # The towers' own configs carry the shared embedding size, so that a `*WithProjection` tower
        # loads its projection from a full RegionMed-CLIP folder.
        vision_config.projection_dim = text_config.projection_dim = projection_dim
        self.vision_config = vision_config
        self.text_config = text_config
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        self.max_rois = max_rois
        self.roi_image_size = roi_image_size
        self.roi_context_grid = roi_context_grid
        self.roi_fusion_layers = roi_fusion_layers
        self.roi_fusion_heads = roi_fusion_heads
        self.roi_gate_init = roi_gate_init
        self.region_pool_gate_init = region_pool_gate_init
        self.roi_box_dropout = roi_box_dropout
        self.proposal_window_sizes = [float(size) for size in proposal_window_sizes]
        self.box_free_center_momentum = box_free_center_momentum
        self.vqa_fusion_layers = vqa_fusion_layers
        self.vqa_fusion_heads = vqa_fusion_heads
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        name = type(self).__name__
        _require_positive_int(
            name,
            projection_dim=self.projection_dim,
            max_rois=self.max_rois,
            roi_image_size=self.roi_image_size,
            roi_context_grid=self.roi_context_grid,
            roi_fusion_layers=self.roi_fusion_layers,
            roi_fusion_heads=self.roi_fusion_heads,
            vqa_fusion_layers=self.vqa_fusion_layers,
            vqa_fusion_heads=self.vqa_fusion_heads,
        )
        if self.projection_dim % self.vqa_fusion_heads != 0:
            raise ValueError(f"{name}.projection_dim ({self.projection_dim}) must be divisible by "
                             f"{name}.vqa_fusion_heads ({self.vqa_fusion_heads})")
        _require_probability(name, roi_box_dropout=self.roi_box_dropout,
                             box_free_center_momentum=self.box_free_center_momentum)
        for size in self.proposal_window_sizes:
            if not 0 < size <= 1:
                raise ValueError(f"{name}.proposal_window_sizes must hold fractions of the view side in (0, 1], "
                                 f"got {self.proposal_window_sizes!r}")
        patch = self.vision_config.patch_size
        if self.roi_image_size % patch != 0:
            raise ValueError(
                f"{name}.roi_image_size ({self.roi_image_size}) must be divisible by vision_config.patch_size ({patch})"
            )
        hidden = self.vision_config.hidden_size
        if hidden % self.roi_fusion_heads != 0:
            raise ValueError(
                f"vision_config.hidden_size ({hidden}) must be divisible by {name}.roi_fusion_heads ({self.roi_fusion_heads})"
            )
        for field in ("logit_scale_init_value", "roi_gate_init", "region_pool_gate_init"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}.{field} must be a finite number, got {value!r}")
        if self.logit_scale_init_value > math.log(100.0):
            raise ValueError(
                f"{name}.logit_scale_init_value ({self.logit_scale_init_value}) exceeds log(100), the CLIP clamp"
            )

    @classmethod
    def check_fields(cls, fields: Any, where: str, exclude: set[str] = frozenset()) -> None:
        """Raise ValueError naming unknown keys of `fields` (and of nested vision/text dicts)."""
        check_config_fields(cls, fields, where, exclude)
        for key, sub_config_class in cls.sub_configs.items():
            if isinstance(fields.get(key), dict):
                check_config_fields(sub_config_class, fields[key], f"{where}.{key}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "RegionMedCLIPConfig":
        """Build a config from a named preset (`tiny`, `base`); `overrides` replace top-level fields,
        and `vision_config` / `text_config` dicts are merged into the preset's."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        cls.check_fields(overrides, f"from_preset({name!r})")
        fields = copy.deepcopy(PRESETS[name])
        for key, value in overrides.items():
            if key in ("vision_config", "text_config") and isinstance(value, dict):
                fields[key].update(value)
            else:
                fields[key] = value
        return cls(**fields)
