"""Reusing the previous sequence's KV cache for a new prompt's shared prefix (a chat's history,
several samples of one prompt): the same tokens as a fresh prefill, fewer positions computed."""

from __future__ import annotations

from typing import Any

import pytest

from specdecode import LookupDrafter, ModelDrafter, PromptLookupDrafter, SpeculativeGenerator
from specdecode.models import load_model

FIRST = "def add(a, b):"
NEW = 16


def _turns(tokenizer: Any, first: list[int], answer: list[int]) -> list[list[int]]:
    """A conversation's prompts: the first, then it with its answer and a follow-up (the
    prefix the cache keeps), the first again, and an unrelated one (nothing to keep)."""
    follow_up = tokenizer("\n# now subtract")["input_ids"]
    unrelated = tokenizer("import os\nimport sys")["input_ids"]
    return [first + answer + follow_up, first, unrelated]


def _feeds(session: Any) -> list[int]:
    """Record how many ids each forward pass of ``session`` is fed."""
    sizes: list[int] = []
    forward = session.forward

    def counting(new_ids: Any, num_logits: int = 1) -> Any:
        sizes.append(len(new_ids))
        return forward(new_ids, num_logits)

    session.forward = counting
    return sizes


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("kind", ["plain", "draft", "prompt-lookup", "lookup-draft"])
def test_reused_prefix_gives_the_tokens_of_a_fresh_prefill(tiny, arch: str, kind: str) -> None:
    target = tiny(arch)

    def drafter() -> Any:
        if kind == "plain":
            return None
        if kind == "prompt-lookup":
            return PromptLookupDrafter(max_ngram=3)
        if kind == "lookup-draft":
            return LookupDrafter(ModelDrafter(tiny(arch, "perturbed")), min_ngram=2)
        return ModelDrafter(tiny(arch, "perturbed"))

    cached = SpeculativeGenerator(target, drafter(), 4, reuse_prompt_cache=True)
    fresh = SpeculativeGenerator(target, drafter(), 4)
    first = target.tokenizer(FIRST)["input_ids"]
    opening = cached.generate(first, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    assert opening.stats.cached_prompt_tokens == 0  # nothing before it
    for prompt in _turns(target.tokenizer, first, opening.token_ids):
        got = cached.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
        want = fresh.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
        assert got.token_ids == want.token_ids
        assert want.stats.cached_prompt_tokens == 0
        shared = 0
        while shared < min(len(prompt), len(first)) and prompt[shared] == first[shared]:
            shared += 1
        if shared:  # at least the shared part of the first prompt was kept
            assert got.stats.cached_prompt_tokens >= min(shared, len(prompt) - 1)
        first = prompt


def test_a_draft_model_reads_only_the_new_part(tiny) -> None:
    target = tiny("qwen2")
    drafter = ModelDrafter(tiny("qwen2", "perturbed"))
    gen = SpeculativeGenerator(target, drafter, 4, reuse_prompt_cache=True)
    first = target.tokenizer(FIRST)["input_ids"]
    answer = gen.generate(first, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    follow = first + answer.token_ids + target.tokenizer("\n# more")["input_ids"]
    target_feeds, draft_feeds = _feeds(gen.session), _feeds(drafter.session)
    result = gen.generate(follow, max_new_tokens=4, do_sample=False, eos_token_id=[])
    assert result.stats.cached_prompt_tokens >= len(first)
    assert target_feeds[0] == len(follow) - result.stats.cached_prompt_tokens  # the prefill
    assert draft_feeds[0] < len(follow) - len(first)  # the draft kept its part too


def test_a_static_cache_is_reused_too(tiny_dir) -> None:
    target = load_model(tiny_dir("llama"), device="cpu", session_kind="static")
    cached = SpeculativeGenerator(target, PromptLookupDrafter(), 4, reuse_prompt_cache=True)
    fresh = SpeculativeGenerator(target, PromptLookupDrafter(), 4)
    first = target.tokenizer(FIRST)["input_ids"]
    answer = cached.generate(first, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    follow = first + answer.token_ids + first
    got = cached.generate(follow, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    want = fresh.generate(follow, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    assert got.token_ids == want.token_ids and got.stats.cached_prompt_tokens > len(first)


def test_prompt_logprobs_need_a_full_prefill(tiny) -> None:
    """Scoring the prompt needs every position's logits: nothing is reused then."""
    target = tiny("qwen2")
    gen = SpeculativeGenerator(target, reuse_prompt_cache=True)
    gen.generate(FIRST, max_new_tokens=4, do_sample=False)
    scored = gen.generate(FIRST, max_new_tokens=4, do_sample=False, prompt_logprobs=0)
    assert scored.stats.cached_prompt_tokens == 0 and scored.prompt_logprobs is not None
    again = gen.generate(FIRST, max_new_tokens=4, do_sample=False)
    assert again.stats.cached_prompt_tokens == len(scored.prompt_ids) - 1
    assert again.token_ids == scored.token_ids


def test_a_failed_generation_is_not_reused(tiny) -> None:
    """A pass that failed midway may leave half-written caches: the next prompt is prefilled
    whole, in the target and the draft."""
    target = tiny("llama")
    drafter = ModelDrafter(tiny("llama", "perturbed"))
    gen = SpeculativeGenerator(target, drafter, 4, reuse_prompt_cache=True)
    first = target.tokenizer(FIRST)["input_ids"]
    gen.generate(first, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    forward = gen.session.forward
    calls = 0

    def failing(new_ids: Any, num_logits: int = 1) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("out of memory")
        return forward(new_ids, num_logits)

    gen.session.forward = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="out of memory"):
        gen.generate(first, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    gen.session.forward = forward  # type: ignore[method-assign]
    after = gen.generate(first, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    assert after.stats.cached_prompt_tokens == 0
    fresh = SpeculativeGenerator(target, ModelDrafter(tiny("llama", "perturbed")), 4)
    want = fresh.generate(first, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    assert after.token_ids == want.token_ids
    again = gen.generate(first, max_new_tokens=NEW, do_sample=False, eos_token_id=[])
    assert again.stats.cached_prompt_tokens == len(first) - 1  # reused once all is well
