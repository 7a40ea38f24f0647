"""How many tokens to draft each round."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from specdecode.errors import InvalidSettingsError
from specdecode.models.costs import PassCosts
from specdecode.verify import Verdict


class DraftLength(ABC):
    """A policy for k, the number of tokens drafted in the next round."""

    needs_costs: bool = False  # True: the loop measures the target's pass costs for it

    @abstractmethod
    def reset(self) -> None:
        """Start of a new sequence."""

    @abstractmethod
    def next(self) -> int:
        """k for the next round."""

    def update(self, verdict: Verdict) -> None:  # noqa: B027 - stateless policies ignore it
        """Learn from the round just verified."""

    def use_costs(self, costs: PassCosts, padded: bool) -> None:  # noqa: B027 - optional hook
        """The target's measured pass costs; ``padded``: the loop pads passes to cheap sizes."""

    def observe_time(  # noqa: B027 - optional hook
        self, drafted: int, draft_seconds: float, fed: int, target_seconds: float
    ) -> None:
        """A round's timings: ``drafted`` tokens in ``draft_seconds``, one target pass over
        ``fed`` tokens (padding included) in ``target_seconds``."""

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


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens from a round drafting ``k`` tokens whose acceptances are independent with
    rate ``alpha``: (1 - alpha^(k+1)) / (1 - alpha) (Leviathan et al. 2023, equation 1), k + 1
    when alpha = 1. The target's own token is counted, so k = 0 (plain decoding) gives 1."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, k: int, c: float, pass_cost: float) -> float:
    """Expected speedup over plain decoding of rounds drafting ``k`` tokens: tokens per round
    over the round's cost in target steps, ``k c`` for drafting (c: a draft step / a target
    step) plus ``pass_cost`` for the verification pass (Leviathan et al. 2023, Theorem 3.8, with
    the measured pass cost in place of 1)."""
    return expected_tokens(alpha, k) / (k * c + pass_cost)


@dataclass(frozen=True)
class LengthChoice:
    """A draft length and the speedup the cost model expects of it."""

    k: int  # 0: do not speculate (a plain step)
    speedup: float


def best_draft_length(
    alpha: float, c: float, costs: PassCosts, maximum: int, padded: bool = True
) -> LengthChoice:
    """The k in 0..``maximum`` with the highest expected speedup (the smallest among equals).

    A round with k drafted tokens feeds the target k + 1 tokens (the pending one and the draft),
    at ``costs.cost(k + 1, padded)``. k = 0 is plain decoding (speedup 1 by definition).
    """
    best = LengthChoice(0, 1.0)
    for k in range(1, maximum + 1):
        speedup = expected_speedup(alpha, k, c, costs.cost(k + 1, padded))
        if speedup > best.speedup:
            best = LengthChoice(k, speedup)
    return best


@dataclass
class CostAwareLength(DraftLength):
    """Draft the k that the measured costs say pays best; stop speculating where none pays.

    Every round, k maximises :func:`expected_speedup` with the acceptance rate alpha tracked
    online (an exponential moving average of accepted tokens and of rejections: alpha = accepted
    / (accepted + rejections), the geometric model's estimate), the draft cost c measured online
    (seconds per drafted token / seconds per target step) and the target's pass costs measured
    once (:class:`PassCosts`, given by the loop through :meth:`use_costs`). Until costs and a
    draft timing are known it drafts ``initial`` tokens. The first drafting round of each
    sequence is not timed: a draft model prefills the prompt in it.

    When no k is expected to beat plain decoding, it drafts nothing and only probes: one round
    of ``probe_k`` tokens after ``probe_every`` plain rounds, the gap doubling (up to
    ``probe_max_every``) while probes keep showing no gain, so it is never much slower than
    plain decoding and notices when the text turns predictable.
    """

    needs_costs = True
    initial: int = 5  # k until pass costs and draft timing are known
    maximum: int = 16  # the longest draft
    prior_alpha: float = 0.7  # alpha before any round of a sequence
    prior_weight: float = 4.0  # the prior's weight, in rounds
    decay: float = 0.8  # weight of the past in the moving averages, per round
    probe_k: int = 3  # tokens drafted by a probe
    probe_every: int = 4  # plain rounds before the first probe
    probe_max_every: int = 32  # the longest gap between probes
    costs: PassCosts | None = field(default=None, repr=False)
    padded: bool = True  # the loop pads passes to the cheapest size
    _accepted: float = field(default=0.0, init=False, repr=False)
    _rejected: float = field(default=0.0, init=False, repr=False)
    _draft_token_seconds: float | None = field(default=None, init=False, repr=False)
    _step_seconds: float | None = field(default=None, init=False, repr=False)
    _plain_rounds: int = field(default=0, init=False, repr=False)
    _probe_gap: int = field(default=0, init=False, repr=False)
    _first_draft: bool = field(default=True, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.initial <= self.maximum:
            raise InvalidSettingsError(
                f"the draft length must satisfy 1 <= initial <= maximum, got {self.initial} "
                f"and {self.maximum}"
            )
        if not 0.0 <= self.prior_alpha < 1.0 or not 0.0 <= self.decay < 1.0:
            raise InvalidSettingsError("prior_alpha and decay must lie in [0, 1)")
        if not 1 <= self.probe_k <= self.maximum or self.probe_every < 1:
            raise InvalidSettingsError("probe_k must be in [1, maximum] and probe_every >= 1")
        self.reset()

    @property
    def alpha(self) -> float:
        """The current estimate of the per-token acceptance rate."""
        return self._accepted / (self._accepted + self._rejected)

    @property
    def c(self) -> float | None:
        """The current estimate of a draft step's cost in target steps (None: not yet timed)."""
        if self._draft_token_seconds is None or not self._step_seconds:
            return None
        return self._draft_token_seconds / self._step_seconds

    def reset(self) -> None:
        """New sequence: alpha back to the prior; the timings (the machine's) are kept."""
        self._accepted = self.prior_alpha * self.prior_weight
        self._rejected = (1.0 - self.prior_alpha) * self.prior_weight
        self._plain_rounds = 0
        self._probe_gap = self.probe_every
        self._first_draft = True

    def use_costs(self, costs: PassCosts, padded: bool) -> None:
        self.costs, self.padded = costs, padded
        if costs.step_seconds > 0 and self._step_seconds is None:
            self._step_seconds = costs.step_seconds

    def choice(self) -> LengthChoice | None:
        """What the cost model picks now (None while costs or the draft's timing are unknown)."""
        c = self.c
        if self.costs is None or c is None:
            return None
        return best_draft_length(self.alpha, c, self.costs, self.maximum, self.padded)

    def next(self) -> int:
        choice = self.choice()
        if choice is None:
            return self.initial
        if choice.k > 0:
            self._plain_rounds, self._probe_gap = 0, self.probe_every
            return choice.k
        self._plain_rounds += 1
        if self._plain_rounds <= self._probe_gap:
            return 0
        self._plain_rounds = 0
        self._probe_gap = min(2 * self._probe_gap, self.probe_max_every)
        return self.probe_k

    def update(self, verdict: Verdict) -> None:
        if verdict.num_drafted == 0:
            return
        self._accepted = self.decay * self._accepted + verdict.num_accepted
        self._rejected = self.decay * self._rejected + float(verdict.rejected)

    def observe_time(
        self, drafted: int, draft_seconds: float, fed: int, target_seconds: float
    ) -> None:
        if self.costs is not None and target_seconds > 0:
            step = target_seconds / self.costs.cost(fed, padded=False)
            self._step_seconds = _moving(self._step_seconds, step, self.decay)
        if drafted > 0 and self._first_draft:
            # a draft model's first round of a sequence includes its prefill of the prompt:
            # not a draft step's cost
            self._first_draft = False
        elif drafted > 0:
            per_token = draft_seconds / drafted
            self._draft_token_seconds = _moving(self._draft_token_seconds, per_token, self.decay)

    def describe(self) -> dict[str, object]:
        return {
            "schedule": "auto",
            "initial_k": self.initial,
            "max_k": self.maximum,
            "padded": self.padded,
            "pass_costs": None if self.costs is None else self.costs.to_dict(),
        }


def _moving(previous: float | None, value: float, decay: float) -> float:
    return value if previous is None else decay * previous + (1.0 - decay) * value


SCHEDULES = ("constant", "heuristic", "auto")


def make_schedule(kind: str, k: int) -> DraftLength:
    """``constant`` or ``heuristic`` with (initial) length ``k``; ``auto``: the cost-aware
    policy, starting at ``k`` until it has measured costs, drafting at most max(k, 16)."""
    if kind == "constant":
        return FixedLength(k)
    if kind == "heuristic":
        return HeuristicLength(k)
    if kind == "auto":
        return CostAwareLength(initial=k, maximum=max(k, CostAwareLength.maximum))
    raise InvalidSettingsError(
        f"unknown draft schedule {kind!r}: choose one of {', '.join(SCHEDULES)}"
    )
