"""Layer skipping and the self-speculative drafter: exact output whatever is skipped, the model
restored afterwards, the shared KV cache left as the target had it."""

from __future__ import annotations

import copy

import pytest
import torch

from specdecode import SpeculativeGenerator
from specdecode.drafters.layerskip import DraftExit, LayerSkipDrafter
from specdecode.errors import InvalidSettingsError, UnsupportedModelError
from specdecode.models import ModelSession
from specdecode.models.layerskip import SkipSet, decoder_layout, skip_layers
from specdecode.sampling import SamplingSettings, TokenSampler
from specdecode.verify import Verdict

from .conftest import DEEP_LAYERS as LAYERS

PROMPTS = ["def add(a, b):", "The quick brown fox"]
NEW = 32
SKIPS = {
    "none": SkipSet(),
    "some": SkipSet.of(attention=[2, 4], mlp=[3]),
    "most": SkipSet.of(attention=range(1, LAYERS), mlp=range(LAYERS)),
}


def reference(target, prompt: str) -> list[int]:
    enc = target.tokenizer(prompt, return_tensors="pt")
    out = target.model.generate(**enc, do_sample=False, max_new_tokens=NEW)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("which", list(SKIPS))
def test_greedy_identity_with_layer_skip(deep, arch, which):
    target = deep(arch)
    exit_ = DraftExit(threshold=None) if which == "some" else DraftExit()
    generator = SpeculativeGenerator(target, LayerSkipDrafter(target, SKIPS[which], exit_), 4)
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=NEW)
        assert result.token_ids == reference(target, prompt), (arch, which, prompt)
        assert result.stats.drafted > 0
        if which == "none":  # the draft is the target: every drafted token is accepted
            assert result.stats.alpha == 1.0


def test_greedy_identity_mistral(deep):
    target = deep("mistral")
    generator = SpeculativeGenerator(target, LayerSkipDrafter(target, SKIPS["some"]), 3)
    assert generator.generate(PROMPTS[0], max_new_tokens=NEW).token_ids == reference(
        target, PROMPTS[0]
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_empty_skip_set_gives_the_full_models_logits(deep, arch):
    model = deep(arch).model
    ids = [5, 17, 42, 9, 100, 3]
    full = logits_of(model, ids)
    with skip_layers(model, SkipSet()):
        assert torch.equal(logits_of(model, ids), full)
    with skip_layers(model, SKIPS["some"]):
        assert not torch.allclose(logits_of(model, ids), full)
    assert torch.equal(logits_of(model, ids), full)


def _zeroed_copy(model, skip: SkipSet):
    """A copy whose skipped sublayers output zeros through their weights: an independent
    construction of "the residual passes through"."""
    twin = copy.deepcopy(model)
    layout = decoder_layout(twin)
    out_proj = {"self_attn": "o_proj", "attn": "c_proj"}[layout.attention]
    down_proj = "c_proj" if layout.attention == "attn" else "down_proj"
    with torch.no_grad():
        for i in skip.attention:
            for p in getattr(getattr(layout.layers[i], layout.attention), out_proj).parameters():
                p.zero_()
        for i in skip.mlp:
            for p in getattr(getattr(layout.layers[i], layout.mlp), down_proj).parameters():
                p.zero_()
    return twin


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_skipping_equals_zeroed_sublayers_also_with_the_cache(deep, arch):
    """Incremental decoding through the shared cache with skips gives the logits of a model whose
    skipped sublayers are zeroed: positions and masks stay right when layer 0 is skipped."""
    model = deep(arch).model
    skip = SkipSet.of(attention=[0, 2, 5], mlp=[1, 2])
    twin = _zeroed_copy(model, skip)
    ids = [7, 8, 9, 10, 11, 12, 13]
    expected = logits_of(twin, ids)
    session = ModelSession(model)
    with skip_layers(model, skip):
        got = [session.forward(ids[:3], 3)]
        got += [session.forward([t], 1) for t in ids[3:]]
    assert torch.allclose(torch.cat(got), expected, atol=1e-5)
    lengths = {layer.get_seq_length() for layer in session.cache.layers}
    assert lengths == {len(ids)}  # skipped layers kept pace


def test_model_intact_after_an_exception_inside_the_skip_context(deep):
    model = deep("llama").model
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    before = logits_of(model, ids)
    with pytest.raises(RuntimeError, match="boom"), skip_layers(model, SKIPS["most"]):
        logits_of(model, ids)
        raise RuntimeError("boom")
    layout = decoder_layout(model)
    for layer in layout.layers:
        assert "forward" not in getattr(layer, layout.attention).__dict__
        assert "forward" not in getattr(layer, layout.mlp).__dict__
    assert torch.equal(logits_of(model, ids), before)


def test_nested_skip_contexts_restore_in_order(deep):
    model = deep("llama").model
    ids = [2, 7, 1, 8, 2, 8]
    full = logits_of(model, ids)
    outer = SkipSet.of(attention=[2])
    with skip_layers(model, outer):
        outer_logits = logits_of(model, ids)
        with skip_layers(model, SkipSet.of(mlp=[3])):
            assert not torch.equal(logits_of(model, ids), outer_logits)
        assert torch.equal(logits_of(model, ids), outer_logits)
    assert torch.equal(logits_of(model, ids), full)


def test_draft_leaves_the_target_session_as_it_was(deep):
    target = deep("llama")
    generator = SpeculativeGenerator(target, LayerSkipDrafter(target, SKIPS["some"]), 4)
    session = generator.session
    prompt = target.tokenizer("def add(a, b):")["input_ids"]
    session.forward(prompt, 1)
    drafter = generator.drafter
    sampler = TokenSampler(SamplingSettings(do_sample=False))
    draft = drafter.propose([*prompt, 42], 5, sampler)
    assert 1 <= len(draft) <= 5
    assert session.ids == prompt
    assert {layer.get_seq_length() for layer in session.cache.layers} == {len(prompt)}


def test_sampling_with_empty_skip_set_accepts_every_draft(deep):
    """q is the target's own processed distribution, so speculative sampling accepts it all."""
    target = deep("qwen2")
    drafter = LayerSkipDrafter(target, SkipSet(), DraftExit(threshold=None))
    generator = SpeculativeGenerator(target, drafter, 4)
    result = generator.generate(
        PROMPTS[1], max_new_tokens=NEW, do_sample=True, temperature=0.9, top_k=0, seed=3
    )
    assert result.stats.drafted > 0 and result.stats.alpha == 1.0


def test_fixed_k_drafts_k_tokens_every_round(deep):
    target = deep("gpt2")
    drafter = LayerSkipDrafter(target, SKIPS["some"], DraftExit(threshold=None))
    stats = SpeculativeGenerator(target, drafter, 3).generate(PROMPTS[0], max_new_tokens=NEW).stats
    # every round drafts 3 tokens, except the last few, cut by the token budget (k <= left - 1)
    assert len(stats.drafted_per_position) == 3
    assert stats.drafted_per_position[2] >= stats.rounds - 3


def test_adaptive_threshold_follows_the_acceptance_rate():
    ex = DraftExit(threshold=0.5, target_acceptance=0.8, step=0.1, threshold_smoothing=0.5)
    ex.update(accepted=0, drafted=4, full_length=False)  # rate 0 < 0.8: raise gamma
    assert ex.gamma == pytest.approx(0.55)
    assert ex.stop(0.5) and not ex.stop(0.6)
    for _ in range(10):
        ex.update(accepted=4, drafted=4, full_length=False)  # rate -> 1: lower gamma
    assert ex.gamma < 0.55
    settled = ex.gamma
    ex.update(accepted=8, drafted=8, full_length=True)  # high rate at full k: keep gamma
    assert ex.gamma == pytest.approx(settled)
    ex.reset()
    assert ex.gamma == 0.5
    fixed = DraftExit(threshold=0.5, adaptive=False)
    fixed.update(0, 4, False)
    assert fixed.gamma == 0.5
    assert not DraftExit(threshold=None).stop(0.0)


def test_observe_adapts_the_drafter_between_rounds(deep):
    target = deep("llama")
    drafter = LayerSkipDrafter(target, SKIPS["most"], DraftExit(threshold=0.3, step=0.05))
    drafter._asked = 4
    drafter.observe(Verdict(num_accepted=0, next_token=1, num_drafted=2))
    assert drafter.exit.gamma > 0.3


def test_unbound_or_foreign_session_is_refused(deep):
    target, other = deep("llama"), deep("qwen2")
    drafter = LayerSkipDrafter(target, SKIPS["some"])
    sampler = TokenSampler(SamplingSettings(do_sample=False))
    with pytest.raises(InvalidSettingsError, match="not bound"):
        drafter.propose([1, 2, 3], 2, sampler)
    with pytest.raises(InvalidSettingsError, match="same model"):
        SpeculativeGenerator(other, drafter)


def test_out_of_range_skip_set_is_refused(deep):
    with pytest.raises(InvalidSettingsError, match="out of range"):
        LayerSkipDrafter(deep("llama"), SkipSet.of(attention=[LAYERS]))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neox",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="llama, qwen2, mistral, gpt2"):
        decoder_layout(model)
