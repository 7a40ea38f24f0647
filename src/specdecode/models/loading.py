"""Loading a causal LM and its tokenizer from a local folder, a GGUF file or a hub id."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdecode.errors import ModelLoadError
from specdecode.models.attention import use_grouped_attention
from specdecode.models.kernels import (
    AUTO,
    ONEDNN,
    TORCH,
    KernelError,
    LinearKernels,
    choose_kernels,
    pack_linears,
)
from specdecode.models.lean import LeanDecoder, lean_support
from specdecode.models.row_padding import tune_module_padding, tune_row_padding

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8 = "int8"  # dynamic int8 quantization of the Linear layers (CPU; for draft models)
INT8_PER_CHANNEL = True  # one weight scale per output row (True) or per layer (docs/speed.md 2b)

# How a model's sessions hold the KV cache (see LoadedModel.new_session)
DYNAMIC = "dynamic"  # our rollback cache, grown as needed; eager passes (the default)
STATIC = "static"  # preallocated static cache; eager passes
COMPILED = "compiled"  # static cache, short passes through torch.compile (CUDA graphs on GPU)
SESSION_KINDS = (DYNAMIC, STATIC, COMPILED)

# Which forward pass dynamic sessions run (see specdecode.models.lean)
TRANSFORMERS_FORWARD = "transformers"  # the model's own forward
LEAN_FORWARD = "lean"  # our fused forward for Llama-family models; an error where it cannot run
AUTO_FORWARD = "auto"  # lean where it can run, else transformers'
FORWARD_CHOICES = (AUTO_FORWARD, LEAN_FORWARD, TRANSFORMERS_FORWARD)


@dataclass
class LoadedModel:
    """A model ready to decode with, and where it came from."""

    model: Any  # transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: Any  # transformers tokenizer
    name: str  # what the user passed (path, file or id)
    dtype: torch.dtype
    device: torch.device
    kernels: LinearKernels | None = None  # oneDNN-packed linear layers (None: torch's own)
    session_kind: str = DYNAMIC  # how sessions hold the KV cache: dynamic, static or compiled
    compile_backend: str = "inductor"  # torch.compile's backend for compiled sessions
    freeze_weights: bool = False  # compiled sessions: inductor's freezing (fused projections)
    lean: LeanDecoder | None = None  # our forward pass for dynamic sessions (None: the model's)

    def new_session(self) -> Any:
        """A session (one sequence and its KV cache) on this model, of ``session_kind``:
        :class:`~specdecode.models.session.ModelSession` for ``dynamic`` (on the lean forward
        where the model has one), :class:`~specdecode.models.static_session.StaticSession`
        otherwise."""
        if self.session_kind == DYNAMIC:
            from specdecode.models.session import ModelSession

            return ModelSession(self.model, lean=self.lean)
        from specdecode.models.static_session import StaticSession

        return StaticSession(
            self.model,
            compiled=self.session_kind == COMPILED,
            backend=self.compile_backend,
            freeze=self.freeze_weights,
        )

    @property
    def forward_name(self) -> str:
        """The forward pass sessions run: ``lean`` or ``transformers``."""
        return TRANSFORMERS_FORWARD if self.lean is None else LEAN_FORWARD

    @property
    def kernel_name(self) -> str:
        """The kernels the linear layers run on now: ``onednn`` or ``torch``."""
        return TORCH if self.kernels is None else self.kernels.active

    @contextmanager
    def using_kernels(self, kind: str, required: bool = True) -> Iterator[str]:
        """Run the block with the linear layers on ``kind`` kernels (``torch`` or ``onednn``) and
        yield the kernels in use. Where the model cannot switch (loaded without
        ``keep_torch_kernels``), raise :class:`KernelError`, or with ``required=False`` stay on
        the current ones."""
        if kind == self.kernel_name or (
            not required and (self.kernels is None or kind not in self.kernels.available)
        ):
            yield self.kernel_name
            return
        if self.kernels is None:
            raise KernelError(f"{self.name} runs on torch's kernels only")
        with self.kernels.use(kind):
            yield kind

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def max_context(self) -> int | None:
        return context_length(self.model.config)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    def config_hash(self) -> str:
        """A short hash of the architecture-defining config, to tell models apart."""
        cfg = self.model.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            cfg.pop(volatile, None)
        blob = json.dumps(cfg, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def context_length(config: Any) -> int | None:
    """The longest sequence the model was built for, or None when the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device 'cuda' was asked for but no CUDA GPU is visible: use --device cpu"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def draft_dtype_for(target: LoadedModel, requested: str | None = None) -> str:
    """The precision to load a draft model in for ``target``: ``requested`` when given, else
    int8 (dynamic quantization) next to a float32 or int8 target on the CPU - about 5x cheaper
    per step there at nearly the same acceptance (docs/speed.md) - and the target's own dtype
    elsewhere.
    A draft's precision never changes the output, only speed and acceptance."""
    if requested is not None:
        return requested
    if target.device.type == "cpu" and target.dtype in (torch.float32, torch.qint8):
        return INT8
    return str(target.dtype).removeprefix("torch.")


def set_threads(threads: int | None) -> None:
    """Set the number of CPU threads torch uses (None leaves torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ModelLoadError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    threads: int | None = None,
    trust_remote_code: bool = False,
    kernels: str = AUTO,
    keep_torch_kernels: bool = False,
    pad_rows: bool = True,
    grouped_attention: bool = True,
    session_kind: str = DYNAMIC,
    compile_backend: str = "inductor",
    forward: str = TRANSFORMERS_FORWARD,
    freeze_weights: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is a local HF folder, a ``.gguf`` file (transformers' GGUF loader; needs the
    ``gguf`` and ``accelerate`` packages and dequantizes to ``dtype``), a known model name from
    ``specdecode models list`` (pulled on first use) or a hub id (only where the HuggingFace Hub
    is reachable).

    ``kernels`` picks the CPU kernels of the linear layers (:mod:`specdecode.models.kernels`):
    ``auto`` packs float32 and bfloat16 CPU models for oneDNN, whose batched products make a
    verification pass cost about one plain step; ``torch`` keeps torch's defaults.
    ``keep_torch_kernels`` keeps the unpacked layers too (twice the weights' memory), so that
    ``model.kernels.use("torch")`` can switch back, as the benchmark does for transformers' modes.
    ``pad_rows`` (oneDNN only) computes products of a few rows as the taller ones this machine
    runs faster, measured once per machine and layer shape
    (:mod:`specdecode.models.row_padding`).

    ``grouped_attention`` runs SDPA attention of grouped-query models without copying the cache
    once per query head in verification passes (:mod:`specdecode.models.attention`).

    ``session_kind`` picks how decoding holds the KV cache: ``dynamic`` (our rollback cache, the
    default), ``static`` (preallocated) or ``compiled`` (static, with short passes through
    ``torch.compile(mode="reduce-overhead")``: CUDA graphs on a GPU;
    :mod:`specdecode.models.static_session`). ``freeze_weights`` (compiled sessions on
    inductor; experimental) compiles them with inductor's freezing, which fuses the q/k/v and
    gate/up products, at a cost in memory and compile time per session.

    ``forward`` picks the forward pass of dynamic sessions: ``transformers`` (the model's own),
    ``lean`` (:mod:`specdecode.models.lean`: fused projections, for Llama, Qwen2 and Mistral
    models with full attention; meant for draft models, an error where it cannot run) or
    ``auto`` (lean where it can run, else transformers').
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if forward not in FORWARD_CHOICES:
        raise ModelLoadError(
            f"unknown forward {forward!r}: choose one of {', '.join(FORWARD_CHOICES)}"
        )
    if forward == LEAN_FORWARD and session_kind != DYNAMIC:
        raise ModelLoadError(
            f"the lean forward runs on dynamic sessions only, not {session_kind!r}: use "
            "--kv-cache dynamic, or the transformers forward"
        )
    if session_kind not in SESSION_KINDS:
        raise ModelLoadError(
            f"unknown session kind {session_kind!r}: choose one of {', '.join(SESSION_KINDS)}"
        )
    if freeze_weights and (session_kind != COMPILED or compile_backend != "inductor"):
        raise ModelLoadError(
            "freeze_weights needs compiled sessions on the inductor backend (--kv-cache "
            f"compiled), not {session_kind!r} sessions on {compile_backend!r}"
        )

    set_threads(threads)
    dev = resolve_device(device)
    quantize = dtype == INT8
    if quantize and dev.type != "cpu":
        raise ModelLoadError("int8 (dynamic quantization) runs on the CPU only: use --device cpu")
    torch_dtype = resolve_dtype("float32" if quantize else dtype, dev)
    spec = os.fspath(name_or_path)
    path = Path(resolve_known_name(spec)).expanduser()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{spec} is a file but not a .gguf file: pass a model folder (with config.json), "
                "a .gguf file or a hub id"
            )
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        if not (path / "config.json").exists() and not (path / "config.json").is_symlink():
            raise ModelLoadError(f"{spec} has no config.json: is it a HuggingFace model folder?")
        source = str(path)
    elif _looks_like_path(spec):
        raise ModelLoadError(f"no such file or folder: {spec}")
    else:
        source = spec
        if not _in_local_hub_cache(spec) and not _hub_reachable():
            raise ModelLoadError(
                f"{spec!r} is neither a local folder nor a .gguf file, and the HuggingFace Hub "
                "cannot be reached from this machine to download it. Pass a local model folder "
                "or a .gguf file, or a model name from `specdecode models list`."
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(_load_hint(spec, path, exc)) from exc
    model.to(dev)
    model.eval()
    if grouped_attention:
        use_grouped_attention(model)
    if quantize:
        model, torch_dtype = quantize_linear_int8(model), torch.qint8
    if session_kind == COMPILED and dev.type == "cpu":
        if kernels == ONEDNN:  # inductor cannot lower products on weights packed outside it
            raise ModelLoadError(
                "compiled sessions cannot run on oneDNN-packed weights: use --cpu-kernels "
                "auto or torch with --kv-cache compiled (torch.compile packs its own)"
            )
        kernels = TORCH
    linear_kernels = None
    if choose_kernels(kernels, dev, torch_dtype) == ONEDNN:
        linear_kernels = pack_linears(model, keep_originals=keep_torch_kernels)
        if pad_rows:
            tune_row_padding(linear_kernels)
    lean = None
    if forward != TRANSFORMERS_FORWARD and session_kind == DYNAMIC:
        lean = _lean_decoder(model, spec, forward == LEAN_FORWARD, linear_kernels)
        if lean is not None and linear_kernels is not None and pad_rows:
            tune_module_padding(lean.fused_modules())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        dtype=torch_dtype,
        device=dev,
        kernels=linear_kernels,
        session_kind=session_kind,
        compile_backend=compile_backend,
        freeze_weights=freeze_weights,
        lean=lean,
    )


def _lean_decoder(
    model: Any, spec: str, required: bool, kernels: LinearKernels | None
) -> LeanDecoder | None:
    """The lean forward for ``model``; where it cannot run, an error if ``required``, else None."""
    reason = lean_support(model)
    if reason is None:
        return LeanDecoder(model, kernels=kernels)
    if required:
        raise ModelLoadError(
            f"the lean forward cannot run {spec}: {reason}. Ask for transformers' forward "
            "instead (forward='transformers'; --draft-forward transformers)"
        )
    log.info("%s keeps transformers' forward: %s", spec, reason)
    return None


def quantize_linear_int8(model: Any, per_channel: bool | None = None) -> Any:
    """``model`` with every ``nn.Linear`` replaced by a dynamically quantized int8 one (weights
    int8 with one scale per output row, or per tensor; activations quantized on the fly; CPU).
    For a draft model this only changes its speed and how often its tokens are accepted, never
    the output. ``per_channel`` defaults to :data:`INT8_PER_CHANNEL`. Uses
    ``torch.ao.quantization.quantize_dynamic``, which torch marks deprecated (torchao replaces
    it) but still ships; its deprecation warning is silenced here."""
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    if per_channel is None:
        per_channel = INT8_PER_CHANNEL
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=False
        )


def resolve_known_name(spec: str) -> str:
    """A known model name (``specdecode models list``) becomes its pulled folder, pulled on first
    use with progress bars; anything else, including an existing path of that name, is kept."""
    from specdecode.models.registry import find_known_model

    known = find_known_model(spec)
    if known is None or Path(spec).expanduser().exists():
        return spec
    from specdecode.models.pull import TqdmProgress, ensure_pulled

    return str(ensure_pulled(known.name, progress=TqdmProgress()))


def _in_local_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache already holds this model's config (loads without network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id, an unreadable cache: treat as absent
        return False
    return isinstance(found, str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so that an offline machine fails in seconds
    instead of after the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or spec.lower().endswith(".gguf")
        or os.sep in spec.strip("/").replace("/", "", 1)  # hub ids have exactly one slash
    )


def _load_hint(spec: str, path: Path, exc: Exception) -> str:
    if path.exists():
        return f"could not load the model in {spec}: {exc}"
    return (
        f"could not load {spec!r} from the HuggingFace Hub ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}). Without access to the Hub, pass a local "
        "model folder or a .gguf file, or a model name from `specdecode models list`."
    )
