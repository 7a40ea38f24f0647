"""A/B of prompt lookup in front of the draft model (docs/speed.md, section 3d).

Runs Spec-Bench prompts (by default the first three summarization and rag prompts, one writing
and one coding prompt) with several drafters in rotated order, each on its own generator (one
pass-cost calibration each, the `auto` schedule), greedy, 64 new tokens, chat template:

- ``draft``: the int8 draft model alone (the default drafter);
- ``draft-w256``: the same, reading only the prompt's last 256 tokens (section 3c);
- ``lookup``: prompt lookup alone (1-3-grams);
- ``lookup-draft``: ``LookupDrafter`` (lookup after a 2-3-gram match, the draft model elsewhere);
- ``lookup-draft-w256``: the same, the draft reading only the prompt's last 256 tokens (lookup
  copies from the whole prompt; the draft's prefill shrinks).

Reports per prompt and variant: seconds, seconds after the first token (the target's prefill is
the same for all and dilutes ratios), the draft's prefill, alpha, tau, free rounds, and whether
the tokens equal the draft model's run's; then medians of the speed over ``draft``.

    python scripts/ab_lookup_draft.py --out docs/results/lookup-draft/ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from specdecode.decoding import SpeculativeGenerator
from specdecode.drafters import (
    Drafter,
    LookupDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    make_schedule,
)
from specdecode.models import load_model
from specdecode.models.loading import draft_dtype_for
from specdecode.prompts import load_prompts

CATEGORIES = ((["writing", "coding"], 1), (["summarization", "rag"], 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="../shared/data/spec_bench/question.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--offset", type=int, default=0, help="skip this many prompts of each category first"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_model("qwen2.5-coder-1.5b", threads=args.threads)
    draft = load_model(
        "qwen2.5-coder-0.5b", dtype=draft_dtype_for(target), threads=args.threads, forward="auto"
    )
    drafters: dict[str, Drafter] = {
        "draft": ModelDrafter(draft),
        "draft-w256": ModelDrafter(draft, prompt_window=256),
        "lookup": PromptLookupDrafter(3, 1),
        "lookup-draft": LookupDrafter(ModelDrafter(draft)),
        "lookup-draft-w256": LookupDrafter(ModelDrafter(draft, prompt_window=256)),
    }
    generators = {
        name: SpeculativeGenerator(target, drafter, make_schedule("auto", 5))
        for name, drafter in drafters.items()
    }
    prompts = [  # in the order of the earlier A/B (section 3d): writing, coding, then the rest
        prompt
        for categories, count in CATEGORIES
        for prompt in load_prompts(args.prompts, categories, per_category=count, offset=args.offset)
    ]
    for generator in generators.values():  # calibrate, warm up
        generator.generate(prompts[0].text, chat=True, max_new_tokens=8)
    names = list(generators)
    rows = []
    for number, question in enumerate(prompts):
        shift = number % len(names)
        runs = {}
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            result = generators[name].generate(
                question.text, chat=True, max_new_tokens=args.max_new_tokens
            )
            runs[name] = (time.perf_counter() - start, result)
        reference_seconds, reference = runs["draft"]
        reference_decode = reference_seconds - reference.stats.time_to_first_token
        for name in names:
            seconds, result = runs[name]
            stats = result.stats
            decode = seconds - stats.time_to_first_token
            row = {
                "id": question.id,
                "cat": question.category,
                "prompt": len(result.prompt_ids),
                "new": len(result.token_ids),
                "drafter": name,
                "seconds": round(seconds, 2),
                "decode_seconds": round(decode, 2),
                "draft_prefill_seconds": round(stats.draft_prefill_seconds, 2),
                "alpha": round(stats.alpha or 0.0, 3),
                "tau": round(stats.tau, 2),
                "free_rounds": stats.free_rounds,
                "rounds": stats.rounds,
                "identical": result.token_ids == reference.token_ids,
                "speed_vs_draft": round(reference_seconds / seconds, 3),
                "decode_speed_vs_draft": round(reference_decode / decode, 3),
            }
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    for name in names[1:]:
        mine = [row for row in rows if row["drafter"] == name]
        total = statistics.median(row["speed_vs_draft"] for row in mine)
        decode = statistics.median(row["decode_speed_vs_draft"] for row in mine)
        print(f"{name}: median over the draft model {total:.3f}x in all, {decode:.3f}x decoding")


if __name__ == "__main__":
    main()
