"""Regions of interest: RoIAlign on the global patch grid, the box geometry, the check of ROI (and
proposal) inputs, and the ROI processor, which fuses each region's crop feature, box and patch-grid
context into a region token, lets it cross-attend to the global patch tokens through gated
residuals, and attention-pools the regions into the image feature through a second gate."""

import math

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_regionmed_clip import RegionMedCLIPConfig
from .layers_regionmed_clip import RegionMedCLIPAttention, RegionMedCLIPMLP

__all__ = [
    "RegionMedCLIPAttentionPool",
    "RegionMedCLIPFusionLayer",
    "RegionMedCLIPROIProcessor",
    "box_geometry",
    "check_region_inputs",
    "roi_align",
]


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


def check_region_inputs(
    pixel_values: torch.Tensor,
    region_pixel_values: torch.Tensor | None,
    region_boxes: torch.Tensor | None,
    region_mask: torch.Tensor | None,
    prefix: str = "roi",
) -> torch.Tensor | None:
    """Validate ROI (or, with `prefix="proposal"`, proposal) inputs against `pixel_values (B, 3, H, W)`;
    returns the bool `(B, K)` mask or None. Errors name the inputs `{prefix}_pixel_values` and so on."""
    if region_pixel_values is None and region_boxes is None:
        if region_mask is not None:
            raise ValueError(f"{prefix}_mask was given without {prefix}_pixel_values and {prefix}_boxes")
        return None
    if region_pixel_values is None or region_boxes is None:
        missing = f"{prefix}_pixel_values" if region_pixel_values is None else f"{prefix}_boxes"
        raise ValueError(f"{missing} is required when the other {prefix} input is given")
    batch = pixel_values.shape[0]
    if region_pixel_values.ndim != 5 or region_pixel_values.shape[0] != batch:
        raise ValueError(
            f"{prefix}_pixel_values must be (B={batch}, K, C, h, w), got {tuple(region_pixel_values.shape)}"
        )
    num_rois = region_pixel_values.shape[1]
    if tuple(region_boxes.shape) != (batch, num_rois, 4):
        raise ValueError(f"{prefix}_boxes must be (B={batch}, K={num_rois}, 4), got {tuple(region_boxes.shape)}")
    if region_mask is None:
        region_mask = torch.ones(batch, num_rois, dtype=torch.bool, device=region_boxes.device)
    elif tuple(region_mask.shape) != (batch, num_rois):
        raise ValueError(f"{prefix}_mask must be (B={batch}, K={num_rois}), got {tuple(region_mask.shape)}")
    region_mask = region_mask.to(torch.bool)
    # Normalised xyxy on the global view: a box in pixels, or with its corners swapped, would be
    # pooled from the wrong place (or from nothing) without a word.
    tolerance = 1e-4
    outside = ((region_boxes < -tolerance) | (region_boxes > 1 + tolerance)).any(dim=-1)
    inverted = (region_boxes[..., 2] <= region_boxes[..., 0]) | (region_boxes[..., 3] <= region_boxes[..., 1])
    problems = torch.stack([~torch.isfinite(region_boxes).all(dim=-1), outside | inverted]) & region_mask  # (2, B, K)
    if problems.any():  # the one host read of a valid batch; the error path finds what was wrong
        if problems[0].any():
            raise ValueError(f"{prefix}_boxes holds NaN or inf in a valid slot")
        first = region_boxes[problems[1]][0].tolist()
        raise ValueError(f"{prefix}_boxes must be normalised xyxy in [0, 1] with x1 > x0 and y1 > y0 (the processor "
                         f"makes them from pixel boxes); got {[round(value, 4) for value in first]} in a valid slot")
    return region_mask


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
    """Fuses each ROI with global context and pools the regions into the image feature. Its dense head
    (the RoIAligned patch features of a box, projected and normalised) also reads the box-free windows
    (`box_free_regionmed_clip.pool_window_features`)."""

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
        context = self.context_projection(self.align_boxes(global_tokens, roi_boxes, patch_grid))
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

    def align_boxes(self, global_tokens: torch.Tensor, boxes: torch.Tensor, patch_grid: tuple[int, int]) -> torch.Tensor:
        """RoIAlign of `boxes (B, K, 4)` on the patch grid of `global_tokens (B, 1 + P, C)`: `(B, K, G * G * C)`."""
        batch, _, hidden = global_tokens.shape
        feature_grid = global_tokens[:, 1:].transpose(1, 2).reshape(batch, hidden, *patch_grid)
        return roi_align(feature_grid, boxes, self.context_grid).flatten(2)

    def dense_features(self, aligned: torch.Tensor) -> torch.Tensor:
        """The dense head: RoIAligned patch features `(B, N, G * G * C)` -> `(B, N, C)`."""
        return self.dense_layernorm(self.context_projection(aligned))
