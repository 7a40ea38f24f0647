"""The style checks of README's Development section, so CI holds the code to them: ruff's lint
and format rules, and mypy in strict mode over the whole package (settings in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _needs(tool: str, found: bool) -> None:
    if not found:
        pytest.skip(f"{tool} is not installed (pip install -e '.[dev]')")
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not run from a source checkout")


def test_ruff_lint_and_format() -> None:
    _needs("ruff", shutil.which("ruff") is not None)
    lint = _run(["ruff", "check", "src", "tests"])
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run(["ruff", "format", "--check", "src", "tests"])
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict() -> None:
    _needs("mypy", importlib.util.find_spec("mypy") is not None)  # run as this Python's module
    done = _run([sys.executable, "-m", "mypy"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout
