"""Turning processed scores into tokens: three small pure functions with explicit randomness."""

from __future__ import annotations

import torch


def to_probs(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension in float32: (N, V) scores -> (N, V) probabilities."""
    return torch.softmax(scores.float(), dim=-1)


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dimension: (N, V) -> (N,). The first index wins a tie, as in torch."""
    return scores.argmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from ``probs`` (N, V) -> (N,), using ``generator`` for randomness."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
