"""Drafters behind one small interface: a draft model, prompt lookup (and layer skipping)."""

from specdecode.drafters.base import EMPTY_DRAFT, Draft, Drafter
from specdecode.drafters.model import ModelDrafter
from specdecode.drafters.prompt_lookup import PromptLookupDrafter, find_continuation
from specdecode.drafters.schedule import DraftLength, FixedLength, HeuristicLength, make_schedule

__all__ = [
    "EMPTY_DRAFT",
    "Draft",
    "DraftLength",
    "Drafter",
    "FixedLength",
    "HeuristicLength",
    "ModelDrafter",
    "PromptLookupDrafter",
    "find_continuation",
    "make_schedule",
]
