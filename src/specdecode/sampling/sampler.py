"""A token sampler: sampling settings plus one explicit random generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from specdecode.sampling.processors import process_logits
from specdecode.sampling.sample import greedy, sample, to_probs
from specdecode.sampling.settings import SamplingSettings


@dataclass(frozen=True)
class Choice:
    """One chosen token and, when sampling, the distribution it was drawn from."""

    token: int
    probs: torch.Tensor | None  # (V,) processed distribution; None for greedy


class TokenConstraint(Protocol):
    """Which tokens may follow a prefix (a grammar: :mod:`specdecode.constraints`)."""

    def allowed(self, ids: Sequence[int], first: int, rows: int) -> torch.Tensor:
        """Masks (rows, V), True where allowed; row i follows ``ids[: first + i]``."""
        ...  # pragma: no cover - a protocol

    def valid_prefix(self, ids: Sequence[int], tokens: Sequence[int]) -> int:
        """How many of ``tokens``, following ``ids``, are allowed in a row."""
        ...  # pragma: no cover - a protocol


@dataclass
class TokenSampler:
    """Applies :class:`SamplingSettings` to logits and picks tokens with ``generator``."""

    settings: SamplingSettings
    generator: torch.Generator | None = None
    prompt_length: int = 0  # ids before the first generated one (presence/frequency count after)
    constraint: TokenConstraint | None = None  # tokens outside it get -inf before truncation

    @property
    def greedy(self) -> bool:
        return self.settings.greedy

    @property
    def plain_argmax(self) -> bool:
        """Whether the choice is the argmax of the raw logits (greedy, nothing processing
        them), which the device can make without the host (``Session.greedy_extend``)."""
        return self.greedy and not self.settings.shifts_logits and self.constraint is None

    def scores(self, logits: torch.Tensor, ids: Sequence[int], first: int) -> torch.Tensor:
        """Processed scores (N, V) for logits (N, V) whose row i follows ``ids[: first + i]``."""
        seen = generated = None
        rows = range(logits.shape[0])
        if self.settings.repetition_penalty != 1.0:
            seen = [torch.tensor(ids[: first + i], dtype=torch.long) for i in rows]
        if self.settings.presence_penalty != 0.0 or self.settings.frequency_penalty != 0.0:
            start = min(self.prompt_length, first)
            generated = [torch.tensor(ids[start : first + i], dtype=torch.long) for i in rows]
        allowed = None
        if self.constraint is not None:
            allowed = _fit(self.constraint.allowed(ids, first, logits.shape[0]), logits)
        return process_logits(logits, seen, self.settings, generated, allowed)

    def choose(self, scores: torch.Tensor) -> Choice:
        """Pick one token from processed ``scores`` (V,)."""
        if self.greedy:
            return Choice(int(greedy(scores)), None)
        probs = to_probs(scores)
        return Choice(int(sample(probs[None].to(self._gen_device()), self.generator)[0]), probs)

    def _gen_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else torch.device("cpu")


def _fit(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``mask`` (N, V_p: the target's vocabulary) for ``logits`` (N, V) of another width: a draft
    model whose embedding matrix is padded to another size. Ids beyond the target's are not
    allowed (the target has no such token)."""
    width = logits.shape[-1]
    if mask.shape[-1] > width:
        mask = mask[:, :width]
    elif mask.shape[-1] < width:
        pad = torch.zeros(mask.shape[0], width - mask.shape[-1], dtype=torch.bool)
        mask = torch.cat([mask, pad], dim=-1)
    return mask.to(logits.device)
