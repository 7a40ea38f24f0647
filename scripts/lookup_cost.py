"""Per-round cost of prompt lookup's search: a scan of the whole sequence (``find_match``)
against the incremental ``NgramIndex`` (docs/speed.md, section 4).

For each context length, random ids from a 150k vocabulary stand for the prompt; each round
adds 3 tokens (a round's accepted tokens) and searches once. Reports the median per round
over 200 rounds, and the index's one-time cost of indexing the prompt.

    python scripts/lookup_cost.py docs/results/lookup-draft/lookup-cost.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from specdecode.drafters.prompt_lookup import NgramIndex, find_match

VOCABULARY = 150_000
ROUNDS = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1000, 8000, 32000])
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(0)
    results = {}
    for context in args.contexts:
        prompt = [rng.randrange(VOCABULARY) for _ in range(context)]
        row = {name: per_round_ms(prompt, name, rng) for name in ("scan", "index")}
        start = time.perf_counter()
        NgramIndex(3, 1).find(prompt, 10)
        row["index_first_ms"] = (time.perf_counter() - start) * 1e3
        results[context] = row
        print(context, {key: round(value, 4) for key, value in row.items()}, flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


def per_round_ms(prompt: list[int], how: str, rng: random.Random) -> float:
    index = NgramIndex(3, 1)
    ids = list(prompt)
    if how == "index":
        index.find(ids, 10)  # the prompt is indexed once, at the sequence's first round
    times = []
    for _ in range(ROUNDS):
        ids.extend(rng.randrange(VOCABULARY) for _ in range(3))
        start = time.perf_counter()
        if how == "scan":
            find_match(ids, 10, 3, 1)
        else:
            index.find(ids, 10)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
