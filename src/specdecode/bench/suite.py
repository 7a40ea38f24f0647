"""A whole benchmark: run the modes, measure single-step costs, summarise, write the files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdecode.bench.catalog import OURS_PLAIN
from specdecode.bench.costs import CostProbe, StepCosts, measure_costs
from specdecode.bench.environment import capture_environment
from specdecode.bench.modes import Mode
from specdecode.bench.plots import PlottingUnavailableError, write_plots
from specdecode.bench.report import BenchReport, write_json, write_markdown
from specdecode.bench.runner import (
    BenchCase,
    BenchRun,
    BenchRunner,
    MismatchCallback,
    RecordCallback,
)
from specdecode.bench.stats import needed_draft_lengths, summarize
from specdecode.models import LoadedModel

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# a category whose typical context is this many times the run's (and this many tokens longer)
# gets single-step costs measured at its own context
LONG_CONTEXT_FACTOR = 2.0
LONG_CONTEXT_MARGIN = 128


@dataclass(frozen=True)
class BenchOptions:
    """How a benchmark is run (the what is in the modes, prompts and generation settings)."""

    warmup: int = 1  # warm-up runs of every mode on the first prompt, not recorded
    repeats: int = 1  # timed runs of every mode on every prompt
    seed: int = 0  # base seed (prompt i: sample_seed(seed, i), the same in every mode)
    cost_repetitions: int = 5  # repetitions of each single-step timing (median kept)


def run_benchmark(
    target: LoadedModel,
    modes: Sequence[Mode],
    cases: Sequence[BenchCase],
    generation_kwargs: dict[str, Any],
    options: BenchOptions,
    settings: dict[str, Any],
    on_record: RecordCallback | None = None,
    on_mismatch: MismatchCallback | None = None,
) -> BenchReport:
    """Run ``modes`` on ``cases``, then the cost micro-benchmark; return the full report."""
    environment = capture_environment()
    runner = BenchRunner(
        target,
        modes,
        generation_kwargs,
        warmup=options.warmup,
        repeats=options.repeats,
        seed=options.seed,
    )
    run = runner.run(cases, on_record=on_record, on_mismatch=on_mismatch)
    costs = measure_run_costs(run, target, modes, options.cost_repetitions)
    category_costs = measure_category_costs(run, target, modes, options.cost_repetitions, costs)
    cost_keys = {m.name: m.cost_probe.key for m in modes if m.cost_probe is not None}
    described = {m.name: m.describe() for m in modes}
    summaries = summarize(
        run, costs, cost_keys, plain_modes(described, costs), category_costs=category_costs
    )
    return BenchReport(
        environment=environment,
        settings=settings,
        modes=described,
        run=run,
        summaries=summaries,
        costs=costs,
        category_costs=category_costs,
    )


def plain_modes(described: dict[str, dict[str, Any]], costs: StepCosts) -> dict[str, str]:
    """Mode -> the plain mode its bound is held against, where the reference ran on other
    kernels: when the target ran on oneDNN for our modes and on torch's kernels for
    transformers', our modes' speedups over ours-plain (same kernels as the costs) meet the
    bounds; without ours-plain in the run, the reference is used."""
    if OURS_PLAIN not in described or costs.torch_target_step is None:
        return {}
    return {
        name: OURS_PLAIN
        for name, settings in described.items()
        if settings.get("kernels") == costs.kernels and name != OURS_PLAIN
    }


def measure_run_costs(
    run: BenchRun, target: LoadedModel, modes: Sequence[Mode], repetitions: int
) -> StepCosts:
    """Single-step costs at the run's typical context, for the draft lengths the run used."""
    ks = sorted(needed_draft_lengths(summarize(run)))
    probes: list[CostProbe] = [m.cost_probe for m in modes if m.cost_probe is not None]
    context = run.token_stream(run.median_context() + max([1, *ks]) + 1)
    return measure_costs(target, context, ks, probes, repetitions)


def long_categories(run: BenchRun, factor: float = LONG_CONTEXT_FACTOR) -> dict[str, int]:
    """Categories whose typical context is at least ``factor`` times the run's (and at least
    ``LONG_CONTEXT_MARGIN`` tokens longer), with that context: their passes cost more than the
    run's costs say (attention grows with the context), so their bounds need costs of their own.
    """
    overall = run.median_context()
    out = {}
    for category in dict.fromkeys(c.category for c in run.cases):
        context = run.median_context(category)
        if context >= factor * overall and context >= overall + LONG_CONTEXT_MARGIN:
            out[category] = context
    return out


def measure_category_costs(
    run: BenchRun,
    target: LoadedModel,
    modes: Sequence[Mode],
    repetitions: int,
    costs: StepCosts,
) -> dict[str, StepCosts]:
    """Costs at the context of each long category (:func:`long_categories`), for the same k and
    drafters as the run's costs."""
    ks = sorted(costs.verify)
    probes: list[CostProbe] = [m.cost_probe for m in modes if m.cost_probe is not None]
    out = {}
    for category, context in long_categories(run).items():
        stream = run.token_stream(context + max([1, *ks]) + 1)
        out[category] = measure_costs(target, stream, ks, probes, repetitions)
    return out


def write_report(report: BenchReport, folder: Path, plots: bool = True) -> list[Path]:
    """Write results.json, results.md and (when asked and matplotlib is there) the plots."""
    folder.mkdir(parents=True, exist_ok=True)
    if plots:
        try:
            report.plots = write_plots(report.summaries, folder)
        except PlottingUnavailableError as exc:
            report.notes.append(f"no plots: {exc}")
    write_json(report, folder / RESULTS_JSON)
    write_markdown(report, folder / RESULTS_MD)
    return [folder / RESULTS_JSON, folder / RESULTS_MD, *(folder / p for p in report.plots)]
