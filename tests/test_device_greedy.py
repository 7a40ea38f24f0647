"""Greedy tokens chosen on the device (``Session.greedy_extend``): plain decoding read back a
few tokens at a time, and a draft model's round read back once; the same tokens as choosing
each on the host, on every kind of session."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specdecode import FixedLength, ModelDrafter, SpeculativeGenerator
from specdecode.decoding import RoundEvent
from specdecode.errors import InvalidSettingsError
from specdecode.models import ModelSession
from specdecode.models.lean import LeanDecoder
from specdecode.models.loading import COMPILED, DYNAMIC, STATIC
from specdecode.models.static_session import StaticSession
from specdecode.sampling import SamplingSettings, TokenSampler

from .test_greedy_identity import NEW, PROMPTS, reference

PROMPT = list(range(10, 40))


def _sessions(model):
    """One session of every kind on ``model``."""
    return {
        "dynamic": ModelSession(model),
        "lean": ModelSession(model, lean=LeanDecoder(model)),
        "static": StaticSession(model),
        "compiled": StaticSession(model, compiled=True, backend="eager"),
    }


def _host_steps(session, prompt: list[int], steps: int) -> list[int]:
    """The reference: each token chosen on the host and fed as a list."""
    logits = session.forward(prompt, 1)[-1]
    tokens = []
    for step in range(steps):
        tokens.append(int(logits.float().argmax()))
        if step + 1 < steps:
            logits = session.forward([tokens[-1]], 1)[-1]
    return tokens


@pytest.mark.parametrize("kind", ["dynamic", "lean", "static", "compiled"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_extend_chooses_what_the_host_would(tiny, arch, kind):
    model = tiny(arch).model
    host, device = _sessions(model)[kind], _sessions(model)[kind]
    want = _host_steps(host, PROMPT, 7)
    logits = device.forward(PROMPT, 1)[-1]
    run = device.greedy_extend(logits, 7, confidence=True)
    assert run.tokens == want
    # every chosen token but the last was fed, as on the host
    assert device.ids == host.ids == PROMPT + want[:-1]
    # the caches agree: the next pass gives the same logits
    torch.testing.assert_close(device.forward(want[-1:], 1), host.forward(want[-1:], 1))
    # the confidence is the model's probability of each chosen token
    probe = _sessions(model)[kind]
    step_logits = probe.forward(PROMPT, 1)[-1]
    for token, confidence in zip(want, run.confidence, strict=True):
        assert confidence == pytest.approx(float(torch.softmax(step_logits.float(), -1)[token]))
        step_logits = probe.forward([token], 1)[-1]


def test_greedy_extend_of_one_step_feeds_nothing(tiny):
    session = ModelSession(tiny("llama").model)
    logits = session.forward(PROMPT, 1)[-1]
    run = session.greedy_extend(logits, 1)
    assert run.tokens == [int(logits.argmax())] and run.confidence == []
    assert session.ids == PROMPT
    with pytest.raises(ValueError, match="at least one step"):
        session.greedy_extend(logits, 0)


def test_a_static_cache_that_grows_mid_run_keeps_the_positions_fed_on_the_device(tiny):
    """The run outgrows the static cache's 256 positions: the positions fed from the device,
    not yet in the session's ids, are copied into the new cache too."""
    model = tiny("qwen2").model
    prompt = [(i * 7) % 290 + 5 for i in range(250)]
    host, device = StaticSession(model), StaticSession(model)
    want = _host_steps(host, prompt, 20)
    run = device.greedy_extend(device.forward(prompt, 1)[-1], 20)
    assert run.tokens == want
    assert device.capacity > 256 and device.length == 269 == host.length
    torch.testing.assert_close(device.forward(want[-1:], 1), host.forward(want[-1:], 1))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_run_that_fails_midway_leaves_the_cache_as_the_ids_say(tiny, kind, monkeypatch):
    """A pass that raises inside a run (out of memory, say) must not leave the cache ahead of
    the session's ids: the next pass then continues where the ids end."""
    model = tiny("qwen2").model
    session, reference = _sessions(model)[kind], _sessions(model)[kind]
    logits = session.forward(PROMPT, 1)[-1]
    reference.forward(PROMPT, 1)
    real_step, calls = session._step, []

    def failing_step(token, start):
        calls.append(start)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real_step(token, start)

    monkeypatch.setattr(session, "_step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.greedy_extend(logits, 6)
    monkeypatch.undo()
    assert session.ids == PROMPT
    torch.testing.assert_close(session.forward([5, 6], 2), reference.forward([5, 6], 2))


@pytest.mark.parametrize("session_kind", [DYNAMIC, STATIC, COMPILED])
def test_plain_decoding_read_back_in_bursts_gives_transformers_tokens(tiny, session_kind):
    target = dataclasses.replace(tiny("llama"), session_kind=session_kind, compile_backend="eager")
    bursts = SpeculativeGenerator(target, None, tokens_per_sync=5)
    for prompt in PROMPTS:
        events = list(bursts.stream(prompt, max_new_tokens=NEW))
        result = events[-1].result
        assert result.token_ids == reference(target, prompt), prompt
        rounds = [e for e in events if isinstance(e, RoundEvent)]
        # still one event per target pass and token, NEW not a multiple of 5
        assert [len(e.token_ids) for e in rounds] == [1] * NEW
        assert result.stats.target_passes == NEW and result.stats.tau == 1.0
        assert result.stats.target_seconds > 0


def test_bursts_stop_at_the_end_of_sequence_and_at_stop_strings(tiny):
    target = tiny("qwen2")
    per_token = SpeculativeGenerator(target, None, tokens_per_sync=1)
    bursts = SpeculativeGenerator(target, None, tokens_per_sync=4)
    full = per_token.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=[])
    # an end of sequence in the middle of a burst: the tokens after it are dropped
    eos = full.token_ids[6]
    for generator in (per_token, bursts):
        result = generator.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=[eos])
        assert result.finish_reason == "eos"
        assert result.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]
    # a stop string ends it where the text shows it
    stop = target.tokenizer.decode(full.token_ids[9:11])
    want = per_token.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=[], stop=[stop])
    got = bursts.generate(PROMPTS[0], max_new_tokens=NEW, eos_token_id=[], stop=[stop])
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.finish_reason == want.finish_reason == "stop_string"
    # the session is ready for the next generation after a burst cut short
    assert bursts.generate(PROMPTS[1], max_new_tokens=NEW).token_ids == reference(
        target, PROMPTS[1]
    )


def test_processed_or_sampled_choices_stay_on_the_host(tiny):
    """A repetition penalty changes the argmax from the host's side: no bursts then, and the
    output is still transformers'."""
    target = tiny("llama")
    bursts = SpeculativeGenerator(target, None, tokens_per_sync=8)
    assert TokenSampler(SamplingSettings()).plain_argmax
    assert not TokenSampler(SamplingSettings(repetition_penalty=1.3)).plain_argmax
    assert not TokenSampler(SamplingSettings(do_sample=True)).plain_argmax
    got = bursts.generate(PROMPTS[2], max_new_tokens=NEW, repetition_penalty=1.3)
    assert got.token_ids == reference(target, PROMPTS[2], repetition_penalty=1.3)
    a = bursts.generate(PROMPTS[0], max_new_tokens=12, do_sample=True, seed=3)
    b = SpeculativeGenerator(target, None).generate(
        PROMPTS[0], max_new_tokens=12, do_sample=True, seed=3
    )
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("session_kind", [DYNAMIC, COMPILED])
def test_a_draft_round_chosen_on_the_device_is_the_same_draft(tiny, session_kind):
    def loaded(kind: str):
        model = tiny("qwen2", kind)
        return dataclasses.replace(model, session_kind=session_kind, compile_backend="eager")

    target = loaded("target")
    for prompt in PROMPTS:
        results = {}
        for on_device in (False, True):
            drafter = ModelDrafter(loaded("perturbed"), on_device=on_device)
            generator = SpeculativeGenerator(target, drafter, FixedLength(4))
            results[on_device] = generator.generate(prompt, max_new_tokens=NEW)
        host, device = results[False], results[True]
        assert device.token_ids == host.token_ids == reference(target, prompt)
        assert device.stats.drafted == host.stats.drafted
        assert device.stats.accepted_per_position == host.stats.accepted_per_position


def test_draft_confidence_from_the_device_equals_the_hosts(tiny):
    target = tiny("llama")
    sampler = TokenSampler(SamplingSettings())
    ids = target.tokenizer(PROMPTS[0])["input_ids"]
    drafts = [
        ModelDrafter(tiny("llama", "perturbed"), on_device=flag).propose(ids, 5, sampler)
        for flag in (False, True)
    ]
    assert drafts[0].tokens == drafts[1].tokens and len(drafts[0]) == 5
    assert drafts[1].confidence == pytest.approx(drafts[0].confidence)
    assert drafts[0].q is None and drafts[1].q is None


def test_drafts_that_may_end_early_are_chosen_on_the_host(tiny):
    """A confidence threshold or a schedule's stop rule decides after each token: such drafts
    stay on the host, and end where they did."""
    target = tiny("llama")
    sampler = TokenSampler(SamplingSettings())
    ids = target.tokenizer(PROMPTS[1])["input_ids"]
    drafter = ModelDrafter(tiny("llama", "perturbed"), on_device=True)
    assert drafter._drafts_on_device(sampler, None)
    assert not drafter._drafts_on_device(sampler, lambda confidence: True)
    assert not drafter._drafts_on_device(TokenSampler(SamplingSettings(do_sample=True)), None)
    stopped = drafter.propose(ids, 5, sampler, stop=lambda confidence: len(confidence) == 2)
    assert len(stopped) == 2
    sure = ModelDrafter(tiny("llama", "perturbed"), confidence_threshold=0.99, on_device=True)
    assert not sure._drafts_on_device(sampler, None)


def test_the_defaults_read_back_every_token_on_a_cpu(tiny):
    target = tiny("llama")
    assert SpeculativeGenerator(target, None).tokens_per_sync == 1
    assert ModelDrafter(tiny("llama", "perturbed")).on_device is False
    assert ModelDrafter(tiny("llama", "perturbed")).describe()["on_device"] is False
    with pytest.raises(InvalidSettingsError, match="at least 1"):
        SpeculativeGenerator(target, None, tokens_per_sync=0)
