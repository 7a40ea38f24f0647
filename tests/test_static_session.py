"""The static-cache session (and its compiled form) against the dynamic one and transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specdecode import ModelDrafter, SpeculativeGenerator
from specdecode.errors import InvalidSettingsError
from specdecode.models import ModelSession, load_model
from specdecode.models.costs import can_pad
from specdecode.models.loading import COMPILED, STATIC
from specdecode.models.static_session import MIN_CAPACITY, StaticSession

from .conftest import ARCHS
from .test_greedy_identity import NEW, PROMPTS, reference


def _passes(arch_seed: int) -> list[tuple[list[int], int]]:
    """A fixed walk of pass sizes and rollbacks: (tokens to feed, positions to roll back)."""
    gen = torch.Generator().manual_seed(arch_seed)
    walk = []
    for step in range(24):
        n = [1, 3, 6, 2][step % 4]
        walk.append((torch.randint(3, 300, (n,), generator=gen).tolist(), step % 3))
    return walk


def _count_compiled_passes(session: StaticSession) -> list[int]:
    """The sizes of the passes ``session`` runs through its compiled model, as they come."""
    calls: list[int] = []
    original = session._forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    session._forward = counting
    return calls


def _same_logits(a, b, prompt: list[int], walk) -> None:
    torch.testing.assert_close(a.forward(prompt, 1), b.forward(prompt, 1), rtol=1e-5, atol=1e-5)
    for feed, back in walk:
        want, got = a.forward(feed, len(feed)), b.forward(feed, len(feed))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        a.truncate(a.length - back)
        b.truncate(b.length - back)
        assert a.ids == b.ids


@pytest.mark.parametrize("arch", ARCHS)
def test_static_session_matches_the_dynamic_one_through_passes_and_rollbacks(tiny, arch):
    model = tiny(arch).model
    static = StaticSession(model)
    _same_logits(ModelSession(model), static, list(range(5, 45)), _passes(1))
    assert static.capacity == MIN_CAPACITY
    assert can_pad(static.cache)


def test_static_session_grows_past_its_capacity_and_keeps_the_sequence(tiny):
    model = tiny("qwen2").model
    static = StaticSession(model, capacity=8)  # rounded up to 256
    assert static.capacity == MIN_CAPACITY
    prompt = [int(t) for t in torch.arange(250) % 300 + 3]
    _same_logits(ModelSession(model), static, prompt, _passes(2))  # crosses 256 on the way
    assert static.capacity == 2 * MIN_CAPACITY


def test_static_session_refuses_more_than_the_context_and_reserve_stops_there(tiny):
    model = tiny("llama").model  # context 512
    static = StaticSession(model)
    static.reserve(10_000)
    assert static.capacity == 512
    with pytest.raises(InvalidSettingsError, match="context holds 512"):
        static.forward(list(range(3, 300)) * 2)


def test_reset_starts_a_new_sequence_on_the_same_buffers(tiny):
    model = tiny("llama").model
    static, dynamic = StaticSession(model), ModelSession(model)
    static.forward(list(range(10, 60)))
    static.reset()
    assert static.length == 0
    _same_logits(dynamic, static, [7, 8, 9], _passes(3))


@pytest.mark.parametrize("kind", [STATIC, COMPILED])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_identity_on_static_and_compiled_sessions(tiny, arch, kind):
    """Our loop on a static cache (and through torch.compile, traced by its ``eager`` backend:
    the same graphs inductor would compile, without generating code) gives transformers'
    tokens, with a draft model on the same kind of session."""
    target = dataclasses.replace(tiny(arch), session_kind=kind, compile_backend="eager")
    draft = dataclasses.replace(tiny(arch, "perturbed"), session_kind=kind, compile_backend="eager")
    generator = SpeculativeGenerator(target, ModelDrafter(draft), draft_length=3)
    assert isinstance(generator.session, StaticSession)
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=NEW)
        assert result.token_ids == reference(target, prompt), (arch, kind, prompt)
        assert result.stats.accepted > 0
    # the loop reserved the whole sequence up front: no growth mid-generation
    assert generator.session.capacity == MIN_CAPACITY


def test_compiled_session_runs_short_passes_through_torch_compile(tiny):
    """Passes of up to 32 tokens go through the compiled model, fed as the next power of two
    tokens; a longer prefill runs eagerly."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny("qwen2").model
    session = StaticSession(model, compiled=True, backend="eager")
    calls = _count_compiled_passes(session)
    session.forward(list(range(3, 60)))  # 57 tokens: eager
    session.forward([5], 1)
    logits = session.forward([6, 7, 8], 2)  # fed as 4 tokens, the filler rolled back
    session.forward([9, 10, 11, 12, 13], 1)  # as 8
    assert calls == [1, 4, 8]
    assert logits.shape[0] == 2 and session.length == 57 + 1 + 3 + 5
    assert session._layers[0].cumulative_length.item() == session.length
    _same_logits(
        ModelSession(model),
        StaticSession(model, compiled=True, backend="eager"),
        [4, 5, 6],
        _passes(4),
    )


def test_load_model_and_the_cli_take_the_session_kind(tiny_dir):
    loaded = load_model(tiny_dir("llama"), device="cpu", session_kind=STATIC)
    assert isinstance(loaded.new_session(), StaticSession)
    with pytest.raises(Exception, match="unknown session kind"):
        load_model(tiny_dir("llama"), device="cpu", session_kind="paged")


def test_layer_skip_refuses_a_static_session(tiny):
    from specdecode.drafters.layerskip import LayerSkipDrafter
    from specdecode.models.layerskip import SkipSet

    target = dataclasses.replace(tiny("llama"), session_kind=STATIC)
    drafter = LayerSkipDrafter(target, SkipSet.of(attention=[1], mlp=[]))
    with pytest.raises(InvalidSettingsError, match="dynamic KV cache"):
        SpeculativeGenerator(target, drafter)


def test_inductor_compiled_plain_decoding_matches_transformers(tiny_dir):
    """The real compiler (inductor's CPU code) on one pass size: transformers' tokens. A
    compiled CPU model runs on torch's kernels, which inductor packs itself."""
    target = load_model(tiny_dir("qwen2"), device="cpu", session_kind=COMPILED)
    assert target.kernels is None
    generator = SpeculativeGenerator(target, None, pad_passes=False)
    result = generator.generate(PROMPTS[0], max_new_tokens=12)
    assert result.token_ids == reference(target, PROMPTS[0])[:12]


def test_compiled_sessions_refuse_onednn_packed_weights_on_the_cpu(tiny_dir):
    with pytest.raises(Exception, match="cannot run on oneDNN-packed weights"):
        load_model(tiny_dir("llama"), device="cpu", session_kind=COMPILED, kernels="onednn")


def test_the_first_pass_on_a_new_cache_runs_eagerly_and_calibration_discards_graph_warmups(tiny):
    """The buffers are allocated outside the compiled graph (CUDA graphs need them static),
    and a compiled session's pass costs are timed only after its graphs are recorded."""
    from specdecode.models.costs import measure_pass_costs

    model = tiny("llama").model
    session = StaticSession(model, compiled=True, backend="eager")
    calls = _count_compiled_passes(session)
    session.forward([5, 6, 7], 1)  # short, but the cache is new: eager
    assert calls == []
    session.forward([8], 1)
    assert calls == [1]
    assert session.warmup_passes == 3 and ModelSession(model).warmup_passes == 1
    calls.clear()
    measure_pass_costs(session, [5, 6, 7, 8], sizes=(1, 2), repetitions=2)
    assert calls.count(2) == 3 + 2  # three discarded rounds, two timed (after its prefill)


def test_a_frozen_session_fuses_the_projections_and_keeps_the_tokens(tiny_dir):
    """Inductor's freezing, compiled for real on the CPU (a few seconds a shape): the query, key
    and value products become one and the MLP's gate and up another, so a pass calls fewer
    external products; the greedy tokens are the unfrozen session's. The unfrozen session
    compiles first on the same model: the frozen one must not be handed its graphs."""
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    # torch's kernels: inductor lowers its own products, not those oneDNN packed outside it
    model = load_model(tiny_dir("qwen2"), device="cpu", kernels="torch").model
    prompt = list(range(10, 40))
    products, tokens = {}, {}
    with torch._inductor.config.patch(force_disable_caches=True):  # count every lowering
        for freeze in (False, True):
            session = StaticSession(model, compiled=True, freeze=freeze)
            logits = session.forward(prompt, 1)[-1]  # a new cache's first pass runs eagerly
            before = counters["inductor"]["extern_calls"]
            tokens[freeze] = session.greedy_extend(logits, 5).tokens
            products[freeze] = counters["inductor"]["extern_calls"] - before
        # a frozen graph bakes in its session's cache buffers: a second frozen session on the
        # same model, and a cache grown into new buffers, must get graphs of their own
        for prompt in ([7, 8, 9], [(i * 7) % 290 + 5 for i in range(250)]):
            eager, again = StaticSession(model), StaticSession(model, compiled=True, freeze=True)
            want = eager.greedy_extend(eager.forward(prompt, 1)[-1], 12).tokens
            assert again.greedy_extend(again.forward(prompt, 1)[-1], 12).tokens == want
            assert again.capacity == eager.capacity  # the longer prompt grew both past 256
    torch._dynamo.reset()
    assert tokens[True] == tokens[False]
    layers = model.config.num_hidden_layers
    assert products[False] - products[True] == 3 * layers  # 7 products a layer become 4
    with pytest.raises(InvalidSettingsError, match="inductor"):
        StaticSession(model, compiled=True, backend="eager", freeze=True)
    with pytest.raises(InvalidSettingsError, match="compiled"):
        StaticSession(model, freeze=True)
    with pytest.raises(Exception, match="freeze_weights needs compiled sessions"):
        load_model(tiny_dir("qwen2"), device="cpu", freeze_weights=True)
    loaded = load_model(tiny_dir("qwen2"), device="cpu", session_kind=COMPILED, freeze_weights=True)
    assert loaded.freeze_weights and loaded.new_session().frozen
