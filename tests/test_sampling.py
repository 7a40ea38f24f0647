"""The logits processors match transformers' warpers exactly; settings resolve as generate does."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdecode.errors import InvalidSettingsError
from specdecode.sampling import (
    SamplingSettings,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    resolve_sampling,
)


@pytest.fixture
def scores() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(6, 50, generator=gen) * 3
    s[2, :10] = 1.5  # ties at the boundary
    return s


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 2, 2, 7]])


@pytest.mark.parametrize("top_k", [1, 5, 10, 50, 80])
def test_top_k_matches_transformers(scores, top_k):
    expected = TopKLogitsWarper(top_k)(_ids(), scores)
    assert torch.equal(apply_top_k(scores, top_k), expected)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(scores, top_p):
    expected = TopPLogitsWarper(top_p)(_ids(), scores)
    assert torch.equal(apply_top_p(scores, top_p), expected)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.5, 1.0])
def test_min_p_matches_transformers(scores, min_p):
    expected = MinPLogitsWarper(min_p)(_ids(), scores)
    assert torch.equal(apply_min_p(scores, min_p), expected)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_matches_transformers(scores, temperature):
    expected = TemperatureLogitsWarper(temperature)(_ids(), scores)
    assert torch.allclose(apply_temperature(scores, temperature), expected)


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_matches_transformers(scores, penalty):
    ids = torch.tensor([3, 3, 9, 41, 0])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids[None], scores[:1].clone())
    assert torch.equal(apply_repetition_penalty(scores[:1], [ids], penalty), expected)


def test_process_logits_order_matches_transformers_chain(scores):
    settings = SamplingSettings(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.02, repetition_penalty=1.2
    )
    ids = torch.tensor([4, 5, 6])
    expected = scores[:1].clone()
    for proc in (
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
        MinPLogitsWarper(0.02),
    ):
        expected = proc(ids[None], expected)
    got = process_logits(scores[:1], [ids], settings)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(got[finite], expected[finite])


def test_greedy_settings_skip_warpers(scores):
    settings = SamplingSettings(do_sample=False, top_k=1)
    assert torch.equal(process_logits(scores, None, settings), scores)


def test_resolve_follows_transformers_priority():
    model_cfg = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.1)
    s = resolve_sampling(model_cfg)
    assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (
        True,
        0.6,
        0.9,
        50,  # transformers' global default
        1.1,
    )
    s = resolve_sampling(model_cfg, temperature=0)
    assert not s.do_sample and s.repetition_penalty == 1.1
    s = resolve_sampling(None, temperature=1.3)
    assert s.do_sample and s.temperature == 1.3 and s.top_k == 50
    assert resolve_sampling(None, temperature=0.5, top_k=0).top_k == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": 0.5, "top_p": 0.0},
        {"temperature": 0.5, "top_p": 1.5},
        {"temperature": 0.5, "top_k": -1},
        {"temperature": 0.5, "min_p": 2.0},
        {"repetition_penalty": 0.0},
    ],
)
def test_bad_settings_are_clear_errors(kwargs):
    with pytest.raises(InvalidSettingsError):
        resolve_sampling(None, **kwargs)
