"""RegionMed-CLIP: a region-aware contrastive vision-language model.

One ViT encodes the global view and, packed across the batch, every valid ROI crop. The ROI
processor turns each crop's CLS feature, an embedding of its box and RoIAlign context pooled
from the global patch grid into a region token, lets it cross-attend to the global patch
tokens through gated residuals, and attention-pools the regions back into the image
embedding through a second gate. A BERT-style text tower pooled at CLS embeds captions.
"""

import functools
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput

from .attention_regionmed_clip import eager_attention_forward
from .configuration_regionmed_clip import (
    RegionMedCLIPConfig,
    RegionMedCLIPTextConfig,
    RegionMedCLIPVisionConfig,
)

__all__ = [
    "LOGIT_SCALE_MAX",
    "RegionMedCLIPModel",
    "RegionMedCLIPOutput",
    "RegionMedCLIPPreTrainedModel",
    "RegionMedCLIPROIProcessor",
    "RegionMedCLIPTextModel",
    "RegionMedCLIPTextModelWithProjection",
    "RegionMedCLIPTextModelOutput",
    "RegionMedCLIPVisionModelOutput",
    "RegionMedCLIPVisionModel",
    "RegionMedCLIPVisionModelWithProjection",
    "clamped_logit_scale",
    "clip_loss",
    "roi_align",
]

# CLIP clamps the learnable temperature so logits never exceed 100 x cosine similarity.
LOGIT_SCALE_MAX = 100.0


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
    global_image_embeds: `(B, D)` box-free: the global view with its proposal windows pooled, before
    any given region is pooled (what a user without boxes gets).
    summary_text_embeds: `(B, D)`; region_text_embeds: `(B, K, D)` (zeros at padding slots);
    negative_text_embeds: `(B, M, D)` with `negative_mask (B, M)` (int 0/1, as every mask here).
    dense_region_embeds: `(B, K, D)` each ROI's box pooled from the global patch grid alone (no
    crop), zeros at padding; region_negative_text_embeds: `(B, K, M, D)` with `region_negative_mask (B, K, M)`.
    proposal_embeds: `(B, P, D)` each box-free proposal read as a region (zeros at padding), with
    `proposal_mask (B, P)`: what a class's best-matching region is found among.
    vision_model_output: the global view's tower output; text_model_output: the report captions' (their
    rows of the packed caption pass). With `output_hidden_states` / `output_attentions` they hold every
    layer's hidden states (`num_layers + 1`) and attention weights (None from backends that do not
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
    global_image_embeds: torch.Tensor | None = None
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


class RegionMedCLIPAttention(nn.Module):
    """Multi-head attention; self-attention, or cross-attention when `key_value_states` is given.

    `config` is the one whose `_attn_implementation` picks the backend.
    """

    def __init__(self, config: Any, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = False
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `(B, Sq, C)`, key_value_states `(B, Sk, C)`; `attention_mask` as
        `create_bidirectional_mask` makes it for the backend, or None."""
        batch, q_len, _ = hidden_states.shape
        source = hidden_states if key_value_states is None else key_value_states
        query = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(source).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(source).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
        )
        attn_output = attn_output.reshape(batch, q_len, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class RegionMedCLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation_fn = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


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
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(N, S, C)` -> the block's output `(N, S, C)` and its attention weights `(N, H, S, S)` (None
        from backends that do not return them, e.g. SDPA)."""
        if self.norm_first:
            attn_output, attn_weights = self.self_attn(self.layer_norm1(hidden_states), attention_mask)
            hidden_states = hidden_states + self.dropout(attn_output)
            return hidden_states + self.dropout(self.mlp(self.layer_norm2(hidden_states))), attn_weights
        attn_output, attn_weights = self.self_attn(hidden_states, attention_mask)
        hidden_states = self.layer_norm1(hidden_states + self.dropout(attn_output))
        return self.layer_norm2(hidden_states + self.dropout(self.mlp(hidden_states))), attn_weights


class RegionMedCLIPEncoder(nn.Module):
    def __init__(self, config: RegionMedCLIPVisionConfig | RegionMedCLIPTextConfig, norm_first: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            [RegionMedCLIPEncoderLayer(config, norm_first) for _ in range(config.num_hidden_layers)]
        )

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False, output_attentions: bool = False,
    ) -> BaseModelOutput:
        """The last layer's output, and per request every layer's input plus the last output
        (`num_layers + 1` tensors, as transformers' encoders) and every layer's attention weights."""
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(hidden_states, attention_mask)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                               attentions=all_attentions)


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

    def _output_flags(self, output_hidden_states: bool | None, output_attentions: bool | None,
                      return_dict: bool | None, tower_config: PreTrainedConfig | None = None) -> tuple[bool, bool, bool]:
        """The call's flags, else the model's config or the tower's (either may ask), as transformers does."""
        configs = (self.config,) if tower_config is None else (self.config, tower_config)

        def pick(value: bool | None, name: str) -> bool:
            return bool(value) if value is not None else any(bool(getattr(config, name)) for config in configs)

        return (pick(output_hidden_states, "output_hidden_states"), pick(output_attentions, "output_attentions"),
                return_dict if return_dict is not None else self.config.return_dict)

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


class RegionMedCLIPVisionModel(RegionMedCLIPPreTrainedModel):
    """The vision tower (ViT), a model of its own with its own config and attention backend. Returns
    post-LayerNorm tokens `(N, 1 + P, C)` and, as pooler output `(N, C)`, the CLS token or the mean of
    the patch tokens (`config.pooling`)."""

    config_class = RegionMedCLIPVisionConfig
    config: RegionMedCLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

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

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """pixel_values `(N, 3, H, W)`; the flags default to the config's; a tuple with `return_dict=False`."""
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict)
        embeddings, _ = self.embeddings(pixel_values)
        encoded = self.encoder(self.pre_layrnorm(embeddings), None, output_hidden_states, output_attentions)
        # Normalise every token, not only CLS: the ROI processor reads the patch tokens as context.
        hidden_states = self.post_layernorm(encoded.last_hidden_state)
        pooled = hidden_states[:, 0] if self.config.pooling == "cls" else hidden_states[:, 1:].mean(dim=1)
        output = BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled,
                                            hidden_states=encoded.hidden_states, attentions=encoded.attentions)
        return output if return_dict else output.to_tuple()


class RegionMedCLIPTextEmbeddings(nn.Module):
    def __init__(self, config: RegionMedCLIPTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
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
        if token_type_ids is None:  # single-segment captions: type 0 everywhere, as BERT sees a lone sentence
            token_types = self.token_type_embeddings.weight[0]
        else:
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(f"token_type_ids {tuple(token_type_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
            token_types = self.token_type_embeddings(token_type_ids)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :seq_len]) + token_types
        return self.dropout(self.LayerNorm(embeddings))


class RegionMedCLIPTextModel(RegionMedCLIPPreTrainedModel):
    """The text tower (BERT-style), a model of its own with its own config and attention backend,
    pooled at the first ([CLS]) token or by the mean of the valid tokens (`config.pooling`)."""

    config_class = RegionMedCLIPTextConfig
    config: RegionMedCLIPTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)

    def __init__(self, config: RegionMedCLIPTextConfig):
        super().__init__(config)
        self.embeddings = RegionMedCLIPTextEmbeddings(config)
        self.encoder = RegionMedCLIPEncoder(config, norm_first=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None) -> BaseModelOutputWithPooling | tuple:
        """input_ids `(T, L)`, attention_mask `(T, L)` 1 = token, 0 = padding; token_type_ids `(T, L)` optional;
        the flags default to the config's; a tuple with `return_dict=False`."""
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict)
        hidden_states = self.embeddings(input_ids, token_type_ids)
        mask = create_bidirectional_mask(self.config, hidden_states, attention_mask)  # in the backend's format
        encoded = self.encoder(hidden_states, mask, output_hidden_states, output_attentions)
        hidden_states = encoded.last_hidden_state
        if self.config.pooling == "cls":
            pooled = hidden_states[:, 0]
        elif attention_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            weights = attention_mask.to(hidden_states.dtype)[..., None]
            pooled = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        output = BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled,
                                            hidden_states=encoded.hidden_states, attentions=encoded.attentions)
        return output if return_dict else output.to_tuple()


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
    """Output of `RegionMedCLIPVisionModelWithProjection` (CLIPVisionModelOutput's fields): `image_embeds`
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
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.set_input_embeddings(value)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None) -> RegionMedCLIPTextModelOutput | tuple:
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict)
        output = self.text_model(input_ids, attention_mask, token_type_ids, output_hidden_states, output_attentions,
                                 return_dict=True)
        output = RegionMedCLIPTextModelOutput(text_embeds=self.text_projection(output.pooler_output),
                                              last_hidden_state=output.last_hidden_state,
                                              hidden_states=output.hidden_states, attentions=output.attentions)
        return output if return_dict else output.to_tuple()


class RegionMedCLIPVisionModelWithProjection(RegionMedCLIPPreTrainedModel):
    """The vision tower and its projection of the pooled (CLS / mean) token. NOT the box-free image
    embedding of `RegionMedCLIPModel`, which pools proposal windows through the ROI processor and is
    centred: use `RegionMedCLIPModel.get_image_features` for zero-shot and retrieval. This tower
    embeds crops (an ROI's crop feature before fusion) and serves as a plain ViT backbone."""

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

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                ) -> RegionMedCLIPVisionModelOutput | tuple:
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict)
        output = self.vision_model(pixel_values, output_hidden_states, output_attentions, return_dict=True)
        output = RegionMedCLIPVisionModelOutput(image_embeds=self.visual_projection(output.pooler_output),
                                                last_hidden_state=output.last_hidden_state,
                                                hidden_states=output.hidden_states, attentions=output.attentions)
        return output if return_dict else output.to_tuple()


def roi_align(feature_grid: torch.Tensor, boxes: torch.Tensor, output_size: int, sampling_ratio: int = 2) -> torch.Tensor:
    """RoIAlign (average of bilinear samples per bin) in plain torch.

    feature_grid `(B, C, H, W)`; boxes `(B, K, 4)` normalised `xyxy` in `[0, 1]` of the image the
    grid covers -> `(B, K, G, G, C)` with `G = output_size`, sampling_ratio^2 samples per bin.
    """
    batch, num_boxes = boxes.shape[:2]
    samples_per_side = output_size * sampling_ratio
    # Sample positions at the centres of the sub-bins, as a fraction of the box side.
    steps = (torch.arange(samples_per_side, device=boxes.device, dtype=boxes.dtype) + 0.5) / samples_per_side
    x0, y0, x1, y1 = boxes.unbind(-1)
    xs = x0[..., None] + (x1 - x0)[..., None] * steps  # (B, K, S)
    ys = y0[..., None] + (y1 - y0)[..., None] * steps
    grid = torch.stack(
        [xs[:, :, None, :].expand(-1, -1, samples_per_side, -1), ys[:, :, :, None].expand(-1, -1, -1, samples_per_side)],
        dim=-1,
    )  # (B, K, S, S, 2) as (x, y)
    # align_corners=False: -1 and 1 are the outer edges of the border pixels, i.e. normalised image coords.
    grid = (grid * 2 - 1).reshape(batch, num_boxes * samples_per_side, samples_per_side, 2)
    sampled = nn.functional.grid_sample(
        feature_grid, grid.to(feature_grid.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )  # (B, C, K * S, S)
    channels = feature_grid.shape[1]
    sampled = sampled.reshape(batch, channels, num_boxes, output_size, sampling_ratio, output_size, sampling_ratio)
    return sampled.mean(dim=(4, 6)).permute(0, 2, 3, 4, 1)


def box_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` normalised xyxy -> `(..., 8)`: corners, centre, width, height."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1, y1, (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


class RegionMedCLIPFusionLayer(GradientCheckpointingLayer):
    """Region tokens cross-attend to the global patch tokens; both residuals are tanh-gated (Flamingo)."""

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        vision = config.vision_config
        self.query_norm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.context_norm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.cross_attn = RegionMedCLIPAttention(
            config, vision.hidden_size, config.roi_fusion_heads, vision.attention_dropout
        )
        # Shape (1,), not (): FSDP refuses 0-d parameters.
        self.attn_gate = nn.Parameter(torch.full((1,), float(config.roi_gate_init)))
        self.mlp_norm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.mlp = RegionMedCLIPMLP(vision.hidden_size, vision.intermediate_size, vision.hidden_act)
        self.mlp_gate = nn.Parameter(torch.full((1,), float(config.roi_gate_init)))

    def forward(self, region_states: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """region_states `(B, K, C)`, patch_tokens `(B, P, C)` -> `(B, K, C)`.

        Each region query attends only to its image's patches, never to other regions, so
        padded ROI slots cannot influence real ones.
        """
        attended, _ = self.cross_attn(self.query_norm(region_states), key_value_states=self.context_norm(patch_tokens))
        region_states = region_states + torch.tanh(self.attn_gate) * attended
        return region_states + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(region_states))


def sliding_window_boxes(window_sizes: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`(P, 4)` normalised xyxy windows: for each size (a fraction of the view side), square windows
    at a stride of half their side that tile the view, row-major."""
    boxes = []
    for size in window_sizes:
        steps = round((1 - size) / (size / 2)) + 1
        starts = torch.linspace(0, 1 - size, steps, device=device, dtype=dtype)
        y0, x0 = torch.meshgrid(starts, starts, indexing="ij")
        corners = torch.stack([x0.flatten(), y0.flatten()], dim=-1)
        boxes.append(torch.cat([corners, corners + size], dim=-1))
    return torch.cat(boxes)


@functools.lru_cache(maxsize=8)
def window_sampling_weights(window_sizes: tuple[float, ...], patch_grid: tuple[int, int], output_size: int,
                            device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`(P * G * G, gh * gw)`: `roi_align` of the `sliding_window_boxes` as a matrix on the flattened
    patch grid (rows in `roi_align`'s window, bin-row, bin-column order), made by aligning the identity."""
    cells = patch_grid[0] * patch_grid[1]
    identity = torch.eye(cells, device=device, dtype=dtype).reshape(1, cells, *patch_grid)
    windows = sliding_window_boxes(window_sizes, device, dtype)[None]
    return roi_align(identity, windows, output_size)[0].reshape(-1, cells)


# Crops per vision-tower call when no gradient is kept (see `_encode_regions`).
_INFERENCE_CROP_CHUNK = 1024
# Log-sum-exp pooling of window features: 1 would be near a mean, large values near a max. Window
# features are LayerNorm-ed (unit scale), so 5 lets a channel's strongest windows dominate.
_PROPOSAL_POOL_SHARPNESS = 5.0
# `log_mean_exp_centred` takes logsumexp for a channel whose largest score exceeds this (exp(20) is
# far from float32 overflow).
_CENTRED_EXP_LIMIT = 20.0


class RegionMedCLIPAttentionPool(nn.Module):
    """Attention pooling of a set of features with one query per image (scaled dot product)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def forward(self, query_features: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query_features `(B, C)`, items `(B, K, C)`, mask `(B, K)` bool -> `(B, C)`, zero for an image
        with no valid item (not the output layer's bias)."""
        query = self.query(query_features)[:, None, :]  # (B, 1, C)
        scores = (query * self.key(items)).sum(-1) / math.sqrt(items.shape[-1])  # (B, K)
        # finfo.min rather than -inf keeps an image with no valid item finite (uniform weights, then zeroed).
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1) * mask.to(scores.dtype)
        has_items = mask.any(dim=-1, keepdim=True).to(scores.dtype)
        return self.output((weights[..., None] * items).sum(1)) * has_items


class RegionMedCLIPROIProcessor(nn.Module):
    """Fuses each ROI with global context and pools the regions into the image feature; pools
    proposal windows of the global patch grid into the box-free image feature."""

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        hidden = config.vision_config.hidden_size
        eps = config.vision_config.layer_norm_eps
        self.context_grid = config.roi_context_grid
        self.box_dropout = config.roi_box_dropout
        self.box_embedding = nn.Sequential(nn.Linear(8, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.context_projection = nn.Linear(config.roi_context_grid**2 * hidden, hidden)
        self.dense_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.fusion_layers = nn.ModuleList([RegionMedCLIPFusionLayer(config) for _ in range(config.roi_fusion_layers)])
        self.region_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.window_sizes = tuple(config.proposal_window_sizes)
        self.region_pool = RegionMedCLIPAttentionPool(hidden)
        self.pool_gate = nn.Parameter(torch.full((1,), float(config.region_pool_gate_init)))  # (1,): FSDP needs >= 1-d

    def forward(
        self,
        crop_features: torch.Tensor,
        roi_boxes: torch.Tensor,
        roi_mask: torch.Tensor,
        global_tokens: torch.Tensor,
        patch_grid: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Region features `(B, K, C)` (zeros where `roi_mask` is False), the region pool `(B, C)`
        and the dense region features `(B, K, C)`: the box pooled from the global patch grid alone.

        crop_features `(B, K, C)` crop features; roi_boxes `(B, K, 4)` normalised xyxy;
        roi_mask `(B, K)` bool; global_tokens `(B, 1 + P, C)`; patch_grid `(gh, gw)`.
        """
        batch, num_rois, _ = crop_features.shape
        patch_tokens = global_tokens[:, 1:]
        context = self._box_context(global_tokens, roi_boxes, patch_grid)
        valid = roi_mask[..., None].to(context.dtype)
        # Dense alignment (FG-CLIP): aligning this box-pooled patch feature with the region caption
        # teaches the global tower itself where and what the lesions are, which box-free inference needs.
        dense_features = self.dense_layernorm(context) * valid
        box_features = self.box_embedding(box_geometry(roi_boxes))
        if self.training and self.box_dropout > 0:
            # Dropping the coordinates of some regions stops them from carrying everything: those
            # regions must read the crop and the context pixels.
            keep = torch.rand(batch, num_rois, 1, device=box_features.device) >= self.box_dropout
            box_features = box_features * keep.to(box_features.dtype)
        region_states = crop_features + box_features + context
        for layer in self.fusion_layers:
            region_states = layer(region_states, patch_tokens)
        region_features = self.region_layernorm(region_states) * valid

        pooled = self.region_pool(global_tokens[:, 0], region_features, roi_mask)  # queried by the global CLS
        return region_features, torch.tanh(self.pool_gate) * pooled, dense_features

    def _box_context(self, global_tokens: torch.Tensor, boxes: torch.Tensor, patch_grid: tuple[int, int]) -> torch.Tensor:
        """RoIAlign of `boxes (B, K, 4)` on the patch grid of `global_tokens (B, 1 + P, C)`, projected: `(B, K, C)`."""
        batch, _, hidden = global_tokens.shape
        feature_grid = global_tokens[:, 1:].transpose(1, 2).reshape(batch, hidden, *patch_grid)
        return self.context_projection(roi_align(feature_grid, boxes, self.context_grid).flatten(2))

    def pool_proposals(self, global_tokens: torch.Tensor, patch_grid: tuple[int, int]) -> torch.Tensor:
        """Box-free: dense features of sliding windows over the global patch grid (the same head the
        dense-region loss aligns with region captions), log-sum-exp pooled per channel: `(B, C)` in
        float32 whatever the model's dtype (the pool can be small: see `log_mean_exp_centred`)."""
        batch, _, hidden = global_tokens.shape
        # The windows are fixed, so their RoIAlign is one fixed linear map of the patch tokens: a matrix
        # product, where grid_sample's backward was 70% of this method on CPU.
        weights = window_sampling_weights(self.window_sizes, patch_grid, self.context_grid, global_tokens.device,
                                          global_tokens.dtype)  # (P * G * G, gh * gw)
        sampled = (weights @ global_tokens[:, 1:]).reshape(batch, -1, self.context_grid**2 * hidden)
        window_features = self.dense_layernorm(self.context_projection(sampled))
        # A finding is present when SOME window shows it (multiple-instance learning): a soft max over
        # windows keeps a lesion that fills one window of 58 at full strength, where a mean or an
        # untrained attention pool dilutes it under the anatomy every film shares.
        # Deviations from the image's own mean window: the anatomy every window (and film) shares cancels.
        # In float32: the pool is second order in the deviations, so a half-precision rounding of
        # their mean (first order) would swamp it.
        features = window_features.float()
        deviations = features - features.mean(dim=1, keepdim=True)
        return log_mean_exp_centred(_PROPOSAL_POOL_SHARPNESS * deviations) / _PROPOSAL_POOL_SHARPNESS


def log_mean_exp_centred(scores: torch.Tensor) -> torch.Tensor:
    """`log(mean(exp(scores), dim=1))` of scores `(B, N, C)` centred over `N` (zero mean) -> `(B, C)`.

    For centred scores the result is second order in them, and `logsumexp - log(N)` (or
    `log1p(mean(expm1(.)))`) loses its digits to cancellation against the first-order terms, which
    sum to zero. Here only `exp(y) - 1 - y >= 0` is summed (a series below 0.1, where `expm1(y) - y`
    would cancel too). Channels whose largest score could overflow `exp` take `logsumexp` (their
    result is large, so it is exact enough)."""
    bounded = scores.clamp(max=_CENTRED_EXP_LIMIT)  # finite (and finite gradients) where logsumexp is taken
    series = bounded.square() * (0.5 + bounded * (1 / 6 + bounded * (1 / 24 + bounded / 120)))
    excess = torch.where(bounded.abs() < 0.1, series, torch.expm1(bounded) - bounded)
    centred = torch.log1p(excess.mean(dim=1))
    shifted = torch.logsumexp(scores, dim=1) - math.log(scores.shape[1])
    return torch.where(scores.amax(dim=1) > _CENTRED_EXP_LIMIT, shifted, centred)


def _pad_and_join(caption_sets: list[tuple[torch.Tensor, torch.Tensor | None]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N_i, L_i)` ids (and masks, None = all tokens) -> one `(sum N_i, max L_i)` batch, right-padded."""
    length = max(ids.shape[1] for ids, _ in caption_sets)
    ids = torch.cat([nn.functional.pad(ids, (0, length - ids.shape[1]), value=pad_id) for ids, _ in caption_sets])
    mask = torch.cat([nn.functional.pad(torch.ones_like(ids) if mask is None else mask, (0, length - ids.shape[1]),
                                        value=0) for ids, mask in caption_sets])
    return ids, mask


def _caption_lengths(mask: torch.Tensor) -> torch.Tensor:
    """`(N, L)` 0/1 mask -> `(N,)` one past each row's last token (its length when right-padded)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.to(torch.bool) * positions).amax(dim=1)


def _length_groups(sorted_lengths: list[int], groups: int) -> list[int]:
    """Boundaries `[0, ..., N]` of at most `groups` runs of the ascending `sorted_lengths` that
    minimise the tokens computed, sum over runs of (size x longest), by dynamic programming over the
    distinct lengths (`U` of them: one `(U, U)` table per extra run)."""
    values, counts = torch.unique_consecutive(torch.tensor(sorted_lengths, dtype=torch.float64), return_counts=True)
    distinct = values.numel()
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0).double()])
    # run_cost[i, j]: tokens of one run holding the distinct lengths i..j, padded to values[j]
    run_cost = (cumulative[1:][None, :] - cumulative[:-1][:, None]) * values[None, :]
    run_cost = run_cost.masked_fill(torch.ones(distinct, distinct, dtype=torch.bool).tril(-1), math.inf)
    best, starts = run_cost[0], []  # best[j]: fewest tokens covering lengths 0..j; one run so far
    for _ in range(groups - 1):
        # The last run starts at i >= 1 after the best cover of 0..i-1, or nothing changes (start 0).
        candidates = torch.cat([best[None, :], best[:-1, None] + run_cost[1:]])  # (distinct, distinct)
        best, start = candidates.min(dim=0)
        starts.append(start)
    boundaries, end = [distinct], distinct - 1
    for start in reversed(starts):
        if (first := int(start[end])) == 0:  # this run count used fewer runs
            continue
        boundaries.append(first)
        end = first - 1
    return [int(cumulative[boundary]) for boundary in [0, *reversed(boundaries)]]


def _trim_padding(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the trailing columns that are padding in every row (the tokens kept are unchanged)."""
    if mask is None:
        return ids, None
    length = max(int(_caption_lengths(mask).max()), 1)
    return ids[:, :length], mask[:, :length]


def _valid_rows(mask: torch.Tensor, *tensors: torch.Tensor | None
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """The True places of a bool `mask` over the tensors' leading dims, as index tensors, and each
    tensor's rows there (None stays None). One host read (the mask's nonzero) for all of them, where
    indexing each by the mask would wait for the device once per tensor, and again in backward."""
    index = mask.nonzero(as_tuple=True)
    return index, tuple(None if tensor is None else tensor[index] for tensor in tensors)


def _scatter_rows(rows: torch.Tensor, index: tuple[torch.Tensor, ...], shape: torch.Size) -> torch.Tensor:
    """Packed `(N, D)` rows back into a zero `(*shape, D)` grid at `index` (from `_valid_rows`). An
    `index_put`, whose backward gathers by the same index: `masked_scatter`'s reads the mask again."""
    return rows.new_zeros((*shape, rows.shape[-1])).index_put(index, rows)


def _check_roi_inputs(
    pixel_values: torch.Tensor,
    roi_pixel_values: torch.Tensor | None,
    roi_boxes: torch.Tensor | None,
    roi_mask: torch.Tensor | None,
    prefix: str = "roi",
) -> torch.Tensor | None:
    """Validate ROI (or, with `prefix="proposal"`, proposal) inputs against `pixel_values (B, 3, H, W)`;
    returns the bool `(B, K)` mask or None."""
    if roi_pixel_values is None and roi_boxes is None:
        if roi_mask is not None:
            raise ValueError(f"{prefix}_mask was given without {prefix}_pixel_values and {prefix}_boxes")
        return None
    if roi_pixel_values is None or roi_boxes is None:
        missing = f"{prefix}_pixel_values" if roi_pixel_values is None else f"{prefix}_boxes"
        raise ValueError(f"{missing} is required when the other {prefix} input is given")
    batch = pixel_values.shape[0]
    if roi_pixel_values.ndim != 5 or roi_pixel_values.shape[0] != batch:
        raise ValueError(
            f"{prefix}_pixel_values must be (B={batch}, K, C, h, w), got {tuple(roi_pixel_values.shape)}"
        )
    num_rois = roi_pixel_values.shape[1]
    if tuple(roi_boxes.shape) != (batch, num_rois, 4):
        raise ValueError(f"{prefix}_boxes must be (B={batch}, K={num_rois}, 4), got {tuple(roi_boxes.shape)}")
    if roi_mask is None:
        roi_mask = torch.ones(batch, num_rois, dtype=torch.bool, device=roi_boxes.device)
    elif tuple(roi_mask.shape) != (batch, num_rois):
        raise ValueError(f"{prefix}_mask must be (B={batch}, K={num_rois}), got {tuple(roi_mask.shape)}")
    roi_mask = roi_mask.to(torch.bool)
    # Normalised xyxy on the global view: a box in pixels, or with its corners swapped, would be
    # pooled from the wrong place (or from nothing) without a word.
    tolerance = 1e-4
    outside = ((roi_boxes < -tolerance) | (roi_boxes > 1 + tolerance)).any(dim=-1)
    inverted = (roi_boxes[..., 2] <= roi_boxes[..., 0]) | (roi_boxes[..., 3] <= roi_boxes[..., 1])
    problems = torch.stack([~torch.isfinite(roi_boxes).all(dim=-1), outside | inverted]) & roi_mask  # (2, B, K)
    if problems.any():  # the one host read of a valid batch; the error path finds what was wrong
        if problems[0].any():
            raise ValueError(f"{prefix}_boxes holds NaN or inf in a valid slot")
        first = roi_boxes[problems[1]][0].tolist()
        raise ValueError(f"{prefix}_boxes must be normalised xyxy in [0, 1] with x1 > x0 and y1 > y0 (the processor "
                         f"makes them from pixel boxes); got {[round(value, 4) for value in first]} in a valid slot")
    return roi_mask


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
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
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

    # -- features -------------------------------------------------------------------------

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, output_hidden_states: bool | None = None,
        output_attentions: bool | None = None, return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """The text tower's output with `pooler_output` the projected (unnormalised) caption embeddings
        `(T, D)`, as transformers v5's CLIPModel; `last_hidden_state` `(T, L, C)`; per request every
        layer's hidden states and attention weights; a tuple with `return_dict=False`."""
        hidden, attentions, return_dict = self._output_flags(output_hidden_states, output_attentions, return_dict,
                                                             self.config.text_config)
        output = self.text_model(input_ids, attention_mask, token_type_ids, hidden, attentions, return_dict=True)
        output.pooler_output = self.text_projection(output.pooler_output)
        return output if return_dict else output.to_tuple()

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
        index, (valid_crops,) = _valid_rows(roi_mask, roi_pixel_values)
        if valid_crops.shape[0]:  # known on the host once the mask is read
            # Without gradients (inference: hundreds of proposals per film) the crops go through in
            # chunks, so activation memory is bounded by the chunk, not by the proposal count.
            chunk = valid_crops.shape[0] if torch.is_grad_enabled() else _INFERENCE_CROP_CHUNK
            packed = torch.cat([self.vision_model(part, False, False, return_dict=True).pooler_output
                                for part in valid_crops.split(chunk)])
            crop_features = _scatter_rows(packed, index, roi_mask.shape)
        else:  # one blank crop, discarded, for the same FSDP reason
            blank = self.vision_model(roi_pixel_values.new_zeros((1, *roi_pixel_values.shape[2:])), False, False,
                                      return_dict=True).pooler_output
            crop_features = global_tokens.new_zeros(batch, num_rois, hidden) + 0.0 * blank.sum()
        # Padding slots may hold anything; give them a harmless box so they stay finite.
        safe_boxes = torch.where(roi_mask[..., None], roi_boxes, torch.zeros_like(roi_boxes)).to(global_tokens.dtype)
        return self.roi_processor(crop_features, safe_boxes, roi_mask, global_tokens, patch_grid)

    def _vision_forward(
        self,
        pixel_values: torch.Tensor,
        roi_pixel_values: torch.Tensor | None,
        roi_boxes: torch.Tensor | None,
        roi_mask: torch.Tensor | None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        proposal_pixel_values: torch.Tensor | None = None,
        proposal_boxes: torch.Tensor | None = None,
        proposal_mask: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        roi_mask = _check_roi_inputs(pixel_values, roi_pixel_values, roi_boxes, roi_mask)
        proposal_mask = _check_roi_inputs(pixel_values, proposal_pixel_values, proposal_boxes, proposal_mask, "proposal")
        if roi_mask is not None and proposal_mask is not None:
            raise ValueError("give ROI inputs (the regions to read) or proposal inputs (box-free), not both: the "
                             "image embedding pools one of them")
        vision_output = self.vision_model(pixel_values, output_hidden_states, output_attentions, return_dict=True)
        patch = self.config.vision_config.patch_size
        patch_grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        # Box-free feature: the pooled proposal windows of the global view (or, without windows, its pooled tokens).
        # The image feature is pooled, centred and projected in float32 (then normalised by the
        # caller): the pooled windows can be small enough for half precision to round them away.
        if self.config.proposal_window_sizes:
            global_features = self.roi_processor.pool_proposals(vision_output.last_hidden_state, patch_grid)
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
            "global_embeds": nn.functional.linear(global_features, projection),  # float32
            "image_embeds": nn.functional.linear(image_features, projection),  # float32
            "region_embeds": region_embeds,
            "dense_region_embeds": dense_region_embeds,
            "roi_mask": roi_mask,
        }

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        roi_pixel_values: torch.Tensor | None = None,
        roi_boxes: torch.Tensor | None = None,
        roi_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        proposal_pixel_values: torch.Tensor | None = None,
        proposal_boxes: torch.Tensor | None = None,
        proposal_mask: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """The global view's tower output (`last_hidden_state` `(B, 1 + P, C)`, per request every layer's
        hidden states and attentions) with `pooler_output` the projected (unnormalised) image embeddings
        `(B, D)`: region-pooled when ROIs are given, box-free otherwise (with the processor's
        proposals `proposal_*` pooled, or the global view alone without them); a tuple with `return_dict=False`."""
        hidden, attentions, return_dict = self._output_flags(output_hidden_states, output_attentions, return_dict,
                                                             self.config.vision_config)
        vision = self._vision_forward(pixel_values, roi_pixel_values, roi_boxes, roi_mask, hidden, attentions,
                                      proposal_pixel_values, proposal_boxes, proposal_mask)
        vision["vision_output"].pooler_output = vision["image_embeds"].to(vision["vision_output"].last_hidden_state.dtype)
        return vision["vision_output"] if return_dict else vision["vision_output"].to_tuple()

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
        output_hidden_states: bool = False, output_attentions: bool = False,
    ) -> tuple[list[torch.Tensor], BaseModelOutputWithPooling]:
        """Several `(N_i, L_i)` caption batches through the text tower; returns their normalised
        embeddings `(N_i, D)` and the tower output of the first set (the report captions, whose
        `token_type_ids` these are; the others are single-segment).

        With `config.caption_length_buckets` 1: one pass, every set padded to the longest. Above 1:
        the first set in a pass of its own and the other captions sorted by length into at most
        `buckets - 1` passes that compute the fewest tokens (`_length_groups`), each trimmed to its
        longest caption; a pass whose captions all have the same length runs without a mask."""
        buckets = self.config.caption_length_buckets
        report_ids = caption_sets[0][0]
        if token_type_ids is not None and token_type_ids.shape != report_ids.shape:
            raise ValueError(f"token_type_ids {tuple(token_type_ids.shape)} must match input_ids {tuple(report_ids.shape)}")
        if buckets == 1 or len(caption_sets) == 1:
            first, rest = _pad_and_join(caption_sets, self.config.text_config.pad_token_id), None
            first_types = None
            if token_type_ids is not None:  # the report rows' types, zeros for the other captions
                first_types = torch.zeros_like(first[0])
                first_types[: report_ids.shape[0], : report_ids.shape[1]] = token_type_ids
        else:
            first, first_types = caption_sets[0], token_type_ids
            rest = _pad_and_join(caption_sets[1:], self.config.text_config.pad_token_id)
        ids, mask = _trim_padding(*first)
        types = None if first_types is None else first_types[:, : ids.shape[1]]
        output = self.get_text_features(ids, mask, types, output_hidden_states, output_attentions, return_dict=True)
        embeds = [output.pooler_output]
        if rest is not None:
            embeds.append(self._encode_by_length(*rest, buckets - 1))
        first_size = report_ids.shape[0]
        first_output = BaseModelOutputWithPooling(
            last_hidden_state=output.last_hidden_state[:first_size], pooler_output=output.pooler_output[:first_size],
            hidden_states=None if output.hidden_states is None else tuple(h[:first_size] for h in output.hidden_states),
            attentions=None if output.attentions is None else tuple(
                None if a is None else a[:first_size] for a in output.attentions))
        sizes = [ids.shape[0] for ids, _ in caption_sets]
        return list(nn.functional.normalize(torch.cat(embeds), dim=-1).split(sizes)), first_output

    def _encode_by_length(self, ids: torch.Tensor, mask: torch.Tensor, passes: int) -> torch.Tensor:
        """Projected embeddings `(N, D)` of captions `ids` / `mask` `(N, L)`, sorted by length into at
        most `passes` groups that compute the fewest padding tokens (`_length_groups`), each trimmed to
        its longest. One host read plans every pass."""
        lengths, order = _caption_lengths(mask).sort()
        lengths_host, counts_host = torch.stack([lengths, mask.sum(dim=1)[order]]).tolist()
        pooled = []
        for start, end in itertools.pairwise(_length_groups(lengths_host, passes)):
            length, rows = max(lengths_host[end - 1], 1), order[start:end]
            # Every caption of the group fills it (no padding, no hole): no mask at all.
            unpadded = all(count == length for count in counts_host[start:end])
            group_mask = None if unpadded else mask[rows, :length]
            pooled.append(self.get_text_features(ids[rows, :length], group_mask, return_dict=True).pooler_output)
        embeds = torch.empty(ids.shape[0], pooled[0].shape[-1], dtype=pooled[0].dtype, device=pooled[0].device)
        embeds[order] = torch.cat(pooled)
        return embeds

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        roi_pixel_values: torch.Tensor | None = None,
        roi_boxes: torch.Tensor | None = None,
        roi_mask: torch.Tensor | None = None,
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
        proposal_pixel_values: torch.Tensor | None = None,
        proposal_boxes: torch.Tensor | None = None,
        proposal_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> RegionMedCLIPOutput | tuple:
        """pixel_values `(B, 3, H, W)`; input_ids / attention_mask `(T, L)` report captions (and their
        optional BERT `token_type_ids`, which transformers' pipelines pass for tokenizers that emit them);
        roi_pixel_values `(B, K, 3, h, w)`; roi_boxes `(B, K, 4)` normalised xyxy on the global
        view; roi_mask `(B, K)` (default: all valid); summary_* `(B, L)`; region_* `(B, K, L)`
        aligned with the ROI slots; negative_* `(B, M, L)` with negative_mask `(B, M)`;
        region_negative_* `(B, K, M, L)` with region_negative_mask `(B, K, M)`: negatives of each
        region caption; proposal_pixel_values `(B, P, 3, h, w)`, proposal_boxes `(B, P, 4)`,
        proposal_mask `(B, P)`: the processor's box-free proposals (instead of ROIs), read as regions
        and pooled into `image_embeds`, each returned in `proposal_embeds`.

        `return_loss` needs `T == B` matched pairs: CLIP's loss, as transformers' CLIPModel; the
        multi-level objective of training is `training_scripts.losses.training_loss`.
        """
        if pixel_values is None and input_ids is None:
            raise ValueError("forward needs pixel_values, input_ids, or both")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        fields: dict[str, Any] = {}
        if pixel_values is not None:
            vision = self._vision_forward(pixel_values, roi_pixel_values, roi_boxes, roi_mask, output_hidden_states,
                                          output_attentions, proposal_pixel_values, proposal_boxes, proposal_mask)
            fields["vision_model_output"] = vision["vision_output"]
            dtype = vision["vision_output"].last_hidden_state.dtype
            fields["image_embeds"] = nn.functional.normalize(vision["image_embeds"], dim=-1).to(dtype)
            fields["global_image_embeds"] = nn.functional.normalize(vision["global_embeds"], dim=-1).to(dtype)
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
            region_valid = fields["roi_mask"]
            valid_index["region"], caption_sets["region"] = _valid_rows(region_valid, region_input_ids,
                                                                        region_attention_mask)
        if negative_input_ids is not None:
            if negative_mask is None:
                negative_mask = torch.ones(negative_input_ids.shape[:2], dtype=torch.bool, device=negative_input_ids.device)
            negative_mask = negative_mask.to(torch.bool)
            if negative_mask.shape != negative_input_ids.shape[:2]:
                raise ValueError(f"negative_mask {tuple(negative_mask.shape)} must be (B, M) of negative_input_ids")
            valid_index["negative"], caption_sets["negative"] = _valid_rows(negative_mask, negative_input_ids,
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
            valid_index["region_negative"], caption_sets["region_negative"] = _valid_rows(
                region_negative_mask, region_negative_input_ids, region_negative_attention_mask)
        if caption_sets:
            if token_type_ids is not None and "text" not in caption_sets:
                raise ValueError("token_type_ids belong to the report captions: pass input_ids with them")
            embeds, first_output = self._encode_captions(list(caption_sets.values()), token_type_ids,
                                                         output_hidden_states, output_attentions)
            encoded = dict(zip(caption_sets, embeds, strict=True))
            if "text" in encoded:
                fields["text_model_output"] = first_output
            fields["text_embeds"] = encoded.get("text")
            fields["summary_text_embeds"] = encoded.get("summary")
            if "region" in encoded:
                fields["region_text_embeds"] = _scatter_rows(encoded["region"], valid_index["region"],
                                                             fields["roi_mask"].shape)
            if "negative" in encoded:
                fields["negative_text_embeds"] = _scatter_rows(encoded["negative"], valid_index["negative"],
                                                               negative_mask.shape)
                fields["negative_mask"] = negative_mask
            if "region_negative" in encoded:
                fields["region_negative_text_embeds"] = _scatter_rows(
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
        output = RegionMedCLIPOutput(**fields)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    # -- starting from pretrained towers ---------------------------------------------------

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_path: str | Path, text_path: str | Path, **roi_kwargs: Any
    ) -> "RegionMedCLIPModel":
        """Build a model whose towers are copied from local checkpoints.

        vision_path: a transformers ViT (`vit`), CLIP vision (`clip_vision_model`) or full CLIP
        (`clip`) folder; text_path: a BERT folder (e.g. PubMedBERT). `roi_kwargs` set the other
        top-level `RegionMedCLIPConfig` fields (projection_dim, max_rois, roi_* ...); the ROI
        processor, projections and temperature start fresh.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        RegionMedCLIPConfig.check_fields(roi_kwargs, "from_vision_text_pretrained", exclude={"vision_config", "text_config"})

        vision_source = AutoModel.from_pretrained(vision_path)
        vision_hf_config = vision_source.config
        if vision_hf_config.model_type == "clip":
            vision_source, vision_hf_config = vision_source.vision_model, vision_hf_config.vision_config
        vision_config, vision_state = _vision_tower_from_transformers(vision_hf_config, vision_source.state_dict())

        text_model_type = AutoConfig.from_pretrained(text_path).model_type
        if text_model_type != "bert":
            raise ValueError(f"text_path must hold a BERT checkpoint, got model_type {text_model_type!r}")
        text_source = AutoModel.from_pretrained(text_path, add_pooling_layer=False)
        cls_token_id = RegionMedCLIPTextConfig().cls_token_id
        if any((Path(text_path) / name).exists() for name in ("vocab.txt", "tokenizer.json")):
            cls_token_id = AutoTokenizer.from_pretrained(text_path).cls_token_id
        text_config, text_state = _text_tower_from_bert(text_source.config, text_source.state_dict(), cls_token_id)

        config = RegionMedCLIPConfig(vision_config=vision_config, text_config=text_config, **roi_kwargs)
        model = cls(config)
        model.vision_model.load_state_dict(vision_state, strict=True)
        model.text_model.load_state_dict(text_state, strict=True)
        return model


def _rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], skip: str) -> dict[str, torch.Tensor]:
    """Apply the first matching regex rule to each key; keys matching `skip` are dropped."""
    renamed = {}
    for key, tensor in state.items():
        if re.search(skip, key):
            continue
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            raise ValueError(f"no rule maps checkpoint weight {key!r} onto the RegionMed-CLIP tower")
    return renamed


# transformers' ViT changed its parameter names in v5.2x; each rule accepts the old and the new layout.
_VIT_LAYER = r"(?:encoder\.layer|layers)\.(\d+)\."
_VIT_RULES = [
    (r"embeddings\.cls_token", "embeddings.class_embedding"),
    (r"embeddings\.position_embeddings", "embeddings.position_embedding.weight"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (_VIT_LAYER + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.q_proj.\2"),
    (_VIT_LAYER + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.k_proj.\2"),
    (_VIT_LAYER + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.v_proj.\2"),
    (_VIT_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (_VIT_LAYER + r"layernorm_before\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (_VIT_LAYER + r"layernorm_after\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (_VIT_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (_VIT_LAYER + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"post_layernorm.\1"),
]

# Our vision tower uses CLIP's own parameter names; only a `vision_model.` prefix may need to go.
_CLIP_VISION_RULES = [(r"(?:vision_model\.)?(.*)", r"\1")]

_BERT_RULES = [
    (r"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)\.(weight|bias)", r"embeddings.\1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"encoder.layers.\1.self_attn.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"encoder.layers.\1.self_attn.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"encoder.layers.\1.self_attn.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
]


def _vision_tower_from_transformers(hf_config: Any, state: dict[str, torch.Tensor]) -> tuple[RegionMedCLIPVisionConfig, dict]:
    """Map a transformers ViT or CLIP-vision config and state dict onto our vision tower."""
    common = {
        "image_size": hf_config.image_size,
        "patch_size": hf_config.patch_size,
        "num_channels": hf_config.num_channels,
        "hidden_size": hf_config.hidden_size,
        "num_hidden_layers": hf_config.num_hidden_layers,
        "num_attention_heads": hf_config.num_attention_heads,
        "intermediate_size": hf_config.intermediate_size,
        "hidden_act": hf_config.hidden_act,
        "layer_norm_eps": hf_config.layer_norm_eps,
    }
    if hf_config.model_type == "vit":
        if not getattr(hf_config, "qkv_bias", True):
            raise ValueError("ViT checkpoints with qkv_bias=False are not supported: our attention has biases")
        config = RegionMedCLIPVisionConfig(**common, pre_layernorm=False)
        mapped = _rename(state, _VIT_RULES, skip=r"^pooler\.|mask_token")
        mapped["embeddings.position_embedding.weight"] = mapped["embeddings.position_embedding.weight"][0]
        mapped["embeddings.class_embedding"] = mapped["embeddings.class_embedding"].reshape(-1)
        return config, mapped
    if hf_config.model_type == "clip_vision_model":
        config = RegionMedCLIPVisionConfig(**common, pre_layernorm=True)
        mapped = _rename(state, _CLIP_VISION_RULES, skip=r"position_ids")
        # CLIP's patch convolution has no bias; ours does, and zero makes them the same function.
        mapped["embeddings.patch_embedding.bias"] = torch.zeros(hf_config.hidden_size)
        return config, mapped
    raise ValueError(
        f"vision_path must hold a ViT, CLIP vision or CLIP checkpoint, got model_type {hf_config.model_type!r}"
    )


def _text_tower_from_bert(hf_config: Any, state: dict[str, torch.Tensor], cls_token_id: int) -> tuple[RegionMedCLIPTextConfig, dict]:
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only BERT checkpoints with absolute position embeddings are supported")
    config = RegionMedCLIPTextConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        hidden_act=hf_config.hidden_act,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        hidden_dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        cls_token_id=cls_token_id,
    )
    return config, _rename(state, _BERT_RULES, skip=r"^pooler\.|position_ids|token_type_ids")
