"""Arguments shared by several subcommands: models, sampling, drafting."""

from __future__ import annotations

import argparse
from typing import Any

from specdecode.drafters import (
    Drafter,
    LookupDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    make_schedule,
)
from specdecode.drafters.schedule import SCHEDULES, DraftLength
from specdecode.errors import InvalidSettingsError
from specdecode.models import LoadedModel, check_same_vocabulary, draft_dtype_for, load_model
from specdecode.models.kernels import AUTO, KERNEL_CHOICES, ONEDNN
from specdecode.models.loading import (
    AUTO_FORWARD,
    DYNAMIC,
    FORWARD_CHOICES,
    LEAN_FORWARD,
    SESSION_KINDS,
    TRANSFORMERS_FORWARD,
)
from specdecode.models.registry import DEFAULT_DRAFT, DEFAULT_TARGET

DEFAULT_K = 5  # tokens drafted per round when neither -k nor a skip profile says


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--target",
        default=None,
        help="target model: a name from `specdecode models list` (pulled on first use), a local "
        f"HF folder, a .gguf file, or a hub id (hub needs network). Default: {DEFAULT_TARGET} "
        f"with draft {DEFAULT_DRAFT} unless another drafter option is given",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' precision (auto: float32 on CPU, bfloat16 on GPU)",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    group.add_argument(
        "--cpu-kernels",
        default="auto",
        choices=list(KERNEL_CHOICES),
        help="linear-layer kernels on the CPU: auto (default) = oneDNN on weights packed once, "
        "for float32/bfloat16 models, where a verification pass of up to 6 tokens costs about "
        "one plain step (8-16: 1.2-1.5; torch's default costs about two); torch = torch's "
        "defaults",
    )
    group.add_argument(
        "--kv-cache",
        default=DYNAMIC,
        choices=list(SESSION_KINDS),
        help="how decoding holds the KV cache: dynamic (default) = grown as needed, rollback "
        "free; static = preallocated; compiled = static, with decoding and verification passes "
        "through torch.compile (CUDA graphs on a GPU; the first passes of each size compile). "
        "Layer skipping needs dynamic",
    )


def add_drafter_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "drafting (none of these: plain decoding, or the default pair when --target is not given)"
    )
    which = group.add_mutually_exclusive_group()
    which.add_argument(
        "--draft", help="draft model sharing the target's tokenizer (folder/.gguf/id)"
    )
    which.add_argument(
        "--skip-profile",
        help="self-speculation: draft with the target itself, skipping the sublayers of this "
        "profile (from `specdecode search`), with its draft exit and k (unless -k is given)",
    )
    group.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="draft by n-gram lookup in prompt and output; with --draft or --skip-profile, "
        "lookup first and the model where lookup finds nothing worth verifying (copy-heavy "
        "text: summaries, RAG, code edits; docs/speed.md)",
    )
    group.add_argument(
        "--draft-dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16", "int8"],
        help="draft model precision (default: int8 next to a float32 target on the CPU, else "
        "the target's; int8: dynamic quantization of its Linear layers, CPU only); never "
        "changes the output, only speed and acceptance",
    )
    add_draft_forward(group)
    group.add_argument(
        "-k",
        "--num-draft-tokens",
        type=int,
        default=None,
        help=f"tokens drafted per round, initial k (default: the skip profile's, else {DEFAULT_K})",
    )
    group.add_argument(
        "--draft-schedule",
        default="auto",
        choices=list(SCHEDULES),
        help="auto (default): the k the measured costs and acceptance say pays best, none where "
        "nothing pays (measures the target's pass costs once per machine; docs/speed.md); "
        "constant k; or transformers' heuristic (+2 after a full accept, -1 otherwise)",
    )
    group.add_argument(
        "--confidence-stop",
        action="store_true",
        help="auto schedule: draft up to 16 tokens and end each draft where, by the draft's "
        "confidence and the measured costs, one more token stops paying (experimental)",
    )
    group.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        help="draft model: stop drafting when its probability of a token falls below this",
    )
    group.add_argument(
        "--draft-prompt-window",
        type=prompt_window,
        default=None,
        metavar="N",
        help="draft model: read only the last N prompt tokens (and all generated ones), so its "
        "prefill of a long prompt costs less; lossless, changes acceptance only. Measured: "
        "1.08-1.11x with N=256 on RAG prompts with short answers (1.02-1.21x with N=128-256), "
        "0.66-0.93x on summarization (docs/speed.md)",
    )
    group.add_argument("--ngram-max", type=int, default=3, help="prompt lookup: longest n-gram")
    group.add_argument(
        "--ngram-min",
        type=int,
        default=None,
        help="prompt lookup: shortest n-gram (default 1 alone, 2 in front of a model)",
    )
    group.add_argument(
        "--lookup-tokens",
        type=int,
        default=LookupDrafter.DEFAULT_LOOKUP_TOKENS,
        help="prompt lookup in front of a model: the most tokens a lookup draft holds (it "
        f"costs no draft step; default {LookupDrafter.DEFAULT_LOOKUP_TOKENS}). Alone, lookup "
        "drafts -k tokens",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling (unset values come from the model's generation_config, then transformers' "
        "defaults, as in transformers' generate)"
    )
    group.add_argument("--max-new-tokens", type=int, default=None, help="default: model's, or 256")
    group.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 or unset: greedy (unlike transformers, which follows the model's do_sample); "
        "> 0: sampling at this temperature",
    )
    group.add_argument(
        "--top-k", type=int, default=None, help="when sampling (transformers' default 50; 0 off)"
    )
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    group.add_argument("--min-p", type=float, default=None, help="min-p filtering in [0, 1]")
    group.add_argument("--repetition-penalty", type=float, default=None, help="CTRL penalty, > 0")
    group.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    group.add_argument(
        "--sampling-mode",
        default="auto",
        choices=["auto", "seeded", "rejection"],
        help="seeded: the same seed gives the same text with any drafter and draft length; "
        "rejection: standard speculative sampling (more drafts accepted); auto (default): "
        "seeded when --seed is given, rejection otherwise",
    )
    group.add_argument(
        "--stop", action="append", default=None, help="stop string (repeatable); not in the text"
    )


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Generation keyword arguments from parsed CLI arguments (None = unset)."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "do_sample": False if args.temperature is None else None,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "stop_strings": args.stop,
        # generate always passes a seed (drawn when --seed is absent): resolve auto here
        "sampling_mode": (
            ("seeded" if args.seed is not None else "rejection")
            if args.sampling_mode == "auto"
            else args.sampling_mode
        ),
    }


def target_spec(args: argparse.Namespace) -> str:
    """The --target given, or the default target when none was."""
    return str(args.target or DEFAULT_TARGET)


def draft_spec(args: argparse.Namespace) -> str | None:
    """The --draft given; the default draft when neither a target nor a drafter was given."""
    if args.draft:
        return str(args.draft)
    if args.target is None and not args.prompt_lookup:  # no drafter option given
        return DEFAULT_DRAFT
    return None


def load_target(args: argparse.Namespace, keep_torch_kernels: bool = False) -> LoadedModel:
    return load_model(
        target_spec(args),
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        kernels=args.cpu_kernels,
        keep_torch_kernels=keep_torch_kernels,
        session_kind=session_kind(args),
    )


def prompt_window(value: str) -> int:
    """``--draft-prompt-window``: a count of tokens, at least 1."""
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise argparse.ArgumentTypeError(
            f"the draft's prompt window must be a whole number of tokens, at least 1, got {value!r}"
        )
    return tokens


def add_draft_forward(group: Any) -> None:
    """``--draft-forward``: the draft model's forward pass (generate, serve, bench)."""
    group.add_argument(
        "--draft-forward",
        default=AUTO_FORWARD,
        choices=list(FORWARD_CHOICES),
        help="the draft model's forward pass: auto (default) runs our lean forward (fused "
        "projections, less Python per step) on Llama, Qwen2 and Mistral drafts with full "
        "attention and transformers' on others; lean insists; transformers keeps theirs. Never "
        "changes the output, only the draft's speed",
    )


def draft_forward(args: argparse.Namespace) -> str:
    """The --draft-forward asked. The lean forward runs on our dynamic cache only: ``auto``
    means transformers' forward with another --kv-cache, and ``lean`` is refused there."""
    asked = str(getattr(args, "draft_forward", AUTO_FORWARD))
    if session_kind(args) == DYNAMIC:
        return asked
    if asked == LEAN_FORWARD:
        raise InvalidSettingsError(
            f"--draft-forward lean runs on the dynamic KV cache only, not --kv-cache "
            f"{session_kind(args)}: drop one of the two"
        )
    return TRANSFORMERS_FORWARD


def session_kind(args: argparse.Namespace) -> str:
    """The --kv-cache asked (``dynamic`` where the command has no such option)."""
    return str(getattr(args, "kv_cache", DYNAMIC))


def draft_kernels(args: argparse.Namespace) -> str:
    """The draft's kernels: as asked for the target, except that an int8 draft (the default
    on the CPU) has its own quantized kernels, so ``onednn`` falls back to ``auto`` there."""
    return AUTO if args.cpu_kernels == ONEDNN else str(args.cpu_kernels)


def build_drafter(args: argparse.Namespace, target: LoadedModel) -> Drafter | None:
    """The drafter the options ask for: a draft model, a layer-skip profile or prompt lookup;
    with --prompt-lookup beside a model, lookup in front of it (:class:`LookupDrafter`)."""
    model = _model_drafter(args, target)
    if not args.prompt_lookup:
        return model
    if model is None:
        return PromptLookupDrafter(
            max_ngram=args.ngram_max, min_ngram=PromptLookupDrafter.min_ngram_for(args.ngram_min)
        )
    return LookupDrafter(
        model,
        lookup_tokens=args.lookup_tokens,
        max_ngram=args.ngram_max,
        min_ngram=LookupDrafter.min_ngram_for(args.ngram_max, args.ngram_min),
    )


def _model_drafter(args: argparse.Namespace, target: LoadedModel) -> Drafter | None:
    if getattr(args, "skip_profile", None):
        from specdecode.search.profile import drafter_from_profile

        return drafter_from_profile(args.skip_profile, target)
    draft_name = draft_spec(args)
    if draft_name:
        draft = load_model(
            draft_name,
            dtype=draft_dtype_for(target, args.draft_dtype),
            device=str(target.device),
            threads=args.threads,
            kernels=draft_kernels(args),
            session_kind=session_kind(args),
            forward=draft_forward(args),
        )
        check_same_vocabulary(target.tokenizer, draft.tokenizer)
        return ModelDrafter(
            draft,
            confidence_threshold=args.confidence_threshold,
            prompt_window=getattr(args, "draft_prompt_window", None),
        )
    return None


def build_schedule(args: argparse.Namespace) -> DraftLength:
    """The draft-length policy: -k if given, else the skip profile's k, else DEFAULT_K."""
    k = args.num_draft_tokens
    if k is None and getattr(args, "skip_profile", None):
        from specdecode.search.profile import load_profile

        k = load_profile(args.skip_profile).draft.max_draft_tokens
    return make_schedule(
        args.draft_schedule,
        DEFAULT_K if k is None else k,
        confidence_stop=getattr(args, "confidence_stop", False),
    )
