"""``specdecode generate``: text from a prompt, streamed, with speculation statistics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from specdecode.cli.common import (
    add_drafter_args,
    add_model_args,
    add_sampling_args,
    build_drafter,
    build_schedule,
    load_target,
    sampling_kwargs,
)
from specdecode.constraints import Grammar
from specdecode.decoding import FinishEvent, GenerationResult, SpeculativeGenerator, sample_seed
from specdecode.errors import GrammarError, InvalidSettingsError, PromptError

HELP = "generate text from a prompt (greedy by default), optionally with a drafter"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP)
    p.add_argument("prompt", nargs="?", help="the prompt (default: read from standard input)")
    add_model_args(p)
    add_drafter_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument(
        "-n", "--num-samples", type=int, default=1, help="independent samples (one seed each)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    penalties = p.add_argument_group(
        "the OpenAI API's processors (greedy decoding follows them too)"
    )
    penalties.add_argument(
        "--presence-penalty",
        type=float,
        default=None,
        help="subtracted from the logit of every token already generated (0 off)",
    )
    penalties.add_argument(
        "--frequency-penalty",
        type=float,
        default=None,
        help="subtracted per earlier occurrence of the token in the output (0 off)",
    )
    penalties.add_argument(
        "--logit-bias",
        action="append",
        default=None,
        metavar="ID=BIAS",
        help="add BIAS to token ID's logit (repeatable; -100 bans it, 100 forces it)",
    )
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="each new token's log-probability under the target (raw, before temperature and "
        "truncation) and its N most likely alternatives: in the JSON output with --json, "
        "else as a table on standard error after the text",
    )
    add_grammar_args(p)
    p.set_defaults(run=run)


def add_grammar_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "constrained output (one of; the output is the target's among what is allowed, "
        "drafted or not)"
    ).add_mutually_exclusive_group()
    group.add_argument(
        "--json-object", action="store_true", help="the output is one JSON object (any keys)"
    )
    group.add_argument(
        "--json-schema",
        metavar="SCHEMA",
        help="the output is JSON valid under this JSON schema: a .json file or the schema itself",
    )
    group.add_argument(
        "--regex", metavar="PATTERN", help="the whole output matches this regular expression"
    )
    group.add_argument(
        "--grammar", metavar="FILE", help="the output follows this Lark grammar (a .lark file)"
    )
    group.add_argument(
        "--choice",
        action="append",
        metavar="TEXT",
        help="the output is exactly one of these strings (repeat the option for each)",
    )


def grammar_from_args(args: argparse.Namespace) -> Grammar | None:
    """The grammar the constrained-output options ask for, or None."""
    if args.json_object:
        return Grammar.json_object()
    if args.json_schema is not None:
        text = str(args.json_schema)
        if not text.lstrip().startswith(("{", "true", "false")):
            text = _read_text(text, "--json-schema")
        return Grammar.json_schema(text)
    if args.regex is not None:
        return Grammar.regex(args.regex)
    if args.grammar is not None:
        return Grammar.lark(_read_text(args.grammar, "--grammar"))
    if args.choice:
        return Grammar.choice(args.choice)
    return None


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GrammarError(
            f"{option}: cannot read {path!r} ({exc.strerror}): give a file or the text itself"
        ) from exc


def penalty_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    bias: dict[int, float] = {}
    for item in args.logit_bias or ():
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise InvalidSettingsError(
                f"--logit-bias takes ID=BIAS, e.g. --logit-bias 50256=-100, got {item!r}"
            ) from None
        if not sep:
            raise InvalidSettingsError(f"--logit-bias takes ID=BIAS, got {item!r}")
    return {
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "logit_bias": bias or None,
    }


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return str(args.prompt)
    if sys.stdin is None or sys.stdin.isatty():
        raise PromptError("no prompt: pass it as an argument or on standard input")
    return sys.stdin.read()


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise InvalidSettingsError(f"--num-samples must be >= 1, got {args.num_samples}")
    prompt = _read_prompt(args)
    if not prompt.strip():
        raise PromptError("the prompt is empty: give some text to continue")
    grammar = grammar_from_args(args)  # a bad schema file fails before the model loads
    target = load_target(args)
    generator = SpeculativeGenerator(target, build_drafter(args, target), build_schedule(args))
    kwargs = {**sampling_kwargs(args), **penalty_kwargs(args), "grammar": grammar}
    greedy = not args.temperature
    base_seed = args.seed if args.seed is not None else _fresh_seed()
    results: list[GenerationResult] = []
    for index in range(args.num_samples):
        seed = sample_seed(base_seed, index)
        if not args.json and args.num_samples > 1:
            print(f"--- sample {index + 1}" + ("" if greedy else f" (seed {seed})") + " ---")
        results.append(_one(generator, prompt, args, kwargs, seed, stream_text=not args.json))
    if args.json:
        payload: dict[str, Any] = results[0].to_dict() if len(results) == 1 else {}
        if len(results) > 1:
            payload = {"samples": [r.to_dict() for r in results]}
        print(json.dumps(payload))
    return 0


def _one(
    generator: SpeculativeGenerator,
    prompt: str,
    args: argparse.Namespace,
    kwargs: dict[str, Any],
    seed: int,
    stream_text: bool,
) -> GenerationResult:
    events = generator.stream(prompt, chat=args.chat, seed=seed, logprobs=args.logprobs, **kwargs)
    for event in events:
        if stream_text and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if isinstance(event, FinishEvent):
            if stream_text:
                sys.stdout.write("\n")
                print(summary_line(event.result), file=sys.stderr)
                if event.result.logprobs is not None:
                    print(logprob_table(generator, event.result), file=sys.stderr)
            return event.result
    raise RuntimeError("generation ended without a result")  # pragma: no cover


def summary_line(result: GenerationResult) -> str:
    s = result.stats
    alpha = "n/a" if s.alpha is None else f"{s.alpha:.2f}"
    return (
        f"[{s.new_tokens} tokens in {s.total_seconds:.2f}s, {s.tokens_per_second:.1f} tok/s, "
        f"tau {s.tau:.2f}, alpha {alpha}, finish: {result.finish_reason}]"
    )


def logprob_table(generator: SpeculativeGenerator, result: GenerationResult) -> str:
    """One line per new token: the token, its log-probability, the alternatives asked for."""

    def show(token_id: int) -> str:
        return repr(generator.target.tokenizer.decode([token_id]))

    lines = []
    for lp in result.logprobs or ():
        others = "  ".join(f"{show(t)} {v:.3f}" for t, v in lp.top)
        line = f"{show(lp.token_id):>16} {lp.logprob:9.4f}"
        lines.append(f"{line}  | {others}" if others else line)
    return "\n".join(lines)


def _fresh_seed() -> int:
    import secrets

    return secrets.randbits(63)
