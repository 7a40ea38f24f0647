"""A session on a static KV cache, optionally compiled: the GPU's fast path.

On a GPU a 1-2B model's decoding step is a few milliseconds of weight reads spread over hundreds
of small kernels; launched one by one from Python (transformers' eager path), the launches, not
the memory, set the pace. The cure (gpt-fast, transformers' ``cache_implementation="static"``)
is fixed shapes: a KV cache preallocated to a capacity, so that a pass of n tokens has the same
tensors every time, and ``torch.compile(mode="reduce-overhead")``, which records each such pass
once as a CUDA graph and replays it with one launch.

:class:`StaticSession` keeps :class:`~specdecode.models.session.ModelSession`'s interface, so the
decoding loop and the drafters use either. Rolling back is free as in our dynamic cache: the
cache's length is one device tensor per layer, moved in place; stale entries past it are masked
out by the causal mask and overwritten by the next pass. Only passes of up to
:data:`MAX_COMPILED_TOKENS` tokens (decoding steps and verification passes) are compiled, each
fed as the next power of two tokens (filler after the real ones, rolled back at once), so that a
model compiles at most six shapes; a longer prefill runs eagerly on the same cache.
When the sequence outgrows the capacity, the cache is reallocated at twice the size and its
entries copied (compiled passes then recompile once for the new buffers): :meth:`reserve`
sizes it up front.

``freeze=True`` (inductor only; experimental, not yet measured on a GPU) compiles with
inductor's *freezing*: the weights become constants of each compiled pass, which lets inductor
concatenate the query, key and value projections into one product and the MLP's gate and up
projections into another (4 products a layer instead of 7; on a GPU a 1B model's small products
are launch-bound, docs/speed.md). A frozen graph holds the tensors it reads as constants, the
KV cache's buffers included, so a frozen session guards its buffers and the model's weights by
address: a second session on the same model, or a cache grown into new buffers, compiles graphs
of its own rather than run one that reads another cache. The cost is memory (each compiled
pass shape of each frozen session holds its own concatenated copies of those weights) and
compile time per session; the weights can no longer change.

Outputs of a CUDA-graph replay live in buffers that the next replay overwrites, so the logits
are cloned before they are returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from specdecode.errors import InvalidSettingsError
from specdecode.models.session import SequenceSession

log = logging.getLogger(__name__)

MIN_CAPACITY = 256  # positions; capacities are multiples of this
MAX_COMPILED_TOKENS = 32  # passes of more tokens (prefills) run eagerly
COMPILE_MODE = "reduce-overhead"  # CUDA graphs on a GPU; inductor's kernels on a CPU
DYNAMO_CACHE_LIMIT = 64  # compiled variants per function: pass sizes x models sharing a class
# inductor's freezing; on a CPU it concatenates products only when told to (a GPU always may)
FREEZING = {"freezing": True, "cpp.enable_concat_linear": True}


class StaticSession(SequenceSession):
    """Feeds token ids to a causal LM over a preallocated (static) KV cache.

    Args:
        model: a causal LM with full attention in every layer.
        capacity: positions to preallocate (rounded up to a multiple of 256); grown on demand.
        compiled: run passes of up to :data:`MAX_COMPILED_TOKENS` tokens through
            ``torch.compile`` (CUDA graphs on a GPU).
        backend: the ``torch.compile`` backend (``inductor``; ``eager`` or ``aot_eager`` check
            the tracing without generating code, as the tests do).
        freeze: compile with inductor's freezing (fused projections; see above).
    """

    def __init__(
        self,
        model: Any,
        capacity: int = MIN_CAPACITY,
        compiled: bool = False,
        backend: str = "inductor",
        freeze: bool = False,
    ) -> None:
        super().__init__(model)
        if freeze and not (compiled and backend == "inductor"):
            raise InvalidSettingsError(
                "freezing the weights needs a compiled session on the inductor backend "
                f"(got compiled={compiled}, backend={backend!r})"
            )
        self.config = model.config
        self.compiled = compiled
        self.frozen = freeze
        # passes to discard before timing one: CUDA-graph trees warm up on a shape's first call,
        # record on the second and replay from the third
        self.warmup_passes = 3 if compiled else 1
        self._max_context = _context_limit(model.config)
        self.cache, self._layers = self._new_cache(_round_capacity(capacity))
        self._forward: Callable[..., Any] = model
        if compiled:
            import torch._dynamo

            dynamo_config: Any = torch._dynamo.config
            dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, DYNAMO_CACHE_LIMIT)
            limit = getattr(dynamo_config, "accumulated_cache_size_limit", 0)
            dynamo_config.accumulated_cache_size_limit = max(limit, 4 * DYNAMO_CACHE_LIMIT)
            options: dict[str, Any] = {"backend": backend, "dynamic": False}
            if freeze:  # the mode's options and freezing's: also a backend of its own, so that
                # dynamo never hands a frozen session a graph an unfrozen one compiled, or back
                options["options"] = {**_mode_options(COMPILE_MODE), **FREEZING}
            elif backend == "inductor":
                options["mode"] = COMPILE_MODE
            self._forward = torch.compile(model, **options)
            if freeze:
                self._forward = _with_freezing(self._forward)
                for parameter in model.parameters():
                    torch._dynamo.mark_static_address(parameter, guard=True)

    # ------------------------------------------------------------------ the session interface
    @property
    def capacity(self) -> int:
        return int(self._layers[0].max_cache_len)

    def reset(self) -> None:
        self.ids = []
        self._set_length(0)

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions (moves one counter per layer)."""
        if length < len(self.ids):
            del self.ids[length:]
            self._set_length(length)

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` positions now (at most the model's context), rather than
        growing mid-sequence."""
        if self._max_context is not None:
            positions = min(positions, self._max_context)
        if positions > self.capacity:
            self._grow(positions)

    @torch.inference_mode()
    def forward(self, new_ids: Sequence[int], num_logits: int = 1) -> torch.Tensor:
        """Run ``new_ids`` through the model; return the logits (num_logits, V) of the last ones.

        A compiled pass is fed as the next power of two tokens (filler copies of the last one
        after the real ones, so causal attention keeps them from the real positions' logits,
        and rolled back at once), so that each model compiles at most six pass shapes. (A
        dynamically quantized int8 model scales each pass's activations as a whole, so there
        the filler does move the real rows' logits a little, as any change of pass size does:
        for a draft that changes acceptance only.)"""
        if not new_ids:
            raise ValueError("forward needs at least one token")
        if not 1 <= num_logits <= len(new_ids):
            raise ValueError(f"num_logits must be in [1, {len(new_ids)}], got {num_logits}")
        n, start = len(new_ids), self.length
        compiled, size = self._plan(n, start)
        feed = [*new_ids, *[new_ids[-1]] * (size - n)]
        input_ids = torch.tensor([feed], dtype=torch.long, device=self.device)
        logits = self._run(input_ids, start, n, num_logits, compiled)
        self.ids.extend(int(i) for i in new_ids)
        return logits

    def _step(self, token: torch.Tensor, start: int) -> torch.Tensor:
        """One token already on the device, (1, 1), at position ``start``: its logits (V,)."""
        compiled, _ = self._plan(1, start)  # one token needs no filler: size 1
        return self._run(token, start, 1, 1, compiled)[-1]

    def _plan(self, n: int, start: int) -> tuple[bool, int]:
        """Whether a pass of ``n`` tokens at ``start`` runs compiled, and its size with filler;
        grows the cache to hold it."""
        # the first pass on a new cache runs eagerly: it allocates the buffers, which must be
        # made (and marked static) outside the compiled graph for CUDA graphs to replay them
        compiled = self.compiled and self._layers[0].is_initialized and n <= MAX_COMPILED_TOKENS
        size = _bucket(n) if compiled else n
        if self._max_context is not None and start + size > self._max_context:
            compiled, size = False, n  # no room for filler at the end of the context
        if start + size > self.capacity:
            self._grow(start + size, start)
            if not self._layers[0].is_initialized:  # an empty sequence: a new cache, eagerly
                compiled, size = False, n
        return compiled, size

    def _run(
        self, input_ids: torch.Tensor, start: int, n: int, num_logits: int, compiled: bool
    ) -> torch.Tensor:
        """The pass itself: ``input_ids`` (1, size), its first ``n`` real, at ``start``."""
        size = int(input_ids.shape[1])
        positions = torch.arange(start, start + size, dtype=torch.long, device=self.device)[None]
        # a compiled pass keeps every row's logits: one graph per size
        kwargs = self._forward_kwargs(size if compiled else num_logits)
        out = (self._forward if compiled else self.model)(
            input_ids=input_ids, position_ids=positions, **kwargs
        )
        if size > n:
            self._set_length(start + n)
        if not compiled and self.frozen:  # an eager pass may have made the cache's buffers
            self._guard_buffers()
        logits: torch.Tensor = out.logits[0, : out.logits.shape[1] - (size - n), :]
        logits = logits[-num_logits:]
        # a replayed CUDA graph's outputs are overwritten by its next replay
        return logits.clone() if compiled else logits

    # ------------------------------------------------------------------ the cache
    def _new_cache(self, capacity: int) -> tuple[StaticCache, list[StaticLayer]]:
        if self._max_context is not None and capacity > self._max_context:
            capacity = max(self._max_context, 1)
        cache = StaticCache(config=self.config, max_cache_len=capacity)
        layers = [layer for layer in cache.layers if type(layer) is StaticLayer]
        if not layers or len(layers) != len(cache.layers):
            raise InvalidSettingsError(
                "the static cache supports models with full attention in every layer; this "
                "model has sliding-window or other layers: use --kv-cache dynamic"
            )
        return cache, layers

    def _grow(self, positions: int, length: int | None = None) -> None:
        """Reallocate the cache for ``positions``, keeping its first ``length`` entries (by
        default those of ``self.ids``; a device-fed run is ahead of them)."""
        if self._max_context is not None and positions > self._max_context:
            raise InvalidSettingsError(
                f"the sequence needs {positions} positions but the model's context holds "
                f"{self._max_context}: shorten the prompt or max_new_tokens"
            )
        capacity = _round_capacity(max(positions, 2 * self.capacity))
        log.info("static KV cache grows from %d to %d positions", self.capacity, capacity)
        old = self._layers
        length = self.length if length is None else length
        self.cache, self._layers = self._new_cache(capacity)
        if length:
            for before, after in zip(old, self._layers, strict=True):
                if before.keys is None or before.values is None:  # pragma: no cover
                    raise RuntimeError("a static cache layer holds positions but no buffers")
                keys, values = before.keys[..., :length, :], before.values[..., :length, :]
                after.update(keys, values)  # allocates the buffers, copies, sets the length
        self._set_length(length)
        if self.frozen:
            self._guard_buffers()

    def _guard_buffers(self) -> None:
        """A frozen graph bakes in the cache's buffers: guard them by address, so that other
        buffers (another session's, a grown cache's) get graphs of their own."""
        import torch._dynamo

        for layer in self._layers:
            if layer.is_initialized:
                for tensor in (layer.keys, layer.values, layer.cumulative_length):
                    torch._dynamo.mark_static_address(tensor, guard=True)

    def _rewind(self, length: int) -> None:
        self._set_length(length)

    @torch.inference_mode()  # the buffers are made inside forward's inference mode
    def _set_length(self, length: int) -> None:
        counters = [layer.cumulative_length for layer in self._layers if layer.is_initialized]
        if counters:  # in place, so that their addresses stay static; two launches in all
            torch._foreach_mul_(counters, 0)
            torch._foreach_add_(counters, length)


def _mode_options(mode: str) -> dict[str, Any]:
    """The inductor options that ``torch.compile``'s ``mode`` stands for."""
    import torch._inductor

    return dict(torch._inductor.list_mode_options(mode))


def _with_freezing(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled`` called with inductor's freezing on, so that each pass shape it compiles on
    its first call is compiled frozen. (As a ``torch.compile`` option alone, freezing is not
    seen where dynamo traces the model, and the projections stay apart.) The patch is
    process-wide while a call runs: another thread compiling at that moment would compile
    frozen too."""
    import torch._inductor.config as inductor_config

    def call(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(FREEZING):
            return compiled(*args, **kwargs)

    return call


def _bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def _round_capacity(positions: int) -> int:
    return max(MIN_CAPACITY, -(-positions // MIN_CAPACITY) * MIN_CAPACITY)


def _context_limit(config: Any) -> int | None:
    from specdecode.models.loading import context_length

    return context_length(config)
