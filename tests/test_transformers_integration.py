"""transformers both ways: our layer-skip assistant inside ``generate(assistant_model=...)``, and
transformers' ``generate`` arguments (a ``GenerationConfig``, tensors, assisted-generation
settings) through our API. Greedy output must equal plain ``generate`` token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from specdecode import SpeculativeGenerator, skip_assistant
from specdecode.decoding.config import resolve_request
from specdecode.drafters import FixedLength, PromptLookupDrafter
from specdecode.drafters.layerskip import DraftExit, LayerSkipDrafter
from specdecode.errors import InvalidSettingsError, ProfileMismatchError, PromptError
from specdecode.models.layerskip import SkipSet, decoder_layout
from specdecode.sampling import TokenSampler
from specdecode.search.profile import DraftSettings, ModelIdentity, SkipProfile
from specdecode.testing import make_tiny_model

from .conftest import DEEP_LAYERS as LAYERS

NEW = 24
PROMPT = "def add(a, b):"
SKIPS = {
    "none": SkipSet(),
    "some": SkipSet.of(attention=[2, 4], mlp=[3]),
    "most": SkipSet.of(attention=range(1, LAYERS), mlp=range(LAYERS)),
}
TRANSFORMERS_DEFAULTS = {"use_profile_settings": False}  # 20 tokens, constant, threshold 0.4
K5_HEURISTIC = {"num_assistant_tokens": 5, "num_assistant_tokens_schedule": "heuristic"}


def profile_for(target, skip: SkipSet, k: int = 4) -> SkipProfile:
    draft = DraftSettings(max_draft_tokens=k)
    return SkipProfile(ModelIdentity.of(target), skip.attention, skip.mlp, draft=draft)


def encoded(target, prompt: str = PROMPT):
    return target.tokenizer(prompt, return_tensors="pt")


def new_tokens(out: torch.Tensor, enc) -> list[int]:
    return out[0, enc["input_ids"].shape[1] :].tolist()


def plain(target, enc, **kwargs) -> list[int]:
    return new_tokens(
        target.model.generate(**enc, do_sample=False, max_new_tokens=NEW, **kwargs), enc
    )


def patched_modules(model) -> list[str]:
    """Submodules whose forward is shadowed on the instance (what skip_layers does)."""
    return [name for name, m in model.named_modules() if name and "forward" in vars(m)]


@pytest.fixture
def never_skipped_target():
    """Hooks a target so that any call of it while a sublayer is skipped fails the test."""
    handles = []

    def install(model):
        def check(module, args):
            assert patched_modules(model) == [], "the target ran with sublayers skipped"

        handles.append(model.register_forward_pre_hook(check))

    yield install
    for handle in handles:
        handle.remove()


# ------------------------------------------------------------------ skip_assistant in generate
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("which", list(SKIPS))
def test_generate_with_skip_assistant_equals_plain_greedy(deep, arch, which, never_skipped_target):
    target = deep(arch)
    enc = encoded(target)
    reference = plain(target, enc)
    assistant = skip_assistant(target.model, profile_for(target, SKIPS[which]))
    never_skipped_target(target.model)
    assert plain(target, enc, assistant_model=assistant) == reference, (arch, which)
    assert patched_modules(target.model) == []

    ids = enc["input_ids"]
    with torch.inference_mode():
        full, drafted = target.model(input_ids=ids).logits, assistant(input_ids=ids).logits
    assert torch.equal(full, drafted) == (which == "none")  # the assistant really skips


@pytest.mark.parametrize("settings", [TRANSFORMERS_DEFAULTS, K5_HEURISTIC], ids=["defaults", "k5"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_assistant_settings_keep_the_output(deep, arch, settings):
    target = deep(arch)
    enc = encoded(target, "The quick brown fox")
    assistant = skip_assistant(target.model, profile_for(target, SKIPS["some"]), **settings)
    expected_k = 5 if settings is K5_HEURISTIC else None  # None: transformers' default (20)
    assert assistant.generation_config.num_assistant_tokens == expected_k
    assert plain(target, enc, assistant_model=assistant) == plain(target, enc)


def test_the_profile_may_be_a_path_and_its_settings_become_the_assistants(deep, tmp_path):
    target = deep("qwen2")
    path = tmp_path / "profile.json"
    profile = profile_for(target, SKIPS["some"], k=6)
    SkipProfile(profile.model, profile.attention, profile.mlp, DraftSettings(6, None)).save(path)
    assistant = skip_assistant(target, str(path))  # a LoadedModel is accepted too
    config = assistant.generation_config
    assert (config.num_assistant_tokens, config.num_assistant_tokens_schedule) == (6, "constant")
    assert config.assistant_confidence_threshold == 0.0  # fixed k: no confidence stop
    assert assistant.skip_set == SKIPS["some"]
    enc = encoded(target)
    assert plain(target, enc, assistant_model=assistant) == plain(target, enc)


def test_the_weights_are_shared_not_copied(deep):
    for arch in ("llama", "gpt2"):
        model = deep(arch).model
        assistant = skip_assistant(model, profile_for(deep(arch), SKIPS["some"]))
        mine = dict(model.named_parameters())
        theirs = dict(assistant.named_parameters())
        assert mine.keys() == theirs.keys()
        for name, param in mine.items():
            assert theirs[name] is param
            assert theirs[name].data_ptr() == param.data_ptr(), name


def test_the_target_is_unchanged_after_use(deep):
    target = deep("llama")
    model = target.model
    enc = encoded(target)
    reference = plain(target, enc)
    config_before = model.generation_config.to_dict()
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    assistant = skip_assistant(model, profile_for(target, SKIPS["most"]), **K5_HEURISTIC)
    plain(target, enc, assistant_model=assistant)
    # transformers wrote the heuristic's final k back into the assistant's config, not the target's
    assert model.generation_config.to_dict() == config_before
    assert assistant.generation_config is not model.generation_config
    assert patched_modules(model) == [] and "forward" not in vars(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights_before[name]), name
    assert plain(target, enc) == reference


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_target_is_restored_after_an_exception_inside_the_assistant(deep, arch):
    target = deep(arch)
    model = target.model
    enc = encoded(target)
    reference = plain(target, enc)
    assistant = skip_assistant(model, profile_for(target, SKIPS["some"]))
    # a sublayer both run; it fails only while layers are skipped, i.e. in the assistant's forward
    kept = decoder_layout(model).layers[0].mlp

    def fail_while_skipping(module, args):
        if patched_modules(model):
            raise Boom("inside the assistant's forward")

    handle = kept.register_forward_pre_hook(fail_while_skipping)
    try:
        with pytest.raises(Boom):
            plain(target, enc, assistant_model=assistant)
    finally:
        handle.remove()
    assert patched_modules(model) == []
    assert plain(target, enc) == reference
    assert plain(target, enc, assistant_model=assistant) == reference  # still usable


def test_a_profile_for_another_model_is_a_clear_error(deep):
    small = make_tiny_model(arch="llama", layers=2)
    with pytest.raises(ProfileMismatchError, match="specdecode search"):
        skip_assistant(small, profile_for(deep("llama"), SKIPS["some"]))
    with pytest.raises(ProfileMismatchError):
        skip_assistant(deep("qwen2").model, profile_for(deep("llama"), SKIPS["none"]))


def test_bad_assistant_settings_are_clear_errors(deep):
    target = deep("llama")
    profile = profile_for(target, SKIPS["some"])
    with pytest.raises(InvalidSettingsError, match="num_assistant_tokens"):
        skip_assistant(target, profile, num_assistant_tokens=0)
    with pytest.raises(InvalidSettingsError, match="schedule"):
        skip_assistant(target, profile, num_assistant_tokens_schedule="greedy")
    with pytest.raises(InvalidSettingsError, match="unknown assistant setting"):
        skip_assistant(target, profile, draft_tokens=3)
    with pytest.raises(InvalidSettingsError, match="skip profile"):
        skip_assistant(target, SKIPS["some"])


def test_the_bench_mode_runs_transformers_loop_with_our_assistant(deep):
    from specdecode.bench.catalog import HF_LAYER_SKIP, ModeConfig, standard_modes

    target = deep("llama")
    enc = encoded(target)
    drafter = LayerSkipDrafter(target, SKIPS["some"], DraftExit(threshold=None))
    (mode,) = standard_modes(target, [HF_LAYER_SKIP], ModeConfig(k=3), layer_skip=drafter)
    request = resolve_request(target, enc["input_ids"].shape[1], max_new_tokens=NEW)
    out = mode.run(enc["input_ids"][0].tolist(), request, seed=0)
    assert out.token_ids == plain(target, enc)
    assert out.draft_passes > 0 and out.target_passes < NEW
    assert mode.describe()["num_assistant_tokens"] == 3


# ----------------------------------------------------------- transformers' arguments, our API
def test_generation_config_and_tensors_give_transformers_greedy_output(deep):
    target = deep("llama")
    enc = encoded(target)
    config = GenerationConfig(do_sample=False, max_new_tokens=NEW)
    expected = new_tokens(target.model.generate(**enc, generation_config=config), enc)
    generator = SpeculativeGenerator(target, LayerSkipDrafter(target, SKIPS["some"]), 4)
    assert generator.generate(**enc, generation_config=config).token_ids == expected
    assert generator.generate(enc, generation_config=config).token_ids == expected
    length = enc["input_ids"].shape[1] + NEW
    by_length = GenerationConfig(do_sample=False, max_length=length)
    assert generator.generate(**enc, generation_config=by_length).token_ids == expected
    assert generator.generate(input_ids=enc["input_ids"], max_length=length).token_ids == expected


def test_padding_is_dropped_and_one_sequence_at_a_time(deep):
    target = deep("qwen2")
    enc = encoded(target)
    generator = SpeculativeGenerator(target)
    expected = generator.generate(**enc, max_new_tokens=8).token_ids
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), enc["input_ids"]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), enc["attention_mask"]], dim=1)
    result = generator.generate(input_ids=padded, attention_mask=mask, max_new_tokens=8)
    assert result.token_ids == expected
    with pytest.raises(PromptError, match="one at a time"):
        generator.generate(input_ids=padded.repeat(2, 1), max_new_tokens=8)
    with pytest.raises(PromptError, match="once"):
        generator.generate(PROMPT, input_ids=enc["input_ids"])


def test_assisted_generation_settings_apply_to_one_call(deep):
    target = deep("gpt2")
    enc = encoded(target)
    expected = plain(target, enc)
    drafter = LayerSkipDrafter(target, SKIPS["some"])
    generator = SpeculativeGenerator(target, drafter, 4)
    heuristic = generator.generate(
        **enc, max_new_tokens=NEW, assistant_confidence_threshold=0.3, **K5_HEURISTIC
    )
    assert heuristic.token_ids == expected
    assert heuristic.stats.drafted > 0
    lookup = generator.generate(
        **enc, max_new_tokens=NEW, prompt_lookup_num_tokens=5, max_matching_ngram_size=2
    )
    assert lookup.token_ids == expected
    # the generator's own drafter and schedule are untouched
    assert generator.drafter is drafter and drafter.exit.threshold == DraftExit().threshold
    assert generator.schedule == FixedLength(4)
    config = GenerationConfig(max_new_tokens=NEW, prompt_lookup_num_tokens=4)
    plain_generator = SpeculativeGenerator(target)
    assert plain_generator.generate(**enc, generation_config=config).token_ids == expected
    assert plain_generator.drafter is None
    with pytest.raises(InvalidSettingsError, match="need a drafter"):
        plain_generator.generate(**enc, num_assistant_tokens=3)
    with pytest.raises(InvalidSettingsError, match="PromptLookupDrafter"):
        SpeculativeGenerator(target, PromptLookupDrafter()).generate(
            **enc, assistant_confidence_threshold=0.5
        )


def test_sampled_generation_config_resolves_to_transformers_processed_scores(deep):
    """Through a GenerationConfig, our processed scores equal the ones transformers samples from."""
    target = deep("llama")
    enc = encoded(target)
    config = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        repetition_penalty=1.3,
        max_new_tokens=6,
    )
    torch.manual_seed(0)
    out = target.model.generate(
        **enc, generation_config=config, output_scores=True, return_dict_in_generate=True
    )
    theirs = torch.cat(out.scores)  # (new, V): processed scores at each step
    prompt_length = enc["input_ids"].shape[1]
    request = resolve_request(target, prompt_length, generation_config=config)
    assert request.max_new_tokens == 6 and request.sampling.do_sample
    sequence = out.sequences[0].tolist()
    with torch.inference_mode():
        logits = target.model(input_ids=out.sequences).logits[0, prompt_length - 1 : -1].float()
    ours = TokenSampler(request.sampling, torch.Generator()).scores(logits, sequence, prompt_length)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)
