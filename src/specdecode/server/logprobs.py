"""Token log-probabilities in the OpenAI API's two shapes (chat's and text completions').

A token is shown as its text and its exact bytes. Byte-level BPE tokenizers (GPT-2, Qwen, Llama 3)
map each byte to one printable character, and SentencePiece-style ones (Llama 2, Mistral, Gemma)
write a space as ``▁`` and an unmapped byte as ``<0xNN>``, so a token's bytes are read back
exactly, also for a token holding part of a multi-byte character (its text then spells the
missing bytes as ``\\xNN``, as the OpenAI API does); other tokenizers give the token's decoded
text and its UTF-8 bytes. ``text_offset`` is where each token's contribution starts in the
answer's text, counted on the decoded text (:class:`TextOffsets`), not on the tokens' shown texts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from specdecode.decoding.text import TextStream
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
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class TokenTexts:
    """A token id's text and bytes for one tokenizer (cached: the same ids recur)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.metaspace = not self.byte_level and (
            "▁" in repr(decoder) or "Metaspace" in repr(decoder)
        )
        self._added = (
            set(getattr(tokenizer, "get_added_vocab", dict)()) if self.metaspace else set()
        )
        self.show = lru_cache(maxsize=65536)(self._show)

    def _raw(self, token_id: int) -> bytes | None:
        """The token's exact bytes, where the tokenizer's pieces say them."""
        if not (self.byte_level or self.metaspace):
            return None
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return None
        if self.byte_level:
            if all(c in BYTE_OF_CHAR for c in piece):
                return bytes(BYTE_OF_CHAR[c] for c in piece)
            return None
        byte = BYTE_PIECE.fullmatch(piece)
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        if piece in self._added:
            return piece.encode("utf-8")  # an added token (``<s>``) as written
        return piece.replace("▁", " ").encode("utf-8")

    def _show(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        raw = self._raw(token_id)
        if raw is not None:
            return raw.decode("utf-8", errors="backslashreplace"), tuple(raw)
        text = self.tokenizer.decode([token_id])
        return text, tuple(text.encode("utf-8"))

    def text(self, token_id: int) -> str:
        return self.show(token_id)[0]


class TextOffsets:
    """Where each token's contribution starts in the text of the ids so far: the length of the
    text of the ids before it, decoded as the answer's text is, by the same incremental decoding
    (:class:`~specdecode.decoding.TextStream`: a settled prefix and a short window after it, so
    that long prompts (echo) cost linear time, not quadratic)."""

    def __init__(self, tokenizer: Any, start: int = 0) -> None:
        self.tokenizer = tokenizer
        self.start = start  # characters before the first token (an echoed prompt's text)
        self._stream = TextStream(tokenizer)

    def push(self, new_ids: Sequence[int]) -> list[int]:
        out = []
        for token in new_ids:
            out.append(self.start + len(self._stream.decoded))
            self._stream.push([int(token)])
        return out


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
    offsets: TextOffsets,
    prompt_first: int | None = None,
    prompt_logprobs: Sequence[TokenLogprob] = (),
) -> CompletionLogprobs:
    """``choices[i].logprobs`` of a text completion (or of one stream chunk); ``offsets`` follows
    the choice's tokens so far. ``top_logprobs`` holds the alternatives asked for and the chosen
    token, as the OpenAI API gives them (up to N + 1 entries). With ``echo``, the prompt's tokens
    come first: ``prompt_first`` (its first token, which has no value: None) and
    ``prompt_logprobs`` (the rest); their offsets count from the start of the echoed prompt,
    the answer's from its end (``offsets.start``)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if prompt_first is not None:
        tokens.append(texts.text(prompt_first))
        values.append(None)
        tops.append(None)
    for lp in (*prompt_logprobs, *logprobs):
        text = texts.text(lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        top = {texts.text(t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        tops.append(top)
    starts = []
    if prompt_first is not None:
        prompt_ids = [prompt_first, *(lp.token_id for lp in prompt_logprobs)]
        starts = TextOffsets(offsets.tokenizer).push(prompt_ids)
    starts += offsets.push([lp.token_id for lp in logprobs])
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=starts
    )
