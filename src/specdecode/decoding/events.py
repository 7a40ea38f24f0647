"""What the decoding loop yields, and what a finished generation returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from specdecode.sampling.logprobs import TokenLogprob

FinishReason = Literal["eos", "stop_string", "length", "cancelled"]


@dataclass
class GenerationStats:
    """Counters and timings of one generation.

    ``tau`` is the mean number of new tokens per target forward pass (prefill included, so plain
    decoding has tau = 1). ``alpha`` is the acceptance rate estimated without the usual bias from
    rounds cut short by the draft length: accepted / (accepted + rounds that ended in a rejection).
    """

    new_tokens: int = 0
    target_passes: int = 0  # prefill + one per round
    rounds: int = 0  # verification rounds (target passes after the prefill)
    drafted: int = 0
    accepted: int = 0
    rejected_rounds: int = 0  # rounds whose draft was not accepted in full
    # of the rounds, those that verified a free draft (prompt lookup in front of a model), with
    # their drafted and accepted tokens (counted in ``drafted`` and ``accepted`` too)
    free_rounds: int = 0
    free_drafted: int = 0
    free_accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)  # rounds drafting >= i+1 tokens
    accepted_per_position: list[int] = field(default_factory=list)  # rounds accepting >= i+1
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of those, positions kept from the previous sequence
    draft_seconds: float = 0.0
    draft_prefill_seconds: float = 0.0  # of draft_seconds, the draft model reading the prompt
    target_seconds: float = 0.0
    total_seconds: float = 0.0
    time_to_first_token: float = 0.0

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def alpha(self) -> float | None:
        denominator = self.accepted + self.rejected_rounds
        return self.accepted / denominator if denominator else None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [
            a / d if d else 0.0
            for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)
        ]

    def record_round(self, drafted: int, accepted: int, free: bool = False) -> None:
        if free:
            self.free_rounds += 1
            self.free_drafted += drafted
            self.free_accepted += accepted
        self.rounds += 1
        self.target_passes += 1
        self.drafted += drafted
        self.accepted += accepted
        if accepted < drafted:
            self.rejected_rounds += 1
        grow = drafted - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(drafted):
            self.drafted_per_position[i] += 1
            if i < accepted:
                self.accepted_per_position[i] += 1

    def accumulate(self, other: GenerationStats) -> None:
        """Add ``other``'s counters and timings to these (per-position lists added element-wise;
        ``time_to_first_token`` becomes the total prefill time)."""
        for f in fields(GenerationStats):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                width = max(len(mine), len(theirs))
                mine.extend([0] * (width - len(mine)))
                for i, value in enumerate(theirs):
                    mine[i] += value
            else:
                setattr(self, f.name, mine + theirs)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            tau=self.tau,
            alpha=self.alpha,
            tokens_per_second=self.tokens_per_second,
            acceptance_per_position=self.acceptance_per_position,
        )
        return out


@dataclass(frozen=True)
class RoundEvent:
    """New tokens from one target pass (the prefill or a verification round)."""

    token_ids: list[int]  # appended this round, after any stop cut
    from_draft: list[bool]  # per token: True if drafted and accepted, False if the target's own
    text: str  # new text safe to show (held back: partial characters, possible stop strings)
    num_drafted: int
    num_accepted: int
    draft_seconds: float
    target_seconds: float
    copied: bool = False  # the drafted tokens were copied from the context by prompt lookup
    # per token of ``token_ids`` when the call asked for ``logprobs`` (else None)
    logprobs: tuple[TokenLogprob, ...] | None = None
    # the prefill's event, when the call asked for ``prompt_logprobs``: per prompt token after
    # the first (the first has no preceding context to be predicted from)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation."""

    text: str  # new text only, without the stop string
    token_ids: list[int]  # new tokens only (an EOS or stop-string token that ended it included)
    prompt_ids: list[int]
    finish_reason: FinishReason
    stats: GenerationStats
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # per token of ``token_ids`` when the call asked for ``logprobs`` (else None)
    logprobs: tuple[TokenLogprob, ...] | None = None
    # per prompt token after the first, when the call asked for ``prompt_logprobs``
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "seed": self.seed,
            "stats": self.stats.to_dict(),
            "settings": self.settings,  # as resolved: the model's defaults filled in
        }
        if self.logprobs is not None:
            out["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = [lp.to_dict() for lp in self.prompt_logprobs]
        return out


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a stream."""

    result: GenerationResult
    text: str = ""  # text released at the end (held back until the end was known)


GenerationEvent = RoundEvent | FinishEvent
