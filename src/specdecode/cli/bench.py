"""``specdecode bench``: our decoding beside transformers', on the same prompts, in one run."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from specdecode.bench import (
    MODE_NAMES,
    REFERENCE,
    BenchCase,
    BenchOptions,
    BenchReport,
    Mismatch,
    ModeConfig,
    Record,
    available_modes,
    run_benchmark,
    select_modes,
    standard_modes,
    write_report,
)
from specdecode.bench.stats import ALL
from specdecode.cli.common import (
    add_draft_forward,
    add_model_args,
    add_sampling_args,
    draft_forward,
    draft_kernels,
    draft_spec,
    load_target,
    prompt_window,
    sampling_kwargs,
    session_kind,
    target_spec,
)
from specdecode.decoding import SpeculativeGenerator
from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel, check_same_vocabulary, draft_dtype_for, load_model
from specdecode.prompts import load_prompts
from specdecode.search.profile import SkipProfile, load_profile

HELP = "time our speculative decoding beside transformers' on the same prompts and models"
DEFAULT_MAX_NEW_TOKENS = 128
IDENTITY_FAILED = 1  # exit status when an output differs from the reference (greedy)
UNCATEGORIZED = "prompts"  # the category of prompts whose file gives none (plain text)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help=HELP,
        description=HELP,
        epilog=f"Here --max-new-tokens defaults to {DEFAULT_MAX_NEW_TOKENS} and sampling is "
        "greedy unless --temperature > 0 (greedy runs check every output against transformers' "
        "plain generate). The method and the columns: docs/benchmarks.md.",
    )
    add_model_args(p)
    _add_draft_args(p)
    _add_prompt_args(p)
    add_sampling_args(p)
    p.set_defaults(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, prompt_lookup=False)
    run = p.add_argument_group("run")
    run.add_argument(
        "--modes",
        type=_comma_list,
        default=None,
        help=f"comma-separated subset of {', '.join(MODE_NAMES)} (default: all that the given "
        f"models allow; {REFERENCE} always runs, it is the reference)",
    )
    run.add_argument("--warmup", type=int, default=1, help="warm-up runs of every mode (default 1)")
    run.add_argument("--repeats", type=int, default=1, help="timed runs per mode and prompt")
    run.add_argument(
        "--cost-repeats", type=int, default=5, help="repetitions of each single-step timing"
    )
    run.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(run=run_bench)


def _add_draft_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("drafting (modes needing a model that is not given are left out)")
    group.add_argument("--draft", help="draft model sharing the target's tokenizer")
    group.add_argument(
        "--draft-dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16", "int8"],
        help="draft model precision (default: int8 next to a float32 target on the CPU, else "
        "the target's; int8: dynamic quantization, CPU only)",
    )
    add_draft_forward(group)
    group.add_argument(
        "--skip-profile",
        help="layer-skip profile (from `specdecode search`): adds the ours-layer-skip mode, "
        "drafting with the profile's skip set, draft exit and k",
    )
    group.add_argument(
        "-k", "--num-draft-tokens", type=int, default=5, help="our draft model: tokens per round"
    )
    group.add_argument(
        "--draft-schedule",
        default="auto",
        choices=["constant", "heuristic", "auto"],
        help="our drafters: auto (default: the k the measured costs say pays best; "
        "docs/speed.md), constant k, or transformers' heuristic (+2 / -1)",
    )
    group.add_argument(
        "--confidence-stop",
        action="store_true",
        help="auto schedule: end drafts by the draft's confidence (experimental)",
    )
    group.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        help="our draft model: stop drafting below this probability",
    )
    group.add_argument(
        "--draft-prompt-window",
        type=prompt_window,
        default=None,
        metavar="N",
        help="our draft model: read only the last N prompt tokens (docs/speed.md)",
    )
    group.add_argument(
        "--lookup-tokens", type=int, default=10, help="all prompt lookups: tokens per draft"
    )
    group.add_argument(
        "--ngram-max", type=int, default=3, help="our prompt lookups: longest n-gram"
    )
    group.add_argument(
        "--ngram-min",
        type=int,
        default=None,
        help="our prompt lookups: shortest n-gram (default 1 alone, 2 in front of the draft)",
    )


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("prompts")
    group.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="Spec-Bench-style JSONL (question_id, category, turns) or plain text, one prompt a "
        "line (default: the built-in code, chat and rewrite prompts)",
    )
    group.add_argument(
        "--categories", type=_comma_list, default=None, help="comma-separated categories to keep"
    )
    group.add_argument("--limit", type=int, default=None, help="prompts per category")
    group.add_argument(
        "--offset",
        type=int,
        default=0,
        help="prompts skipped first in each category (e.g. those a skip profile was searched on)",
    )
    group.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def builtin_prompts() -> Path:
    """The prompts shipped with specdecode (code, chat and rewrite categories)."""
    return Path(str(resources.files("specdecode") / "data" / "bench_prompts.jsonl"))


# ----------------------------------------------------------------------------------- running
def run_bench(args: argparse.Namespace) -> int:
    _check_args(args)
    target = load_target(args, keep_torch_kernels=True)  # transformers' modes run on torch's
    draft = _load_draft(args, target)
    profile = _layer_skip(args)
    layer_skip = None if profile is None else profile.drafter(target)
    names = select_modes(args.modes, available_modes(draft, layer_skip))
    config = _mode_config(args, profile)
    modes = standard_modes(target, names, config, draft=draft, layer_skip=layer_skip)
    cases = load_cases(args, target)
    total = len(cases) * len(modes) * args.repeats
    print(
        f"bench: {len(cases)} prompts x {len(modes)} modes x {args.repeats} repeats "
        f"(+ warm-up {args.warmup}): {', '.join(names)}",
        file=sys.stderr,
    )
    with tqdm(total=total, desc="bench", unit="gen", file=sys.stderr) as bar:
        progress = Progress(bar)
        report = run_benchmark(
            target,
            modes,
            cases,
            sampling_kwargs(args),
            BenchOptions(args.warmup, args.repeats, _seed(args), args.cost_repeats),
            _settings(args, target, draft, config),
            on_record=progress.record,
            on_mismatch=progress.mismatch,
        )
    files = write_report(report, args.out, plots=not args.no_plots)
    print(_overview(report))
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return _identity_verdict(report)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("repeats", "cost_repeats"):
        if getattr(args, name) < 1:
            raise InvalidSettingsError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise InvalidSettingsError("--warmup must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise InvalidSettingsError("--limit must be >= 1")
    if args.offset < 0:
        raise InvalidSettingsError("--offset must be >= 0")


def _load_draft(args: argparse.Namespace, target: LoadedModel) -> LoadedModel | None:
    name = draft_spec(args)
    if name is None:
        return None
    draft = load_model(
        name,
        dtype=draft_dtype_for(target, args.draft_dtype),
        device=str(target.device),
        threads=args.threads,
        kernels=draft_kernels(args),
        keep_torch_kernels=True,
        session_kind=session_kind(args),
        forward=draft_forward(args),
    )
    check_same_vocabulary(target.tokenizer, draft.tokenizer)
    return draft


def _layer_skip(args: argparse.Namespace) -> SkipProfile | None:
    """The skip profile given (checked against the target when its drafter is built)."""
    return None if args.skip_profile is None else load_profile(args.skip_profile)


def _mode_config(args: argparse.Namespace, profile: SkipProfile | None) -> ModeConfig:
    return ModeConfig(
        k=args.num_draft_tokens,
        layer_skip_k=None if profile is None else profile.draft.max_draft_tokens,
        schedule=args.draft_schedule,
        confidence_stop=args.confidence_stop,
        confidence_threshold=args.confidence_threshold,
        draft_prompt_window=args.draft_prompt_window,
        lookup_tokens=args.lookup_tokens,
        ngram_max=args.ngram_max,
        ngram_min=args.ngram_min,
    )


def _seed(args: argparse.Namespace) -> int:
    return 0 if args.seed is None else int(args.seed)


def load_cases(args: argparse.Namespace, target: LoadedModel) -> list[BenchCase]:
    """The prompts asked for, encoded once (chat template or not) for every mode alike."""
    path = args.prompts if args.prompts is not None else builtin_prompts()
    per_category = args.limit if args.limit is not None else sys.maxsize
    prompts = load_prompts(
        path, categories=args.categories, per_category=per_category, offset=args.offset
    )
    encoder = SpeculativeGenerator(target)
    return [
        BenchCase(
            prompt_id=p.id or str(index + 1),
            category=p.category or UNCATEGORIZED,
            prompt_ids=encoder.encode(p.text, chat=args.chat),
        )
        for index, p in enumerate(prompts)
    ]


def _settings(
    args: argparse.Namespace, target: LoadedModel, draft: LoadedModel | None, config: ModeConfig
) -> dict[str, Any]:
    return {
        "target": target_spec(args),
        "draft": None if draft is None else draft.name,
        "skip_profile": args.skip_profile,
        "dtype": str(target.dtype).removeprefix("torch."),
        "draft_dtype": None if draft is None else str(draft.dtype).removeprefix("torch."),
        "device": str(target.device),
        "threads": torch.get_num_threads(),
        "prompts": str(args.prompts) if args.prompts is not None else "built-in",
        "categories": args.categories,
        "limit": args.limit,
        "offset": args.offset,
        "chat": args.chat,
        "generation": {k: v for k, v in sampling_kwargs(args).items() if v is not None},
        "seed": _seed(args),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "cost_repeats": args.cost_repeats,
        "mode_config": config.to_dict(),
    }


class Progress:
    """Feeds the progress bar: running aggregate speedup of each mode over the reference."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.tokens: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def record(self, rec: Record) -> None:
        self.tokens[rec.mode] = self.tokens.get(rec.mode, 0) + rec.new_tokens
        self.seconds[rec.mode] = self.seconds.get(rec.mode, 0.0) + rec.seconds
        self.bar.update(1)
        self.bar.set_postfix_str(self.figures(), refresh=False)

    def figures(self) -> str:
        rate = {m: self.tokens[m] / s for m, s in self.seconds.items() if s > 0}
        ref = rate.get(REFERENCE)
        if not ref:
            return ""
        parts = [f"ref {ref:.1f} tok/s"]
        parts += [f"{m} {r / ref:.2f}x" for m, r in rate.items() if m != REFERENCE]
        return ", ".join(parts)

    def mismatch(self, m: Mismatch) -> None:
        self.bar.write(f"specdecode bench: NOT TOKEN-IDENTICAL: {m.describe()}", file=sys.stderr)


def _overview(report: BenchReport) -> str:
    lines = ["mode                        tok/s med.  speedup med.  speedup agg.  identical"]
    for s in report.summaries:
        if s.category != ALL:
            continue
        same = "n/a" if s.identical is None else ("yes" if s.identical else "NO")
        lines.append(
            f"{s.mode:<27} {s.tokens_per_second_median:>10.2f}  {s.speedup_median:>11.2f}x"
            f"  {s.speedup_aggregate:>11.2f}x  {same}"
        )
    return "\n".join(lines)


def _identity_verdict(report: BenchReport) -> int:
    mismatches = report.run.mismatches
    if not mismatches:
        return 0
    print(
        f"specdecode bench: NOT TOKEN-IDENTICAL: {len(mismatches)} generation(s) differ from "
        f"{REFERENCE}:",
        file=sys.stderr,
    )
    for m in mismatches:
        print(f"  {m.describe()}", file=sys.stderr)
    return IDENTITY_FAILED
