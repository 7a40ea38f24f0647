"""The GPU benchmark: models built in place, measured against the memory-bandwidth limit.

Real weights cannot travel to a lent GPU machine, so this benchmark builds its models there
(issue 5's recipe): a ~1.1B Qwen2-architecture target with random weights whose upper layers'
output projections (attention output and MLP down projection) are scaled by a small ``eps``,
and a draft made of the target's own first few layers (sharing their weights, the embeddings,
the final norm and the output layer). The upper layers then nudge the draft's logits by an
amount that ``eps`` sets, so ``eps`` sets alpha and the layer ratio sets c. The output layer is
scaled by ``logit_scale`` so that the distributions are peaked as a trained model's are.

One run, every figure measured in it (nothing assumed):

- the device's memory bandwidth (a large device-to-device copy) and the target's weight bytes:
  plain decoding cannot beat ``bandwidth / weight bytes`` tokens/s, so each plain mode reports
  its fraction of that limit;
- decoding tokens/s (the prompt's prefill left out) of transformers' plain ``generate`` (eager),
  our loop on the dynamic cache (eager), and on a compiled static session (CUDA graphs), there
  with greedy tokens chosen on the device and read back 8 at a time (a draft's round at once),
  and, beside it, read back one at a time (what that gains);
- our draft mode at constant k on compiled sessions, with alpha, tau, the measured c (a draft
  step over a target step) and c_v(k) (a verification pass over a target step), the
  Leviathan et al. bound from them and the efficiency (decoding speedup over our compiled
  plain loop, divided by the bound); transformers' assisted generation with the same draft and
  k beside it;
- token identity: every mode against transformers' plain ``generate``, as the share of prompts
  whose tokens are identical and the first position where each other one differs (in bfloat16,
  batched verification rounds differently from one-token steps, so greedy outputs may drift;
  in float32 they should only where two tokens' scores nearly tie, since compiled kernels and
  pass sizes still change the order of additions).

Results are written after every stage (``results.json``, ``results.md``), so a run cut short
still reports what it measured; a stage that fails records its error and the run goes on.

    python -m specdecode.bench.synthetic --device cuda --out results/gpu
    python -m specdecode.bench.synthetic --tiny --device cpu --out /tmp/synthetic  # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from specdecode.bench.stats import leviathan_speedup
from specdecode.decoding import SpeculativeGenerator
from specdecode.decoding.loop import GPU_TOKENS_PER_SYNC
from specdecode.drafters import ModelDrafter
from specdecode.models import LoadedModel
from specdecode.models.attention import transformers_attention, use_grouped_attention
from specdecode.models.costs import measure_pass_costs
from specdecode.models.kernels import PackedLinear
from specdecode.models.loading import COMPILED, DYNAMIC
from specdecode.models.timing import median_time, synchronize

log = logging.getLogger(__name__)


# every mode, in the order they run (each dtype): transformers' plain generate; our plain loop
# compiled (greedy tokens read back 8 at a time), read back per token, frozen (fused
# projections, experimental), and eager; our draft mode compiled, read back per token, eager;
# transformers' assisted generation
MODES = (
    "hf-plain",
    "plain",
    "plain-per-token",
    "plain-frozen",
    "plain-eager",
    "draft",
    "draft-per-token",
    "draft-eager",
    "hf-assisted",
)
DEFAULT_MODES = tuple(mode for mode in MODES if mode != "plain-frozen")
IDENTITY_MODES = ("hf-plain", "plain", "plain-frozen", "draft")  # what other dtypes run


@dataclass(frozen=True)
class SyntheticSpec:
    """The built models' shape. The default is a TinyLlama-sized Qwen2 (1.1B parameters)."""

    hidden_size: int = 2048
    num_layers: int = 22
    intermediate_size: int = 5632
    num_heads: int = 32
    num_kv_heads: int = 4
    vocab_size: int = 32000
    draft_layers: int = 4
    eps: float = 0.05  # scale of the upper layers' output projections: sets alpha
    logit_scale: float = 4.0  # scale of the output layer: peaked distributions
    context: int = 4096
    seed: int = 0


TINY = SyntheticSpec(
    hidden_size=64,
    num_layers=4,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=320,
    draft_layers=1,
    context=512,
)


@dataclass
class ModeResult:
    """One mode over every prompt."""

    name: str
    tokens: list[list[int]] = field(default_factory=list)  # per prompt, new tokens
    decode_seconds: float = 0.0  # all prompts, prefill left out
    decode_tokens: int = 0
    tokens_per_second: float | None = None
    speedup: float | None = None  # over transformers' plain generate, decoding only
    bandwidth_fraction: float | None = None  # plain modes: of the memory-bandwidth limit
    alpha: float | None = None
    tau: float | None = None
    mean_k: float | None = None
    c: float | None = None
    verify_cost: float | None = None
    bound: float | None = None
    efficiency: float | None = None
    identical_prompts: int | None = None  # prompts whose tokens equal the reference's
    first_divergence: list[int | None] = field(default_factory=list)
    identical_to_our_plain: int | None = None  # prompts equal to ours-plain (compiled)
    error: str | None = None

    def finish(self) -> None:
        if self.decode_seconds > 0:
            self.tokens_per_second = self.decode_tokens / self.decode_seconds


@dataclass
class SyntheticReport:
    environment: dict[str, Any]
    spec: dict[str, Any]
    settings: dict[str, Any]
    measures: dict[str, Any] = field(default_factory=dict)
    modes: list[ModeResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building models
def build_pair(
    spec: SyntheticSpec,
    device: torch.device,
    dtype: torch.dtype,
    session_kind: str = DYNAMIC,
    compile_backend: str = "inductor",
) -> tuple[LoadedModel, LoadedModel]:
    """The target and its first-layers draft, on ``device`` (see the module's docstring)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from specdecode.testing.tiny import tiny_tokenizer

    if not 1 <= spec.draft_layers < spec.num_layers:
        raise ValueError(f"draft_layers must be in [1, {spec.num_layers}), got {spec.draft_layers}")

    def config(layers: int) -> Any:
        return Qwen2Config(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.context,
            tie_word_embeddings=False,
            initializer_range=0.02,
            bos_token_id=0,
            eos_token_id=None,
            pad_token_id=0,
        )

    torch.manual_seed(spec.seed)
    with torch.device(device):
        target = AutoModelForCausalLM.from_config(config(spec.num_layers), dtype=dtype)
        draft = AutoModelForCausalLM.from_config(config(spec.draft_layers), dtype=dtype)
    with torch.no_grad():
        for layer in target.model.layers[spec.draft_layers :]:
            layer.self_attn.o_proj.weight.mul_(spec.eps)
            layer.mlp.down_proj.weight.mul_(spec.eps)
        target.lm_head.weight.mul_(spec.logit_scale)
    # the draft is the target's first layers: the same modules, no copy of the weights
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = torch.nn.ModuleList(list(target.model.layers[: spec.draft_layers]))
    draft.model.norm = target.model.norm
    draft.lm_head = target.lm_head
    tokenizer = tiny_tokenizer(320)  # decoding text is not measured; ids above 320 decode to ""
    loaded = []
    for model, name in ((target, "synthetic-target"), (draft, "synthetic-draft")):
        model.eval()
        use_grouped_attention(model)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        loaded.append(
            LoadedModel(
                model,
                tokenizer,
                name,
                dtype,
                device,
                session_kind=session_kind,
                compile_backend=compile_backend,
            )
        )
    return loaded[0], loaded[1]


def weight_bytes(model: Any) -> int:
    """Bytes a one-token decoding step must read: every distinct parameter and buffer (and the
    weights of oneDNN-packed layers), except an input embedding table not tied to the output
    layer (a step reads one row of it)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    # a packed or int8 output layer is never tied to the embeddings (the first's .weight would
    # unpack a copy, the second's .weight is a method returning its quantized weight)
    if isinstance(output, (PackedLinear, DynamicQuantizedLinear)) or (
        embedding.data_ptr() != output.weight.data_ptr()
    ):
        seen.pop(embedding.data_ptr(), None)
    # oneDNN-packed and dynamically quantized layers hold their weights outside the parameters
    packed = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            packed += module.in_features * module.out_features * module.dtype.itemsize
        elif isinstance(module, DynamicQuantizedLinear):
            packed += module.in_features * module.out_features  # one byte a weight
            bias = module.bias()  # held with the weight, in float
            packed += 0 if bias is None else bias.numel() * bias.element_size()
    return sum(seen.values()) + packed


def memory_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), median of
    ``repeats`` after a warm-up."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), repeats, device)
    return 2 * source.numel() * 4 / seconds


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=gen).tolist() for _ in range(count)]


# --------------------------------------------------------------------------- timing modes
def time_ours(
    result: ModeResult,
    generator: SpeculativeGenerator,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
) -> None:
    """Decode every prompt once untimed (compiling every shape), then once timed."""
    drafted = accepted = rounds = rejected = 0
    for timed in (False, True):
        for prompt in prompts:
            out = generator.generate(
                list(prompt), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[]
            )
            if not timed:
                continue
            s = out.stats
            result.tokens.append(list(out.token_ids))
            result.decode_tokens += s.new_tokens - 1
            result.decode_seconds += s.total_seconds - s.time_to_first_token
            drafted, accepted, rounds = (
                drafted + s.drafted,
                accepted + s.accepted,
                rounds + s.rounds,
            )
            rejected += s.rejected_rounds
    result.finish()
    if drafted:
        result.alpha = accepted / (accepted + rejected) if accepted + rejected else None
        result.mean_k = drafted / rounds
        result.tau = result.decode_tokens / rounds  # new tokens per verification pass


def time_transformers(
    result: ModeResult,
    target: LoadedModel,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    assistant: LoadedModel | None = None,
    k: int | None = None,
) -> None:
    """transformers' ``generate``: decoding time as the time of ``max_new_tokens`` tokens less
    that of one (prefill and first token), each prompt warmed up once."""
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    if assistant is not None:
        kwargs.update(
            assistant_model=assistant.model,
            num_assistant_tokens=k,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.0,
        )

    def run(prompt: list[int], new: int) -> tuple[list[int], float]:
        ids = torch.tensor([prompt], device=target.device)
        synchronize(target.device)
        start = time.perf_counter()
        with ExitStack() as stack, torch.inference_mode():
            for model in (target, assistant):  # transformers' own attention, as users get it
                if model is not None:
                    stack.enter_context(transformers_attention(model.model))
            out = target.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, **kwargs
            )
        synchronize(target.device)
        return out[0, len(prompt) :].tolist(), time.perf_counter() - start

    for prompt in prompts:
        run(prompt, max_new_tokens)  # warm-up
        tokens, full = run(prompt, max_new_tokens)
        _, first = run(prompt, 1)
        result.tokens.append(tokens)
        result.decode_tokens += len(tokens) - 1
        result.decode_seconds += max(full - first, 1e-9)
    result.finish()


def compare_tokens(result: ModeResult, reference: ModeResult) -> None:
    result.identical_prompts = 0
    result.first_divergence = []
    for ours, ref in zip(result.tokens, reference.tokens, strict=False):
        if ours == ref:
            result.identical_prompts += 1
            result.first_divergence.append(None)
        else:
            result.first_divergence.append(
                next(
                    (i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b),
                    min(len(ours), len(ref)),
                )
            )


def step_costs(
    target: LoadedModel, draft: LoadedModel, context: list[int], k: int
) -> dict[str, float]:
    """Seconds of one target step, one verification pass of k drafted tokens, and one draft
    step, on the models' own kind of session (medians of 5 after a warm-up)."""
    session = target.new_session()
    session.reserve(len(context) + 64)
    costs = measure_pass_costs(session, context, sizes=(1, k + 1), repetitions=5)
    draft_session = draft.new_session()
    draft_session.reserve(len(context) + 64)
    draft_session.forward(context, 1)
    length = draft_session.length

    def draft_step() -> None:
        draft_session.forward(context[-1:], 1)
        draft_session.truncate(length)

    draft_seconds = median_time(draft_step, 5, draft.device, warmup=draft_session.warmup_passes)
    step = costs.step_seconds
    return {
        "target_step": step,
        "verify": costs.relative[k + 1] * step,
        "draft_step": draft_seconds,
        "context_tokens": len(context),
    }


# --------------------------------------------------------------------------- the run
def run_synthetic(
    spec: SyntheticSpec,
    device: torch.device,
    out: Path,
    *,
    dtypes: Sequence[str] = ("bfloat16", "float32"),
    full_dtypes: Sequence[str] = ("bfloat16",),
    ks: Sequence[int] = (4,),
    prompts: int = 4,
    prompt_tokens: int = 128,
    max_new_tokens: int = 128,
    compile_backend: str = "inductor",
    modes: Collection[str] = DEFAULT_MODES,
    progress: Callable[[str], None] = print,
) -> SyntheticReport:
    """Run every stage, writing the report after each; return it. ``modes`` picks among
    :data:`MODES` (where device time is short); dtypes in ``full_dtypes`` run all of them, the
    others only those their identity check needs (:data:`IDENTITY_MODES`)."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown modes {unknown}: choose among {', '.join(MODES)}")
    out.mkdir(parents=True, exist_ok=True)
    report = SyntheticReport(
        environment=_environment(device),
        spec=dataclasses.asdict(spec),
        settings={
            "dtypes": list(dtypes),
            "full_dtypes": list(full_dtypes),
            "ks": list(ks),
            "prompts": prompts,
            "prompt_tokens": prompt_tokens,
            "max_new_tokens": max_new_tokens,
            "compile_backend": compile_backend,
            "modes": [mode for mode in MODES if mode in modes],
        },
    )
    texts = random_prompts(prompts, prompt_tokens, spec.vocab_size, spec.seed)

    def stage(name: str, work: Callable[[], None]) -> None:
        progress(f"[{time.strftime('%H:%M:%S')}] {name}")
        start = time.perf_counter()
        try:
            work()
        except Exception as exc:  # a failed stage is recorded; the run goes on
            report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            log.debug("stage %s failed", name, exc_info=True)
            progress(traceback.format_exc(limit=6))
        report.measures.setdefault("stage_seconds", {})[name] = time.perf_counter() - start
        write_report(report, out)

    nbytes = 1 << 30 if device.type == "cuda" else 1 << 26

    def bandwidth() -> None:
        report.measures["bandwidth_bytes_per_s"] = memory_bandwidth(device, nbytes)

    stage("memory bandwidth", bandwidth)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        chosen = set(modes) if dtype_name in full_dtypes else set(modes) & set(IDENTITY_MODES)
        _run_dtype(
            report, stage, spec, device, dtype, texts, ks, max_new_tokens, compile_backend, chosen
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def _run_dtype(
    report: SyntheticReport,
    stage: Callable[[str, Callable[[], None]], None],
    spec: SyntheticSpec,
    device: torch.device,
    dtype: torch.dtype,
    prompts: list[list[int]],
    ks: Sequence[int],
    max_new_tokens: int,
    backend: str,
    chosen: set[str],
) -> None:
    tag = str(dtype).removeprefix("torch.")
    pairs: dict[str, tuple[LoadedModel, LoadedModel]] = {}
    results: dict[str, ModeResult] = {}

    def build() -> None:
        eager = build_pair(spec, device, dtype, DYNAMIC)
        pairs[DYNAMIC] = eager
        target, draft = eager
        pairs[COMPILED] = (
            dataclasses.replace(target, session_kind=COMPILED, compile_backend=backend),
            dataclasses.replace(draft, session_kind=COMPILED, compile_backend=backend),
        )
        report.measures[f"{tag}_target_weight_bytes"] = weight_bytes(target.model)
        report.measures[f"{tag}_draft_weight_bytes"] = weight_bytes(draft.model)

    stage(f"{tag}: build the target and draft", build)
    if not pairs:
        return

    def mode(key: str, name: str, work: Callable[[ModeResult], None]) -> None:
        if key not in chosen:
            return
        result = ModeResult(f"{tag} {name}")

        def go() -> None:
            try:
                work(result)
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                report.modes.append(result)
                results[name] = result
                _derive(report, results, tag)

        stage(f"{tag}: {name}", go)

    target, draft = pairs[DYNAMIC]
    ctarget, cdraft = pairs[COMPILED]

    def ours(result: ModeResult, generator: SpeculativeGenerator) -> None:
        time_ours(result, generator, prompts, max_new_tokens)

    mode("hf-plain", "hf-plain", lambda r: time_transformers(r, target, prompts, max_new_tokens))
    # the compiled modes choose greedy tokens on the device (as they do by default on a GPU),
    # explicitly so that a run on the CPU exercises the same path
    bursts = GPU_TOKENS_PER_SYNC
    mode(
        "plain",
        "ours-plain (compiled)",
        lambda r: ours(r, SpeculativeGenerator(ctarget, None, tokens_per_sync=bursts)),
    )
    # the same compiled loop with every token read back as it is chosen (the default on a
    # CPU; on a GPU the default reads back 8 at a time): what the bursts gain
    mode(
        "plain-per-token",
        "ours-plain (compiled, per-token read back)",
        lambda r: ours(r, SpeculativeGenerator(ctarget, None, tokens_per_sync=1)),
    )

    def frozen_plain(r: ModeResult) -> None:  # fused projections (StaticSession's freeze)
        frozen = dataclasses.replace(ctarget, freeze_weights=True)
        cuda = device.type == "cuda"
        before = torch.cuda.memory_allocated(device) if cuda else 0
        ours(r, SpeculativeGenerator(frozen, None, tokens_per_sync=bursts))
        if cuda:  # what the frozen graphs (their concatenated weights) and the session hold
            added = torch.cuda.memory_allocated(device) - before
            report.measures[f"{tag}_frozen_added_memory_bytes"] = added

    mode("plain-frozen", "ours-plain (compiled, frozen)", frozen_plain)
    mode("plain-eager", "ours-plain (eager)", lambda r: ours(r, SpeculativeGenerator(target, None)))
    for k in ks:

        def compiled_draft(r: ModeResult, k: int = k) -> None:
            drafter = ModelDrafter(cdraft, on_device=True)
            ours(r, SpeculativeGenerator(ctarget, drafter, k, pad_passes=False))
            costs = step_costs(ctarget, cdraft, prompts[0], k)
            report.measures[f"{tag}_compiled_costs_k{k}"] = costs
            r.c = costs["draft_step"] / costs["target_step"]
            r.verify_cost = costs["verify"] / costs["target_step"]

        def per_token_draft(r: ModeResult, k: int = k) -> None:
            drafter = ModelDrafter(cdraft, on_device=False)
            ours(r, SpeculativeGenerator(ctarget, drafter, k, pad_passes=False))

        def eager_draft(r: ModeResult, k: int = k) -> None:
            ours(r, SpeculativeGenerator(target, ModelDrafter(draft), k, pad_passes=False))

        def hf_assisted(r: ModeResult, k: int = k) -> None:
            time_transformers(r, target, prompts, max_new_tokens, draft, k)

        mode("draft", f"ours-draft k={k} (compiled)", compiled_draft)
        mode(
            "draft-per-token", f"ours-draft k={k} (compiled, per-token read back)", per_token_draft
        )
        mode("draft-eager", f"ours-draft k={k} (eager)", eager_draft)
        mode("hf-assisted", f"hf-assisted k={k}", hf_assisted)


def _derive(report: SyntheticReport, results: dict[str, ModeResult], tag: str) -> None:
    """Speedups, bandwidth fractions, bounds, efficiencies and identity, from what is there."""
    reference = results.get("hf-plain")
    plain = results.get("ours-plain (compiled)")
    bandwidth = report.measures.get("bandwidth_bytes_per_s")
    weights = report.measures.get(f"{tag}_target_weight_bytes")
    for name, result in results.items():
        rate = result.tokens_per_second
        if rate is None:
            continue
        if reference is not None and reference.tokens_per_second:
            result.speedup = rate / reference.tokens_per_second
            if result is not reference:
                compare_tokens(result, reference)
        if plain is not None and plain.tokens and "draft" in name:
            result.identical_to_our_plain = sum(
                ours == base for ours, base in zip(result.tokens, plain.tokens, strict=False)
            )
        if "plain" in name and bandwidth and weights:
            result.bandwidth_fraction = rate * weights / bandwidth
        if (
            result.alpha is not None
            and result.mean_k
            and result.c is not None
            and result.verify_cost is not None
        ):
            result.bound = leviathan_speedup(
                result.alpha, result.mean_k, result.c, result.verify_cost
            )
            if plain is not None and plain.tokens_per_second and result.bound:
                result.efficiency = rate / plain.tokens_per_second / result.bound


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return env


# --------------------------------------------------------------------------- the report
def write_report(report: SyntheticReport, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
    (out / "results.md").write_text(render_markdown(report))


def render_markdown(report: SyntheticReport) -> str:
    def fmt(value: float | None, pattern: str = "{:.2f}") -> str:
        return "–" if value is None else pattern.format(value)

    env, measures = report.environment, report.measures
    lines = ["# Synthetic GPU benchmark (specdecode.bench.synthetic)", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- spec: {report.spec}", f"- settings: {report.settings}"]
    bandwidth = measures.get("bandwidth_bytes_per_s")
    if bandwidth:
        lines.append(f"- measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    for key, value in measures.items():
        if key.endswith("weight_bytes"):
            limit = f" (limit {bandwidth / value:.0f} tok/s)" if bandwidth else ""
            lines.append(f"- {key}: {value / 1e9:.3f} GB{limit}")
        elif "costs" in key:
            lines.append(f"- {key}: " + ", ".join(f"{k} {v:.5g}" for k, v in value.items()))
    lines += [
        "",
        "Decoding only (the prompt's prefill left out); speedup over transformers' plain "
        "`generate` in the same dtype; identity against it.",
        "",
        "| mode | tok/s | speedup | of bandwidth limit | alpha | tau | k | c | c_v(k) | bound |"
        " efficiency | identical prompts | first divergence | same as our plain | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report.modes:
        identical = "–" if m.identical_prompts is None else f"{m.identical_prompts}/{len(m.tokens)}"
        diverged = ", ".join("–" if d is None else str(d) for d in m.first_divergence) or "–"
        same_plain = (
            "–"
            if m.identical_to_our_plain is None
            else f"{m.identical_to_our_plain}/{len(m.tokens)}"
        )
        lines.append(
            f"| {m.name} | {fmt(m.tokens_per_second, '{:.1f}')} | {fmt(m.speedup, '{:.2f}x')} "
            f"| {fmt(m.bandwidth_fraction, '{:.0%}')} | {fmt(m.alpha)} | {fmt(m.tau)} "
            f"| {fmt(m.mean_k)} | {fmt(m.c, '{:.3f}')} | {fmt(m.verify_cost)} "
            f"| {fmt(m.bound, '{:.2f}x')} | {fmt(m.efficiency)} | {identical} | {diverged} "
            f"| {same_plain} | {m.error or ''} |"
        )
    if report.errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report.errors]
    stage_seconds = measures.get("stage_seconds", {})
    if stage_seconds:
        lines += ["", "## Stage times", ""]
        lines += [f"- {name}: {seconds:.1f} s" for name, seconds in stage_seconds.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specdecode.bench.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json/.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a smoke run in seconds")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated")
    parser.add_argument(
        "--full-dtypes",
        default="bfloat16",
        help="dtypes that run every mode; the others run the identity check's modes only",
    )
    parser.add_argument("-k", "--ks", default="4", help="draft lengths, comma-separated")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--eps", type=float, default=None, help="upper layers' output scale")
    parser.add_argument("--draft-layers", type=int, default=None)
    parser.add_argument(
        "--compile-backend", default="inductor", choices=["inductor", "cudagraphs", "eager"]
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, among {', '.join(MODES)} (default: all but plain-frozen)",
    )
    args = parser.parse_args(argv)
    spec = TINY if args.tiny else SyntheticSpec()
    if args.eps is not None:
        spec = dataclasses.replace(spec, eps=args.eps)
    if args.draft_layers is not None:
        spec = dataclasses.replace(spec, draft_layers=args.draft_layers)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "no CUDA device here: pass --device cpu (with --tiny for a smoke run)", file=sys.stderr
        )
        return 2
    report = run_synthetic(
        spec,
        device,
        args.out,
        dtypes=[d.strip() for d in args.dtypes.split(",") if d.strip()],
        full_dtypes=[d.strip() for d in args.full_dtypes.split(",") if d.strip()],
        ks=[int(k) for k in args.ks.split(",") if k.strip()],
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        compile_backend=args.compile_backend,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(render_markdown(report))
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
