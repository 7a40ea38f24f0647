"""Prompt lookup first, a model where lookup finds nothing worth verifying.

Copy-heavy text (a summary quoting its source, an answer built from retrieved passages, code
editing code) repeats long runs of the context: prompt lookup drafts them for free, and often
longer than a draft model would dare. Elsewhere lookup finds nothing, or a short n-gram whose
continuation is a guess, and a draft model does better. This drafter offers the lookup's draft
each round (:meth:`Drafter.free_draft`) and drafts with its model when the length schedule
turns the lookup down (the cost-aware schedule weighs the lookup's expected tokens, learnt per
n-gram length, against the model's expected speedup; the constant and heuristic schedules take
every match) or when nothing matches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from specdecode.drafters.base import Draft, Drafter, StopRule, begin_sequence
from specdecode.drafters.prompt_lookup import LooksUpNgrams, NgramIndex
from specdecode.errors import InvalidSettingsError
from specdecode.sampling import TokenSampler
from specdecode.verify import Verdict

if TYPE_CHECKING:
    from specdecode.models import Session


class LookupDrafter(LooksUpNgrams, Drafter):
    """Prompt lookup in front of another drafter (a draft model, layer skipping).

    Args:
        model: the drafter used when lookup is not (its state is kept as if it drafted every
            round: a draft model catches up on the tokens of lookup rounds at its next draft).
        lookup_tokens: the most tokens a lookup draft holds (it costs no draft step, so it may
            be longer than the model's k; the target's pass grows with it).
        max_ngram, min_ngram: the longest and shortest suffix n-gram searched for. The
            shortest defaults to 2: a single matching token says little about what follows.
    """

    name = "lookup+model"
    DEFAULT_LOOKUP_TOKENS = 10
    DEFAULT_MIN_NGRAM = 2

    def __init__(
        self,
        model: Drafter,
        lookup_tokens: int = DEFAULT_LOOKUP_TOKENS,
        max_ngram: int = 3,
        min_ngram: int = DEFAULT_MIN_NGRAM,
    ) -> None:
        if isinstance(model, LookupDrafter):
            raise InvalidSettingsError("a lookup drafter cannot wrap another lookup drafter")
        if lookup_tokens < 1:
            raise InvalidSettingsError(
                f"prompt lookup needs at least 1 token per draft, got {lookup_tokens}"
            )
        self.index = NgramIndex(max_ngram, min_ngram)  # checks the n-gram range
        self.model = model
        self.lookup_tokens = lookup_tokens

    @classmethod
    def min_ngram_for(cls, max_ngram: int, asked: int | None) -> int:
        """The shortest n-gram: ``asked``, else the default within ``max_ngram``."""
        return min(cls.DEFAULT_MIN_NGRAM, max_ngram) if asked is None else asked

    def bind(self, target: Session) -> None:
        self.model.bind(target)

    def begin(self, prompt_ids: Sequence[int], reuse_cache: bool = False) -> None:
        self.index.reset()
        begin_sequence(self.model, prompt_ids, reuse_cache)

    def reserve(self, positions: int) -> None:
        self.model.reserve(positions)

    def free_draft(self, ids: Sequence[int], max_tokens: int) -> Draft | None:
        start = time.perf_counter()
        match = self.index.find(ids, min(self.lookup_tokens, max_tokens))
        if match is None:
            return None
        seconds = time.perf_counter() - start
        return Draft(match.tokens, None, seconds, free=True, ngram=match.ngram)

    def propose(
        self,
        ids: Sequence[int],
        max_tokens: int,
        sampler: TokenSampler,
        stop: StopRule | None = None,
    ) -> Draft:
        return self.model.propose(ids, max_tokens, sampler, stop)

    def observe(self, verdict: Verdict) -> None:
        self.model.observe(verdict)  # the loop does not report rounds of free drafts

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "lookup_tokens": self.lookup_tokens,
            "max_ngram": self.max_ngram,
            "min_ngram": self.min_ngram,
            "model": self.model.describe(),
        }
