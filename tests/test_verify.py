"""The verification rules: greedy matching, and speculative sampling's exactness (chi-square)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from specdecode.verify import greedy_verify, speculative_sample

V = 8


def test_greedy_accepts_longest_matching_prefix():
    v = greedy_verify(torch.tensor([3, 4, 5]), torch.tensor([3, 4, 6, 1]))
    assert (v.num_accepted, v.next_token, v.rejected) == (2, 6, True)
    v = greedy_verify(torch.tensor([3, 4]), torch.tensor([3, 4, 9]))
    assert (v.num_accepted, v.next_token, v.rejected) == (2, 9, False)
    v = greedy_verify(torch.tensor([], dtype=torch.long), torch.tensor([7]))
    assert (v.num_accepted, v.next_token) == (0, 7)


def _first_token_frequencies(p, q, one_hot_token, n, seed):
    """Frequencies of the first output token of a k=1 round, drafting x ~ q (or a fixed token)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    for _ in range(n):
        if one_hot_token is None:
            x = torch.multinomial(q, 1, generator=gen)
            verdict = speculative_sample(x, q[None], torch.stack([p, p]), gen)
            token = int(x) if verdict.num_accepted == 1 else verdict.next_token
        else:
            x = torch.tensor([one_hot_token])
            verdict = speculative_sample(x, None, torch.stack([p, p]), gen)
            token = one_hot_token if verdict.num_accepted == 1 else verdict.next_token
        counts[token] += 1
    return counts


def _assert_follows(counts, p):
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside p's support was emitted"
    expected = p[support] * counts.sum()
    result = chisquare(counts[support].numpy(), expected.numpy())
    assert result.pvalue > 1e-3, f"chi-square p-value {result.pvalue:.2e}: output does not follow p"


def _dist(seed, zero=()):
    w = torch.rand(V, generator=torch.Generator().manual_seed(seed)) + 0.05
    w[list(zero)] = 0
    return w / w.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_p_and_q(seed):
    p, q = _dist(seed), _dist(100 + seed)
    _assert_follows(_first_token_frequencies(p, q, None, 6000, seed), p)


def test_disjoint_supports():
    p, q = _dist(5, zero=range(4)), _dist(6, zero=range(4, V))
    _assert_follows(_first_token_frequencies(p, q, None, 4000, 5), p)


@pytest.mark.parametrize("token", [0, 3])
def test_one_hot_q_prompt_lookup(token):
    p = _dist(7)
    _assert_follows(_first_token_frequencies(p, None, token, 5000, token), p)


def test_one_hot_q_on_token_outside_p():
    p = _dist(8, zero=[2])
    _assert_follows(_first_token_frequencies(p, None, 2, 3000, 8), p)


def test_second_position_follows_p_given_first_accepted():
    """With k = 2, the second output token must follow p_2 whatever happened at position 1."""
    gen = torch.Generator().manual_seed(11)
    p1, p2, p3 = _dist(20), _dist(21), _dist(22)
    q1, q2 = _dist(23), _dist(24)
    counts = torch.zeros(V)
    for _ in range(6000):
        x1 = torch.multinomial(q1, 1, generator=gen)
        x2 = torch.multinomial(q2, 1, generator=gen)
        draft = torch.cat([x1, x2])
        verdict = speculative_sample(draft, torch.stack([q1, q2]), torch.stack([p1, p2, p3]), gen)
        if verdict.num_accepted >= 1:  # the second token was emitted from slot 2
            second = int(x2) if verdict.num_accepted == 2 else verdict.next_token
            counts[second] += 1
    _assert_follows(counts, p2)


def test_draft_vocab_larger_than_target():
    p = _dist(30)
    q = torch.cat([_dist(31) * 0.5, torch.full((4,), 0.125)])  # draft may propose ids >= V
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(V)
    for _ in range(5000):
        x = torch.multinomial(q, 1, generator=gen)
        verdict = speculative_sample(x, q[None], torch.stack([p, p]), gen)
        counts[int(x) if verdict.num_accepted == 1 else verdict.next_token] += 1
    _assert_follows(counts, p)


def test_identical_p_and_q_always_accepts():
    p = _dist(40)
    gen = torch.Generator().manual_seed(0)
    draft = torch.multinomial(p, 4, replacement=True, generator=gen)
    verdict = speculative_sample(draft, p.expand(4, V), p.expand(5, V), gen)
    assert verdict.num_accepted == 4 and not verdict.rejected
