"""Timing helpers: every timer reads after a device sync."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_time(
    fn: Callable[[], object], repetitions: int, device: torch.device | str, warmup: int = 1
) -> float:
    """Median seconds of ``fn`` over ``repetitions`` synced runs, after ``warmup`` discarded."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repetitions)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
