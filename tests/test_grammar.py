"""Constrained output (specdecode.constraints): the grammars, the constraint's bookkeeping, and
the output under a grammar still exactly the constrained target's, greedy and sampled, whatever
the drafter. The references walk llguidance's matcher one token at a time, beside a full forward
pass per token: no rollback, no draft, none of the code under test."""

from __future__ import annotations

import json
import re
from collections import Counter

import llguidance
import llguidance.hf
import pytest
import torch

from specdecode import ModelDrafter, PromptLookupDrafter, SpeculativeGenerator
from specdecode.constraints import Grammar, GrammarCompiler
from specdecode.errors import GrammarError, InvalidSettingsError
from specdecode.models import load_model
from specdecode.testing import make_tiny_model, tiny_tokenizer

from .conftest import DRAFTER_KINDS, drafter_of
from .test_sampling_exact import N, _check

PROMPT = "def add(a, b):\n    return a + b\ndef add"
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yz"]}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


class Reference:
    """The constrained target, by hand: llguidance's matcher fed one chosen token at a time."""

    def __init__(self, target, grammar: Grammar) -> None:
        self.model = target.model
        vocab = target.model.get_output_embeddings().weight.shape[0]
        tokenizer = llguidance.hf.from_tokenizer(
            target.tokenizer, n_vocab=vocab, eos_token=[target.tokenizer.eos_token_id]
        )
        self.matcher = llguidance.LLMatcher(tokenizer, grammar.llguidance_source(), log_level=0)
        self.vocab = vocab
        self.eos = target.tokenizer.eos_token_id

    def mask(self) -> torch.Tensor:
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        unpacked = [(int(bits[i // 8]) >> (i % 8)) & 1 for i in range(self.vocab)]
        return torch.tensor(unpacked, dtype=torch.bool)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        scores = self.model(torch.tensor([ids])).logits[0, -1].float()
        return scores.masked_fill(~self.mask(), float("-inf"))

    def greedy(self, ids: list[int], new: int) -> list[int]:
        out: list[int] = []
        for _ in range(new):
            token = int(self.logits(ids + out).argmax())
            out.append(token)
            if token == self.eos:
                break
            assert self.matcher.consume_token(token)
        return out


# ----------------------------------------------------------------------------- grammars
def test_grammars_are_built_checked_and_described(tiny) -> None:
    assert Grammar.json_object().describe() == {"kind": "json_object"}
    assert Grammar.json_schema(json.dumps(SCHEMA)) == Grammar.json_schema(SCHEMA)
    assert Grammar.choice(["a", "b"]).describe() == {"kind": "choice", "source": ["a", "b"]}
    assert Grammar.regex("[0-9]+").describe() == {"kind": "regex", "source": "[0-9]+"}
    for bad, message in [
        (lambda: Grammar.json_schema("{not json"), "not valid JSON"),
        (lambda: Grammar.json_schema("[1, 2]"), "JSON schema is an object"),
        (lambda: Grammar.regex(""), "empty"),
        (lambda: Grammar.lark("  "), "empty"),
        (lambda: Grammar.choice("yes"), "list"),
        (lambda: Grammar.choice(["ok", ""]), "non-empty"),
        (lambda: Grammar("yaml", "x"), "unknown grammar kind"),
    ]:
        with pytest.raises(GrammarError, match=message):
            bad()
    target = tiny("qwen2")
    compiler = GrammarCompiler(target.tokenizer, 320)
    eos = [target.tokenizer.eos_token_id]
    with pytest.raises(GrammarError, match=r"(?s)regex grammar is not usable.*unclosed group"):
        compiler.check(Grammar.regex("(ab"), eos)
    with pytest.raises(GrammarError, match="lark grammar is not usable"):
        compiler.check(Grammar.lark("start: ???"), eos)
    with pytest.raises(GrammarError, match="end-of-sequence"):
        compiler.check(Grammar.json_object(), [])
    assert issubclass(GrammarError, InvalidSettingsError)  # the CLI and server's 400 path


def test_the_constraint_rolls_back_drafts_and_masks_rows_after_a_refused_token(tiny) -> None:
    target = tiny("qwen2")
    tok = target.tokenizer
    compiler = GrammarCompiler(tok, 320)
    prompt = tok("x")["input_ids"]
    eos = [tok.eos_token_id]
    constraint = compiler.constraint(Grammar.choice(["abab", "cd"]), eos, len(prompt))
    a, b, c = (tok.convert_tokens_to_ids(t) for t in "abc")
    # rows after the prompt, then after "a", then after "a b": only the grammar's next byte
    rows = constraint.allowed([*prompt, a, b], len(prompt), 3)
    assert rows[0, a] and rows[0, c] and not rows[0, b]
    assert rows[1].nonzero().flatten().tolist() == [b]
    assert rows[2].nonzero().flatten().tolist() == [a]
    # a refused draft token: the row after it is unreachable and left all True
    rows = constraint.allowed([*prompt, b, a], len(prompt), 3)
    assert not rows[0, b] and bool(rows[1].all()) and bool(rows[2].all())
    assert constraint.valid_prefix(prompt, [a, b, a, a]) == 3
    # the generated part moved on, then back (a rejected draft): the matcher follows both ways
    assert constraint.allowed([*prompt, a, b, a], len(prompt) + 3, 1)[0].nonzero().tolist() == [[b]]
    assert constraint.valid_prefix([*prompt, c], [tok.convert_tokens_to_ids("d")]) == 1
    with pytest.raises(GrammarError, match="breaks the choice grammar"):
        constraint.allowed([*prompt, b], len(prompt) + 1, 1)


# ----------------------------------------------------------------------------- the loop
GRAMMARS = {
    "json_schema": Grammar.json_schema(SCHEMA),
    "regex": Grammar.regex(r"(ab|c[de]|\d)+;"),
}


@pytest.mark.parametrize("grammar", sorted(GRAMMARS))
@pytest.mark.parametrize("kind", DRAFTER_KINDS)
def test_greedy_under_a_grammar_is_the_constrained_targets(tiny, kind: str, grammar: str) -> None:
    target = tiny("qwen2")
    drafter = drafter_of(kind, tiny)
    ids = target.tokenizer(PROMPT)["input_ids"]
    gen = SpeculativeGenerator(target, drafter, draft_length=4)
    result = gen.generate(ids, max_new_tokens=24, grammar=GRAMMARS[grammar])
    assert result.token_ids == Reference(target, GRAMMARS[grammar]).greedy(ids, 24)
    unconstrained = gen.generate(ids, max_new_tokens=24)
    assert unconstrained.token_ids != result.token_ids  # the grammar does change this output
    assert result.settings["grammar"]["kind"] == grammar
    if kind == "draft":
        assert result.stats.drafted > 0


def test_a_complete_grammar_ends_the_output_with_eos(tiny) -> None:
    target = tiny("llama")
    gen = SpeculativeGenerator(target, ModelDrafter(tiny("llama", "perturbed")), draft_length=3)
    result = gen.generate(PROMPT, max_new_tokens=40, grammar=Grammar.regex(r"[a-c]{3}-\d"))
    assert result.finish_reason == "eos"
    assert re.fullmatch(r"[a-c]{3}-\d", result.text)
    choice = gen.generate(PROMPT, max_new_tokens=40, grammar=Grammar.choice(["left", "right"]))
    assert choice.text in ("left", "right") and choice.finish_reason == "eos"


def test_seeded_sampling_under_a_grammar_does_not_depend_on_the_drafter(tiny) -> None:
    target = tiny("llama")
    kwargs = {"max_new_tokens": 20, "temperature": 1.1, "seed": 5, "grammar": GRAMMARS["regex"]}
    plain = SpeculativeGenerator(target).generate(PROMPT, **kwargs)
    drafted = SpeculativeGenerator(
        target, ModelDrafter(tiny("llama", "perturbed")), draft_length=3
    ).generate(PROMPT, **kwargs)
    assert drafted.token_ids == plain.token_ids and drafted.stats.drafted > 0


def test_sampled_pairs_follow_the_constrained_distribution(tiny) -> None:
    """Speculative sampling (the rejection rule) with a draft model under a grammar whose mask
    differs at the first and second token: chi-square against the constrained distribution."""
    target = tiny("llama")
    grammar = Grammar.regex(r"[a-f][a-z0-9]+")
    ids = target.tokenizer(PROMPT)["input_ids"]
    reference = Reference(target, grammar)
    temperature = 1.4

    def dist(generated: list[int]) -> torch.Tensor:
        return torch.softmax(reference.logits(ids + generated) / temperature, dim=-1)

    p1 = dist([])
    joint = {}
    for t1 in p1.nonzero().flatten().tolist():
        reference.matcher.consume_token(t1)
        p2 = dist([t1])
        reference.matcher.rollback(1)
        for t2 in p2.nonzero().flatten().tolist():
            joint[(t1, t2)] = float(p1[t1] * p2[t2])
    generator = SpeculativeGenerator(target, ModelDrafter(tiny("llama", "perturbed")), 1)
    counts: Counter = Counter()
    drafted = 0
    for seed in range(N):
        result = generator.generate(
            ids,
            max_new_tokens=3,
            seed=seed,
            sampling_mode="rejection",
            temperature=temperature,
            top_k=0,
            grammar=grammar,
        )
        counts[tuple(result.token_ids[:2])] += 1
        drafted += result.stats.drafted
    assert drafted > N // 4, "too few verification rounds to test anything"
    _check(counts, joint)


def test_grammars_that_cannot_work_fail_clearly_before_or_while_generating(tiny) -> None:
    target = tiny("qwen2")
    compiler = SpeculativeGenerator(target).grammar_compiler()
    eos = [target.tokenizer.eos_token_id]
    # an empty language: llguidance builds it, then nothing can begin it
    with pytest.raises(GrammarError, match="no output can even begin"):
        compiler.check(Grammar.regex("x[a&&b]"), eos)
    # text only a special token spells: llguidance's mask allows it, its matcher refuses it
    with pytest.raises(GrammarError, match="special token"):
        compiler.check(Grammar.regex(r"<\|im_end\|>"), eos)
    # a language that empties midway: an error where it happens, not an early end of sequence
    midway = Grammar.lark('start: "ab" /[0-9&&a-z]+/')
    compiler.check(midway, eos)
    with pytest.raises(GrammarError, match="failed after 2 generated tokens"):
        SpeculativeGenerator(target).generate(PROMPT, max_new_tokens=8, grammar=midway)


def test_stop_tokens_end_a_complete_grammar_with_one_vocabulary_reading(tiny) -> None:
    target = tiny("qwen2")
    gen = SpeculativeGenerator(target, PromptLookupDrafter(), draft_length=3)
    grammar = Grammar.regex("[a-d]{2}")
    # <|im_end|> as a stop string joins the end-of-sequence ids: it may end the answer, and the
    # tokenizer's own EOS, which this request leaves out, may not
    result = gen.generate(
        PROMPT, max_new_tokens=6, grammar=grammar, eos_token_id=[], stop=["<|im_end|>"]
    )
    assert result.token_ids[-1] == 2 and result.finish_reason == "eos"
    assert re.fullmatch("[a-d]{2}", result.text)
    compiler = gen.grammar_compiler()
    reading = compiler.ll_tokenizer()
    gen.generate(PROMPT, max_new_tokens=6, grammar=grammar)
    assert compiler.ll_tokenizer() is reading  # one reading whatever the request's ends


@pytest.mark.parametrize("padded", ["draft", "target"])
def test_a_draft_with_another_padded_vocabulary_under_a_grammar(tmp_path, tiny, padded) -> None:
    folder = tmp_path / "padded"
    make_tiny_model(folder, "llama", seed=5, vocab_size=384)  # same tokens, a wider matrix
    tiny_tokenizer(320).save_pretrained(folder)
    wide = load_model(folder, device="cpu")
    target, draft = (tiny("llama"), wide) if padded == "draft" else (wide, tiny("llama"))
    grammar = Grammar.regex(r"[a-c]{3}-\d")
    drafted = SpeculativeGenerator(target, ModelDrafter(draft), 3).generate(
        PROMPT, max_new_tokens=10, grammar=grammar
    )
    plain = SpeculativeGenerator(target).generate(PROMPT, max_new_tokens=10, grammar=grammar)
    assert drafted.token_ids == plain.token_ids and drafted.stats.drafted > 0
    assert re.fullmatch(r"[a-c]{3}-\d", drafted.text)


def test_a_tokenizer_without_an_eos_takes_the_requests() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None  # a model whose generation config alone names its end
    constraint = GrammarCompiler(tokenizer, 320).constraint(Grammar.choice(["ab"]), [2], 0)
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    assert constraint.allowed([a, b], 2, 1)[0].nonzero().flatten().tolist() == [2]


def test_ends_follow_the_grammars_completion_not_the_end_tokens_spelling(tiny) -> None:
    target = tiny("llama")
    # the grammar spells the EOS token as text midway: only a special token could write it,
    # and a special token is never text; an error, not an early end of sequence
    spelled = Grammar.regex(r"a<\|endoftext\|>b")
    with pytest.raises(GrammarError, match="allows no token"):
        SpeculativeGenerator(target).generate("hello", max_new_tokens=6, grammar=spelled)
    # a tokenizer whose EOS is an ordinary token ("."): it stays text for the grammar, and the
    # request's own end (id 0) ends the answer only where the grammar is complete
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = "."
    dot = tokenizer.convert_tokens_to_ids(".")
    b = tokenizer.convert_tokens_to_ids("b")
    compiler = GrammarCompiler(tokenizer, 320)
    constraint = compiler.constraint(Grammar.regex(r"[a-c]{1,3}\.[a-c]"), [0], 0)
    rows = constraint.allowed([b, b, b, dot, b], 0, 6)
    assert rows[3].nonzero().flatten().tolist() == [dot]  # after "bbb": the dot, as text
    assert not rows[2][0] and rows[5].nonzero().flatten().tolist() == [0]  # the end, at the end
