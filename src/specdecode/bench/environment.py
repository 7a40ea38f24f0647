"""Where a measurement was taken: code version, library versions, machine, threads."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from specdecode.models.machine import cpu_name

_LIBRARIES = ("specdecode", "torch", "transformers", "tokenizers", "numpy", "accelerate")


@dataclass(frozen=True)
class Environment:
    """Recorded beside every result: enough to tell two runs' conditions apart."""

    timestamp: str
    git_commit: str | None  # None: not run from a git checkout
    git_dirty: bool | None  # uncommitted changes in the checkout
    python: str
    libraries: dict[str, str | None]
    platform: str
    cpu_model: str
    cpu_cores: int | None  # logical CPUs of the machine
    cpus_available: int | None  # logical CPUs this process may run on
    torch_threads: int
    cuda_device: str | None
    load_average: list[float] | None = field(default=None)  # 1, 5, 15 min, at the start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def capture_environment() -> Environment:
    commit, dirty = _git_state(Path(__file__).resolve().parent)
    return Environment(
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        git_commit=commit,
        git_dirty=dirty,
        python=platform.python_version(),
        libraries={name: _version(name) for name in _LIBRARIES},
        platform=platform.platform(),
        cpu_model=cpu_name(),
        cpu_cores=os.cpu_count(),
        cpus_available=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        torch_threads=torch.get_num_threads(),
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_state(folder: Path) -> tuple[str | None, bool | None]:
    """The checkout's commit, and whether tracked files differ from it (None: unknown).

    ``--no-optional-locks`` keeps ``git status`` off the index lock, so that a commit made at
    the same moment (several people share a checkout) neither blocks nor fails the reading.
    """
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()
