"""A layer-skip assistant for transformers' assisted generation: Draft & Verify inside ``generate``.

Zhang et al. (2024), "Draft & Verify: Lossless Large Language Model Acceleration via
Self-Speculative Decoding": the draft is the target itself with some sublayers skipped. Usage::

    assistant = specdecode.skip_assistant(target, "profile.json")
    out = target.generate(**inputs, assistant_model=assistant)  # = target.generate(**inputs)

What transformers (5.x) needs of an ``assistant_model`` (``AssistedCandidateGenerator`` in
``generation/candidate_generator.py``): ``device``; ``config`` (``is_encoder_decoder``, the
vocabulary size, compared with the target's); a ``generation_config`` of its own
(``num_assistant_tokens``, ``num_assistant_tokens_schedule``, ``assistant_confidence_threshold``;
written back at the end of ``generate`` under the "heuristic" schedule);
``_supports_logits_to_keep``; and everything ``generate`` itself uses, since each round calls
``assistant_model.generate(...)`` with the assistant's own cache threaded through its keyword
arguments.

A shallow copy of the target has all of that and holds the target's own submodules, hence its
weights (no copy). It differs from the target in two things only: its own ``generation_config``,
and a ``forward`` that runs the target's forward inside
:func:`~specdecode.models.layerskip.skip_layers`. Sublayers are therefore skipped only while the
assistant itself computes; transformers alternates assistant and target calls on one thread, so
the target it verifies with is always whole, and every patch is undone when the forward returns
or raises. Do not call the target from another thread while the assistant runs.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel
from specdecode.models.layerskip import SkipSet, check_supported, skip_layers
from specdecode.search.profile import SkipProfile, load_profile

SCHEDULES = ("constant", "heuristic", "heuristic_transient")  # transformers' names
ASSISTANT_KEYS = (
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
)


def skip_assistant(
    target: Any,
    profile: SkipProfile | str | Path,
    *,
    use_profile_settings: bool = True,
    **assistant_settings: Any,
) -> Any:
    """An ``assistant_model`` for ``target.generate``: ``target`` minus the profile's sublayers.

    Args:
        target: a transformers causal LM (or a :class:`~specdecode.models.LoadedModel`) of a
            layer-skip architecture (Llama family, Qwen2, Mistral, GPT-2).
        profile: a skip profile (from ``specdecode search``), as a path or a :class:`SkipProfile`.
            A profile made for another model raises
            :class:`~specdecode.errors.ProfileMismatchError`.
        use_profile_settings: take the draft length and confidence threshold from the profile
            (constant schedule); False leaves transformers' assistant defaults (20 tokens,
            constant, threshold 0.4).
        assistant_settings: ``num_assistant_tokens``, ``num_assistant_tokens_schedule``,
            ``assistant_confidence_threshold``: transformers' names, overriding the above.

    Returns:
        A model of the target's class sharing its weights, with its own ``generation_config``
        (edit it as for any assistant). The target itself is never modified.
    """
    model = target.model if isinstance(target, LoadedModel) else target
    skip_profile = _as_profile(profile)
    skip_profile.check_model(_as_loaded(model))
    settings = profile_settings(skip_profile) if use_profile_settings else {}
    settings.update({k: v for k, v in assistant_settings.items() if v is not None})
    view = layer_skip_assistant(model, skip_profile.skip, **settings)
    view.skip_profile = skip_profile
    return view


def layer_skip_assistant(model: Any, skip: SkipSet, **assistant_settings: Any) -> Any:
    """The assistant of :func:`skip_assistant` from a bare skip set (no model check beyond the
    layer count); ``assistant_settings`` as there, unset ones left to transformers' defaults."""
    skip.check(check_supported(model))
    view = _shallow_view(model)
    view.generation_config = _assistant_generation_config(
        model.generation_config, assistant_settings
    )
    view.forward = _skipping_forward(view, model.forward, skip)
    view.skip_set = skip
    return view


def profile_settings(profile: SkipProfile) -> dict[str, Any]:
    """transformers' assistant settings closest to the profile's draft settings: its k, constant,
    its draft-exit threshold (transformers keeps it fixed unless scikit-learn is installed)."""
    threshold = profile.draft.threshold
    return {
        "num_assistant_tokens": profile.draft.max_draft_tokens,
        "num_assistant_tokens_schedule": "constant",
        # 0 turns transformers' confidence stop off, as a None threshold does in a profile
        "assistant_confidence_threshold": 0.0 if threshold is None else threshold,
    }


def _as_profile(profile: SkipProfile | str | Path) -> SkipProfile:
    if isinstance(profile, SkipProfile):
        return profile
    if isinstance(profile, (str, Path)):
        return load_profile(profile)
    raise InvalidSettingsError(
        f"a skip profile is a path to a profile JSON file or a SkipProfile, not "
        f"{type(profile).__name__}: make one with `specdecode search`"
    )


def _as_loaded(model: Any) -> LoadedModel:
    """The model as :class:`SkipProfile.check_model` takes it (the tokenizer is not consulted)."""
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return LoadedModel(
        model=model, tokenizer=None, name=name, dtype=model.dtype, device=model.device
    )


def _shallow_view(model: Any) -> Any:
    """A new module object holding the same submodules, parameters and buffers as ``model``.

    The registries (``_modules``, ``_parameters``, ``_buffers``, hook tables) are copied one
    level deep, so that assigning a submodule or registering a hook on the view leaves the
    target alone; the tensors and submodules in them are the target's own.
    """
    view = copy.copy(model)
    state = vars(view)
    for key, value in list(state.items()):
        if isinstance(value, (dict, set)):
            state[key] = copy.copy(value)
    return view


def _skipping_forward(view: Any, forward: Callable[..., Any], skip: SkipSet) -> Callable[..., Any]:
    """``forward`` (the target's) run with the sublayers of ``skip`` bypassed, restored on exit."""

    @functools.wraps(forward)  # keeps the signature transformers inspects (logits_to_keep, ...)
    def skipping_forward(*args: Any, **kwargs: Any) -> Any:
        with skip_layers(view, skip):
            return forward(*args, **kwargs)

    return skipping_forward


def _assistant_generation_config(base: Any, settings: dict[str, Any]) -> Any:
    """A copy of the target's generation config with the assistant settings filled in."""
    unknown = set(settings) - set(ASSISTANT_KEYS)
    if unknown:
        raise InvalidSettingsError(
            f"unknown assistant setting(s) {', '.join(sorted(unknown))}: use "
            f"{', '.join(ASSISTANT_KEYS)}"
        )
    settings = {k: v for k, v in settings.items() if v is not None}
    _check_settings(settings)
    config = copy.deepcopy(base)
    for key, value in settings.items():
        setattr(config, key, value)
    return config


def _check_settings(settings: dict[str, Any]) -> None:
    k = settings.get("num_assistant_tokens")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise InvalidSettingsError(f"num_assistant_tokens must be a positive integer, got {k!r}")
    schedule = settings.get("num_assistant_tokens_schedule")
    if schedule is not None and schedule not in SCHEDULES:
        raise InvalidSettingsError(
            f"unknown num_assistant_tokens_schedule {schedule!r}: choose one of "
            f"{', '.join(SCHEDULES)}"
        )
    threshold = settings.get("assistant_confidence_threshold")
    if threshold is not None and not 0 <= threshold < 1:
        raise InvalidSettingsError(
            f"assistant_confidence_threshold must be in [0, 1), got {threshold}"
        )
