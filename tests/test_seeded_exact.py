"""Seeded sampling is exact: over many seeds, the first two tokens generated with a coupled
draft follow the target's own distribution (computed independently with transformers' warpers),
and the samples of different seeds are independent (chi-square, fixed seeds)."""

from __future__ import annotations

from collections import Counter

import torch
from scipy.stats import binomtest, chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from specdecode import ModelDrafter, SpeculativeGenerator
from specdecode.decoding import sample_seed

PROMPT = "def add(a, b):\n    return a + b\ndef add"
CFG = {"temperature": 1.4, "top_k": 6}
N = 1000
BASE_SEED = 20240


@torch.no_grad()
def _exact(model, ids: list[int]) -> tuple[dict[int, float], dict[tuple[int, int], float]]:
    """p(t1 | prompt) and P(t1, t2) under the warped distributions."""
    warp = LogitsProcessorList([TemperatureLogitsWarper(CFG["temperature"]), TopKLogitsWarper(6)])

    def dist(seq: list[int]) -> torch.Tensor:
        x = torch.tensor([seq])
        return torch.softmax(warp(x, model(x).logits[:, -1, :].float()), dim=-1)[0]

    p1 = dist(ids)
    first = {t: float(p1[t]) for t in p1.nonzero().flatten().tolist()}
    joint = {}
    for t1, p in first.items():
        p2 = dist([*ids, t1])
        for t2 in p2.nonzero().flatten().tolist():
            joint[(t1, t2)] = p * float(p2[t2])
    return first, joint


def _pvalue(counts: Counter, probs: dict) -> float:
    """Chi-square of ``counts`` against ``probs``; cells expected below 5 are merged."""
    assert sum(c for key, c in counts.items() if key not in probs) == 0, "outside the support"
    n = sum(counts.values())
    observed, expected, rest_o, rest_e = [], [], 0, 0.0
    for key, p in probs.items():
        if p * n >= 5:
            observed.append(counts[key])
            expected.append(p * n)
        else:
            rest_o, rest_e = rest_o + counts[key], rest_e + p * n
    if rest_e > 0:
        observed.append(rest_o)
        expected.append(rest_e)
    scale = sum(observed) / sum(expected)
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


def test_two_tokens_follow_the_target_and_seeds_are_independent(tiny):
    target = tiny("llama")
    ids = target.tokenizer(PROMPT)["input_ids"]
    generator = SpeculativeGenerator(target, ModelDrafter(tiny("llama", "perturbed")), 1)
    samples, drafted, accepted = [], 0, 0
    for i in range(N):  # the seeds `-n N --seed BASE_SEED` gives
        result = generator.generate(  # 3 tokens: the prefill's, then a round drafting one
            ids, max_new_tokens=3, eos_token_id=[], seed=sample_seed(BASE_SEED, i), **CFG
        )
        samples.append(tuple(result.token_ids[:2]))
        drafted, accepted = drafted + result.stats.drafted, accepted + result.stats.accepted
    assert drafted == N and 0 < accepted < N, "the second token must come from verification"

    first, joint = _exact(target.model, ids)
    assert _pvalue(Counter(samples), joint) > 1e-3

    # independence: the first tokens of samples 2i and 2i + 1 follow p x p
    pairs = Counter((a[0], b[0]) for a, b in zip(samples[::2], samples[1::2], strict=True))
    product = {(a, b): pa * pb for a, pa in first.items() for b, pb in first.items()}
    assert _pvalue(pairs, product) > 1e-3
    collisions = sum(c for (a, b), c in pairs.items() if a == b)
    rate = sum(p * p for p in first.values())  # P(two independent samples agree)
    assert binomtest(collisions, N // 2, rate).pvalue > 1e-3
