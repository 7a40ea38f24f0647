"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from specdecode.models import LoadedModel, load_model
from specdecode.testing import make_tiny_model, perturbed_copy

ARCHS = ("llama", "qwen2", "gpt2")

# Tiny models gain nothing from threads, and several test processes may share the cores.
torch.set_num_threads(1)

# Where `specdecode models pull` put real models (tests that need one read it from here), before
# the suite points SPECDECODE_HOME at a scratch folder so that nothing it writes (measured pass
# costs, pulls in tests) lands in the user's cache.
from specdecode.models.pull import specdecode_home  # noqa: E402

REAL_HOME = specdecode_home()
os.environ["SPECDECODE_HOME"] = tempfile.mkdtemp(prefix="specdecode-test-home-")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_dir(arch, kind)`` -> folder of a tiny model; kind: target, perturbed, unrelated."""
    cache: dict[tuple[str, str], Path] = {}

    def make(arch: str, kind: str = "target") -> Path:
        key = (arch, kind)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-{kind}")
            if kind == "target":
                make_tiny_model(folder, arch, seed=0)
            elif kind == "perturbed":
                perturbed_copy(make(arch, "target"), folder, scale=0.03)
            elif kind == "unrelated":
                make_tiny_model(folder, arch, seed=123)
            else:
                raise ValueError(kind)
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """``tiny(arch, kind)`` -> a loaded tiny model (cached for the session)."""
    cache: dict[tuple[str, str], LoadedModel] = {}

    def get(arch: str, kind: str = "target") -> LoadedModel:
        key = (arch, kind)
        if key not in cache:
            cache[key] = load_model(tiny_dir(arch, kind), device="cpu")
        return cache[key]

    return get


DEEP_LAYERS = 6


@pytest.fixture(scope="session")
def deep(tmp_path_factory: pytest.TempPathFactory):
    """``deep(arch)`` -> a loaded tiny model with 6 layers (some to skip, some to keep)."""
    cache: dict[str, LoadedModel] = {}

    def get(arch: str) -> LoadedModel:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-deep")
            make_tiny_model(folder, arch, layers=DEEP_LAYERS, seed=0)
            # torch kernels: the layer-skip tests zero weights in copies of these models
            cache[arch] = load_model(folder, device="cpu", kernels="torch")
        return cache[arch]

    return get


DRAFTER_KINDS = ("plain", "draft", "prompt-lookup")


def drafter_of(kind: str, tiny, arch: str = "qwen2"):
    """The drafter a test runs as ``kind``: none, a perturbed copy of the tiny target as the
    draft model, or prompt lookup (n-grams up to 3)."""
    from specdecode import ModelDrafter, PromptLookupDrafter

    if kind == "plain":
        return None
    if kind == "draft":
        return ModelDrafter(tiny(arch, "perturbed"))
    if kind == "prompt-lookup":
        return PromptLookupDrafter(max_ngram=3)
    raise ValueError(kind)
