"""Models: loading, the KV cache with free rollback, and a per-sequence session."""

from specdecode.models.cache import RollbackLayer, make_cache, truncate_cache
from specdecode.models.loading import LoadedModel, context_length, draft_dtype_for, load_model
from specdecode.models.session import ModelSession, Session
from specdecode.models.vocab import check_same_vocabulary

__all__ = [
    "LoadedModel",
    "ModelSession",
    "RollbackLayer",
    "Session",
    "check_same_vocabulary",
    "context_length",
    "draft_dtype_for",
    "load_model",
    "make_cache",
    "truncate_cache",
]
