"""Resolving a generation request: user arguments, then the model's generation config, then
transformers' defaults, exactly in ``generate``'s order of priority."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel
from specdecode.sampling import SamplingSettings, resolve_sampling

DEFAULT_MAX_NEW_TOKENS = 256  # when neither the user nor the model's generation config says

_SAMPLING_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    # the OpenAI API's, beyond transformers' generate
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
)

# How sampled tokens are verified (greedy decoding ignores it); see docs/seeded-sampling.md.
# "seeded": the output is a function of the seed alone, whatever the drafter (Gumbel matching);
# "rejection": standard speculative sampling (Leviathan et al.), the higher acceptance rate.
SamplingMode = Literal["seeded", "rejection"]
SAMPLING_MODES = ("auto", "seeded", "rejection")  # auto: seeded when a seed is given


def resolve_sampling_mode(asked: str | None, seed_given: bool) -> SamplingMode:
    """``auto`` (or None) is ``seeded`` when the caller gave a seed, else ``rejection``.

    A seed asks for reproducible output, and only the seeded mode makes it independent of the
    drafter and draft length; without one there is nothing to reproduce, so the rule with the
    higher acceptance rate (optimal coupling) is used.
    """
    if asked in (None, "auto"):
        return "seeded" if seed_given else "rejection"
    if asked == "seeded":
        return "seeded"
    if asked == "rejection":
        return "rejection"
    raise InvalidSettingsError(
        f"unknown sampling mode {asked!r}: choose one of {', '.join(SAMPLING_MODES)}"
    )


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation needs besides the prompt."""

    sampling: SamplingSettings
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    sampling_mode: SamplingMode = "rejection"  # how sampled drafts are verified (not greedy)

    def describe(self) -> dict[str, Any]:
        return {
            **self.sampling.as_dict(),
            "max_new_tokens": self.max_new_tokens,
            "eos_token_ids": sorted(self.eos_token_ids),
            "stop_strings": list(self.stop_strings),
            **({"sampling_mode": self.sampling_mode} if self.sampling.do_sample else {}),
        }


def resolve_request(
    target: LoadedModel,
    prompt_length: int,
    *,
    generation_config: Any | None = None,
    max_new_tokens: int | None = None,
    eos_token_id: int | list[int] | None = None,
    stop_strings: str | list[str] | None = None,
    stop: str | list[str] | None = None,
    sampling_mode: SamplingMode = "rejection",
    scores_prompt: bool = False,
    **sampling_kwargs: Any,
) -> GenerationRequest:
    """Merge arguments as transformers' ``generate`` does.

    A ``generation_config`` (transformers ``GenerationConfig``) counts as user arguments; explicit
    keyword arguments override it. ``sampling_mode`` is recorded as given (already resolved, see
    :func:`resolve_sampling_mode`). ``scores_prompt``: the call asks for the prompt's
    log-probabilities, so ``max_new_tokens=0`` (the prompt scored, nothing generated) is allowed.
    """
    unknown = set(sampling_kwargs) - set(_SAMPLING_KEYS)
    if unknown:
        raise InvalidSettingsError(
            f"unknown generation argument(s): {', '.join(sorted(unknown))}; supported: "
            f"{', '.join(_SAMPLING_KEYS)}, max_new_tokens, eos_token_id, stop_strings"
        )
    user: dict[str, Any] = {}
    if generation_config is not None:
        for key in (*_SAMPLING_KEYS, "max_new_tokens", "eos_token_id", "stop_strings"):
            value = getattr(generation_config, key, None)
            if value is not None:
                user[key] = value
    user.update({k: v for k, v in sampling_kwargs.items() if v is not None})
    for key, value in (
        ("max_new_tokens", max_new_tokens),
        ("eos_token_id", eos_token_id),
        ("stop_strings", stop_strings if stop_strings is not None else stop),
    ):
        if value is not None:
            user[key] = value

    model_config = getattr(target.model, "generation_config", None)
    sampling = resolve_sampling(model_config, **{k: user.get(k) for k in _SAMPLING_KEYS})
    stops, stop_ids = _special_stops(target.tokenizer, _stop_strings(user.get("stop_strings")))
    return GenerationRequest(
        sampling=sampling,
        max_new_tokens=_max_new_tokens(
            target, prompt_length, user.get("max_new_tokens"), model_config, scores_prompt
        ),
        eos_token_ids=_eos_ids(target, user.get("eos_token_id"), model_config) | stop_ids,
        stop_strings=stops,
        sampling_mode=resolve_sampling_mode(sampling_mode, seed_given=False),
    )


def _special_stops(
    tokenizer: Any, stops: tuple[str, ...]
) -> tuple[tuple[str, ...], frozenset[int]]:
    """Stop strings that are one special token (``<|im_end|>``) become end-of-sequence ids: the
    text is decoded without special tokens, so as strings they could never match."""
    added: dict[str, int] = getattr(tokenizer, "get_added_vocab", dict)()
    kept, ids = [], set()
    for stop in stops:
        token = added.get(stop)
        if token is not None and not tokenizer.decode([token], skip_special_tokens=True):
            ids.add(int(token))
        else:
            kept.append(stop)
    return tuple(kept), frozenset(ids)


def _max_new_tokens(
    target: LoadedModel, prompt_length: int, asked: Any, model_config: Any, scores_prompt: bool
) -> int:
    value = asked
    if value is None and model_config is not None:
        value = getattr(model_config, "max_new_tokens", None)
    if value is None:
        value = DEFAULT_MAX_NEW_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if scores_prompt else 1):
        raise InvalidSettingsError(
            f"max_new_tokens must be a positive integer, got {value!r}"
            + (" (0 only scores the prompt: pass prompt_logprobs)" if value == 0 else "")
        )
    limit = target.max_context
    if limit is not None:
        value = min(value, limit - prompt_length)
    return value


def _eos_ids(target: LoadedModel, asked: Any, model_config: Any) -> frozenset[int]:
    value = asked
    if value is None and model_config is not None:
        value = getattr(model_config, "eos_token_id", None)
    if value is None:
        value = getattr(target.model.config, "eos_token_id", None)
    if value is None:
        value = getattr(target.tokenizer, "eos_token_id", None)
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset([value])
    return frozenset(int(v) for v in value)


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    out = tuple(value)
    if not all(isinstance(s, str) for s in out):
        raise InvalidSettingsError("stop strings must be strings")
    return tuple(s for s in out if s)
