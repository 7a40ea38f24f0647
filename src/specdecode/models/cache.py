"""A KV cache whose rollback is free: rejected draft tokens are dropped by moving a length.

transformers' ``DynamicLayer`` concatenates new keys onto the old ones at every step, copying the
whole layer each time. :class:`RollbackLayer` instead keeps a preallocated buffer (grown by
doubling, so a copy happens O(log n) times per sequence), writes new keys at their positions
and returns views. Truncating to an earlier length only changes an integer; the stale entries
are overwritten by the next update (as in gpt-fast's static cache).

Layers of other kinds (sliding window, linear attention) keep transformers' own implementation
and are rolled back with its ``crop`` (a sliding-window layer records its past for that, so
that drafts can be rolled back after its window is full; it can be cut back only by what the
last pass added, so such caches are never kept across sequences).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_MIN_CAPACITY = 256


class RollbackLayer(DynamicLayer):
    """One layer's keys and values, shape (B, H, capacity, D), of which ``length`` are valid."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.length = 0
        self._k_buf: torch.Tensor | None = None
        self._v_buf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _ensure_capacity(
        self, key_states: torch.Tensor, value_states: torch.Tensor, need: int
    ) -> None:
        cap = 0 if self._k_buf is None else self._k_buf.shape[-2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, _MIN_CAPACITY)
        k_shape = (*key_states.shape[:-2], new_cap, key_states.shape[-1])
        v_shape = (*value_states.shape[:-2], new_cap, value_states.shape[-1])
        k_buf = key_states.new_empty(k_shape)
        v_buf = value_states.new_empty(v_shape)
        if self._k_buf is not None and self._v_buf is not None and self.length:
            k_buf[..., : self.length, :] = self._k_buf[..., : self.length, :]
            v_buf[..., : self.length, :] = self._v_buf[..., : self.length, :]
        self._k_buf, self._v_buf = k_buf, v_buf

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._ensure_capacity(key_states, value_states, end)
        assert self._k_buf is not None and self._v_buf is not None
        self._k_buf[..., start:end, :] = key_states
        self._v_buf[..., start:end, :] = value_states
        self.length = end
        self.keys = self._k_buf[..., :end, :]
        self.values = self._v_buf[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (no-op when fewer are held)."""
        if length < self.length:
            self.length = length
            if self._k_buf is not None and self._v_buf is not None:
                self.keys = self._k_buf[..., :length, :]
                self.values = self._v_buf[..., :length, :]

    def crop(self, tokens_to_remove: int) -> None:
        # transformers' convention: a negative number of tokens to drop
        self.truncate(self.length - abs(tokens_to_remove))

    def reset(self) -> None:
        """Forget the sequence but keep the buffers for the next one."""
        self.length = 0
        if self._k_buf is not None and self._v_buf is not None:
            self.keys = self._k_buf[..., :0, :]
            self.values = self._v_buf[..., :0, :]


def make_cache(config: Any) -> DynamicCache:
    """A cache for a model with ``config``: rollback layers for full attention, HF's otherwise."""
    cache = DynamicCache(config=config)
    if not cache.layers:  # config without layer information: layers appear lazily
        cache.layer_class_to_replicate = RollbackLayer
        return cache
    cache.layers = [
        RollbackLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    for layer in cache.layers:
        # A sliding-window layer drops what leaves its window at every update, and then refuses
        # to roll back rejected drafts once the window is full; recording the past keeps a
        # pass's states until the rollback's crop trims them (transformers' own remedy).
        activate = getattr(layer, "activate_past_recording", None)
        if activate is not None:
            activate()
    return cache


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Roll every layer back to at most ``length`` positions. Costs nothing for rollback layers."""
    for layer in cache.layers:
        if isinstance(layer, RollbackLayer):
            layer.truncate(length)
        else:  # transformers' own layer (sliding window, linear attention...): its crop
            hf_layer: Any = layer
            held = hf_layer.get_seq_length()
            if held > length:
                hf_layer.crop(length - held)


def reset_cache(cache: DynamicCache) -> None:
    """Empty the cache for a new sequence, keeping preallocated buffers where there are any."""
    for layer in cache.layers:
        layer.reset()
