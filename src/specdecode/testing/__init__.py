"""Helpers to build tiny models from configs, for tests and examples (nothing is downloaded)."""

from specdecode.testing.tiny import ARCHITECTURES, make_tiny_model, perturbed_copy, tiny_tokenizer

__all__ = ["ARCHITECTURES", "make_tiny_model", "perturbed_copy", "tiny_tokenizer"]
