"""A/B of the int8 draft's form: transformers' or the lean forward, one weight scale per layer
or per output row (docs/speed.md, section 2b).

One float32 target, four drafts of the same model (every combination of forward and int8
scheme), each behind its own generator on the shared target (each calibrates its own costs). For
each prompt every variant generates once, in an order that rotates between prompts; reported:
time, alpha, the draft's step cost c, and whether the tokens equal the first variant's (they
must: the draft's form changes acceptance only).

    python scripts/ab_draft_forms.py --out docs/results/draft-forms/ab.json
    python scripts/ab_draft_forms.py --steps --out docs/results/draft-forms/steps.json

``--steps`` times one-token draft steps instead (128 tokens of context, the variants
interleaved, 5 rounds of 40 steps each, the median of each round), without the target.
``--agreement`` measures, teacher-forced on three texts of this repository (600 tokens each),
how often each variant's greedy choice equals the float32 target's, beside the float32 draft's,
and how far the lean per-row logits are from transformers' per-row ones.

Run it on an otherwise idle machine: about 20 minutes on 2 cores with the default prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import specdecode.models.loading as loading
from specdecode.cli.common import DEFAULT_K
from specdecode.decoding import SpeculativeGenerator
from specdecode.drafters import ModelDrafter
from specdecode.drafters.schedule import make_schedule
from specdecode.models import LoadedModel, load_model

SPEC_BENCH = {"writing": 1, "coding": 1, "math": 1, "qa": 1, "summarization": 1, "rag": 1}
BUILT_IN = {"code": 2}
VARIANTS = {  # key: (name, forward, int8 per output row)
    "hf-layer": ("transformers, per layer", "transformers", False),
    "lean-layer": ("lean, per layer", "lean", False),
    "hf-row": ("transformers, per row", "transformers", True),
    "lean-row": ("lean, per row", "lean", True),
}


def pick(path: Path, counts: dict[str, int]) -> list[dict]:
    wanted, chosen = dict(counts), []
    for line in path.read_text().splitlines():
        question = json.loads(line)
        if wanted.get(question["category"], 0) > 0:
            wanted[question["category"]] -= 1
            chosen.append(question)
    return chosen


def load_draft(name: str, forward: str, per_channel: bool, threads: int) -> LoadedModel:
    loading.INT8_PER_CHANNEL = per_channel
    return load_model(name, dtype="int8", threads=threads, forward=forward)


def step_ms(draft: LoadedModel, steps: int) -> float:
    """Median milliseconds of a one-token step after 128 tokens of context."""
    session = draft.new_session()
    session.forward(list(range(100, 228)))
    context = session.length
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        session.forward([5])
        if step >= 3:  # the first ones warm up
            times.append(time.perf_counter() - start)
        session.truncate(context)
    return 1000 * statistics.median(times)


def time_steps(args: argparse.Namespace, chosen: list[tuple[str, str, bool]]) -> None:
    drafts = {name: load_draft(args.draft, fw, pc, args.threads) for name, fw, pc in chosen}
    rounds = []
    for _ in range(5):
        rounds.append({name: round(step_ms(draft, 40), 2) for name, draft in drafts.items()})
        print(rounds[-1], flush=True)
    medians = {name: statistics.median(r[name] for r in rounds) for name in drafts}
    print("median of the rounds (ms):", medians)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": rounds, "median_ms": medians}, indent=1))


AGREEMENT_TEXTS = (  # (file, first character): repository texts, not the models' own output
    ("src/specdecode/decoding/loop.py", 0),
    ("README.md", 0),
    ("docs/speed.md", 3000),
)


def agreement(args: argparse.Namespace, chosen: list[tuple[str, str, bool]]) -> None:
    root = Path(__file__).resolve().parent.parent
    target = load_model(args.target, threads=args.threads)
    texts = []
    for name, start in AGREEMENT_TEXTS:
        text = (root / name).read_text()[start : start + 3000]
        ids = target.tokenizer(text)["input_ids"][:600]
        logits = target.new_session().forward(ids, len(ids))
        texts.append((name, ids, logits.argmax(-1)))
    del target
    drafts = {name: load_draft(args.draft, fw, pc, args.threads) for name, fw, pc in chosen}
    drafts["float32 draft, transformers' forward"] = load_model(
        args.draft, dtype="float32", threads=args.threads, kernels="torch"
    )
    result: dict[str, object] = {"texts": [name for name, _, _ in texts], "agreement": {}}
    last_logits = {}
    for name, draft in drafts.items():
        shares = []
        for _, ids, want in texts:
            logits = draft.new_session().forward(ids, len(ids))
            shares.append(round(float((logits.argmax(-1)[:-1] == want[:-1]).float().mean()), 3))
            last_logits[name] = logits
        result["agreement"][name] = shares  # type: ignore[index]
        print(name, shares, flush=True)
    pair = ("transformers, per row", "lean, per row")
    if all(name in last_logits for name in pair):
        gap = (last_logits[pair[0]] - last_logits[pair[1]]).abs().max().item()
        result["max_logit_gap_lean_vs_transformers_per_row"] = gap
        print("largest logit gap, lean per row vs transformers per row:", gap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--prompts", default="../shared/data/spec_bench/question.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, the first is the reference; of {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--per-category", type=int, default=1, help="Spec-Bench prompts of each category"
    )
    parser.add_argument("--steps", action="store_true", help="time draft steps only")
    parser.add_argument(
        "--agreement", action="store_true", help="teacher-forced agreement with the target"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    chosen = [VARIANTS[key] for key in args.variants.split(",")]
    torch.set_num_threads(args.threads)
    if args.steps:
        time_steps(args, chosen)
        return
    if args.agreement:
        agreement(args, chosen)
        return
    target = load_model(args.target, threads=args.threads)
    generators = {}
    for name, forward, per_channel in chosen:
        draft = load_draft(args.draft, forward, per_channel, args.threads)
        generators[name] = SpeculativeGenerator(
            target, ModelDrafter(draft), make_schedule("auto", DEFAULT_K)
        )
    built_in = Path(loading.__file__).parent.parent / "data" / "bench_prompts.jsonl"
    prompts = [(q, False) for q in pick(built_in, BUILT_IN)]
    counts = {category: args.per_category for category in SPEC_BENCH}
    prompts += [(q, True) for q in pick(Path(args.prompts), counts)]
    for generator in generators.values():  # calibrate costs, warm up
        generator.generate(prompts[0][0]["turns"][0], max_new_tokens=8)
    names = [name for name, _, _ in chosen]
    rows = []
    for number, (question, chat) in enumerate(prompts):
        order = names[number % len(names) :] + names[: number % len(names)]
        runs = {}
        for name in order:
            start = time.perf_counter()
            result = generators[name].generate(
                question["turns"][0], chat=chat, max_new_tokens=args.max_new_tokens
            )
            runs[name] = (time.perf_counter() - start, result)
        base_seconds, base = runs[names[0]]
        for name in names:
            seconds, result = runs[name]
            c = getattr(generators[name].schedule, "c", None)  # the auto schedule's estimate
            row = {
                "id": question["question_id"],
                "cat": question["category"],
                "prompt": len(result.prompt_ids),
                "new": len(result.token_ids),
                "variant": name,
                "seconds": round(seconds, 2),
                "alpha": round(result.stats.alpha or 0.0, 3),
                "c": None if c is None else round(c, 4),
                "identical": result.token_ids == base.token_ids,
                "speed_vs_first": round(base_seconds / seconds, 3),
            }
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    for name in names[1:]:
        ratios = [row["speed_vs_first"] for row in rows if row["variant"] == name]
        alphas = [row["alpha"] for row in rows if row["variant"] == name]
        print(
            f"{name}: median speed over '{names[0]}' {statistics.median(ratios):.3f}x, "
            f"median alpha {statistics.median(alphas):.3f}"
        )
    first = [row["alpha"] for row in rows if row["variant"] == names[0]]
    print(f"{names[0]}: median alpha {statistics.median(first):.3f}")


if __name__ == "__main__":
    main()
