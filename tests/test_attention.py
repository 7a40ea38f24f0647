"""Grouped-query attention without copying the cache: the same attention as transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specdecode.models import ModelSession, load_model
from specdecode.models.attention import NAME, grouped_sdpa_attention, use_grouped_attention


class _Module(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _causal_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """(1, 1, q, kv) bool: query i (at position kv_len - q_len + i) sees keys up to itself."""
    rows = torch.arange(kv_len - q_len, kv_len)[:, None]
    return (torch.arange(kv_len)[None, :] <= rows)[None, None]


@pytest.mark.parametrize("q_len", [1, 2, 6])
@pytest.mark.parametrize("groups", [2, 6])
def test_folded_attention_equals_transformers_sdpa(q_len, groups):
    gen = torch.Generator().manual_seed(q_len * 10 + groups)
    kv_heads, dim, kv_len = 2, 16, 40
    query = torch.randn(1, kv_heads * groups, q_len, dim, generator=gen)
    key = torch.randn(1, kv_heads, kv_len, dim, generator=gen)
    value = torch.randn(1, kv_heads, kv_len, dim, generator=gen)
    mask = _causal_mask(q_len, kv_len)
    module = _Module(groups)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    got, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.25)
    assert got.shape == want.shape == (1, q_len, kv_heads * groups, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cases_it_does_not_fold_go_to_transformers_unchanged():
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 5, 8, generator=gen)
    key, value = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    module = _Module(2)
    want, _ = sdpa_attention_forward(module, query, key, value, None)  # a prefill: no mask
    got, _ = grouped_sdpa_attention(module, query, key, value, None)
    assert torch.equal(got, want)


def test_grouped_query_models_switch_and_the_others_do_not(tiny_dir):
    qwen = load_model(tiny_dir("qwen2"), device="cpu")  # 4 query heads over 2 key/value heads
    assert qwen.model.config._attn_implementation == NAME
    gpt2 = load_model(tiny_dir("gpt2"), device="cpu")  # one key/value head per query head
    assert gpt2.model.config._attn_implementation != NAME
    plain = load_model(tiny_dir("llama"), device="cpu", grouped_attention=False)
    assert plain.model.config._attn_implementation == "sdpa"
    assert use_grouped_attention(plain.model)


def test_a_verification_pass_gives_the_same_logits_either_way(tiny_dir):
    model = load_model(tiny_dir("qwen2"), device="cpu", grouped_attention=False).model
    ids, feed = list(range(5, 70)), [11, 12, 13, 14, 15]
    passes = []
    for implementation in ("sdpa", NAME):
        if implementation == NAME:
            use_grouped_attention(model)
        session = ModelSession(model)
        session.forward(ids, 1)
        passes.append(session.forward(feed, len(feed)))
    torch.testing.assert_close(passes[1], passes[0], rtol=1e-5, atol=1e-5)


def test_transformers_modes_run_on_transformers_attention(tiny):
    from specdecode.models.attention import transformers_attention

    model = tiny("qwen2").model
    assert model.config._attn_implementation == NAME
    with transformers_attention(model) as inside:
        assert inside == "sdpa" and model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == NAME
    gpt2 = tiny("gpt2").model  # not switched: left as it is
    with transformers_attention(gpt2) as inside:
        assert inside == gpt2.config._attn_implementation
