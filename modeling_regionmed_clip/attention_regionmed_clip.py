"""Attention backends: eager, xformers' memory-efficient attention, and transformers' own (SDPA,
flex attention, flash attention).

Every backend follows transformers' contract `fn(module, query, key, value, attention_mask,
scaling=, dropout=, **kwargs) -> (output [B, S, H, D], weights | None)` with query/key/value
`[B, H, S, D]`. The mask is made for the backend by transformers' `create_bidirectional_mask`
from a `(B, Sk)` padding mask: None without padding (SDPA and flash then take their fastest
kernels), a boolean `[B, 1, Sq, Sk]` for SDPA, a `BlockMask` for flex attention, the 2-D padding
mask for flash attention, an additive float mask (0 / dtype minimum) `[B, 1, Sq, Sk]` for eager,
and for xformers an additive key-padding bias `[B, 1, 1, Sk]` that each layer call expands to
`[B, H, Sq, Sk]` with stride 0 (a view: B x Sk values, not B x H x Sq x Sk).

Importing this module registers `"xformers"` in `ALL_ATTENTION_FUNCTIONS` and its mask in
`ALL_MASK_ATTENTION_FUNCTIONS`, which makes `attn_implementation="xformers"` legal. The xformers kernels exist only on CUDA: on any other
device, or when xformers is not installed, the backend falls back to SDPA so a config saved on
a GPU box still runs on a laptop.
"""

import warnings

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, bidirectional_mask_function, eager_mask
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
    "xformers_key_padding_mask",
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


def xformers_key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=bidirectional_mask_function,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """The xformers backend's mask (transformers' mask-interface signature): from a `(B, Sk)` padding
    mask, an additive `(B, 1, 1, Sk)` bias, 0 on tokens and the dtype's minimum on padding, stored with
    its key dim padded to a multiple of 8 (xformers' alignment); None without padding when skipping is
    allowed. A bidirectional mask does not vary over queries (or heads), so the query dim is left out.
    Any other mask pattern goes to transformers' `eager_mask`."""
    if mask_function is not bidirectional_mask_function:
        return eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, dtype,
                          allow_is_bidirectional_skip, **kwargs)
    if attention_mask is None:
        return None
    keep = attention_mask[:, -kv_length:].to(torch.bool)
    if allow_is_bidirectional_skip and keep.all():
        return None
    bias = _aligned_empty((batch_size, 1, 1), kv_length, dtype, keep.device).zero_()
    return bias.masked_fill_(~keep[:, None, None, :], torch.finfo(dtype).min)


def _aligned_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`mask` in `dtype` and in storage whose strides are multiples of 8, as xformers needs: as given
    when it already is (the mask above), else copied, its minimum clamped to `dtype`'s (under
    autocast the mask is made in the float32 of the embeddings and the query is half precision)."""
    if mask.dtype == dtype and all(stride % _XFORMERS_BIAS_ALIGNMENT == 0 for stride in mask.stride()[:-1]):
        return mask
    bias = _aligned_empty(mask.shape[:-1], mask.shape[-1], dtype, mask.device)
    return bias.copy_(mask.clamp(min=torch.finfo(dtype).min))


def _aligned_empty(leading_shape: tuple[int, ...], length: int, dtype: torch.dtype, device: torch.device
                   ) -> torch.Tensor:
    """An uninitialised `(*leading_shape, length)` view of storage whose last dim is padded to a multiple of 8."""
    padded_length = -(-length // _XFORMERS_BIAS_ALIGNMENT) * _XFORMERS_BIAS_ALIGNMENT
    return torch.empty((*leading_shape, padded_length), dtype=dtype, device=device)[..., :length]


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
        if attention_mask is not None:  # `(B, 1, 1 or Sq, Sk)`, broadcast over heads and queries
            bias = _aligned_bias(attention_mask, query.dtype).expand(batch, heads, q_len, key.shape[2])
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
ALL_MASK_ATTENTION_FUNCTIONS.register("xformers", xformers_key_padding_mask)
