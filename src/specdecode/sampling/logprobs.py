"""Log-probabilities of chosen tokens under the target's raw distribution (``logprobs``).

The values are ``log_softmax`` of the target's logits as the model gives them, before any
repetition penalty, temperature or truncation: what the model thinks of each token, the same
whatever the sampling settings (vLLM's default, ``raw_logprobs``). A speculative round gets them
from the verification pass that scored the draft, so asking for them costs no extra pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One chosen token's log-probability, and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first

    def to_dict(self) -> dict[str, object]:
        return {
            "token_id": self.token_id,
            "logprob": self.logprob,
            "top": [{"token_id": t, "logprob": lp} for t, lp in self.top],
        }


def token_logprobs(
    logits: torch.Tensor, token_ids: Sequence[int], top: int = 0
) -> list[TokenLogprob]:
    """The log-probability of ``token_ids[i]`` under row ``i`` of ``logits`` (N, V), with the
    ``top`` most likely tokens of that row; rows beyond ``len(token_ids)`` are ignored.

    Raises ValueError when there are fewer rows than tokens, or ``top`` is negative.
    """
    n = len(token_ids)
    if n == 0:
        return []
    if logits.dim() != 2 or logits.shape[0] < n:
        raise ValueError(f"need one row of logits per token: {n} tokens, logits {logits.shape}")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    logp = torch.log_softmax(logits[:n].float(), dim=-1)
    index = torch.tensor(list(token_ids), dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, index[:, None])[:, 0].tolist()
    if top == 0:
        return [TokenLogprob(int(t), float(lp)) for t, lp in zip(token_ids, chosen, strict=True)]
    best = logp.topk(min(top, logp.shape[1]), dim=-1)
    values, ids = best.values.tolist(), best.indices.tolist()
    return [
        TokenLogprob(int(t), float(lp), tuple(zip(row_ids, row_values, strict=True)))
        for t, lp, row_ids, row_values in zip(token_ids, chosen, ids, values, strict=True)
    ]
