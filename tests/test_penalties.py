"""The OpenAI API's processors (presence and frequency penalties, logit bias): their arithmetic,
and output still the target's under them, greedy and sampled, whatever the drafter."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from specdecode import ModelDrafter, PromptLookupDrafter, SpeculativeGenerator
from specdecode.errors import InvalidSettingsError
from specdecode.sampling import (
    SamplingSettings,
    TokenSampler,
    apply_logit_bias,
    apply_presence_frequency,
    resolve_sampling,
)
from specdecode.sampling.settings import as_logit_bias

from .conftest import DRAFTER_KINDS, drafter_of
from .test_sampling_exact import N, _check

PROMPT = "def add(a, b):\n    return a + b\ndef add"


# ----------------------------------------------------------------------------- arithmetic
def test_presence_and_frequency_follow_openais_formula() -> None:
    scores = torch.zeros(2, 6)
    generated = [torch.tensor([1, 1, 4]), torch.tensor([], dtype=torch.long)]
    out = apply_presence_frequency(scores, generated, presence=0.5, frequency=0.25)
    # token 1: seen twice -> 0.5 + 2 * 0.25; token 4: once -> 0.5 + 0.25; others untouched
    assert out[0].tolist() == [0.0, -1.0, 0.0, 0.0, -0.75, 0.0]
    assert out[1].tolist() == [0.0] * 6  # nothing generated before this row
    assert scores.abs().sum() == 0  # not modified in place
    negative = apply_presence_frequency(scores, generated, presence=-1.0, frequency=0.0)
    assert negative[0, 1] == 1.0  # a negative penalty encourages repeats


def test_logit_bias_adds_and_skips_ids_beyond_the_row() -> None:
    scores = torch.zeros(2, 4)
    out = apply_logit_bias(scores, ((1, 2.5), (3, -100.0), (9, 5.0)))
    assert out.tolist() == [[0.0, 2.5, 0.0, -100.0]] * 2
    assert apply_logit_bias(scores, ()) is scores


def test_sampler_counts_generated_tokens_only() -> None:
    settings = SamplingSettings(frequency_penalty=1.0)
    sampler = TokenSampler(settings, prompt_length=3)
    ids = [5, 5, 5, 2, 2]  # a prompt of three 5s, then two generated 2s
    scores = sampler.scores(torch.zeros(2, 8), ids, first=4)
    assert scores[0, 5] == 0.0  # the prompt's tokens are not penalised (as in the OpenAI API)
    assert scores[0, 2] == -1.0 and scores[1, 2] == -2.0  # row i sees ids[3 : 4 + i]
    assert not sampler.plain_argmax  # the device cannot take the raw argmax any more


def test_logit_bias_forms_and_clear_errors() -> None:
    assert as_logit_bias({"7": 1, 3: -2.5}) == ((3, -2.5), (7, 1.0))
    assert as_logit_bias([(2, 1.0)]) == ((2, 1.0),)
    assert as_logit_bias(None) == ()
    for bad in ({"x": 1}, {1: "big"}, {1: float("inf")}, [1, 2], {True: 1}):
        with pytest.raises(InvalidSettingsError, match="logit_bias"):
            as_logit_bias(bad)
    with pytest.raises(InvalidSettingsError, match="presence_penalty"):
        resolve_sampling(None, presence_penalty=float("nan"))
    settings = resolve_sampling(None, frequency_penalty=0.5, logit_bias={"4": 3})
    assert settings.frequency_penalty == 0.5 and settings.logit_bias == ((4, 3.0),)
    assert settings.shifts_logits and not SamplingSettings().shifts_logits


# ----------------------------------------------------------------------------- the loop
def _reference(target, ids: list[int], new: int, **settings: float) -> list[int]:
    """Greedy decoding by hand: a full forward per token, OpenAI's formula, the argmax."""
    out: list[int] = []
    bias = dict(settings.pop("logit_bias", {}))  # type: ignore[call-overload]
    with torch.no_grad():
        for _ in range(new):
            logits = target.model(torch.tensor([ids + out])).logits[0, -1].float()
            for token, value in bias.items():
                logits[token] += value
            for token in set(out):
                logits[token] -= settings.get("presence_penalty", 0.0)
                logits[token] -= settings.get("frequency_penalty", 0.0) * out.count(token)
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("kind", DRAFTER_KINDS)
def test_greedy_with_penalties_is_the_targets_whatever_the_drafter(tiny, kind: str) -> None:
    target = tiny("qwen2")
    drafter = drafter_of(kind, tiny)
    ids = target.tokenizer(PROMPT)["input_ids"]
    settings = {"frequency_penalty": 0.7, "presence_penalty": 0.4, "logit_bias": {5: 1.5}}
    gen = SpeculativeGenerator(target, drafter, draft_length=4, tokens_per_sync=4)
    result = gen.generate(ids, max_new_tokens=20, eos_token_id=[], do_sample=False, **settings)
    assert result.token_ids == _reference(target, ids, 20, **settings)  # type: ignore[arg-type]
    plain = gen.generate(ids, max_new_tokens=20, eos_token_id=[], do_sample=False)
    assert plain.token_ids != result.token_ids  # the penalties do change this output
    assert result.settings["frequency_penalty"] == 0.7


def test_a_large_bias_forces_a_token_and_ids_are_checked(tiny) -> None:
    target = tiny("llama")
    gen = SpeculativeGenerator(target, PromptLookupDrafter(max_ngram=2), draft_length=3)
    forced = gen.generate(PROMPT, max_new_tokens=6, eos_token_id=[], logit_bias={"42": 100})
    assert forced.token_ids == [42] * 6
    with pytest.raises(InvalidSettingsError, match="outside"):
        gen.generate(PROMPT, max_new_tokens=2, logit_bias={10**6: 1.0})


def test_seeded_sampling_with_penalties_does_not_depend_on_the_drafter(tiny) -> None:
    target = tiny("llama")
    kwargs = {
        "max_new_tokens": 16,
        "eos_token_id": [],
        "temperature": 1.2,
        "top_k": 0,
        "seed": 11,
        "sampling_mode": "seeded",
        "frequency_penalty": 1.0,
        "logit_bias": {7: 2.0},
    }
    plain = SpeculativeGenerator(target).generate(PROMPT, **kwargs)
    drafted = SpeculativeGenerator(
        target, ModelDrafter(tiny("llama", "perturbed")), draft_length=3
    ).generate(PROMPT, **kwargs)
    assert drafted.token_ids == plain.token_ids and drafted.stats.drafted > 0


@torch.no_grad()
def _exact_pairs(model, ids: list[int], cfg: dict) -> dict[tuple[int, int], float]:
    """P(t1, t2) under temperature, then top-k, after bias and penalties counted by hand."""

    def dist(generated: list[int]) -> torch.Tensor:
        logits = model(torch.tensor([ids + generated])).logits[0, -1].float()
        for token, value in cfg["logit_bias"].items():
            logits[token] += value
        for token in set(generated):
            logits[token] -= cfg["presence_penalty"]
            logits[token] -= cfg["frequency_penalty"] * generated.count(token)
        logits = logits / cfg["temperature"]
        kth = logits.topk(cfg["top_k"]).values[-1]
        return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)

    p1 = dist([])
    joint = {}
    for t1 in p1.nonzero().flatten().tolist():
        p2 = dist([t1])
        for t2 in p2.nonzero().flatten().tolist():
            joint[(t1, t2)] = float(p1[t1] * p2[t2])
    return joint


def test_sampled_pairs_follow_the_penalised_distribution(tiny) -> None:
    """Speculative sampling (the rejection rule) with a draft model, under penalties that bite
    at the second token: chi-square against the distribution computed by hand."""
    target = tiny("llama")
    ids = target.tokenizer(PROMPT)["input_ids"]
    cfg = {
        "temperature": 1.3,
        "top_k": 6,
        "presence_penalty": 1.0,
        "frequency_penalty": 1.5,
        "logit_bias": {3: 1.0},
    }
    generator = SpeculativeGenerator(target, ModelDrafter(tiny("llama", "perturbed")), 1)
    counts: Counter = Counter()
    drafted = 0
    for seed in range(N):
        result = generator.generate(
            ids, max_new_tokens=3, eos_token_id=[], seed=seed, sampling_mode="rejection", **cfg
        )
        counts[tuple(result.token_ids[:2])] += 1
        drafted += result.stats.drafted
    assert drafted > N // 4, "too few verification rounds to test anything"
    _check(counts, _exact_pairs(target.model, ids, cfg))
