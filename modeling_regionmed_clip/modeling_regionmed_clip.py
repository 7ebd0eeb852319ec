"""RegionMed-CLIP: a region-aware contrastive vision-language model.

One ViT encodes the global view and, packed across the batch, every valid ROI crop. The ROI
processor (`roi_regionmed_clip.py`) turns each crop's CLS feature, an embedding of its box and
RoIAlign context pooled from the global patch grid into a region token, lets it cross-attend to the
global patch tokens through gated residuals, and attention-pools the regions back into the image
embedding through a second gate. Without boxes, sliding windows of the global patch grid are pooled
instead (`box_free_regionmed_clip.py`). A BERT-style text tower embeds captions, packed by length
(`packing_regionmed_clip.py`).
"""

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .box_free_regionmed_clip import pool_window_features
from .configuration_regionmed_clip import (
    RegionMedCLIPConfig,
    RegionMedCLIPTextConfig,
    RegionMedCLIPVisionConfig,
)
from .layers_regionmed_clip import RegionMedCLIPAttention, RegionMedCLIPMLP
from .packing_regionmed_clip import (
    caption_lengths,
    length_groups,
    pad_and_join,
    scatter_rows,
    trim_padding,
    valid_rows,
)
from .roi_regionmed_clip import RegionMedCLIPFusionLayer, RegionMedCLIPROIProcessor, check_region_inputs

__all__ = [
    "LOGIT_SCALE_MAX",
    "RegionMedCLIPModel",
    "RegionMedCLIPOutput",
    "RegionMedCLIPPreTrainedModel",
    "RegionMedCLIPTextModel",
    "RegionMedCLIPTextModelWithProjection",
    "RegionMedCLIPTextModelOutput",
    "RegionMedCLIPVisionModelOutput",
    "RegionMedCLIPVisionModel",
    "RegionMedCLIPVisionTowerWithProjection",
    "build_text_projection",
    "clamped_logit_scale",
    "clip_loss",
]

# CLIP clamps the learnable temperature so logits never exceed 100 x cosine similarity.
LOGIT_SCALE_MAX = 100.0
# Crops per vision-tower call when no gradient is kept (see `RegionMedCLIPModel._encode_regions`).
_INFERENCE_CROP_CHUNK = 1024


def clamped_logit_scale(log_logit_scale: torch.Tensor) -> torch.Tensor:
    """`exp(log_logit_scale)` clamped to `LOGIT_SCALE_MAX`, as a 0-d tensor (from a `()` or `(1,)` parameter)."""
    return log_logit_scale.exp().clamp(max=LOGIT_SCALE_MAX).reshape(())


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy of `(N, N)` matched logits (text i belongs to image i), as
    transformers' CLIPModel computes it. The multi-level objective is training-side
    (`training_scripts/losses.py`)."""
    targets = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (nn.functional.cross_entropy(logits_per_text, targets)
            + nn.functional.cross_entropy(logits_per_text.t(), targets)) / 2


def build_text_projection(hidden_size: int, projection_dim: int, projection_hidden_size: int | None) -> nn.Module:
    """The caption projection: one Linear without bias (`projection_hidden_size` None, CLIP's), or open_clip's MLP
    text projection, Linear -> GELU -> Linear without biases through `projection_hidden_size` channels (BiomedCLIP's)."""
    if projection_hidden_size is None:
        return nn.Linear(hidden_size, projection_dim, bias=False)
    return nn.Sequential(nn.Linear(hidden_size, projection_hidden_size, bias=False), nn.GELU(),
                         nn.Linear(projection_hidden_size, projection_dim, bias=False))


_OUTPUT_MASKS = ("roi_mask", "negative_mask", "region_negative_mask", "proposal_mask")


@dataclass
class RegionMedCLIPOutput(ModelOutput):
    """Output of `RegionMedCLIPModel.forward`. Embeddings are L2-normalised.

    loss: CLIP's contrastive loss of the report captions and images (when `return_loss`).
    logits_per_image: `(B, T)` scaled cosine similarities; `logits_per_text` is its transpose.
    logit_scale: `()` the clamped temperature they were scaled by (the training objective reuses it).
    image_embeds: `(B, D)` global embedding plus the gated pool of the regions (or, box-free, of the proposals).
    text_embeds: `(T, D)` report captions.
    region_embeds: `(B, K, D)`, zeros where `roi_mask` is False; None without ROI inputs.
    roi_mask: `(B, K)` int 0/1, which ROIs are real (the given `roi_mask`, all ones by default).
    box_free_image_embeds: `(B, D)` box-free: the global view with its proposal windows pooled, before
    any given region is pooled (what a user without boxes gets).
    summary_text_embeds: `(B, D)`; region_text_embeds: `(B, K, D)` (zeros at padding slots);
    negative_text_embeds: `(B, M, D)` with `negative_mask (B, M)` (int 0/1, as every mask here).
    dense_region_embeds: `(B, K, D)` each ROI's box pooled from the global patch grid alone (no
    crop), zeros at padding; region_negative_text_embeds: `(B, K, M, D)` with `region_negative_mask (B, K, M)`.
    proposal_embeds: `(B, P, D)` each box-free proposal read as a region (zeros at padding), with
    `proposal_mask (B, P)`: what a class's best-matching region is found among.
    vision_model_output: the global view's tower output; text_model_output: the report captions' (their
    rows of the packed caption pass). With `output_hidden_states` / `output_attentions` they hold every
    layer's hidden states (`num_layers + 1`) and attention weights (none from backends that do not
    return weights, e.g. SDPA: use `attn_implementation="eager"`).
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    region_embeds: torch.Tensor | None = None
    roi_mask: torch.Tensor | None = None
    box_free_image_embeds: torch.Tensor | None = None
    summary_text_embeds: torch.Tensor | None = None
    region_text_embeds: torch.Tensor | None = None
    negative_text_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    dense_region_embeds: torch.Tensor | None = None
    region_negative_text_embeds: torch.Tensor | None = None
    region_negative_mask: torch.Tensor | None = None
    proposal_embeds: torch.Tensor | None = None
    proposal_mask: torch.Tensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k].to_tuple() if k in ("vision_model_output", "text_model_output") else self[k] for k in self.keys()
        )


class RegionMedCLIPEncoderLayer(GradientCheckpointingLayer):
    """Transformer block; pre-LayerNorm (ViT/CLIP) when `norm_first`, else post-LayerNorm (BERT)."""

    def __init__(self, config: RegionMedCLIPVisionConfig | RegionMedCLIPTextConfig, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = RegionMedCLIPAttention(
            config, config.hidden_size, config.num_attention_heads, config.attention_dropout
        )
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = RegionMedCLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """`(N, S, C)` -> `(N, S, C)`; the attention weights are recorded from `self_attn` (`capture_outputs`)."""
        if self.norm_first:
            attn_output, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask, **kwargs)
            hidden_states = hidden_states + self.dropout(attn_output)
            return hidden_states + self.dropout(self.mlp(self.layer_norm2(hidden_states)))
        attn_output, _ = self.self_attn(hidden_states, attention_mask, **kwargs)
        hidden_states = self.layer_norm1(hidden_states + self.dropout(attn_output))
        return self.layer_norm2(hidden_states + self.dropout(self.mlp(hidden_states)))


class RegionMedCLIPEncoder(nn.Module):
    def __init__(self, config: RegionMedCLIPVisionConfig | RegionMedCLIPTextConfig, norm_first: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            [RegionMedCLIPEncoderLayer(config, norm_first) for _ in range(config.num_hidden_layers)]
        )

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        """The last layer's output; each layer's input and output and attention weights are recorded by
        the tower's `capture_outputs` on request (`num_layers + 1` hidden states, as transformers' encoders)."""
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


class RegionMedCLIPVisionEmbeddings(nn.Module):
    """Patch + CLS + learned positions; positions are bicubically resized for other input sizes."""

    def __init__(self, config: RegionMedCLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.grid_size = config.image_size // config.patch_size
        self.num_positions = self.grid_size**2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def position_embeddings_for(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """`(1, 1 + gh * gw, C)` position embeddings for a `gh x gw` patch grid."""
        positions = self.position_embedding(self.position_ids)
        if (grid_height, grid_width) == (self.grid_size, self.grid_size):
            return positions
        class_position, patch_positions = positions[:, :1], positions[:, 1:]
        patch_positions = patch_positions.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        patch_positions = nn.functional.interpolate(
            patch_positions, size=(grid_height, grid_width), mode="bicubic", align_corners=False
        )
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, -1)
        return torch.cat([class_position, patch_positions], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """pixel_values `(N, 3, H, W)` with H, W multiples of the patch size -> `(N, 1 + P, C)` and the grid."""
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"pixel_values spatial size {height}x{width} must be a multiple of patch_size {self.patch_size}"
            )
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        class_tokens = self.class_embedding.expand(patches.shape[0], 1, -1)
        grid = (height // self.patch_size, width // self.patch_size)
        embeddings = torch.cat([class_tokens, patches], dim=1) + self.position_embeddings_for(*grid)
        return embeddings, grid


class RegionMedCLIPPreTrainedModel(PreTrainedModel):
    config_class = RegionMedCLIPConfig
    config: RegionMedCLIPConfig
    base_model_prefix = "regionmed_clip"
    input_modalities = ("image", "text")
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["RegionMedCLIPEncoderLayer", "RegionMedCLIPFusionLayer", "RegionMedCLIPVisionEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, RegionMedCLIPVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, RegionMedCLIPTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[1]).expand((1, -1)))
        elif isinstance(module, RegionMedCLIPFusionLayer):
            init.constant_(module.attn_gate, self.config.roi_gate_init)
            init.constant_(module.mlp_gate, self.config.roi_gate_init)
        elif isinstance(module, RegionMedCLIPROIProcessor):
            init.constant_(module.pool_gate, self.config.region_pool_gate_init)
        elif isinstance(module, RegionMedCLIPModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.zeros_(module.box_free_center)


# What the towers' `capture_outputs` records on request: each encoder layer's output (and the first
# one's input) and each self-attention's weights. Declared on the towers, not the base class: the
# composite models' own attention modules (ROI fusion, VQA fusion) run outside the towers and must
# not be recorded as tower layers.
_TOWER_RECORDED_OUTPUTS = {"hidden_states": RegionMedCLIPEncoderLayer, "attentions": RegionMedCLIPAttention}


class RegionMedCLIPVisionModel(RegionMedCLIPPreTrainedModel):
    """The vision tower (ViT), a model of its own with its own config and attention backend. Returns
    post-LayerNorm tokens `(N, 1 + P, C)` and, as pooler output `(N, C)`, the CLS token or the mean of
    the patch tokens (`config.pooling`)."""

    config_class = RegionMedCLIPVisionConfig
    config: RegionMedCLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _can_record_outputs = _TOWER_RECORDED_OUTPUTS

    def __init__(self, config: RegionMedCLIPVisionConfig):
        super().__init__(config)
        self.embeddings = RegionMedCLIPVisionEmbeddings(config)
        self.pre_layrnorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm else nn.Identity()
        )
        self.encoder = RegionMedCLIPEncoder(config, norm_first=True)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    # The recorded last hidden state is the encoder's, before `post_layernorm` (as CLIP's).
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPooling:
        """pixel_values `(N, 3, H, W)`; `output_hidden_states` / `output_attentions` default to the config's;
        a tuple with `return_dict=False`."""
        embeddings, _ = self.embeddings(pixel_values)
        encoded = self.encoder(self.pre_layrnorm(embeddings), None, **kwargs)
        # Normalise every token, not only CLS: the ROI processor reads the patch tokens as context.
        hidden_states = self.post_layernorm(encoded.last_hidden_state)
        pooled = hidden_states[:, 0] if self.config.pooling == "cls" else hidden_states[:, 1:].mean(dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


class RegionMedCLIPTextEmbeddings(nn.Module):
    """Token + learned position (+ token type) embeddings, then LayerNorm and dropout (BERT's; CLIP's have
    no token types, `type_vocab_size` 0, and no LayerNorm, `embedding_layer_norm` False)."""

    def __init__(self, config: RegionMedCLIPTextConfig):
        super().__init__()
        # CLIP pads with its end-of-text token, the one "eos" pooling reads: its row must keep learning.
        padding_idx = None if config.pooling == "eos" else config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.type_vocab_size else None)
        self.LayerNorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                          if config.embedding_layer_norm else nn.Identity())
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids `(T, L)`; token_type_ids `(T, L)` (BERT segments; default 0 everywhere) -> `(T, L, C)`."""
        seq_len = input_ids.shape[1]
        max_len = self.position_ids.shape[1]
        if seq_len > max_len:
            raise ValueError(
                f"input_ids has {seq_len} tokens but text_config.max_position_embeddings is {max_len}; "
                "truncate the captions (the processor does by default)"
            )
        if self.token_type_embeddings is None:
            if token_type_ids is not None:
                raise ValueError("token_type_ids were given but this text tower has no token types "
                                 "(text_config.type_vocab_size is 0)")
            token_types = 0.0
        elif token_type_ids is None:  # single-segment captions: type 0 everywhere, as BERT sees a lone sentence
            token_types = self.token_type_embeddings.weight[0]
        else:
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(f"token_type_ids {tuple(token_type_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
            token_types = self.token_type_embeddings(token_type_ids)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :seq_len]) + token_types
        return self.dropout(self.LayerNorm(embeddings))


class RegionMedCLIPTextModel(RegionMedCLIPPreTrainedModel):
    """The text tower (BERT-style), a model of its own with its own config and attention backend,
    pooled at the first ([CLS]) token or by the mean of the valid tokens (`config.pooling`). With
    `norm_first`, `causal`, `final_layer_norm` and "eos" pooling it is CLIP's text transformer."""

    config_class = RegionMedCLIPTextConfig
    config: RegionMedCLIPTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)
    _can_record_outputs = _TOWER_RECORDED_OUTPUTS

    def __init__(self, config: RegionMedCLIPTextConfig):
        super().__init__(config)
        self.embeddings = RegionMedCLIPTextEmbeddings(config)
        self.encoder = RegionMedCLIPEncoder(config, norm_first=config.norm_first)
        for layer in self.encoder.layers:  # read by the SDPA / flash backends when no mask is materialised
            layer.self_attn.is_causal = config.causal
        if config.final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @capture_outputs
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPooling:
        """input_ids `(T, L)`, attention_mask `(T, L)` 1 = token, 0 = padding; token_type_ids `(T, L)` optional;
        `output_hidden_states` / `output_attentions` default to the config's; a tuple with `return_dict=False`."""
        hidden_states = self.embeddings(input_ids, token_type_ids)
        # In the backend's format; causal (CLIP) combined with the padding mask.
        if self.config.causal:
            mask = create_causal_mask(self.config, hidden_states, attention_mask, cache=None)
        else:
            mask = create_bidirectional_mask(self.config, hidden_states, attention_mask)
        hidden_states = self.encoder(hidden_states, mask, **kwargs).last_hidden_state
        if self.config.final_layer_norm:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.config.pooling == "eos":
            rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
            if self.config.eos_token_id == 2:
                # transformers' CLIPTextModel rule for old CLIP configs (eos_token_id 2): each row's largest id
                position = input_ids.to(torch.int).argmax(dim=-1)
            else:  # the first end-of-text token of each row
                position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
            pooled = hidden_states[rows, position.to(hidden_states.device)]
        elif self.config.pooling == "cls":
            pooled = hidden_states[:, 0]
        elif attention_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            weights = attention_mask.to(hidden_states.dtype)[..., None]
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


@dataclass
class RegionMedCLIPTextModelOutput(ModelOutput):
    """Output of `RegionMedCLIPTextModelWithProjection` (CLIPTextModelOutput's fields): `text_embeds`
    `(T, D)` the projected pooled output (unnormalised), `last_hidden_state` `(T, L, C)`, and per
    request `hidden_states` / `attentions`."""

    text_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class RegionMedCLIPVisionModelOutput(ModelOutput):
    """Output of `RegionMedCLIPVisionTowerWithProjection` (CLIPVisionModelOutput's fields): `image_embeds`
    `(N, D)` the projected pooled output (unnormalised), `last_hidden_state` `(N, 1 + P, C)`, and per
    request `hidden_states` / `attentions`."""

    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class RegionMedCLIPTextModelWithProjection(RegionMedCLIPPreTrainedModel):
    """The text tower and its projection: exactly the caption embeddings of `RegionMedCLIPModel`
    (`from_pretrained` on a full RegionMed-CLIP folder loads both), for text-only use such as
    indexing reports for retrieval."""

    config_class = RegionMedCLIPTextConfig
    config: RegionMedCLIPTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)

    def __init__(self, config: RegionMedCLIPTextConfig):
        super().__init__(config)
        self.text_model = RegionMedCLIPTextModel._from_config(config)
        self.text_projection = build_text_projection(config.hidden_size, config.projection_dim,
                                                     config.projection_hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.set_input_embeddings(value)

    @can_return_tuple
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> RegionMedCLIPTextModelOutput:
        output = self.text_model(input_ids, attention_mask, token_type_ids, return_dict=True, **kwargs)
        return RegionMedCLIPTextModelOutput(text_embeds=self.text_projection(output.pooler_output),
                                            last_hidden_state=output.last_hidden_state,
                                            hidden_states=output.hidden_states, attentions=output.attentions)


class RegionMedCLIPVisionTowerWithProjection(RegionMedCLIPPreTrainedModel):
    """The vision tower alone and its projection of the pooled (CLS / mean) token: what the model's shared
    tower makes of one image or crop (an ROI's crop feature before fusion), and a plain ViT backbone. The
    model's own image embedding adds proposals, regions and centring: `RegionMedCLIPModel.get_image_features`."""

    config_class = RegionMedCLIPVisionConfig
    config: RegionMedCLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: RegionMedCLIPVisionConfig):
        super().__init__(config)
        self.vision_model = RegionMedCLIPVisionModel._from_config(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor,
                **kwargs: Unpack[TransformersKwargs]) -> RegionMedCLIPVisionModelOutput:
        output = self.vision_model(pixel_values, return_dict=True, **kwargs)
        return RegionMedCLIPVisionModelOutput(image_embeds=self.visual_projection(output.pooler_output),
                                              last_hidden_state=output.last_hidden_state,
                                              hidden_states=output.hidden_states, attentions=output.attentions)


class RegionMedCLIPModel(RegionMedCLIPPreTrainedModel):
    """RegionMed-CLIP. Without ROI inputs it is a plain global CLIP."""

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__(config)
        # Each tower is a model of its own (as CLIPModel's): it resolves its own config's attention
        # backend, so `attn_implementation={"vision_config": ..., "text_config": ...}` is honoured.
        self.vision_model = RegionMedCLIPVisionModel._from_config(config.vision_config)
        self.text_model = RegionMedCLIPTextModel._from_config(config.text_config)
        self.roi_processor = RegionMedCLIPROIProcessor(config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = build_text_projection(config.text_config.hidden_size, config.projection_dim,
                                                     config.text_projection_hidden_size)
        # Shape (1,), not (): FSDP refuses 0-d parameters. Read it through `clamped_logit_scale`.
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init_value)))
        # Running mean of the box-free feature over training batches, subtracted from it (DINO's
        # centering): films share most of their anatomy, and that shared part would otherwise dominate
        # every image embedding (mean pairwise cosine ~0.99) and drown the findings that tell films apart.
        self.register_buffer("box_free_center", torch.zeros(config.vision_config.hidden_size))
        self.post_init()

    # -- embeddings (PEFT, resize_token_embeddings, gradient checkpointing) ------------------

    def get_input_embeddings(self) -> nn.Embedding:
        """The text tower's token embeddings `(vocab_size, hidden)`."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.set_input_embeddings(value)

    def enable_input_require_grads(self) -> None:
        """Make both towers' embedding outputs require grad, so that reentrant gradient checkpointing
        with frozen weights (LoRA) still back-propagates into the adapters of EVERY layer; the base
        class would hook the token embeddings only and leave the vision tower's layers without gradient."""

        def require_grads(module: nn.Module, inputs: Any, output: Any) -> None:
            (output[0] if isinstance(output, tuple) else output).requires_grad_(True)

        self._require_grads_hooks = [self.text_model.embeddings.register_forward_hook(require_grads),
                                     self.vision_model.embeddings.register_forward_hook(require_grads)]
        self._require_grads_hook = self._require_grads_hooks[0]  # the attribute older transformers code reads

    def _with_config_output_flags(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` with the output flags this model's config asks for. A tower's `capture_outputs` reads
        the call's flags, else only the tower's own config: so either config may ask, as before the
        towers were models of their own. A flag passed as None is dropped, which leaves it to the tower."""
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag) is None:
                kwargs.pop(flag, None)
                if getattr(self.config, flag):
                    kwargs[flag] = True
        return kwargs

    # -- features -------------------------------------------------------------------------

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """The text tower's output with `pooler_output` the projected (unnormalised) caption embeddings
        `(T, D)`, as transformers v5's CLIPModel; `last_hidden_state` `(T, L, C)`; per request every
        layer's hidden states and attention weights; a tuple with `return_dict=False`."""
        output = self.text_model(input_ids, attention_mask, token_type_ids, return_dict=True,
                                 **self._with_config_output_flags(kwargs))
        output.pooler_output = self.text_projection(output.pooler_output)
        return output

    def _encode_regions(
        self,
        vision_output: BaseModelOutputWithPooling,
        roi_pixel_values: torch.Tensor,
        roi_boxes: torch.Tensor,
        roi_mask: torch.Tensor,
        patch_grid: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Region features `(B, K, C)`, gated region pool `(B, C)` and dense region features
        `(B, K, C)` in the vision hidden space."""
        global_tokens = vision_output.last_hidden_state
        batch, num_rois = roi_mask.shape
        hidden = global_tokens.shape[-1]
        if num_rois == 0:
            # A batch in which no image has a region still runs the ROI modules on one empty slot:
            # under FSDP every rank must call the same modules, or the others wait for it forever.
            features, pool, dense = self._encode_regions(
                vision_output,
                roi_pixel_values.new_zeros((batch, 1, *roi_pixel_values.shape[2:])),
                roi_boxes.new_zeros((batch, 1, 4)),
                roi_mask.new_zeros((batch, 1)),
                patch_grid,
            )
            return features[:, :0], pool, dense[:, :0]
        # Encode only the valid crops, packed across the batch: padding costs no tower compute.
        index, (valid_crops,) = valid_rows(roi_mask, roi_pixel_values)
        no_outputs = {"output_hidden_states": False, "output_attentions": False, "return_dict": True}
        if valid_crops.shape[0]:  # known on the host once the mask is read
            # Without gradients (inference: hundreds of proposals per film) the crops go through in
            # chunks, so activation memory is bounded by the chunk, not by the proposal count.
            chunk = valid_crops.shape[0] if torch.is_grad_enabled() else _INFERENCE_CROP_CHUNK
            packed = torch.cat([self.vision_model(part, **no_outputs).pooler_output
                                for part in valid_crops.split(chunk)])
            crop_features = scatter_rows(packed, index, roi_mask.shape)
        else:  # one blank crop, discarded, for the same FSDP reason
            blank = self.vision_model(roi_pixel_values.new_zeros((1, *roi_pixel_values.shape[2:])),
                                      **no_outputs).pooler_output
            crop_features = global_tokens.new_zeros(batch, num_rois, hidden) + 0.0 * blank.sum()
        # Padding slots may hold anything; give them a harmless box so they stay finite.
        safe_boxes = torch.where(roi_mask[..., None], roi_boxes, torch.zeros_like(roi_boxes)).to(global_tokens.dtype)
        return self.roi_processor(crop_features, safe_boxes, roi_mask, global_tokens, patch_grid)

    def _vision_forward(
        self,
        pixel_values: torch.Tensor,
        roi_pixel_values: torch.Tensor | None = None,
        roi_boxes: torch.Tensor | None = None,
        roi_mask: torch.Tensor | None = None,
        proposal_pixel_values: torch.Tensor | None = None,
        proposal_boxes: torch.Tensor | None = None,
        proposal_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> dict[str, Any]:
        """The global view through the vision tower (`kwargs` its output flags), the box-free feature,
        and the given regions or proposals read and pooled; projected, not normalised."""
        roi_mask = check_region_inputs(pixel_values, roi_pixel_values, roi_boxes, roi_mask)
        proposal_mask = check_region_inputs(pixel_values, proposal_pixel_values, proposal_boxes, proposal_mask,
                                            "proposal")
        if roi_mask is not None and proposal_mask is not None:
            raise ValueError("give ROI inputs (the regions to read) or proposal inputs (box-free), not both: the "
                             "image embedding pools one of them")
        vision_output = self.vision_model(pixel_values, return_dict=True, **kwargs)
        patch = self.config.vision_config.patch_size
        patch_grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        # Box-free feature: the pooled proposal windows of the global view (or, without windows, its pooled tokens).
        # The image feature is pooled, centred and projected in float32 (then normalised by the
        # caller): the pooled windows can be small enough for half precision to round them away.
        if self.config.proposal_window_sizes:
            global_features = pool_window_features(
                vision_output.last_hidden_state, patch_grid, self.config.proposal_window_sizes,
                self.config.roi_context_grid, self.roi_processor.dense_features)
        else:
            global_features = vision_output.pooler_output.float()
        if self.training and self.config.box_free_center_momentum > 0:
            with torch.no_grad():
                batch_mean = global_features.detach().mean(dim=0)
                self.box_free_center.lerp_(batch_mean.to(self.box_free_center.dtype),
                                           1 - self.config.box_free_center_momentum)
        global_features = global_features - self.box_free_center.float()
        image_features = global_features
        region_embeds = dense_region_embeds = proposal_embeds = None
        if roi_mask is not None:
            region_features, region_pool, dense_features = self._encode_regions(
                vision_output, roi_pixel_values, roi_boxes, roi_mask, patch_grid
            )
            image_features = global_features + region_pool.float()
            region_embeds = self.visual_projection(region_features)
            dense_region_embeds = self.visual_projection(dense_features)
        elif proposal_mask is not None:
            # Box-free at the crops' resolution: every proposal is read as a region is, and pooled the same way.
            proposal_features, proposal_pool, _ = self._encode_regions(
                vision_output, proposal_pixel_values, proposal_boxes, proposal_mask, patch_grid
            )
            image_features = global_features + proposal_pool.float()
            proposal_embeds = self.visual_projection(proposal_features)
        projection = self.visual_projection.weight.float()
        return {
            "proposal_embeds": proposal_embeds,
            "proposal_mask": proposal_mask,
            "vision_output": vision_output,
            "box_free_embeds": nn.functional.linear(global_features, projection),  # float32
            "image_embeds": nn.functional.linear(image_features, projection),  # float32
            "region_embeds": region_embeds,
            "dense_region_embeds": dense_region_embeds,
            "roi_mask": roi_mask,
        }

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        roi_pixel_values: torch.Tensor | None = None,
        roi_boxes: torch.Tensor | None = None,
        roi_mask: torch.Tensor | None = None,
        proposal_pixel_values: torch.Tensor | None = None,
        proposal_boxes: torch.Tensor | None = None,
        proposal_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """The global view's tower output (`last_hidden_state` `(B, 1 + P, C)`, per request every layer's
        hidden states and attentions) with `pooler_output` the projected (unnormalised) image embeddings
        `(B, D)`: region-pooled when ROIs are given, box-free otherwise (with the processor's
        proposals `proposal_*` pooled, or the global view alone without them); a tuple with `return_dict=False`."""
        vision = self._vision_forward(pixel_values, roi_pixel_values, roi_boxes, roi_mask, proposal_pixel_values,
                                      proposal_boxes, proposal_mask, **self._with_config_output_flags(kwargs))
        vision["vision_output"].pooler_output = vision["image_embeds"].to(vision["vision_output"].last_hidden_state.dtype)
        return vision["vision_output"]

    def get_region_features(
        self,
        pixel_values: torch.Tensor,
        roi_pixel_values: torch.Tensor,
        roi_boxes: torch.Tensor,
        roi_mask: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling:
        """The global view's tower output with `pooler_output` the projected (unnormalised) region
        embeddings `(B, K, D)`, zeros at masked-out ROIs."""
        vision = self._vision_forward(pixel_values, roi_pixel_values, roi_boxes, roi_mask)
        vision["vision_output"].pooler_output = vision["region_embeds"]
        return vision["vision_output"]

    # -- forward --------------------------------------------------------------------------

    def _encode_captions(
        self, caption_sets: list[tuple[torch.Tensor, torch.Tensor | None]], token_type_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[list[torch.Tensor], BaseModelOutputWithPooling]:
        """Several `(N_i, L_i)` caption batches through the text tower; returns their normalised
        embeddings `(N_i, D)` and the tower output of the first set (the report captions, whose
        `token_type_ids` these are and for which `kwargs` ask outputs; the others are single-segment).

        With `config.caption_length_buckets` 1: one pass, every set padded to the longest. Above 1:
        the first set in a pass of its own and the other captions sorted by length into at most
        `buckets - 1` passes that compute the fewest tokens (`length_groups`), each trimmed to its
        longest caption; a pass whose captions all have the same length runs without a mask."""
        buckets = self.config.caption_length_buckets
        report_ids = caption_sets[0][0]
        if token_type_ids is not None and token_type_ids.shape != report_ids.shape:
            raise ValueError(f"token_type_ids {tuple(token_type_ids.shape)} must match input_ids {tuple(report_ids.shape)}")
        if buckets == 1 or len(caption_sets) == 1:
            first, rest = pad_and_join(caption_sets, self.config.text_config.pad_token_id), None
            first_types = None
            if token_type_ids is not None:  # the report rows' types, zeros for the other captions
                first_types = torch.zeros_like(first[0])
                first_types[: report_ids.shape[0], : report_ids.shape[1]] = token_type_ids
        else:
            first, first_types = caption_sets[0], token_type_ids
            rest = pad_and_join(caption_sets[1:], self.config.text_config.pad_token_id)
        ids, mask = trim_padding(*first)
        types = None if first_types is None else first_types[:, : ids.shape[1]]
        output = self.get_text_features(ids, mask, types, return_dict=True, **kwargs)
        embeds = [output.pooler_output]
        if rest is not None:
            embeds.append(self._encode_by_length(*rest, buckets - 1))
        first_size = report_ids.shape[0]

        def report_rows(states: tuple[torch.Tensor | None, ...] | None) -> tuple[torch.Tensor | None, ...] | None:
            return None if states is None else tuple(None if state is None else state[:first_size] for state in states)

        first_output = BaseModelOutputWithPooling(
            last_hidden_state=output.last_hidden_state[:first_size], pooler_output=output.pooler_output[:first_size],
            hidden_states=report_rows(output.hidden_states), attentions=report_rows(output.attentions))
        sizes = [ids.shape[0] for ids, _ in caption_sets]
        return list(nn.functional.normalize(torch.cat(embeds), dim=-1).split(sizes)), first_output

    def _encode_by_length(self, ids: torch.Tensor, mask: torch.Tensor, passes: int) -> torch.Tensor:
        """Projected embeddings `(N, D)` of captions `ids` / `mask` `(N, L)`, sorted by length into at
        most `passes` groups that compute the fewest padding tokens (`length_groups`), each trimmed to
        its longest. One host read plans every pass."""
        lengths, order = caption_lengths(mask).sort()
        lengths_host, counts_host = torch.stack([lengths, mask.sum(dim=1)[order]]).tolist()
        pooled = []
        for start, end in itertools.pairwise(length_groups(lengths_host, passes)):
            length, rows = max(lengths_host[end - 1], 1), order[start:end]
            # Every caption of the group fills it (no padding, no hole): no mask at all.
            unpadded = all(count == length for count in counts_host[start:end])
            group_mask = None if unpadded else mask[rows, :length]
            pooled.append(self.get_text_features(ids[rows, :length], group_mask, output_hidden_states=False,
                                                  output_attentions=False, return_dict=True).pooler_output)
        embeds = torch.empty(ids.shape[0], pooled[0].shape[-1], dtype=pooled[0].dtype, device=pooled[0].device)
        embeds[order] = torch.cat(pooled)
        return embeds

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        roi_pixel_values: torch.Tensor | None = None,
        roi_boxes: torch.Tensor | None = None,
        roi_mask: torch.Tensor | None = None,
        proposal_pixel_values: torch.Tensor | None = None,
        proposal_boxes: torch.Tensor | None = None,
        proposal_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        *,
        summary_input_ids: torch.Tensor | None = None,
        summary_attention_mask: torch.Tensor | None = None,
        region_input_ids: torch.Tensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        region_negative_input_ids: torch.Tensor | None = None,
        region_negative_attention_mask: torch.Tensor | None = None,
        region_negative_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RegionMedCLIPOutput:
        """pixel_values `(B, 3, H, W)`; input_ids / attention_mask `(T, L)` report captions (and their
        optional BERT `token_type_ids`, which transformers' pipelines pass for tokenizers that emit them);
        roi_pixel_values `(B, K, 3, h, w)`; roi_boxes `(B, K, 4)` normalised xyxy on the global
        view; roi_mask `(B, K)` (default: all valid); proposal_pixel_values `(B, P, 3, h, w)`,
        proposal_boxes `(B, P, 4)`, proposal_mask `(B, P)`: the processor's box-free proposals (instead
        of ROIs), read as regions and pooled into `image_embeds`, each returned in `proposal_embeds`.

        `return_loss` needs `T == B` matched pairs: CLIP's loss, as transformers' CLIPModel; the
        multi-level objective of training is `training_scripts.losses.training_loss`.

        The keyword-only inputs are the training caption levels (`processing.CAPTION_LEVELS`), each
        encoded into its `*_text_embeds` output: summary_* `(B, L)`; region_* `(B, K, L)` aligned with
        the ROI slots; negative_* `(B, M, L)` with negative_mask `(B, M)`; region_negative_* `(B, K, M, L)`
        with region_negative_mask `(B, K, M)`: negatives of each region caption. They enter through
        `forward` on purpose: DDP, FSDP and DeepSpeed prepare weights and gradients in the wrapped
        forward only (text-tower calls outside it would read FSDP's weight shards), every level is packed
        with the report captions into the same few text-tower passes, and, being the processor's output
        names, `model(**processor(...))` works at every level.

        `output_hidden_states` / `output_attentions` (this config's, else each tower's) fill
        `vision_model_output` and `text_model_output`; a tuple with `return_dict=False`.
        """
        if pixel_values is None and input_ids is None:
            raise ValueError("forward needs pixel_values, input_ids, or both")
        kwargs = self._with_config_output_flags(kwargs)
        fields: dict[str, Any] = {}
        if pixel_values is not None:
            vision = self._vision_forward(pixel_values, roi_pixel_values, roi_boxes, roi_mask, proposal_pixel_values,
                                          proposal_boxes, proposal_mask, **kwargs)
            fields["vision_model_output"] = vision["vision_output"]
            dtype = vision["vision_output"].last_hidden_state.dtype
            fields["image_embeds"] = nn.functional.normalize(vision["image_embeds"], dim=-1).to(dtype)
            fields["box_free_image_embeds"] = nn.functional.normalize(vision["box_free_embeds"], dim=-1).to(dtype)
            fields["roi_mask"] = vision["roi_mask"]
            if vision["region_embeds"] is not None:
                valid = vision["roi_mask"][..., None].to(vision["region_embeds"].dtype)
                fields["region_embeds"] = nn.functional.normalize(vision["region_embeds"], dim=-1) * valid
                fields["dense_region_embeds"] = nn.functional.normalize(vision["dense_region_embeds"], dim=-1) * valid
            if vision["proposal_embeds"] is not None:
                valid = vision["proposal_mask"][..., None].to(vision["proposal_embeds"].dtype)
                fields["proposal_embeds"] = nn.functional.normalize(vision["proposal_embeds"], dim=-1) * valid
                fields["proposal_mask"] = vision["proposal_mask"]
        elif any(value is not None for value in (roi_pixel_values, roi_boxes, proposal_pixel_values, proposal_boxes)):
            raise ValueError("ROI and proposal inputs need pixel_values: regions are fused with the global view")

        caption_sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        valid_index: dict[str, tuple[torch.Tensor, ...]] = {}  # where each packed level's captions go back
        if input_ids is not None:
            caption_sets["text"] = (input_ids, attention_mask)
        if summary_input_ids is not None:
            caption_sets["summary"] = (summary_input_ids, summary_attention_mask)
        if region_input_ids is not None:
            if fields.get("roi_mask") is None or fields["roi_mask"].shape != region_input_ids.shape[:2]:
                raise ValueError(
                    f"region_input_ids {tuple(region_input_ids.shape)} must be (B, K, L) aligned with the ROI inputs"
                )
            valid_index["region"], caption_sets["region"] = valid_rows(fields["roi_mask"], region_input_ids,
                                                                       region_attention_mask)
        if negative_input_ids is not None:
            if negative_mask is None:
                negative_mask = torch.ones(negative_input_ids.shape[:2], dtype=torch.bool, device=negative_input_ids.device)
            negative_mask = negative_mask.to(torch.bool)
            if negative_mask.shape != negative_input_ids.shape[:2]:
                raise ValueError(f"negative_mask {tuple(negative_mask.shape)} must be (B, M) of negative_input_ids")
            valid_index["negative"], caption_sets["negative"] = valid_rows(negative_mask, negative_input_ids,
                                                                           negative_attention_mask)
        if region_negative_input_ids is not None:
            if "region" not in caption_sets:
                raise ValueError("region_negative_input_ids need region_input_ids: they are negatives of region captions")
            if region_negative_mask is None:
                region_negative_mask = torch.ones(region_negative_input_ids.shape[:3], dtype=torch.bool,
                                                  device=region_negative_input_ids.device)
            if region_negative_mask.shape != region_negative_input_ids.shape[:3] or \
                    region_negative_mask.shape[:2] != fields["roi_mask"].shape:
                raise ValueError(f"region_negative_input_ids {tuple(region_negative_input_ids.shape)} and "
                                 f"region_negative_mask {tuple(region_negative_mask.shape)} must be (B, K, M, L) and "
                                 "(B, K, M), aligned with the ROI inputs")
            # Negatives of padding ROI slots are never encoded.
            region_negative_mask = region_negative_mask.to(torch.bool) & fields["roi_mask"][..., None]
            valid_index["region_negative"], caption_sets["region_negative"] = valid_rows(
                region_negative_mask, region_negative_input_ids, region_negative_attention_mask)
        if caption_sets:
            if token_type_ids is not None and "text" not in caption_sets:
                raise ValueError("token_type_ids belong to the report captions: pass input_ids with them")
            embeds, first_output = self._encode_captions(list(caption_sets.values()), token_type_ids, **kwargs)
            encoded = dict(zip(caption_sets, embeds, strict=True))
            if "text" in encoded:
                fields["text_model_output"] = first_output
            fields["text_embeds"] = encoded.get("text")
            fields["summary_text_embeds"] = encoded.get("summary")
            if "region" in encoded:
                fields["region_text_embeds"] = scatter_rows(encoded["region"], valid_index["region"],
                                                            fields["roi_mask"].shape)
            if "negative" in encoded:
                fields["negative_text_embeds"] = scatter_rows(encoded["negative"], valid_index["negative"],
                                                              negative_mask.shape)
                fields["negative_mask"] = negative_mask
            if "region_negative" in encoded:
                fields["region_negative_text_embeds"] = scatter_rows(
                    encoded["region_negative"], valid_index["region_negative"], region_negative_mask.shape)
                fields["region_negative_mask"] = region_negative_mask

        if pixel_values is not None and input_ids is not None:
            logit_scale = clamped_logit_scale(self.logit_scale)
            logits_per_text = logit_scale * fields["text_embeds"] @ fields["image_embeds"].t()
            fields["logits_per_text"] = logits_per_text
            fields["logit_scale"] = logit_scale
            fields["logits_per_image"] = logits_per_text.t()
            if return_loss:
                if logits_per_text.shape[0] != logits_per_text.shape[1]:
                    raise ValueError(f"return_loss needs one report caption per image, got logits "
                                     f"{tuple(logits_per_text.shape)}")
                fields["loss"] = clip_loss(logits_per_text)
        elif return_loss:
            raise ValueError("return_loss needs both pixel_values and input_ids")
        for name in _OUTPUT_MASKS:  # 0/1 like an attention mask: outputs hold no bool tensors (transformers' convention)
            if fields.get(name) is not None:
                fields[name] = fields[name].long()
        return RegionMedCLIPOutput(**fields)
