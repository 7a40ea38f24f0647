"""Which CPU kernels a model's ``nn.Linear`` layers run on: torch's default or pre-packed oneDNN.

Why this matters for speculative decoding: with torch's default CPU path (MKL), a linear layer
over one token is a matrix-vector product that streams the weights once, but over 2 to 16 tokens
it becomes a small matrix product that costs about twice as much (three times at 3 tokens) on
the machines we measured (AMD EPYC, AVX-512, 2 threads; docs/speed.md). A verification pass then
costs about two plain steps whatever the draft length, which caps every drafter. oneDNN's
matrix product over a weight packed once in its blocked layout costs about the same for 1 to 16
tokens, and one token runs faster than torch's default too.

``pack_linears`` swaps each ``nn.Linear`` of a model for a :class:`PackedLinear` holding the
packed weight. Both compute the same float32 product; only the order of the additions differs
(the same kind of last-bit difference as between a one-token step and a batched verification
pass), so greedy outputs are checked against transformers' plain ``generate`` like every other
path (``specdecode bench`` does it for every prompt).

``LinearKernels`` remembers both sets of modules when asked to, so one model in memory can run
transformers' modes on torch's kernels and ours on oneDNN in the same benchmark
(:meth:`LinearKernels.use`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specdecode.errors import InvalidSettingsError

log = logging.getLogger(__name__)

TORCH = "torch"  # torch's default kernels (MKL on x86 CPUs)
ONEDNN = "onednn"  # oneDNN matrix products on weights packed once
AUTO = "auto"  # oneDNN for float32 / bfloat16 models on the CPU where it works, else torch
KERNEL_CHOICES = (AUTO, ONEDNN, TORCH)
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
DEFAULT_BATCH_HINT = 8  # the packing is tuned for this many rows (a typical verification pass)


class KernelError(InvalidSettingsError):
    """Kernels were asked for that this model, device or torch build cannot run."""


class PackedLinear(nn.Module):
    """``nn.Linear`` computed by oneDNN on a weight packed once at construction.

    The packed weight is an opaque oneDNN tensor: it cannot be moved, saved or trained, so the
    module is for inference on the CPU only. ``bias`` is kept as it was.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = DEFAULT_BATCH_HINT) -> None:
        super().__init__()
        self.batch_hint = batch_hint
        # rows -> the larger row count to compute them as, where oneDNN runs that faster (set by
        # specdecode.models.row_padding; empty: every product as it comes)
        self.pad_rows: dict[int, int] = {}
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = linear.weight.dtype
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach(), batch_hint
            )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in): every leading dimension flattened
        n = rows.shape[0]
        padded = self.pad_rows.get(n, n)
        if padded > n:  # zero rows below the real ones; each output row depends on its own only
            rows = nn.functional.pad(rows, (0, 0, 0, padded - n))
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            rows, self.packed, self.bias, "none", [], ""
        )
        return y[:n].reshape(*x.shape[:-1], self.out_features)  # (..., out)

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight (out, in), for code that reads it; writing to it does not
        change the packed one."""
        dense: torch.Tensor = self.packed.to_dense()
        return dense

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedLinear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            dense.weight = nn.Parameter(self.weight, requires_grad=False)
            if self.bias is not None:
                dense.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        copied = PackedLinear(dense, self.batch_hint)
        copied.pad_rows = dict(self.pad_rows)
        return copied

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, dtype={self.dtype}, kernels=onednn"
            + (f", pad_rows={self.pad_rows}" if self.pad_rows else "")
        )


@dataclass
class LinearKernels:
    """The kernels a model's linear layers run on, and the means to switch them.

    ``originals`` holds the ``nn.Linear`` modules that were swapped out (only when the caller
    asked to keep them: they double the memory of the weights), ``packed`` their replacements;
    both are keyed by (parent module name, attribute name).
    """

    model: nn.Module
    active: str = TORCH
    packed: dict[tuple[str, str], nn.Module] = field(default_factory=dict)
    originals: dict[tuple[str, str], nn.Module] = field(default_factory=dict)

    @property
    def available(self) -> tuple[str, ...]:
        """The kernel sets this model can switch to."""
        if not self.packed:
            return (TORCH,)
        return (ONEDNN, TORCH) if self.originals else (ONEDNN,)

    def switch(self, kind: str) -> None:
        """Make ``kind`` (``onednn`` or ``torch``) the active kernels."""
        if kind == self.active:
            return
        if kind not in self.available:
            raise KernelError(
                f"this model cannot switch to {kind!r} kernels (it has {', '.join(self.available)})"
                + (": it was loaded without keeping the original layers" if self.packed else "")
            )
        modules = self.packed if kind == ONEDNN else self.originals
        for (parent, attr), module in modules.items():
            setattr(self.model.get_submodule(parent), attr, module)
        self.active = kind

    def row_padding(self) -> dict[str, dict[int, int]]:
        """Each padded layer shape ("out x in") and its row padding (see
        :mod:`specdecode.models.row_padding`); shapes computed as they come are left out."""
        shapes = {}
        for module in self.packed.values():
            if isinstance(module, PackedLinear) and module.pad_rows:
                shapes[f"{module.out_features} x {module.in_features}"] = dict(module.pad_rows)
        return dict(sorted(shapes.items()))

    @contextmanager
    def use(self, kind: str) -> Iterator[LinearKernels]:
        """Run the block on ``kind`` kernels, then switch back to the ones active before."""
        before = self.active
        self.switch(kind)
        try:
            yield self
        finally:
            self.switch(before)


def onednn_usable(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN packed linear kernels exist in this torch build and agree with torch's
    own product on a small case (a guard against a build or CPU where they misbehave)."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        probe = nn.Linear(64, 48).to(dtype)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
        with torch.no_grad():
            want, got = probe(x), PackedLinear(probe, 4)(x)
    except (RuntimeError, AttributeError) as exc:  # op missing from this build, or refused
        log.info("oneDNN packed linear kernels unavailable: %s", exc)
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(want.float(), got.float(), atol=tolerance, rtol=tolerance))


def choose_kernels(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel set to use for a model of ``dtype`` on ``device``; a clear error when
    ``onednn`` is asked for where it cannot run."""
    if requested not in KERNEL_CHOICES:
        choices = ", ".join(KERNEL_CHOICES)
        raise KernelError(f"unknown kernels {requested!r}: choose one of {choices}")
    if requested == TORCH:
        return TORCH
    fits = device.type == "cpu" and dtype in PACKABLE_DTYPES
    if requested == AUTO:
        return ONEDNN if fits and onednn_usable(dtype) else TORCH
    if not fits:
        raise KernelError(
            "oneDNN kernels run float32 or bfloat16 models on the CPU only "
            f"(this model: {str(dtype).removeprefix('torch.')} on {device.type}): "
            "use --cpu-kernels torch or auto"
        )
    if not onednn_usable(dtype):
        raise KernelError(
            "this torch build has no working oneDNN packed linear kernels: "
            "use --cpu-kernels torch or auto"
        )
    return ONEDNN


def pack_linears(
    model: nn.Module, *, keep_originals: bool = False, batch_hint: int = DEFAULT_BATCH_HINT
) -> LinearKernels:
    """Replace every ``nn.Linear`` of ``model`` (exactly that class: quantized or custom layers
    are left alone) by a :class:`PackedLinear`; return the handle that switches between them.

    Without ``keep_originals`` the unpacked weights are freed where nothing else holds them (a
    weight tied to the input embeddings stays, as the embedding)."""
    kernels = LinearKernels(model=model, active=ONEDNN)
    targets = [
        (parent_name, attr, child)
        for parent_name, parent in model.named_modules()
        for attr, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent_name, attr, child in targets:
        packed = PackedLinear(child, batch_hint)
        setattr(model.get_submodule(parent_name), attr, packed)
        kernels.packed[(parent_name, attr)] = packed
        if keep_originals:
            kernels.originals[(parent_name, attr)] = child
    if not targets:
        kernels.active = TORCH
    elif not keep_originals:
        _own_remaining_weights(model)
    return kernels


def _own_remaining_weights(model: nn.Module) -> None:
    """Copy the parameters left unpacked (embeddings, norms, biases) into memory of their own.

    transformers maps a safetensors checkpoint into memory and the parameters are views of the
    mapping: one left there (a tied embedding, say) keeps the whole file mapped, and every page
    that packing read stays resident. Copying the few left (the 1.5B Qwen's 0.9 GB) lets the
    mapping go: its resident size fell from 12.6 GB to 7.4 GB."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()


def describe(kernels: LinearKernels | None) -> dict[str, Any]:
    """What to record beside timings."""
    if kernels is None:
        return {"active": TORCH, "packed_layers": 0}
    return {
        "active": kernels.active,
        "packed_layers": len(kernels.packed),
        "row_padding": {
            shape: {str(n): m for n, m in pad.items()}
            for shape, pad in kernels.row_padding().items()
        },
    }
