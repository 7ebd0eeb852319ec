"""RegionMed-CLIP configuration: a ViT vision tower, a BERT-style text tower and the ROI processor.

The configs are transformers v5 configs: typed dataclass fields checked by `@strict` on creation and
on assignment (a wrong type raises `StrictDataclassFieldValidationError` naming the field), and
`validate_architecture` methods for the constraints between fields (a `StrictDataclassClassValidationError`
wrapping a ValueError that names them). Both are `CONFIG_ERRORS`.
"""

import copy
import dataclasses
import math
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

__all__ = [
    "CONFIG_ERRORS",
    "DEFAULT_BACKGROUND_CAPTION",
    "RegionMedCLIPConfig",
    "RegionMedCLIPTextConfig",
    "RegionMedCLIPVisionConfig",
    "PRESETS",
    "check_config_fields",
]

# What an invalid config raises: a ValueError from our own checks, a strict-dataclass error from the
# type and architecture validators.
CONFIG_ERRORS = (ValueError, TypeError, StrictDataclassError)


def check_config_fields(config_class: type, fields: Any, where: str, exclude: set[str] = frozenset()) -> None:
    """Raise ValueError naming any key of `fields` that `config_class` does not take: PreTrainedConfig
    would otherwise keep a typo such as `max_roi` as an attribute nobody reads."""
    allowed = ({field.name for field in dataclasses.fields(config_class)} - set(exclude)) | {"attn_implementation"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"{where} got unknown config fields {unknown}; allowed: {sorted(allowed)}")


def _require_positive_int(config_name: str, **fields: Any) -> None:
    for name, value in fields.items():
        if value <= 0:
            raise ValueError(f"{config_name}.{name} must be a positive integer, got {value!r}")


def _require_divisible(config_name: str, name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(
            f"{config_name}.{name} ({value}) must be divisible by {config_name}.{divisor_name} ({divisor})"
        )


def _require_probability(config_name: str, **fields: Any) -> None:
    for name, value in fields.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{config_name}.{name} must be in [0, 1), got {value!r}")


# How a tower turns its tokens into one feature: the first ([CLS]) token, as CLIP and BERT
# checkpoints were trained, or the mean of the (valid) tokens. A randomly initialised tower pooled
# at CLS maps every input to almost the same vector (mean pairwise cosine 0.99998 at init, tiny
# preset), which starves contrastive learning; mean pooling starts spread out (docs/TRAINING.md).
Pooling = Literal["cls", "mean"]
# The text tower may also pool CLIP's way: at the end-of-text token (`RegionMedCLIPTextConfig.pooling`).
TextPooling = Literal["cls", "mean", "eos"]


@strict
class RegionMedCLIPVisionConfig(PreTrainedConfig):
    """ViT image encoder shared by the global view and the ROI crops.

    `pre_layernorm` follows CLIP (a LayerNorm on the embeddings before the encoder); a ViT
    checkpoint has none, so `model_from_vision_text_pretrained` (training side) turns it off for those. `projection_dim`
    is that of `RegionMedCLIPVisionTowerWithProjection`; the composite config sets it.
    """

    model_type = "regionmed_clip_vision_model"
    base_config_key = "vision_config"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.0
    hidden_dropout: float | int = 0.0
    pre_layernorm: bool = True
    pooling: Pooling = "cls"
    initializer_range: float = 0.02
    projection_dim: int = 512

    def validate_architecture(self) -> None:
        name = type(self).__name__
        _require_positive_int(
            name, image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            projection_dim=self.projection_dim,
        )
        _require_divisible(name, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        _require_divisible(name, "image_size", self.image_size, "patch_size", self.patch_size)
        _require_probability(name, attention_dropout=self.attention_dropout, hidden_dropout=self.hidden_dropout)


@strict
class RegionMedCLIPTextConfig(PreTrainedConfig):
    """BERT-style text encoder (post-LayerNorm, learned absolute positions), pooled at the CLS token or by
    the mean of the valid tokens (`pooling`; the tiny and small presets pool the mean).

    Parameter names mirror `BertModel`, so a local PubMedBERT checkpoint loads into it directly.
    `projection_dim` is that of `RegionMedCLIPTextModelWithProjection`; the composite config sets it.

    CLIP's text transformer is the same tower with other options (`regionmed-convert --from clip` sets them):
        norm_first: pre-LayerNorm layers (CLIP) instead of post-LayerNorm (BERT, the default).
        causal: each token attends only to itself and the tokens before it (combined with padding).
        pooling "eos": the hidden state at the first `eos_token_id` of each caption; with `eos_token_id`
            2 the largest id of each caption instead (transformers' CLIPTextModel keeps this rule for old
            CLIP configs, whose end-of-text token is the vocabulary's last). Needs `causal`.
        embedding_layer_norm: BERT's LayerNorm (and dropout) on the embeddings; CLIP has none.
        type_vocab_size: 0 for no token-type embeddings (CLIP has none).
        final_layer_norm: a LayerNorm on the last layer's output before pooling (CLIP's, after
            pre-LayerNorm layers).
    Under "eos" pooling the padding token's embedding row is not frozen (`padding_idx`): CLIP pads with
    its end-of-text token, the one it pools.
    """

    model_type = "regionmed_clip_text_model"
    base_config_key = "text_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    attention_dropout: float | int = 0.0
    hidden_dropout: float | int = 0.1
    pad_token_id: int = 0
    cls_token_id: int = 2
    eos_token_id: int | None = None
    pooling: TextPooling = "cls"
    norm_first: bool = False
    causal: bool = False
    embedding_layer_norm: bool = True
    final_layer_norm: bool = False
    initializer_range: float = 0.02
    projection_dim: int = 512
    # Set by the composite config from its `text_projection_hidden_size` (None: one Linear; an int: an MLP).
    projection_hidden_size: int | None = None

    def validate_architecture(self) -> None:
        name = type(self).__name__
        if self.projection_hidden_size is not None:
            _require_positive_int(name, projection_hidden_size=self.projection_hidden_size)
        _require_positive_int(
            name, vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings, projection_dim=self.projection_dim,
        )
        if self.type_vocab_size < 0:
            raise ValueError(f"{name}.type_vocab_size must be 0 (no token types) or positive, got {self.type_vocab_size!r}")
        _require_divisible(name, "hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        _require_probability(name, attention_dropout=self.attention_dropout, hidden_dropout=self.hidden_dropout)
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"{name}.hidden_act {self.hidden_act!r} is not an activation transformers knows "
                             f"(e.g. 'gelu', 'quick_gelu')")
        if self.pooling == "eos" and self.eos_token_id is None:
            raise ValueError(f"{name}.pooling 'eos' needs eos_token_id (the end-of-text token it pools at)")
        if self.pooling == "eos" and not self.causal:
            raise ValueError(f"{name}.pooling 'eos' needs causal=True: it reads the end-of-text token, which sees the "
                             "whole caption only under CLIP's causal attention (use 'cls' or 'mean' otherwise)")
        if self.causal and self.pooling == "cls":
            raise ValueError(f"{name}.causal with pooling 'cls' would pool a first token that sees only itself: "
                             "use pooling 'eos' (CLIP's) or 'mean'")
        if self.final_layer_norm and not self.norm_first:
            raise ValueError(f"{name}.final_layer_norm is for pre-LayerNorm layers (norm_first=True): post-LayerNorm "
                             "layers already end in a LayerNorm")

    def validate_token_ids(self) -> None:
        """Stricter than the base class's warning: the tower indexes its embeddings with these ids."""
        name = type(self).__name__
        for field in ("pad_token_id", "cls_token_id", "eos_token_id"):
            value = getattr(self, field)
            if value is None:  # eos_token_id: only "eos" pooling reads it (validate_architecture)
                continue
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}.{field} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}")


# Presets are data. `tiny` is for unit tests and the CPU demo (< 1M parameters): a 128 px global view
# (at 64 px most synthetic lesions were 1-5 pixels across), mean pooling (a CLS-pooled fresh tower
# starts collapsed), box dropout (docs/TRAINING.md has the measurements) and no text dropout (on CPU
# its random masks cost more than the tiny text tower's matrix products: dropout of one 320 x 40 x 64
# caption activation took 24 ms, its 64 x 64 projection 1.8 ms; benchmarks/bench_train.py); `small`
# is the same recipe with 4 x 256 towers at 224 px (a real CPU run, or a quick GPU one); `base` is
# ViT-B/16 at 224 px with a PubMedBERT-sized (12 x 768) text tower, CLS-pooled like the checkpoints it can load.
# What a window without a lesion is captioned in training (see `RegionMedCLIPConfig.background_caption`).
DEFAULT_BACKGROUND_CAPTION = "no abnormality in this region"

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
            "hidden_dropout": 0.0,
        },
        "projection_dim": 64,
        "max_rois": 4,
        "roi_image_size": 32,
        "roi_context_grid": 2,
        "roi_fusion_layers": 1,
        "roi_fusion_heads": 4,
        "roi_box_dropout": 0.5,
    },
    "small": {
        "vision_config": {
            "image_size": 224,
            "patch_size": 16,
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
            "pooling": "mean",
        },
        "text_config": {
            "vocab_size": 8192,
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
            "max_position_embeddings": 256,
            "pooling": "mean",
            "hidden_dropout": 0.0,
        },
        "projection_dim": 256,
        "max_rois": 8,
        "roi_image_size": 112,
        "roi_context_grid": 3,
        "roi_fusion_layers": 2,
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


@strict
class RegionMedCLIPConfig(PreTrainedConfig):
    """Composite configuration of RegionMed-CLIP.

    ROI settings:
        max_rois: the most regions per image the processor emits (K in `(B, K, ...)` tensors; it
            keeps the first `max_rois` with a warning). The model has no per-slot weights and takes
            any K, so grounding can score more candidate windows than training used.
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
        background_caption: the region caption the model was trained to give a window that shows
            no lesion; box-free scoring (`regionmed-eval zero-shot`, the pipeline) sets it against the
            classes, so that each class is scored by the proposals that look like it and not like background.

    Text settings:
        text_projection_hidden_size: None (the default) projects the pooled caption with one Linear
            (`text_projection.weight`); an int H makes it open_clip's MLP text projection, Linear (no bias)
            -> GELU -> Linear (no bias) through H channels (`text_projection.0.weight`, `.2.weight`), as
            BiomedCLIP's (768 -> 640 -> 512).
        caption_length_buckets: the caption levels of a forward pass (report, summary, region,
            negatives) go through the text tower in this many passes at most: the report captions in
            one of their own, every other caption grouped by length into the rest, each pass trimmed
            to its longest caption, so short region captions are not padded to report length. 1
            encodes all of them in one pass padded to the longest (as before packing).

    VQA head settings (`RegionMedCLIPForVQA`; the answers are `id2label`):
        vqa_fusion_layers / vqa_fusion_heads: blocks in which the question tokens cross-attend to
            the image tokens, in the shared `projection_dim` space.
    """

    model_type = "regionmed_clip"
    sub_configs_defaults = {"vision_config": RegionMedCLIPVisionConfig, "text_config": RegionMedCLIPTextConfig}

    vision_config: dict | RegionMedCLIPVisionConfig | None = None
    text_config: dict | RegionMedCLIPTextConfig | None = None
    projection_dim: int = 512
    text_projection_hidden_size: int | None = None
    logit_scale_init_value: float | int = math.log(1 / 0.07)
    max_rois: int = 8
    roi_image_size: int = 112
    roi_context_grid: int = 3
    roi_fusion_layers: int = 2
    roi_fusion_heads: int = 12
    roi_gate_init: float | int = 0.0
    region_pool_gate_init: float | int = 0.0
    roi_box_dropout: float | int = 0.0
    proposal_window_sizes: list[float | int] | tuple[float | int, ...] = (0.25, 0.5)
    box_free_center_momentum: float | int = 0.9
    background_caption: str = DEFAULT_BACKGROUND_CAPTION
    caption_length_buckets: int = 6
    vqa_fusion_layers: int = 2
    vqa_fusion_heads: int = 8
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)  # builds the tower configs from dicts / defaults
        # The towers' own configs carry the shared embedding size, so that a `*WithProjection` tower
        # loads its projection from a full RegionMed-CLIP folder.
        self.vision_config.projection_dim = self.text_config.projection_dim = self.projection_dim
        self.text_config.projection_hidden_size = self.text_projection_hidden_size
        self.proposal_window_sizes = [float(size) for size in self.proposal_window_sizes]

    def validate_architecture(self) -> None:
        name = type(self).__name__
        _require_positive_int(
            name, projection_dim=self.projection_dim, max_rois=self.max_rois, roi_image_size=self.roi_image_size,
            roi_context_grid=self.roi_context_grid, roi_fusion_layers=self.roi_fusion_layers,
            roi_fusion_heads=self.roi_fusion_heads, vqa_fusion_layers=self.vqa_fusion_layers,
            vqa_fusion_heads=self.vqa_fusion_heads, caption_length_buckets=self.caption_length_buckets,
        )
        if self.text_projection_hidden_size is not None:
            _require_positive_int(name, text_projection_hidden_size=self.text_projection_hidden_size)
        _require_divisible(name, "projection_dim", self.projection_dim, "vqa_fusion_heads", self.vqa_fusion_heads)
        _require_probability(name, roi_box_dropout=self.roi_box_dropout,
                             box_free_center_momentum=self.box_free_center_momentum)
        for size in self.proposal_window_sizes:
            if not 0 < size <= 1:
                raise ValueError(f"{name}.proposal_window_sizes must hold fractions of the view side in (0, 1], "
                                 f"got {self.proposal_window_sizes!r}")
        if not self.background_caption.strip():
            raise ValueError(f"{name}.background_caption must be a non-empty caption")
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
            if not math.isfinite(getattr(self, field)):
                raise ValueError(f"{name}.{field} must be a finite number, got {getattr(self, field)!r}")
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
        """Build a config from a named preset (`PRESETS`: `tiny`, `small`, `base`); `overrides` replace top-level fields,
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
