"""What a forward pass of the target costs by shape, measured on this machine.

On a CPU a pass over n new tokens does not cost n steps, nor one: the matrix kernels handle some
row counts much better than others. Measured on a 2-core CPU with Qwen2.5-Coder-1.5B in float32
(``../shared/MODELS.md``): 2 tokens cost 2.04 steps, 4 tokens 1.86, 8 tokens 1.74, while 3, 7 or
11 tokens cost about 2.9. Two things follow, both used by the decoding loop:

- a verification pass over n tokens can be **padded** with filler tokens up to the cheapest size
  m >= n. Attention is causal, so the filler cannot change the logits of the real positions; its
  KV entries are rolled back with the rejected drafts;
- the draft length k is chosen with the cost of the pass it leads to (see
  :mod:`specdecode.drafters.schedule`).

:class:`PassCosts` is that table (relative to a one-token pass); :func:`measure_pass_costs`
makes it with a short micro-benchmark on a live session.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import StaticLayer

from specdecode.models.cache import RollbackLayer
from specdecode.models.loading import LoadedModel
from specdecode.models.machine import cache_file, cpu_name, read_cached, recalibrating, write_cached
from specdecode.models.session import Session
from specdecode.models.timing import synchronize

# Pass sizes timed by default: the usual fast shapes and their neighbours. Unlisted sizes are
# never fed when padding is on (the next listed size is cheaper or equal by construction).
DEFAULT_SIZES = (1, 2, 4, 6, 8, 12, 16)


@dataclass(frozen=True)
class PassCosts:
    """Cost of one forward pass over n new tokens relative to a one-token pass (a plain step).

    Example, with ``relative = {1: 1.0, 2: 2.04, 4: 1.86, 8: 1.74}``: feeding 2 tokens costs
    more than feeding 8, so ``padded_size(2)`` is 8 and ``cost(2)`` is 1.74 (with padding).
    """

    relative: dict[int, float]  # measured size n -> seconds(n) / seconds(1); n = 1 gives 1.0
    step_seconds: float = 0.0  # seconds of a one-token pass when measured (0: not measured)
    context_tokens: int = 0  # context length the passes were timed at
    sizes: tuple[int, ...] = field(init=False)  # measured sizes, ascending

    def __post_init__(self) -> None:
        if 1 not in self.relative:
            raise ValueError("a pass-cost table needs the one-token pass (n = 1)")
        if any(n < 1 or cost <= 0 for n, cost in self.relative.items()):
            raise ValueError(f"pass sizes must be >= 1 and costs > 0, got {self.relative}")
        object.__setattr__(self, "sizes", tuple(sorted(self.relative)))

    def padded_size(self, n: int, limit: int | None = None) -> int:
        """The measured size m >= n (and <= ``limit``) with the cheapest pass; the smallest
        among equals. ``n`` itself when no measured size fits."""
        fits = [m for m in self.sizes if m >= n and (limit is None or m <= limit)]
        if not fits:
            return n
        return min(fits, key=lambda m: (self.relative[m], m))

    def cost(self, n: int, padded: bool = True) -> float:
        """Relative cost of a pass that must hold ``n`` tokens.

        ``padded``: the cheapest measured size >= n (what the loop feeds when padding is on).
        Otherwise the cost of n itself when measured, else of the next measured size (an upper
        bound for the kernels seen here). Beyond the largest size: linear in n from it.
        """
        if n <= 1:
            return 1.0
        if padded:
            size = self.padded_size(n)
            if size in self.relative:
                return self.relative[size]
        elif n in self.relative:
            return self.relative[n]
        above = [m for m in self.sizes if m >= n]
        if above:
            return self.relative[above[0]]
        largest = self.sizes[-1]
        return self.relative[largest] * n / largest

    def to_dict(self) -> dict[str, object]:
        return {
            "relative": {str(n): self.relative[n] for n in self.sizes},
            "step_seconds": self.step_seconds,
            "context_tokens": self.context_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PassCosts:
        return cls(
            relative={int(n): float(c) for n, c in data["relative"].items()},
            step_seconds=float(data.get("step_seconds", 0.0)),
            context_tokens=int(data.get("context_tokens", 0)),
        )


def measure_pass_costs(
    session: Session,
    context: Sequence[int],
    sizes: Sequence[int] = DEFAULT_SIZES,
    repetitions: int = 2,
) -> PassCosts:
    """Time one pass of each size in ``sizes`` after ``context``; leaves ``session`` empty.

    Each size is the median of ``repetitions`` timings after the session's ``warmup_passes``
    discarded rounds (one; three for a compiled session, whose CUDA graphs are recorded on the
    second call). Sizes are
    timed round-robin (1, 2, 4, ..., 1, 2, 4, ...) so that a change in the machine's load
    falls on all of them alike. The filler fed is the context's own tokens (their values do not
    change a pass's cost). Every pass keeps the logits of all its positions, as a padded
    verification pass does, and is rolled back, so all see the same context length.
    """
    ids = [int(t) for t in context]
    wanted = sorted({1, *(int(n) for n in sizes)})
    if not ids:
        raise ValueError("measuring pass costs needs a non-empty context")
    session.reset()
    session.forward(ids, 1)
    length = session.length
    filler = (ids * (wanted[-1] // len(ids) + 1))[: wanted[-1]]
    times: dict[int, list[float]] = {n: [] for n in wanted}
    warmup = max(1, session.warmup_passes)
    for rep in range(repetitions + warmup):
        for n in wanted:
            synchronize(session.device)
            start = time.perf_counter()
            session.forward(filler[:n], n)
            synchronize(session.device)
            elapsed = time.perf_counter() - start
            session.truncate(length)
            if rep >= warmup:  # the first rounds warm up (compile, record CUDA graphs)
                times[n].append(elapsed)
    session.reset()
    medians = {n: statistics.median(t) for n, t in times.items()}
    step = medians[1]
    return PassCosts(
        relative={n: medians[n] / step for n in wanted},
        step_seconds=step,
        context_tokens=length,
    )


def pass_costs_for(target: LoadedModel, session: Session, context: Sequence[int]) -> PassCosts:
    """The target's pass costs, measured once per model, precision, device, kernels, thread
    count, CPU and library versions and kept on disk (``$SPECDECODE_HOME/pass-costs/``), so
    that each new process does not spend ~20 target passes measuring them again.
    ``SPECDECODE_RECALIBRATE=1`` measures anew (e.g. after a calibration taken on a busy
    machine)."""
    path = _cost_cache_path(target)
    if not recalibrating():
        cached = _read_costs(path)
        if cached is not None:
            return cached
    costs = measure_pass_costs(session, context)
    write_cached(path, costs.to_dict())
    return costs


def _cost_cache_path(target: LoadedModel) -> Path:
    import transformers

    return cache_file(
        "pass-costs",
        [
            target.config_hash(),
            str(target.dtype),
            str(target.device),
            target.kernel_name,
            target.session_kind,
            getattr(target.model.config, "_attn_implementation", None),
            None if target.kernels is None else target.kernels.row_padding(),
            torch.get_num_threads(),
            cpu_name(),
            os.cpu_count(),
            torch.__version__,
            transformers.__version__,
            DEFAULT_SIZES,
        ],
    )


def _read_costs(path: Path) -> PassCosts | None:
    data = read_cached(path)
    try:
        return None if data is None else PassCosts.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def can_pad(cache: Cache) -> bool:
    """Whether filler may be fed and rolled back: only where every layer is a
    :class:`RollbackLayer` or a full-attention static layer (a sliding-window layer may evict
    real entries for the filler)."""
    return bool(cache.layers) and all(
        isinstance(layer, RollbackLayer) or type(layer) is StaticLayer for layer in cache.layers
    )
