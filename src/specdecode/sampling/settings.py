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
# Beyond transformers (the OpenAI API's processors): no model config sets them.
OPENAI_DEFAULTS: dict[str, Any] = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": (),
}
LogitBias = tuple[tuple[int, float], ...]  # (token id, added to its logit), ids ascending
# A temperature below this decodes greedily (vLLM's rule): dividing float32 logits by less
# overflows them, and the distribution is the argmax's to float precision anyway.
MIN_TEMPERATURE = 1e-5
# A repetition penalty's bounds: beyond them, dividing float32 logits by it overflows.
PENALTY_RANGE = (1e-6, 1e6)


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen from the model's logits.

    The processors run in transformers' order: repetition penalty, then the OpenAI API's
    additive ones (logit bias, presence and frequency penalties: greedy decoding follows them
    too), then (only when sampling) temperature, top-k, top-p, min-p.
    """

    do_sample: bool = False  # False: greedy (argmax of the processed logits)
    temperature: float = 1.0  # divides the logits; must be > 0 when sampling
    top_k: int = 50  # keep the k most likely tokens (ties at the k-th kept); 0 disables
    top_p: float = 1.0  # keep the smallest set whose probability mass exceeds top_p; 1 disables
    min_p: float | None = None  # drop tokens below min_p * max probability; None disables
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already in the sequence; 1 disables
    # OpenAI's: subtracted once from the logit of every token already generated (the prompt's
    # tokens not counted), and once per occurrence; 0 disables
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: LogitBias = ()  # added to these tokens' logits (-100 bans, 100 forces)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def greedy(self) -> bool:
        return not self.do_sample

    @property
    def reads_context(self) -> bool:
        """Whether a processor depends on the tokens before the position (penalties)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def shifts_logits(self) -> bool:
        """Whether anything changes the logits before the greedy choice (so that it is not the
        raw argmax)."""
        return self.reads_context or bool(self.logit_bias)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_(self, **changes: Any) -> SamplingSettings:
        return replace(self, **changes)


def validate(s: SamplingSettings) -> None:
    """Raise :class:`InvalidSettingsError` with a fix for any out-of-range value."""
    if not _finite(s.temperature):
        raise InvalidSettingsError(f"temperature must be a finite number, got {s.temperature!r}")
    if s.temperature < 0:
        raise InvalidSettingsError(
            f"temperature must be >= 0, got {s.temperature}: use 0 for greedy decoding, "
            "or a positive value (1.0 = the model's own distribution) for sampling"
        )
    if s.do_sample and s.temperature < MIN_TEMPERATURE:
        raise InvalidSettingsError(
            f"temperature {s.temperature:g} (below {MIN_TEMPERATURE:g}) means greedy decoding: "
            "set do_sample=False"
        )
    if not isinstance(s.top_k, int) or s.top_k < 0:
        raise InvalidSettingsError(
            f"top_k must be an integer >= 0 (0 disables it), got {s.top_k!r}"
        )
    if not (0 < s.top_p <= 1):
        raise InvalidSettingsError(f"top_p must be in (0, 1] (1 disables it), got {s.top_p}")
    if s.min_p is not None and not (0 <= s.min_p <= 1):
        raise InvalidSettingsError(f"min_p must be in [0, 1], got {s.min_p}")
    low, high = PENALTY_RANGE
    if not (_finite(s.repetition_penalty) and low <= s.repetition_penalty <= high):
        raise InvalidSettingsError(
            f"repetition_penalty must be > 0, between {low:g} and {high:g} (1 disables it), "
            f"got {s.repetition_penalty}"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not _finite(value):
            raise InvalidSettingsError(
                f"{name} must be a finite number (0 disables it), got {value!r}"
            )
    for pair in s.logit_bias:
        token, bias = pair
        if not isinstance(token, int) or isinstance(token, bool) or token < 0 or not _finite(bias):
            raise InvalidSettingsError(
                f"logit_bias maps token ids (integers >= 0) to finite numbers, got {pair!r}"
            )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_logit_bias(value: Any) -> LogitBias:
    """A logit bias given as a mapping ``{token id: bias}`` (ids may be strings of digits, as JSON
    keys are) or as pairs, in the settings' form: pairs sorted by id."""
    if value is None:
        return ()
    pairs = value.items() if hasattr(value, "items") else value
    out: dict[int, float] = {}
    try:
        for token, bias in pairs:
            if isinstance(token, str) and token.strip().isdigit():
                token = int(token)
            if not isinstance(token, int) or isinstance(token, bool) or not _finite(bias):
                raise TypeError
            out[token] = float(bias)
    except (TypeError, ValueError):
        raise InvalidSettingsError(
            f"logit_bias must map token ids to numbers, e.g. {{50256: -100}}, got {value!r}"
        ) from None
    return tuple(sorted(out.items()))


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
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Any = None,
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
    if temperature is not None and temperature < MIN_TEMPERATURE:  # 0 (or nearly): greedy
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
    extensions: dict[str, Any] = {
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "logit_bias": as_logit_bias(logit_bias),
    }
    for name, default in OPENAI_DEFAULTS.items():
        value = extensions[name]
        merged[name] = default if value is None else value
    return SamplingSettings(**merged)
