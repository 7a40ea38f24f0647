"""A separate, smaller model that shares the target's tokenizer."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from specdecode.drafters.base import Draft, Drafter
from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel, ModelSession
from specdecode.models.timing import synchronize
from specdecode.sampling import TokenSampler


class ModelDrafter(Drafter):
    """Drafts autoregressively with a small model, keeping its own KV cache between rounds.

    Args:
        draft: the draft model (already checked to share the target's vocabulary).
        confidence_threshold: stop drafting early once the draft's probability of the token it
            just chose falls below this value (transformers' ``assistant_confidence_threshold``);
            None drafts the full k.
    """

    name = "draft-model"

    def __init__(self, draft: LoadedModel, confidence_threshold: float | None = None) -> None:
        if confidence_threshold is not None and not 0 <= confidence_threshold < 1:
            raise InvalidSettingsError(
                f"the confidence threshold must be in [0, 1), got {confidence_threshold}"
            )
        self.draft = draft
        self.confidence_threshold = confidence_threshold
        self.session = ModelSession(draft.model)

    def begin(self, prompt_ids: Sequence[int]) -> None:
        self.session.reset()

    def propose(self, ids: Sequence[int], max_tokens: int, sampler: TokenSampler) -> Draft:
        start = time.perf_counter()
        ids = list(ids)
        logits = self.session.forward(self.session.sync(ids), 1)[-1]
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        for i in range(max_tokens):
            scores = sampler.scores(logits[None], ids + tokens, len(ids) + len(tokens))[0]
            choice = sampler.choose(scores)
            tokens.append(choice.token)
            if choice.probs is not None:
                dists.append(choice.probs)
            if self._unsure(choice.token, logits, choice.probs) or i == max_tokens - 1:
                break
            logits = self.session.forward([choice.token], 1)[-1]
        synchronize(self.session.device)
        q = torch.stack(dists) if dists else None
        return Draft(tokens=tokens, q=q, seconds=time.perf_counter() - start)

    def _unsure(self, token: int, logits: torch.Tensor, probs: torch.Tensor | None) -> bool:
        if self.confidence_threshold is None:
            return False
        p = probs if probs is not None else torch.softmax(logits.float(), dim=-1)
        return float(p[token]) < self.confidence_threshold

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model": self.draft.name,
            "confidence_threshold": self.confidence_threshold,
        }
