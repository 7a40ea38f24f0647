"""What the server is told at start: names, keys and limits (the model itself is the engine's)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits a context


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str  # the only name ``model`` may take; GET /v1/models lists it
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    max_choices: int = 8  # n times the number of prompts, per request
    default_temperature: float = 0.0  # when a request sets none: 0 = greedy (see docs/server.md)
    ping_interval: float = 10.0  # seconds between SSE comments while a stream waits in the queue

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_choices < 1:
            raise ValueError(f"max_choices must be >= 1, got {self.max_choices}")
        if not 0 <= self.default_temperature <= 2:
            raise ValueError(
                f"default_temperature must be in [0, 2], got {self.default_temperature}"
            )
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")
