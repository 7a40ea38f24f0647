"""Speed levers keep the output exact: padded verification, the cost-aware draft length, an int8
draft; and the cost model picks what it should."""

from __future__ import annotations

import itertools

import pytest
import torch

from specdecode import ModelDrafter, PromptLookupDrafter, SpeculativeGenerator
from specdecode.drafters.schedule import (
    CostAwareLength,
    best_draft_length,
    expected_speedup,
    expected_tokens,
    make_schedule,
)
from specdecode.errors import InvalidSettingsError
from specdecode.models import ModelSession, load_model
from specdecode.models.costs import PassCosts, can_pad, measure_pass_costs
from specdecode.verify import Verdict

from .conftest import ARCHS
from .test_greedy_identity import NEW, PROMPTS, reference

# A table under which every pass of 2..16 tokens is padded to 16 (the cheapest by far).
PAD_TO_16 = PassCosts({1: 1.0, 2: 3.0, 4: 3.0, 8: 3.0, 12: 3.0, 16: 1.5})
# The CPU shapes of ../shared/MODELS.md (Qwen2.5-Coder-1.5B, float32, 2 threads).
CPU_LIKE = PassCosts({1: 1.0, 2: 2.04, 3: 2.9, 4: 1.86, 7: 2.9, 8: 1.74, 11: 2.9, 16: 2.0})


# ------------------------------------------------------------------------------ the cost table
def test_padded_size_picks_the_cheapest_size_that_holds_n():
    assert CPU_LIKE.padded_size(1) == 1
    assert CPU_LIKE.padded_size(2) == 8  # 2 costs 2.04, 8 costs 1.74
    assert CPU_LIKE.padded_size(9) == 16
    assert CPU_LIKE.padded_size(2, limit=5) == 4  # the context has room for 5 more only
    assert CPU_LIKE.padded_size(17) == 17  # nothing measured holds it: unpadded
    assert CPU_LIKE.cost(2) == 1.74 and CPU_LIKE.cost(2, padded=False) == 2.04
    assert CPU_LIKE.cost(5, padded=False) == 2.9  # unmeasured: the next measured size
    assert CPU_LIKE.cost(32) == pytest.approx(4.0)  # beyond: linear from the largest


def test_pass_cost_table_rejects_nonsense():
    with pytest.raises(ValueError):
        PassCosts({2: 1.0})
    with pytest.raises(ValueError):
        PassCosts({1: 1.0, 4: 0.0})


def test_measure_pass_costs_on_a_tiny_model(tiny):
    session = ModelSession(tiny("llama").model)
    costs = measure_pass_costs(session, list(range(3, 40)), sizes=(2, 4), repetitions=1)
    assert costs.sizes == (1, 2, 4)
    assert costs.relative[1] == 1.0 and costs.step_seconds > 0
    assert costs.context_tokens == 37
    assert session.length == 0  # left empty for the generation that follows
    assert can_pad(session.cache)


# ------------------------------------------------------------------------ padded verification
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_pass_leaves_the_real_positions_logits_unchanged(tiny, arch):
    session = ModelSession(tiny(arch).model)
    prompt, real = list(range(5, 25)), [40, 41, 42]
    session.forward(prompt, 1)
    plain = session.forward(real, 3)
    session.truncate(len(prompt))
    padded = session.forward(real + [42] * 13, 16)[:3]
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(padded.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["perturbed", "prompt-lookup"])
def test_padded_verification_gives_the_plain_tokens(tiny, arch, kind):
    target = tiny(arch)
    drafter = (
        PromptLookupDrafter() if kind == "prompt-lookup" else ModelDrafter(tiny(arch, "perturbed"))
    )
    generator = SpeculativeGenerator(target, drafter, 3, pass_costs=PAD_TO_16)
    sizes = []
    for prompt in PROMPTS:
        for event in generator.stream(prompt, max_new_tokens=NEW):
            if getattr(event, "num_drafted", 0):
                sizes.append(generator.last_pass_size)
            if hasattr(event, "result"):
                assert event.result.token_ids == reference(target, prompt), (arch, kind, prompt)
    assert sizes and set(sizes) == {16}  # every verification pass was padded
    assert generator.session.length <= len(generator.session.ids)


def test_padding_off_feeds_exactly_the_real_tokens(tiny):
    target = tiny("llama")
    generator = SpeculativeGenerator(
        target, ModelDrafter(tiny("llama", "perturbed")), 3, pass_costs=PAD_TO_16, pad_passes=False
    )
    result = generator.generate(PROMPTS[0], max_new_tokens=NEW)
    assert result.token_ids == reference(target, PROMPTS[0])
    assert generator.last_pass_size <= 4


def test_padding_respects_the_context_limit(tiny):
    target = tiny("qwen2")  # 512 positions
    generator = SpeculativeGenerator(target, PromptLookupDrafter(), 3, pass_costs=PAD_TO_16)
    generator.session.forward(list(range(10, 110)), 1)
    assert generator._pass_size(2) == 16
    generator.session.forward([i % 300 + 10 for i in range(405)], 1)  # 505 held: room for 7
    assert generator._pass_size(2) == 2  # 16 would not fit; 2 and 4 cost the same
    result = generator.generate([int(t) for t in torch.arange(505) % 50 + 10], max_new_tokens=6)
    assert len(result.token_ids) == 6


# ----------------------------------------------------------------------------- the cost model
def test_expected_tokens_and_speedup():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    # Leviathan et al.'s bound when the pass costs one step
    assert expected_speedup(0.8, 4, 0.1, 1.0) == pytest.approx((1 - 0.8**5) / 0.2 / 1.4)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 0.8, 0.9, 0.97])
@pytest.mark.parametrize("c", [0.0, 0.06, 0.18, 0.38])
@pytest.mark.parametrize("padded", [True, False])
def test_best_draft_length_maximises_the_modelled_speedup(alpha, c, padded):
    choice = best_draft_length(alpha, c, CPU_LIKE, maximum=16, padded=padded)
    speedups = [1.0] + [
        expected_speedup(alpha, k, c, CPU_LIKE.cost(k + 1, padded)) for k in range(1, 17)
    ]
    assert 0 <= choice.k <= 16
    assert choice.speedup == pytest.approx(max(speedups))
    assert choice.speedup >= 1.0  # never worse than plain decoding, by construction
    assert speedups.index(max(speedups)) == choice.k  # the smallest k among equals


def test_best_draft_length_on_the_cpu_table():
    # nothing accepted: do not speculate
    assert best_draft_length(0.0, 0.0, CPU_LIKE, 16).k == 0
    # fp32 0.5B draft (c = 0.38) on chat-like acceptance: no k pays on this CPU
    assert best_draft_length(0.6, 0.38, CPU_LIKE, 16).k == 0
    # free drafts (prompt lookup): fill a cheap pass, 8 tokens (k = 7) or, when most drafts
    # are accepted, 16 (k = 15)
    assert best_draft_length(0.6, 0.0, CPU_LIKE, 16).k == 7
    assert best_draft_length(0.8, 0.0, CPU_LIKE, 16).k == 15
    # int8 draft (c = 0.06) with code-like acceptance pays, with a k that fills a cheap pass
    choice = best_draft_length(0.85, 0.06, CPU_LIKE, 16)
    assert choice.k in (3, 7, 15) and choice.speedup > 1.5


# ------------------------------------------------------------------------------- the policy
def _verdict(accepted: int, drafted: int) -> Verdict:
    return Verdict(num_accepted=accepted, next_token=0, num_drafted=drafted)


def test_policy_drafts_initial_k_until_it_has_costs_and_timing():
    policy = CostAwareLength(initial=4)
    assert policy.next() == 4
    policy.use_costs(CPU_LIKE, padded=True)
    assert policy.next() == 4  # no draft timing yet
    policy.observe_time(drafted=4, draft_seconds=9.0, fed=8, target_seconds=1.74)
    assert policy.c is None and policy.next() == 4  # the first round (a draft prefill) is not timed
    policy.observe_time(drafted=4, draft_seconds=0.04, fed=8, target_seconds=1.74)
    assert policy.c == pytest.approx(0.01)
    assert policy.next() >= 1


def test_policy_stops_speculating_and_probes_with_growing_gaps():
    policy = CostAwareLength(initial=4, probe_every=2, probe_max_every=8, probe_k=3)
    policy.use_costs(CPU_LIKE, padded=True)
    for _ in range(2):
        policy.observe_time(drafted=4, draft_seconds=4 * 0.38, fed=8, target_seconds=1.74)
    for _ in range(10):  # nothing accepted: alpha falls towards 0
        policy.update(_verdict(0, 4))
    ks = [policy.next() for _ in range(40)]
    probes = [i for i, k in enumerate(ks) if k]
    assert all(ks[i] == 3 for i in probes)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[:3] == [5, 9, 9] and len(probes) >= 3  # 2 plain, then 4, then 8 (the cap)


def test_policy_speculates_when_drafts_are_accepted_and_resets_alpha():
    policy = CostAwareLength(initial=4, prior_alpha=0.5)
    policy.use_costs(CPU_LIKE, padded=True)
    for _ in range(2):
        policy.observe_time(drafted=7, draft_seconds=7 * 0.06, fed=8, target_seconds=1.74)
    for _ in range(10):
        policy.update(_verdict(7, 7))
    assert policy.alpha > 0.9 and policy.next() >= 7
    policy.update(_verdict(0, 0))  # a round that drafted nothing teaches nothing
    assert policy.alpha > 0.9
    policy.reset()
    assert policy.alpha == pytest.approx(0.5)


def test_policy_settings_are_checked():
    with pytest.raises(InvalidSettingsError):
        CostAwareLength(initial=0)
    with pytest.raises(InvalidSettingsError):
        CostAwareLength(prior_alpha=1.0)
    with pytest.raises(InvalidSettingsError):
        make_schedule("fastest", 4)
    assert make_schedule("auto", 20).maximum == 20


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_auto_schedule_keeps_greedy_identity(tiny, arch):
    target = tiny(arch)
    for drafter in (ModelDrafter(tiny(arch, "perturbed")), ModelDrafter(tiny(arch, "unrelated"))):
        generator = SpeculativeGenerator(target, drafter, make_schedule("auto", 4))
        for prompt in PROMPTS:
            result = generator.generate(prompt, max_new_tokens=NEW)
            assert result.token_ids == reference(target, prompt), (arch, prompt)
        assert generator.pass_costs is not None  # measured at the first generation
        assert generator.schedule.describe()["pass_costs"] is not None


# ------------------------------------------------------------------------------- int8 draft
def test_int8_draft_keeps_greedy_identity(tiny_dir, tiny):
    draft = load_model(tiny_dir("qwen2", "perturbed"), dtype="int8", device="cpu")
    assert draft.dtype == torch.qint8
    assert "quantized" in type(draft.model.lm_head).__module__
    target = tiny("qwen2")
    generator = SpeculativeGenerator(target, ModelDrafter(draft), 4)
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=NEW)
        assert result.token_ids == reference(target, prompt)
    assert result.stats.accepted > 0
