"""``specdecode bench``: our decoding beside transformers', prompt by prompt, in one process.

Modes (:mod:`.modes`, the standard set in :mod:`.catalog`) run interleaved by the runner
(:mod:`.runner`); single-step costs come from a micro-benchmark (:mod:`.costs`); figures and
the Leviathan et al. bound from :mod:`.stats`; files from :mod:`.report` and :mod:`.plots`.
The benchmark only consumes the decoding loop's results; it never reaches into the loop.
"""

from specdecode.bench.catalog import (
    MODE_NAMES,
    ModeConfig,
    available_modes,
    select_modes,
    standard_modes,
)
from specdecode.bench.costs import CostProbe, StepCosts, measure_costs
from specdecode.bench.modes import REFERENCE, Mode, ModeOutput, SpecDecodeMode, TransformersMode
from specdecode.bench.report import BenchReport
from specdecode.bench.runner import BenchCase, BenchRun, BenchRunner, Mismatch, Record
from specdecode.bench.stats import ModeSummary, leviathan_speedup, summarize
from specdecode.bench.suite import BenchOptions, run_benchmark, write_report

__all__ = [
    "MODE_NAMES",
    "REFERENCE",
    "BenchCase",
    "BenchOptions",
    "BenchReport",
    "BenchRun",
    "BenchRunner",
    "CostProbe",
    "Mismatch",
    "Mode",
    "ModeConfig",
    "ModeOutput",
    "ModeSummary",
    "Record",
    "SpecDecodeMode",
    "StepCosts",
    "TransformersMode",
    "available_modes",
    "leviathan_speedup",
    "measure_costs",
    "run_benchmark",
    "select_modes",
    "standard_modes",
    "summarize",
    "write_report",
]
