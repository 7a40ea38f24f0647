"""A separate, smaller model that shares the target's tokenizer."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from specdecode.drafters.base import Draft, Drafter, StopRule, draft_probabilities
from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel
from specdecode.models.timing import synchronize
from specdecode.sampling import TokenSampler


class ModelDrafter(Drafter):
    """Drafts autoregressively with a small model, keeping its own KV cache between rounds.

    Args:
        draft: the draft model (already checked to share the target's vocabulary).
        confidence_threshold: stop drafting early once the draft's probability of the token it
            just chose falls below this value (transformers' ``assistant_confidence_threshold``);
            None drafts the full k.
        prompt_window: the draft reads only the last ``prompt_window`` tokens of each prompt
            (and everything generated after it), so that its prefill of a long prompt costs
            less; None reads the whole prompt. Lossless either way: only acceptance changes.
    """

    name = "draft-model"

    def __init__(
        self,
        draft: LoadedModel,
        confidence_threshold: float | None = None,
        prompt_window: int | None = None,
    ) -> None:
        if confidence_threshold is not None and not 0 <= confidence_threshold < 1:
            raise InvalidSettingsError(
                f"the confidence threshold must be in [0, 1), got {confidence_threshold}"
            )
        if prompt_window is not None and prompt_window < 1:
            raise InvalidSettingsError(
                f"the draft's prompt window must be at least 1 token, got {prompt_window}"
            )
        self.draft = draft
        self.confidence_threshold = confidence_threshold
        self.prompt_window = prompt_window
        self.session = draft.new_session()
        self._skip = 0  # leading tokens of the sequence the draft does not read

    def begin(self, prompt_ids: Sequence[int]) -> None:
        self.session.reset()
        window = self.prompt_window
        self._skip = max(0, len(prompt_ids) - window) if window is not None else 0

    def reserve(self, positions: int) -> None:
        self.session.reserve(positions)

    def propose(
        self,
        ids: Sequence[int],
        max_tokens: int,
        sampler: TokenSampler,
        stop: StopRule | None = None,
    ) -> Draft:
        start = time.perf_counter()
        ids = list(ids)
        reads_prompt = self.session.length == 0  # the sequence's first draft: its prefill
        logits = self.session.forward(self.session.sync(ids[self._skip :]), 1)[-1]
        prefill_seconds = 0.0
        if reads_prompt:
            synchronize(self.session.device)
            prefill_seconds = time.perf_counter() - start
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        confidence: list[float] = []
        for _ in range(max_tokens):
            scores = sampler.scores(logits[None], ids + tokens, len(ids) + len(tokens))[0]
            choice = sampler.choose(scores)
            tokens.append(choice.token)
            if choice.probs is not None:
                dists.append(choice.probs)
            confidence.append(float(draft_probabilities(scores, choice.probs)[choice.token]))
            if len(tokens) == max_tokens or self._ends(confidence, stop):
                break
            logits = self.session.forward([choice.token], 1)[-1]
        synchronize(self.session.device)
        q = torch.stack(dists) if dists else None
        seconds = time.perf_counter() - start
        return Draft(tokens, q, seconds, confidence=confidence, prefill_seconds=prefill_seconds)

    def _ends(self, confidence: list[float], stop: StopRule | None) -> bool:
        """Whether the draft ends after its latest token: unsure of it, or ``stop`` says so."""
        threshold = self.confidence_threshold
        unsure = threshold is not None and confidence[-1] < threshold
        return unsure or (stop is not None and stop(confidence))

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model": self.draft.name,
            "forward": self.draft.forward_name,
            "confidence_threshold": self.confidence_threshold,
            "prompt_window": self.prompt_window,
        }
