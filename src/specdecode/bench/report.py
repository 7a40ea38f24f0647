"""Writing a benchmark's results: ``results.json`` (everything, raw) and ``results.md`` (tables)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdecode.bench.costs import StepCosts
from specdecode.bench.environment import Environment
from specdecode.bench.modes import REFERENCE
from specdecode.bench.runner import BenchRun
from specdecode.bench.stats import ALL, ModeSummary, categories

# (header, ModeSummary attribute, format) of each column of the main table
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("tok/s med.", "tokens_per_second_median", "{:.2f}"),
    ("tok/s agg.", "tokens_per_second_aggregate", "{:.2f}"),
    ("speedup med.", "speedup_median", "{:.2f}x"),
    ("speedup agg.", "speedup_aggregate", "{:.2f}x"),
    ("tau", "tau", "{:.2f}"),
    ("alpha", "alpha", "{:.3f}"),
    ("k", "mean_draft_length", "{:.2f}"),
    ("c", "c", "{:.3f}"),
    ("c_v(k)", "verify_cost", "{:.2f}"),
    ("bound (paper)", "bound_paper", "{:.2f}x"),
    ("bound (cost-aware)", "bound_cost_aware", "{:.2f}x"),
    ("eff. (paper)", "efficiency_paper", "{:.2f}"),
    ("eff. (cost-aware)", "efficiency_cost_aware", "{:.2f}"),
    ("draft time", "draft_time_share", "{:.0%}"),
    ("draft prefill", "draft_prefill_share", "{:.0%}"),
)


@dataclass
class BenchReport:
    """Everything one benchmark run produced, ready to be written."""

    environment: Environment
    settings: dict[str, Any]  # the command's settings (models, dtype, prompts, sampling...)
    modes: dict[str, dict[str, Any]]  # mode name -> its recorded settings
    run: BenchRun
    summaries: list[ModeSummary]
    costs: StepCosts | None = None
    category_costs: dict[str, StepCosts] = field(default_factory=dict)  # long categories' own
    plots: list[str] = field(default_factory=list)  # file names, relative to the output folder
    notes: list[str] = field(default_factory=list)

    @property
    def all_identical(self) -> bool | None:
        return (not self.run.mismatches) if self.run.greedy else None

    def to_dict(self) -> dict[str, Any]:
        run = self.run
        return {
            "environment": self.environment.to_dict(),
            "settings": self.settings,
            "modes": self.modes,
            "reference": REFERENCE,
            "prompts": [
                {
                    "prompt_id": c.prompt_id,
                    "category": c.category,
                    "prompt_tokens": len(c.prompt_ids),
                    "request": run.requests.get(c.prompt_id),
                }
                for c in run.cases
            ],
            "identity": {
                "checked": run.greedy,
                "all_identical": self.all_identical,
                "mismatches": [m.to_dict() for m in run.mismatches],
            },
            "costs": None if self.costs is None else self.costs.to_dict(),
            "category_costs": {name: c.to_dict() for name, c in self.category_costs.items()},
            "summaries": [s.to_dict() for s in self.summaries],
            "warmup_seconds": run.warmup_seconds,
            "records": [r.to_dict() for r in run.records],
            "plots": self.plots,
            "notes": self.notes,
        }


def write_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")


def write_markdown(report: BenchReport, path: Path) -> None:
    path.write_text(render_markdown(report))


def render_markdown(report: BenchReport) -> str:
    parts = [
        _header(report),
        _identity(report),
        _tables(report),
        _acceptance(report.summaries),
        _costs(report.costs),
        *(_costs(c, category) for category, c in report.category_costs.items()),
        _modes(report.modes),
        _notes(report),
    ]
    if report.plots:
        parts.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in report.plots) + "\n")
    return "\n".join(p for p in parts if p)


def _header(report: BenchReport) -> str:
    env, s = report.environment, report.settings
    lines = [
        "# specdecode bench results",
        "",
        f"- date: {env.timestamp}; specdecode commit {env.git_commit or 'unknown'}"
        + (" (uncommitted changes)" if env.git_dirty else ""),
        f"- machine: {env.cpu_model}, {env.cpus_available or env.cpu_cores} CPUs available, "
        f"torch threads {env.torch_threads}"
        + (f", GPU {env.cuda_device}" if env.cuda_device else ""),
        f"- load average at start: {env.load_average}",
        f"- torch {env.libraries.get('torch')}, transformers {env.libraries.get('transformers')}, "
        f"python {env.python}",
    ]
    lines += [f"- {key}: {value}" for key, value in s.items()]
    lines += [
        f"- prompts: {len(report.run.cases)}; modes in rotated order per prompt; "
        f"reference: {REFERENCE}; warm-up {report.run.warmup_seconds:.1f} s (not counted)",
        "",
    ]
    return "\n".join(lines)


def _identity(report: BenchReport) -> str:
    run = report.run
    if not run.greedy:
        return "## Token identity\n\nNot checked: sampling outputs depend on the random stream.\n"
    if not run.mismatches:
        return (
            "## Token identity\n\nEvery output of every mode is token-identical to "
            f"{REFERENCE} ({len(run.records)} generations).\n"
        )
    lines = [
        "## !!! TOKEN IDENTITY FAILED: OUTPUTS DIFFER FROM THE REFERENCE !!!",
        "",
        f"{len(run.mismatches)} of {len(run.records)} generations differ from {REFERENCE}:",
        "",
    ]
    lines += [f"- **{m.describe()}**" for m in run.mismatches]
    return "\n".join(lines) + "\n"


def _tables(report: BenchReport) -> str:
    out = ["## Results by category", ""]
    for category in categories(report.run):
        rows = [s for s in report.summaries if s.category == category]
        if not rows:
            continue
        title = "all prompts" if category == ALL else category
        out += [f"### {title} ({rows[0].prompts} prompts)", "", _table(rows), ""]
    return "\n".join(out)


def _table(rows: Sequence[ModeSummary]) -> str:
    header = ["mode", *(h for h, _, _ in _COLUMNS), "identical"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in rows:
        cells = [s.mode, *(fmt(getattr(s, attr), spec) for _, attr, spec in _COLUMNS)]
        cells.append(_identical_cell(s))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _identical_cell(s: ModeSummary) -> str:
    if s.identical is None:
        return "n/a"
    return "yes" if s.identical else f"**NO** ({s.identical_runs}/{s.runs})"


def _acceptance(summaries: Sequence[ModeSummary]) -> str:
    rows = [s for s in summaries if s.category == ALL and s.acceptance_per_position]
    if not rows:
        return ""
    width = max(len(s.acceptance_per_position or []) for s in rows)
    lines = [
        "## Acceptance by draft position (all prompts)",
        "",
        "Share of rounds that drafted at least i tokens whose first i were all accepted.",
        "",
        "| mode | " + " | ".join(str(i + 1) for i in range(width)) + " |",
        "|" + "---|" * (width + 1),
    ]
    for s in rows:
        values = list(s.acceptance_per_position or [])
        cells = [fmt(values[i], "{:.2f}") if i < len(values) else "" for i in range(width)]
        lines.append(f"| {s.mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _costs(costs: StepCosts | None, category: str | None = None) -> str:
    if costs is None:
        return ""
    lines = [
        "## Measured single-step costs"
        + ("" if category is None else f" at the context of {category} (its bounds use them)"),
        "",
        f"At {costs.context_tokens} tokens of context, median of {costs.repetitions} "
        "repetitions after a warm-up.",
        "",
        "| pass | ms | relative to a target step |",
        "|---|---|---|",
        f"| target, 1 token ({costs.kernels} kernels) | {costs.target_step * 1e3:.1f} | 1.00 |",
    ]
    if costs.torch_target_step is not None:
        lines.append(
            f"| target, 1 token (torch kernels, as transformers' modes ran) | "
            f"{costs.torch_target_step * 1e3:.1f} | "
            f"{costs.torch_target_step / costs.target_step:.2f} |"
        )
    for k, seconds in sorted(costs.verify.items()):
        lines.append(
            f"| target, verify k={k} ({k + 1} tokens) | {seconds * 1e3:.1f} | "
            f"{fmt(costs.verify_cost(k), '{:.2f}')} (c_v({k})) |"
        )
    for key, seconds in costs.draft_step.items():
        lines.append(
            f"| draft step: {key} | {seconds * 1e3:.2f} | {fmt(costs.c(key), '{:.3f}')} (c) |"
        )
    return "\n".join(lines) + "\n"


def _modes(modes: dict[str, dict[str, Any]]) -> str:
    lines = ["## Modes", ""]
    for name, settings in modes.items():
        lines.append(f"- **{name}**: `{json.dumps(settings, default=str)}`")
    return "\n".join(lines) + "\n"


def _notes(report: BenchReport) -> str:
    notes = list(report.notes)
    for s in report.summaries:
        notes += [f"{s.mode}: {n}" for n in s.notes if f"{s.mode}: {n}" not in notes]
    if not notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def fmt(value: Any, spec: str) -> str:
    """``spec`` applied to ``value``; an en dash for a missing value."""
    return "–" if value is None else spec.format(value)
