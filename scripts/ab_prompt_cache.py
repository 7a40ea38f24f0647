"""A/B of the prompt cache (``SpeculativeGenerator(reuse_prompt_cache=True)``, docs/server.md).

Runs the first two-turn Spec-Bench conversations as a chat would: turn 1, then the history with
turn 1's answer and turn 2's question. Each conversation runs on a generator with the prompt
cache and on one without, in alternating order, ``--runs`` times; greedy, the default drafter
(the int8 draft model, ``auto`` schedule). Reports the second turn's time to first token and
time, the prompt positions kept, and whether both turns' tokens match the uncached run's; then
medians of the speedups.

    python scripts/ab_prompt_cache.py --conversations 3 --runs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from specdecode import (
    CostAwareLength,
    ModelDrafter,
    SpeculativeGenerator,
    draft_dtype_for,
    load_model,
)

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl"


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return [int(i) for i in encoded["input_ids"]]


def two_turns(generator: SpeculativeGenerator, turns: list[str], new: int) -> dict[str, Any]:
    tokenizer = generator.target.tokenizer
    first = [{"role": "user", "content": turns[0]}]
    answer = generator.generate(chat_ids(tokenizer, first), max_new_tokens=new)
    second = [
        *first,
        {"role": "assistant", "content": answer.text},
        {"role": "user", "content": turns[1]},
    ]
    prompt = chat_ids(tokenizer, second)
    reply = generator.generate(prompt, max_new_tokens=new)
    return {
        "tokens": [answer.token_ids, reply.token_ids],
        "prompt_tokens": len(prompt),
        "cached": reply.stats.cached_prompt_tokens,
        "ttft": reply.stats.time_to_first_token,
        "seconds": reply.stats.total_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    target = load_model("qwen2.5-coder-1.5b", threads=args.threads)
    draft = load_model("qwen2.5-coder-0.5b", dtype=draft_dtype_for(target), forward="auto")
    lines = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    conversations = [q for q in lines if len(q.get("turns", [])) >= 2][: args.conversations]
    rows = []
    for run in range(args.runs):
        for question in conversations:
            out = {}
            for cached in [True, False] if run % 2 == 0 else [False, True]:
                generator = SpeculativeGenerator(
                    target, ModelDrafter(draft), CostAwareLength(), reuse_prompt_cache=cached
                )
                out[cached] = two_turns(generator, question["turns"], args.max_new_tokens)
            row = {
                "category": question["category"],
                "prompt_tokens": out[True]["prompt_tokens"],
                "kept": out[True]["cached"],
                "ttft_speedup": out[False]["ttft"] / out[True]["ttft"],
                "turn_speedup": out[False]["seconds"] / out[True]["seconds"],
                "identical": out[True]["tokens"] == out[False]["tokens"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    ttft = [r["ttft_speedup"] for r in rows]
    turn = [r["turn_speedup"] for r in rows]
    print(
        f"second turn over {len(rows)} runs: time to first token {statistics.median(ttft):.2f}x "
        f"({min(ttft):.2f}-{max(ttft):.2f}), whole turn {statistics.median(turn):.2f}x "
        f"({min(turn):.2f}-{max(turn):.2f}); all identical: {all(r['identical'] for r in rows)}"
    )


if __name__ == "__main__":
    main()
