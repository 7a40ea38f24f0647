"""Pure sampling core: settings, logits processors and samplers. Imports no model code."""

from specdecode.sampling.gumbel import gumbel_argmax, gumbel_noise
from specdecode.sampling.logprobs import TokenLogprob, token_logprobs
from specdecode.sampling.processors import (
    apply_logit_bias,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
)
from specdecode.sampling.sample import greedy, sample, to_probs
from specdecode.sampling.sampler import Choice, TokenConstraint, TokenSampler
from specdecode.sampling.seeded import SeededSampler
from specdecode.sampling.settings import SamplingSettings, resolve_sampling

__all__ = [
    "Choice",
    "SamplingSettings",
    "SeededSampler",
    "TokenConstraint",
    "TokenLogprob",
    "TokenSampler",
    "apply_logit_bias",
    "apply_min_p",
    "apply_presence_frequency",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "greedy",
    "gumbel_argmax",
    "gumbel_noise",
    "process_logits",
    "resolve_sampling",
    "sample",
    "to_probs",
    "token_logprobs",
]
