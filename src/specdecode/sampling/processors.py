"""Logits processors as pure functions, with the semantics of transformers' warpers.

Each function takes ``scores`` of shape ``(N, V)`` (float32 logits, one row per position) and
returns a new tensor; nothing is modified in place. Removed tokens get ``-inf``. The order in
:func:`process_logits` is the order transformers' ``generate`` applies them in.
"""

from __future__ import annotations

import torch

from specdecode.sampling.settings import SamplingSettings

NEG_INF = float("-inf")


def apply_repetition_penalty(
    scores: torch.Tensor, seen_ids: list[torch.Tensor], penalty: float
) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019) as transformers applies it.

    ``seen_ids[i]`` holds every token id before position ``i`` (prompt included). A seen
    token's logit is divided by ``penalty`` when positive and multiplied by it when negative.
    """
    if penalty == 1.0:
        return scores
    out = scores.clone()
    for row, ids in enumerate(seen_ids):
        if ids.numel() == 0:
            continue
        ids = ids.to(out.device)
        picked = out[row].gather(0, ids)
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        out[row].scatter_(0, ids, picked)
    return out


def apply_logit_bias(scores: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """Add ``bias`` (pairs of token id and value, ids distinct) to those tokens' scores in every
    row, as the OpenAI API's ``logit_bias``. Ids beyond the rows' width are skipped (a draft
    model's smaller vocabulary; the decoding loop checks them against the target's first)."""
    width = scores.shape[-1]
    bias = tuple((t, v) for t, v in bias if t < width)
    if not bias:
        return scores
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=scores.device)
    values = torch.tensor([v for _, v in bias], dtype=scores.dtype, device=scores.device)
    out = scores.clone()
    out[:, ids] += values
    return out


def apply_presence_frequency(
    scores: torch.Tensor, generated_ids: list[torch.Tensor], presence: float, frequency: float
) -> torch.Tensor:
    """The OpenAI API's penalties: a token's score loses ``presence`` if it occurs in
    ``generated_ids[i]`` (the tokens generated before position ``i``, prompt excluded) and
    ``frequency`` times the number of its occurrences."""
    if presence == 0.0 and frequency == 0.0:
        return scores
    out = scores.clone()
    for row, ids in enumerate(generated_ids):
        if ids.numel() == 0:
            continue
        tokens, counts = ids.to(out.device).unique(return_counts=True)
        out[row, tokens] -= presence + frequency * counts.to(out.dtype)
    return out


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 1.0:
        return scores
    return scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep tokens whose score is at least the k-th largest (ties at the boundary are kept)."""
    if top_k <= 0:
        return scores
    k = min(top_k, scores.size(-1))
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (N, 1)
    return scores.masked_fill(scores < kth, NEG_INF)


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose cumulative mass is <= 1 - top_p."""
    if top_p >= 1.0:
        return scores
    sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False  # always keep the most likely token
    remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
    return scores.masked_fill(remove, NEG_INF)


def apply_min_p(scores: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's."""
    if min_p is None:
        return scores
    probs = scores.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(remove, NEG_INF)


def process_logits(
    logits: torch.Tensor,
    seen_ids: list[torch.Tensor] | None,
    settings: SamplingSettings,
    generated_ids: list[torch.Tensor] | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply every processor the settings ask for, in transformers' order, the OpenAI API's
    additive ones after the repetition penalty, then a constraint's mask (``allowed``: (N, V),
    True where allowed; a grammar's), before temperature and truncation, so that top-k, top-p
    and min-p choose among allowed tokens.

    ``logits``: (N, V); ``seen_ids``: one 1-D tensor of preceding token ids per row, needed only
    for a repetition penalty; ``generated_ids``: the same without the prompt's, needed only for
    presence and frequency penalties. Returns float32 scores (N, V).
    """
    scores = logits.float()
    if settings.repetition_penalty != 1.0:
        if seen_ids is None:
            raise ValueError("a repetition penalty needs the preceding token ids of every row")
        scores = apply_repetition_penalty(scores, seen_ids, settings.repetition_penalty)
    scores = apply_logit_bias(scores, settings.logit_bias)
    if settings.presence_penalty != 0.0 or settings.frequency_penalty != 0.0:
        if generated_ids is None:
            raise ValueError("presence and frequency penalties need the generated ids of each row")
        scores = apply_presence_frequency(
            scores, generated_ids, settings.presence_penalty, settings.frequency_penalty
        )
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if not settings.do_sample:
        return scores
    scores = apply_temperature(scores, settings.temperature)
    scores = apply_top_k(scores, settings.top_k)
    scores = apply_top_p(scores, settings.top_p)
    return apply_min_p(scores, settings.min_p)
