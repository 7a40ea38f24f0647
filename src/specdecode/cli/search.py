"""``specdecode search``: find the sublayers to skip for self-speculation, or compare skip sets."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from specdecode.cli.common import add_model_args, load_target, target_spec
from specdecode.decoding import SpeculativeGenerator
from specdecode.errors import SearchError
from specdecode.models import LoadedModel
from specdecode.models.layerskip import SkipSet, check_supported
from specdecode.prompts import load_prompts
from specdecode.search.profile import (
    DraftSettings,
    Measurement,
    ModelIdentity,
    SkipProfile,
    load_profile,
)
from specdecode.search.space import SearchSpace, skip_of_params

HELP = "search the attention/MLP sublayers to skip for self-speculative decoding (Optuna)"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("search", help=HELP, description=HELP)
    add_model_args(p)
    _add_prompt_args(p)
    _add_search_args(p)
    _add_draft_args(p)
    _add_space_args(p)
    _add_output_args(p)
    p.set_defaults(run=run)


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration prompts")
    g.add_argument(
        "--prompts",
        required=True,
        type=Path,
        help="Spec-Bench JSONL (turns[0] is the prompt) or plain text, one prompt a line",
    )
    g.add_argument("--categories", default=None, help="comma-separated categories to keep")
    g.add_argument("--per-category", type=int, default=None, help="prompts kept per category")
    g.add_argument("--offset", type=int, default=0, help="prompts skipped first (per category)")
    g.add_argument("--limit", type=int, default=None, help="prompts kept in all")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search")
    g.add_argument(
        "--objective",
        default="modelled",
        choices=["modelled", "tokens-per-second"],
        help="modelled (default): speedup from measured acceptance and a measured cost model, "
        "free of timing noise; tokens-per-second: measured throughput",
    )
    g.add_argument("--sampler", default="tpe", choices=["tpe", "gp"], help="Optuna sampler")
    g.add_argument("--seed", type=int, default=0, help="sampler seed")
    g.add_argument(
        "--worker", type=int, default=0, help="index of this worker on a shared study (seeding)"
    )
    g.add_argument(
        "--trials", type=int, default=50, help="finished trials the study should hold in all"
    )
    g.add_argument("--timeout", type=float, default=None, help="seconds this run may search")
    g.add_argument("--no-prune", action="store_true", help="never stop a trial early")
    g.add_argument(
        "--no-warm-start", action="store_true", help="do not enqueue the known good skip sets"
    )
    g.add_argument(
        "--warm-start",
        action="append",
        default=[],
        type=Path,
        metavar="PROFILE",
        help="skip profile to try first (repeatable)",
    )
    g.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: sqlite:///specdecode-search.db here); "
        "postgresql://user@host/db to share a study between workers",
    )
    g.add_argument("--study-name", default=None, help="default: from the model and objective")
    g.add_argument("--resume", action="store_true", help="the study must exist already")
    g.add_argument(
        "--heartbeat",
        type=int,
        default=15,
        help="seconds between a trial's heartbeats; a trial silent for 4x this is retried",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_draft_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("drafting")
    g.add_argument(
        "-k", "--num-draft-tokens", type=int, default=8, help="most tokens drafted per round"
    )
    g.add_argument(
        "--draft-threshold",
        type=float,
        default=0.8,
        help="stop a draft when its top probability falls below this (initial value)",
    )
    g.add_argument("--fixed-k", action="store_true", help="always draft k tokens (no draft exit)")
    g.add_argument("--no-adaptive", action="store_true", help="keep the threshold fixed")
    g.add_argument(
        "--target-acceptance", type=float, default=0.9, help="acceptance rate the threshold seeks"
    )


def _add_space_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search space")
    g.add_argument("--keep-first", type=int, default=1, help="first layers never skipped")
    g.add_argument("--keep-last", type=int, default=1, help="last layers never skipped")
    g.add_argument("--min-skip-ratio", type=float, default=0.0, help="of all 2L sublayers")
    g.add_argument("--max-skip-ratio", type=float, default=1.0, help="of all 2L sublayers")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="search: best profile JSON (default: STUDY-NAME.json); compare: results JSON",
    )
    g.add_argument(
        "--no-final-eval",
        action="store_true",
        help="skip timing the best skip set against plain decoding after the search",
    )
    g.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="PROFILE",
        help="instead of searching: time PROFILE against no speculation, a random skip set of "
        "the same make-up and every other layer, on --prompts",
    )
    g.add_argument("--repeats", type=int, default=1, help="compare: timed runs per prompt")


# ----------------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = load_target(args)
    check_supported(target.model)
    prompts = _encoded_prompts(args, target)
    space = SearchSpace(
        target.num_layers,
        args.keep_first,
        args.keep_last,
        args.min_skip_ratio,
        args.max_skip_ratio,
    )
    if args.compare is not None:
        return _compare(args, target, prompts, space)
    return _search(args, target, prompts, space)


def _encoded_prompts(args: argparse.Namespace, target: LoadedModel) -> list[list[int]]:
    categories = args.categories.split(",") if args.categories else None
    prompts = load_prompts(
        args.prompts,
        categories,
        args.limit,
        offset=args.offset,
        per_category=args.per_category,
    )
    encoder = SpeculativeGenerator(target)
    return [encoder.encode(p.text, chat=args.chat) for p in prompts]


def _draft_settings(args: argparse.Namespace) -> DraftSettings:
    return DraftSettings(
        max_draft_tokens=args.num_draft_tokens,
        threshold=None if args.fixed_k else args.draft_threshold,
        adaptive=not args.no_adaptive,
        target_acceptance=args.target_acceptance,
    )


def _search(
    args: argparse.Namespace, target: LoadedModel, prompts: list[list[int]], space: SearchSpace
) -> int:
    from specdecode.search import study as st
    from specdecode.search.cost import calibrate

    settings = st.SearchSettings(
        objective=args.objective,
        sampler=args.sampler,
        seed=args.seed,
        worker=args.worker,
        trials=args.trials,
        timeout=args.timeout,
        max_new_tokens=args.max_new_tokens,
        draft=_draft_settings(args),
        prune=not args.no_prune,
        warm_start=not args.no_warm_start,
        heartbeat=args.heartbeat,
    )
    name = args.study_name or default_study_name(target, settings.objective)
    storage = st.make_storage(args.storage or "sqlite:///specdecode-search.db", args.heartbeat)
    fingerprint = st.fingerprint(target, prompts, space, settings)
    study = st.open_study(storage, name, settings, fingerprint, resume=args.resume)
    extra = [load_profile(path).skip for path in args.warm_start]
    st.enqueue_warm_starts(study, space, extra, builtin=settings.warm_start)
    context = typical_prompt(prompts)
    k = settings.draft.max_draft_tokens
    cost = st.cost_model_of(study, lambda: calibrate(target, context, k))
    objective = st.SkipObjective(target, prompts, space, settings, cost)
    with ProgressBar(args, settings.trials, len(st.finished_trials(study))) as bar:
        ran = st.run_search(study, objective, settings, on_trial=bar)
    best = st.best_trial(study)
    if best is None:
        raise SearchError(f"the study {name!r} has no complete trial yet: run more trials")
    out = args.out or Path(f"{name}.json")
    profile = _best_profile(args, target, prompts, settings, best, cost)
    profile.save(out)
    plots = _plots(study, target.num_layers, settings.objective, out)
    plots.append(_trials_json(study, out))
    _print_summary(name, ran, study, best, profile, out, plots)
    return 0


def _best_profile(
    args: argparse.Namespace,
    target: LoadedModel,
    prompts: list[list[int]],
    settings: Any,
    best: Any,
    cost: Any,
) -> SkipProfile:
    """The best trial as a profile; timed against plain decoding unless --no-final-eval."""
    from specdecode.search.evaluate import compare_skip_sets

    skip = skip_of_params(best.params)
    measured = None
    if not args.no_final_eval:
        rows = compare_skip_sets(
            target, {"searched": skip}, prompts, settings.max_new_tokens, settings.draft, cost
        )
        base, row = rows[0], rows[1]
        measured = Measurement(
            alpha=row.alpha,
            tau=row.tau,
            c=row.c,
            speedup=row.speedup,
            tokens_per_second=row.tokens_per_second,
            baseline_tokens_per_second=base.tokens_per_second,
            modelled_speedup=row.modelled_speedup,
            objective=settings.objective,
            prompts=len(prompts),
            max_new_tokens=settings.max_new_tokens,
            dtype=str(target.dtype).removeprefix("torch."),
        )
    return SkipProfile(
        model=ModelIdentity.of(target),
        attention=skip.attention,
        mlp=skip.mlp,
        draft=settings.draft,
        measured=measured,
    )


def _plots(study: Any, num_layers: int, objective: str, out: Path) -> list[Path]:
    from specdecode.search.plots import plot_history, plot_skip_frequency

    trials = study.get_trials(deepcopy=False)
    history = out.with_name(f"{out.stem}-history.png")
    skips = out.with_name(f"{out.stem}-skips.png")
    plot_history(trials, objective, history)
    plot_skip_frequency(trials, num_layers, skips)
    return [history, skips]


def _trials_json(study: Any, out: Path) -> Path:
    """Every finished trial's skip set and measurements, for a closer look."""
    from specdecode.search.study import finished_trials, trial_summary

    path = out.with_name(f"{out.stem}-trials.json")
    rows = [trial_summary(t) for t in finished_trials(study)]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def _print_summary(
    name: str, ran: int, study: Any, best: Any, profile: SkipProfile, out: Path, plots: list[Path]
) -> None:
    from specdecode.search.study import finished_trials

    skip = profile.skip
    print(f"study {name}: {len(finished_trials(study))} finished trials ({ran} in this run)")
    print(
        f"best: trial {best.number}, value {best.value:.3f}, skips {len(skip.attention)} "
        f"attention + {len(skip.mlp)} MLP of {2 * profile.model.num_layers} sublayers"
    )
    m = profile.measured
    if m is not None:
        alpha = "n/a" if m.alpha is None else f"{m.alpha:.2f}"
        c = "n/a" if m.c is None else f"{m.c:.2f}"
        print(
            f"measured on the calibration prompts: alpha {alpha}, tau {m.tau:.2f}, c {c}, "
            f"{m.tokens_per_second:.1f} tok/s vs {m.baseline_tokens_per_second:.1f} plain "
            f"(speedup {m.speedup:.2f}x)"
        )
    print(f"profile: {out}")
    print("plots and trials: " + ", ".join(str(p) for p in plots))
    print(f"use it: specdecode generate --target {profile.model.name} --skip-profile {out} PROMPT")


def _compare(
    args: argparse.Namespace, target: LoadedModel, prompts: list[list[int]], space: SearchSpace
) -> int:
    from specdecode.search.cost import calibrate
    from specdecode.search.evaluate import compare_skip_sets

    profile = load_profile(args.compare)
    profile.check_model(target)
    searched = profile.skip
    named: dict[str, SkipSet | None] = {
        "searched profile": searched,
        "random, same make-up": space.random_skip(
            len(searched.attention), len(searched.mlp), args.seed
        ),
        "every other layer": space.every_other_layer(),
    }
    draft = profile.draft
    cost = calibrate(target, typical_prompt(prompts), draft.max_draft_tokens)
    rows = compare_skip_sets(
        target, named, prompts, args.max_new_tokens, draft, cost, repeats=args.repeats
    )
    print(_table(rows))
    if args.out is not None:
        payload = {
            "target": target_spec(args),
            "profile": str(args.compare),
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "draft": asdict(draft),
            "cost_model": cost.to_dict(),
            "rows": [asdict(r) for r in rows],
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results: {args.out}", file=sys.stderr)
    return 0


def _table(rows: list[Any]) -> str:
    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "n/a" if x is None else format(x, spec)

    lines = [
        "| drafter | skipped (attn + MLP) | alpha | tau | c | tok/s | speedup | modelled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        size = "-" if r.skip_attention is None else f"{len(r.skip_attention)} + {len(r.skip_mlp)}"
        lines.append(
            f"| {r.name} | {size} | {fmt(r.alpha)} | {r.tau:.2f} | {fmt(r.c)} | "
            f"{r.tokens_per_second:.2f} | {r.speedup:.2f}x | {fmt(r.modelled_speedup)} |"
        )
    return "\n".join(lines)


def typical_prompt(prompts: list[list[int]]) -> list[int]:
    """The prompt of median length: the context the cost model is timed at."""
    return sorted(prompts, key=len)[len(prompts) // 2]


def default_study_name(target: LoadedModel, objective: str) -> str:
    """``skip-<model>-<config hash>-<objective>``: rerunning the same command resumes."""
    stem = Path(target.name.rstrip("/")).name or "model"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-").lower()
    return f"skip-{slug}-{target.config_hash()[:8]}-{objective}"


class ProgressBar:
    """A tqdm bar over the study's finished trials; called with each SearchProgress."""

    def __init__(self, args: argparse.Namespace, total: int, initial: int) -> None:
        self.disable = args.no_progress
        self.total, self.initial = total, initial

    def __enter__(self) -> ProgressBar:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=self.initial, unit="trial", disable=self.disable)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def __call__(self, progress: Any) -> None:
        self.bar.n = min(progress.finished, self.total)
        best = "n/a" if progress.best_value is None else f"{progress.best_value:.3f}"
        self.bar.set_postfix(best=best, last=progress.last_state.lower())
        self.bar.refresh()
