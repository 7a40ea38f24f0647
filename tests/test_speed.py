"""Speed levers keep the output exact: padded verification, the cost-aware draft length, an int8
draft; and the cost model picks what it should."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from specdecode import ModelDrafter, PromptLookupDrafter, SpeculativeGenerator
from specdecode.drafters import LayerSkipDrafter
from specdecode.drafters.schedule import (
    AcceptanceCalibration,
    CostAwareLength,
    best_draft_length,
    expected_speedup,
    expected_tokens,
    make_schedule,
    should_stop_drafting,
)
from specdecode.errors import InvalidSettingsError
from specdecode.models import ModelSession, draft_dtype_for, load_model
from specdecode.models.costs import PassCosts, can_pad, measure_pass_costs
from specdecode.models.layerskip import SkipSet
from specdecode.sampling import SamplingSettings, TokenSampler
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
    # after a plain round the draft catches up on its tokens first: that round is not timed
    policy.observe_time(drafted=0, draft_seconds=0.0, fed=1, target_seconds=1.0)
    policy.observe_time(drafted=2, draft_seconds=5.0, fed=4, target_seconds=1.86)
    assert policy.c == pytest.approx(0.01)


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
    assert make_schedule("auto", 30).maximum == 30
    assert make_schedule("auto", 5).maximum == 16


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("confidence_stop", [False, True])
def test_auto_schedule_keeps_greedy_identity(tiny, arch, confidence_stop):
    target = tiny(arch)
    for drafter in (ModelDrafter(tiny(arch, "perturbed")), ModelDrafter(tiny(arch, "unrelated"))):
        schedule = make_schedule("auto", 4, confidence_stop)
        generator = SpeculativeGenerator(target, drafter, schedule)
        for prompt in PROMPTS:
            result = generator.generate(prompt, max_new_tokens=NEW)
            assert result.token_ids == reference(target, prompt), (arch, prompt)
        assert generator.pass_costs is not None  # measured at the first generation
        assert generator.schedule.describe()["pass_costs"] is not None


# ---------------------------------------------------------------- ending drafts by confidence
FLAT = PassCosts({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0})  # a GPU-like table: passes ~free


def test_stop_rule_weighs_the_next_tokens_against_their_cost():
    # free verification, draft step 0.1: one more token at acceptance 0.5 * 0.9 = 0.45 beats
    # 0.1 steps at rate 2 (0.2) -> go on; at rate 5 (0.5) it does not, nor do longer looks
    assert not should_stop_drafting(0.5, 3, 10, 0.9, 0.1, FLAT, rate=2.0)
    assert should_stop_drafting(0.5, 3, 10, 0.9, 0.1, FLAT, rate=5.0)
    # a draft that is surely rejected already gains nothing from more tokens
    assert should_stop_drafting(0.0, 2, 10, 0.9, 0.01, FLAT, rate=1.0)
    # no room left (horizon 0): stop
    assert should_stop_drafting(1.0, 5, 0, 0.9, 0.01, FLAT, rate=1.0)


def test_stop_rule_looks_ahead_to_passes_that_padding_makes_free():
    # PAD_TO_16: a pass of 5 tokens costs 3 steps, one of 16 tokens 1.5 (padded, every size
    # from 2 on costs 1.5). With 1 token drafted the pass is already a 16-token one: the next
    # token costs only c, so even a doubtful continuation pays
    assert not should_stop_drafting(0.3, 1, 14, 0.5, 0.05, PAD_TO_16, rate=1.2)
    # unpadded, the next token also grows the pass from 2 tokens (3.0) to 3 (3.0 too, the next
    # measured size) - and to 17 tokens it would cost 1.5 * 17 / 16: the rule sees the same
    assert not should_stop_drafting(0.3, 1, 14, 0.5, 0.05, PAD_TO_16, rate=1.2, padded=False)
    # beyond the largest measured size passes grow linearly: a long draft must earn its pass
    assert should_stop_drafting(0.3, 16, 8, 0.5, 0.05, PAD_TO_16, rate=1.2)


def test_calibration_learns_acceptance_by_confidence():
    calib = AcceptanceCalibration(bins=10, prior_weight=2.0, decay=1.0)
    assert calib.rate(0.95) == pytest.approx(0.95)  # the prior: a calibrated draft
    assert calib.rate(0.05) == pytest.approx(0.05)
    # confident tokens always accepted, doubtful ones never; tokens after a rejection unseen
    for _ in range(50):
        calib.update([0.97, 0.93, 0.35, 0.96], accepted=2)
    assert calib.rate(0.95) > 0.99
    assert calib.rate(0.35) < 0.02
    assert calib.rate(0.75) == pytest.approx(0.75)  # never seen: still the prior


def _confident_policy(confidence_stop: bool = True) -> CostAwareLength:
    policy = CostAwareLength(initial=4, maximum=16, confidence_stop=confidence_stop)
    policy.use_costs(CPU_LIKE, padded=True)
    for _ in range(2):  # an int8-like draft: c = 0.06
        policy.observe_time(drafted=7, draft_seconds=7 * 0.06, fed=8, target_seconds=1.74)
    for _ in range(20):  # sure tokens accepted, doubtful ones rejected
        policy.update(_verdict(5, 6), [0.99, 0.98, 0.97, 0.99, 0.95, 0.3])
    return policy


def test_policy_with_confidences_drafts_long_and_stops_at_doubt():
    policy = _confident_policy()
    assert policy.next() == 16  # speculation pays: the stop rule decides the length
    stop = policy.stop_rule()
    assert stop is not None
    assert not stop([0.99, 0.98])  # sure so far: go on
    assert stop([0.99, 0.98, 0.3])  # a doubtful token: the rest is likely rejected
    assert policy.rate > 1.0  # the rounds paid: the bar for going on is above plain's 1
    assert policy.describe()["confidence_stop"] is True


def test_policy_without_confidence_stop_keeps_the_geometric_choice():
    policy = _confident_policy(confidence_stop=False)
    assert policy.stop_rule() is None
    # uncut drafts: alpha is accepted / (accepted + rejections) = 5 / 6 at the limit
    assert policy.alpha == pytest.approx(5 / 6, abs=0.02)
    choice = best_draft_length(policy.alpha, policy.c, CPU_LIKE, 16)
    assert choice.k > 0 and policy.next() == choice.k


def test_policy_with_doubtful_drafts_stops_speculating():
    policy = CostAwareLength(initial=4, probe_every=4, confidence_stop=True)
    policy.use_costs(CPU_LIKE, padded=True)
    for _ in range(2):  # an fp32-like draft: c = 0.38
        policy.observe_time(drafted=4, draft_seconds=4 * 0.38, fed=8, target_seconds=1.74)
    for _ in range(20):
        policy.update(_verdict(0, 2), [0.4, 0.3])
    assert [policy.next() for _ in range(4)] == [0, 0, 0, 0]


def test_drafters_report_confidence_and_obey_the_stop_rule(tiny, deep):
    target = tiny("llama")
    sampler = TokenSampler(SamplingSettings(do_sample=False))
    prompt = target.tokenizer("def add(a, b):")["input_ids"]
    drafter = ModelDrafter(tiny("llama", "perturbed"))
    full = drafter.propose(prompt, 6, sampler)
    assert len(full) == 6 and len(full.confidence) == 6
    # greedy: the confidence is the draft's top probability, after the first token too
    with torch.no_grad():
        logits = tiny("llama", "perturbed").model(torch.tensor([prompt])).logits[0, -1]
    assert full.confidence[0] == pytest.approx(float(torch.softmax(logits, -1).max()), rel=1e-4)
    asked: list[int] = []

    def two_tokens(conf):
        asked.append(len(conf))
        return len(conf) >= 2

    cut = drafter.propose(prompt, 6, sampler, two_tokens)
    assert cut.tokens == full.tokens[:2] and asked == [1, 2]
    # the layer-skip drafter (bound to a session of its target) does the same
    model = deep("llama")
    skipper = LayerSkipDrafter(model, SkipSet.of(attention=[2, 3]))
    skipper.bind(ModelSession(model.model))
    ids = model.tokenizer("def add(a, b):")["input_ids"]
    cut = skipper.propose(ids, 6, sampler, lambda conf: len(conf) >= 3)
    assert len(cut) == len(cut.confidence) <= 3
    assert all(0.0 < x <= 1.0 for x in cut.confidence)
    # prompt lookup has no confidences
    assert PromptLookupDrafter().propose([1, 2, 3, 1, 2], 3, sampler).confidence == []


@pytest.mark.parametrize("confidence_stop", [False, True])
def test_auto_schedule_with_layer_skip_keeps_greedy_identity(deep, confidence_stop):
    target = deep("llama")
    drafter = LayerSkipDrafter(target, SkipSet.of(attention=[1, 3], mlp=[4]))
    generator = SpeculativeGenerator(target, drafter, make_schedule("auto", 4, confidence_stop))
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=NEW)
        assert result.token_ids == reference(target, prompt), prompt


# ------------------------------------------------------------------------------- int8 draft
def test_default_draft_precision_is_int8_beside_a_float32_cpu_target(tiny):
    target = tiny("qwen2")
    assert draft_dtype_for(target) == "int8"
    assert draft_dtype_for(target, "float32") == "float32"  # what the user asked for wins
    half = dataclasses.replace(target, dtype=torch.bfloat16)
    assert draft_dtype_for(half) == "bfloat16"
    quantized = dataclasses.replace(target, dtype=torch.qint8)  # a name load_model takes
    assert draft_dtype_for(quantized) == "int8"


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
