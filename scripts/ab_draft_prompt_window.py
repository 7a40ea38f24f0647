"""A/B of the draft model's prompt window (docs/speed.md, section 3c).

For each Spec-Bench prompt of the chosen categories, generates with our draft mode three times on
one generator (so one cost calibration serves all): the draft reading the whole prompt, then only
its last 256 and 128 tokens (the order alternates between prompts), and reports time, alpha and
the draft's prefill time, and whether the tokens equal the full-window run's (they must: the
window changes acceptance only).

    python scripts/ab_draft_prompt_window.py --out docs/results/draft-prompt-window/ab.json

Run it on an otherwise idle machine: it takes about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from specdecode.cli.common import DEFAULT_K
from specdecode.decoding import SpeculativeGenerator
from specdecode.drafters import ModelDrafter
from specdecode.drafters.schedule import make_schedule
from specdecode.models import load_model
from specdecode.models.loading import draft_dtype_for

CATEGORIES = {"summarization": 3, "rag": 3, "extraction": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--prompts", default="../shared/data/spec_bench/question.jsonl")
    parser.add_argument(
        "--windows", default="256,128", help="windows to try beside the full prompt"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_model(args.target, threads=args.threads)
    draft = load_model(args.draft, dtype=draft_dtype_for(target), threads=args.threads)
    drafter = ModelDrafter(draft)
    generator = SpeculativeGenerator(target, drafter, make_schedule("auto", DEFAULT_K))
    wanted = dict(CATEGORIES)
    prompts = []
    for line in Path(args.prompts).read_text().splitlines():
        question = json.loads(line)
        if wanted.get(question["category"], 0) > 0:
            wanted[question["category"]] -= 1
            prompts.append(question)
    windows: list[int | None] = [None, *(int(w) for w in args.windows.split(","))]
    generator.generate(prompts[0]["turns"][0], chat=True, max_new_tokens=8)  # calibrate, warm up
    rows = []
    for number, question in enumerate(prompts):
        runs = {}
        for window in windows if number % 2 == 0 else windows[::-1]:
            drafter.prompt_window = window
            start = time.perf_counter()
            result = generator.generate(
                question["turns"][0], chat=True, max_new_tokens=args.max_new_tokens
            )
            runs[window] = (time.perf_counter() - start, result)
        full_seconds, full = runs[None]
        for window in windows:
            seconds, result = runs[window]
            row = {
                "id": question["question_id"],
                "cat": question["category"],
                "prompt": len(result.prompt_ids),
                "new": len(result.token_ids),
                "window": window,
                "seconds": round(seconds, 2),
                "alpha": round(result.stats.alpha or 0.0, 3),
                "draft_prefill": round(result.stats.draft_prefill_seconds, 2),
                "identical": result.token_ids == full.token_ids,
                "speed_vs_full": round(full_seconds / seconds, 3),
            }
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    for window in windows[1:]:
        ratios = [row["speed_vs_full"] for row in rows if row["window"] == window]
        print(
            f"window {window}: median speed over the full prompt {statistics.median(ratios):.2f}x"
        )


if __name__ == "__main__":
    main()
