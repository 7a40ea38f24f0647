"""Sampling settings: one dataclass, resolved exactly as transformers' ``generate`` resolves them.

Priority (as in ``GenerationMixin._prepare_generation_config``): arguments the user passes, then the
model's own ``generation_config``, then transformers' global defaults (notably ``top_k=50`` when
sampling). Greedy decoding is ``do_sample=False``; a temperature of 0 also means greedy, as in the
OpenAI API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from specdecode.errors import InvalidSettingsError

# transformers' GenerationConfig._get_default_generation_params(), for the fields we implement.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen from the model's logits.

    The processors run in transformers' order: repetition penalty, then (only when sampling)
    temperature, top-k, top-p, min-p.
    """

    do_sample: bool = False  # False: greedy (argmax of the processed logits)
    temperature: float = 1.0  # divides the logits; must be > 0 when sampling
    top_k: int = 50  # keep the k most likely tokens (ties at the k-th kept); 0 disables
    top_p: float = 1.0  # keep the smallest set whose probability mass exceeds top_p; 1 disables
    min_p: float | None = None  # drop tokens below min_p * max probability; None disables
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already in the sequence; 1 disables

    def __post_init__(self) -> None:
        validate(self)

    @property
    def greedy(self) -> bool:
        return not self.do_sample

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_(self, **changes: Any) -> SamplingSettings:
        return replace(self, **changes)


def validate(s: SamplingSettings) -> None:
    """Raise :class:`InvalidSettingsError` with a fix for any out-of-range value."""
    if not isinstance(s.temperature, (int, float)) or math.isnan(s.temperature):
        raise InvalidSettingsError(f"temperature must be a number, got {s.temperature!r}")
    if s.temperature < 0:
        raise InvalidSettingsError(
            f"temperature must be >= 0, got {s.temperature}: use 0 for greedy decoding, "
            "or a positive value (1.0 = the model's own distribution) for sampling"
        )
    if s.do_sample and s.temperature == 0:
        raise InvalidSettingsError("temperature 0 means greedy decoding: set do_sample=False")
    if not isinstance(s.top_k, int) or s.top_k < 0:
        raise InvalidSettingsError(
            f"top_k must be an integer >= 0 (0 disables it), got {s.top_k!r}"
        )
    if not (0 < s.top_p <= 1):
        raise InvalidSettingsError(f"top_p must be in (0, 1] (1 disables it), got {s.top_p}")
    if s.min_p is not None and not (0 <= s.min_p <= 1):
        raise InvalidSettingsError(f"min_p must be in [0, 1], got {s.min_p}")
    if not (s.repetition_penalty > 0):
        raise InvalidSettingsError(
            f"repetition_penalty must be > 0 (1 disables it), got {s.repetition_penalty}"
        )


@dataclass(frozen=True)
class ResolvedGeneration:
    """Everything a generation needs beyond the prompt, after merging user, model and defaults."""

    sampling: SamplingSettings
    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())  # where we departed from the model's defaults


def resolve_sampling(
    model_generation_config: Any | None,
    *,
    temperature: float | None = None,
    do_sample: bool | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
) -> SamplingSettings:
    """Merge user arguments, the model's generation config and transformers' defaults.

    ``temperature=0`` means greedy (``do_sample=False``) whatever else is set. A positive
    temperature with ``do_sample`` unset means sampling (as in the OpenAI API and our CLI).
    """
    user = {
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
    }
    if temperature is not None and temperature < 0:
        raise InvalidSettingsError(
            f"temperature must be >= 0, got {temperature}: use 0 for greedy decoding"
        )
    if temperature == 0:
        user["do_sample"] = False
        user["temperature"] = None
    elif temperature is not None and do_sample is None:
        user["do_sample"] = True
    merged: dict[str, Any] = {}
    for name, default in TRANSFORMERS_DEFAULTS.items():
        value = user[name]
        if value is None and model_generation_config is not None:
            value = getattr(model_generation_config, name, None)
        merged[name] = default if value is None else value
    if merged["temperature"] == 0:  # a model config may say temperature 0 too
        merged["do_sample"] = False
        merged["temperature"] = 1.0
    merged["top_k"] = int(merged["top_k"])
    return SamplingSettings(**merged)
