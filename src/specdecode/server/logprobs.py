"""Token log-probabilities in the OpenAI API's two shapes (chat's and text completions').

A token is shown as its text and its exact bytes. Byte-level BPE tokenizers (GPT-2, Qwen, Llama 3)
map each byte to one printable character, so a token's bytes are read back exactly, also for a
token holding part of a multi-byte character (its text then spells the missing bytes as ``\\xNN``,
as the OpenAI API does); other tokenizers give the token's decoded text and its UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from specdecode.sampling import TokenLogprob
from specdecode.server.schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte as one printable character, and back.

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, and a few) get
    the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


BYTE_OF_CHAR = _byte_alphabet()


class TokenTexts:
    """A token id's text and bytes for one tokenizer (cached: the same ids recur)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.show = lru_cache(maxsize=65536)(self._show)

    def _show(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(c in BYTE_OF_CHAR for c in piece):
                raw = bytes(BYTE_OF_CHAR[c] for c in piece)
                return raw.decode("utf-8", errors="backslashreplace"), tuple(raw)
        text = self.tokenizer.decode([token_id])
        return text, tuple(text.encode("utf-8"))

    def text(self, token_id: int) -> str:
        return self.show(token_id)[0]


def chat_logprobs(texts: TokenTexts, logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
    """``choices[i].logprobs`` of a chat completion (or of one stream chunk)."""

    def entry(token_id: int, value: float) -> TopLogprob:
        text, raw = texts.show(token_id)
        return TopLogprob(token=text, logprob=value, bytes=list(raw))

    content = []
    for lp in logprobs:
        first = entry(lp.token_id, lp.logprob)
        top = [entry(t, v) for t, v in lp.top]
        content.append(ChatTokenLogprob(**first.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(
    texts: TokenTexts,
    logprobs: Sequence[TokenLogprob],
    offset: int,
    prompt_first: int | None = None,
    prompt_logprobs: Sequence[TokenLogprob] = (),
) -> CompletionLogprobs:
    """``choices[i].logprobs`` of a text completion (or of one stream chunk) whose first token
    starts at character ``offset`` of the text. ``top_logprobs`` holds the alternatives asked for
    and the chosen token, as the OpenAI API gives them (up to N + 1 entries). With ``echo``, the
    prompt's tokens come first: ``prompt_first`` (its first token, which has no value: None) and
    ``prompt_logprobs`` (the rest)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if prompt_first is not None:
        first = texts.text(prompt_first)
        tokens.append(first)
        values.append(None)
        tops.append(None)
        offsets.append(offset)
        offset += len(first)
    for lp in (*prompt_logprobs, *logprobs):
        text = texts.text(lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        top = {texts.text(t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )
