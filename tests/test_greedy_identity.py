"""Greedy output is token-identical to transformers' generate(do_sample=False), whatever drafts."""

from __future__ import annotations

import pytest
import torch

from specdecode import HeuristicLength, ModelDrafter, PromptLookupDrafter, SpeculativeGenerator
from specdecode.sampling import SamplingSettings, TokenSampler

from .conftest import ARCHS

PROMPTS = ["def add(a, b):", "The quick brown fox", "for i in range(10):\n    print(i)\nfor i in"]
NEW = 48


def reference(target, prompt: str, **kwargs) -> list[int]:
    enc = target.tokenizer(prompt, return_tensors="pt")
    out = target.model.generate(**enc, do_sample=False, max_new_tokens=NEW, **kwargs)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def drafter_for(tiny, arch: str, kind: str):
    if kind == "plain":
        return None
    if kind == "prompt-lookup":
        return PromptLookupDrafter(max_ngram=3)
    draft_model = {"self": "target", "random": "unrelated", "perturbed": "perturbed"}[kind]
    # "self" loads a second copy so the drafter has its own cache
    return ModelDrafter(tiny(arch, draft_model) if kind != "self" else _copy(tiny, arch))


def _copy(tiny, arch):
    from specdecode.models import LoadedModel

    t = tiny(arch)
    return LoadedModel(t.model, t.tokenizer, t.name, t.dtype, t.device)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["plain", "self", "random", "perturbed", "prompt-lookup"])
def test_greedy_identity(tiny, arch, kind):
    target = tiny(arch)
    generator = SpeculativeGenerator(target, drafter_for(tiny, arch, kind), draft_length=4)
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=NEW)
        assert result.token_ids == reference(target, prompt), (arch, kind, prompt)
        assert result.stats.rounds >= 3
        if kind == "self":
            assert result.stats.alpha == 1.0  # the target as its own draft: all accepted
        if kind == "plain":
            assert result.stats.tau == 1.0 and result.stats.drafted == 0


def test_draft_model_prefill_is_timed_once_per_sequence(tiny):
    """The draft model's first draft of a sequence reads the prompt: that time is reported
    apart (part of the draft's time), and later drafts report none."""
    drafter = ModelDrafter(tiny("qwen2", "perturbed"))
    target = tiny("qwen2")
    ids = target.tokenizer(PROMPTS[2])["input_ids"]
    sampler = TokenSampler(SamplingSettings(do_sample=False))
    drafter.begin(ids)
    first = drafter.propose(ids, 3, sampler)
    second = drafter.propose([*ids, *first.tokens[:1]], 3, sampler)
    assert 0 < first.prefill_seconds <= first.seconds
    assert second.prefill_seconds == 0.0 and second.head(1).prefill_seconds == 0.0
    assert first.head(1).prefill_seconds == first.prefill_seconds

    result = SpeculativeGenerator(target, drafter, 4).generate(PROMPTS[2], max_new_tokens=NEW)
    assert 0 < result.stats.draft_prefill_seconds <= result.stats.draft_seconds


def test_a_draft_reading_only_the_prompts_tail_keeps_the_output_and_reads_less(tiny):
    """``prompt_window``: the draft reads the prompt's last tokens and what follows; the
    output is the target's whatever the draft reads."""
    target = tiny("qwen2")
    prompt = PROMPTS[2]
    prompt_ids = target.tokenizer(prompt)["input_ids"]
    assert len(prompt_ids) > 6
    drafter = ModelDrafter(_copy(tiny, "qwen2"), prompt_window=4)
    result = SpeculativeGenerator(target, drafter, 4).generate(prompt, max_new_tokens=NEW)
    assert result.token_ids == reference(target, prompt)
    # it read 4 prompt tokens and the generated ones, never the rest of the prompt
    assert drafter.session.ids[:4] == prompt_ids[-4:]
    assert len(drafter.session.ids) <= 4 + len(result.token_ids)
    assert drafter.describe()["prompt_window"] == 4
    # a window longer than the prompt reads it all
    whole = ModelDrafter(_copy(tiny, "qwen2"), prompt_window=10_000)
    SpeculativeGenerator(target, whole, 4).generate(prompt, max_new_tokens=8)
    assert whole.session.ids[: len(prompt_ids)] == prompt_ids
    with pytest.raises(ValueError, match="at least 1 token"):
        ModelDrafter(_copy(tiny, "qwen2"), prompt_window=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_identity_heuristic_schedule_and_confidence_stop(tiny, arch):
    target = tiny(arch)
    drafter = ModelDrafter(tiny(arch, "perturbed"), confidence_threshold=0.3)
    generator = SpeculativeGenerator(target, drafter, HeuristicLength(3))
    for prompt in PROMPTS:
        assert generator.generate(prompt, max_new_tokens=NEW).token_ids == reference(target, prompt)


def test_repetition_penalty_from_model_config_applies(tiny):
    target = tiny("qwen2")
    saved = target.model.generation_config.repetition_penalty
    target.model.generation_config.repetition_penalty = 1.3
    try:
        generator = SpeculativeGenerator(target, ModelDrafter(tiny("qwen2", "perturbed")), 4)
        for prompt in PROMPTS[:2]:
            ours = generator.generate(prompt, max_new_tokens=NEW).token_ids
            assert ours == reference(target, prompt)
    finally:
        target.model.generation_config.repetition_penalty = saved


def test_draft_with_padded_embedding_matrix(tmp_path, tiny):
    """A draft whose embedding matrix is padded larger (same tokenizer) works and stays exact."""
    from specdecode.models import load_model
    from specdecode.testing import make_tiny_model, tiny_tokenizer

    make_tiny_model(tmp_path, "llama", seed=5, vocab_size=384)
    tiny_tokenizer(320).save_pretrained(tmp_path)  # same tokenizer as the target, padded matrix
    draft = load_model(tmp_path, device="cpu")
    target = tiny("llama")
    generator = SpeculativeGenerator(target, ModelDrafter(draft), 4)
    for temperature in (None, 0.9):
        kwargs = {"temperature": temperature} if temperature else {}
        result = generator.generate(PROMPTS[0], max_new_tokens=NEW, seed=1, **kwargs)
        if temperature is None:
            assert result.token_ids == reference(target, PROMPTS[0])
        assert all(t < 320 for t in result.token_ids)
    assert torch.is_tensor(draft.model.get_input_embeddings().weight)


MORE_ARCHS = {
    "mistral": {},
    "gemma2": {"head_dim": 16, "sliding_window": 8},  # sliding-window layers: HF's own cache
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "phi3": {},
}


@pytest.mark.parametrize("arch", sorted(MORE_ARCHS))
def test_greedy_identity_more_architectures(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from specdecode.models import LoadedModel
    from specdecode.testing import tiny_tokenizer

    tok = tiny_tokenizer(320)
    small = {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    config = AutoConfig.for_model(arch, **{**small, **MORE_ARCHS[arch]})
    config.initializer_range = 0.2
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(AutoModelForCausalLM.from_config(config).eval())
    with torch.no_grad():  # the draft: the target's weights plus noise
        for p, d in zip(models[0].parameters(), models[1].parameters(), strict=True):
            d.copy_(p + 0.03 * torch.randn_like(p))
    target, draft = (LoadedModel(m, tok, arch, torch.float32, torch.device("cpu")) for m in models)
    prompt = PROMPTS[2]
    enc = tok(prompt, return_tensors="pt")
    ref = models[0].generate(**enc, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    ref_ids = ref[0, enc["input_ids"].shape[1] :].tolist()
    for drafter in (ModelDrafter(draft), PromptLookupDrafter()):
        result = SpeculativeGenerator(target, drafter, 4).generate(
            prompt, max_new_tokens=NEW, eos_token_id=[]
        )
        assert result.token_ids == ref_ids, (arch, drafter.name)
