"""PNG plots of a search: the optimisation history, and which sublayers the best trials skip."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specdecode.search.space import skip_of_params


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_history(trials: Sequence[Any], objective: str, path: str | Path) -> None:
    """Each complete trial's value by trial number, with the best so far as a line."""
    plt = _pyplot()
    done = sorted(_complete(trials), key=lambda t: t.number)
    numbers = [t.number for t in done]
    values = [float(t.value) for t in done]
    best = [max(values[: i + 1]) for i in range(len(values))]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        ax.scatter(numbers, values, s=14, alpha=0.6, label="complete trial")
        if pruned:
            last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
            ax.scatter(
                [t.number for t in pruned],
                last,
                s=14,
                marker="x",
                color="0.5",
                label="pruned (value when stopped)",
            )
        ax.step(numbers, best, where="post", color="C3", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(_label(objective))
        ax.set_title("Skip-set search: optimisation history")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_skip_frequency(
    trials: Sequence[Any], num_layers: int, path: str | Path, top: float = 0.2
) -> int:
    """How often each attention and MLP sublayer is skipped among the best ``top`` share of
    complete trials (at least one). Returns how many trials the plot is made of."""
    plt = _pyplot()
    done = sorted(_complete(trials), key=lambda t: -float(t.value))
    best = done[: max(1, round(top * len(done)))] if done else []
    attention = [0.0] * num_layers
    mlp = [0.0] * num_layers
    for trial in best:
        skip = skip_of_params(trial.params)
        for i in skip.attention:
            attention[i] += 1 / len(best)
        for i in skip.mlp:
            mlp[i] += 1 / len(best)
    layers = list(range(num_layers))
    fig, ax = plt.subplots(figsize=(max(6, num_layers * 0.32), 4.5))
    try:
        ax.bar([i - 0.2 for i in layers], attention, width=0.4, label="attention")
        ax.bar([i + 0.2 for i in layers], mlp, width=0.4, label="MLP")
        ax.set_xlabel("layer")
        ax.set_ylabel("share of trials skipping it")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(layers[:: max(1, num_layers // 16)])
        ax.set_title(f"Sublayers skipped by the best {len(best)} of {len(done)} complete trials")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return len(best)


def _complete(trials: Sequence[Any]) -> list[Any]:
    return [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]


def _label(objective: str) -> str:
    if objective == "tokens-per-second":
        return "tokens/s (measured)"
    return "speedup (modelled)"
