"""A separate, smaller model that shares the target's tokenizer."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from specdecode.drafters.base import Draft, Drafter, StopRule, draft_probabilities
from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel
from specdecode.models.costs import can_pad
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
        on_device: draft a greedy round's tokens on the device and read them back once
            (:meth:`~specdecode.models.session.SequenceSession.greedy_extend`) instead of once
            per token, where nothing can end the draft early (no confidence threshold, no stop
            rule from the length schedule, no repetition penalty); the same tokens. None: on a
            CUDA device, where the GPU then never waits for the host between draft steps.
    """

    name = "draft-model"

    def __init__(
        self,
        draft: LoadedModel,
        confidence_threshold: float | None = None,
        prompt_window: int | None = None,
        on_device: bool | None = None,
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
        self.on_device = self.session.device.type == "cuda" if on_device is None else on_device
        self._skip = 0  # leading tokens of the sequence the draft does not read
        self._first = True  # no draft made yet in this sequence

    def begin(self, prompt_ids: Sequence[int], reuse_cache: bool = False) -> None:
        # with reuse_cache the first draft's sync keeps the common prefix, where the cache can
        # be cut back that far (not a sliding-window layer)
        if not (reuse_cache and can_pad(self.session.cache)):
            self.session.reset()
        window = self.prompt_window
        self._skip = max(0, len(prompt_ids) - window) if window is not None else 0
        self._first = True

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
        reads_prompt, self._first = self._first, False  # the sequence's first draft: its prefill
        logits = self.session.forward(self.session.sync(ids[self._skip :]), 1)[-1]
        prefill_seconds = 0.0
        if reads_prompt:
            synchronize(self.session.device)
            prefill_seconds = time.perf_counter() - start
        if self._drafts_on_device(sampler, stop):
            run = self.session.greedy_extend(logits, max_tokens, confidence=True)
            tokens, q, confidence = run.tokens, None, run.confidence
        else:
            tokens, q, confidence = self._draft_on_host(ids, logits, max_tokens, sampler, stop)
        synchronize(self.session.device)
        seconds = time.perf_counter() - start
        return Draft(tokens, q, seconds, confidence=confidence, prefill_seconds=prefill_seconds)

    def _draft_on_host(
        self,
        ids: list[int],
        logits: torch.Tensor,
        max_tokens: int,
        sampler: TokenSampler,
        stop: StopRule | None,
    ) -> tuple[list[int], torch.Tensor | None, list[float]]:
        """Choose each token on the host (the sampler's processors, sampling, a confidence
        that may end the draft), feeding it before choosing the next: tokens, q, confidence."""
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
        return tokens, torch.stack(dists) if dists else None, confidence

    def _drafts_on_device(self, sampler: TokenSampler, stop: StopRule | None) -> bool:
        """Whether this round's draft is chosen on the device: greedy on the raw logits, and
        nothing that ends a draft after a token (each such decision needs the host)."""
        return (
            self.on_device
            and sampler.plain_argmax
            and stop is None
            and self.confidence_threshold is None
        )

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
            "on_device": self.on_device,
        }
