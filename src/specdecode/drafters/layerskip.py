"""Self-speculation: the target drafts for itself with some sublayers skipped (Draft & Verify).

Zhang et al. (2024), "Draft & Verify: Lossless Large Language Model Acceleration via
Self-Speculative Decoding". One model is in memory and one KV cache: the drafter is bound to the
target's :class:`~specdecode.models.ModelSession` and drafts on it inside
:func:`~specdecode.models.layerskip.skip_layers`, attending to the target's own keys and values
for every verified position. Whatever the draft appended is rolled back before it returns, so
the loop's verification pass sees the cache exactly as the target left it.

Drafting stops early when the draft's top probability falls below a threshold; with
``adaptive=True`` the threshold follows the acceptance rate (Draft & Verify's adaptive
draft-exiting, Section 3.3 of the paper).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from specdecode.drafters.base import Draft, Drafter, StopRule, draft_probabilities
from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel, ModelSession, Session
from specdecode.models.layerskip import SkipSet, check_supported, skip_layers
from specdecode.models.timing import synchronize
from specdecode.sampling import TokenSampler
from specdecode.verify import Verdict


@dataclass
class DraftExit:
    """When to stop drafting: the draft's top probability below ``threshold`` (gamma).

    With ``adaptive``, after each round (Draft & Verify, adaptive draft-exiting)::

        rate      <- rate_smoothing * rate + (1 - rate_smoothing) * accepted / drafted
        proposal  =  gamma + step   if rate < target_acceptance
                     gamma          if rate >= target and the round drafted the full k
                     gamma - step   otherwise
        gamma     <- threshold_smoothing * gamma + (1 - threshold_smoothing) * proposal

    so a low acceptance rate raises the bar (shorter, safer drafts) and a high one lowers it.
    Defaults are the paper's. ``threshold=None`` never stops early: always k tokens.
    """

    threshold: float | None = 0.8  # gamma_0; None: fixed k
    adaptive: bool = True
    target_acceptance: float = 0.9  # alpha the threshold steers towards
    step: float = 0.01  # epsilon
    rate_smoothing: float = 0.5  # beta_1
    threshold_smoothing: float = 0.9  # beta_2
    gamma: float = field(init=False, default=0.0)  # the current threshold
    rate: float = field(init=False, default=0.0)  # smoothed acceptance rate

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 <= self.threshold < 1:
            raise InvalidSettingsError(
                f"the draft-exit threshold must be in [0, 1), got {self.threshold}"
            )
        if not 0 < self.target_acceptance <= 1:
            raise InvalidSettingsError(
                f"the target acceptance rate must be in (0, 1], got {self.target_acceptance}"
            )
        self.reset()

    def reset(self) -> None:
        self.gamma = self.threshold if self.threshold is not None else 0.0
        self.rate = 0.0

    def stop(self, top_probability: float) -> bool:
        """Whether to stop after a token the draft was this sure of."""
        return self.threshold is not None and top_probability < self.gamma

    def update(self, accepted: int, drafted: int, full_length: bool) -> None:
        """Adapt gamma after a round that drafted ``drafted`` tokens and kept ``accepted``."""
        if not self.adaptive or self.threshold is None or drafted == 0:
            return
        self.rate = self.rate_smoothing * self.rate + (1 - self.rate_smoothing) * accepted / drafted
        if self.rate < self.target_acceptance:
            proposal = self.gamma + self.step
        elif full_length:
            proposal = self.gamma
        else:
            proposal = self.gamma - self.step
        beta = self.threshold_smoothing
        self.gamma = min(max(beta * self.gamma + (1 - beta) * proposal, 0.0), 1.0)

    def settings(self) -> dict[str, object]:
        """The constructor arguments (what a skip profile stores)."""
        out = asdict(self)
        del out["gamma"], out["rate"]
        return out


class LayerSkipDrafter(Drafter):
    """Drafts with the target model itself, some attention and MLP sublayers skipped.

    Args:
        target: the target model; the drafter runs on the loop's session of it (see :meth:`bind`).
        skip: the sublayers to skip while drafting.
        exit: when to stop a draft before k tokens (default: Draft & Verify's adaptive exit).
    """

    name = "layer-skip"

    def __init__(self, target: LoadedModel, skip: SkipSet, exit: DraftExit | None = None) -> None:
        skip.check(check_supported(target.model))
        self.target = target
        self.skip = skip
        self.exit = exit if exit is not None else DraftExit()
        self.session: ModelSession | None = None
        self._asked = 0  # k of the last proposal

    def bind(self, target: Session) -> None:
        if not isinstance(target, ModelSession):
            raise InvalidSettingsError(
                "layer skipping drafts on the target's dynamic KV cache: load the target with "
                "session_kind='dynamic' (--kv-cache dynamic, the default)"
            )
        if target.model is not self.target.model:
            raise InvalidSettingsError(
                "a layer-skip drafter drafts with its target: build it with the same model "
                "that the generator verifies with"
            )
        if target.lean is not None:
            raise InvalidSettingsError(
                "layer skipping works on transformers' forward, and this target runs the lean "
                "forward: load the target with forward='transformers' (the default)"
            )
        self.session = target

    def begin(self, prompt_ids: Sequence[int], reuse_cache: bool = False) -> None:
        self.exit.reset()

    def propose(
        self,
        ids: Sequence[int],
        max_tokens: int,
        sampler: TokenSampler,
        stop: StopRule | None = None,
    ) -> Draft:
        session = self._bound()
        start = time.perf_counter()
        ids = list(ids)
        self._asked = max_tokens
        feed = session.sync(ids)
        verified = session.length  # positions the target computed; the draft's go past them
        try:
            with skip_layers(session.model, self.skip):
                tokens, dists, confidence = self._draft(
                    session, ids, feed, max_tokens, sampler, stop
                )
        finally:
            session.truncate(verified)
        synchronize(session.device)
        q = torch.stack(dists) if dists else None
        info = {"threshold": self.exit.gamma}
        return Draft(tokens, q, time.perf_counter() - start, info, confidence)

    def _draft(
        self,
        session: ModelSession,
        ids: list[int],
        feed: list[int],
        max_tokens: int,
        sampler: TokenSampler,
        stop: StopRule | None,
    ) -> tuple[list[int], list[torch.Tensor], list[float]]:
        """Up to ``max_tokens`` tokens drawn one by one from the layer-skipped model, their
        distributions and the draft's probability of each."""
        logits = session.forward(feed, 1)[-1]  # (V,)
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        confidence: list[float] = []
        for _ in range(max_tokens):
            scores = sampler.scores(logits[None], ids + tokens, len(ids) + len(tokens))[0]
            choice = sampler.choose(scores)
            tokens.append(choice.token)
            probs = draft_probabilities(scores, choice.probs)
            if choice.probs is not None:
                dists.append(choice.probs)
            confidence.append(float(probs[choice.token]))
            if (
                len(tokens) == max_tokens
                or self.exit.stop(float(probs.max()))
                or (stop is not None and stop(confidence))
            ):
                break
            logits = session.forward([choice.token], 1)[-1]
        return tokens, dists, confidence

    def observe(self, verdict: Verdict) -> None:
        full = verdict.num_drafted >= self._asked
        self.exit.update(verdict.num_accepted, verdict.num_drafted, full)

    def _bound(self) -> ModelSession:
        if self.session is None:
            raise InvalidSettingsError(
                "the layer-skip drafter is not bound to a target session: pass it to "
                "SpeculativeGenerator, which binds it (or call drafter.bind(session))"
            )
        return self.session

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model": self.target.name,
            "skip_attention": list(self.skip.attention),
            "skip_mlp": list(self.skip.mlp),
            **self.exit.settings(),
        }
