"""Rolling the KV cache back is exact: after a truncate, a forward pass equals a fresh one."""

from __future__ import annotations

import pytest
import torch

from specdecode.models import ModelSession

from .conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_after_rollback_equals_fresh_forward(tiny, arch):
    model = tiny(arch).model
    prompt = [5, 17, 42, 99, 7, 3, 250]
    rejected = [11, 12, 13, 14]
    accepted = [21, 22]
    session = ModelSession(model)
    session.forward(prompt)
    session.forward(accepted + rejected, 6)
    session.truncate(len(prompt) + len(accepted))
    after = session.forward([77, 78], 2)

    fresh = ModelSession(model)
    expected = fresh.forward(prompt + accepted + [77, 78], 2)
    assert torch.allclose(after, expected, atol=1e-5, rtol=1e-4)
    assert session.length == fresh.length == len(prompt) + len(accepted) + 2


@pytest.mark.parametrize("arch", ARCHS)
def test_sync_keeps_common_prefix(tiny, arch):
    session = ModelSession(tiny(arch).model)
    session.forward([1, 2, 3, 4, 5])
    assert session.sync([1, 2, 3, 9, 9]) == [9, 9]
    assert session.length == 3
    assert session.sync([1, 2, 3]) == [3]  # always leaves one token to feed
    assert session.length == 2


def test_rollback_does_not_copy_the_cache(tiny):
    session = ModelSession(tiny("llama").model)
    session.forward(list(range(1, 40)))
    layer = session.cache.layers[0]
    buffer = layer._k_buf.data_ptr()
    session.forward([5, 6, 7, 8], 4)
    session.truncate(40)
    session.forward([9], 1)
    assert layer._k_buf.data_ptr() == buffer  # written in place, never reallocated
    assert layer.get_seq_length() == 41


def test_cache_grows_past_its_initial_capacity(tiny):
    model = tiny("qwen2").model
    ids = [int(i) % 300 + 3 for i in range(300)]
    session = ModelSession(model)
    for start in range(0, 300, 50):
        out = session.forward(ids[start : start + 50], 1)
    fresh = ModelSession(model).forward(ids, 1)
    assert torch.allclose(out, fresh, atol=1e-5, rtol=1e-4)
