"""The engine: one model, one KV cache, one generation at a time, requests served in FIFO order.

A :class:`SpeculativeGenerator` holds one target session (and a drafter with its own state), so
two generations must never interleave. The engine owns the generator and a worker thread; a
request becomes a :class:`Job` in a bounded FIFO queue (full: 429). The worker runs the job's
choices one after another, turns the loop's events into :class:`ChoiceUpdate` s and hands them
to the job's sink (a function that must not block; the server's sink puts them on an asyncio
queue). Every job ends with exactly one :class:`JobEnd`. A job stops at the next round when it is
cancelled (the client went away) or its deadline passes (the per-request timeout, queue wait
included).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specdecode.constraints import Grammar
from specdecode.decoding import FinishEvent, GenerationResult, RoundEvent, SpeculativeGenerator
from specdecode.errors import SpecDecodeError
from specdecode.sampling import TokenLogprob
from specdecode.server.errors import (
    APIError,
    bad_request,
    internal_error,
    queue_full,
    shutting_down,
    timed_out,
)
from specdecode.server.metrics import Metrics, QueueState
from specdecode.server.segments import Piece, SegmentTracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling and stopping for every choice of a job (None: the model's default)."""

    temperature: float  # 0: greedy
    max_new_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    # a client's seed asks for reproducible text: the seeded mode makes it independent of the
    # server's drafter; without one, the rejection rule accepts more drafts
    seeded: bool = False
    logprobs: int | None = None  # alternatives per token (0: the chosen token's alone; None: off)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo with logprobs)
    grammar: Grammar | None = None  # constrained output (response_format, structured_outputs)

    def loop_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`SpeculativeGenerator.stream`."""
        return {
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
            "sampling_mode": "seeded" if self.seeded else "rejection",
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias or None,
            "stop_strings": list(self.stop),
            "grammar": self.grammar,
        }


@dataclass(frozen=True)
class ChoiceSpec:
    """One choice to generate: the prompt's token ids and the sampling seed."""

    index: int
    prompt_ids: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class JobSpec:
    choices: tuple[ChoiceSpec, ...]
    options: GenerationOptions
    prompt_tokens: int  # of the request's distinct prompts, as ``usage`` counts them
    echo: tuple[str, ...] = ()  # per choice, its prompt's text to put before the answer (echo)
    samples_per_prompt: int = 1  # n: choice i answers prompt i // n


@dataclass(frozen=True)
class ChoiceUpdate:
    """One round of a choice, or (``result`` set) its end."""

    index: int
    text: str  # new text, safe to show
    token_ids: list[int]
    from_draft: list[bool]
    pieces: list[Piece]  # ``text`` split by the token each piece came from
    tau: float  # running tau of the choice
    tokens_per_second: float  # running rate of the choice
    result: GenerationResult | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # per token of ``token_ids``, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # the first round's, when asked


@dataclass(frozen=True)
class JobEnd:
    """The last update of every job."""

    error: APIError | None = None


JobUpdate = ChoiceUpdate | JobEnd
Sink = Callable[[JobUpdate], None]


@dataclass
class _Progress:
    """One choice's running counts, turning the loop's events into updates."""

    index: int
    tracker: SegmentTracker
    start: float = field(default_factory=time.perf_counter)
    passes: int = 0
    tokens: int = 0

    def round(self, event: RoundEvent) -> ChoiceUpdate:
        self.passes += 1
        self.tokens += len(event.token_ids)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return ChoiceUpdate(
            index=self.index,
            text=event.text,
            token_ids=list(event.token_ids),
            from_draft=list(event.from_draft),
            pieces=self.tracker.push(
                event.token_ids,
                event.from_draft,
                event.text,
                copied=event.copied,
                logprobs=None if event.logprobs is None else [lp.logprob for lp in event.logprobs],
            ),
            tau=self.tokens / self.passes,
            tokens_per_second=self.tokens / elapsed,
            logprobs=event.logprobs,
            prompt_logprobs=event.prompt_logprobs,
        )

    def finish(self, event: FinishEvent) -> ChoiceUpdate:
        stats = event.result.stats
        return ChoiceUpdate(
            index=self.index,
            text=event.text,
            token_ids=[],
            from_draft=[],
            pieces=self.tracker.finish(event.text),
            tau=stats.tau,
            tokens_per_second=stats.tokens_per_second,
            result=event.result,
        )


class Job:
    """A request admitted to the queue."""

    def __init__(self, spec: JobSpec, sink: Sink, timeout: float) -> None:
        self.spec = spec
        self.sink = sink
        self.timeout = timeout
        self.admitted = time.monotonic()
        self.deadline = self.admitted + timeout
        self.first_token_seen = False
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        """Polled by the decoding loop between rounds."""
        return self.cancelled or self.expired


class Engine:
    """Serialises generations on one :class:`SpeculativeGenerator`.

    Args:
        generator: the model (and drafter) every request runs on.
        max_queue: requests that may wait while one generates; one more is answered 429.
        timeout: seconds a request may take from admission to its last token.
    """

    def __init__(
        self,
        generator: SpeculativeGenerator,
        *,
        max_queue: int = 64,
        timeout: float = 300.0,
        metrics: Metrics | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.generator = generator
        self.max_queue = max_queue
        self.timeout = timeout
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._job_seconds = 1.0  # moving average of a job's duration, for Retry-After

    # ----------------------------------------------------------------------------- requests
    def submit(self, spec: JobSpec, sink: Sink) -> Job:
        """Queue a job; raise a 429 :class:`APIError` when the queue is full."""
        with self._cond:
            if self._closed:
                raise shutting_down()
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected("queue_full")
                raise queue_full(self._retry_after(), self.max_queue)
            job = Job(spec, sink, self.timeout)
            self._waiting.append(job)
            self._start_worker()
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, stop it at the next round if it runs."""
        if job.cancelled:
            return
        job.cancel()
        with self._cond:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
        if waiting:
            self.metrics.cancelled("client_disconnected")
            job.sink(JobEnd())

    def queue_state(self) -> QueueState:
        with self._cond:
            return QueueState(len(self._waiting), int(self._running is not None), self.max_queue)

    def close(self, wait: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running one, end the worker."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            running = self._running
            self._cond.notify_all()
        for job in waiting:
            job.sink(JobEnd(shutting_down()))
        if running is not None:
            running.cancel()
        if self._thread is not None:
            self._thread.join(wait)

    def _retry_after(self) -> int:
        return max(1, min(60, math.ceil(self._job_seconds * (len(self._waiting) + 1))))

    # ----------------------------------------------------------------------------- the worker
    def _start_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="specdecode-engine", daemon=True
            )
            self._thread.start()

    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if not self._waiting:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            started = time.monotonic()
            try:
                job.sink(self._run(job))
            finally:
                with self._cond:
                    self._running = None
                    self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.monotonic() - started)

    def _run(self, job: Job) -> JobEnd:
        """Generate every choice of ``job``; say how the job ended."""
        self.metrics.queue_wait(time.monotonic() - job.admitted)
        try:
            complete = all(self._generate(job, choice) for choice in job.spec.choices)
        except SpecDecodeError as exc:
            return JobEnd(bad_request(str(exc)))
        except Exception:
            logger.exception("generation failed")
            return JobEnd(internal_error())
        if complete:
            return JobEnd()
        if job.cancelled:
            self.metrics.cancelled("client_disconnected")
            return JobEnd()
        self.metrics.cancelled("timeout")
        return JobEnd(timed_out(job.timeout))

    def _generate(self, job: Job, choice: ChoiceSpec) -> bool:
        """Stream one choice to the sink; False when it was stopped before its end."""
        if job.should_stop():
            return False
        progress = _Progress(choice.index, SegmentTracker(self.generator.target.tokenizer))
        events = self.generator.stream(
            list(choice.prompt_ids),
            seed=choice.seed,
            should_stop=job.should_stop,
            **job.spec.options.loop_kwargs(),
        )
        for event in events:
            if isinstance(event, RoundEvent):
                self._first_token(job)
                job.sink(progress.round(event))
                continue
            result = event.result
            self.metrics.generation(result.stats, result.finish_reason)
            if result.finish_reason == "cancelled":
                return False
            job.sink(progress.finish(event))
            return True
        return False  # pragma: no cover - the loop always ends with a FinishEvent

    def _first_token(self, job: Job) -> None:
        if not job.first_token_seen:
            job.first_token_seen = True
            self.metrics.first_token(time.monotonic() - job.admitted)
