"""Splitting streamed text by the token each piece came from, for the page's per-token marks.

The decoding loop releases text a round at a time, holding back partial characters and possible
stop strings (:class:`specdecode.decoding.TextStream`), so a round's text does not line up with
its tokens. :class:`SegmentTracker` decodes each token's own piece incrementally (the offsets
method of vLLM's and TGI's detokenizers) and cuts the released text along those pieces.
The segments always concatenate to exactly the released text; should a piece ever disagree with
the loop's decoding, the rest of the text is attributed to the latest token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Piece:
    text: str
    from_draft: bool
    copied: bool = False  # drafted by prompt lookup (only with from_draft)


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

    def push(
        self,
        token_ids: Sequence[int],
        from_draft: Sequence[bool],
        released: str,
        copied: bool = False,
    ) -> list[Piece]:
        """Add a round's tokens; return the released text cut into per-token pieces.
        ``copied``: the round's drafted tokens came from prompt lookup."""
        for token, drafted in zip(token_ids, from_draft, strict=True):
            self._last = Piece("", drafted, drafted and copied)
            text = self._next_piece(token)
            if text:
                self._pending.append(Piece(text, drafted, drafted and copied))
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
            out.append(Piece(released[at : at + size], piece.from_draft, piece.copied))
            if size < len(piece.text):
                self._pending.appendleft(Piece(piece.text[size:], piece.from_draft, piece.copied))
            at += size
        if at < len(released):
            out.append(Piece(released[at:], self._last.from_draft, self._last.copied))
        return out
