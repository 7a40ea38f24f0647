"""Figures per mode and category, and the Leviathan et al. bound they are held against.

Definitions (docs/benchmarks.md explains each column):

- tokens/s of a prompt: new tokens / wall seconds, median over its repetitions. "median" is over
  prompts; "aggregate" is all new tokens / all seconds.
- speedup of a prompt: its tokens/s over the reference's tokens/s on the same prompt. "median" is
  the median of these ratios; "aggregate" is aggregate tokens/s over the reference's.
- tau: new tokens per target forward pass; alpha: accepted / (accepted + rounds with a rejection)
  (see :class:`GenerationStats`); k: mean tokens drafted per round.
- c = one draft step / one target step; c_v(k) = one verification pass over k + 1 tokens / one
  target step (both from the micro-benchmark in :mod:`specdecode.bench.costs`).
- The bound is Leviathan et al. (2023), "Fast Inference from Transformers via Speculative
  Decoding", Theorem 3.8: expected walltime improvement (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)).
  It assumes verifying k tokens costs one target step; the cost-aware bound replaces that 1 with
  the measured c_v(k). Efficiency = median speedup / bound.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from specdecode.bench.costs import StepCosts
from specdecode.bench.modes import REFERENCE
from specdecode.bench.runner import BenchRun, Record
from specdecode.decoding import GenerationStats

ALL = "all"  # the category that pools every prompt


def leviathan_speedup(alpha: float, k: float, c: float, verify_cost: float = 1.0) -> float:
    """Expected speedup of speculative decoding over plain decoding (Leviathan et al. 2023,
    Theorem 3.8): (1 - alpha^(k+1)) / ((1 - alpha) (k c + verify_cost)).

    With ``verify_cost = 1`` this is the paper's formula, which assumes a pass over k + 1
    tokens costs as much as one step; a measured c_v(k) gives the cost-aware bound.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    expected_tokens = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return expected_tokens / (k * c + verify_cost)


def merge_stats(items: Sequence[GenerationStats]) -> GenerationStats:
    """Sum the counters and timings of several generations (per-position lists added)."""
    total = GenerationStats()
    for s in items:
        total.accumulate(s)
    return total


@dataclass
class ModeSummary:
    """One row of the results table: one mode on one category (or on all prompts)."""

    mode: str
    category: str
    prompts: int
    runs: int
    new_tokens: int
    seconds: float
    tokens_per_second_median: float
    tokens_per_second_aggregate: float
    speedup_median: float
    speedup_aggregate: float
    tau: float | None  # None where target passes were not counted
    alpha: float | None = None
    acceptance_per_position: list[float] | None = None
    mean_draft_length: float | None = None  # k: tokens drafted per round
    draft_time_share: float | None = None  # drafting seconds / total seconds
    draft_prefill_share: float | None = None  # of which the draft model reading the prompts
    c: float | None = None
    verify_cost: float | None = None  # c_v(round(k))
    bound_paper: float | None = None
    bound_cost_aware: float | None = None
    efficiency_paper: float | None = None
    efficiency_cost_aware: float | None = None
    identical: bool | None = None  # None: not checked (sampling)
    identical_runs: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def categories(run: BenchRun) -> list[str]:
    """Categories in order of first appearance, then ``all``."""
    seen = list(dict.fromkeys(c.category for c in run.cases))
    return [*seen, ALL]


def summarize(
    run: BenchRun,
    costs: StepCosts | None = None,
    cost_keys: dict[str, str] | None = None,
    plain_of: dict[str, str] | None = None,
    category_costs: dict[str, StepCosts] | None = None,
) -> list[ModeSummary]:
    """One :class:`ModeSummary` per mode and category. ``cost_keys`` maps a mode to its key in
    ``costs.draft_step``; without ``costs`` the c, c_v and bound columns stay empty.
    ``plain_of`` maps a mode to the plain mode its bound is compared with (default: the
    reference): the bound counts target steps, so the plain mode must run on the same kernels.
    ``category_costs`` holds costs measured at a category's own context (long prompts), used
    for that category's rows instead of ``costs``."""
    cost_keys, plain_of, category_costs = cost_keys or {}, plain_of or {}, category_costs or {}
    out = []
    for category in categories(run):
        own_costs = category_costs.get(category)
        records = [r for r in run.records if category in (ALL, r.category)]
        reference = _per_prompt_rate([r for r in records if r.mode == REFERENCE])
        ref_aggregate = _aggregate_rate([r for r in records if r.mode == REFERENCE])
        for mode in run.modes:
            mine = [r for r in records if r.mode == mode]
            summary = _summary(mode, category, mine, reference, ref_aggregate, run.greedy)
            if costs is not None:
                plain = plain_of.get(mode, REFERENCE)
                over_plain = summary.speedup_median
                if plain != REFERENCE:
                    base = _per_prompt_decode_rate([r for r in records if r.mode == plain])
                    own = _per_prompt_decode_rate(mine)
                    if own and all(p in base for p in own):
                        over_plain = statistics.median(rate / base[p] for p, rate in own.items())
                        summary.notes.append(
                            f"efficiency: decoding speedup over {plain} (same kernels; the "
                            "prompt's prefill, which the bound does not model, left out)"
                        )
                if own_costs is not None:
                    summary.notes.append(
                        f"bounds from costs measured at this category's context "
                        f"({own_costs.context_tokens} tokens)"
                    )
                add_bounds(summary, own_costs or costs, cost_keys.get(mode), over_plain)
            out.append(summary)
    return out


def needed_draft_lengths(summaries: Sequence[ModeSummary]) -> set[int]:
    """The k values whose verification cost the bounds need."""
    return {max(1, round(s.mean_draft_length)) for s in summaries if s.mean_draft_length}


def _summary(
    mode: str,
    category: str,
    records: list[Record],
    reference: dict[str, float],
    ref_aggregate: float,
    greedy: bool,
) -> ModeSummary:
    rates = _per_prompt_rate(records)
    aggregate = _aggregate_rate(records)
    passes = [r.target_passes for r in records]
    new_tokens = sum(r.new_tokens for r in records)
    summary = ModeSummary(
        mode=mode,
        category=category,
        prompts=len(rates),
        runs=len(records),
        new_tokens=new_tokens,
        seconds=sum(r.seconds for r in records),
        tokens_per_second_median=statistics.median(rates.values()),
        tokens_per_second_aggregate=aggregate,
        speedup_median=statistics.median(rates[p] / reference[p] for p in rates),
        speedup_aggregate=aggregate / ref_aggregate,
        tau=None if None in passes else new_tokens / max(1, sum(p or 0 for p in passes)),
    )
    _add_acceptance(summary, [r.stats for r in records if r.stats is not None])
    if greedy:
        summary.identical_runs = sum(bool(r.identical) for r in records)
        summary.identical = summary.identical_runs == len(records)
    else:
        summary.notes.append("sampling: outputs are not compared token by token")
    return summary


def _add_acceptance(summary: ModeSummary, items: list[GenerationStats]) -> None:
    if not items:
        if summary.mode != REFERENCE:
            summary.notes.append(
                "alpha and acceptance are not reported by transformers (left empty); "
                "tau counts the target's forward calls"
            )
        return
    total = merge_stats(items)
    if total.rounds and total.drafted:
        summary.alpha = total.alpha
        summary.acceptance_per_position = total.acceptance_per_position
        summary.mean_draft_length = total.drafted / total.rounds
    if total.total_seconds > 0:
        summary.draft_time_share = total.draft_seconds / total.total_seconds
        summary.draft_prefill_share = total.draft_prefill_seconds / total.total_seconds


def add_bounds(
    summary: ModeSummary, costs: StepCosts, cost_key: str | None, speedup: float | None = None
) -> None:
    """Fill c, c_v(k), both bounds and both efficiencies where alpha and c are known;
    ``speedup`` is the measured one to hold against the bounds (default: the summary's)."""
    speedup = summary.speedup_median if speedup is None else speedup
    summary.c = None if cost_key is None else costs.c(cost_key)
    k = summary.mean_draft_length
    if k is None:
        return
    summary.verify_cost = costs.verify_cost(max(1, round(k)))
    if summary.alpha is None or summary.c is None:
        return
    summary.bound_paper = leviathan_speedup(summary.alpha, k, summary.c)
    summary.efficiency_paper = speedup / summary.bound_paper
    if summary.verify_cost is not None:
        summary.bound_cost_aware = leviathan_speedup(
            summary.alpha, k, summary.c, summary.verify_cost
        )
        summary.efficiency_cost_aware = speedup / summary.bound_cost_aware


def _per_prompt_decode_rate(records: list[Record]) -> dict[str, float]:
    """Prompt id -> median tokens/s after the first token (the prefill's), over its
    repetitions; empty where a record has no loop statistics."""
    by_prompt: dict[str, list[float]] = {}
    for r in records:
        if r.stats is None or r.stats.new_tokens < 2:
            return {}
        seconds = r.stats.total_seconds - r.stats.time_to_first_token
        if seconds <= 0:
            return {}
        by_prompt.setdefault(r.prompt_id, []).append((r.stats.new_tokens - 1) / seconds)
    return {p: statistics.median(v) for p, v in by_prompt.items()}


def _per_prompt_rate(records: list[Record]) -> dict[str, float]:
    """Prompt id -> median tokens/s over its repetitions."""
    by_prompt: dict[str, list[float]] = {}
    for r in records:
        by_prompt.setdefault(r.prompt_id, []).append(r.tokens_per_second)
    return {p: statistics.median(v) for p, v in by_prompt.items()}


def _aggregate_rate(records: list[Record]) -> float:
    seconds = sum(r.seconds for r in records)
    return sum(r.new_tokens for r in records) / seconds if seconds > 0 else 0.0
