"""A token sampler whose choices depend only on the seed, the output position and the scores.

:class:`SeededSampler` has :class:`TokenSampler`'s interface (``scores`` then ``choose``), so any
drafter that draws with a ``TokenSampler`` draws with it unchanged, and in doing so uses the same
Gumbel noise as the target (coupling): see :mod:`specdecode.sampling.gumbel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specdecode.sampling.gumbel import gumbel_argmax
from specdecode.sampling.sample import to_probs
from specdecode.sampling.sampler import Choice, TokenSampler


@dataclass(kw_only=True)
class SeededSampler(TokenSampler):
    """Chooses the token at output position t as argmax(scores + G(seed, t, ·)).

    The position is counted from the first generated token: the token that follows a prefix of
    ``n`` ids (prompt included) has position ``n - prompt_length``. :meth:`choose` picks the token
    that follows the last row given to :meth:`scores`, which is how a drafter asks for its next
    token (``choose(scores(logits[None], ids, len(ids))[0])``); pass ``position`` to override.
    ``generator`` is unused when sampling: every draw comes from the counter-based noise.
    """

    seed: int  # the generation's seed (taken modulo 2^64)
    prompt_length: int  # ids before the first generated token
    _prefix: int = field(default=0, init=False, repr=False)  # ids before the last scored row

    def __post_init__(self) -> None:
        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {self.prompt_length}")

    def position(self, prefix_length: int) -> int:
        """The output position of the token that follows ``prefix_length`` ids."""
        t = prefix_length - self.prompt_length
        if t < 0:
            raise ValueError(
                f"a prefix of {prefix_length} ids ends inside the prompt of "
                f"{self.prompt_length}: seeded choices exist only for generated positions"
            )
        return t

    def scores(self, logits: torch.Tensor, ids: Sequence[int], first: int) -> torch.Tensor:
        """As :meth:`TokenSampler.scores`; also notes the position of the last row's token."""
        out = super().scores(logits, ids, first)
        self._prefix = first + logits.shape[0] - 1
        return out

    def choose(self, scores: torch.Tensor, position: int | None = None) -> Choice:
        """The seeded choice from processed ``scores`` (V,) at ``position`` (default: the one
        noted by the last :meth:`scores` call). Greedy settings choose the argmax as usual."""
        if self.greedy:
            return super().choose(scores)
        t = self.position(self._prefix) if position is None else position
        token = gumbel_argmax(scores[None], self.seed, torch.tensor([t]))
        return Choice(int(token[0]), to_probs(scores))
