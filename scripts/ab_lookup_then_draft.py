"""A/B of prompt lookup first, the draft model elsewhere (docs/speed.md, section 3d).

Runs each Spec-Bench prompt of a few categories with four drafters in alternating order, each on
its own generator (one cost calibration each): the draft model, prompt lookup (1-3-grams), and
``LookupThenModelDrafter`` copying after a match of 2+ or 3+ tokens. Reports time, alpha, tau,
how many drafts each source made, and whether the tokens equal the draft model's run's.

Measured once (2026-11-27, docs/speed.md, section 3d): it did not pay, and the next commit
removes the drafter and this script; both stay in this commit to reproduce the figures.

    python scripts/ab_lookup_then_draft.py --out docs/results/lookup-then-draft/ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from specdecode.decoding import SpeculativeGenerator
from specdecode.drafters import ModelDrafter, PromptLookupDrafter, make_schedule
from specdecode.drafters.combined import LookupThenModelDrafter
from specdecode.models import load_model
from specdecode.models.loading import draft_dtype_for

CATEGORIES = {"summarization": 3, "rag": 3, "writing": 1, "coding": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="../shared/data/spec_bench/question.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_model("qwen2.5-coder-1.5b", threads=args.threads)
    draft = load_model("qwen2.5-coder-0.5b", dtype=draft_dtype_for(target), threads=args.threads)
    model = ModelDrafter(draft)
    drafters = {
        "draft": model,
        "lookup": PromptLookupDrafter(3, 1),
        "combined": LookupThenModelDrafter(model, PromptLookupDrafter(3, 2)),
        "combined4": LookupThenModelDrafter(model, PromptLookupDrafter(4, 3)),
    }
    generators = {
        name: SpeculativeGenerator(target, drafter, make_schedule("auto", 5))
        for name, drafter in drafters.items()
    }
    wanted = dict(CATEGORIES)
    prompts = []
    for line in Path(args.prompts).read_text().splitlines():
        question = json.loads(line)
        if wanted.get(question["category"], 0) > 0:
            wanted[question["category"]] -= 1
            prompts.append(question)
    for generator in generators.values():  # calibrate, warm up
        generator.generate(prompts[0]["turns"][0], chat=True, max_new_tokens=8)
    names = list(generators)
    rows = []
    for number, question in enumerate(prompts):
        runs = {}
        for name in names if number % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            result = generators[name].generate(question["turns"][0], chat=True, max_new_tokens=64)
            runs[name] = (time.perf_counter() - start, result)
        reference_seconds, reference = runs["draft"]
        for name in names:
            seconds, result = runs[name]
            drafter = drafters[name]
            row = {
                "id": question["question_id"],
                "cat": question["category"],
                "prompt": len(result.prompt_ids),
                "new": len(result.token_ids),
                "drafter": name,
                "seconds": round(seconds, 2),
                "alpha": round(result.stats.alpha or 0.0, 3),
                "tau": round(result.stats.tau or 0.0, 2),
                "identical": result.token_ids == reference.token_ids,
                "speed_vs_draft": round(reference_seconds / seconds, 3),
                "lookup_drafts": getattr(drafter, "lookup_drafts", None),
                "model_drafts": getattr(drafter, "model_drafts", None),
            }
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    for name in names[1:]:
        ratios = [row["speed_vs_draft"] for row in rows if row["drafter"] == name]
        print(f"{name}: median speed over the draft model {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
