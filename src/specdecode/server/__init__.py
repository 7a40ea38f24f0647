"""``specdecode serve``: an OpenAI-compatible HTTP server with SSE streaming and a page that
shows, token by token, what the draft contributed.

Layout: ``schemas`` (request/response bodies), ``planning`` (request -> job), ``engine`` (the
queue and the worker thread that owns the model), ``channel`` (worker -> event loop),
``formats`` and ``streaming`` (job output -> OpenAI bodies and SSE), ``middleware`` (keys,
body limit, HTTP metrics), ``metrics`` (Prometheus text), ``app`` (the FastAPI factory).
"""

from specdecode.server.app import create_app
from specdecode.server.engine import Engine
from specdecode.server.settings import ServerSettings

__all__ = ["Engine", "ServerSettings", "create_app"]
