"""The two verification rules: greedy matching and speculative sampling.

Notation, as in Leviathan et al. (2023) "Fast Inference from Transformers via Speculative
Decoding" and Chen et al. (2023) "Accelerating Large Language Model Decoding with Speculative
Sampling": ``p`` is the target's distribution, ``q`` the drafter's.

For k drafted tokens x_1..x_k the target gives k + 1 distributions p_1..p_{k+1} (one per draft
position, plus one after the last draft token). Definitions used throughout specdecode:

- **accepted** tokens: the longest prefix of the draft that the rule keeps;
- **recovered** token: on the first rejection at position j, a token drawn from
  normalise(max(0, p_j - q_j)) (greedy: the target's argmax at j);
- **bonus** token: when all k drafted tokens are accepted, a token drawn from p_{k+1}.

A round therefore always yields ``num_accepted + 1`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    """Outcome of one verification round."""

    num_accepted: int  # how many drafted tokens were kept (a prefix of the draft)
    next_token: int  # the recovered token (after a rejection) or the bonus token (all accepted)
    num_drafted: int  # k

    @property
    def rejected(self) -> bool:
        """True when the round ended on a rejection rather than with every draft token kept."""
        return self.num_accepted < self.num_drafted


def greedy_verify(
    draft_tokens: torch.Tensor | Sequence[int], target_choice: torch.Tensor
) -> Verdict:
    """Greedy rule: keep the longest prefix where the draft equals the target's own choice.

    Args:
        draft_tokens: (k,) drafted token ids (a list spares a read back from the device).
        target_choice: (k + 1,) the target's argmax after each prefix (position i is the target's
            choice for the slot the i-th draft token fills; the last one follows all k).
    """
    choice = target_choice.tolist()  # one read back from the device, not one per decision
    drafted = draft_tokens.tolist() if isinstance(draft_tokens, torch.Tensor) else draft_tokens
    k = len(drafted)
    n = next((i for i in range(k) if drafted[i] != choice[i]), k)
    return Verdict(num_accepted=n, next_token=int(choice[n]), num_drafted=k)


def align_vocab(q: torch.Tensor, size: int) -> torch.Tensor:
    """Pad with zeros or cut ``q`` (..., V_q) to ``size`` columns, so it lines up with ``p``.

    Draft and target embedding matrices may be padded to different sizes although their
    tokenizers agree; ids past the target's size have p = 0 and are always rejected.
    """
    v = q.shape[-1]
    if v == size:
        return q
    if v > size:
        return q[..., :size]
    return torch.nn.functional.pad(q, (0, size - v))


def speculative_sample(
    draft_tokens: torch.Tensor,
    q: torch.Tensor | None,
    p: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

    Accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    draw the recovered token from normalise(max(0, p_i - q_i)); if all k are accepted draw the
    bonus token from p_{k+1}. The output is distributed exactly as p whatever q is.

    Args:
        draft_tokens: (k,) drafted token ids, drawn from q.
        q: (k, V_q) the drafter's distributions, or None for a drafter without probabilities
            (prompt lookup), which counts as q = one-hot on the drafted token.
        p: (k + 1, V) the target's processed distributions.
        generator: source of randomness; the function draws k uniforms then one token.
    """
    k = draft_tokens.numel()
    vocab = p.shape[-1]
    draft_tokens = draft_tokens.to(p.device)
    if k == 0:
        return Verdict(0, _draw(p[0], generator), 0)
    in_vocab = draft_tokens < vocab
    safe_tokens = torch.where(in_vocab, draft_tokens, torch.zeros_like(draft_tokens))
    p_x = p[:k].gather(1, safe_tokens[:, None]).squeeze(1) * in_vocab  # (k,)
    if q is None:
        q_x = torch.ones_like(p_x)
    else:
        q = align_vocab(q.to(p.device, torch.float32), vocab)
        q_x = q.gather(1, safe_tokens[:, None]).squeeze(1)  # (k,)
        q_x = torch.where(in_vocab, q_x, torch.ones_like(q_x))
    r = torch.rand(k, generator=generator, device=generator.device if generator else "cpu")
    accept = r.to(p.device) < p_x / q_x  # P(accept) = min(1, p/q); q_x > 0 since x ~ q
    rejected_at = (~accept).nonzero()
    if rejected_at.numel() == 0:
        return Verdict(k, _draw(p[k], generator), k)
    j = int(rejected_at[0, 0])
    if q is None:
        q_j = torch.zeros_like(p[j])
        if bool(in_vocab[j]):
            q_j[draft_tokens[j]] = 1.0
    else:
        q_j = q[j]
    residual = (p[j] - q_j).clamp_min(0)
    if float(residual.sum()) <= 0:  # p_j == q_j up to rounding: rejection had probability ~0
        residual = p[j]
    return Verdict(j, _draw(residual, generator), k)


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from unnormalised non-negative ``weights`` (V,)."""
    gen_device = generator.device if generator is not None else weights.device
    w = weights.to(gen_device, torch.float32)
    return int(torch.multinomial(w / w.sum(), 1, generator=generator))
