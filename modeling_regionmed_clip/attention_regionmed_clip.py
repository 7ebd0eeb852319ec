"""Attention backends: eager, SDPA (transformers' own) and xformers' memory-efficient attention.

Every backend follows transformers' contract `fn(module, query, key, value, attention_mask,
scaling=, dropout=, **kwargs) -> (output [B, S, H, D], weights | None)` with query/key/value
`[B, H, S, D]` and `attention_mask` an additive float mask broadcastable to `[B, H, Sq, Sk]`
(0 where attended, a large negative number at padding) or None.

Importing this module registers `"xformers"` in `ALL_ATTENTION_FUNCTIONS`, which makes
`attn_implementation="xformers"` legal. The xformers kernels exist only on CUDA: on any other
device, or when xformers is not installed, the backend falls back to SDPA so a config saved on
a GPU box still runs on a laptop.
"""

import warnings

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # optional extra `gpu`; kept in a try so the Hub's remote-code import check skips it
    import xformers.ops as xops
except ImportError:
    xops = None
except (OSError, RuntimeError) as error:  # installed but broken (e.g. built for another torch / CUDA)
    warnings.warn(f"xformers is installed but does not import ({error}); the 'xformers' attention backend "
                  "falls back to SDPA", stacklevel=1)
    xops = None

__all__ = [
    "XFORMERS_AVAILABLE",
    "additive_padding_mask",
    "eager_attention_forward",
    "xformers_attention_forward",
]

XFORMERS_AVAILABLE = xops is not None

# xformers needs the key dimension of a tensor bias to be stored with a stride that is a multiple of 8.
_XFORMERS_BIAS_ALIGNMENT = 8


def additive_padding_mask(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(B, Sk)` 1/True = attend -> additive mask `(B, 1, 1, Sk)` of 0 / dtype-min."""
    keep = key_padding_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention in plain torch; returns the attention weights too."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # softmax in fp32: half-precision exp overflows on long reports
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _aligned_bias(attention_mask: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Expand an additive mask to `[B, H, Sq, Sk]` in storage whose last dim is padded to a multiple of 8."""
    batch, heads, q_len, k_len = shape
    padded_k = -(-k_len // _XFORMERS_BIAS_ALIGNMENT) * _XFORMERS_BIAS_ALIGNMENT
    storage = torch.empty(batch, heads, q_len, padded_k, dtype=dtype, device=attention_mask.device)
    bias = storage[..., :k_len]
    bias.copy_(attention_mask.to(dtype).expand(batch, heads, q_len, k_len))
    return bias


def xformers_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`xformers.ops.memory_efficient_attention` on CUDA; SDPA elsewhere, and where the installed
    xformers has no kernel for the inputs (e.g. a wheel built for another torch / CUDA: it imports,
    then finds no operator), with one warning."""
    if _runs_xformers(query):
        batch, heads, q_len, _ = query.shape
        bias = None
        if attention_mask is not None:
            bias = _aligned_bias(attention_mask, (batch, heads, q_len, key.shape[2]), query.dtype)
        try:
            # xformers wants [B, S, H, D]; its output already is the layout transformers expects back.
            attn_output = xops.memory_efficient_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=bias, p=dropout,
                scale=scaling,
            )
            return attn_output, None
        except NotImplementedError as error:
            _warn_once(f"xformers has no kernel for these inputs ({str(error).splitlines()[0]}); the 'xformers' "
                       "attention backend falls back to SDPA")
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=False
    )


def _runs_xformers(query: torch.Tensor) -> bool:
    return xops is not None and query.is_cuda


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


ALL_ATTENTION_FUNCTIONS.register("xformers", xformers_attention_forward)
