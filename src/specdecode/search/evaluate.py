"""Running a drafter over a prompt set and adding up what happened."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specdecode.decoding import GenerationStats, SpeculativeGenerator
from specdecode.drafters import Drafter
from specdecode.drafters.layerskip import LayerSkipDrafter
from specdecode.models import LoadedModel
from specdecode.models.layerskip import SkipSet
from specdecode.search.cost import CostModel
from specdecode.search.profile import DraftSettings


@dataclass
class Evaluation(GenerationStats):
    """Totals of greedy generation over several prompts with one drafter (or none): the
    generations' statistics added up (``tau``, ``alpha`` and tokens/s as for one), and how many
    prompts they cover."""

    prompts: int = 0

    def add(self, stats: GenerationStats) -> None:
        self.prompts += 1
        self.accumulate(stats)

    @property
    def prefill_seconds(self) -> float:
        """Total prefill time (the summed times to first token)."""
        return self.time_to_first_token

    @property
    def rounds_by_draft(self) -> dict[int, int]:
        """How many rounds drafted d tokens, for each d (0 included)."""
        at_least = [self.rounds, *self.drafted_per_position, 0]
        return {d: at_least[d] - at_least[d + 1] for d in range(len(at_least) - 1)}

    @property
    def decoded(self) -> int:
        """New tokens made after the prefills (each prefill gives one)."""
        return self.new_tokens - self.prompts

    @property
    def draft_step_seconds(self) -> float | None:
        """Seconds per drafted token (one draft forward pass each)."""
        return self.draft_seconds / self.drafted if self.drafted else None

    @property
    def decode_step_seconds(self) -> float | None:
        """Seconds per target pass after the prefill (plain decoding: per token)."""
        passes = self.target_passes - self.prompts
        return (self.target_seconds - self.prefill_seconds) / passes if passes > 0 else None


PromptCallback = Callable[[int, Evaluation], None]


def evaluate(
    target: LoadedModel,
    drafter: Drafter | None,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    k: int,
    on_prompt: PromptCallback | None = None,
) -> Evaluation:
    """Greedy generation of every prompt (token ids) with ``drafter``; ``on_prompt(i, totals)``
    after each one (it may raise to stop early, e.g. to prune a trial)."""
    generator = SpeculativeGenerator(target, drafter, k)
    totals = Evaluation()
    for i, ids in enumerate(prompts):
        result = generator.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        totals.add(result.stats)
        if on_prompt is not None:
            on_prompt(i, totals)
    return totals


def evaluate_interleaved(
    target: LoadedModel,
    drafters: dict[str, Drafter | None],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    k: int,
    repeats: int = 1,
) -> dict[str, Evaluation]:
    """Several drafters on the same prompts, taking turns on each prompt so that a slow spell
    of the machine hits all of them alike. One untimed warm-up run per drafter first."""
    generators = {name: SpeculativeGenerator(target, d, k) for name, d in drafters.items()}
    for generator in generators.values():
        generator.generate(prompts[0], max_new_tokens=min(8, max_new_tokens), do_sample=False)
    totals = {name: Evaluation() for name in drafters}
    for ids in prompts:
        for _ in range(repeats):
            for name, generator in generators.items():
                result = generator.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
                totals[name].add(result.stats)
    return totals


@dataclass(frozen=True)
class ComparisonRow:
    """One drafter's figures on a prompt set, against plain decoding on the same prompts."""

    name: str
    skip_attention: list[int] | None  # None: no speculation
    skip_mlp: list[int] | None
    alpha: float | None
    tau: float
    c: float | None  # timed: seconds per draft step over seconds per plain decoding step
    tokens_per_second: float
    speedup: float  # tokens/s over plain decoding's
    modelled_speedup: float | None
    new_tokens: int
    seconds: float


def compare_skip_sets(
    target: LoadedModel,
    named: dict[str, SkipSet | None],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    draft: DraftSettings,
    cost: CostModel | None = None,
    repeats: int = 1,
) -> list[ComparisonRow]:
    """Plain decoding and each named skip set (None: no speculation), interleaved per prompt."""
    drafters: dict[str, Drafter | None] = {"no speculation": None}
    for name, skip in named.items():
        drafters[name] = None if skip is None else LayerSkipDrafter(target, skip, draft.exit())
    totals = evaluate_interleaved(
        target, drafters, prompts, max_new_tokens, draft.max_draft_tokens, repeats
    )
    base = totals["no speculation"]
    rows = [_row("no speculation", None, base, base, cost)]
    rows += [_row(name, named[name], totals[name], base, cost) for name in named]
    return rows


def _row(
    name: str, skip: SkipSet | None, ev: Evaluation, base: Evaluation, cost: CostModel | None
) -> ComparisonRow:
    step, base_step = ev.draft_step_seconds, base.decode_step_seconds
    modelled = None
    if cost is not None:
        modelled = 1.0 if skip is None else cost.speedup(ev.decoded, ev.rounds_by_draft, skip)
    base_rate = base.tokens_per_second
    return ComparisonRow(
        name=name,
        skip_attention=None if skip is None else list(skip.attention),
        skip_mlp=None if skip is None else list(skip.mlp),
        alpha=ev.alpha,
        tau=ev.tau,
        c=step / base_step if step is not None and base_step else None,
        tokens_per_second=ev.tokens_per_second,
        speedup=ev.tokens_per_second / base_rate if base_rate > 0 else 0.0,
        modelled_speedup=modelled,
        new_tokens=ev.new_tokens,
        seconds=ev.total_seconds,
    )
