"""A lean forward pass for Llama-family decoders: fewer, larger products and less Python.

Why: a small draft model's step is short, so the work around its products weighs. The int8
Qwen2.5-Coder-0.5B draft's one-token step took 30 ms on this project's CPU, of which 17 ms were
its 169 matrix products and about 10 ms host time (Python, dispatch, transformers' per-layer
modules; ``python -m specdecode.bench.step_profile``, docs/speed.md). Every millisecond of a
draft step is paid k times a round.

:class:`LeanDecoder` runs the same computation as transformers' forward for Llama, Qwen2 and
Mistral models with full attention, on the same weights, in one function:
- the query, key and value projections are one product, and the MLP's gate and up projections
  another (4 products a layer instead of 7), each fused layer built in the kind of the originals
  (``nn.Linear``, oneDNN-packed :class:`~specdecode.models.kernels.PackedLinear` or int8
  dynamically quantized);
- rotary embeddings are computed once a pass and applied to the queries and keys in one go,
  RMS norms are torch's one fused operator rather than transformers' seven, the attention folds
  a key/value head's query heads into its rows (as :mod:`specdecode.models.attention` does) and
  the KV cache is our :class:`~specdecode.models.cache.RollbackLayer` cache, so sessions roll it
  back as before;
- only the logits asked for are normed and projected.

It is meant for draft models, whose numerics never change the output (the target verifies every
token), only how often drafts are accepted. On float32 weights it computes what transformers
does up to the summation order of the fused products (logits equal to about 1e-5 in the tests);
int8 layers quantized per output row (the default) are fused exactly, their int8 rows and scales
concatenated, while layers quantized per tensor must be quantized afresh over the fused weight
(one scale for q, k and v together), which moves the logits more. Models of other
architectures or of remote code, with sliding windows, or with layers of an unexpected kind are
refused with the reason (:func:`lean_support`), and ``load_model(forward="auto")`` keeps
transformers' forward for them.

The fused layers are copies: the model keeps its own q/k/v and gate/up layers (transformers'
modes and layer skipping run them), so a lean model holds those weights twice, except plain
``nn.Linear`` layers, which become views of the fused weight. For the int8 0.5B draft that is
about 0.23 GB more. While the model runs on other kernels than it was built on
(:meth:`LinearKernels.use`), sessions fall back to transformers' forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from specdecode.errors import InvalidSettingsError
from specdecode.models.cache import RollbackLayer, make_cache
from specdecode.models.kernels import LinearKernels, PackedLinear

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


class LeanUnsupportedError(InvalidSettingsError):
    """The lean forward was asked for a model it cannot run."""


Norm = Callable[[torch.Tensor], torch.Tensor]


def rms_norm(module: nn.Module) -> Norm:
    """``module`` (a Llama-family RMSNorm) as torch's fused ``rms_norm``: one operator where
    transformers' module runs seven (its float32 upcast, square, mean, add, rsqrt, two
    products), which weighs in a short draft step. Modules without a 1-D ``weight`` and a
    ``variance_epsilon`` are called as they are."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return module
    return functools.partial(
        nn.functional.rms_norm, normalized_shape=(int(weight.shape[0]),), weight=weight, eps=eps
    )


@dataclass
class LeanLayer:
    """One decoder layer's weights, in the order the forward uses them."""

    input_norm: Norm  # RMSNorm before attention
    qkv: nn.Module  # q, k and v projections as one product
    out: nn.Module  # attention output projection (the model's own module)
    post_norm: Norm  # RMSNorm before the MLP
    gate_up: nn.Module  # gate and up projections as one product
    down: nn.Module  # down projection (the model's own module)
    act: nn.Module  # the MLP's activation (the model's own module)


def lean_support(model: Any) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model``, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return f"model type {model_type!r} (the lean forward runs {', '.join(SUPPORTED_TYPES)})"
    if not type(model).__module__.startswith("transformers.models."):
        return f"{type(model).__name__} is not transformers' own class (remote code?)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    core = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if core is None or any(not hasattr(core, name) for name in needed):
        return "not a decoder laid out as model.{embed_tokens, layers, norm, rotary_emb}"
    if not hasattr(model, "lm_head"):
        return "no lm_head"
    cache_layers = make_cache(config).layers
    if len(cache_layers) != len(core.layers) or not all(
        isinstance(layer, RollbackLayer) for layer in cache_layers
    ):
        return "layers other than full attention (sliding window or other kinds)"
    for index, layer in enumerate(core.layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = [getattr(attention, f"{name}_proj", None) for name in "qkvo"]
        parts += [getattr(mlp, f"{name}_proj", None) for name in ("gate", "up", "down")]
        if any(_dense_kind(part) is None for part in parts):
            return f"layer {index} has projections of a kind the lean forward does not fuse"
        if not hasattr(attention, "head_dim") or not hasattr(mlp, "act_fn"):
            return f"layer {index} is not laid out as a Llama layer"
        if getattr(attention, "sliding_window", None):
            return f"layer {index} uses a sliding window"
    return None


def _dense_kind(module: Any) -> type | None:
    """The kind of linear layer ``module`` is, among those the lean forward can fuse."""
    for kind in (PackedLinear, DynamicQuantizedLinear):
        if isinstance(module, kind):
            return kind
    return nn.Linear if type(module) is nn.Linear else None


def _dense(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (out, in) and bias of a linear layer of any kind :func:`_dense_kind` knows."""
    if isinstance(module, DynamicQuantizedLinear):
        return module.weight().dequantize(), module.bias()
    if isinstance(module, PackedLinear):
        return module.weight, module.bias
    assert isinstance(module, nn.Linear)
    return module.weight, module.bias


def fuse_linears(modules: Sequence[nn.Module]) -> nn.Module:
    """One linear layer computing the outputs of ``modules`` (same input size) side by side,
    of the same kind as they are: their weights and biases concatenated along the outputs.

    int8 layers quantized per output row keep their int8 weights and scales exactly; layers
    quantized per tensor (one scale each) are dequantized and quantized afresh with one scale
    for the fused weight, which rounds them a little differently."""
    kinds = {_dense_kind(module) for module in modules}
    if len(kinds) != 1 or None in kinds:
        raise LeanUnsupportedError("cannot fuse linear layers of different or unknown kinds")
    kind = kinds.pop()
    if kind is DynamicQuantizedLinear and all(_per_row(module) for module in modules):
        return _fuse_int8_rows(modules)
    dense = [_dense(module) for module in modules]
    weight = torch.cat([w.detach() for w, _ in dense])
    has_bias = any(b is not None for _, b in dense)
    with torch.no_grad():
        fused: nn.Linear = nn.utils.skip_init(
            nn.Linear,
            weight.shape[1],
            weight.shape[0],
            bias=has_bias,
            device=weight.device,
            dtype=weight.dtype,
        )
        fused.weight.copy_(weight)
        if has_bias:
            biases = [
                b.detach() if b is not None else weight.new_zeros(w.shape[0]) for w, b in dense
            ]
            assert fused.bias is not None
            fused.bias.copy_(torch.cat(biases).to(weight.dtype))
    fused.requires_grad_(False)
    if kind is PackedLinear:
        first = modules[0]
        assert isinstance(first, PackedLinear)
        return PackedLinear(fused, first.batch_hint)
    if kind is DynamicQuantizedLinear:
        from specdecode.models.loading import quantize_linear_int8

        fused_int8 = quantize_linear_int8(nn.Sequential(fused), per_channel=False)[0]
        return fused_int8  # type: ignore[no-any-return]
    _share_weights(modules, fused)
    return fused


def _share_weights(modules: Sequence[nn.Module], fused: nn.Linear) -> None:
    """Make plain linear ``modules`` views of the rows of ``fused`` that hold their weights,
    so that the weights are not held twice."""
    start = 0
    for module in modules:
        assert isinstance(module, nn.Linear)
        end = start + module.out_features
        module.weight = nn.Parameter(fused.weight[start:end], requires_grad=False)
        if module.bias is not None and fused.bias is not None:
            module.bias = nn.Parameter(fused.bias[start:end], requires_grad=False)
        start = end


def _per_row(module: nn.Module) -> bool:
    """Whether an int8 layer's weight has one scale per output row."""
    scheme = module.weight().qscheme()  # type: ignore[operator]
    return scheme in (torch.per_channel_affine, torch.per_channel_symmetric)


def _fuse_int8_rows(modules: Sequence[nn.Module]) -> nn.Module:
    """Fuse int8 layers quantized per output row: their int8 rows and scales, concatenated."""
    weights = [module.weight() for module in modules]  # type: ignore[operator]
    biases = [module.bias() for module in modules]  # type: ignore[operator]
    values = torch.cat([w.int_repr() for w in weights])
    scales = torch.cat([w.q_per_channel_scales() for w in weights])
    zero_points = torch.cat([w.q_per_channel_zero_points() for w in weights])
    weight = torch._make_per_channel_quantized_tensor(values, scales, zero_points, 0)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b if b is not None else torch.zeros(w.shape[0])
                for w, b in zip(weights, biases, strict=True)
            ]
        )
    fused = DynamicQuantizedLinear(int(values.shape[1]), int(values.shape[0]), dtype=torch.qint8)
    fused.set_weight_bias(weight, bias)
    return fused


class LeanDecoder:
    """The forward pass of a Llama-family causal LM on our rollback KV cache.

    ``decoder(input_ids, cache, logits_to_keep)`` runs ``input_ids`` (1, n) after the positions
    ``cache`` holds, appends their keys and values to it and returns the logits (1,
    logits_to_keep, V) of the last positions, as ``model(input_ids=..., past_key_values=cache,
    logits_to_keep=...)`` would. Built once per model (:func:`specdecode.models.load_model` with
    ``forward="lean"`` or ``"auto"``); it shares every weight with the model except the fused
    projections, which it holds itself.
    """

    def __init__(self, model: Any, kernels: LinearKernels | None = None) -> None:
        reason = lean_support(model)
        if reason is not None:
            raise LeanUnsupportedError(f"the lean forward cannot run this model: {reason}")
        core = model.model
        self._kernels = kernels  # the model's switchable kernels, if it has them
        self._built_on = None if kernels is None else kernels.active
        self.embed = core.embed_tokens
        self.rotary = core.rotary_emb
        self.norm = rms_norm(core.norm)
        self.lm_head = model.lm_head
        first = core.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.heads = int(first.q_proj.out_features) // self.head_dim
        self.kv_heads = int(first.k_proj.out_features) // self.head_dim
        self.groups = self.heads // self.kv_heads
        self.scaling = float(first.scaling)
        self.intermediate = int(core.layers[0].mlp.gate_proj.out_features)
        self.layers = [
            LeanLayer(
                input_norm=rms_norm(layer.input_layernorm),
                qkv=fuse_linears(
                    [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
                ),
                out=layer.self_attn.o_proj,
                post_norm=rms_norm(layer.post_attention_layernorm),
                gate_up=fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=layer.mlp.down_proj,
                act=layer.mlp.act_fn,
            )
            for layer in core.layers
        ]

    @property
    def usable(self) -> bool:
        """Whether the model still runs on the kernels this decoder was built on (while
        :meth:`LinearKernels.use` switches them, sessions run transformers' forward)."""
        return self._kernels is None or self._kernels.active == self._built_on

    def fused_modules(self) -> list[nn.Module]:
        """The fused layers this decoder holds (for row padding and weight counts)."""
        return [module for layer in self.layers for module in (layer.qkv, layer.gate_up)]

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, cache: Any, logits_to_keep: int = 1
    ) -> torch.Tensor:
        n = int(input_ids.shape[-1])
        past = int(cache.layers[0].get_seq_length()) if cache.layers else 0
        x = self.embed(input_ids)
        positions = torch.arange(past, past + n, device=x.device).unsqueeze(0)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, n, D)
        mask = None
        if n > 1 and past > 0:  # row (g, t) sees the cache and the new tokens up to t
            causal = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
            mask = causal.repeat(self.groups, 1)[None, None]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for index, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            qkv = layer.qkv(h).view(1, n, heads + 2 * kv_heads, dim).transpose(1, 2)
            qk = _rotate(qkv[:, : heads + kv_heads], cos, sin)  # queries and keys at once
            q = qk[:, :heads]
            k, v = cache.layers[index].update(qk[:, heads:], qkv[:, heads + kv_heads :])
            if n > 1 and past == 0:  # a prefill: plain causal attention
                attended = nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.groups > 1
                )
            else:  # one key/value head's query heads as its rows: the cache is read as it is
                rows = q.reshape(1, kv_heads, self.groups * n, dim)
                attended = nn.functional.scaled_dot_product_attention(
                    rows, k, v, attn_mask=mask, scale=self.scaling
                )
            attended = attended.reshape(1, heads, n, dim).transpose(1, 2).reshape(1, n, -1)
            x = x + layer.out(attended)
            gate_up = layer.gate_up(layer.post_norm(x))
            gate, up = gate_up[..., : self.intermediate], gate_up[..., self.intermediate :]
            x = x + layer.down(layer.act(gate) * up)
        logits: torch.Tensor = self.lm_head(self.norm(x[:, -logits_to_keep:]))
        return logits


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (1, H, n, D), as Llama's ``apply_rotary_pos_emb``."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin
