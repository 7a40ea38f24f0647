"""Self-speculation: skip profiles, and the Optuna search that finds them.

Importing this package loads no optional dependency: Optuna is imported by
:mod:`specdecode.search.study` when a search runs, matplotlib by :mod:`specdecode.search.plots`.
"""

from specdecode.search.profile import (
    DraftSettings,
    Measurement,
    ModelIdentity,
    SkipProfile,
    drafter_from_profile,
    load_profile,
)
from specdecode.search.space import SearchSpace

__all__ = [
    "DraftSettings",
    "Measurement",
    "ModelIdentity",
    "SearchSpace",
    "SkipProfile",
    "drafter_from_profile",
    "load_profile",
]
