"""The standard set of modes: transformers' ways of generating beside ours, on the same models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TypeVar

from specdecode.bench.costs import CostProbe
from specdecode.bench.modes import REFERENCE, Mode, SpecDecodeMode, TransformersMode
from specdecode.decoding import SpeculativeGenerator
from specdecode.drafters import (
    Drafter,
    DraftLength,
    LookupDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    make_schedule,
)
from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel

HF_ASSISTED = "hf-assisted"  # the assistant's own settings (transformers' defaults)
HF_ASSISTED_K5 = "hf-assisted-k5-heuristic"
HF_LOOKUP = "hf-prompt-lookup"
OURS_PLAIN = "ours-plain"
OURS_DRAFT = "ours-draft"
OURS_LOOKUP = "ours-prompt-lookup"
OURS_LOOKUP_DRAFT = "ours-lookup-draft"  # prompt lookup in front of the draft model
OURS_LAYER_SKIP = "ours-layer-skip"
HF_LAYER_SKIP = "hf-layer-skip"  # transformers' loop, assistant_model=specdecode.skip_assistant

MODE_NAMES = (
    REFERENCE,
    HF_ASSISTED,
    HF_ASSISTED_K5,
    HF_LOOKUP,
    OURS_PLAIN,
    OURS_DRAFT,
    OURS_LOOKUP,
    OURS_LOOKUP_DRAFT,
    OURS_LAYER_SKIP,
    HF_LAYER_SKIP,
)
NEEDS_DRAFT = frozenset({HF_ASSISTED, HF_ASSISTED_K5, OURS_DRAFT, OURS_LOOKUP_DRAFT})
NEEDS_SKIP = frozenset({OURS_LAYER_SKIP, HF_LAYER_SKIP})

T = TypeVar("T")


@dataclass(frozen=True)
class ModeConfig:
    """Settings of the modes that draft."""

    k: int = 5  # our draft model: tokens drafted per round (initial k)
    schedule: str = "auto"  # our draft model's and prompt lookup's length policy
    confidence_stop: bool = False  # auto: end drafts by the draft's confidence
    layer_skip_k: int | None = None  # layer skip: the most tokens per round (None: k)
    confidence_threshold: float | None = None  # our draft model: stop below this probability
    draft_prompt_window: int | None = None  # our draft model: prompt tokens it reads (None: all)
    lookup_tokens: int = 10  # all prompt lookups: tokens per draft
    ngram_max: int = 3  # our prompt lookups: longest n-gram
    ngram_min: int | None = None  # our prompt lookups: shortest n-gram (None: 1 alone, 2 with
    # the draft model)
    hf_ngram: int = 2  # transformers' prompt lookup: max_matching_ngram_size (its default)

    def schedule_for(self, k: int) -> DraftLength:
        """Our length policy starting from ``k``."""
        return make_schedule(self.schedule, k, self.confidence_stop)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def available_modes(draft: LoadedModel | None, layer_skip: Drafter | None) -> list[str]:
    """The standard modes that can run with what was given."""
    return [
        name
        for name in MODE_NAMES
        if (draft is not None or name not in NEEDS_DRAFT)
        and (layer_skip is not None or name not in NEEDS_SKIP)
    ]


def select_modes(asked: list[str] | None, available: list[str]) -> list[str]:
    """``asked`` (None: all available) in the standard order, the reference always included."""
    if asked is None:
        return list(available)
    unknown = [m for m in asked if m not in MODE_NAMES]
    if unknown:
        raise InvalidSettingsError(
            f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODE_NAMES)}"
        )
    missing = [m for m in asked if m not in available]
    if missing:
        raise InvalidSettingsError(
            f"mode(s) {', '.join(missing)} need a model that was not given: "
            "--draft for the draft-model modes, --skip-profile for layer skip"
        )
    wanted = {*asked, REFERENCE}
    return [m for m in MODE_NAMES if m in wanted]


def standard_modes(
    target: LoadedModel,
    names: list[str],
    config: ModeConfig,
    draft: LoadedModel | None = None,
    layer_skip: Drafter | None = None,
) -> list[Mode]:
    """Build the modes called ``names`` (see :data:`MODE_NAMES`) on shared models."""
    draft_key = None if draft is None else f"draft model {draft.name}"
    builders: dict[str, Callable[[], Mode]] = {
        REFERENCE: lambda: TransformersMode(REFERENCE, target),
        HF_ASSISTED: lambda: _hf_assisted(HF_ASSISTED, target, _need(draft), {}, draft_key),
        HF_ASSISTED_K5: lambda: _hf_assisted(
            HF_ASSISTED_K5,
            target,
            _need(draft),
            {"num_assistant_tokens": 5, "num_assistant_tokens_schedule": "heuristic"},
            draft_key,
        ),
        HF_LOOKUP: lambda: TransformersMode(
            HF_LOOKUP,
            target,
            generate_kwargs={
                "prompt_lookup_num_tokens": config.lookup_tokens,
                "max_matching_ngram_size": config.hf_ngram,
            },
        ),
        OURS_PLAIN: lambda: SpecDecodeMode(OURS_PLAIN, SpeculativeGenerator(target)),
        OURS_DRAFT: lambda: _ours_draft(target, _need(draft), config, draft_key),
        OURS_LOOKUP: lambda: SpecDecodeMode(
            OURS_LOOKUP,
            SpeculativeGenerator(
                target,
                PromptLookupDrafter(
                    max_ngram=config.ngram_max,
                    min_ngram=PromptLookupDrafter.min_ngram_for(config.ngram_min),
                ),
                config.schedule_for(config.lookup_tokens),
            ),
        ),
        OURS_LOOKUP_DRAFT: lambda: _ours_draft(
            target, _need(draft), config, draft_key, with_lookup=True
        ),
        OURS_LAYER_SKIP: lambda: SpecDecodeMode(
            OURS_LAYER_SKIP,
            SpeculativeGenerator(
                target, _need(layer_skip), config.schedule_for(config.layer_skip_k or config.k)
            ),
        ),
        HF_LAYER_SKIP: lambda: _hf_layer_skip(target, _need(layer_skip), config),
    }
    return [builders[name]() for name in names]


def _need(value: T | None) -> T:
    if value is None:
        raise InvalidSettingsError("this mode needs a model that was not given")
    return value


def _hf_assisted(
    name: str,
    target: LoadedModel,
    draft: LoadedModel,
    overrides: dict[str, object],
    draft_key: str | None,
) -> TransformersMode:
    if draft.lean is not None:  # transformers runs the draft on its own forward, not ours
        draft_key = f"{draft_key or name}, transformers' forward"
        draft = replace(draft, lean=None)
    probe = CostProbe(draft_key or name, ModelDrafter(draft))
    return TransformersMode(
        name, target, assistant=draft, assistant_overrides=overrides, cost_probe=probe
    )


def _ours_draft(
    target: LoadedModel,
    draft: LoadedModel,
    config: ModeConfig,
    draft_key: str | None,
    with_lookup: bool = False,
) -> SpecDecodeMode:
    drafter: Drafter = ModelDrafter(
        draft,
        confidence_threshold=config.confidence_threshold,
        prompt_window=config.draft_prompt_window,
    )
    if with_lookup:
        drafter = LookupDrafter(
            drafter,
            lookup_tokens=config.lookup_tokens,
            max_ngram=config.ngram_max,
            min_ngram=LookupDrafter.min_ngram_for(config.ngram_max, config.ngram_min),
        )
    generator = SpeculativeGenerator(target, drafter, config.schedule_for(config.k))
    if draft_key is not None and config.draft_prompt_window is not None:
        # a draft reading fewer tokens steps at another cost than transformers' assistant
        draft_key = f"{draft_key}, prompt window {config.draft_prompt_window}"
    name = OURS_LOOKUP_DRAFT if with_lookup else OURS_DRAFT
    return SpecDecodeMode(name, generator, cost_key=draft_key)


def _hf_layer_skip(target: LoadedModel, drafter: Drafter, config: ModeConfig) -> TransformersMode:
    """transformers' assisted loop drafting with the same skip set, k and (fixed) threshold."""
    from specdecode.drafters.layerskip import LayerSkipDrafter
    from specdecode.integrations.transformers import layer_skip_assistant

    if not isinstance(drafter, LayerSkipDrafter):
        raise InvalidSettingsError(f"{HF_LAYER_SKIP} needs a layer-skip profile (--skip-profile)")
    threshold = drafter.exit.threshold
    settings = {
        "num_assistant_tokens": config.layer_skip_k or config.k,
        "num_assistant_tokens_schedule": "constant",
        "assistant_confidence_threshold": 0.0 if threshold is None else threshold,
    }
    view = layer_skip_assistant(target.model, drafter.skip, **settings)
    assistant = LoadedModel(
        view, target.tokenizer, f"{target.name} (layer skip)", target.dtype, target.device
    )
    return TransformersMode(HF_LAYER_SKIP, target, assistant=assistant)
