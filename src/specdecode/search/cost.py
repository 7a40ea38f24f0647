"""A cost model of self-speculation, measured once per model and machine.

On a memory-bound device a decoding step costs roughly the weights it reads, so the cost of a
layer-skipped step is linear in the sublayers skipped. :func:`calibrate` times a full
single-token step, the same step with every attention sublayer skipped and with every MLP
sublayer skipped (medians of several runs), and a (k+1)-token verification pass. From that:

- ``c(skip) = 1 - a * |skipped attention| - m * |skipped MLP|``, the draft step's cost relative
  to a full step, ``a`` and ``m`` the measured cost shares of one attention / MLP sublayer;
- ``v``, the verification pass's cost relative to a single-token step (on CPUs well above 1).

The modelled speedup of a run is then the tokens it decoded after the prefill over what they
cost in target steps: ``tokens / (rounds * v + drafted * c)`` (plain decoding costs 1 per
token). With greedy decoding the counts are deterministic, so this objective has no timing noise.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from specdecode.models import LoadedModel, ModelSession
from specdecode.models.layerskip import SkipSet, check_supported, skip_layers
from specdecode.models.timing import synchronize

MIN_DRAFT_COST = 0.01  # floor of c, so that a model never promises a free draft


@dataclass(frozen=True)
class CostModel:
    """Measured step costs, relative to one full single-token step of ``step_seconds``."""

    attention: float  # cost share of one attention sublayer
    mlp: float  # cost share of one MLP sublayer
    verify: float  # a (k+1)-token pass over a 1-token step
    step_seconds: float  # a full single-token step with ``context`` tokens cached
    context: int  # cached tokens when timed
    k: int  # draft length the verification pass was timed with

    def draft_cost(self, skip: SkipSet) -> float:
        """c: a draft step's cost relative to a full step."""
        c = 1.0 - self.attention * len(skip.attention) - self.mlp * len(skip.mlp)
        return max(c, MIN_DRAFT_COST)

    def speedup(self, decoded: int, rounds: int, drafted: int, skip: SkipSet) -> float:
        """Modelled speedup over plain decoding of ``decoded`` tokens made in ``rounds`` rounds."""
        cost = rounds * self.verify + drafted * self.draft_cost(skip)
        return decoded / cost if cost > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        return cls(**data)


def calibrate(target: LoadedModel, context_ids: list[int], k: int, repeats: int = 9) -> CostModel:
    """Time the steps the cost model needs on ``target`` after ``context_ids`` (see module doc).

    The four kinds of step take turns, ``repeats`` rounds after a warm-up round, and each keeps
    its median, so that a busy spell of the machine hits all of them alike.
    """
    layers = check_supported(target.model)
    session = ModelSession(target.model)
    session.forward(context_ids, 1)
    token = context_ids[-1]
    steps = {
        "full": (SkipSet(), [token]),
        "no_attention": (SkipSet.of(attention=range(layers)), [token]),
        "no_mlp": (SkipSet.of(mlp=range(layers)), [token]),
        "verify": (SkipSet(), [token] * (k + 1)),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats + 1):
        for name, (skip, ids) in steps.items():
            times[name].append(_timed_step(session, skip, ids))
    t = {name: statistics.median(values[1:]) for name, values in times.items()}
    full = t["full"]
    return CostModel(
        attention=max(full - t["no_attention"], 0.0) / (layers * full),
        mlp=max(full - t["no_mlp"], 0.0) / (layers * full),
        verify=max(t["verify"] / full, 1.0),  # a longer pass never costs less than one token's
        step_seconds=full,
        context=len(context_ids),
        k=k,
    )


def _timed_step(session: ModelSession, skip: SkipSet, ids: list[int]) -> float:
    """Seconds to feed ``ids`` after the session's context with ``skip`` (then rolled back)."""
    length = session.length
    with skip_layers(session.model, skip):
        start = time.perf_counter()
        session.forward(ids, 1)
        synchronize(session.device)
        seconds = time.perf_counter() - start
    session.truncate(length)
    return seconds
