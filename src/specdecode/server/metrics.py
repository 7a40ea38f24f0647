"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a dependency.

Counters only grow; the gauges ``tau``, ``alpha`` and ``tokens_per_second`` are ratios of the
counters over the server's lifetime (compute windowed ratios from the counters with PromQL's
``rate``). Updated from the worker thread and the event loop, so every method takes a lock.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from dataclasses import dataclass, field

from specdecode.decoding import GenerationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "specdecode_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.total:.6f}", f"{name}_count {running}"]
        return out


@dataclass(frozen=True)
class QueueState:
    waiting: int
    running: int
    capacity: int


@dataclass
class _Totals:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    target_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    rejected_rounds: int = 0
    generation_seconds: float = 0.0


class Metrics:
    """What the server counts; :meth:`render` writes it for ``GET /metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._http: Counter[tuple[str, str, int]] = Counter()  # (method, route, status)
        self._finished: Counter[str] = Counter()  # by the loop's finish reason
        self._cancelled: Counter[str] = Counter()  # by why: client_disconnected, timeout
        self._rejected: Counter[str] = Counter()  # refused before queueing: queue_full
        self._totals = _Totals()
        self._ttft = Histogram()
        self._queue_wait = Histogram()

    # ----------------------------------------------------------------------------- recording
    def http_response(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self._http[(method, route, status)] += 1

    def rejected(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def cancelled(self, reason: str) -> None:
        with self._lock:
            self._cancelled[reason] += 1

    def queue_wait(self, seconds: float) -> None:
        with self._lock:
            self._queue_wait.observe(seconds)

    def first_token(self, seconds: float) -> None:
        """Time from admission (queue wait included) to a request's first token."""
        with self._lock:
            self._ttft.observe(seconds)

    def generation(self, stats: GenerationStats, finish_reason: str) -> None:
        with self._lock:
            t = self._totals
            self._finished[finish_reason] += 1
            t.prompt_tokens += stats.prompt_tokens
            t.cached_prompt_tokens += stats.cached_prompt_tokens
            t.generated_tokens += stats.new_tokens
            t.target_passes += stats.target_passes
            t.drafted_tokens += stats.drafted
            t.accepted_tokens += stats.accepted
            t.rejected_rounds += stats.rejected_rounds
            t.generation_seconds += stats.total_seconds

    # ----------------------------------------------------------------------------- rendering
    def render(self, queue: QueueState) -> str:
        with self._lock:
            lines = self._counters() + self._ratios() + self._queue(queue)
            lines += _family(
                "time_to_first_token_seconds",
                "histogram",
                "time from admission (queue wait included) to the first token",
            )
            lines += self._ttft.lines(PREFIX + "time_to_first_token_seconds")
            lines += _family("queue_wait_seconds", "histogram", "time spent waiting for the model")
            lines += self._queue_wait.lines(PREFIX + "queue_wait_seconds")
        return "\n".join(lines) + "\n"

    def _counters(self) -> list[str]:
        t = self._totals
        out = _family("http_requests_total", "counter", "HTTP responses by method, route, status")
        for (method, route, status), n in sorted(self._http.items()):
            out.append(_sample("http_requests_total", n, method=method, route=route, status=status))
        out += _labelled(
            "generations_total", "generations by finish reason", "finish_reason", self._finished
        )
        out += _labelled(
            "requests_cancelled_total",
            "requests stopped early, by reason",
            "reason",
            self._cancelled,
        )
        out += _labelled(
            "requests_rejected_total", "requests refused before queueing", "reason", self._rejected
        )
        for name, value, text in (
            ("prompt_tokens_total", t.prompt_tokens, "prompt tokens processed"),
            (
                "prompt_tokens_cached_total",
                t.cached_prompt_tokens,
                "of those, positions kept from the previous request's KV cache",
            ),
            ("generated_tokens_total", t.generated_tokens, "tokens generated"),
            ("target_passes_total", t.target_passes, "target forward passes, prefills included"),
            ("drafted_tokens_total", t.drafted_tokens, "tokens proposed by the drafter"),
            ("accepted_tokens_total", t.accepted_tokens, "drafted tokens accepted by the target"),
            ("rejected_rounds_total", t.rejected_rounds, "rounds whose draft was cut short"),
            ("generation_seconds_total", t.generation_seconds, "time spent generating"),
        ):
            out += [*_family(name, "counter", text), _sample(name, value)]
        return out

    def _ratios(self) -> list[str]:
        t = self._totals
        tau = t.generated_tokens / t.target_passes if t.target_passes else 0.0
        judged = t.accepted_tokens + t.rejected_rounds
        alpha = t.accepted_tokens / judged if judged else 0.0
        rate = t.generated_tokens / t.generation_seconds if t.generation_seconds else 0.0
        out: list[str] = []
        for name, value, text in (
            ("tau", tau, "tokens per target pass over the server's lifetime"),
            ("alpha", alpha, "acceptance rate of drafted tokens over the server's lifetime"),
            ("tokens_per_second", rate, "generated tokens per second of generation time"),
        ):
            out += [*_family(name, "gauge", text), _sample(name, value)]
        return out

    @staticmethod
    def _queue(queue: QueueState) -> list[str]:
        out: list[str] = []
        for name, value, text in (
            ("queue_depth", queue.waiting, "requests waiting for the model"),
            ("queue_running", queue.running, "requests generating now (0 or 1)"),
            ("queue_capacity", queue.capacity, "requests that may wait before 429"),
        ):
            out += [*_family(name, "gauge", text), _sample(name, value)]
        return out


def _family(name: str, kind: str, text: str) -> list[str]:
    return [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]


def _sample(name: str, value: float, **labels: object) -> str:
    shown = f"{value:.10g}" if isinstance(value, float) else str(value)
    if not labels:
        return f"{PREFIX}{name} {shown}"
    inner = ",".join(f'{key}="{_escape(str(v))}"' for key, v in labels.items())
    return f"{PREFIX}{name}{{{inner}}} {shown}"


def _labelled(name: str, text: str, label: str, counts: Counter[str]) -> list[str]:
    out = _family(name, "counter", text)
    return out + [_sample(name, n, **{label: key}) for key, n in sorted(counts.items())]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
