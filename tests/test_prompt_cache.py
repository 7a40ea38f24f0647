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


def _sliding_window_model(folder: Any) -> Any:
    """A tiny Mistral whose layers attend to a window of 16 positions."""
    from specdecode.testing import make_tiny_model

    make_tiny_model(folder, "mistral", sliding_window=16)
    return load_model(folder, device="cpu")


def test_sliding_window_targets_are_prefilled_whole(tmp_path) -> None:
    """A sliding-window layer can be cut back only by what its last pass added: such a target
    never keeps a prefix, and every request works (they used to fail every other time)."""
    target = _sliding_window_model(tmp_path)
    cached = SpeculativeGenerator(target, reuse_prompt_cache=True)
    fresh = SpeculativeGenerator(target)
    first = target.tokenizer(FIRST)["input_ids"]
    for prompt in (first, first, target.tokenizer("import os")["input_ids"], first):
        got = cached.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=[])
        want = fresh.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=[])
        assert got.token_ids == want.token_ids and got.stats.cached_prompt_tokens == 0


def test_drafters_written_before_reuse_cache_still_work(tiny) -> None:
    from specdecode.drafters import Draft, Drafter

    class Legacy(Drafter):
        name = "legacy"

        def begin(self, prompt_ids):  # type: ignore[no-untyped-def, override]
            self.begun = list(prompt_ids)

        def propose(self, ids, max_tokens, sampler, stop=None):  # type: ignore[no-untyped-def]
            return Draft([ids[-1]] * max_tokens, None, 0.0)

    target = tiny("llama")
    gen = SpeculativeGenerator(target, Legacy(), 3, reuse_prompt_cache=True)
    first = target.tokenizer(FIRST)["input_ids"]
    results = [gen.generate(first, max_new_tokens=8, do_sample=False) for _ in range(3)]
    assert [r.token_ids for r in results[1:]] == [results[0].token_ids] * 2
    assert results[2].stats.cached_prompt_tokens == len(first) - 1


def test_the_server_reports_kept_positions_per_prompt(tiny) -> None:
    """``usage.prompt_tokens_details.cached_tokens`` counts each prompt's first choice, as
    ``prompt_tokens`` counts each prompt once, also when a list repeats a prompt."""
    import torch

    from specdecode.cli.serve import prompt_cache_on
    from specdecode.server import Engine, ServerSettings, create_app

    from .test_server import post

    target = tiny("llama")
    engine = Engine(SpeculativeGenerator(target, reuse_prompt_cache=True), timeout=60)
    try:
        app = create_app(engine, ServerSettings(served_model_name="tiny"))
        ask = {"model": "tiny", "prompt": [FIRST, FIRST], "n": 2, "max_tokens": 3}
        usage = post(app, "/v1/completions", ask).json()["usage"]
    finally:
        engine.close()
    length = len(target.tokenizer(FIRST)["input_ids"])
    assert usage["prompt_tokens"] == 2 * length
    assert usage["prompt_tokens_details"] == {"cached_tokens": length - 1}  # the second prompt
    assert prompt_cache_on("auto", torch.float32) and not prompt_cache_on("auto", torch.bfloat16)
    assert prompt_cache_on("on", torch.bfloat16) and not prompt_cache_on("off", torch.float32)


def test_speculation_on_a_sliding_window_target_goes_past_the_window(tmp_path) -> None:
    """Rejected drafts are rolled back after the window is full (transformers' layer refused
    to), and the tokens are transformers' own greedy ones; the draft model's cache, a sliding
    window too, is not kept across sequences even when asked to."""
    import torch

    target = _sliding_window_model(tmp_path / "target")
    draft = _sliding_window_model(tmp_path / "draft")  # the same weights: all accepted
    for prompt in (FIRST, "import os\nimport sys\n" * 6):  # 9 and 90 tokens; window 16
        ids = target.tokenizer(prompt)["input_ids"]
        out = target.model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=40, pad_token_id=0
        )
        expected = out[0, len(ids) :].tolist()
        for drafter in (PromptLookupDrafter(max_ngram=2), ModelDrafter(draft)):
            gen = SpeculativeGenerator(target, drafter, 4, reuse_prompt_cache=True)
            for _ in range(2):
                got = gen.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=[])
                assert got.token_ids == expected and got.stats.drafted > 0, drafter.name
