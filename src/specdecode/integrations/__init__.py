"""Bridges to other libraries' APIs: transformers' ``generate(assistant_model=...)``."""

from specdecode.integrations.transformers import skip_assistant

__all__ = ["skip_assistant"]
