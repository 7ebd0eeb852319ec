"""RegionMed-CLIP for visual question answering: answers classified over a fixed answer set.

The question's token states (text tower, projected into the shared embedding space) cross-attend
to the image's tokens in the same space: the image embedding (box-free, or with the given regions
pooled in), the projected global patch tokens and, when ROI inputs are given, the region tokens.
The attended question is pooled over its valid tokens and classified over `config.id2label`, the
answers of the training set (closed yes / no and open answers alike).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_regionmed_clip import RegionMedCLIPConfig
from .layers_regionmed_clip import RegionMedCLIPAttention, RegionMedCLIPMLP
from .modeling_regionmed_clip import RegionMedCLIPModel, RegionMedCLIPPreTrainedModel

__all__ = ["RegionMedCLIPForVQA", "RegionMedCLIPVQAOutput"]


@dataclass
class RegionMedCLIPVQAOutput(ModelOutput):
    """loss: cross-entropy over the answers (when `labels` are given); logits: `(B, A)` answer scores;
    question_states: `(B, L, D)` the question tokens after fusion. With `output_hidden_states`,
    hidden_states: the question stream `(B, L, D)` entering the fusion and after each fusion layer;
    with `output_attentions`, attentions: each fusion layer's question-to-image weights `(B, H, L, T)`
    (none from backends that return no weights)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    question_states: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor | None, ...] | None = None


class RegionMedCLIPVQAFusionLayer(GradientCheckpointingLayer):
    """Question tokens cross-attend to the image tokens (padding regions masked out), then an MLP;
    pre-LayerNorm residuals."""

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__()
        dim, eps = config.projection_dim, config.vision_config.layer_norm_eps
        self.query_norm = nn.LayerNorm(dim, eps=eps)
        self.context_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = RegionMedCLIPAttention(config, dim, config.vqa_fusion_heads, config.vision_config.attention_dropout)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = RegionMedCLIPMLP(dim, 4 * dim, config.vision_config.hidden_act)

    def forward(self, question: torch.Tensor, image_tokens: torch.Tensor,
                image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """question `(B, L, D)`, image_tokens `(B, T, D)`, image_mask over the image tokens as
        `create_bidirectional_mask` makes it for the backend -> `(B, L, D)` and the attention weights
        `(B, H, L, T)` (None from backends that return none)."""
        attended, weights = self.cross_attn(self.query_norm(question), image_mask,
                                            key_value_states=self.context_norm(image_tokens))
        question = question + attended
        return question + self.mlp(self.mlp_norm(question)), weights


class RegionMedCLIPForVQA(RegionMedCLIPPreTrainedModel):
    """A RegionMed-CLIP backbone (`self.regionmed_clip`, loadable from a pretrained RegionMed-CLIP
    folder) with a question-to-image fusion head and an answer classifier over `config.id2label`."""

    _no_split_modules = [*RegionMedCLIPPreTrainedModel._no_split_modules, "RegionMedCLIPVQAFusionLayer"]
    # Its cross-attention masks padded image tokens (keys) but not the queries: flash attention's
    # unpadding of both sides by one mask does not fit it.
    _supports_flash_attn = False
    # The question stream entering the fusion and each fusion layer's output and weights. The backbone's
    # towers record their own outputs; the backbone's output is not part of this model's.
    _can_record_outputs = {"hidden_states": OutputRecorder(RegionMedCLIPVQAFusionLayer, index=0),
                           "attentions": OutputRecorder(RegionMedCLIPVQAFusionLayer, index=1)}

    def __init__(self, config: RegionMedCLIPConfig):
        super().__init__(config)
        self.regionmed_clip = RegionMedCLIPModel(config)
        # The contrastive temperature takes no part in answering: frozen, so it is not trained either.
        self.regionmed_clip.logit_scale.requires_grad_(False)
        dim = config.projection_dim
        self.fusion_layers = nn.ModuleList([RegionMedCLIPVQAFusionLayer(config) for _ in range(config.vqa_fusion_layers)])
        self.answer_norm = nn.LayerNorm(dim, eps=config.vision_config.layer_norm_eps)
        self.classifier = nn.Linear(dim, config.num_labels)
        self.post_init()

    @capture_outputs
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        roi_pixel_values: torch.Tensor | None = None,
        roi_boxes: torch.Tensor | None = None,
        roi_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RegionMedCLIPVQAOutput:
        """pixel_values `(B, 3, H, W)`; input_ids / attention_mask `(B, L)` the questions; optional ROI
        inputs as in `RegionMedCLIPModel`; labels `(B,)` answer indices (-100 = ignored). `output_hidden_states`
        / `output_attentions` default to the config's; a tuple with `return_dict=False`."""
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"one question per image: input_ids {tuple(input_ids.shape)} vs pixel_values "
                             f"{tuple(pixel_values.shape)}")
        clip = self.regionmed_clip
        no_outputs = {"output_hidden_states": False, "output_attentions": False}  # the backbone's are not returned
        vision = clip._vision_forward(pixel_values, roi_pixel_values, roi_boxes, roi_mask, **no_outputs)
        patch_tokens = clip.visual_projection(vision["vision_output"].last_hidden_state[:, 1:])  # (B, P, D)
        image_tokens = [vision["image_embeds"][:, None].to(patch_tokens.dtype), patch_tokens]
        token_mask = [torch.ones(patch_tokens.shape[0], 1 + patch_tokens.shape[1], dtype=torch.bool,
                                 device=patch_tokens.device)]
        if vision["region_embeds"] is not None:
            image_tokens.append(vision["region_embeds"])
            token_mask.append(vision["roi_mask"])
        image_tokens = torch.cat(image_tokens, dim=1)

        if attention_mask is None:
            attention_mask = (input_ids != self.config.text_config.pad_token_id).long()
        question_tokens = clip.text_model(input_ids, attention_mask, return_dict=True, **no_outputs).last_hidden_state
        question = clip.text_projection(question_tokens)  # (B, L, D)
        image_mask = create_bidirectional_mask(self.config, question, torch.cat(token_mask, dim=1),
                                               encoder_hidden_states=image_tokens)
        for layer in self.fusion_layers:
            question, _ = layer(question, image_tokens, image_mask)
        token_weights = attention_mask.to(question.dtype)[..., None]
        pooled = (question * token_weights).sum(1) / token_weights.sum(1).clamp(min=1.0)
        logits = self.classifier(self.answer_norm(pooled))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.to(logits.device))
        return RegionMedCLIPVQAOutput(loss=loss, logits=logits, question_states=question)
