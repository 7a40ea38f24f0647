"""Layer skipping: run a decoder with some attention and MLP sublayers bypassed, no weight copies.

Self-speculative decoding (Zhang et al. 2024, "Draft & Verify: Lossless Large Language Model
Acceleration via Self-Speculative Decoding") drafts with the target itself, minus some sublayers.
In a pre-norm decoder layer ``h = h + attn(norm(h)); h = h + mlp(norm(h))``, a sublayer that
returns zeros lets the residual stream pass through unchanged, so skipping is done by swapping
the sublayer module's ``forward`` for a function returning zeros, inside :func:`skip_layers`,
which puts every original ``forward`` back on exit, exceptions included.

KV cache: a skipped attention still appends zeros of the right shape to its cache layer, so that
every layer of the cache keeps the same length. transformers computes position ids and the
attention mask from the first layer's length; equal lengths keep both right whichever layers are
skipped. The entries a draft writes (zeros in skipped layers, draft-quality keys elsewhere) lie
past the verified length and are dropped by truncating the cache before verification.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from specdecode.errors import InvalidSettingsError, UnsupportedModelError

# decoder layers whose sublayers are ``self_attn`` and ``mlp`` between two pre-norms
LLAMA_LIKE = ("llama", "qwen2", "mistral")
SUPPORTED = (*LLAMA_LIKE, "gpt2")
_LLAMA_CHILDREN = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}


@dataclass(frozen=True)
class SkipSet:
    """Which sublayers the draft skips, by 0-based layer index."""

    attention: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()

    @classmethod
    def of(cls, attention: Sequence[int] = (), mlp: Sequence[int] = ()) -> SkipSet:
        """A skip set with sorted, de-duplicated indices."""
        return cls(tuple(sorted({int(i) for i in attention})), tuple(sorted({int(i) for i in mlp})))

    @property
    def size(self) -> int:
        """Number of sublayers skipped."""
        return len(self.attention) + len(self.mlp)

    def ratio(self, num_layers: int) -> float:
        """Fraction of the 2 * num_layers sublayers that are skipped."""
        return self.size / (2 * num_layers) if num_layers else 0.0

    def check(self, num_layers: int) -> None:
        """Raise if an index does not name a layer of a model with ``num_layers`` layers."""
        for kind, indices in (("attention", self.attention), ("MLP", self.mlp)):
            bad = [i for i in indices if not 0 <= i < num_layers]
            if bad:
                raise InvalidSettingsError(
                    f"{kind} skip indices {bad} are out of range: the model has {num_layers} "
                    f"layers, numbered 0 to {num_layers - 1}"
                )


@dataclass(frozen=True)
class DecoderLayout:
    """Where an architecture keeps its decoder layers' sublayers."""

    layers: list[torch.nn.Module]  # the decoder layers, in order
    attention: str  # attribute of a layer holding its self-attention
    mlp: str  # attribute of a layer holding its MLP


def decoder_layout(model: Any) -> DecoderLayout:
    """The decoder layers of a supported causal LM; :class:`UnsupportedModelError` otherwise."""
    config = model.config
    model_type = str(getattr(config, "model_type", "unknown"))
    base = getattr(model, "base_model", model)
    if model_type == "gpt2" and hasattr(base, "h"):
        if getattr(config, "add_cross_attention", False):
            raise _unsupported(model_type, "its layers have cross-attention")
        return DecoderLayout(list(base.h), "attn", "mlp")
    layers = getattr(base, "layers", None)
    if layers is not None and len(layers) and _llama_like(layers[0]):
        return DecoderLayout(list(layers), "self_attn", "mlp")
    raise _unsupported(model_type, "its decoder layers are not of a supported structure")


def _llama_like(layer: torch.nn.Module) -> bool:
    names = {name for name, _ in layer.named_children()}
    return names == _LLAMA_CHILDREN and hasattr(layer.self_attn, "layer_idx")


def _unsupported(model_type: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"layer skipping does not support {model_type!r} models ({why}). Supported: "
        f"{', '.join(SUPPORTED)}, and any model whose decoder layers are exactly input_layernorm, "
        "self_attn, post_attention_layernorm and mlp (the Llama layout)."
    )


def check_supported(model: Any) -> int:
    """Raise :class:`UnsupportedModelError` unless layers of ``model`` can be skipped.

    Returns the number of decoder layers.
    """
    return len(decoder_layout(model).layers)


@contextmanager
def skip_layers(model: Any, skip: SkipSet) -> Iterator[None]:
    """Within the block, ``model`` runs with the sublayers of ``skip`` bypassed.

    The model's modules are patched in place (no copy); every patch is undone on exit, also
    when the block raises. Nesting is allowed; the inner block's skips add to the outer's.
    """
    layout = decoder_layout(model)
    skip.check(len(layout.layers))
    undo: list[Callable[[], None]] = []
    try:
        for i in skip.attention:
            attn = getattr(layout.layers[i], layout.attention)
            undo.append(_replace_forward(attn, _skipped_attention(attn)))
        for i in skip.mlp:
            mlp = getattr(layout.layers[i], layout.mlp)
            undo.append(_replace_forward(mlp, _skipped_mlp))
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _replace_forward(module: torch.nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Shadow ``module.forward`` with an instance attribute; return the function that undoes it."""
    had_own = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = forward

    def restore() -> None:
        if had_own:
            module.__dict__["forward"] = saved
        else:
            del module.forward

    return restore


def _skipped_mlp(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.zeros_like(hidden_states)


def _skipped_attention(attn: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, None]]:
    """A forward for ``attn`` that outputs zeros and appends zero keys/values to its cache layer."""
    heads, head_dim = _kv_shape(attn)
    layer_idx = attn.layer_idx

    def forward(
        hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            batch, length = hidden_states.shape[:2]
            zeros = hidden_states.new_zeros((batch, heads, length, head_dim))  # (B, H_kv, T, D)
            cache.update(zeros, zeros, layer_idx)
        return torch.zeros_like(hidden_states), None

    return forward


def _kv_shape(attn: torch.nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) of an attention module."""
    head_dim = _int_attribute(attn, "head_dim")
    k_proj = getattr(attn, "k_proj", None)
    if k_proj is not None:
        return int(k_proj.out_features) // head_dim, head_dim
    return _int_attribute(attn, "num_heads"), head_dim


def _int_attribute(module: torch.nn.Module, name: str) -> int:
    """An integer a model class stores on its module (typed as tensor or module by torch)."""
    value: Any = getattr(module, name)
    return int(value)
