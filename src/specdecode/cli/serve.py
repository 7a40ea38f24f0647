"""``specdecode serve``: an OpenAI-compatible server, with speculative decoding behind it."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specdecode.cli.common import (
    add_drafter_args,
    add_model_args,
    build_drafter,
    build_schedule,
    load_target,
    target_spec,
)
from specdecode.errors import InvalidSettingsError

if TYPE_CHECKING:  # the server's modules load on `serve` only, keeping other commands quick
    import torch

    from specdecode.server import ServerSettings

HELP = "serve the model over an OpenAI-compatible HTTP API (with a page at /)"
API_KEY_ENV = "SPECDECODE_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

logger = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help=HELP, description=HELP)
    add_model_args(p)
    add_drafter_args(p)
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    net.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name in the API (default: the target folder's or file's name)",
    )
    net.add_argument(
        "--api-key",
        action="append",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (repeatable; or set {API_KEY_ENV}, "
        "comma-separated, which keeps keys out of the process list)",
    )
    net.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for the model (then 429)"
    )
    net.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request, queue wait included"
    )
    net.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)"
    )
    net.add_argument("--max-choices", type=int, default=8, help="most choices (n) per request")
    net.add_argument(
        "--default-temperature",
        type=float,
        default=0.0,
        help="temperature of requests that set none (default 0: greedy, unlike OpenAI's 1)",
    )
    net.add_argument(
        "--prompt-cache",
        default="auto",
        choices=["auto", "on", "off"],
        help="keep the KV cache of the previous request's positions that begin the next prompt "
        "(a chat's history, n samples of one prompt) instead of prefilling them again. auto "
        "(default): on for a float32 target, where the rounding it changes is far below any "
        "token's margin; off in bfloat16/float16, where it can change a greedy token (measured "
        "in docs/server.md)",
    )
    net.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="logs"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from specdecode.decoding import SpeculativeGenerator
    from specdecode.server import Engine, create_app

    settings = server_settings(args)
    if args.max_queue < 1:
        raise InvalidSettingsError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.timeout <= 0:
        raise InvalidSettingsError(f"--timeout must be > 0 seconds, got {args.timeout}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:  %(name)s %(message)s")
    target = load_target(args)
    generator = SpeculativeGenerator(
        target,
        build_drafter(args, target),
        build_schedule(args),
        reuse_prompt_cache=prompt_cache_on(args.prompt_cache, target.dtype),
    )
    engine = Engine(generator, max_queue=args.max_queue, timeout=args.timeout)
    app = create_app(engine, settings)
    if args.host not in LOOPBACK and not settings.api_keys:
        logger.warning(
            "listening on %s without an API key: anyone who can reach it may use it", args.host
        )
    logger.info("serving %s as %r", target.name, settings.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def prompt_cache_on(choice: str, dtype: torch.dtype) -> bool:
    """``--prompt-cache``: ``auto`` keeps prefixes for float32 targets only."""
    import torch

    return choice == "on" or (choice == "auto" and dtype == torch.float32)


def server_settings(args: argparse.Namespace) -> ServerSettings:
    from specdecode.server import ServerSettings

    try:
        return ServerSettings(
            served_model_name=args.served_model_name or default_model_name(target_spec(args)),
            api_keys=api_keys(args.api_key, os.environ.get(API_KEY_ENV)),
            max_body_bytes=args.max_body_bytes,
            max_choices=args.max_choices,
            default_temperature=args.default_temperature,
        )
    except ValueError as exc:
        raise InvalidSettingsError(str(exc)) from exc


def default_model_name(target: str) -> str:
    """The folder's or .gguf file's name for a path; a registry name or hub id as it is."""
    path = Path(target).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return target


def api_keys(flags: list[str] | None, env: str | None) -> tuple[str, ...]:
    keys = list(flags or [])
    keys += [k.strip() for k in (env or "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))
