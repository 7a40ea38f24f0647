"""Attention for verification passes on grouped-query models, without copying the cache.

transformers' SDPA attention handles a model whose query heads share key/value heads (GQA:
Qwen2.5-1.5B has 12 query heads over 2) in one of three ways: with no mask (a prefill) it asks
SDPA for ``enable_gqa``; for one query token it folds the query heads of a group into one
head's rows ("pack_gqa"); for several query tokens with a mask - every verification pass over
a cache - it copies each key/value head once per query head (``repeat_kv``) before calling
SDPA. That copy is the whole cache, six times over on Qwen2.5-1.5B, in every layer of every
pass: at 800 tokens of context it made a 6-token pass cost 1.16 plain steps against 0.99 at 100
(docs/speed.md).

:func:`grouped_sdpa_attention` extends the one-token fold to several tokens (and to one token
with a mask under ``torch.compile``, where transformers copies too: its fold is eager-only).
The query heads of a group become that group's rows (``n_rep x q`` of them), the mask is
repeated along the rows to match, and SDPA attends over the cache as it is. Every row still
takes the softmax of its own dot products with the same keys, so only the kernel's summation
order can differ, as between any two SDPA paths (on Qwen2.5-Coder-1.5B at 800 tokens of
context, a 6-token pass gave bit-identical logits). Every other case goes to transformers' own
function unchanged.

Models loaded by :func:`specdecode.models.load_model` with SDPA attention use it
(:func:`use_grouped_attention`). The benchmark runs transformers' own modes inside
:func:`transformers_attention`, on transformers' SDPA attention, as its users get it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "specdecode_sdpa"
_registered = False


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; query (B, H, q, D), key/value (B, Hkv, L, D);
    returns (B, q, H, D)."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    batch, heads, q_len, dim = query.shape
    foldable = (
        groups > 1
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and key.shape[1] * groups == heads
        and key.shape[-1] == value.shape[-1] == dim
        and dropout == 0.0
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )
    if not foldable:
        out: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
        return out
    assert attention_mask is not None  # for the type checker: foldable says so
    kv_heads = key.shape[1]
    rows = query.reshape(batch, kv_heads, groups * q_len, dim)  # group g's heads, then tokens
    mask = attention_mask.repeat(1, 1, groups, 1)  # (B, 1, groups * q, L), rows as the queries'
    attended = torch.nn.functional.scaled_dot_product_attention(
        rows, key, value, attn_mask=mask, scale=scaling
    )
    return attended.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make :data:`NAME` an attention implementation transformers knows (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def use_grouped_attention(model: Any) -> bool:
    """Switch a model that runs transformers' SDPA attention with grouped key/value heads to
    :func:`grouped_sdpa_attention`; return whether it was switched."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None)
    if not heads or not kv_heads or heads == kv_heads:
        return False
    register()
    model.set_attn_implementation(NAME)
    return bool(config._attn_implementation == NAME)


def transformers_implementation(model: Any) -> str:
    """The attention transformers itself would give ``model``: SDPA in place of ours."""
    current = str(getattr(model.config, "_attn_implementation", None))
    return "sdpa" if current == NAME else current


@contextmanager
def transformers_attention(model: Any) -> Iterator[str]:
    """Run the block on transformers' SDPA attention where ``model`` uses ours; yield the
    implementation in use."""
    inside = transformers_implementation(model)
    if getattr(model.config, "_attn_implementation", None) != NAME:
        yield inside
        return
    model.set_attn_implementation(inside)
    try:
        yield inside
    finally:
        model.set_attn_implementation(NAME)
