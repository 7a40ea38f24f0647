"""Verification for seeded sampling: matching against the target's own seeded choices.

In seeded mode (see :mod:`specdecode.sampling.gumbel`) the target's token at output position t
is argmax_x log p_t(x) + G(seed, t, x): a deterministic function of the prefix, exactly as the
argmax is in greedy decoding. Verification is therefore matching: keep drafted tokens while they
equal the target's seeded choice, and at the first difference take the target's choice instead
(the **recovered** token); when all k match, the target's choice after them is the **bonus**
token. The output is the one plain seeded decoding gives, whatever was drafted, so it follows p
exactly (each p_t is sampled by the Gumbel-max trick with noise independent of the prefix).
"""

from __future__ import annotations

import torch

from specdecode.sampling.gumbel import gumbel_argmax
from specdecode.verify.rules import Verdict, greedy_verify


def seeded_verify(
    draft_tokens: torch.Tensor, scores: torch.Tensor, seed: int, first_position: int
) -> Verdict:
    """Keep the longest prefix of the draft that equals the target's seeded choices.

    Args:
        draft_tokens: (k,) drafted token ids (from any drafter; drafts of a coupled drafter
            match more often, but any draft gives the same output).
        scores: (k + 1, V) the target's processed scores; row i chooses the token at output
            position ``first_position + i`` (the last row follows all k drafted tokens).
        seed: the generation's seed.
        first_position: output position of the first drafted token (0 = first generated token).
    """
    rows = scores.shape[0]
    if rows != draft_tokens.numel() + 1:
        raise ValueError(
            f"{draft_tokens.numel()} drafted tokens need {draft_tokens.numel() + 1} "
            f"rows of target scores, got {rows}"
        )
    positions = torch.arange(first_position, first_position + rows)
    target_choice = gumbel_argmax(scores, seed, positions)  # (k + 1,)
    return greedy_verify(draft_tokens.to(target_choice.device), target_choice)
