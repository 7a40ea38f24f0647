"""Prompt lookup in front of a model (LookupDrafter): free drafts, the schedule's choice and
the output kept."""

from __future__ import annotations

import random

import pytest

from specdecode import (
    CostAwareLength,
    FixedLength,
    LookupDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    RoundEvent,
    SpeculativeGenerator,
)
from specdecode.drafters import Draft, Drafter
from specdecode.drafters.prompt_lookup import find_continuation, find_match
from specdecode.errors import InvalidSettingsError
from specdecode.models.costs import PassCosts
from specdecode.sampling import SamplingSettings, TokenSampler
from specdecode.verify import Verdict

from .test_greedy_identity import NEW, PROMPTS, reference

GREEDY = TokenSampler(SamplingSettings(do_sample=False))


class CountingDrafter(Drafter):
    """Proposes a fixed token and records what the hybrid passes on to it."""

    name = "counting"

    def __init__(self) -> None:
        self.proposed = 0
        self.observed: list[Verdict] = []
        self.begun: list[list[int]] = []

    def begin(self, prompt_ids):
        self.begun.append(list(prompt_ids))

    def propose(self, ids, max_tokens, sampler, stop=None):
        self.proposed += 1
        return Draft([7] * max_tokens)

    def observe(self, verdict):
        self.observed.append(verdict)


def test_find_match_reports_the_ngram_length():
    ids = [5, 8, 9, 3, 5, 8]
    assert find_match(ids, 4, 3, 1) == find_match(ids, 4, 2, 2)
    match = find_match(ids, 4, 3, 1)
    assert match is not None and match.tokens == [9, 3, 5, 8] and match.ngram == 2
    assert find_match([1, 2, 3, 4], 4, 3, 1) is None
    assert find_continuation(ids, 2, 3, 1) == [9, 3]
    assert PromptLookupDrafter(3).propose(ids, 3, GREEDY).ngram == 2


def test_free_draft_is_the_lookup_within_both_limits():
    inner = CountingDrafter()
    hybrid = LookupDrafter(inner, lookup_tokens=3)
    ids = [1, 2, 3, 4, 5, 6, 1, 2]
    draft = hybrid.free_draft(ids, 10)
    assert draft is not None and draft.free and draft.ngram == 2 and draft.q is None
    assert draft.tokens == [3, 4, 5]  # lookup_tokens
    assert hybrid.free_draft(ids, 2).tokens == [3, 4]  # the loop's budget
    assert hybrid.free_draft([1, 2, 3, 4, 5, 6, 9, 2], 10) is None  # a 1-gram is below min 2
    assert LookupDrafter(inner, min_ngram=1).free_draft([1, 2, 3, 4, 5, 6, 9, 2], 10) is not None
    assert inner.proposed == 0
    assert hybrid.propose(ids, 2, GREEDY).tokens == [7, 7] and inner.proposed == 1
    described = hybrid.describe()
    assert described["model"] == {"name": "counting"} and described["lookup_tokens"] == 3


@pytest.mark.parametrize(
    "kwargs", [{"lookup_tokens": 0}, {"min_ngram": 0}, {"min_ngram": 4, "max_ngram": 3}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(InvalidSettingsError):
        LookupDrafter(CountingDrafter(), **kwargs)
    with pytest.raises(InvalidSettingsError, match="another lookup"):
        LookupDrafter(LookupDrafter(CountingDrafter()))


def costs() -> PassCosts:
    # every pass size up to 17 costs one step: only acceptance decides
    return PassCosts({n: 1.0 for n in range(1, 18)}, step_seconds=0.1)


def test_cost_aware_schedule_weighs_lookup_against_the_model():
    schedule = CostAwareLength(initial=4)
    draft = Draft([1, 2, 3, 4, 5, 6], free=True, ngram=3)
    assert schedule.free_length(draft) == 6  # no costs yet: taken whole
    schedule.use_costs(costs(), padded=False)
    schedule.observe_time(4, 0.04, 5, 0.1)  # first draft: catching up, not timed
    schedule.observe_time(4, 0.04, 5, 0.1)  # c = 0.1
    assert schedule.c == pytest.approx(0.1)
    alpha_before = schedule.alpha
    for _ in range(6):  # lookup drafts from 3-grams rejected at once
        schedule.update_free(draft, Verdict(0, 9, 6))
    assert schedule.alpha == alpha_before  # the model's acceptance is its own
    assert schedule.free_length(draft) == 0
    assert schedule.free_length(Draft([1] * 6, free=True, ngram=2)) == 6  # the prior
    for _ in range(6):
        schedule.update_free(draft, Verdict(6, 9, 6))
    assert schedule.free_length(draft) == 6
    schedule.reset()  # a new sequence: lookup acceptance back to the prior
    assert schedule.lookup.alpha(3) == schedule.lookup.prior_alpha


def test_a_free_draft_is_cut_to_the_cheapest_pass_that_pays():
    """On CPU-like costs a 2-token pass costs twice a 1-token one and 8 tokens fewer: of an
    11-token lookup the schedule verifies the head that fills the cheap 8-token pass."""
    schedule = CostAwareLength(initial=4, prior_alpha=0.3)  # a poor model: lookup wins
    schedule.use_costs(PassCosts({1: 1.0, 2: 2.0, 4: 2.0, 8: 1.2, 16: 2.5}), padded=True)
    schedule.observe_time(4, 0.04, 5, 0.1)
    schedule.observe_time(4, 0.2, 5, 0.1)  # c = 0.6: the model does not pay, plain is the bar
    assert schedule.free_length(Draft([1] * 11, free=True, ngram=3)) == 7  # 7 + 1 fill 8


def test_the_draft_cost_is_measured_where_lookup_and_model_rounds_alternate():
    schedule = CostAwareLength(initial=4)
    schedule.use_costs(costs(), padded=False)
    schedule.observe_time(4, 0.5, 5, 0.1)  # the sequence's first draft: its prefill, not timed
    for _ in range(3):
        schedule.observe_time(6, 1e-4, 7, 0.1, free=True)  # a lookup: no draft step
        assert schedule.c is None or schedule.c == pytest.approx(0.2)
        schedule.observe_time(4, 0.08, 5, 0.1)  # a model round after it: timed
    assert schedule.c == pytest.approx(0.2)
    schedule.observe_time(0, 0.0, 1, 0.1)  # a plain round: the next draft catches up
    schedule.observe_time(4, 0.8, 5, 0.1)  # ... and is not timed
    assert schedule.c == pytest.approx(0.2)


def test_free_rounds_time_no_draft_step_and_leave_the_model_alone(tiny):
    target = tiny("qwen2")
    inner = CountingDrafter()
    schedule = CostAwareLength(initial=3)
    generator = SpeculativeGenerator(target, LookupDrafter(inner), schedule)
    result = generator.generate(PROMPTS[2], max_new_tokens=NEW)
    stats = result.stats
    assert stats.free_rounds > 0 and stats.free_drafted >= stats.free_accepted
    assert stats.free_drafted <= stats.drafted
    # the inner drafter sees only its own rounds' verdicts
    assert len(inner.observed) == stats.rounds - stats.free_rounds
    assert inner.proposed == sum(1 for v in inner.observed if v.num_drafted)
    assert inner.begun == [list(result.prompt_ids)]


@pytest.mark.parametrize("schedule", ["fixed", "auto"])
def test_greedy_identity_with_lookup_in_front_of_a_draft_model(tiny, schedule):
    target = tiny("qwen2")
    drafter = LookupDrafter(ModelDrafter(tiny("qwen2", "perturbed")), lookup_tokens=6)
    length = FixedLength(4) if schedule == "fixed" else CostAwareLength(initial=4)
    generator = SpeculativeGenerator(target, drafter, length)
    free = 0
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=NEW)
        assert result.token_ids == reference(target, prompt), (schedule, prompt)
        free += result.stats.free_rounds
        assert result.stats.free_rounds < result.stats.rounds or result.stats.rounds < 3
    assert free > 0  # the tiny target repeats itself: lookup found something


@pytest.mark.parametrize("mode", ["seeded", "rejection"])
def test_sampled_output_with_lookup_in_front(tiny, mode):
    target = tiny("qwen2")
    # any 1-gram match is taken (a constant schedule takes every free draft)
    model = ModelDrafter(tiny("qwen2", "perturbed"))
    drafter = LookupDrafter(model, lookup_tokens=6, min_ngram=1)
    hybrid = SpeculativeGenerator(target, drafter, 4)
    kwargs = {"max_new_tokens": 32, "do_sample": True, "temperature": 0.5, "top_k": 20}
    out = hybrid.generate(PROMPTS[2], seed=3, sampling_mode=mode, **kwargs)
    assert len(out.token_ids) == 32 and out.stats.free_rounds > 0
    if mode == "seeded":
        plain = SpeculativeGenerator(target).generate(
            PROMPTS[2], seed=3, sampling_mode=mode, **kwargs
        )
        assert out.token_ids == plain.token_ids


@pytest.mark.parametrize(
    ("extra", "kind"),
    [
        (["--prompt-lookup"], PromptLookupDrafter),
        (["--draft", "perturbed"], ModelDrafter),
        (["--draft", "perturbed", "--prompt-lookup", "--lookup-tokens", "6"], LookupDrafter),
    ],
)
def test_cli_puts_lookup_in_front_only_beside_a_model(tiny, tiny_dir, extra, kind):
    from specdecode.cli.common import build_drafter
    from specdecode.cli.main import build_parser

    if extra[:1] == ["--draft"]:
        extra = ["--draft", str(tiny_dir("qwen2", "perturbed")), *extra[2:]]
    args = build_parser().parse_args(["generate", "x", "--target", "t", *extra])
    drafter = build_drafter(args, tiny("qwen2"))
    assert type(drafter) is kind
    if isinstance(drafter, PromptLookupDrafter):
        assert drafter.min_ngram == 1  # alone, any match is worth a free try
    if isinstance(drafter, LookupDrafter):
        assert drafter.min_ngram == 2 and drafter.lookup_tokens == 6
        assert isinstance(drafter.model, ModelDrafter)


def test_layer_skip_drafting_behind_lookup_keeps_the_output(tiny):
    from specdecode.drafters.layerskip import LayerSkipDrafter
    from specdecode.models.layerskip import SkipSet

    target = tiny("llama")
    skip = LayerSkipDrafter(target, SkipSet.of(attention=[1], mlp=[0]))
    generator = SpeculativeGenerator(target, LookupDrafter(skip), 3)  # binds through the hybrid
    assert skip.session is generator.session
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=NEW)
        assert result.token_ids == reference(target, prompt), prompt


def test_transformers_call_settings_reach_the_model_behind_lookup(tiny):
    target = tiny("qwen2")
    model = ModelDrafter(tiny("qwen2", "perturbed"))
    generator = SpeculativeGenerator(target, LookupDrafter(model, min_ngram=2), 4)
    runner = generator._for_call(_overrides(assistant_confidence_threshold=0.3))
    assert isinstance(runner.drafter, LookupDrafter) and runner.drafter.model is not model
    assert runner.drafter.model.confidence_threshold == 0.3 and model.confidence_threshold is None
    runner = generator._for_call(_overrides(max_matching_ngram_size=1))
    assert (runner.drafter.max_ngram, runner.drafter.min_ngram) == (1, 1)
    assert runner.drafter.model is model
    result = generator.generate(PROMPTS[2], max_new_tokens=NEW, assistant_confidence_threshold=0.3)
    assert result.token_ids == reference(target, PROMPTS[2])


def _overrides(**kwargs):
    from specdecode.decoding.transformers_args import DraftingOverrides

    return DraftingOverrides(**kwargs)


def test_the_ngram_index_finds_what_a_full_scan_finds():
    """Grown a few tokens at a time, switched to other sequences now and then, the index
    answers every query as find_match's scan of the whole sequence does."""
    from specdecode.drafters.prompt_lookup import NgramIndex

    rng = random.Random(0)
    for max_ngram, min_ngram in [(3, 1), (3, 2), (1, 1), (4, 3)]:
        index = NgramIndex(max_ngram, min_ngram)
        ids: list[int] = []
        for step in range(400):
            if step % 97 == 0:  # another sequence (a shared prefix, then other tokens)
                ids = [*ids[: rng.randrange(len(ids) + 1)], rng.randrange(6)]
            ids = [*ids, *(rng.randrange(6) for _ in range(rng.randrange(1, 4)))]
            k = rng.randrange(1, 8)
            assert index.find(ids, k) == find_match(ids, k, max_ngram, min_ngram), (step, ids)
    assert NgramIndex(3, 1).find([4], 3) is None and NgramIndex(3, 1).find([4, 4], 0) is None


def test_round_events_say_which_drafts_prompt_lookup_copied(tiny):
    target = tiny("qwen2")
    model = ModelDrafter(tiny("qwen2", "perturbed"))
    for drafter in (LookupDrafter(model, min_ngram=1), PromptLookupDrafter(3), model):
        events = list(
            SpeculativeGenerator(target, drafter, 4).stream(PROMPTS[2], max_new_tokens=NEW)
        )
        rounds = [e for e in events if isinstance(e, RoundEvent)]
        copied = [e for e in rounds if e.copied]
        assert all(e.num_drafted > 0 for e in copied)
        if isinstance(drafter, ModelDrafter):
            assert not copied
        else:
            assert copied
        if isinstance(drafter, LookupDrafter):  # lookup and model rounds in one generation
            assert len(copied) < sum(1 for e in rounds if e.num_drafted)
