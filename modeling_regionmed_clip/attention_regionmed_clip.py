"""Attention backends: eager, xformers' memory-efficient attention, and transformers' own (SDPA,
flex attention, flash attention).

Every backend follows transformers' contract `fn(module, query, key, value, attention_mask,
scaling=, dropout=, **kwargs) -> (output [B, S, H, D], weights | None)` with query/key/value
`[B, H, S, D]`. The mask is made for the backend by transformers' `create_bidirectional_mask`
from a `(B, Sk)` padding mask: None without padding (SDPA and flash then take their fastest
kernels), a boolean `[B, 1, Sq, Sk]` for SDPA, a `BlockMask` for flex attention, the 2-D padding
mask for flash attention, and an additive float mask (0 / dtype minimum) for eager and xformers.

Importing this module registers `"xformers"` in `ALL_ATTENTION_FUNCTIONS` and its mask in
`ALL_MASK_ATTENTION_FUNCTIONS`, which makes `attn_implementation="xformers"` legal. The xformers kernels exist only on CUDA: on any other
device, or when xformers is not installed, the backend falls back to SDPA so a config saved on
a GPU box still runs on a laptop.
"""

import warnings

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
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
    "eager_attention_forward",
    "xformers_attention_forward",
]

XFORMERS_AVAILABLE = xops is not None

# xformers needs the key dimension of a tensor bias to be stored with a stride that is a multiple of 8.
_XFORMERS_BIAS_ALIGNMENT = 8


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
ALL_MASK_ATTENTION_FUNCTIONS.register("xformers", eager_mask)  # additive, expanded to the aligned bias
