"""Prompt sets for searching and benchmarking: Spec-Bench JSONL, or plain text one prompt a line.

JSONL rows are objects; the prompt is the first of ``turns`` (Spec-Bench, MT-Bench), else the
first of ``prompt``, ``question``, ``text`` or ``instruction`` that is present. ``category`` and
``question_id`` (or ``id``) are kept when present. Example row::

    {"question_id": 81, "category": "writing", "turns": ["Compose a travel blog post...", "..."]}

A plain text file holds one prompt per non-blank line (write multi-line prompts as JSONL).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdecode.errors import PromptError

_TEXT_KEYS = ("prompt", "question", "text", "instruction")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt set."""

    text: str
    category: str | None = None  # Spec-Bench's category ("writing", "coding", ...), if known
    id: str | None = None  # the row's question_id / id, or the line number of a text file


def load_prompts(
    path: str | Path,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    *,
    offset: int = 0,
    per_category: int | None = None,
) -> list[Prompt]:
    """Read a prompt file, then select from it in this order.

    Args:
        path: a ``.jsonl``/``.json`` file (or any file whose first line is a JSON object), or text.
        categories: keep only prompts of these categories.
        limit: keep at most this many (after the other selections).
        offset: skip this many prompts first (per category when ``per_category`` is given), so
            that a calibration set and an evaluation set can be held apart.
        per_category: keep at most this many prompts of each category, in file order.
    """
    prompts = read_prompt_file(path)
    if categories:
        wanted = set(categories)
        known = {p.category for p in prompts}
        if not wanted & known:
            raise PromptError(
                f"{path} has no prompt of categories {sorted(wanted)}; its categories are "
                f"{sorted(c for c in known if c)}"
            )
        prompts = [p for p in prompts if p.category in wanted]
    if per_category is not None:
        prompts = _per_category(prompts, per_category, offset)
    else:
        prompts = prompts[offset:]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise PromptError(f"no prompt left in {path} after the selection: relax it")
    return prompts


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """All prompts of a file, in order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptError(f"cannot read the prompt file {path}: {exc.strerror or exc}") from exc
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    is_json = path.suffix.lower() in (".jsonl", ".json") or first.startswith("{")
    prompts = list(_from_jsonl(lines, path) if is_json else _from_text(lines))
    if not prompts:
        raise PromptError(f"the prompt file {path} holds no prompt")
    return prompts


def _from_text(lines: Iterable[str]) -> Iterable[Prompt]:
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield Prompt(text=line.rstrip("\r"), id=str(number))


def _from_jsonl(lines: Iterable[str], path: Path) -> Iterable[Prompt]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise PromptError(f"{path}, line {number}: expected a JSON object per line")
        yield _prompt_of(row, f"{path}, line {number}")


def _prompt_of(row: dict[str, Any], where: str) -> Prompt:
    text: Any = None
    turns = row.get("turns")
    if isinstance(turns, list) and turns:
        text = turns[0]
    else:
        text = next((row[k] for k in _TEXT_KEYS if k in row), None)
    if not isinstance(text, str) or not text.strip():
        raise PromptError(
            f"{where}: no prompt text (expected a non-empty 'turns' list or one of "
            f"{', '.join(_TEXT_KEYS)})"
        )
    ident = row.get("question_id", row.get("id"))
    category = row.get("category")
    return Prompt(
        text=text,
        category=None if category is None else str(category),
        id=None if ident is None else str(ident),
    )


def _per_category(prompts: list[Prompt], count: int, offset: int) -> list[Prompt]:
    """At most ``count`` prompts of each category after skipping ``offset`` of it, in file order."""
    seen: dict[str | None, int] = {}
    out: list[Prompt] = []
    for prompt in prompts:
        index = seen.get(prompt.category, 0)
        seen[prompt.category] = index + 1
        if offset <= index < offset + count:
            out.append(prompt)
    return out
