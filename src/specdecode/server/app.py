"""The FastAPI application: OpenAI-compatible routes, health, metrics and the page.

All state lives on ``app.state`` (the engine, the settings, the planner); nothing is global, so
several apps can live in one process (the tests build one per model).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from specdecode import __version__
from specdecode.server.engine import Engine
from specdecode.server.errors import APIError, internal_error
from specdecode.server.formats import ChatFormat, CompletionFormat, ResponseFormat
from specdecode.server.logprobs import TokenTexts
from specdecode.server.metrics import CONTENT_TYPE
from specdecode.server.middleware import ApiKeyAuth, BodyLimit, HttpMetrics
from specdecode.server.planning import RequestPlanner
from specdecode.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Health,
    ModelCard,
    ModelList,
)
from specdecode.server.settings import ServerSettings
from specdecode.server.streaming import serve_job

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """An app serving ``engine``'s model under ``settings.served_model_name``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(
        title="specdecode",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.planner = RequestPlanner(engine.generator, settings)
    _add_error_handlers(app)
    _add_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # The last added runs first: metrics see every answer, auth runs before the body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=settings.api_keys)
    routes = [getattr(route, "path", "") for route in app.routes]
    app.add_middleware(HttpMetrics, metrics=engine.metrics, routes=routes)
    return app


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        spec = await run_in_threadpool(request.app.state.planner.chat, body)
        fmt = ChatFormat(request.app.state.settings.served_model_name, spec, _texts(request))
        return await _serve(request, fmt, body.stream, body.include_usage)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        spec = await run_in_threadpool(request.app.state.planner.completion, body)
        fmt = CompletionFormat(request.app.state.settings.served_model_name, spec, _texts(request))
        return await _serve(request, fmt, body.stream, body.include_usage)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        return ModelList(data=[ModelCard(id=request.app.state.settings.served_model_name)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> ModelCard:
        request.app.state.planner.check_model(model_id)
        return ModelCard(id=model_id)

    @app.get("/health")
    async def health(request: Request) -> Health:
        queue = request.app.state.engine.queue_state()
        name = request.app.state.settings.served_model_name
        return Health(model=name, waiting=queue.waiting, running=queue.running)

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        engine: Engine = request.app.state.engine
        text = engine.metrics.render(engine.queue_state())
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def _texts(request: Request) -> TokenTexts:
    texts: TokenTexts = request.app.state.planner.token_texts
    return texts


async def _serve(request: Request, fmt: ResponseFormat, stream: bool, usage: bool) -> Response:
    return await serve_job(
        request,
        request.app.state.engine,
        fmt.spec,
        fmt,
        stream=stream,
        include_usage=usage,
        ping_interval=request.app.state.settings.ping_interval,
    )


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI error object; bad input is a 4xx, never a 500."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type and _body_not_parsed(exc):
            message = (
                f"the body was sent as {content_type or 'no content type'}: send it as JSON with "
                "the header Content-Type: application/json (curl: -H 'Content-Type: "
                "application/json')"
            )
            return APIError(message, 400, code="invalid_content_type").response()
        return validation_api_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(str(exc.detail), exc.status_code, code=_slug(str(exc.detail))).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error().response()


def validation_api_error(exc: RequestValidationError) -> APIError:
    """400 for a body that is not JSON; 422 for wrong types and values, naming the field."""
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError("the request body is not valid JSON", 400, code="invalid_json")
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request"))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return APIError(message, 422, param=param, code="invalid_value")


def _body_not_parsed(exc: RequestValidationError) -> bool:
    """Whether the body as a whole failed (FastAPI reads only JSON bodies as objects)."""
    return any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors())


def _slug(text: str) -> str:
    return text.lower().replace(" ", "_")
