"""PNG plots of a benchmark (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specdecode.bench.stats import ALL, ModeSummary
from specdecode.errors import SpecDecodeError

SPEEDUP_PNG = "speedup_by_category.png"
ACCEPTANCE_PNG = "acceptance_by_position.png"


class PlottingUnavailableError(SpecDecodeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlottingUnavailableError(
            "plots need matplotlib: pip install 'specdecode[bench]' (or pass --no-plots)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(summaries: Sequence[ModeSummary], path: Path) -> None:
    """Grouped bars: median speedup over the reference, per category and mode."""
    plt = _pyplot()
    cats = list(dict.fromkeys(s.category for s in summaries))
    modes = list(dict.fromkeys(s.mode for s in summaries))
    value = {(s.category, s.mode): s.speedup_median for s in summaries}
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cats) * max(1, len(modes) / 4)), 4.5))
    for i, mode in enumerate(modes):
        xs = [c + (i - (len(modes) - 1) / 2) * width for c in range(len(cats))]
        ax.bar(xs, [value.get((c, mode), 0.0) for c in cats], width, label=mode)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cats)), cats, rotation=20)
    ax.set_ylabel("speedup over transformers generate (median)")
    ax.set_title("Speedup by category and mode")
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_acceptance(summaries: Sequence[ModeSummary], path: Path) -> bool:
    """Acceptance by draft position (all prompts), one line per mode; False if no mode drafts."""
    rows = [s for s in summaries if s.category == ALL and s.acceptance_per_position]
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for s in rows:
        values = s.acceptance_per_position or []
        ax.plot(range(1, len(values) + 1), values, marker="o", label=s.mode)
    ax.set_xlabel("draft position i")
    ax.set_ylabel("share of rounds accepting the first i drafted tokens")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by draft position (all prompts)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(summaries: Sequence[ModeSummary], folder: Path) -> list[str]:
    """Write both plots into ``folder``; return the file names written."""
    written = [SPEEDUP_PNG]
    plot_speedup(summaries, folder / SPEEDUP_PNG)
    if plot_acceptance(summaries, folder / ACCEPTANCE_PNG):
        written.append(ACCEPTANCE_PNG)
    return written
