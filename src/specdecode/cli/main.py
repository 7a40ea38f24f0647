"""The ``specdecode`` command. Each subcommand lives in its own module of this package, with
``add_parser(subparsers)`` and ``run(args) -> int``; this module only wires them together."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from specdecode import __version__
from specdecode.errors import SpecDecodeError

# subcommand name -> module in specdecode.cli
COMMANDS: dict[str, str] = {
    "generate": "specdecode.cli.generate",
    "search": "specdecode.cli.search",
    "bench": "specdecode.cli.bench",
    "serve": "specdecode.cli.serve",
    "models": "specdecode.cli.models",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdecode",
        description="Lossless speculative decoding for HuggingFace causal language models.",
    )
    parser.add_argument("--version", action="version", version=f"specdecode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.run(args))
    except SpecDecodeError as exc:
        print(f"specdecode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specdecode: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Keep library warnings meant for developers out of a user's terminal."""
    import warnings

    warnings.filterwarnings("ignore", module="transformers")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
