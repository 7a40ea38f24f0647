"""Where one decoding pass's time goes: matrix products, attention, other kernels, the host.

The synthetic GPU benchmark says how far plain decoding is from the memory-bandwidth limit; this
profile says why. It runs passes of a few sizes (1 token: a decoding step; k + 1: a
verification pass) on a model's own kind of session, times them with the device synchronised,
and reads torch's profiler to split the device's kernel time into three groups:

- ``matmul``: the linear layers' products (cuBLAS/nvjet/CUTLASS kernels on a GPU, ``mm``,
  ``addmm``, ``linear`` and oneDNN's ops on a CPU). For a 1-token pass, the weight bytes over
  this time is the bandwidth the products reach;
- ``attention``: the attention kernels (SDPA, flash, cuDNN);
- ``other``: norms, rotary embeddings, activations, cache writes, copies.

What the kernels do not cover of a pass's wall time is ``host``: Python, launches, the
synchronisation that reads the result, the device waiting for the host. On a CPU the "kernels"
are torch's operators, which run on the host, so ``host`` is what lies outside them.

    python -m specdecode.bench.step_profile --device cuda --out results/profile
    python -m specdecode.bench.step_profile --model qwen2.5-coder-1.5b --threads 2 --out /tmp/p
    python -m specdecode.bench.step_profile --tiny --device cpu --out /tmp/p   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import DeviceType, ProfilerActivity, profile

from specdecode.models import LoadedModel
from specdecode.models.session import Session
from specdecode.models.timing import median_time, synchronize

log = logging.getLogger(__name__)

GROUPS = ("matmul", "attention", "other")
# inductor's generated pointwise/reduction kernels are named after every op they fused (a copy
# "fused__scaled_dot_product_..._attention", a bias "fused_addmm_gelu"): they are "other" work
_FUSED_POINTWISE = re.compile(r"^triton_(poi|red|per)_")
_MATMUL = re.compile(
    r"gemm|gemv|nvjet|cublas|cutlass|splitk|(?<![a-z])b?mm(?![a-z])|addmm|linear|matmul|mkldnn"
    r"|onednn|quantized::"
)
_ATTENTION = re.compile(r"attention|sdpa|flash|fmha")
# Wrappers whose time is their children's: counting them would count a kernel twice.
_WRAPPERS = re.compile(r"^(## Call CompiledFxGraph|CompiledFunction|Torch-Compiled Region)")
# On a CPU only operators count as kernels, not Python or profiler ranges.
_CPU_OPERATORS = ("aten::", "mkldnn", "quantized::")


def kernel_group(name: str) -> str:
    """The group of a kernel or operator, by its name (see the module's docstring)."""
    lowered = name.lower()
    if _FUSED_POINTWISE.match(lowered):
        return "other"
    if _ATTENTION.search(lowered):
        return "attention"
    if _MATMUL.search(lowered):
        return "matmul"
    return "other"


@dataclass
class PassProfile:
    """One pass size: its wall time and its kernels' time by group, per pass."""

    tokens: int
    wall_seconds: float  # median of the timed passes, device synchronised
    profiled_seconds: float  # mean wall time of the profiled passes, which the groups split
    kernel_seconds: dict[str, float] = field(default_factory=dict)  # per pass, by group
    top_kernels: list[tuple[str, float]] = field(default_factory=list)  # per pass, longest first

    @property
    def kernel_total(self) -> float:
        return sum(self.kernel_seconds.values())

    @property
    def host_seconds(self) -> float:
        """Time of the profiled passes that no kernel covers (never negative: kernels may
        overlap on a CPU). Taken from the same passes as the kernels, so that a change of load
        between the timed and the profiled passes does not show up as host time."""
        return max(0.0, self.profiled_seconds - self.kernel_total)


@dataclass
class StepProfileReport:
    model: str
    device: str
    dtype: str
    session: str
    context_tokens: int
    weight_bytes: int
    passes: list[PassProfile] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def matmul_bandwidth(self, tokens: int = 1) -> float | None:
        """Weight bytes per second of the products of a ``tokens`` pass (each reads every weight
        once), or None if that size was not profiled."""
        for item in self.passes:
            if item.tokens == tokens and item.kernel_seconds.get("matmul", 0.0) > 0:
                return self.weight_bytes / item.kernel_seconds["matmul"]
        return None


def _event_seconds(event: Any, on_device: bool) -> float:
    micros = event.self_device_time_total if on_device else event.self_cpu_time_total
    return float(micros) / 1e6


def profile_passes(
    session: Session,
    context: Sequence[int],
    sizes: Sequence[int] = (1, 5),
    repetitions: int = 10,
    device: torch.device | None = None,
) -> list[PassProfile]:
    """Time and profile passes of each size in ``sizes`` after ``context``, rolling each back.

    ``session`` must be empty; it is left holding ``context``. Every size is first run the
    session's ``warmup_passes`` times (compiled sessions record a CUDA graph per shape) and then
    ``repetitions`` times for the wall time and ``repetitions`` times under the profiler.
    """
    if not context:
        raise ValueError("profile_passes needs a non-empty context")
    if repetitions < 1:
        raise ValueError(f"repetitions must be at least 1, got {repetitions}")
    if not sizes or min(sizes) < 1 or max(sizes) > len(context):
        raise ValueError(
            f"sizes must be in [1, {len(context)}] (the context's length), got {sizes}"
        )
    device = device or torch.device("cpu")
    on_device = device.type != "cpu"
    session.reserve(len(context) + max(sizes) + 32)
    session.forward(list(context), 1)
    length = session.length
    results = []
    for size in sizes:
        ids = list(context[-size:])

        def one_pass(ids: list[int] = ids, size: int = size) -> None:
            session.forward(ids, size)
            session.truncate(length)

        wall = median_time(one_pass, repetitions, device, warmup=max(1, session.warmup_passes))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(repetitions):
                one_pass()
                synchronize(device)  # as the timed passes: each waits for its kernels
            profiled = (time.perf_counter() - start) / repetitions
        groups = dict.fromkeys(GROUPS, 0.0)
        by_name: dict[str, float] = {}
        for event in prof.events():
            is_device = event.device_type != DeviceType.CPU
            if is_device != on_device or _WRAPPERS.match(event.name):
                continue
            if getattr(event, "is_user_annotation", False):  # a range around kernels
                continue
            if not on_device and not event.name.startswith(_CPU_OPERATORS):
                continue
            seconds = _event_seconds(event, on_device) / repetitions
            groups[kernel_group(event.name)] += seconds
            by_name[event.name] = by_name.get(event.name, 0.0) + seconds
        top = sorted(by_name.items(), key=lambda item: -item[1])[:12]
        results.append(PassProfile(size, wall, profiled, groups, top))
    return results


def profile_model(
    loaded: LoadedModel, context: Sequence[int], sizes: Sequence[int], repetitions: int
) -> StepProfileReport:
    from specdecode.bench.synthetic import weight_bytes

    session = loaded.new_session()
    report = StepProfileReport(
        model=loaded.name,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        session=type(session).__name__ + f" ({loaded.session_kind}, {loaded.forward_name} forward)",
        context_tokens=len(context),
        weight_bytes=weight_bytes(loaded.model),
    )
    report.passes = profile_passes(
        session, context, sizes, repetitions, torch.device(loaded.device)
    )
    return report


def render_markdown(report: StepProfileReport) -> str:
    ms = 1e3
    lines = [
        f"# Where a pass's time goes: {report.model}",
        "",
        f"- device: {report.device}, dtype {report.dtype}, session {report.session}",
        f"- context: {report.context_tokens} tokens; weights a pass reads: "
        f"{report.weight_bytes / 1e9:.3f} GB",
    ]
    lines += [f"- {key}: {value}" for key, value in report.environment.items()]
    bandwidth = report.matmul_bandwidth(1)
    if bandwidth is not None:
        lines.append(
            f"- the 1-token pass's products read the weights at {bandwidth / 1e9:.0f} GB/s"
        )
    lines += [
        "",
        "Per pass, milliseconds. wall: median of the timed passes; profiled: the mean of the",
        "profiled passes, which the next columns split (kernel time from torch's profiler; host:",
        "what no kernel covers).",
        "",
        "| tokens | wall | profiled | matmul | attention | other kernels | host |",
        "|---|---|---|---|---|---|---|",
    ]
    for item in report.passes:
        k = item.kernel_seconds
        lines.append(
            f"| {item.tokens} | {item.wall_seconds * ms:.3f} | {item.profiled_seconds * ms:.3f} | "
            f"{k['matmul'] * ms:.3f} | "
            f"{k['attention'] * ms:.3f} | {k['other'] * ms:.3f} | {item.host_seconds * ms:.3f} |"
        )
    for item in report.passes:
        lines += ["", f"Longest kernels of the {item.tokens}-token pass (ms per pass):", ""]
        lines += [f"- {seconds * ms:.3f} {name[:100]}" for name, seconds in item.top_kernels]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from specdecode.bench.synthetic import TINY, SyntheticSpec, build_pair

    parser = argparse.ArgumentParser(
        prog="python -m specdecode.bench.step_profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for profile.{json,md}")
    parser.add_argument(
        "--model", default=None, help="a model to load; default: the synthetic 1.1B target"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU"
    )
    parser.add_argument(
        "--kv-cache",
        default=None,
        choices=["dynamic", "static", "compiled"],
        help="the session kind; default: compiled on a GPU, dynamic on a CPU",
    )
    parser.add_argument(
        "--forward",
        default="transformers",
        choices=["transformers", "lean"],
        help="with --model on a dynamic session: transformers' forward (default) or our lean "
        "one (specdecode.models.lean, what draft models run)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny synthetic model: a smoke run")
    parser.add_argument("--sizes", default="1,5", help="pass sizes in tokens, comma-separated")
    parser.add_argument("--context", type=int, default=128, help="tokens before the passes")
    parser.add_argument("--repetitions", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        sizes = [int(part) for part in args.sizes.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1 or max(sizes) > args.context:
        parser.error(f"--sizes must be in [1, --context={args.context}], got {args.sizes!r}")
    if args.repetitions < 1:
        parser.error(f"--repetitions must be at least 1, got {args.repetitions}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; pass --device cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtypes = ("float32", "bfloat16", "float16") + (("int8",) if args.model else ())
    if dtype_name not in dtypes:
        parser.error(f"--dtype must be one of {', '.join(dtypes)}, got {dtype_name!r}")
    kind = args.kv_cache or ("compiled" if device.type == "cuda" else "dynamic")
    if args.forward == "lean" and (kind != "dynamic" or not args.model):
        parser.error("--forward lean needs --model and a dynamic session (--kv-cache dynamic)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from specdecode.models import load_model

        loaded = load_model(
            args.model,
            dtype=dtype_name,
            device=args.device,
            session_kind=kind,
            forward=args.forward,
        )
        vocab = loaded.model.config.vocab_size
    else:
        spec = TINY if args.tiny else SyntheticSpec()
        loaded, _ = build_pair(spec, device, getattr(torch, dtype_name), session_kind=kind)
        vocab = spec.vocab_size
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(10, min(vocab, 30000), (args.context,), generator=generator).tolist()
    log.info("profiling %s on %s (%s, %s session)", loaded.name, device, dtype_name, kind)
    report = profile_model(loaded, context, sizes, args.repetitions)
    report.environment = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        report.environment["gpu"] = torch.cuda.get_device_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(asdict(report), indent=1))
    markdown = render_markdown(report)
    (args.out / "profile.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
