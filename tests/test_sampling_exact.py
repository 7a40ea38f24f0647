"""End to end: sampled tokens that pass through verification follow the target's own sampling
distribution, computed independently with transformers' logits warpers (chi-square).

This tests standard speculative sampling (the rejection rule); the seeded mode has its own tests
in test_seeded_*.py."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdecode import LookupDrafter, ModelDrafter, PromptLookupDrafter, SpeculativeGenerator

PROMPT = "def add(a, b):\n    return a + b\ndef add"
N = 2000

CONFIGS = [
    {"temperature": 1.3, "top_k": 6},
    {"temperature": 0.9, "top_k": 12, "top_p": 0.6},
    {"temperature": 1.0, "top_k": 10, "min_p": 0.3},
]


def _warpers(cfg) -> LogitsProcessorList:
    procs = [TemperatureLogitsWarper(cfg["temperature"]), TopKLogitsWarper(cfg["top_k"])]
    if "top_p" in cfg:
        procs.append(TopPLogitsWarper(cfg["top_p"]))
    if "min_p" in cfg:
        procs.append(MinPLogitsWarper(cfg["min_p"]))
    return LogitsProcessorList(procs)


@torch.no_grad()
def exact_pairs(model, ids: list[int], cfg) -> dict[tuple[int, int], float]:
    """P(t1, t2) = p(t1 | prompt) * p(t2 | prompt, t1) under the warped distributions."""
    warp = _warpers(cfg)

    def dist(seq):
        x = torch.tensor([seq])
        logits = model(x).logits[:, -1, :].float()
        return torch.softmax(warp(x, logits), dim=-1)[0]

    p1 = dist(ids)
    joint = {}
    for t1 in p1.nonzero().flatten().tolist():
        p2 = dist([*ids, t1])
        for t2 in p2.nonzero().flatten().tolist():
            joint[(t1, t2)] = float(p1[t1] * p2[t2])
    return joint


def _check(counts: Counter, joint: dict[tuple[int, int], float]) -> None:
    outside = sum(c for pair, c in counts.items() if pair not in joint)
    assert outside == 0, f"{outside} samples outside the target's support"
    cells = sorted(joint, key=joint.get, reverse=True)
    observed, expected = [], []
    rest_o = rest_e = 0.0
    for pair in cells:  # merge cells expected below 5 into one
        e = joint[pair] * N
        if e >= 5:
            observed.append(counts[pair])
            expected.append(e)
        else:
            rest_o += counts[pair]
            rest_e += e
    if rest_e > 0:
        observed.append(rest_o)
        expected.append(rest_e)
    scale = sum(observed) / sum(expected)
    result = chisquare(observed, [e * scale for e in expected])
    assert result.pvalue > 1e-3, f"chi-square p-value {result.pvalue:.2e}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=["temperature+top_k", "top_p", "min_p"])
@pytest.mark.parametrize("drafter_kind", ["draft-model", "prompt-lookup", "lookup-draft"])
def test_first_two_tokens_follow_target_distribution(tiny, cfg, drafter_kind):
    target = tiny("llama")
    ids = target.tokenizer(PROMPT)["input_ids"]
    if drafter_kind == "draft-model":
        drafter = ModelDrafter(tiny("llama", "perturbed"))
    elif drafter_kind == "lookup-draft":
        # the pair (last prompt token, t) occurs before for the even ids t: lookup drafts
        # after an even first token, the draft model after an odd one (both kinds of round)
        last = ids[-1]
        pairs = [x for t in range(0, target.tokenizer.vocab_size, 2) for x in (last, t)]
        ids = [*pairs, *ids]
        drafter = LookupDrafter(ModelDrafter(tiny("llama", "perturbed")), min_ngram=2)
    else:
        # every token id occurs in the prompt, so a unigram match always yields a draft
        ids = [*range(target.tokenizer.vocab_size), *ids]
        drafter = PromptLookupDrafter(max_ngram=1)
    generator = SpeculativeGenerator(target, drafter, draft_length=1)
    counts: Counter = Counter()
    drafted = free = 0  # the round producing token 2 drafts one token (k <= budget - 1)
    for seed in range(N):
        result = generator.generate(
            ids, max_new_tokens=3, eos_token_id=[], seed=seed, sampling_mode="rejection", **cfg
        )
        counts[tuple(result.token_ids[:2])] += 1
        drafted += result.stats.drafted
        free += result.stats.free_drafted
    assert drafted > N // 4, "too few verification rounds to test anything"
    if drafter_kind == "lookup-draft":
        assert N // 20 < free < drafted - N // 20, "both lookup and model rounds must occur"
    _check(counts, exact_pairs(target.model, ids, cfg))
