"""The search space of skip sets, built from the model's own layer count.

One boolean per attention sublayer and one per MLP sublayer, as in Draft & Verify: attention and
MLP matter differently (skipping attention in upper layers is usually cheap in quality, MLP less
so), and a boolean per sublayer lets the sampler learn that per layer. The first ``keep_first``
and last ``keep_last`` layers are never skipped (they are not even parameters: a smaller space),
and a skip-ratio range excludes sets too small to pay off or too large to be accepted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from specdecode.errors import InvalidSettingsError
from specdecode.models.layerskip import SkipSet


@dataclass(frozen=True)
class SearchSpace:
    """Which sublayers may be skipped, and how many in all."""

    num_layers: int
    keep_first: int = 1  # layers at the bottom never skipped
    keep_last: int = 1  # layers at the top never skipped
    min_ratio: float = 0.0  # of all 2 * num_layers sublayers, at least this share skipped
    max_ratio: float = 1.0  # ... and at most this share

    def __post_init__(self) -> None:
        if self.keep_first < 0 or self.keep_last < 0:
            raise InvalidSettingsError("--keep-first and --keep-last must be >= 0")
        if not self.searchable:
            raise InvalidSettingsError(
                f"keeping the first {self.keep_first} and last {self.keep_last} of "
                f"{self.num_layers} layers leaves none to skip: keep fewer"
            )
        if not 0 <= self.min_ratio <= self.max_ratio <= 1:
            raise InvalidSettingsError(
                f"the skip-ratio range must satisfy 0 <= min <= max <= 1, got "
                f"{self.min_ratio} and {self.max_ratio}"
            )
        most = 2 * len(self.searchable) / (2 * self.num_layers)
        if self.min_ratio > most:
            raise InvalidSettingsError(
                f"a skip ratio of at least {self.min_ratio} is impossible when only layers "
                f"{self.searchable[0]}-{self.searchable[-1]} may be skipped (at most {most:.2f})"
            )

    @property
    def searchable(self) -> list[int]:
        """Indices of the layers whose sublayers are parameters."""
        return list(range(self.keep_first, self.num_layers - self.keep_last))

    def suggest(self, trial: Any) -> SkipSet:
        """Ask an Optuna trial for one skip set."""
        attention = [i for i in self.searchable if trial.suggest_categorical(attn_param(i), _BOOL)]
        mlp = [i for i in self.searchable if trial.suggest_categorical(mlp_param(i), _BOOL)]
        return SkipSet.of(attention, mlp)

    def params(self, skip: SkipSet) -> dict[str, bool]:
        """Trial parameters that give ``skip`` (to enqueue it); indices outside the space drop."""
        out = {attn_param(i): i in skip.attention for i in self.searchable}
        out.update({mlp_param(i): i in skip.mlp for i in self.searchable})
        return out

    def feasible(self, skip: SkipSet) -> bool:
        return self.min_ratio <= skip.ratio(self.num_layers) <= self.max_ratio

    def warm_starts(self) -> dict[str, SkipSet]:
        """Known good starting points, named, restricted to the space and the ratio range."""
        layers = self.searchable
        upper = [i for i in layers if i >= self.num_layers // 2]
        every_other_upper = upper[1::2]
        middle = layers[len(layers) // 4 : len(layers) - len(layers) // 8]
        candidates = {
            # LayerSkip / Draft & Verify: upper layers matter least
            "every other layer, upper half": SkipSet.of(every_other_upper, every_other_upper),
            # attention is cheap to skip in upper layers, MLP less so
            "attention of the upper half": SkipSet.of(upper, ()),
            "every other attention, middle": SkipSet.of(middle[::2], middle[1::4]),
        }
        return {name: s for name, s in candidates.items() if s.size and self.feasible(s)}

    def random_skip(self, attention: int, mlp: int, seed: int) -> SkipSet:
        """A random skip set within the space with ``attention`` attention and ``mlp`` MLP
        sublayers: a control for a searched set of the same make-up."""
        layers = self.searchable
        if not (0 <= attention <= len(layers) and 0 <= mlp <= len(layers)):
            raise InvalidSettingsError(
                f"cannot skip {attention} attention and {mlp} MLP sublayers of the "
                f"{len(layers)} searchable layers"
            )
        rng = random.Random(seed)
        return SkipSet.of(rng.sample(layers, attention), rng.sample(layers, mlp))

    def every_other_layer(self) -> SkipSet:
        """Attention and MLP of every other searchable layer (a baseline)."""
        layers = self.searchable[1::2] if len(self.searchable) > 1 else self.searchable
        return SkipSet.of(layers, layers)

    def describe(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "keep_first": self.keep_first,
            "keep_last": self.keep_last,
            "min_ratio": self.min_ratio,
            "max_ratio": self.max_ratio,
        }


_BOOL = (False, True)


def attn_param(layer: int) -> str:
    return f"attn_{layer:03d}"


def mlp_param(layer: int) -> str:
    return f"mlp_{layer:03d}"


def skip_of_params(params: dict[str, Any]) -> SkipSet:
    """The skip set of a finished trial's parameters."""
    attention = [int(k[5:]) for k, v in params.items() if k.startswith("attn_") and v]
    mlp = [int(k[4:]) for k, v in params.items() if k.startswith("mlp_") and v]
    return SkipSet.of(attention, mlp)
