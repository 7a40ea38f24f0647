"""The decoding loop and what it yields."""

from specdecode.decoding.config import GenerationRequest, resolve_request
from specdecode.decoding.events import (
    FinishEvent,
    GenerationEvent,
    GenerationResult,
    GenerationStats,
    RoundEvent,
)
from specdecode.decoding.loop import SpeculativeGenerator, sample_seed
from specdecode.decoding.text import TextStream

__all__ = [
    "FinishEvent",
    "GenerationEvent",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "RoundEvent",
    "SpeculativeGenerator",
    "TextStream",
    "resolve_request",
    "sample_seed",
]
