"""How many tokens to draft each round."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from specdecode.errors import InvalidSettingsError
from specdecode.verify import Verdict


class DraftLength(ABC):
    """A policy for k, the number of tokens drafted in the next round."""

    @abstractmethod
    def reset(self) -> None:
        """Start of a new sequence."""

    @abstractmethod
    def next(self) -> int:
        """k for the next round."""

    def update(self, verdict: Verdict) -> None:  # noqa: B027 - stateless policies ignore it
        """Learn from the round just verified."""

    def describe(self) -> dict[str, object]:
        return {"schedule": type(self).__name__}


@dataclass
class FixedLength(DraftLength):
    """Always draft k tokens."""

    k: int = 5

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InvalidSettingsError(f"the draft length k must be >= 1, got {self.k}")

    def reset(self) -> None:
        pass

    def next(self) -> int:
        return self.k

    def describe(self) -> dict[str, object]:
        return {"schedule": "constant", "k": self.k}


@dataclass
class HeuristicLength(DraftLength):
    """transformers' "heuristic" schedule: +2 after a fully accepted round, -1 otherwise (min 1)."""

    initial: int = 5
    maximum: int = 64

    def __post_init__(self) -> None:
        if self.initial < 1:
            raise InvalidSettingsError(f"the initial draft length must be >= 1, got {self.initial}")
        self.k = self.initial

    def reset(self) -> None:
        self.k = self.initial

    def next(self) -> int:
        return self.k

    def update(self, verdict: Verdict) -> None:
        if verdict.num_drafted == 0:
            return
        if verdict.num_accepted == verdict.num_drafted:
            self.k = min(self.k + 2, self.maximum)
        else:
            self.k = max(1, self.k - 1)

    def describe(self) -> dict[str, object]:
        return {"schedule": "heuristic", "initial_k": self.initial}


def make_schedule(kind: str, k: int) -> DraftLength:
    """``constant`` or ``heuristic`` with (initial) length ``k``."""
    if kind == "constant":
        return FixedLength(k)
    if kind == "heuristic":
        return HeuristicLength(k)
    raise InvalidSettingsError(f"unknown draft schedule {kind!r}: choose constant or heuristic")
