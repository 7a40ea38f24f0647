"""Seeded sampling, pure core: the counter-based noise, the Gumbel-max sample, the coupling, the
matching rule and the seeded sampler (no models)."""

from __future__ import annotations

from decimal import Decimal, getcontext

import pytest
import torch
from scipy.stats import binomtest, chisquare, kstest

from specdecode.decoding.config import resolve_sampling_mode
from specdecode.errors import InvalidSettingsError
from specdecode.sampling import SamplingSettings, SeededSampler, TokenSampler
from specdecode.sampling import gumbel as gm
from specdecode.sampling.gumbel import gumbel_argmax, gumbel_from_bits, gumbel_noise, uniform_bits
from specdecode.verify import greedy_verify, seeded_verify

M64 = (1 << 64) - 1


def _mix_ref(z: int) -> int:
    z = ((z ^ (z >> 30)) * gm.MIX1) & M64
    z = ((z ^ (z >> 27)) * gm.MIX2) & M64
    return z ^ (z >> 31)


def _bits_ref(seed: int, t: int, x: int) -> int:
    """The definition of the noise in plain Python integers (unsigned 64-bit arithmetic)."""
    key = _mix_ref((_mix_ref((seed ^ gm.DOMAIN) & M64) + (t + 1) * gm.GAMMA) & M64)
    return _mix_ref((key + (x + 1) * gm.GAMMA) & M64) >> 11


def test_torch_hash_equals_the_integer_definition():
    gen = torch.Generator().manual_seed(0)
    seeds = [0, 1, -1, 2**63 - 1, 2**63 + 5, 2**64 - 1, 987654321]
    for seed in seeds:
        t = torch.randint(0, 100_000, (64,), generator=gen)
        x = torch.randint(0, 200_000, (64,), generator=gen)
        got = uniform_bits(seed, t, x).tolist()
        want = [_bits_ref(seed, int(a), int(b)) for a, b in zip(t, x, strict=True)]
        assert got == want


def test_pinned_values_never_change():
    """Changing these changes every seeded output users have recorded: never do it silently."""
    pinned = {
        (0, 0, 0): 529568831537070,
        (12345, 7, 100): 8549949555068922,
        (2**63 + 5, 3, 151935): 8287870730218878,
        (-1, 0, 5): 4453927089846037,
    }
    for (seed, t, x), bits in pinned.items():
        assert int(uniform_bits(seed, torch.tensor([t]), torch.tensor([x]))[0]) == bits
    g = float(gumbel_noise(0, torch.tensor([0]), torch.tensor([0]))[0])
    assert g == pytest.approx(-float.fromhex("0x1.0aa5942b0ac14p+0"), abs=1e-12)


def test_gumbel_is_accurate_to_float_precision_even_at_the_extremes():
    """u = (m + 1/2) / 2^53 lies strictly inside (0, 1) and G = -log(-log u) is correct to a
    few ulps for every m, including both tails (checked against 50-digit decimal arithmetic)."""
    getcontext().prec = 50
    top = (1 << 53) - 1
    edges = [0, 1, 12345, (1 << 52) - 1, 1 << 52, top - 12345, top - 1, top]
    g = gumbel_from_bits(torch.tensor(edges))
    for m, got in zip(edges, g.tolist(), strict=True):
        u = (Decimal(m) + Decimal("0.5")) / Decimal(2**53)
        assert 0 < u < 1
        want = float(-((-(u.ln())).ln()))
        assert got == pytest.approx(want, rel=1e-14, abs=1e-15)
    assert float(g.max()) < 38.0 and float(g.min()) > -4.0


def test_noise_is_standard_gumbel():
    positions = torch.arange(200)[:, None]
    tokens = torch.arange(500)[None, :]
    g = gumbel_noise(2024, positions, tokens).flatten().numpy()
    assert kstest(g, "gumbel_r").pvalue > 1e-3
    assert g.mean() == pytest.approx(0.5772156649, abs=0.01)  # Euler-Mascheroni


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = int(counts.sum())
    keep = probs * n >= 5
    observed = [*counts[keep].tolist(), int(counts[~keep].sum())]
    expected = [*(probs[keep] * n).tolist(), float(probs[~keep].sum() * n)]
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    scale = sum(observed) / sum(expected)  # float rounding only
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


P = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0])  # the last token is removed (-inf)


@pytest.mark.parametrize("seed", [0, 2**62 + 3])
def test_gumbel_argmax_reproduces_p(seed):
    n = 30_000
    scores = P.log().expand(n, -1) + 3.0  # any constant shift: scores are logits, not log p
    tokens = gumbel_argmax(scores, seed, torch.arange(n))
    counts = torch.bincount(tokens, minlength=P.numel())
    assert int(counts[-1]) == 0
    assert _chi2_pvalue(counts, P) > 1e-3


def test_positions_are_independent():
    """(token at t, token at t+1) over many t follows p x p: a sequence is exactly p's."""
    n = 30_000
    tokens = gumbel_argmax(P.log().expand(2 * n, -1), 5, torch.arange(2 * n)).view(n, 2)
    pairs = torch.bincount(tokens[:, 0] * 7 + tokens[:, 1], minlength=49)
    assert _chi2_pvalue(pairs, torch.outer(P, P).flatten()) > 1e-3


def test_adjacent_seeds_are_independent():
    """Seeds 2i and 2i + 1 (at the same positions) give independent samples of p."""
    pairs_of_seeds, positions = 400, torch.arange(50)
    scores = P.log().expand(positions.numel(), -1)
    first = torch.cat([gumbel_argmax(scores, 2 * i, positions) for i in range(pairs_of_seeds)])
    second = torch.cat([gumbel_argmax(scores, 2 * i + 1, positions) for i in range(pairs_of_seeds)])
    assert _chi2_pvalue(torch.bincount(first, minlength=7), P) > 1e-3
    pairs = torch.bincount(first * 7 + second, minlength=49)
    assert _chi2_pvalue(pairs, torch.outer(P, P).flatten()) > 1e-3


def test_sparse_and_dense_paths_agree(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 3000, generator=gen) * 2
    scores[:, 40:] = float("-inf")  # few survivors: the sparse path
    scores[1, :3] = float("-inf")
    scores[2, 5:] = float("-inf")  # rows with different numbers of survivors
    sparse = gumbel_argmax(scores, 9, torch.arange(5))
    monkeypatch.setattr(gm, "_SPARSE_BELOW", 0)
    assert torch.equal(gumbel_argmax(scores, 9, torch.arange(5)), sparse)
    assert int(sparse[2]) < 5 and all(int(t) < 40 for t in sparse)
    scores[3] = float("-inf")
    with pytest.raises(ValueError, match="no finite"):
        gumbel_argmax(scores, 9, torch.arange(5))


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p - q).abs().sum() / 2)


def test_coupling_matches_often_and_is_exact_for_equal_distributions():
    """Draft and target share the noise: equal distributions always agree, close ones at least
    (1 - TV) / (1 + TV) of the time (Daliri, Musco & Suresh 2024)."""
    n = 20_000
    gen = torch.Generator().manual_seed(3)
    p_logits = torch.randn(50, generator=gen)
    q_logits = p_logits + 0.5 * torch.randn(50, generator=gen)
    positions = torch.arange(n)
    target = gumbel_argmax(p_logits.expand(n, -1), 11, positions)
    assert torch.equal(gumbel_argmax((p_logits - 1.0).expand(n, -1), 11, positions), target)
    draft = gumbel_argmax(q_logits.expand(n, -1), 11, positions)
    tv = _tv(p_logits.softmax(-1), q_logits.softmax(-1))
    matches = int((draft == target).sum())
    assert binomtest(matches, n, (1 - tv) / (1 + tv), alternative="less").pvalue > 1e-3
    assert matches / n <= 1 - tv + 0.02  # never better than the optimal coupling


def test_noise_does_not_depend_on_vocabulary_size():
    """A draft whose embedding matrix is padded larger chooses with the same noise."""
    logits = torch.randn(64, generator=torch.Generator().manual_seed(4))
    padded = torch.cat([logits, torch.full((36,), float("-inf"))])
    positions = torch.arange(300)
    assert torch.equal(
        gumbel_argmax(logits.expand(300, -1), 1, positions),
        gumbel_argmax(padded.expand(300, -1), 1, positions),
    )


# ---------------------------------------------------------------------------- matching rule
def test_seeded_verify_is_matching_against_the_seeded_choices():
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(5, 30, generator=gen)  # k = 4
    choice = gumbel_argmax(scores, 21, torch.arange(10, 15))
    everything = seeded_verify(choice[:4], scores, 21, 10)
    assert (everything.num_accepted, everything.next_token) == (4, int(choice[4]))
    wrong = choice[:4].clone()
    wrong[2] = (wrong[2] + 1) % 30
    verdict = seeded_verify(wrong, scores, 21, 10)
    assert (verdict.num_accepted, verdict.next_token) == (2, int(choice[2]))
    assert verdict == greedy_verify(wrong, choice)
    beyond = seeded_verify(torch.tensor([999]), scores[:2], 21, 10)  # an id the target lacks
    assert (beyond.num_accepted, beyond.next_token) == (0, int(choice[0]))
    empty = seeded_verify(torch.tensor([], dtype=torch.long), scores[:1], 21, 10)
    assert (empty.num_accepted, empty.next_token, empty.num_drafted) == (0, int(choice[0]), 0)
    with pytest.raises(ValueError, match="rows"):
        seeded_verify(choice[:4], scores[:4], 21, 10)


# ---------------------------------------------------------------------------- seeded sampler
SAMPLING = SamplingSettings(do_sample=True, temperature=0.9, top_k=0)


def test_seeded_sampler_chooses_at_the_position_after_the_last_row():
    sampler = SeededSampler(SAMPLING, None, seed=8, prompt_length=3)
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(2))
    ids = list(range(10))
    scores = sampler.scores(logits, ids, 5)  # rows follow 5..8 ids: positions 2..5
    want = gumbel_argmax(scores, 8, torch.arange(2, 6))
    choice = sampler.choose(scores[-1])
    assert choice.token == int(want[-1])
    assert choice.probs is not None and torch.allclose(choice.probs, scores[-1].softmax(-1))
    assert sampler.choose(scores[0], position=2).token == int(want[0])
    single = sampler.scores(logits[:1], ids, 3)  # the first generated token: position 0
    assert sampler.choose(single[0]).token == int(gumbel_argmax(single, 8, torch.tensor([0]))[0])
    inside = sampler.scores(logits[:1], ids, 2)  # scoring the prompt is allowed, choosing not
    with pytest.raises(ValueError, match="prompt"):
        sampler.choose(inside[0])


def test_seeded_sampler_ignores_the_generator_and_keeps_greedy():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(5))
    tokens = set()
    for g in range(5):
        sampler = SeededSampler(SAMPLING, torch.Generator().manual_seed(g), seed=1, prompt_length=0)
        tokens.add(sampler.choose(sampler.scores(logits, [], 0)[0]).token)
    assert len(tokens) == 1
    greedy = SamplingSettings()
    seeded = SeededSampler(greedy, None, seed=1, prompt_length=0)
    plain = TokenSampler(greedy)
    assert seeded.choose(logits[0]) == plain.choose(logits[0])


def test_sampling_mode_resolution():
    assert resolve_sampling_mode(None, seed_given=True) == "seeded"
    assert resolve_sampling_mode("auto", seed_given=False) == "rejection"
    assert resolve_sampling_mode("rejection", seed_given=True) == "rejection"
    assert resolve_sampling_mode("seeded", seed_given=False) == "seeded"
    with pytest.raises(InvalidSettingsError, match="seeded"):
        resolve_sampling_mode("gumbel", seed_given=True)
