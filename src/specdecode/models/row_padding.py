"""Row padding: compute a small matrix product as a slightly taller one where that runs faster.

oneDNN picks its kernel for a packed linear layer by the number of rows (tokens) of the input,
and on the CPUs we measured the kernels for one or two rows are not its fastest: on this
project's machine (AMD EPYC, 2 threads, float32, weights packed for 8 rows), an 8960 x 1536
product took 2.28 ms for 1 row, 2.59 ms for 2, 2.00 ms for 4 and 1.93 ms for 6
(docs/speed.md). Decoding feeds exactly those small row counts: one row per plain step, k + 1
per verification pass. Computing 1 or 2 rows as 6 (zero rows below the real ones, their outputs
dropped) makes those passes cheaper; each output row depends on its own input row only, so the
real rows get the same product (up to the order of additions inside the kernel, as between any
two row counts).

Which row counts gain is a property of the CPU, the thread count and the layer's shape, so it is
measured: :func:`tune_row_padding` times every distinct shape of a model's packed layers for 1 to
``max_rows`` rows (streaming enough weights to miss the caches, as decoding does), pads a row
count only where a taller product was measured faster by more than ``margin``, and keeps the
timings on disk (``$SPECDECODE_HOME/row-padding/``) so that each machine measures each shape
once. ``SPECDECODE_RECALIBRATE=1`` measures anew. Layers under 1 MiB of weights are left alone
(their products are too short for the difference to matter, or to be measured reliably).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specdecode.models.kernels import LinearKernels, PackedLinear
from specdecode.models.machine import cache_file, cpu_name, read_cached, recalibrating, write_cached

log = logging.getLogger(__name__)

MAX_ROWS = 8  # never pad a product beyond this many rows
MARGIN = 0.05  # pad only where the taller product was measured this much faster
MIN_WEIGHT_BYTES = 1 << 20  # layers with smaller weights are never padded
STREAM_BYTES = 96 << 20  # weight bytes each timing streams (more than a CPU's caches hold)
REPEATS = 7  # timings per row count; the median is kept


@dataclass(frozen=True)
class ShapeTiming:
    """Measured seconds of one product over each row count, for one layer shape."""

    out_features: int
    in_features: int
    dtype: str
    seconds: dict[int, float]  # rows -> median seconds of one product

    @property
    def pad_rows(self) -> dict[int, int]:
        return choose_row_padding(self.seconds)

    def to_dict(self) -> dict[str, object]:
        return {
            "out_features": self.out_features,
            "in_features": self.in_features,
            "dtype": self.dtype,
            "seconds": {str(n): s for n, s in sorted(self.seconds.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ShapeTiming:
        seconds = data["seconds"]
        if not isinstance(seconds, dict):
            raise ValueError("seconds must be a mapping")
        return cls(
            out_features=int(str(data["out_features"])),
            in_features=int(str(data["in_features"])),
            dtype=str(data["dtype"]),
            seconds={int(n): float(s) for n, s in seconds.items()},
        )


def choose_row_padding(seconds: Mapping[int, float], margin: float = MARGIN) -> dict[int, int]:
    """For each timed row count n, the timed count m > n to compute it as, where m's product was
    measured faster than n's by more than ``margin`` (the fastest such m; the smallest among
    equals). Row counts that gain nothing are left out.

    >>> choose_row_padding({1: 2.3, 2: 2.6, 4: 2.0, 6: 1.9, 8: 2.3})
    {1: 6, 2: 6, 4: 6}
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")
    chosen = {}
    for n in sorted(seconds):
        best = min((m for m in seconds if m >= n), key=lambda m: (seconds[m], m))
        if best != n and seconds[best] < (1.0 - margin) * seconds[n]:
            chosen[n] = best
    return chosen


def time_rows(
    modules: Sequence[PackedLinear], rows: Sequence[int], repeats: int = REPEATS
) -> dict[int, float]:
    """Median seconds of one product of ``modules``' shape for each row count.

    Each timing runs every module once (so the weights stream from memory, as in decoding) and
    is divided by their number; row counts are interleaved so that a slow moment of a shared
    machine spreads over all of them. Products are computed as they come, never padded."""
    if not modules:
        raise ValueError("time_rows needs at least one module")
    first = modules[0]
    inputs = {n: torch.randn(n, first.in_features).to(first.dtype) for n in rows}
    samples: dict[int, list[float]] = {n: [] for n in rows}
    with torch.inference_mode():
        for repeat in range(repeats + 1):  # the first round warms up and is not kept
            for n in rows:
                start = time.perf_counter()
                for module in modules:
                    torch.ops.mkldnn._linear_pointwise(
                        inputs[n], module.packed, module.bias, "none", [], ""
                    )
                if repeat:
                    samples[n].append((time.perf_counter() - start) / len(modules))
    return {n: statistics.median(s) for n, s in samples.items()}


def tune_row_padding(
    kernels: LinearKernels,
    *,
    max_rows: int = MAX_ROWS,
    repeats: int = REPEATS,
    use_cache: bool = True,
) -> list[ShapeTiming]:
    """Measure (or read from the cache) each large layer shape's product time over 1 to
    ``max_rows`` rows and set every packed layer's ``pad_rows`` from it; return the timings."""
    return tune_module_padding(
        kernels.packed.values(), max_rows=max_rows, repeats=repeats, use_cache=use_cache
    )


def tune_module_padding(
    modules: Iterable[nn.Module],
    *,
    max_rows: int = MAX_ROWS,
    repeats: int = REPEATS,
    use_cache: bool = True,
) -> list[ShapeTiming]:
    """:func:`tune_row_padding` for any packed layers (others among ``modules`` are skipped)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    groups: dict[tuple[int, int, torch.dtype], list[PackedLinear]] = {}
    for module in modules:
        if isinstance(module, PackedLinear):
            key = (module.out_features, module.in_features, module.dtype)
            groups.setdefault(key, []).append(module)
    recalibrate = recalibrating()
    rows = list(range(1, max_rows + 1))
    timings = []
    for (out_features, in_features, dtype), modules in groups.items():
        weight_bytes = out_features * in_features * modules[0].packed.element_size()
        if weight_bytes < MIN_WEIGHT_BYTES:
            continue
        path = _cache_path(out_features, in_features, dtype, rows)
        timing = None if recalibrate or not use_cache else _read(path)
        if timing is None:
            streamed = modules[: max(1, -(-STREAM_BYTES // weight_bytes))]
            log.info(
                "timing %d x %d products over 1-%d rows (once per machine)",
                out_features,
                in_features,
                max_rows,
            )
            seconds = time_rows(streamed, rows, repeats)
            timing = ShapeTiming(out_features, in_features, str(dtype), seconds)
            if use_cache:
                write_cached(path, timing.to_dict())
        pad = timing.pad_rows
        for module in modules:
            module.pad_rows = dict(pad)
        timings.append(timing)
    return timings


def _cache_path(out_features: int, in_features: int, dtype: torch.dtype, rows: list[int]) -> Path:
    key = [out_features, in_features, str(dtype), rows, torch.get_num_threads(), cpu_name()]
    return cache_file("row-padding", [*key, os.cpu_count(), torch.__version__])


def _read(path: Path) -> ShapeTiming | None:
    data = read_cached(path)
    try:
        return None if data is None else ShapeTiming.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
