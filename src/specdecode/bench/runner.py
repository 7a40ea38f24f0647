"""Runs every mode on every prompt in one process, interleaved so that drift hits all alike.

For prompt i and repetition r the modes run in the configured order rotated by i * repeats + r,
so no mode is always first (cold caches) or last (a warm machine, or one slowed by a neighbour).
A warm-up runs every mode on the first prompt (at most ``WARMUP_TOKENS`` new tokens: enough to
touch every code path and allocate the caches) before anything is recorded. Each generation is
timed by wall clock around the mode's call, with a device sync before both readings.

In greedy mode every output is compared token by token with the reference mode's output for the
same prompt; any difference becomes a :class:`Mismatch` (mode, prompt, first differing position).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from specdecode.bench.modes import REFERENCE, Mode, ModeOutput
from specdecode.decoding import GenerationRequest, GenerationStats, resolve_request, sample_seed
from specdecode.models import LoadedModel
from specdecode.models.timing import synchronize

WARMUP_TOKENS = 16  # new tokens per warm-up generation


@dataclass(frozen=True)
class BenchCase:
    """One prompt, already encoded (chat template applied or not) for all modes alike."""

    prompt_id: str
    category: str
    prompt_ids: list[int]


@dataclass
class Record:
    """One timed generation of one mode on one prompt."""

    prompt_id: str
    category: str
    mode: str
    repeat: int
    slot: int  # position of this mode in the prompt's rotated order (0 = ran first)
    seconds: float
    prompt_tokens: int
    token_ids: list[int]
    target_passes: int | None
    draft_passes: int | None
    stats: GenerationStats | None
    identical: bool | None = None  # None: not checked (sampling)
    first_difference: int | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "category": self.category,
            "mode": self.mode,
            "repeat": self.repeat,
            "slot": self.slot,
            "seconds": self.seconds,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "tokens_per_second": self.tokens_per_second,
            "target_passes": self.target_passes,
            "draft_passes": self.draft_passes,
            "identical": self.identical,
            "first_difference": self.first_difference,
            "token_ids": self.token_ids,
            "stats": None if self.stats is None else self.stats.to_dict(),
        }


@dataclass(frozen=True)
class Mismatch:
    """An output that differs from the reference's for the same prompt (greedy only)."""

    mode: str
    prompt_id: str
    category: str
    repeat: int
    position: int  # index of the first differing new token
    expected: int | None  # the reference's token there (None: the reference had ended)
    got: int | None  # this mode's token there (None: this mode had ended)
    expected_length: int
    got_length: int

    def describe(self) -> str:
        return (
            f"{self.mode} differs from {REFERENCE} on prompt {self.prompt_id} "
            f"({self.category}, repeat {self.repeat}) at new token {self.position}: "
            f"expected {self.expected}, got {self.got} "
            f"(lengths {self.expected_length} and {self.got_length})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "description": self.describe()}


@dataclass
class BenchRun:
    """Everything measured: records in the order they ran, and the identity verdicts."""

    cases: list[BenchCase]
    modes: list[str]
    greedy: bool
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)  # prompt id -> settings
    records: list[Record] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    warmup_seconds: float = 0.0

    def reference_output(self, prompt_id: str) -> list[int]:
        for rec in self.records:
            if rec.prompt_id == prompt_id and rec.mode == REFERENCE and rec.repeat == 0:
                return rec.token_ids
        raise KeyError(f"no reference output for prompt {prompt_id}")

    def token_stream(self, length: int) -> list[int]:
        """Prompts followed by their reference outputs, concatenated (and repeated) to ``length``
        tokens: realistic text for the cost micro-benchmark."""
        stream: list[int] = []
        while len(stream) < length:
            for case in self.cases:
                stream += case.prompt_ids + self.reference_output(case.prompt_id)
        return stream[:length]

    def median_context(self, category: str | None = None) -> int:
        """A typical context during decoding: median prompt plus half the median output (of
        ``category``'s prompts when given, else of all)."""
        cases = [c for c in self.cases if category in (None, c.category)]
        if not cases:
            raise ValueError(f"no prompt of category {category!r} in this run")
        prompts = [len(c.prompt_ids) for c in cases]
        outputs = [len(self.reference_output(c.prompt_id)) for c in cases]
        return int(statistics.median(prompts) + statistics.median(outputs) / 2)


RecordCallback = Callable[[Record], None]
MismatchCallback = Callable[[Mismatch], None]


class BenchRunner:
    """Runs ``modes`` (which must include the reference) on the target, prompt by prompt.

    Args:
        target: the target model (modes share it).
        modes: the modes, in their base order.
        generation_kwargs: our ``generate`` keyword arguments (transformers' names), resolved
            per prompt into one :class:`GenerationRequest` that every mode follows exactly.
        warmup: warm-up runs of every mode on the first prompt (not recorded).
        repeats: timed runs of every mode on every prompt.
        seed: base seed; prompt i uses ``sample_seed(seed, i)`` in every mode.
    """

    def __init__(
        self,
        target: LoadedModel,
        modes: Sequence[Mode],
        generation_kwargs: dict[str, Any],
        *,
        warmup: int = 1,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        names = [m.name for m in modes]
        if REFERENCE not in names:
            raise ValueError(f"the modes must include the reference {REFERENCE!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"mode names must be unique, got {names}")
        if repeats < 1 or warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        self.target = target
        self.modes = list(modes)
        self.generation_kwargs = dict(generation_kwargs)
        self.warmup = warmup
        self.repeats = repeats
        self.seed = seed

    def run(
        self,
        cases: Sequence[BenchCase],
        on_record: RecordCallback | None = None,
        on_mismatch: MismatchCallback | None = None,
    ) -> BenchRun:
        if not cases:
            raise ValueError("no prompts to benchmark")
        requests = {c.prompt_id: self._request(c) for c in cases}
        greedy = all(r.sampling.greedy for r in requests.values())
        run = BenchRun(list(cases), [m.name for m in self.modes], greedy)
        run.requests = {pid: r.describe() for pid, r in requests.items()}
        run.warmup_seconds = self._warm_up(cases[0], requests[cases[0].prompt_id])
        for index, case in enumerate(cases):
            records = self._run_case(index, case, requests[case.prompt_id], on_record)
            run.records += records
            if greedy:
                for mismatch in check_identity(records):
                    run.mismatches.append(mismatch)
                    if on_mismatch is not None:
                        on_mismatch(mismatch)
        return run

    def order(self, index: int, repeat: int) -> list[Mode]:
        """The modes rotated for prompt ``index``, repetition ``repeat``."""
        shift = (index * self.repeats + repeat) % len(self.modes)
        return self.modes[shift:] + self.modes[:shift]

    def _request(self, case: BenchCase) -> GenerationRequest:
        return resolve_request(self.target, len(case.prompt_ids), **self.generation_kwargs)

    def _warm_up(self, case: BenchCase, request: GenerationRequest) -> float:
        start = time.perf_counter()
        short = replace(request, max_new_tokens=min(request.max_new_tokens, WARMUP_TOKENS))
        for repeat in range(self.warmup):
            for mode in self.order(0, repeat):
                mode.run(case.prompt_ids, short, self.seed)
        return time.perf_counter() - start

    def _run_case(
        self,
        index: int,
        case: BenchCase,
        request: GenerationRequest,
        on_record: RecordCallback | None,
    ) -> list[Record]:
        seed = sample_seed(self.seed, index)
        records = []
        for repeat in range(self.repeats):
            for slot, mode in enumerate(self.order(index, repeat)):
                record = self._timed(mode, case, request, seed, repeat, slot)
                records.append(record)
                if on_record is not None:
                    on_record(record)
        return records

    def _timed(
        self,
        mode: Mode,
        case: BenchCase,
        request: GenerationRequest,
        seed: int,
        repeat: int,
        slot: int,
    ) -> Record:
        synchronize(self.target.device)
        start = time.perf_counter()
        out: ModeOutput = mode.run(case.prompt_ids, request, seed)
        synchronize(self.target.device)
        seconds = time.perf_counter() - start
        return Record(
            prompt_id=case.prompt_id,
            category=case.category,
            mode=mode.name,
            repeat=repeat,
            slot=slot,
            seconds=seconds,
            prompt_tokens=len(case.prompt_ids),
            token_ids=list(out.token_ids),
            target_passes=out.target_passes,
            draft_passes=out.draft_passes,
            stats=out.stats,
        )


def check_identity(records: Sequence[Record]) -> list[Mismatch]:
    """Compare every record of one prompt with the reference's first repetition; set each
    record's ``identical`` and ``first_difference``; return the mismatches."""
    reference = next(r for r in records if r.mode == REFERENCE and r.repeat == 0)
    expected = reference.token_ids
    mismatches = []
    for rec in records:
        position = first_difference(expected, rec.token_ids)
        rec.identical = position is None
        rec.first_difference = position
        if position is not None:
            mismatches.append(
                Mismatch(
                    mode=rec.mode,
                    prompt_id=rec.prompt_id,
                    category=rec.category,
                    repeat=rec.repeat,
                    position=position,
                    expected=expected[position] if position < len(expected) else None,
                    got=rec.token_ids[position] if position < len(rec.token_ids) else None,
                    expected_length=len(expected),
                    got_length=len(rec.token_ids),
                )
            )
    return mismatches


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (one ending counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
