"""How many tokens to draft each round."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from specdecode.drafters.base import Draft, StopRule
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

    def update(  # noqa: B027 - stateless policies ignore it
        self, verdict: Verdict, confidence: Sequence[float] = ()
    ) -> None:
        """Learn from the round just verified (``confidence``: the draft's probability of each
        token it drafted, when the drafter has them)."""

    def stop_rule(self) -> StopRule | None:
        """What ends a draft before k tokens, asked by drafters that know their confidence
        (None: only k and the drafter's own settings do)."""
        return None

    def free_length(self, draft: Draft) -> int:
        """How many tokens of ``draft``, made without a model step (a hybrid's prompt lookup,
        :meth:`Drafter.free_draft`), to verify this round instead of asking the drafter's
        model for k tokens; 0 turns it down. By default every free draft is taken whole."""
        return len(draft)

    def update_free(self, draft: Draft, verdict: Verdict) -> None:  # noqa: B027 - optional hook
        """Learn from a round that verified a free draft (:meth:`update` sees only the
        model's rounds)."""

    def use_costs(self, costs: PassCosts, padded: bool) -> None:  # noqa: B027 - optional hook
        """The target's measured pass costs; ``padded``: the loop pads passes to cheap sizes."""

    def observe_time(  # noqa: B027 - optional hook
        self,
        drafted: int,
        draft_seconds: float,
        fed: int,
        target_seconds: float,
        free: bool = False,
    ) -> None:
        """A round's timings: ``drafted`` tokens in ``draft_seconds``, one target pass over
        ``fed`` tokens (padding included) in ``target_seconds``; ``free``: the draft took no
        model step (a hybrid's prompt lookup)."""

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

    def update(self, verdict: Verdict, confidence: Sequence[float] = ()) -> None:
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
class AcceptanceCalibration:
    """How often a drafted token is accepted, as a function of the draft's confidence in it.

    Confidences (the draft's probability of the token it chose) fall into ``bins`` equal bins
    of [0, 1]; each bin keeps decayed counts of its tokens seen and accepted, starting from a
    prior of ``prior_weight`` tokens accepted at the bin's centre rate (a calibrated draft). A
    token counts as seen only when every token before it in its draft was accepted: what the
    rate estimates is P(accepted | its confidence, the draft so far accepted), the factor the
    stop rule multiplies.
    """

    bins: int = 10
    prior_weight: float = 2.0
    decay: float = 0.995  # per update of a bin: the pair's behaviour drifts with the text
    _seen: list[float] = field(init=False, repr=False)
    _accepted: list[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bins < 1 or self.prior_weight <= 0 or not 0 < self.decay <= 1:
            raise InvalidSettingsError(
                "calibration needs bins >= 1, prior_weight > 0 and decay in (0, 1]"
            )
        self._seen = [self.prior_weight] * self.bins
        self._accepted = [self.prior_weight * (b + 0.5) / self.bins for b in range(self.bins)]

    def _bin(self, confidence: float) -> int:
        return min(max(int(confidence * self.bins), 0), self.bins - 1)

    def rate(self, confidence: float) -> float:
        """Estimated acceptance probability of a token drafted with ``confidence``."""
        b = self._bin(confidence)
        return self._accepted[b] / self._seen[b]

    def update(self, confidence: Sequence[float], accepted: int) -> None:
        """A verified draft: its tokens' confidences and how many of them were accepted."""
        for i, conf in enumerate(confidence[: accepted + 1]):
            b = self._bin(conf)
            self._seen[b] = self.decay * self._seen[b] + 1.0
            self._accepted[b] = self.decay * self._accepted[b] + (1.0 if i < accepted else 0.0)


@dataclass
class LookupAcceptance:
    """How often prompt lookup's drafted tokens are accepted, by the length of the n-gram that
    matched (a longer match is firmer evidence). Each length keeps decayed counts of accepted
    tokens and of rejections, from a prior of ``prior_weight`` rounds at ``prior_alpha``; the
    rate is the geometric model's accepted / (accepted + rejections)."""

    prior_alpha: float = 0.6  # a first match is worth trying: a failed one costs one pass
    prior_weight: float = 2.0
    decay: float = 0.8
    _accepted: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _rejected: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    def alpha(self, ngram: int) -> float:
        accepted, rejected = self._counts(ngram)
        return accepted / (accepted + rejected)

    def update(self, ngram: int, verdict: Verdict) -> None:
        accepted, rejected = self._counts(ngram)
        self._accepted[ngram] = self.decay * accepted + verdict.num_accepted
        self._rejected[ngram] = self.decay * rejected + float(verdict.rejected)

    def reset(self) -> None:
        self._accepted.clear()
        self._rejected.clear()

    def _counts(self, ngram: int) -> tuple[float, float]:
        """Decayed accepted tokens and rejections of this length (the prior's, when unseen)."""
        prior = self.prior_weight
        accepted = self._accepted.get(ngram, self.prior_alpha * prior)
        return accepted, self._rejected.get(ngram, (1.0 - self.prior_alpha) * prior)


def should_stop_drafting(
    accept_all: float,
    drafted: int,
    horizon: int,
    future_rate: float,
    c: float,
    costs: PassCosts,
    rate: float,
    padded: bool = True,
) -> bool:
    """Whether a draft of ``drafted`` tokens should end here, on expected tokens and costs.

    ``accept_all`` is the probability that all the drafted tokens are accepted; each further
    token is accepted with probability ``future_rate`` (given all before it were). Drafting h
    more tokens adds ``accept_all * (r + r^2 + ... + r^h)`` expected tokens to the round and
    costs ``h c`` plus the growth of the verification pass, in target steps. It pays when the
    tokens it adds exceed what the same cost makes at ``rate``, the long-run tokens per target
    step of this decoding: the optimal-stopping rule of a renewal-reward process (a round is a
    renewal; maximising tokens per cost means continuing while the marginal return beats the
    average). Looking up to ``horizon`` tokens ahead catches pass sizes that come for free with
    padding. Returns True (stop) when no h in 1..``horizon`` pays.
    """
    base = costs.cost(drafted + 1, padded)
    gain, reach = 0.0, accept_all
    for h in range(1, horizon + 1):
        reach *= future_rate
        gain += reach
        extra = h * c + costs.cost(drafted + h + 1, padded) - base
        if gain > rate * extra:
            return False
    return True


@dataclass
class CostAwareLength(DraftLength):
    """Draft the k that the measured costs say pays best; stop speculating where none pays.

    Every round, k maximises :func:`expected_speedup` with the acceptance rate alpha tracked
    online (an exponential moving average of accepted tokens and of rejections: alpha = accepted
    / (accepted + rejections), the geometric model's estimate), the draft cost c measured online
    (seconds per drafted token / seconds per target step) and the target's pass costs measured
    once (:class:`PassCosts`, given by the loop through :meth:`use_costs`). Until costs and a
    draft timing are known it drafts ``initial`` tokens. A drafting round that follows a round
    without a draft (or starts a sequence) is not timed: a draft model first catches up on the
    tokens it has not seen (the prompt, the plain rounds' tokens), which is no draft step's
    cost and would make speculation look dearer exactly when it has stopped.

    When no k is expected to beat plain decoding, it drafts nothing and only probes: one round
    of ``probe_k`` tokens after ``probe_every`` plain rounds, the gap doubling (up to
    ``probe_max_every``) while probes keep showing no gain, so it is never much slower than
    plain decoding and notices when the text turns predictable.

    With a drafter that reports its confidence (a draft model, layer skipping), it also ends
    each draft where one more token stops paying (:meth:`stop_rule`,
    :func:`should_stop_drafting`): the probability that the draft so far is all accepted comes
    from each token's confidence through an online :class:`AcceptanceCalibration`, so a draft
    runs long while the draft model is sure and stops at the first doubtful token. k is then
    ``maximum`` whenever speculation pays at all, and the rule decides the length. This is the
    role of transformers' fixed ``assistant_confidence_threshold``, with the threshold set by
    the measured costs instead of by hand. Off by default (``confidence_stop=True`` turns it
    on): measured on the Qwen2.5-Coder pair it matched the per-round k on code and lost to it
    on chat (docs/speed.md).

    Offered a free draft (a hybrid drafter's prompt lookup), it takes the head of it with the
    most expected tokens per target step, from the lookup's acceptance learnt per n-gram length
    (:class:`LookupAcceptance`) and the pass cost of each length, when that is at least what
    the model's best k is expected to make (or plain decoding, where drafting does not pay).
    The comparison leaves out the model's catch-up on the copied tokens at its next draft (a
    little in the lookup's favour); with ``confidence_stop`` the model's side is the per-round
    k's expectation, not what the stop rule's drafts make.
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
    confidence_stop: bool = False  # end drafts by expected gain (drafters with confidences)
    costs: PassCosts | None = field(default=None, repr=False)
    calibration: AcceptanceCalibration = field(default_factory=AcceptanceCalibration, repr=False)
    lookup: LookupAcceptance = field(default_factory=LookupAcceptance, repr=False)
    padded: bool = True  # the loop pads passes to the cheapest size
    _accepted: float = field(default=0.0, init=False, repr=False)
    _rejected: float = field(default=0.0, init=False, repr=False)
    _draft_token_seconds: float | None = field(default=None, init=False, repr=False)
    _step_seconds: float | None = field(default=None, init=False, repr=False)
    _plain_rounds: int = field(default=0, init=False, repr=False)
    _probe_gap: int = field(default=0, init=False, repr=False)
    _catching_up: bool = field(default=True, init=False, repr=False)  # the draft lags behind
    _confident: bool = field(default=False, init=False, repr=False)  # drafts carry confidences
    _token_rate: float | None = field(default=None, init=False, repr=False)  # mean calibrated
    _round_tokens: float = field(default=0.0, init=False, repr=False)  # moving sums of rounds'
    _round_cost: float = field(default=0.0, init=False, repr=False)  # tokens and modelled cost
    _k: int = field(default=0, init=False, repr=False)  # k of the latest round

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
        """The current estimate of the per-token acceptance rate.

        For drafts cut by the stop rule, accepted / (accepted + rejections) overstates it (the
        rule ends drafts before the doubtful tokens): the calibrated rate of the tokens drafted
        is used instead."""
        if self._stops_by_confidence() and self._token_rate is not None:
            return self._token_rate
        return self._accepted / (self._accepted + self._rejected)

    @property
    def rate(self) -> float:
        """Tokens per target step that speculation has been making lately (modelled from
        rounds' outcomes and the measured costs), never below plain decoding's 1."""
        if self._round_cost <= 0:
            return 1.0
        return max(1.0, self._round_tokens / self._round_cost)

    @property
    def c(self) -> float | None:
        """The current estimate of a draft step's cost in target steps (None: not yet timed)."""
        if self._draft_token_seconds is None or not self._step_seconds:
            return None
        return self._draft_token_seconds / self._step_seconds

    def reset(self) -> None:
        """New sequence: acceptance back to the prior; the timings (the machine's) and the
        confidence calibration (the model pair's) are kept."""
        self._accepted = self.prior_alpha * self.prior_weight
        self._rejected = (1.0 - self.prior_alpha) * self.prior_weight
        self._token_rate = self.prior_alpha
        self._round_tokens = self._round_cost = self.prior_weight  # rate 1: plain decoding's
        self._plain_rounds = 0
        self._probe_gap = self.probe_every
        self._catching_up = True
        self.lookup.reset()

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
        self._k = self._next()
        return self._k

    def _next(self) -> int:
        choice = self.choice()
        if choice is None:
            return self.initial
        if choice.k > 0:
            self._plain_rounds, self._probe_gap = 0, self.probe_every
            return self.maximum if self._stops_by_confidence() else choice.k
        self._plain_rounds += 1
        if self._plain_rounds <= self._probe_gap:
            return 0
        self._plain_rounds = 0
        self._probe_gap = min(2 * self._probe_gap, self.probe_max_every)
        return self.probe_k

    def free_length(self, draft: Draft) -> int:
        if self.costs is None:
            return len(draft)  # nothing to weigh it against yet
        alpha = self.lookup.alpha(draft.ngram)
        best = LengthChoice(0, 0.0)
        for n in range(1, len(draft) + 1):  # a shorter head may make a cheaper pass
            speedup = expected_speedup(alpha, n, 0.0, self.costs.cost(n + 1, self.padded))
            if speedup > best.speedup:
                best = LengthChoice(n, speedup)
        choice = self.choice()
        return best.k if best.speedup >= (1.0 if choice is None else choice.speedup) else 0

    def update_free(self, draft: Draft, verdict: Verdict) -> None:
        self.lookup.update(draft.ngram, verdict)

    def _stops_by_confidence(self) -> bool:
        return self.confidence_stop and self._confident

    def stop_rule(self) -> StopRule | None:
        return self._stop if self.confidence_stop else None

    def _stop(self, confidence: Sequence[float]) -> bool:
        """End the draft after these tokens? (see :func:`should_stop_drafting`)"""
        c = self.c
        if self.costs is None or c is None or self._token_rate is None:
            return False  # not measured yet: draft the k asked
        accept_all = math.prod(self.calibration.rate(x) for x in confidence)
        drafted = len(confidence)
        horizon = max(self._k, self.initial) - drafted
        return should_stop_drafting(
            accept_all, drafted, horizon, self._token_rate, c, self.costs, self.rate, self.padded
        )

    def update(self, verdict: Verdict, confidence: Sequence[float] = ()) -> None:
        if verdict.num_drafted == 0:
            return
        self._accepted = self.decay * self._accepted + verdict.num_accepted
        self._rejected = self.decay * self._rejected + float(verdict.rejected)
        self._confident = len(confidence) == verdict.num_drafted
        if not self._stops_by_confidence():
            return  # the calibration and rate below serve only the stop rule
        self.calibration.update(confidence, verdict.num_accepted)
        for x in confidence:
            self._token_rate = _moving(self._token_rate, self.calibration.rate(x), self.decay)
        c = self.c
        if self.costs is not None and c is not None:
            d = verdict.num_drafted
            cost = d * c + self.costs.cost(d + 1, self.padded)
            self._round_tokens = self.decay * self._round_tokens + verdict.num_accepted + 1
            self._round_cost = self.decay * self._round_cost + cost

    def observe_time(
        self,
        drafted: int,
        draft_seconds: float,
        fed: int,
        target_seconds: float,
        free: bool = False,
    ) -> None:
        if self.costs is not None and target_seconds > 0:
            step = target_seconds / self.costs.cost(fed, padded=False)
            self._step_seconds = _moving(self._step_seconds, step, self.decay)
        if free:
            # No draft step to time. The model's next draft first feeds the copied tokens in
            # one pass (at most lookup_tokens + 1): timed as its steps all the same, a little
            # dear, so that c is measured even where lookup and model rounds alternate.
            return
        if drafted == 0:
            self._catching_up = True  # the next draft first feeds this round's tokens
        elif self._catching_up:
            self._catching_up = False  # this draft included the catch-up: not a step's cost
        else:
            per_token = draft_seconds / drafted
            self._draft_token_seconds = _moving(self._draft_token_seconds, per_token, self.decay)

    def describe(self) -> dict[str, object]:
        return {
            "schedule": "auto",
            "initial_k": self.initial,
            "max_k": self.maximum,
            "padded": self.padded,
            "confidence_stop": self.confidence_stop,
            "pass_costs": None if self.costs is None else self.costs.to_dict(),
        }


def _moving(previous: float | None, value: float, decay: float) -> float:
    return value if previous is None else decay * previous + (1.0 - decay) * value


SCHEDULES = ("constant", "heuristic", "auto")


def make_schedule(kind: str, k: int, confidence_stop: bool = False) -> DraftLength:
    """``constant`` or ``heuristic`` with (initial) length ``k``; ``auto``: the cost-aware
    policy, starting at ``k`` until it has measured costs, drafting at most max(k, 16), ending
    drafts by confidence when ``confidence_stop`` is True."""
    if kind == "constant":
        return FixedLength(k)
    if kind == "heuristic":
        return HeuristicLength(k)
    if kind == "auto":
        maximum = max(k, CostAwareLength.maximum)
        return CostAwareLength(initial=k, maximum=maximum, confidence_stop=confidence_stop)
    raise InvalidSettingsError(
        f"unknown draft schedule {kind!r}: choose one of {', '.join(SCHEDULES)}"
    )
