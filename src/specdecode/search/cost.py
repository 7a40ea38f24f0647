"""A cost model of self-speculation, measured once per model and machine.

On a memory-bound device a decoding step costs roughly the weights it reads, so the cost of a
layer-skipped step is linear in the sublayers skipped. :func:`calibrate` times a full
single-token step, the same step with every attention sublayer skipped and with every MLP
sublayer skipped, and target passes over 2 to k+1 tokens (medians of several runs). From that:

- ``c(skip) = 1 - a * |skipped attention| - m * |skipped MLP|``, the draft step's cost relative
  to a full step, ``a`` and ``m`` the measured cost shares of one attention / MLP sublayer;
- ``v(n)``, the cost of a verification pass over n tokens relative to a one-token step (on a CPU
  far from 1, and not monotonic in n: see ``../shared/MODELS.md``).

The modelled speedup of a run is the tokens it decoded after the prefill over what they cost in
target steps, ``tokens / (sum over rounds of v(d + 1) + drafted * c)`` for rounds drafting d
tokens (plain decoding costs 1 per token). With greedy decoding the counts are deterministic, so
this objective has no timing noise; it leaves out the loop's own overhead (sampling, bookkeeping),
which the final timed comparison includes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
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
    verify: tuple[float, ...]  # verify[n - 1]: a pass over n tokens, n = 1 .. k + 1 (v(1) = 1)
    step_seconds: float  # a full single-token step with ``context`` tokens cached
    context: int  # cached tokens when timed

    def draft_cost(self, skip: SkipSet) -> float:
        """c: a draft step's cost relative to a full step."""
        c = 1.0 - self.attention * len(skip.attention) - self.mlp * len(skip.mlp)
        return max(c, MIN_DRAFT_COST)

    def verify_cost(self, tokens: int) -> float:
        """v(n): a target pass over ``tokens`` tokens (the longest timed one beyond k + 1)."""
        return self.verify[min(tokens, len(self.verify)) - 1]

    def speedup(self, decoded: int, rounds_by_draft: Mapping[int, int], skip: SkipSet) -> float:
        """Modelled speedup over plain decoding of ``decoded`` tokens made in rounds, of which
        ``rounds_by_draft[d]`` drafted d tokens."""
        drafted = sum(d * n for d, n in rounds_by_draft.items())
        verify = sum(n * self.verify_cost(d + 1) for d, n in rounds_by_draft.items())
        cost = verify + drafted * self.draft_cost(skip)
        return decoded / cost if cost > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        return cls(**{**data, "verify": tuple(data["verify"])})


def calibrate(target: LoadedModel, context_ids: list[int], k: int, repeats: int = 7) -> CostModel:
    """Time the steps the cost model needs on ``target`` after ``context_ids`` (see module doc).

    The kinds of step take turns, ``repeats`` rounds after a warm-up round, and each keeps its
    median, so that a busy spell of the machine hits all of them alike.
    """
    layers = check_supported(target.model)
    session = ModelSession(target.model)  # layer skipping runs on the dynamic cache
    session.forward(context_ids, 1)
    token = context_ids[-1]
    steps: dict[str, tuple[SkipSet, list[int]]] = {
        "no_attention": (SkipSet.of(attention=range(layers)), [token]),
        "no_mlp": (SkipSet.of(mlp=range(layers)), [token]),
    }
    steps.update({f"pass_{n}": (SkipSet(), [token] * n) for n in range(1, k + 2)})
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats + 1):
        for name, (skip, ids) in steps.items():
            times[name].append(_timed_step(session, skip, ids))
    t = {name: statistics.median(values[1:]) for name, values in times.items()}
    full = t["pass_1"]
    # a longer pass never costs less than a shorter one's real work: floor at 1
    verify = tuple(max(t[f"pass_{n}"] / full, 1.0) for n in range(1, k + 2))
    return CostModel(
        attention=max(full - t["no_attention"], 0.0) / (layers * full),
        mlp=max(full - t["no_mlp"], 0.0) / (layers * full),
        verify=verify,
        step_seconds=full,
        context=len(context_ids),
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
