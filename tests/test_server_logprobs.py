"""``logprobs`` in the server's answers: the loop's values, in the OpenAI API's shapes, whole and
streamed, read by the ``openai`` client's own types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from specdecode.decoding import SpeculativeGenerator
from specdecode.drafters import ModelDrafter
from specdecode.models import load_model
from specdecode.server import Engine, ServerSettings, create_app
from specdecode.server.logprobs import TextOffsets, TokenTexts
from specdecode.testing import tiny_tokenizer

from .test_server import MODEL, USER, chat_body, chat_ids, expect_error, post, sse, tiny_models

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpeculativeGenerator]:
    root: Path = tiny_models(tmp_path_factory)
    threads = torch.get_num_threads()
    target = load_model(root / "target", device="cpu", threads=1)
    yield SpeculativeGenerator(target, ModelDrafter(load_model(root / "draft")), draft_length=4)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def app(generator: SpeculativeGenerator) -> Iterator[Any]:
    engine = Engine(generator, max_queue=4, timeout=60)
    yield create_app(engine, ServerSettings(served_model_name=MODEL))
    engine.close()


def test_chat_logprobs_are_the_loops_in_openais_shape(
    app: Any, generator: SpeculativeGenerator
) -> None:
    body = post(app, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=3)).json()
    parsed = openai.types.chat.ChatCompletion.model_validate(body)
    expected = generator.generate(
        chat_ids(generator, USER), max_new_tokens=24, temperature=0, logprobs=3
    )
    assert expected.logprobs is not None
    content = parsed.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == len(expected.token_ids)
    texts = TokenTexts(generator.target.tokenizer)
    for entry, lp in zip(content, expected.logprobs, strict=True):
        assert entry.token == texts.text(lp.token_id)
        assert entry.logprob == pytest.approx(lp.logprob, abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [texts.text(t) for t, _ in lp.top]
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy
    tokenizer = generator.target.tokenizer
    whole = b"".join(bytes(entry.bytes or []) for entry in content)
    assert whole.decode("utf-8", errors="replace") == tokenizer.decode(expected.token_ids)


def test_chat_without_logprobs_has_none_and_top_alone_is_refused(app: Any) -> None:
    body = post(app, "/v1/chat/completions", chat_body(max_tokens=4)).json()
    assert body["choices"][0]["logprobs"] is None
    message = expect_error(
        post(app, "/v1/chat/completions", chat_body(top_logprobs=2)), 400, "top_logprobs"
    )
    assert '"logprobs": true' in message
    expect_error(post(app, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=21)), 422)
    zero = post(app, "/v1/chat/completions", chat_body(max_tokens=3, logprobs=True)).json()
    assert all(entry["top_logprobs"] == [] for entry in zero["choices"][0]["logprobs"]["content"])


def test_chat_stream_gives_each_chunks_tokens(app: Any) -> None:
    whole = post(app, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=1)).json()
    chunks = sse(
        post(app, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=1, stream=True))
    )
    for chunk in chunks:
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
    streamed = []
    for chunk in chunks[1:]:
        choice = chunk["choices"][0]
        if chunk["specdecode"]["tokens"]:
            assert len(choice["logprobs"]["content"]) == len(chunk["specdecode"]["tokens"])
            streamed.extend(choice["logprobs"]["content"])
        else:
            assert choice["logprobs"] is None
    assert streamed == whole["choices"][0]["logprobs"]["content"]


def test_completion_logprobs_whole_and_streamed(app: Any, generator: SpeculativeGenerator) -> None:
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "logprobs": 2}
    body = post(app, "/v1/completions", ask).json()
    parsed = openai.types.Completion.model_validate(body)
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    expected = generator.generate(PROMPT, max_new_tokens=12, temperature=0, logprobs=2)
    assert expected.logprobs is not None
    assert logprobs.token_logprobs == pytest.approx([lp.logprob for lp in expected.logprobs])
    assert body["choices"][0]["text"] == expected.text
    texts = TokenTexts(generator.target.tokenizer)
    assert logprobs.tokens == [texts.text(lp.token_id) for lp in expected.logprobs]
    if "\ufffd" not in expected.text:  # a random model's bytes need not be whole characters
        assert "".join(logprobs.tokens) == expected.text
    # where each token's text starts in the answer's text, as decoded
    ids = expected.token_ids
    assert logprobs.text_offset == [len(_decoded(generator, ids[:j])) for j in range(len(ids))]
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs or [], strict=True):
        assert token in top and 2 <= len(top) <= 3  # the alternatives and the chosen token

    chunks = sse(post(app, "/v1/completions", {**ask, "stream": True}))
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in chunks:  # (the client's Completion type wants a finish reason in every chunk)
        part = chunk["choices"][0]["logprobs"]
        if part is not None:
            openai.types.completion_choice.Logprobs.model_validate(part)
        for key in streamed:
            streamed[key].extend(part[key] if part else [])
    assert streamed["tokens"] == logprobs.tokens
    assert streamed["text_offset"] == logprobs.text_offset  # running offsets across chunks
    assert streamed["token_logprobs"] == pytest.approx(logprobs.token_logprobs)
    expect_error(post(app, "/v1/completions", {**ask, "logprobs": -1}), 422)


def test_several_choices_each_get_their_own(app: Any) -> None:
    ask = {"model": MODEL, "prompt": [PROMPT, "import os"], "max_tokens": 5, "logprobs": 0}
    body = post(app, "/v1/completions", ask).json()
    for choice in body["choices"]:
        assert len(choice["logprobs"]["tokens"]) >= 1
        assert choice["logprobs"]["text_offset"][0] == 0


def _decoded(generator: SpeculativeGenerator, ids: list[int]) -> str:
    tokenizer = generator.target.tokenizer
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def test_text_offsets_of_long_texts_match_decoding_every_prefix() -> None:
    """The incremental offsets (a settled prefix, a window after it) equal the slow definition."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer("naïve 中文 “quotes” and some words, " * 40)["input_ids"]
    assert len(ids) > 512
    offsets = TextOffsets(tokenizer, start=5)
    got = offsets.push(ids[:100]) + offsets.push(ids[100:])  # in chunks, as streamed

    def length(prefix: list[int]) -> int:
        return len(tokenizer.decode(prefix, skip_special_tokens=True))

    assert got == [5 + length(ids[:j]) for j in range(len(ids))]


def test_token_bytes_are_exact_for_sentencepiece_style_tokenizers() -> None:
    """Llama 2 / Mistral pieces: "▁" is a space, "<0xNN>" one byte of a character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    backend.train_from_iterator(["hello world the lazy dog"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    texts = TokenTexts(tokenizer)
    assert texts.metaspace and not texts.byte_level
    ids = tokenizer("hello 中 world")["input_ids"]
    shown = [texts.show(i) for i in ids]
    assert shown[0][0] == " hello"  # the space the piece stands for
    assert b"".join(bytes(raw) for _, raw in shown).decode("utf-8") == " hello 中 world"
    assert [t for t, _ in shown[2:5]] == ["\\xe4", "\\xb8", "\\xad"]  # one byte each


def test_token_bytes_are_exact_for_byte_level_tokenizers() -> None:
    """A character split over two tokens: each token's bytes, its text spelling the rest."""
    tokenizer = tiny_tokenizer()
    texts = TokenTexts(tokenizer)
    assert texts.byte_level
    text = "naïve 中文 “quotes” ok"
    ids = tokenizer(text)["input_ids"]
    shown = [texts.show(i) for i in ids]
    assert b"".join(bytes(raw) for _, raw in shown).decode("utf-8") == text
    partial = [t for t, raw in shown if bytes(raw).decode("utf-8", errors="replace") != t]
    assert all("\\x" in t for t in partial)


def test_tokenizers_that_are_not_byte_level_decode_each_token() -> None:
    class Plain:
        def decode(self, ids: list[int]) -> str:
            return {1: "é", 2: "ab"}[ids[0]]

    texts = TokenTexts(Plain())
    assert not texts.byte_level
    assert texts.show(1) == ("é", (0xC3, 0xA9))
    assert texts.show(2) == ("ab", (97, 98))


def test_echo_puts_the_prompt_before_the_answer(app: Any, generator: SpeculativeGenerator) -> None:
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "echo": True}
    body = post(app, "/v1/completions", ask).json()
    expected = generator.generate(PROMPT, max_new_tokens=6, temperature=0)
    assert body["choices"][0]["text"] == PROMPT + expected.text
    assert body["choices"][0]["logprobs"] is None
    ids = post(app, "/v1/completions", {**ask, "prompt": expected.prompt_ids}).json()
    tokenizer = generator.target.tokenizer
    assert ids["choices"][0]["text"] == tokenizer.decode(expected.prompt_ids) + expected.text


def test_echo_with_logprobs_scores_the_prompt_too(
    app: Any, generator: SpeculativeGenerator
) -> None:
    """What evaluation harnesses send to score a text (lm-eval's loglikelihood requests)."""
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1}
    body = post(app, "/v1/completions", ask).json()
    # (the client's types want a number for the prompt's first token, which has none: the
    # OpenAI API and vLLM give null there, and the client does not validate answers)
    logprobs = openai.types.completion_choice.Logprobs.model_construct(
        **body["choices"][0]["logprobs"]
    )
    assert logprobs.token_logprobs is not None and logprobs.text_offset is not None
    assert logprobs.tokens is not None and logprobs.top_logprobs is not None
    ids = generator.target.tokenizer(PROMPT)["input_ids"]
    assert len(logprobs.token_logprobs) == len(ids) + 1  # the prompt's tokens, then the answer
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    with torch.no_grad():
        logits = generator.target.model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)
    prompt_values = [float(expected[i, t]) for i, t in enumerate(ids[1:])]
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(prompt_values, abs=1e-4)
    texts = TokenTexts(generator.target.tokenizer)
    assert logprobs.tokens[: len(ids)] == [texts.text(t) for t in ids]
    assert logprobs.text_offset[0] == 0

    chunks = sse(post(app, "/v1/completions", {**ask, "max_tokens": 4, "stream": True}))
    whole = post(app, "/v1/completions", {**ask, "max_tokens": 4}).json()["choices"][0]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    streamed: list[Any] = []
    for chunk in chunks:
        part = chunk["choices"][0]["logprobs"]
        streamed.extend(part["token_logprobs"] if part else [])
    assert streamed[0] is None and streamed[1:] == pytest.approx(
        whole["logprobs"]["token_logprobs"][1:]
    )


def test_max_tokens_zero_scores_the_prompt_alone(app: Any) -> None:
    """Scoring a text with no answer (the legacy API's ``max_tokens: 0`` with ``echo``)."""
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0}
    body = post(app, "/v1/completions", ask).json()
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    scored = choice["logprobs"]["token_logprobs"]
    assert scored[0] is None and len(scored) == body["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == 0
    whole = post(app, "/v1/completions", {**ask, "max_tokens": 1}).json()["choices"][0]
    assert whole["logprobs"]["token_logprobs"][: len(scored)][1:] == pytest.approx(scored[1:])
    chunks = sse(post(app, "/v1/completions", {**ask, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT
    for without in ({"echo": False}, {"logprobs": None}):
        expect_error(post(app, "/v1/completions", {**ask, **without}), 400, "max_tokens")
    chat = {"model": MODEL, "messages": USER, "max_tokens": 0}
    expect_error(post(app, "/v1/chat/completions", chat), 422, "max_tokens")
