"""transformers' ``generate`` arguments beyond the sampling settings, as our loop understands them.

So that moving a call from ``model.generate(**inputs, ...)`` to
``SpeculativeGenerator.generate(**inputs, ...)`` changes one line:

- the prompt as transformers takes it: ``input_ids`` (a ``(1, T)`` tensor, with an optional
  ``attention_mask`` whose zeros mark padding), ``inputs=``, or a tokenizer's ``BatchEncoding``;
- ``max_length`` (prompt plus new tokens) when ``max_new_tokens`` is not given;
- the assisted-generation settings, mapped onto our drafter and draft-length schedule for this
  call: ``num_assistant_tokens`` and ``num_assistant_tokens_schedule`` (k and its schedule),
  ``assistant_confidence_threshold`` (a draft model's or the layer-skip drafter's early stop),
  ``prompt_lookup_num_tokens`` and ``max_matching_ngram_size`` (prompt lookup, as transformers
  switches to it: it replaces the drafter for the call and drafts that many tokens).

Each comes from the keyword arguments first, then from a ``generation_config`` passed in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from specdecode.drafters import Drafter, DraftLength, FixedLength, HeuristicLength
from specdecode.drafters.hybrid import LookupDrafter
from specdecode.drafters.layerskip import DraftExit, LayerSkipDrafter
from specdecode.drafters.model import ModelDrafter
from specdecode.drafters.prompt_lookup import PromptLookupDrafter
from specdecode.errors import InvalidSettingsError, PromptError

DRAFTING_KEYS = (
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "prompt_lookup_num_tokens",
    "max_matching_ngram_size",
)
# accepted because transformers users pass them, and without effect on one sequence's output
IGNORED_KEYS = ("pad_token_id", "use_cache", "tokenizer")
_HEURISTIC = ("heuristic", "heuristic_transient")


@dataclass(frozen=True)
class DraftingOverrides:
    """This call's assisted-generation settings (transformers' names); None: the generator's own."""

    num_assistant_tokens: int | None = None  # k (the initial k for a heuristic schedule)
    num_assistant_tokens_schedule: str | None = None  # constant, heuristic, heuristic_transient
    assistant_confidence_threshold: float | None = None  # stop a draft below this probability
    prompt_lookup_num_tokens: int | None = None  # draft by prompt lookup, this many tokens
    max_matching_ngram_size: int | None = None  # longest n-gram prompt lookup matches (2)

    @property
    def empty(self) -> bool:
        return all(getattr(self, key) is None for key in DRAFTING_KEYS)

    def apply(self, drafter: Drafter | None, schedule: DraftLength) -> tuple[Drafter, DraftLength]:
        """The drafter and schedule for this call (copies; the generator's own are not changed)."""
        if self.prompt_lookup_num_tokens is not None:
            lookup = PromptLookupDrafter(max_ngram=self.max_matching_ngram_size or 2, min_ngram=1)
            return lookup, FixedLength(
                _positive("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens)
            )
        if drafter is None:
            raise InvalidSettingsError(
                "assisted-generation settings need a drafter: build the SpeculativeGenerator with "
                "one, or pass prompt_lookup_num_tokens to draft by prompt lookup"
            )
        if self.max_matching_ngram_size is not None:
            drafter = _with_ngram(drafter, self.max_matching_ngram_size)
        if self.assistant_confidence_threshold is not None:
            drafter = _with_threshold(drafter, self.assistant_confidence_threshold)
        return drafter, self._schedule(schedule)

    def _schedule(self, current: DraftLength) -> DraftLength:
        if self.num_assistant_tokens is None and self.num_assistant_tokens_schedule is None:
            return current
        k = self.num_assistant_tokens
        k = _positive("num_assistant_tokens", k) if k is not None else _initial_k(current)
        kind = self.num_assistant_tokens_schedule or "constant"
        if kind == "constant":
            return FixedLength(k)
        if kind in _HEURISTIC:  # ours restarts from k every call: transformers' heuristic_transient
            return HeuristicLength(k)
        raise InvalidSettingsError(
            f"unknown num_assistant_tokens_schedule {kind!r}: choose constant, heuristic or "
            "heuristic_transient"
        )


@dataclass(frozen=True)
class TransformersCall:
    """A call's arguments sorted: the prompt, drafting overrides, the rest for resolve_request."""

    prompt: str | list[int]
    drafting: DraftingOverrides
    max_length: int | None  # transformers' prompt + new tokens; used when max_new_tokens is unset
    kwargs: dict[str, Any]  # for :func:`specdecode.decoding.config.resolve_request`

    def request_kwargs(self, prompt_length: int) -> dict[str, Any]:
        """The arguments of ``resolve_request``, ``max_length`` turned into ``max_new_tokens``."""
        kwargs = dict(self.kwargs)
        config = kwargs.get("generation_config")
        given = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None)
        if self.max_length is not None and given is None:
            if self.max_length <= prompt_length:
                raise PromptError(
                    f"max_length={self.max_length} leaves no room after the {prompt_length}-token "
                    "prompt: raise it or pass max_new_tokens"
                )
            kwargs["max_new_tokens"] = self.max_length - prompt_length
        return kwargs


def split_call(prompt: Any, kwargs: dict[str, Any]) -> TransformersCall:
    """Sort ``generate``'s arguments (see the module docstring); ``kwargs`` is not modified."""
    rest = {k: v for k, v in kwargs.items() if k not in IGNORED_KEYS}
    input_ids = rest.pop("input_ids", None)
    inputs = rest.pop("inputs", None)
    mask = rest.pop("attention_mask", None)
    config = rest.get("generation_config")
    drafting = DraftingOverrides(**{key: _pick(key, rest, config) for key in DRAFTING_KEYS})
    max_length = _pick("max_length", rest, config)
    return TransformersCall(
        prompt=_prompt(prompt, input_ids if input_ids is not None else inputs, mask),
        drafting=drafting,
        max_length=max_length,
        kwargs=rest,
    )


def _pick(key: str, kwargs: dict[str, Any], config: Any) -> Any:
    value = kwargs.pop(key, None)
    return value if value is not None else getattr(config, key, None)


def _prompt(prompt: Any, input_ids: Any, mask: Any) -> str | list[int]:
    """The prompt as a string or a list of ids; tensors of one sequence, padding dropped."""
    if prompt is not None and input_ids is not None:
        raise PromptError("give the prompt once: positionally or as input_ids, not both")
    if prompt is None and input_ids is None:
        raise PromptError("no prompt: pass a string, token ids, or input_ids=")
    if prompt is not None and hasattr(prompt, "keys"):  # a tokenizer's BatchEncoding
        prompt, mask = prompt["input_ids"], prompt.get("attention_mask", mask)
    value = prompt if prompt is not None else input_ids
    if isinstance(value, str):
        return value
    ids = _one_row(value, "input_ids")
    if mask is None:
        return ids
    keep = _one_row(mask, "attention_mask")
    if len(keep) != len(ids):
        raise PromptError(
            f"attention_mask has {len(keep)} positions but input_ids has {len(ids)}: pass the "
            "two from the same tokenizer call"
        )
    return [t for t, m in zip(ids, keep, strict=True) if m]


def _one_row(value: Any, name: str) -> list[int]:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if tensor.dim() == 2:
        if tensor.shape[0] != 1:
            raise PromptError(
                f"{name} holds {tensor.shape[0]} sequences; specdecode decodes one at a time "
                "(as transformers' assisted generation does): pass one row, or use `specdecode "
                "serve` for concurrent requests"
            )
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise PromptError(f"{name} must be of shape (1, T) or (T,), got {tuple(tensor.shape)}")
    return [int(i) for i in tensor.tolist()]


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidSettingsError(f"{name} must be a positive integer, got {value!r}")
    return value


def _initial_k(schedule: DraftLength) -> int:
    """The k a schedule starts from (for a new schedule kind with the same length)."""
    if isinstance(schedule, HeuristicLength):
        return schedule.initial
    if isinstance(schedule, FixedLength):
        return schedule.k
    return 5


def _with_threshold(drafter: Drafter, threshold: float) -> Drafter:
    """A copy of ``drafter`` that stops a draft below ``threshold`` (fixed, as transformers
    keeps it without scikit-learn)."""
    if not 0 <= threshold < 1:
        raise InvalidSettingsError(
            f"assistant_confidence_threshold must be in [0, 1), got {threshold}"
        )
    if isinstance(drafter, LookupDrafter):  # the threshold is its model's
        hybrid = copy.copy(drafter)
        hybrid.model = _with_threshold(drafter.model, threshold)
        return hybrid
    if isinstance(drafter, ModelDrafter):
        model_drafter = copy.copy(drafter)  # the same draft model and session
        model_drafter.confidence_threshold = threshold
        return model_drafter
    if isinstance(drafter, LayerSkipDrafter):
        skip_drafter = copy.copy(drafter)  # bound to the same target session
        skip_drafter.exit = DraftExit(threshold=threshold, adaptive=False)
        return skip_drafter
    raise InvalidSettingsError(
        f"assistant_confidence_threshold applies to a draft model or a layer-skip drafter, not "
        f"to the {type(drafter).__name__}: drop it"
    )


def _with_ngram(drafter: Drafter, size: int) -> Drafter:
    if isinstance(drafter, PromptLookupDrafter):
        return PromptLookupDrafter(
            max_ngram=_positive("max_matching_ngram_size", size), min_ngram=1
        )
    if isinstance(drafter, LookupDrafter):  # lookup in front of a model: the same model
        size = _positive("max_matching_ngram_size", size)
        return LookupDrafter(
            drafter.model, drafter.lookup_tokens, size, min(drafter.min_ngram, size)
        )
    raise InvalidSettingsError(
        "max_matching_ngram_size applies to prompt lookup: pass prompt_lookup_num_tokens too"
    )
