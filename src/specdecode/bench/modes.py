"""The ways of generating that a benchmark compares, behind one small interface.

A :class:`Mode` turns prompt ids into new token ids. transformers' modes call its ``generate``
(plain, assisted with a draft model, prompt lookup); ours call :class:`SpeculativeGenerator`.
Every mode receives the same prompt ids and the same fully resolved :class:`GenerationRequest`,
so that their outputs can be compared token by token. Timing is the runner's job, not the mode's.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from specdecode.bench.costs import CostProbe
from specdecode.decoding import GenerationRequest, GenerationStats, SpeculativeGenerator
from specdecode.models import LoadedModel
from specdecode.models.attention import transformers_attention, transformers_implementation
from specdecode.models.kernels import TORCH

REFERENCE = "hf-plain"  # the mode every other is compared with

# transformers' global defaults for assisted generation, used where the assistant's own
# generation_config leaves a field unset (GenerationConfig._get_default_generation_params()).
_ASSISTANT_FIELDS = (
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
)


@dataclass(frozen=True)
class ModeOutput:
    """What one generation produced; timing is added by the runner."""

    token_ids: list[int]  # new tokens only
    stats: GenerationStats | None = None  # our loop's statistics (None for transformers' modes)
    target_passes: int | None = None  # forward passes of the target model
    draft_passes: int | None = None  # forward passes of a draft model, where there is one


class Mode(ABC):
    """One way of generating. ``cost_probe`` is the drafter whose single step the cost
    micro-benchmark times for this mode's c (None: the mode drafts nothing, or c is unknown)."""

    name: str
    family: str  # "transformers" or "specdecode"
    cost_probe: CostProbe | None = None

    @abstractmethod
    def run(self, prompt_ids: list[int], request: GenerationRequest, seed: int) -> ModeOutput:
        """Generate from ``prompt_ids`` with exactly the settings of ``request``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Every setting that shapes this mode's speed, to record beside its timings."""


# ------------------------------------------------------------------------ transformers' modes
@dataclass
class ForwardCounter:
    """Counts a model's forward calls and the tokens fed to them."""

    calls: int = 0
    tokens: int = 0

    def hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0


@contextmanager
def count_forwards(model: Any) -> Iterator[ForwardCounter]:
    """Count ``model``'s forward calls while the block runs; the hook is always removed."""
    counter = ForwardCounter()
    handle = model.register_forward_hook(counter.hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@contextmanager
def assistant_settings(assistant: Any, overrides: dict[str, Any]) -> Iterator[Any]:
    """Give the assistant a fresh copy of its original generation config plus ``overrides``.

    transformers reads the draft length from the *assistant's* generation config (not from the
    arguments of ``generate``) and, with the "heuristic" schedule, writes the length it ended
    with back into it, so that the next call would start where the last one stopped. A fresh
    copy per call makes every prompt start equal; the original is restored afterwards.
    """
    original = assistant.generation_config
    config = copy.deepcopy(original)
    for key, value in overrides.items():
        setattr(config, key, value)
    assistant.generation_config = config
    try:
        yield config
    finally:
        assistant.generation_config = original


def effective_assistant_settings(assistant: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The assisted-generation settings transformers will use: overrides, then the assistant's
    generation config, then transformers' global defaults."""
    config = copy.deepcopy(assistant.generation_config)
    defaults: dict[str, Any] = getattr(config, "_get_default_generation_params", dict)()
    out: dict[str, Any] = {}
    for key in _ASSISTANT_FIELDS:
        value = overrides.get(key, getattr(config, key, None))
        out[key] = defaults.get(key) if value is None else value
    return out


def transformers_kwargs(request: GenerationRequest, target: LoadedModel) -> dict[str, Any]:
    """``generate`` keyword arguments equal to ``request`` (which our loop follows too)."""
    s = request.sampling
    eos = sorted(request.eos_token_ids)
    kwargs: dict[str, Any] = {
        "max_new_tokens": request.max_new_tokens,
        "do_sample": s.do_sample,
        "repetition_penalty": s.repetition_penalty,
        "eos_token_id": eos or None,
        "pad_token_id": _pad_id(target, eos),
    }
    if s.do_sample:
        kwargs.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
    if request.stop_strings:
        kwargs.update(stop_strings=list(request.stop_strings), tokenizer=target.tokenizer)
    return kwargs


def _pad_id(target: LoadedModel, eos: list[int]) -> int:
    pad = getattr(target.model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(target.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad[0] if isinstance(pad, list) else pad)


class TransformersMode(Mode):
    """transformers' ``generate`` on the target, with extra ``generate`` arguments (prompt
    lookup) and optionally an assistant model with its generation-config ``overrides``."""

    family = "transformers"

    def __init__(
        self,
        name: str,
        target: LoadedModel,
        *,
        assistant: LoadedModel | None = None,
        assistant_overrides: dict[str, Any] | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        cost_probe: CostProbe | None = None,
    ) -> None:
        self.name = name
        self.target = target
        self.assistant = assistant
        self.overrides = dict(assistant_overrides or {})
        self.generate_kwargs = dict(generate_kwargs or {})
        self.cost_probe = cost_probe

    def run(self, prompt_ids: list[int], request: GenerationRequest, seed: int) -> ModeOutput:
        # transformers' modes run on torch's own kernels and transformers' own attention, as
        # its users get them, where the models kept the kernels (`specdecode bench` does); ours
        # on what the models were loaded with (oneDNN and the folded GQA attention on the CPU)
        with ExitStack() as stack:
            for model in (self.target, self.assistant):
                if model is not None:
                    stack.enter_context(model.using_kernels(TORCH, required=False))
                    stack.enter_context(transformers_attention(model.model))
            return self._run(prompt_ids, request, seed)

    def _run(self, prompt_ids: list[int], request: GenerationRequest, seed: int) -> ModeOutput:
        torch.manual_seed(seed)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.target.device)
        kwargs = {**transformers_kwargs(request, self.target), **self.generate_kwargs}
        if self.assistant is None:
            with count_forwards(self.target.model) as passes:
                out = self._generate(input_ids, kwargs)
            return ModeOutput(_new_ids(out, len(prompt_ids)), target_passes=passes.calls)
        with (
            assistant_settings(self.assistant.model, self.overrides),
            count_forwards(self.target.model) as passes,
            count_forwards(self.assistant.model) as drafts,
        ):
            out = self._generate(input_ids, {**kwargs, "assistant_model": self.assistant.model})
        return ModeOutput(
            _new_ids(out, len(prompt_ids)), target_passes=passes.calls, draft_passes=drafts.calls
        )

    @torch.inference_mode()
    def _generate(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out: torch.Tensor = self.target.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
        )
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family, "call": "transformers generate"}
        out["kernels"] = _kernels_used(self.target)
        out["attention"] = transformers_implementation(self.target.model)
        out.update(self.generate_kwargs)
        if self.assistant is not None:
            out["assistant_model"] = self.assistant.name
            out["assistant_dtype"] = str(self.assistant.dtype).removeprefix("torch.")
            out["assistant_overrides"] = dict(self.overrides)
            out.update(effective_assistant_settings(self.assistant.model, self.overrides))
        return out


def _kernels_used(model: LoadedModel) -> str:
    """The kernels transformers' modes run ``model`` on: torch's where the model kept them."""
    with model.using_kernels(TORCH, required=False) as kind:
        return kind


def _new_ids(sequences: torch.Tensor, prompt_length: int) -> list[int]:
    return [int(t) for t in sequences[0, prompt_length:].tolist()]


# ------------------------------------------------------------------------------- our modes
@dataclass
class SpecDecodeMode(Mode):
    """Our decoding loop with a drafter (None: plain decoding on the same code path)."""

    name: str
    generator: SpeculativeGenerator
    extra: dict[str, Any] = field(default_factory=dict)  # further settings to record
    cost_key: str | None = None  # shared with modes whose draft step costs the same
    family: str = "specdecode"

    def __post_init__(self) -> None:
        drafter = self.generator.drafter
        if drafter is not None:
            key = self.cost_key or self.name
            self.cost_probe = CostProbe(key, drafter, self.generator.session)

    def run(self, prompt_ids: list[int], request: GenerationRequest, seed: int) -> ModeOutput:
        result = self.generator.generate(prompt_ids, seed=seed, **ours_kwargs(request))
        stats = result.stats
        return ModeOutput(result.token_ids, stats=stats, target_passes=stats.target_passes)

    def describe(self) -> dict[str, Any]:
        drafter = self.generator.drafter
        out: dict[str, Any] = {"family": self.family, "call": "SpeculativeGenerator.generate"}
        target = self.generator.target
        out["kernels"] = target.kernel_name
        if target.kernels is not None and target.kernels.row_padding():
            out["row_padding"] = target.kernels.row_padding()
        out["drafter"] = None if drafter is None else drafter.describe()
        out["draft_length"] = self.generator.schedule.describe() if drafter is not None else None
        out.update(self.extra)
        return out


def ours_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """``SpeculativeGenerator.generate`` keyword arguments equal to ``request``."""
    return {
        **request.sampling.as_dict(),
        "max_new_tokens": request.max_new_tokens,
        "eos_token_id": sorted(request.eos_token_ids),
        "stop_strings": list(request.stop_strings) or None,
        "sampling_mode": request.sampling_mode,
    }
