"""The lean forward (models/lean.py): transformers' logits on float32 weights, fused layers
of every kind computing their parts' products, a clear refusal where it cannot run, and a draft
on it leaving the output the target's."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from specdecode import ModelDrafter, SpeculativeGenerator
from specdecode.cli.common import add_draft_forward, draft_forward
from specdecode.errors import InvalidSettingsError, ModelLoadError
from specdecode.models import load_model
from specdecode.models.kernels import PackedLinear, onednn_usable
from specdecode.models.lean import LeanDecoder, LeanUnsupportedError, fuse_linears, lean_support
from specdecode.models.loading import quantize_linear_int8
from specdecode.models.session import ModelSession

from .test_greedy_identity import NEW, PROMPTS, reference

LEAN_ARCHS = ("llama", "qwen2")


def paired_sessions(model) -> tuple[ModelSession, ModelSession]:
    """A session on transformers' forward and one on the lean forward, same model."""
    return ModelSession(model), ModelSession(model, lean=LeanDecoder(model))


@pytest.mark.parametrize("arch", LEAN_ARCHS)
@pytest.mark.parametrize("kernels", ["torch", "onednn"])
def test_lean_logits_equal_transformers_on_float32(tiny_dir, arch, kernels):
    """Prefill, one-token steps, a rollback and a multi-token pass over the cache: the same
    logits as transformers' forward (up to the fused products' summation order)."""
    if kernels == "onednn" and not onednn_usable(torch.float32):
        pytest.skip("this torch build has no oneDNN packed linear")
    model = load_model(tiny_dir(arch), device="cpu", kernels=kernels, pad_rows=False).model
    hf, lean = paired_sessions(model)
    ids = list(range(5, 45))
    for session_pair_step in (
        lambda s: s.forward(ids, 4),
        lambda s: s.forward([7], 1),
        lambda s: s.forward([8], 1),
        lambda s: (s.truncate(30), s.forward([9, 10, 11, 12, 13], 5))[1],
    ):
        want, got = session_pair_step(hf), session_pair_step(lean)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert hf.ids == lean.ids and lean.length == lean.cache.get_seq_length() == 35


@pytest.mark.parametrize("arch", LEAN_ARCHS)
def test_lean_decoder_fuses_four_products_a_layer_and_shares_the_rest(tiny, arch):
    model = tiny(arch).model
    decoder = LeanDecoder(model)
    layer, source = decoder.layers[0], model.model.layers[0]
    assert layer.out is source.self_attn.o_proj and layer.down is source.mlp.down_proj
    heads_out = sum(getattr(source.self_attn, f"{p}_proj").out_features for p in "qkv")
    assert layer.qkv.out_features == heads_out
    assert layer.gate_up.out_features == 2 * source.mlp.gate_proj.out_features
    assert len(decoder.fused_modules()) == 2 * len(model.model.layers)


def _parts(bias: bool) -> list[nn.Linear]:
    gen = torch.Generator().manual_seed(3)
    parts = [nn.Linear(32, out, bias=bias) for out in (16, 8, 8)]
    with torch.no_grad():
        for part in parts:
            part.weight.copy_(torch.randn(part.weight.shape, generator=gen))
            if bias:
                part.bias.copy_(torch.randn(part.bias.shape, generator=gen))
    return parts


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "packed", "int8-row", "int8-layer"])
def test_a_fused_layer_computes_its_parts_side_by_side(kind, bias):
    parts = _parts(bias)
    if kind == "packed":
        if not onednn_usable(torch.float32):
            pytest.skip("this torch build has no oneDNN packed linear")
        modules: list[nn.Module] = [PackedLinear(part) for part in parts]
    elif kind.startswith("int8"):
        per_channel = kind == "int8-row"
        modules = [quantize_linear_int8(nn.Sequential(p), per_channel)[0] for p in parts]
    else:
        modules = list(parts)
    fused = fuse_linears(modules)
    assert type(fused) is type(modules[0])
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = torch.cat([module(x) for module in modules], dim=-1)
        got = fused(x)
    # int8 per layer: one scale for the fused weight instead of one per part (rounded afresh)
    tolerance = 0.5 if kind == "int8-layer" else 1e-4
    torch.testing.assert_close(got, want, atol=tolerance, rtol=1e-3)


def test_layers_of_different_kinds_are_not_fused():
    parts = _parts(bias=False)
    mixed = [parts[0], quantize_linear_int8(nn.Sequential(parts[1]))[0]]
    with pytest.raises(LeanUnsupportedError, match="different or unknown kinds"):
        fuse_linears(mixed)


def test_models_it_cannot_run_are_refused_with_the_reason(tiny, tiny_dir):
    assert "model type 'gpt2'" in str(lean_support(tiny("gpt2").model))
    with pytest.raises(LeanUnsupportedError, match="gpt2"):
        LeanDecoder(tiny("gpt2").model)
    mistral = load_model(tiny_dir("mistral"), device="cpu").model  # sliding window by default
    assert "other than full attention" in str(lean_support(mistral))
    with pytest.raises(ModelLoadError, match="--draft-forward transformers"):
        load_model(tiny_dir("gpt2"), device="cpu", forward="lean")
    assert load_model(tiny_dir("gpt2"), device="cpu", forward="auto").lean is None
    with pytest.raises(ModelLoadError, match="dynamic sessions only"):
        load_model(tiny_dir("qwen2"), device="cpu", forward="lean", session_kind="static")
    with pytest.raises(ModelLoadError, match="unknown forward"):
        load_model(tiny_dir("qwen2"), device="cpu", forward="fast")


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_draft_on_the_lean_forward_keeps_the_targets_greedy_output(tiny, tiny_dir, dtype):
    target = tiny("qwen2")
    draft = load_model(tiny_dir("qwen2", "perturbed"), device="cpu", dtype=dtype, forward="lean")
    assert draft.forward_name == "lean" and draft.lean is not None
    drafter = ModelDrafter(draft)
    assert drafter.describe()["forward"] == "lean"
    generator = SpeculativeGenerator(target, drafter, draft_length=4)
    same_draft_on_transformers = SpeculativeGenerator(
        target,
        ModelDrafter(load_model(tiny_dir("qwen2", "perturbed"), device="cpu", dtype=dtype)),
        draft_length=4,
    )
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=NEW)
        assert result.token_ids == reference(target, prompt), (dtype, prompt)
        assert result.stats.drafted > 0
        if dtype == "float32":  # the same logits, so the same drafts accepted
            other = same_draft_on_transformers.generate(prompt, max_new_tokens=NEW)
            assert (result.stats.drafted, result.stats.accepted) == (
                other.stats.drafted,
                other.stats.accepted,
            )


def test_a_draft_on_the_lean_forward_samples_like_on_transformers(tiny, tiny_dir):
    """Same seed, same sampled tokens whether the draft runs lean or transformers' forward:
    the seeded path takes the target's token at every position, whatever was drafted."""
    target = tiny("llama")
    outputs = []
    for forward in ("lean", "transformers"):
        draft = load_model(tiny_dir("llama", "perturbed"), device="cpu", forward=forward)
        generator = SpeculativeGenerator(target, ModelDrafter(draft), draft_length=3)
        result = generator.generate(
            PROMPTS[0], max_new_tokens=24, seed=7, do_sample=True, temperature=0.8, top_k=50
        )
        outputs.append(result.token_ids)
    assert outputs[0] == outputs[1]


def test_cli_flag_picks_the_drafts_forward_and_keeps_transformers_off_dynamic_sessions():
    parser = argparse.ArgumentParser()
    add_draft_forward(parser)
    parser.add_argument("--kv-cache", default="dynamic")
    assert draft_forward(parser.parse_args([])) == "auto"
    assert draft_forward(parser.parse_args(["--draft-forward", "lean"])) == "lean"
    assert draft_forward(parser.parse_args(["--kv-cache", "static"])) == "transformers"
    with pytest.raises(InvalidSettingsError, match="dynamic KV cache only"):
        draft_forward(parser.parse_args(["--kv-cache", "static", "--draft-forward", "lean"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--draft-forward", "fast"])


def _variant(arch: str, **overrides):
    """A tiny float32 model of ``arch`` with config ``overrides``, built in memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {
        "vocab_size": 128,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "initializer_range": 0.2,
    }
    settings.update(overrides)
    config = AutoConfig.for_model(arch, **settings)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("llama", {"head_dim": 32}),  # head_dim * heads != hidden_size
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"num_key_value_heads": 4}),  # no grouping
        ("mistral", {"sliding_window": None}),
        ("qwen2", {"use_sliding_window": False}),
    ],
)
def test_lean_logits_equal_transformers_on_config_variants(arch, overrides):
    model = _variant(arch, **overrides)
    assert lean_support(model) is None
    hf, lean = paired_sessions(model)
    ids = list(range(3, 40))
    for step in (
        lambda s: s.forward(ids, 2),
        lambda s: s.forward([5], 1),
        lambda s: (s.truncate(20), s.forward([6, 7, 8], 3))[1],
    ):
        torch.testing.assert_close(step(lean), step(hf), atol=1e-4, rtol=1e-4)


def test_lean_runs_bfloat16_close_to_transformers():
    model = _variant("qwen2").to(torch.bfloat16)
    hf, lean = paired_sessions(model)
    ids = list(range(3, 30))
    torch.testing.assert_close(lean.forward(ids, 3), hf.forward(ids, 3), atol=0.1, rtol=0.05)
    assert lean.forward([4]).dtype == torch.bfloat16


def test_an_int8_per_row_model_is_fused_exactly(tiny_dir):
    """Per-row int8 layers fuse without rounding again: the lean forward gives transformers'
    int8 logits (a wrong row order or scale would not)."""
    loaded = load_model(tiny_dir("qwen2"), device="cpu", dtype="int8", forward="lean")
    assert loaded.lean is not None
    hf, lean = ModelSession(loaded.model), loaded.new_session()
    ids = list(range(5, 40))
    torch.testing.assert_close(lean.forward(ids, 3), hf.forward(ids, 3), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lean.forward([9]), hf.forward([9]), atol=1e-4, rtol=1e-4)


def test_plain_linear_layers_become_views_of_the_fused_weight():
    model = _variant("llama")
    decoder = LeanDecoder(model)
    fused = decoder.layers[0].qkv
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.untyped_storage().data_ptr() == (
        fused.weight.untyped_storage().data_ptr()
    )
    assert torch.equal(attention.k_proj.weight, fused.weight[64:96])


@pytest.mark.skipif(not onednn_usable(torch.float32), reason="no oneDNN packed linear")
def test_sessions_fall_back_to_transformers_while_the_kernels_are_switched(tiny_dir):
    loaded = load_model(
        tiny_dir("llama"), device="cpu", forward="lean", keep_torch_kernels=True, pad_rows=False
    )
    assert loaded.lean is not None and loaded.lean.usable
    ids = list(range(5, 30))
    with loaded.using_kernels("torch"):
        assert not loaded.lean.usable
        on_torch = loaded.new_session().forward(ids, 2)
        want = ModelSession(loaded.model).forward(ids, 2)
    assert torch.equal(on_torch, want)
    assert loaded.lean.usable


def test_layer_skipping_refuses_a_lean_target(deep):
    from specdecode.drafters.layerskip import LayerSkipDrafter
    from specdecode.errors import InvalidSettingsError
    from specdecode.models.layerskip import SkipSet

    target = deep("llama")
    drafter = LayerSkipDrafter(target, SkipSet(attention=(1,), mlp=(2,)))
    with pytest.raises(InvalidSettingsError, match="lean forward"):
        drafter.bind(ModelSession(target.model, lean=LeanDecoder(target.model)))
