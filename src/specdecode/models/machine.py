"""What this machine is, and the small per-machine cache of things measured on it.

Pass costs (:mod:`specdecode.models.costs`) and row padding (:mod:`specdecode.models.row_padding`)
are timings of this CPU; each is measured once and kept under ``$SPECDECODE_HOME/<kind>/`` in a
JSON file named by a digest of everything that could change it (the CPU, thread count, library
versions, the model's shape). ``SPECDECODE_RECALIBRATE=1`` ignores what is kept and measures anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def recalibrating() -> bool:
    """Whether ``SPECDECODE_RECALIBRATE`` asks to measure anew instead of reading the cache."""
    return os.environ.get("SPECDECODE_RECALIBRATE", "") not in ("", "0")


def cache_file(kind: str, key: Sequence[Any]) -> Path:
    """The cache file of one measurement of ``kind``, named by a digest of ``key`` (a JSON-able
    list of everything the measurement depends on)."""
    from specdecode.models.pull import specdecode_home

    digest = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:20]
    return specdecode_home() / kind / f"{digest}.json"


def read_cached(path: Path) -> Any:
    """The JSON kept in ``path``; None when missing or unreadable (then it is measured anew)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cached(path: Path, data: Any) -> None:
    """Keep ``data`` in ``path`` atomically (a reader never sees half a file); a read-only cache
    only costs a new measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(data))
        partial.replace(path)
    except OSError:
        pass
