"""The drafter interface: propose up to k tokens that continue a sequence.

A drafter is driven by the decoding loop and never drives it: the loop calls :meth:`begin` once
per sequence, :meth:`propose` once per round and :meth:`observe` with each round's verdict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from specdecode.sampling import TokenSampler
from specdecode.verify import Verdict

if TYPE_CHECKING:
    from specdecode.models import ModelSession


@dataclass(frozen=True)
class Draft:
    """Drafted tokens and, for drafters that have them, their distributions q."""

    tokens: list[int]
    q: torch.Tensor | None = None  # (k, V_q) processed draft distributions, or None (one-hot)
    seconds: float = 0.0  # wall time spent drafting (device-synchronised)
    info: dict[str, float] = field(default_factory=dict)  # drafter-specific figures

    def __len__(self) -> int:
        return len(self.tokens)


EMPTY_DRAFT = Draft(tokens=[])


class Drafter(ABC):
    """Proposes tokens for the target to verify."""

    name: str = "drafter"

    def bind(self, target: ModelSession) -> None:  # noqa: B027 - optional hook
        """Called once by the loop with the target's session, before any sequence.

        Only drafters that run on the target itself (layer skipping) need it: they share the
        target's model and KV cache, and must leave the session as they found it.
        """

    def begin(self, prompt_ids: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """Start a new sequence (drop state left from the previous one)."""

    @abstractmethod
    def propose(self, ids: Sequence[int], max_tokens: int, sampler: TokenSampler) -> Draft:
        """Propose at most ``max_tokens`` tokens to follow ``ids`` (prompt + generated so far).

        A drafter with a distribution draws from it with ``sampler`` and returns it as ``q``;
        one without (prompt lookup) returns ``q=None``.
        """

    def observe(self, verdict: Verdict) -> None:  # noqa: B027 - optional hook
        """Learn from a round's outcome (adaptive thresholds)."""

    def describe(self) -> dict[str, object]:
        """Settings worth recording next to measurements."""
        return {"name": self.name}
