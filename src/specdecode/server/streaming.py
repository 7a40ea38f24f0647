"""Serving one admitted job: as Server-Sent Events, or as one JSON body at the end.

A stream is ``data: {json}`` frames in the OpenAI shape, then ``data: [DONE]``. An error after the
stream has begun (a timeout) is sent as a frame ``data: {"error": {...}}`` before ``[DONE]``, which
the ``openai`` client raises as an ``APIError``. While a request waits in the queue the stream
sends SSE comments (``: ping``), which clients ignore, to keep proxies from closing it.

Either way the job is cancelled when the response ends for any reason: a client that goes away
(uvicorn cancels the streaming task; a non-streaming request is polled) stops its generation at the
next round and frees the model for the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from specdecode.decoding import GenerationResult
from specdecode.server.channel import Channel
from specdecode.server.engine import Engine, Job, JobEnd, JobSpec
from specdecode.server.errors import client_closed
from specdecode.server.formats import ResponseFormat

DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streaming request checks its client is there
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def serve_job(
    request: Request,
    engine: Engine,
    spec: JobSpec,
    fmt: ResponseFormat,
    *,
    stream: bool,
    include_usage: bool,
    ping_interval: float,
) -> Response:
    """Queue ``spec`` (a full queue raises the 429) and answer with its output."""
    channel = Channel(asyncio.get_running_loop())
    job = engine.submit(spec, channel.put)
    if stream:
        frames = sse_frames(engine, job, channel, fmt, include_usage, ping_interval)
        return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)
    return await whole_response(request, engine, job, channel, fmt)


async def sse_frames(
    engine: Engine,
    job: Job,
    channel: Channel,
    fmt: ResponseFormat,
    include_usage: bool,
    ping_interval: float,
) -> AsyncIterator[str]:
    results: dict[int, GenerationResult] = {}
    try:
        for chunk in fmt.opening():
            yield _frame(chunk)
        while True:
            update = await channel.get(ping_interval)
            if update is None:
                yield ": ping\n\n"
            elif isinstance(update, JobEnd):
                if update.error is not None:
                    yield _frame(update.error.body())
                elif include_usage:
                    yield _frame(fmt.usage_chunk(results))
                break
            else:
                if update.result is not None:
                    results[update.index] = update.result
                yield _frame(fmt.chunk(update))
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)


async def whole_response(
    request: Request, engine: Engine, job: Job, channel: Channel, fmt: ResponseFormat
) -> Response:
    results: dict[int, GenerationResult] = {}
    clock = asyncio.get_running_loop().time
    next_check = clock() + DISCONNECT_POLL_SECONDS
    try:
        while True:
            update = await channel.get(DISCONNECT_POLL_SECONDS)
            # on a clock, not only when idle: a generating job sends updates every round
            if clock() >= next_check:
                next_check = clock() + DISCONNECT_POLL_SECONDS
                if await request.is_disconnected():
                    raise client_closed()
            if update is None:
                continue
            if isinstance(update, JobEnd):
                if update.error is not None:
                    raise update.error
                return JSONResponse(fmt.response(results).model_dump())
            elif update.result is not None:
                results[update.index] = update.result
    finally:
        engine.cancel(job)


def _frame(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"
