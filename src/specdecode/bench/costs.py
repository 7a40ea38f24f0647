"""Micro-benchmark of single-step costs on the real models, at a context like the prompts'.

Measured directly rather than inferred from whole generations:

- ``target_step``: one forward pass of the target over 1 new token (a plain decoding step);
- ``verify[k]``: one forward pass of the target over k + 1 new tokens (the pending token and k
  drafted ones: one verification round), and ``c_v(k) = verify[k] / target_step``;
- ``torch_target_step``: the plain step again on torch's own kernels, where the target runs on
  oneDNN's (:mod:`specdecode.models.kernels`) and kept torch's for transformers' modes;
- ``draft_step[key]``: one call of a drafter proposing 1 token after the target has verified the
  context (for a draft model or a layer-skipped target, one forward pass over 1 token plus the
  sampler; for prompt lookup, one n-gram search), and ``c = draft_step / target_step``.

Each figure is the median of several repetitions after one discarded warm-up, each timer read
after a device sync. The context is rolled back after every repetition, so all repetitions see
the same context length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from specdecode.drafters import Drafter
from specdecode.models import LoadedModel, Session
from specdecode.models.kernels import TORCH
from specdecode.models.timing import median_time
from specdecode.sampling import SamplingSettings, TokenSampler


@dataclass(frozen=True)
class CostProbe:
    """A drafter to time. ``session`` is the target session it drafts on, for drafters bound
    to the target (layer skipping); the context is prefilled there first, as the loop would."""

    key: str  # modes whose drafts cost the same share a key (measured once)
    drafter: Drafter
    session: Session | None = None


@dataclass
class StepCosts:
    """Single-step timings (seconds, medians) and the ratios derived from them."""

    context_tokens: int
    repetitions: int
    target_step: float
    verify: dict[int, float] = field(default_factory=dict)  # k -> seconds for k + 1 tokens
    draft_step: dict[str, float] = field(default_factory=dict)  # drafter key -> seconds
    kernels: str = "torch"  # the target's linear kernels while these were timed
    torch_target_step: float | None = None  # the same step on torch's kernels, where different

    def verify_cost(self, k: int) -> float | None:
        """c_v(k): a verification round of k drafted tokens relative to one plain step."""
        seconds = self.verify.get(k)
        return None if seconds is None else seconds / self.target_step

    def c(self, key: str) -> float | None:
        """Draft step relative to target step."""
        seconds = self.draft_step.get(key)
        return None if seconds is None else seconds / self.target_step

    def to_dict(self) -> dict[str, object]:
        return {
            "context_tokens": self.context_tokens,
            "repetitions": self.repetitions,
            "target_step_seconds": self.target_step,
            "verify_seconds": {str(k): v for k, v in sorted(self.verify.items())},
            "verify_cost": {str(k): self.verify_cost(k) for k in sorted(self.verify)},
            "draft_step_seconds": dict(self.draft_step),
            "c": {key: self.c(key) for key in self.draft_step},
            "kernels": self.kernels,
            "torch_target_step_seconds": self.torch_target_step,
        }


def measure_costs(
    target: LoadedModel,
    context: Sequence[int],
    ks: Sequence[int],
    probes: Sequence[CostProbe],
    repetitions: int = 5,
) -> StepCosts:
    """Time the target's step, its verification of each k in ``ks`` and each drafter's step,
    all at the length of ``context`` (token ids; at least max(ks) + 2 of them)."""
    ids = list(context)
    width = max([1, *ks]) + 1
    if len(ids) < width + 1:
        raise ValueError(f"the cost context needs at least {width + 1} tokens, got {len(ids)}")
    prefix, tail = ids[:-width], ids[-width:]
    session = target.new_session()
    session.forward(prefix, 1)
    costs = StepCosts(
        context_tokens=len(prefix),
        repetitions=repetitions,
        target_step=median_time(lambda: _pass(session, tail[:1]), repetitions, target.device),
    )
    for k in sorted(set(ks)):
        costs.verify[k] = median_time(
            partial(_pass, session, tail[: k + 1]), repetitions, target.device
        )
    costs.kernels = target.kernel_name
    with target.using_kernels(TORCH, required=False) as kind:
        if kind != costs.kernels:  # the step transformers' modes took, for the report
            costs.torch_target_step = median_time(
                lambda: _pass(session, tail[:1]), repetitions, target.device
            )
    session.reset()
    for probe in probes:
        if probe.key not in costs.draft_step:
            costs.draft_step[probe.key] = drafter_step_seconds(
                probe, prefix, repetitions, target.device
            )
    return costs


def drafter_step_seconds(
    probe: CostProbe, context: Sequence[int], repetitions: int, device: torch.device
) -> float:
    """Median time of ``drafter.propose(context, 1)``, repeated on the same context.

    A drafter keeps its cache in step with the ids it is given and rolls back to their common
    prefix, so every call after the first re-feeds just the last token: one 1-token pass.
    """
    ids = list(context)
    if probe.session is not None:
        probe.session.reset()
        probe.session.forward(ids, 1)
    sampler = TokenSampler(SamplingSettings(), torch.Generator().manual_seed(0))
    probe.drafter.begin(ids)
    probe.drafter.propose(ids, 1, sampler)  # the first call may prefill: not timed
    return median_time(lambda: probe.drafter.propose(ids, 1, sampler), repetitions, device)


def _pass(session: Session, tokens: list[int]) -> None:
    """One forward pass over ``tokens``, then roll the cache back to where it was."""
    length = session.length
    session.forward(tokens, len(tokens))
    session.truncate(length)
