"""Constrained output on real models: identity with transformers, and speed beside it.

transformers has no grammar of its own: users put a logits processor built on a grammar engine
into ``generate``. This script does exactly that with llguidance (the engine our constraint
uses, walked one token at a time: no draft, no rollback) as the reference, and runs, prompt by
prompt in a rotated order, greedy, under the same JSON schema:

- ``hf-constrained-torch``: transformers' plain ``generate`` with that processor, on torch's own
  kernels (what a transformers user runs);
- ``hf-constrained``: the same on our oneDNN-packed weights (the reference for the ratios: it
  leaves only the loop and the speculation between it and ours);
- ``hf-assisted-constrained-torch``: transformers' assisted generation with the same int8
  draft model and the processor (on the target's and the draft's logits), torch's kernels;
- ``ours-plain``: our loop without a drafter, under ``grammar=``;
- ``ours-draft``: our loop with the int8 draft model (the CLI's default), under ``grammar=``;
- ``ours-draft-free``: the same without a grammar (what the constraint costs our loop).

Reports per mode the median tok/s over prompts, the median speedup over ``hf-constrained`` and
over ``hf-constrained-torch`` on the same prompt, tau, and token identity with the reference;
whether each constrained answer parses as JSON with the schema's keys; and the time the
constraint took per target pass.

    python scripts/ab_grammar.py --runs 1 --out docs/results/grammar/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import torch

from specdecode import (
    CostAwareLength,
    ModelDrafter,
    SpeculativeGenerator,
    draft_dtype_for,
    load_model,
)
from specdecode.constraints import Grammar, GrammarConstraint

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["person", "company", "place", "thing"]},
        "year": {"type": ["integer", "null"]},
        "facts": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "kind", "year", "facts"],
    "additionalProperties": False,
}

PROMPTS = [
    "Ada Lovelace wrote the first published algorithm for Charles Babbage's Analytical Engine "
    "in 1843. Describe her as JSON with her name, kind, the year and up to three facts.",
    "Describe the Python programming language as JSON: its name, kind, the year it was first "
    "released and up to three facts about it.",
    "Mount Everest, on the border of Nepal and China, was first climbed in 1953 by Tenzing "
    "Norgay and Edmund Hillary. Give it as JSON: name, kind, year, facts.",
    "The Linux kernel was first released by Linus Torvalds in 1991 and now runs most servers. "
    "Describe it as JSON with name, kind, year and facts.",
    "Describe the company Nokia as JSON: its name, kind, the year it was founded and up to "
    "three facts about it.",
    "The Eiffel Tower in Paris was completed in 1889 for the World's Fair and is 330 metres "
    "tall. Give name, kind, year and facts as JSON.",
]


class ReferenceProcessor:
    """transformers' logits-processor form of the constraint: llguidance, reset and fed the
    generated tokens of each prefix it is asked about (so that assisted generation, which asks
    about drafted prefixes and rolls them back, can use it too)."""

    def __init__(self, ll_tokenizer: Any, source: str, vocab: int, prompt_length: int) -> None:
        self.matcher = llguidance.LLMatcher(ll_tokenizer, source)
        self.vocab = vocab
        self.prompt_length = prompt_length
        self.bits = torch.arange(8, dtype=torch.uint8)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = []
        for ids in input_ids.tolist():
            self.matcher.reset()
            generated = ids[self.prompt_length :]
            if generated and not self.matcher.consume_tokens(generated):
                rows.append(torch.ones(scores.shape[-1], dtype=torch.bool))  # unreachable prefix
                continue
            packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
            rows.append(((packed.unsqueeze(-1) >> self.bits) & 1).flatten()[: self.vocab].bool())
        mask = torch.stack(rows).to(scores.device)
        return scores.masked_fill(~mask, float("-inf"))


def timed_constraint() -> list[float]:
    """Wrap GrammarConstraint.allowed to record its wall time (seconds per call)."""
    spent: list[float] = []
    original = GrammarConstraint.allowed

    def allowed(self: GrammarConstraint, *args: Any) -> torch.Tensor:
        tick = time.perf_counter()
        out = original(self, *args)
        spent.append(time.perf_counter() - tick)
        return out

    GrammarConstraint.allowed = allowed  # type: ignore[method-assign]
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="results.json (and results.md)")
    parser.add_argument(
        "--report", type=Path, default=None, help="only rewrite the report of this results.json"
    )
    args = parser.parse_args()
    if args.report is not None:  # the summary again from the saved rows, and the markdown
        from transformers import AutoTokenizer

        from specdecode.models.pull import pulled_path

        saved = json.loads(args.report.read_text())
        settings = argparse.Namespace(**(saved["settings"] | {"out": args.report}))
        name = settings.target
        tokenizer = AutoTokenizer.from_pretrained(pulled_path(name) if "/" not in name else name)
        names = list(dict.fromkeys(r["mode"] for r in saved["rows"]))
        report(saved["rows"], names, tokenizer, settings)
        return

    torch.set_num_threads(args.threads)
    target = load_model(args.target, threads=args.threads, keep_torch_kernels=True)
    draft = load_model(args.draft, dtype=draft_dtype_for(target), forward="auto")
    plain = SpeculativeGenerator(target)
    drafted = SpeculativeGenerator(target, ModelDrafter(draft), CostAwareLength())
    grammar = Grammar.json_schema(SCHEMA)
    tokenizer = target.tokenizer
    eos = sorted(plain.generate("x", max_new_tokens=1).settings["eos_token_ids"])
    spent = timed_constraint()

    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=plain.vocab_size, eos_token=eos)
    source = grammar.llguidance_source()

    def hf(ids: list[int], kernels: str = "onednn", assistant: Any = None) -> Any:
        processor = ReferenceProcessor(ll_tokenizer, source, plain.vocab_size, len(ids))
        inputs = torch.tensor([ids])
        with target.using_kernels(kernels, required=False):
            tick = time.perf_counter()
            out = _hf_generate(target, inputs, processor, eos, args.max_new_tokens, assistant)
            seconds = time.perf_counter() - tick
        return out[0, len(ids) :].tolist(), seconds

    def ours(gen: SpeculativeGenerator, constrained: bool) -> Any:
        def run(ids: list[int]) -> tuple[list[int], float, float, int]:
            spent.clear()
            result = gen.generate(
                ids, max_new_tokens=args.max_new_tokens, grammar=grammar if constrained else None
            )
            rounds = result.stats.target_passes
            return result.token_ids, result.stats.total_seconds, sum(spent), rounds

        return run

    modes: dict[str, Any] = {
        "hf-constrained-torch": lambda ids: hf(ids, "torch"),
        "hf-constrained": hf,
        "hf-assisted-constrained-torch": lambda ids: hf(ids, "torch", draft.model),
        "ours-plain": ours(plain, True),
        "ours-draft": ours(drafted, True),
        "ours-draft-free": ours(drafted, False),
    }
    for name, mode in modes.items():  # warm-up: pass costs, kernels, the vocabulary reading
        mode(chat_ids(tokenizer, PROMPTS[0]))[:1]
        print(f"warmed up {name}", flush=True)
    rows: list[dict[str, Any]] = []
    names = list(modes)
    for p, prompt in enumerate(PROMPTS[: args.prompts]):
        ids = chat_ids(tokenizer, prompt)
        for run in range(args.runs):
            shift = (p + run) % len(names)
            for name in names[shift:] + names[:shift]:
                out = modes[name](ids)
                tokens, seconds = out[0], out[1]
                row = {"prompt": p, "run": run, "mode": name, "tokens": tokens}
                row.update(seconds=seconds, tok_s=len(tokens) / seconds)
                if len(out) > 2:
                    row.update(constraint_seconds=out[2], passes=out[3])
                rows.append(row)
                print(
                    f"prompt {p} run {run} {name}: {len(tokens)} tokens, {row['tok_s']:.2f} tok/s",
                    flush=True,
                )
    report(rows, names, tokenizer, args)


def _hf_generate(
    target: Any,
    inputs: torch.Tensor,
    processor: ReferenceProcessor,
    eos: list[int],
    new: int,
    assistant: Any = None,
) -> torch.Tensor:
    """transformers' ``generate``, greedy, with the processor; ``assistant``: its assisted
    generation with that draft model and the assistant's own settings (transformers' defaults)."""
    extra = {} if assistant is None else {"assistant_model": assistant}
    return target.model.generate(
        inputs,
        attention_mask=torch.ones_like(inputs),
        do_sample=False,
        max_new_tokens=new,
        logits_processor=[processor],
        eos_token_id=eos,
        pad_token_id=eos[0],
        **extra,
    )


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    return [int(i) for i in encoded["input_ids"]]


def is_answer(text: str) -> bool:
    """Whether ``text`` is a JSON object with exactly the schema's keys."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["required"])


def report(rows: list[dict[str, Any]], names: list[str], tokenizer: Any, args: Any) -> None:
    reference = {(r["prompt"], r["run"]): r for r in rows if r["mode"] == "hf-constrained"}
    torch_ref = {(r["prompt"], r["run"]): r for r in rows if r["mode"] == "hf-constrained-torch"}
    assisted = {
        (r["prompt"], r["run"]): r for r in rows if r["mode"] == "hf-assisted-constrained-torch"
    }
    summary: dict[str, Any] = {}
    for name in names:
        mine = [r for r in rows if r["mode"] == name]
        prompts = sorted({r["prompt"] for r in mine})
        speedups, over_torch, over_assisted, rates = [], [], [], []
        for p in prompts:
            runs = [r for r in mine if r["prompt"] == p]
            refs = [reference[(p, r["run"])] for r in runs]
            rates.append(statistics.median(r["tok_s"] for r in runs))
            speedups.append(
                statistics.median(
                    r["tok_s"] / ref["tok_s"] for r, ref in zip(runs, refs, strict=True)
                )
            )
            over_torch.append(
                statistics.median(r["tok_s"] / torch_ref[(p, r["run"])]["tok_s"] for r in runs)
            )
            if assisted:
                over_assisted.append(
                    statistics.median(r["tok_s"] / assisted[(p, r["run"])]["tok_s"] for r in runs)
                )
        identical = sum(r["tokens"] == reference[(r["prompt"], r["run"])]["tokens"] for r in mine)
        entry: dict[str, Any] = {
            "tok_s_median": statistics.median(rates),
            "speedup_median": statistics.median(speedups),
            "speedups": speedups,
            "speedup_over_torch_kernels_median": statistics.median(over_torch),
            "speedup_over_assisted_median": (
                statistics.median(over_assisted) if over_assisted else None
            ),
            "identical": f"{identical}/{len(mine)}",
        }
        if "passes" in mine[0]:
            new = sum(len(r["tokens"]) for r in mine)
            entry["tau"] = new / sum(r["passes"] for r in mine)
            passes = sum(r["passes"] for r in mine)
            entry["constraint_ms_per_pass"] = (
                1000 * sum(r["constraint_seconds"] for r in mine) / passes
            )
        if name != "ours-draft-free":
            valid = sum(
                is_answer(tokenizer.decode(r["tokens"], skip_special_tokens=True)) for r in mine
            )
            entry["valid_json"] = f"{valid}/{len(mine)}"
        summary[name] = entry
        print(name, json.dumps(entry))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": vars(args) | {"out": str(args.out)},
            "summary": summary,
            "rows": rows,
        }
        args.out.write_text(json.dumps(payload, indent=1))
        write_markdown(args.out.with_suffix(".md"), payload["settings"], summary, rows)


def write_markdown(
    path: Path, settings: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    """results.md: the summary per mode, then tok/s and tokens per prompt."""
    names = list(summary)
    lines = [
        "# Constrained output (JSON schema): transformers with a grammar processor and ours",
        "",
        f"`python scripts/ab_grammar.py --runs {settings['runs']} --max-new-tokens "
        f"{settings['max_new_tokens']} --out {settings['out']}` (target {settings['target']}, "
        f"draft {settings['draft']}, {settings['threads']} threads, greedy, "
        f"{settings['prompts']} prompts).",
        "",
        "| mode | tok/s (median) | over hf-constrained (median) | over hf-constrained-torch "
        "(median) | over hf-assisted-constrained-torch (median) | tau | identical to "
        "hf-constrained | answers with the schema's keys | constraint ms per target pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        e = summary[name]
        tau = f"{e['tau']:.2f}" if "tau" in e else "-"
        spent = f"{e['constraint_ms_per_pass']:.2f}" if "constraint_ms_per_pass" in e else "-"
        assisted = e.get("speedup_over_assisted_median")
        over_assisted = "-" if assisted is None else f"{assisted:.2f}x"
        lines.append(
            f"| {name} | {e['tok_s_median']:.2f} | {e['speedup_median']:.2f}x | "
            f"{e['speedup_over_torch_kernels_median']:.2f}x | {over_assisted} | {tau} | "
            f"{e['identical']} | "
            f"{e.get('valid_json', '-')} | {spent} |"
        )
    lines += [
        "",
        "Per prompt (run 0): new tokens, tok/s",
        "",
        "| prompt | " + " | ".join(names) + " |",
    ]
    lines.append("|---" * (len(names) + 1) + "|")
    for p in sorted({r["prompt"] for r in rows}):
        cells = []
        for name in names:
            r = next(r for r in rows if r["prompt"] == p and r["mode"] == name and r["run"] == 0)
            cells.append(f"{len(r['tokens'])}, {r['tok_s']:.2f}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
