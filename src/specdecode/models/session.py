"""One sequence being decoded by one model: the model, its KV cache, and the ids the cache holds."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from specdecode.models.cache import make_cache, reset_cache, truncate_cache

if TYPE_CHECKING:
    from specdecode.models.lean import LeanDecoder


@dataclass(frozen=True)
class GreedyRun:
    """Tokens chosen by :meth:`SequenceSession.greedy_extend`, read back in one go."""

    tokens: list[int]
    # the model's probability of each token it chose (softmax of the raw logits), when asked
    confidence: list[float] = field(default_factory=list)


class Session(Protocol):
    """What the decoding loop and the drafters use of a session: :class:`ModelSession` (dynamic
    cache) or :class:`~specdecode.models.static_session.StaticSession` (static, compiled)."""

    model: Any
    device: torch.device
    cache: Any
    ids: list[int]
    warmup_passes: int  # passes of a shape to discard before timing one

    @property
    def length(self) -> int: ...

    def reset(self) -> None: ...

    def truncate(self, length: int) -> None: ...

    def sync(self, ids: Sequence[int]) -> list[int]: ...

    def reserve(self, positions: int) -> None: ...

    def forward(self, new_ids: Sequence[int], num_logits: int = 1) -> torch.Tensor: ...

    def greedy_extend(
        self, logits: torch.Tensor, steps: int, confidence: bool = False
    ) -> GreedyRun: ...


class SequenceSession:
    """What every session shares: the model, the ids its cache holds, the arguments its
    forward takes, and rolling back to a prefix."""

    cache: Any

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.ids: list[int] = []
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params

    def _forward_kwargs(self, logits_to_keep: int) -> dict[str, Any]:
        """The model's keyword arguments for a pass on this session's cache."""
        kwargs: dict[str, Any] = {self._cache_kwarg: self.cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        return kwargs

    @property
    def length(self) -> int:
        return len(self.ids)

    def truncate(self, length: int) -> None:  # pragma: no cover - each session has its own
        raise NotImplementedError

    def sync(self, ids: Sequence[int]) -> list[int]:
        """Roll back to the longest common prefix with ``ids``; return the ids still to feed.

        At least one id is always returned (so the caller gets logits for the last position).
        """
        common = 0
        limit = min(len(self.ids), len(ids))
        while common < limit and self.ids[common] == ids[common]:
            common += 1
        common = min(common, len(ids) - 1)
        self.truncate(common)
        return list(ids[common:])

    @torch.inference_mode()
    def greedy_extend(
        self, logits: torch.Tensor, steps: int, confidence: bool = False
    ) -> GreedyRun:
        """Choose ``steps`` tokens greedily on the device, reading them back once.

        The first token is the argmax of ``logits`` (V,), the last position's logits of the
        latest pass; each chosen token but the last is fed through the model as it is chosen,
        without leaving the device. The tokens are then read back to the host in one
        synchronisation, where choosing each on the host costs one per token: on a GPU the host
        then queues the next pass while the current one runs, instead of waiting for it.

        The same passes and the same argmax as feeding each token from the host
        (``forward([token])``), so the same tokens. Afterwards the session holds every fed
        token (all but the last chosen, which is the caller's to feed). ``confidence`` also
        returns the model's probability of each chosen token (the softmax of its logits).
        """
        if steps < 1:
            raise ValueError(f"greedy_extend needs at least one step, got {steps}")
        chosen: list[torch.Tensor] = []
        probability: list[torch.Tensor] = []
        start = self.length
        try:
            for step in range(steps):
                scores = logits.float()
                token = scores.argmax(dim=-1, keepdim=True)  # (1,), on the device
                chosen.append(token)
                if confidence:
                    probability.append(torch.softmax(scores, dim=-1).gather(-1, token))
                if step + 1 < steps:
                    logits = self._step(token.view(1, 1), start + step)
        except BaseException:  # the cache ran ahead of ``ids``: bring it back in step
            self._rewind(start)
            raise
        # token ids are exact in float64: one tensor, one read back
        values = torch.cat([torch.cat(chosen).double(), *(p.double() for p in probability)])
        host = values.tolist()
        tokens = [int(t) for t in host[:steps]]
        self.ids.extend(tokens[:-1])
        return GreedyRun(tokens=tokens, confidence=host[steps:])

    def _step(self, token: torch.Tensor, start: int) -> torch.Tensor:  # pragma: no cover
        """Run one token already on the device, (1, 1), at position ``start``: logits (V,)."""
        raise NotImplementedError

    def _rewind(self, length: int) -> None:  # pragma: no cover
        """Cut the cache back to ``length`` positions, whatever ``ids`` says it holds."""
        raise NotImplementedError


class ModelSession(SequenceSession):
    """Feeds token ids to a causal LM, keeping its KV cache in step with ``self.ids``.

    The cache always holds exactly the positions of ``self.ids``. ``forward`` appends,
    ``truncate`` rolls back (free for full-attention layers, see :mod:`specdecode.models.cache`).
    """

    warmup_passes = 1

    def __init__(self, model: torch.nn.Module, lean: LeanDecoder | None = None) -> None:
        super().__init__(model)
        self.cache = make_cache(model.config)
        self.lean = lean  # our own forward pass, where the model was loaded with one

    def reset(self) -> None:
        reset_cache(self.cache)
        self.ids = []

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions."""
        if length < len(self.ids):
            truncate_cache(self.cache, length)
            del self.ids[length:]

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` positions: nothing to do, this cache grows by doubling."""

    @torch.inference_mode()
    def forward(self, new_ids: Sequence[int], num_logits: int = 1) -> torch.Tensor:
        """Run ``new_ids`` through the model; return the logits (num_logits, V) of the last ones."""
        if not new_ids:
            raise ValueError("forward needs at least one token")
        input_ids = torch.tensor([list(new_ids)], dtype=torch.long, device=self.device)
        logits = self._logits(input_ids, num_logits)
        self.ids.extend(int(i) for i in new_ids)
        return logits[0, -num_logits:, :]

    def _step(self, token: torch.Tensor, start: int) -> torch.Tensor:
        """One token already on the device, (1, 1), after the cache's positions: logits (V,)."""
        return self._logits(token, 1)[0, -1]

    def _rewind(self, length: int) -> None:
        truncate_cache(self.cache, length)

    def _logits(self, input_ids: torch.Tensor, num_logits: int) -> torch.Tensor:
        if self.lean is not None and self.lean.usable:
            return self.lean(input_ids, self.cache, num_logits)
        out = self.model(input_ids=input_ids, **self._forward_kwargs(num_logits))
        return out.logits  # type: ignore[no-any-return]
