"""Drafters behind one small interface: a draft model, prompt lookup, layer skipping, and
prompt lookup in front of either model."""

from specdecode.drafters.base import EMPTY_DRAFT, Draft, Drafter
from specdecode.drafters.hybrid import LookupDrafter
from specdecode.drafters.layerskip import DraftExit, LayerSkipDrafter
from specdecode.drafters.model import ModelDrafter
from specdecode.drafters.prompt_lookup import PromptLookupDrafter, find_continuation
from specdecode.drafters.schedule import (
    CostAwareLength,
    DraftLength,
    FixedLength,
    HeuristicLength,
    make_schedule,
)

__all__ = [
    "EMPTY_DRAFT",
    "CostAwareLength",
    "Draft",
    "DraftExit",
    "DraftLength",
    "Drafter",
    "FixedLength",
    "HeuristicLength",
    "LayerSkipDrafter",
    "LookupDrafter",
    "ModelDrafter",
    "PromptLookupDrafter",
    "find_continuation",
    "make_schedule",
]
