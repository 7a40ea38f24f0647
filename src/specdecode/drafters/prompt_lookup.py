"""Prompt lookup: draft by copying what followed an earlier occurrence of the last n tokens."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdecode.drafters.base import EMPTY_DRAFT, Draft, Drafter, StopRule
from specdecode.errors import InvalidSettingsError
from specdecode.sampling import TokenSampler


class LooksUpNgrams:
    """A drafter searching with an :class:`NgramIndex`: its n-gram range is the index's."""

    index: NgramIndex

    @property
    def max_ngram(self) -> int:
        return self.index.max_ngram

    @property
    def min_ngram(self) -> int:
        return self.index.min_ngram


class PromptLookupDrafter(LooksUpNgrams, Drafter):
    """N-gram matching over the prompt and the text generated so far (Saxena 2023).

    The longest suffix n-gram (from ``max_ngram`` down to ``min_ngram`` tokens) is searched for
    earlier in the sequence; the most recent match wins, and the tokens that followed it are the
    draft. It has no distribution: verification treats q as one-hot on each drafted token.

    Example, with ``max_ngram=2`` and ids ``[5, 8, 9, 3, 5, 8]``: the last bigram ``[5, 8]``
    occurs at position 0, so the draft is what followed it, ``[9, 3, 5, 8]`` (cut to k tokens).
    """

    name = "prompt-lookup"
    DEFAULT_MIN_NGRAM = 1

    def __init__(self, max_ngram: int = 3, min_ngram: int = DEFAULT_MIN_NGRAM) -> None:
        self.index = NgramIndex(max_ngram, min_ngram)  # checks the n-gram range

    @classmethod
    def min_ngram_for(cls, asked: int | None) -> int:
        """The shortest n-gram: ``asked``, else the default (a single token)."""
        return cls.DEFAULT_MIN_NGRAM if asked is None else asked

    def begin(self, prompt_ids: Sequence[int], reuse_cache: bool = False) -> None:
        self.index.reset()

    def propose(
        self,
        ids: Sequence[int],
        max_tokens: int,
        sampler: TokenSampler,
        stop: StopRule | None = None,
    ) -> Draft:
        start = time.perf_counter()
        match = self.index.find(ids, max_tokens)
        if match is None:
            return EMPTY_DRAFT
        return Draft(match.tokens, None, time.perf_counter() - start, ngram=match.ngram)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "max_ngram": self.max_ngram, "min_ngram": self.min_ngram}


@dataclass(frozen=True)
class LookupMatch:
    """What prompt lookup found: the tokens that followed the match, and the n-gram's length."""

    tokens: list[int]
    ngram: int


class NgramIndex:
    """Prompt lookup's search (:func:`find_match`), kept up as the sequence grows.

    :func:`find_match` scans the whole sequence each round, a cost that grows with the context
    (about 2 ms at 32k tokens: nothing beside a CPU's target step, a share of a GPU's). The
    index maps every n-gram (``min_ngram`` to ``max_ngram`` tokens) to the end of its latest
    occurrence that has a token after it, and indexes only the tokens added since the last
    call, so a round costs a few dictionary operations. Each call must give the sequence so far;
    one that does not extend the indexed one (another sequence) is indexed afresh.
    """

    CHECKED_TAIL = 16  # tokens compared to tell an extension from another sequence

    def __init__(self, max_ngram: int, min_ngram: int) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidSettingsError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []
        self._ends: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(self.min_ngram, self.max_ngram + 1)
        }

    def find(self, ids: Sequence[int], k: int) -> LookupMatch | None:
        """What :func:`find_match` returns for ``ids``, from the index."""
        if k < 1 or len(ids) < 2:
            return None
        self._extend(ids)
        seq = self._ids
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            end = self._ends[n].get(tuple(seq[len(seq) - n :]))
            if end is not None:
                return LookupMatch(seq[end : end + k], n)
        return None

    def _extend(self, ids: Sequence[int]) -> None:
        known = len(self._ids)
        tail = max(0, known - self.CHECKED_TAIL)
        if len(ids) < known or list(ids[tail:known]) != self._ids[tail:]:
            self.reset()
            known = 0
        seq = self._ids
        seq.extend(int(t) for t in ids[known:])
        # n-grams ending at e (exclusive) with a token after them: e <= len - 1
        for end in range(max(known, 1), len(seq)):
            for n, ends in self._ends.items():
                if end >= n:
                    ends[tuple(seq[end - n : end])] = end


def find_continuation(ids: Sequence[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Tokens that followed the most recent earlier match of the longest matching suffix n-gram."""
    match = find_match(ids, k, max_ngram, min_ngram)
    return [] if match is None else match.tokens


def find_match(ids: Sequence[int], k: int, max_ngram: int, min_ngram: int) -> LookupMatch | None:
    """The most recent earlier match of the longest suffix n-gram (``max_ngram`` down to
    ``min_ngram`` tokens) and at most ``k`` tokens that followed it; None when none matches."""
    if k < 1 or len(ids) < 2:
        return None
    seq = torch.as_tensor(list(ids), dtype=torch.long)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        # windows starting at 0 .. len-1-n: each has at least one token after it
        windows = seq[:-1].unfold(0, n, 1)  # (len - n, n)
        hits = (windows == seq[-n:]).all(dim=1).nonzero()
        if hits.numel():
            begin = int(hits[-1, 0]) + n
            return LookupMatch([int(t) for t in seq[begin : begin + k]], n)
    return None
