"""Splitting streamed text by the token each piece came from, for the page's per-token marks.

The decoding loop releases text a round at a time, holding back partial characters and possible
stop strings (:class:`specdecode.decoding.TextStream`), so a round's text does not line up with
its tokens. :class:`SegmentTracker` decodes each token's own piece incrementally (the offsets
method of vLLM's and TGI's detokenizers) and cuts the released text along those pieces.
The segments always concatenate to exactly the released text; should a piece ever disagree with
the loop's decoding, the rest of the text is attributed to the latest token.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Piece:
    text: str
    from_draft: bool
    copied: bool = False  # drafted by prompt lookup (only with from_draft)
    # the target's log-probability of the piece (of its token, or of the tokens that together
    # spell a character), when the request asked for log-probabilities
    logprob: float | None = None


class SegmentTracker:
    """Per-token pieces of one generation's text.

    Example: tokens ``"Hel"`` (drafted) and ``"lo"`` (the target's), released as ``"Hell"``
    then ``"o"``, give ``[("Hel", True), ("l", False)]`` then ``[("o", False)]``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # decoding starts here (a clean character boundary)
        self._read = 0  # tokens before this have given their piece
        self._pending: deque[Piece] = deque()  # pieces not yet released
        self._last = Piece("", False)  # the latest token's origin
        self._waiting_logprob: float | None = None  # of tokens whose piece is not complete yet

    def push(
        self,
        token_ids: Sequence[int],
        from_draft: Sequence[bool],
        released: str,
        copied: bool = False,
        logprobs: Sequence[float] | None = None,
    ) -> list[Piece]:
        """Add a round's tokens; return the released text cut into per-token pieces.
        ``copied``: the round's drafted tokens came from prompt lookup; ``logprobs``: each
        token's log-probability (a piece that takes several tokens gets their sum)."""
        values: Sequence[float | None] = (
            logprobs if logprobs is not None else [None] * len(token_ids)
        )
        for token, drafted, value in zip(token_ids, from_draft, values, strict=True):
            if value is not None:
                self._waiting_logprob = (self._waiting_logprob or 0.0) + value
            self._last = Piece("", drafted, drafted and copied, self._waiting_logprob)
            text = self._next_piece(token)
            if text:
                self._pending.append(
                    Piece(text, drafted, drafted and copied, self._waiting_logprob)
                )
                self._waiting_logprob = None
        return self._take(released)

    def finish(self, released: str) -> list[Piece]:
        """The pieces of the text released at the end; anything left over is dropped."""
        pieces = self._take(released)
        self._pending.clear()
        return pieces

    def _decode(self, ids: Sequence[int]) -> str:
        return str(
            self.tokenizer.decode(
                list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def _next_piece(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # a partial character (or nothing visible): wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def _take(self, released: str) -> list[Piece]:
        out: list[Piece] = []
        at = 0
        while at < len(released) and self._pending:
            piece = self._pending.popleft()
            size = min(len(piece.text), len(released) - at)
            out.append(dataclasses.replace(piece, text=released[at : at + size]))
            if size < len(piece.text):
                self._pending.appendleft(dataclasses.replace(piece, text=piece.text[size:]))
            at += size
        if at < len(released):
            out.append(dataclasses.replace(self._last, text=released[at:]))
        return out
