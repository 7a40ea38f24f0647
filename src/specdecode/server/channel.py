"""The bridge from the engine's worker thread to a request's coroutine.

The worker calls :meth:`Channel.put` (never blocks); the request awaits :meth:`Channel.get`.
Items travel through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``, so the event
loop never waits on the model and keeps answering ``/health`` and ``/metrics`` meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib

from specdecode.server.engine import JobUpdate


class Channel:
    """Updates of one job, from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[JobUpdate] = asyncio.Queue()

    def put(self, update: JobUpdate) -> None:
        """Thread-safe; a closed event loop (the server is gone) drops the update."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, update)

    async def get(self, timeout: float | None = None) -> JobUpdate | None:
        """The next update, or None when ``timeout`` seconds pass without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
