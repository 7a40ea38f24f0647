"""Prompt lookup first, a draft model where the context has nothing to copy."""

from __future__ import annotations

from collections.abc import Sequence

from specdecode.drafters.base import Draft, Drafter, StopRule
from specdecode.drafters.model import ModelDrafter
from specdecode.drafters.prompt_lookup import PromptLookupDrafter
from specdecode.errors import InvalidSettingsError
from specdecode.sampling import TokenSampler
from specdecode.verify import Verdict


class LookupThenModelDrafter(Drafter):
    """Drafts by copying from the context where its last n-gram occurred before, else with a
    draft model.

    Copy-heavy work (summaries, answers from retrieved text, code edits) repeats long spans of
    the prompt: there prompt lookup drafts them for nothing, and often further than a draft
    model would be trusted. Elsewhere it finds nothing (or only a chance one-token match), and a
    draft model does better. This drafter asks ``lookup`` first and takes its draft when the
    match is at least ``min_ngram`` tokens long; otherwise ``model`` drafts. The draft model
    catches up on the tokens it did not draft at its next draft (one pass over them).

    Like every drafter it changes speed only: the target verifies every token.
    """

    name = "lookup+draft-model"

    def __init__(self, model: ModelDrafter, lookup: PromptLookupDrafter) -> None:
        if lookup.min_ngram < 2:
            raise InvalidSettingsError(
                "beside a draft model, prompt lookup should copy only after a match of at least "
                f"2 tokens (a 1-token match is mostly chance), got min_ngram={lookup.min_ngram}: "
                "pass --ngram-min 2 or more"
            )
        self.model = model
        self.lookup = lookup
        self.lookup_drafts = 0  # drafts of this sequence that prompt lookup made
        self.model_drafts = 0

    def begin(self, prompt_ids: Sequence[int]) -> None:
        self.model.begin(prompt_ids)
        self.lookup.begin(prompt_ids)
        self.lookup_drafts = self.model_drafts = 0

    def reserve(self, positions: int) -> None:
        self.model.reserve(positions)

    def propose(
        self,
        ids: Sequence[int],
        max_tokens: int,
        sampler: TokenSampler,
        stop: StopRule | None = None,
    ) -> Draft:
        copied = self.lookup.propose(ids, max_tokens, sampler, stop)
        if copied.tokens:
            self.lookup_drafts += 1
            return copied
        self.model_drafts += 1
        return self.model.propose(ids, max_tokens, sampler, stop)

    def observe(self, verdict: Verdict) -> None:
        self.model.observe(verdict)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "model": self.model.describe(), "lookup": self.lookup.describe()}
