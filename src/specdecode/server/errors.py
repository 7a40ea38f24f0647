"""Typed HTTP errors, each rendered as an OpenAI error object.

The OpenAI API answers every failure with ``{"error": {"message", "type", "param", "code"}}`` and
an HTTP status; clients (the official ``openai`` library included) map the status to an exception
class and show the message. Every error the server raises on purpose is an :class:`APIError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from specdecode.server.schemas import ErrorBody, ErrorResponse


@dataclass
class APIError(Exception):
    """An error answered with ``status`` and an OpenAI error object."""

    message: str
    status: int = 400
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body().model_dump(), status_code=self.status, headers=dict(self.headers)
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param=param, code=code)


def unauthorized() -> APIError:
    return APIError(
        "missing or wrong API key: send it as the header 'Authorization: Bearer <key>'",
        401,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(name: str, served: str) -> APIError:
    return APIError(
        f"the model {name!r} does not exist: this server serves {served!r} (see GET /v1/models)",
        404,
        param="model",
        code="model_not_found",
    )


def body_too_large(limit: int) -> APIError:
    return APIError(
        f"the request body is larger than the server's limit of {limit} bytes: send a shorter "
        "prompt, or start the server with a larger --max-body-bytes",
        413,
        code="request_too_large",
    )


def queue_full(retry_after: int, capacity: int) -> APIError:
    return APIError(
        f"the server is busy: {capacity} requests are already waiting for the model; "
        f"retry in {retry_after} s",
        429,
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def timed_out(seconds: float) -> APIError:
    return APIError(
        f"the request did not finish within the server's timeout of {seconds:g} s (queue wait "
        "included): ask for fewer tokens, or start the server with a larger --timeout",
        504,
        type="timeout_error",
        code="timeout",
    )


def shutting_down() -> APIError:
    return APIError("the server is shutting down", 503, type="server_error", code="shutting_down")


def internal_error() -> APIError:
    return APIError(
        "the server failed while generating; the error is in its log", 500, type="server_error"
    )


def client_closed() -> APIError:
    """Nobody reads this one: the client is gone (nginx's 499, for the logs and metrics)."""
    return APIError("the client closed the connection", 499, code="client_closed_request")
