"""Log-probabilities of generated tokens: the target's raw distribution, whatever the drafter."""

from __future__ import annotations

import math

import pytest
import torch

from specdecode import ModelDrafter, PromptLookupDrafter, SpeculativeGenerator
from specdecode.decoding import FinishEvent, RoundEvent
from specdecode.errors import InvalidSettingsError
from specdecode.sampling import TokenLogprob, token_logprobs

PROMPT = "def add(a, b):"
NEW = 24


# ----------------------------------------------------------------------------- the pure core
def test_token_logprobs_are_log_softmax_of_each_row() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    out = token_logprobs(logits, [1, 2], top=2)
    assert len(out) == 2  # the third row is not a token's
    expected = torch.log_softmax(logits, dim=-1)
    assert out[0].token_id == 1
    assert out[0].logprob == pytest.approx(float(expected[0, 1]))
    assert [t for t, _ in out[0].top] == [0, 1]  # most likely first
    assert out[0].top[0][1] == pytest.approx(float(expected[0, 0]))
    assert out[1].top[0] == (2, pytest.approx(float(expected[1, 2])))
    assert sum(math.exp(float(v)) for v in expected[1]) == pytest.approx(1.0)


def test_token_logprobs_without_alternatives_and_edge_cases() -> None:
    logits = torch.zeros(1, 8)
    (only,) = token_logprobs(logits, [3])
    assert only == TokenLogprob(3, pytest.approx(-math.log(8)))  # type: ignore[arg-type]
    assert only.top == ()
    assert token_logprobs(logits, []) == []
    assert len(token_logprobs(logits, [0], top=100)[0].top) == 8  # at most the vocabulary
    with pytest.raises(ValueError, match="one row of logits per token"):
        token_logprobs(logits, [0, 1])
    with pytest.raises(ValueError, match="top must be"):
        token_logprobs(logits, [0], top=-1)


def test_bfloat16_logits_are_widened() -> None:
    logits = torch.randn(2, 50).to(torch.bfloat16)
    out = token_logprobs(logits, [4, 7], top=1)
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert out[1].logprob == pytest.approx(float(expected[1, 7]), abs=1e-6)


# ----------------------------------------------------------------------------- the loop
def _reference(target, ids: list[int]) -> list[float]:
    """Each token's log-probability from a full forward over prompt + output (no cache)."""
    enc = target.tokenizer(PROMPT)["input_ids"]
    full = torch.tensor([list(enc) + ids])
    with torch.no_grad():
        logits = target.model(full).logits[0].float()
    logp = torch.log_softmax(logits[len(enc) - 1 : -1], dim=-1)
    return [float(logp[i, t]) for i, t in enumerate(ids)]


def _drafter(tiny, arch: str, kind: str):
    if kind == "plain":
        return None
    if kind == "prompt-lookup":
        return PromptLookupDrafter(max_ngram=3)
    return ModelDrafter(tiny(arch, "perturbed"))


@pytest.mark.parametrize("kind", ["plain", "draft", "prompt-lookup"])
def test_greedy_logprobs_match_a_full_forward(tiny, kind: str) -> None:
    target = tiny("qwen2")
    gen = SpeculativeGenerator(target, _drafter(tiny, "qwen2", kind), draft_length=4)
    result = gen.generate(PROMPT, max_new_tokens=NEW, do_sample=False, logprobs=3)
    assert result.logprobs is not None
    assert [lp.token_id for lp in result.logprobs] == result.token_ids
    reference = _reference(target, result.token_ids)
    assert [lp.logprob for lp in result.logprobs] == pytest.approx(reference, abs=1e-4)
    for lp in result.logprobs:
        assert len(lp.top) == 3
        # greedy: the chosen token is the most likely one, and the alternatives are sorted
        assert lp.top[0][0] == lp.token_id
        assert lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-6)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    if kind != "plain":
        assert result.stats.drafted > 0


def test_sampled_logprobs_are_raw_and_events_carry_them(tiny) -> None:
    """Sampling at a temperature: the log-probabilities are still the model's raw ones, and the
    events' per-token values add up to the result's."""
    target = tiny("llama")
    gen = SpeculativeGenerator(target, ModelDrafter(tiny("llama", "perturbed")), draft_length=3)
    events = list(
        gen.stream(
            PROMPT, max_new_tokens=NEW, do_sample=True, temperature=1.7, top_k=5, seed=3, logprobs=0
        )
    )
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    result = finish.result
    per_event = [lp for e in rounds for lp in (e.logprobs or ())]
    assert all(e.logprobs is not None and len(e.logprobs) == len(e.token_ids) for e in rounds)
    assert result.logprobs is not None and list(result.logprobs) == per_event
    reference = _reference(target, result.token_ids)
    assert [lp.logprob for lp in result.logprobs] == pytest.approx(reference, abs=1e-4)
    assert all(lp.top == () for lp in result.logprobs)
    assert result.to_dict()["logprobs"][0]["token_id"] == result.token_ids[0]


def test_logprobs_cut_with_the_tokens_at_a_stop(tiny) -> None:
    target = tiny("qwen2")
    gen = SpeculativeGenerator(target, PromptLookupDrafter(max_ngram=3), draft_length=4)
    full = gen.generate(PROMPT, max_new_tokens=NEW, do_sample=False)
    cut = gen.generate(PROMPT, max_new_tokens=5, do_sample=False, logprobs=1)
    assert cut.logprobs is not None and len(cut.logprobs) == len(cut.token_ids) == 5
    assert cut.token_ids == full.token_ids[:5]


@pytest.mark.parametrize("kind", ["plain", "draft"])
def test_prompt_logprobs_score_every_prompt_token(tiny, kind: str) -> None:
    target = tiny("qwen2")
    gen = SpeculativeGenerator(target, _drafter(tiny, "qwen2", kind), draft_length=4)
    ids = target.tokenizer(PROMPT)["input_ids"]
    events = list(gen.stream(ids, max_new_tokens=6, do_sample=False, prompt_logprobs=2))
    result = events[-1].result  # type: ignore[union-attr]
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(ids) - 1
    assert events[0].prompt_logprobs == result.prompt_logprobs  # type: ignore[union-attr]
    assert all(e.prompt_logprobs is None for e in events[1:-1])  # type: ignore[union-attr]
    with torch.no_grad():
        logp = torch.log_softmax(target.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [float(logp[i, t]) for i, t in enumerate(ids[1:])]
    assert [lp.logprob for lp in result.prompt_logprobs] == pytest.approx(expected, abs=1e-4)
    assert all(len(lp.top) == 2 for lp in result.prompt_logprobs)
    unscored = gen.generate(ids, max_new_tokens=6, do_sample=False)
    assert result.token_ids == unscored.token_ids and unscored.prompt_logprobs is None
    assert "prompt_logprobs" in result.to_dict() and result.logprobs is None


def test_off_by_default_and_bad_values_refused(tiny) -> None:
    gen = SpeculativeGenerator(tiny("qwen2"))
    result = gen.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert result.logprobs is None and "logprobs" not in result.to_dict()
    for bad in (-1, 1.5, True, "3", 10**9):
        with pytest.raises(InvalidSettingsError, match="logprobs"):
            gen.generate(PROMPT, max_new_tokens=4, logprobs=bad)
        with pytest.raises(InvalidSettingsError, match="prompt_logprobs"):
            gen.generate(PROMPT, max_new_tokens=4, prompt_logprobs=bad)


def test_device_bursts_step_aside_for_logprobs(tiny) -> None:
    """Plain greedy decoding reading tokens back in bursts still gives every token's value."""
    target = tiny("qwen2")
    gen = SpeculativeGenerator(target, tokens_per_sync=4)
    result = gen.generate(PROMPT, max_new_tokens=NEW, do_sample=False, logprobs=0)
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
    reference = _reference(target, result.token_ids)
    assert [lp.logprob for lp in result.logprobs] == pytest.approx(reference, abs=1e-4)


def test_long_prompts_are_scored_a_chunk_at_a_time(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked scoring (here 5 positions a pass) gives the values of one whole pass."""
    from specdecode.decoding import loop

    target = tiny("llama")
    gen = SpeculativeGenerator(target)
    ids = target.tokenizer(PROMPT + " return a + b  # and more words here")["input_ids"]
    whole = gen.generate(ids, max_new_tokens=4, do_sample=False, prompt_logprobs=1)
    monkeypatch.setattr(loop, "PROMPT_CHUNK", 5)
    chunked = gen.generate(ids, max_new_tokens=4, do_sample=False, prompt_logprobs=1)
    assert len(ids) > 2 * 5 and chunked.token_ids == whole.token_ids
    assert chunked.prompt_logprobs is not None and whole.prompt_logprobs is not None
    assert [lp.token_id for lp in chunked.prompt_logprobs] == ids[1:]
    assert [lp.logprob for lp in chunked.prompt_logprobs] == pytest.approx(
        [lp.logprob for lp in whole.prompt_logprobs], abs=1e-4
    )


def test_zero_new_tokens_only_scores_the_prompt(tiny) -> None:
    target = tiny("qwen2")
    gen = SpeculativeGenerator(target, PromptLookupDrafter(max_ngram=3), draft_length=4)
    ids = target.tokenizer(PROMPT)["input_ids"]
    scored = gen.generate(ids, max_new_tokens=0, prompt_logprobs=0)
    assert scored.token_ids == [] and scored.text == "" and scored.finish_reason == "length"
    assert scored.prompt_logprobs is not None and len(scored.prompt_logprobs) == len(ids) - 1
    assert scored.stats.target_passes == 1 and scored.stats.new_tokens == 0
    with pytest.raises(InvalidSettingsError, match="prompt_logprobs"):
        gen.generate(ids, max_new_tokens=0)
