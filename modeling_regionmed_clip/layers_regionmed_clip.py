"""Building blocks shared by the towers, the ROI fusion layers and the VQA head: multi-head attention
(self- or cross-attention, on any registered backend) and the two-layer MLP."""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .attention_regionmed_clip import eager_attention_forward

__all__ = ["RegionMedCLIPAttention", "RegionMedCLIPMLP"]


class RegionMedCLIPAttention(nn.Module):
    """Multi-head attention; self-attention, or cross-attention when `key_value_states` is given.

    `config` is the one whose `_attn_implementation` picks the backend.
    """

    def __init__(self, config: PreTrainedConfig, hidden_size: int, num_heads: int, dropout: float):
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
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `(B, Sq, C)`, key_value_states `(B, Sk, C)`; `attention_mask` as
        `create_bidirectional_mask` makes it for the backend, or None -> `(B, Sq, C)` and the weights
        `(B, H, Sq, Sk)` (None from backends that do not return them, e.g. SDPA)."""
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
            **kwargs,
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
