"""The drafter interface: propose up to k tokens that continue a sequence.

A drafter is driven by the decoding loop and never drives it: the loop calls :meth:`begin` once
per sequence, :meth:`propose` once per round and :meth:`observe` with each round's verdict.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from specdecode.sampling import TokenSampler
from specdecode.verify import Verdict

if TYPE_CHECKING:
    from specdecode.models import Session


StopRule = Callable[[Sequence[float]], bool]
"""Asked by a drafter after each drafted token with the draft's confidences so far (its
probability of each token it chose, after the sampling processors): True ends the draft there.
The decoding loop gets it from the draft-length policy (see ``DraftLength.stop_rule``)."""


@dataclass(frozen=True)
class Draft:
    """Drafted tokens and, for drafters that have them, their distributions q."""

    tokens: list[int]
    q: torch.Tensor | None = None  # (k, V_q) processed draft distributions, or None (one-hot)
    seconds: float = 0.0  # wall time spent drafting (device-synchronised)
    info: dict[str, float] = field(default_factory=dict)  # drafter-specific figures
    # the draft's probability of each token it chose (empty: a drafter without a distribution)
    confidence: list[float] = field(default_factory=list)
    # of ``seconds``, the time the drafter's own model spent reading the prompt (its first
    # call of a sequence): a once-per-sequence cost that no draft step repeats
    prefill_seconds: float = 0.0
    # made without a model step (a hybrid's prompt lookup, see :meth:`Drafter.free_draft`): the
    # length schedule neither sets its length nor learns the model's acceptance or cost from it
    free: bool = False
    ngram: int = 0  # prompt lookup: the length of the n-gram whose earlier match gave the draft

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, n: int) -> Draft:
        """The first ``n`` drafted tokens (the same timing and info)."""
        if n >= len(self.tokens):
            return self
        q = None if self.q is None else self.q[:n]
        return replace(self, tokens=self.tokens[:n], q=q, confidence=self.confidence[:n])


EMPTY_DRAFT = Draft(tokens=[])


def draft_probabilities(scores: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """The draft's distribution after the sampling processors: the sampler's own when it made
    one (sampling), else the softmax of the processed scores (greedy)."""
    return probs if probs is not None else torch.softmax(scores.float(), dim=-1)


class Drafter(ABC):
    """Proposes tokens for the target to verify."""

    name: str = "drafter"

    def bind(self, target: Session) -> None:  # noqa: B027 - optional hook
        """Called once by the loop with the target's session, before any sequence.

        Only drafters that run on the target itself (layer skipping) need it: they share the
        target's model and KV cache, and must leave the session as they found it.
        """

    def begin(self, prompt_ids: Sequence[int], reuse_cache: bool = False) -> None:  # noqa: B027
        """Start a new sequence (drop state left from the previous one). ``reuse_cache``: a
        drafter with a KV cache may keep the positions whose ids begin the new sequence too
        (the generator reuses its own: ``SpeculativeGenerator(reuse_prompt_cache=True)``)."""

    def reserve(self, positions: int) -> None:  # noqa: B027 - optional hook
        """The sequence will hold at most ``positions`` positions (drafters with a preallocated
        cache size it now)."""

    @abstractmethod
    def propose(
        self,
        ids: Sequence[int],
        max_tokens: int,
        sampler: TokenSampler,
        stop: StopRule | None = None,
    ) -> Draft:
        """Propose at most ``max_tokens`` tokens to follow ``ids`` (prompt + generated so far).

        A drafter with a distribution draws from it with ``sampler`` and returns it as ``q``,
        with its probability of each chosen token as ``confidence``, and asks ``stop`` (when
        given) after each token whether to end the draft there. One without (prompt lookup)
        returns ``q=None`` and no confidences, and has nothing to ask ``stop`` with.
        """

    def free_draft(self, ids: Sequence[int], max_tokens: int) -> Draft | None:
        """A draft that costs no model step, offered before the length schedule is asked for k:
        a hybrid's prompt lookup (see :mod:`specdecode.drafters.hybrid`). None (the default):
        this drafter has none here. The loop verifies it instead of calling :meth:`propose`
        when the schedule judges it to pay better (:meth:`DraftLength.free_length`); it must be
        marked ``free=True`` and hold at most ``max_tokens`` tokens."""
        return None

    def observe(self, verdict: Verdict) -> None:  # noqa: B027 - optional hook
        """Learn from a round's outcome (adaptive thresholds). Not called for rounds that
        verified a free draft (:meth:`free_draft`): those say nothing of this drafter's own."""

    def describe(self) -> dict[str, object]:
        """Settings worth recording next to measurements."""
        return {"name": self.name}


def begin_sequence(drafter: Drafter, prompt_ids: Sequence[int], reuse_cache: bool) -> None:
    """``drafter.begin`` for a new sequence; ``reuse_cache`` only where it was asked for (the
    generator kept part of its own cache) and the drafter takes it: drafters written before it
    existed take the prompt ids alone."""
    if reuse_cache and "reuse_cache" in inspect.signature(drafter.begin).parameters:
        drafter.begin(prompt_ids, reuse_cache=True)
    else:
        drafter.begin(prompt_ids)
