"""Grammars, and the constraint that follows one generation through a grammar.

Constrained decoding replaces the target's distribution p(x | prefix) by p restricted to the
tokens the grammar allows after that prefix (renormalised; greedy: the argmax among them). The
mask is a function of the prefix alone, so it is one more logits processor: applied to each row
of a verification pass (row i after the pending token and the first i drafted tokens), the
verification rules keep the constrained target's output exactly, greedy or sampled; applied to
the draft's own choices, it only raises acceptance (the draft never proposes what the target may
not say). Drafts from elsewhere (prompt lookup) are cut before their first token the grammar
refuses, which the target would reject anyway.

The grammar engine is llguidance (the one llama.cpp and vLLM use): it compiles JSON schemas,
regular expressions and Lark grammars against the tokenizer's vocabulary and computes a token
mask in well under a millisecond; its matcher consumes tokens and rolls them back, which is
what speculation needs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specdecode.errors import GrammarError

KINDS = ("json_object", "json_schema", "regex", "lark", "choice")


@dataclass(frozen=True)
class Grammar:
    """What the output may be. Build one with a class method:

    - ``Grammar.json_object()``: any JSON object (the OpenAI API's ``json_object`` mode);
    - ``Grammar.json_schema(schema)``: JSON valid under a JSON schema (a dict or its text);
    - ``Grammar.regex(pattern)``: text matching a regular expression (Rust regex syntax, the
      whole output);
    - ``Grammar.lark(text)``: a Lark grammar (llguidance's dialect, ``start`` is the output);
    - ``Grammar.choice(options)``: exactly one of the given strings.
    """

    kind: str
    source: str  # the schema as JSON text, the pattern, the grammar, the options as a JSON list

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}: use one of {', '.join(KINDS)}")

    @classmethod
    def json_object(cls) -> Grammar:
        return cls("json_object", "")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | str) -> Grammar:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, Mapping | bool):
            raise GrammarError(
                f"a JSON schema is an object (or true/false), got {type(schema).__name__}"
            )
        try:  # not sorted: the order of the schema's keys orders the output's properties
            return cls("json_schema", json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError) as exc:  # a set, a NaN: not JSON
            raise GrammarError(f"the JSON schema cannot be written as JSON: {exc}") from exc

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError(
                "the regular expression is empty: give a pattern the output must match"
            )
        return cls("regex", pattern)

    @classmethod
    def lark(cls, text: str) -> Grammar:
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("the Lark grammar is empty: give rules with a start rule")
        return cls("lark", text)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Grammar:
        if isinstance(options, str) or not options:
            raise GrammarError("choice needs a list of one or more strings to choose among")
        if not all(isinstance(o, str) and o for o in options):
            raise GrammarError("every choice must be a non-empty string")
        return cls("choice", json.dumps(list(options)))

    def llguidance_source(self) -> str:
        """The grammar in llguidance's input form (not yet checked: see
        :meth:`GrammarCompiler.check`)."""
        from llguidance import LLMatcher

        if self.kind == "json_object":
            return str(LLMatcher.grammar_from_json_schema({"type": "object"}))
        if self.kind == "json_schema":
            return str(LLMatcher.grammar_from_json_schema(self.source))
        if self.kind == "regex":
            return str(LLMatcher.grammar_from_regex(self.source))
        if self.kind == "lark":
            return str(LLMatcher.grammar_from_lark(self.source))
        options = json.loads(self.source)  # each a Lark string literal; JSON escapes are Lark's
        return str(LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, options))))

    def describe(self) -> dict[str, Any]:
        """For results and logs: the kind and the source (a schema or options as JSON)."""
        if self.kind == "json_object":
            return {"kind": self.kind}
        parsed = self.kind in ("json_schema", "choice")
        value: Any = json.loads(self.source) if parsed else self.source
        return {"kind": self.kind, "source": value}


class GrammarCompiler:
    """Compiles grammars against one tokenizer and vocabulary size.

    llguidance reads the whole vocabulary once (about a second and 100 MB for Qwen's 151k
    tokens); this object keeps that one reading, and the compiled form of recent grammars, so
    that a generation only builds its matcher (milliseconds). A request's own end-of-sequence
    ids (the model's, or special tokens given as stop strings) are mapped onto the reading's by
    each :class:`GrammarConstraint`, so they never cost another. Safe to share between threads.
    """

    CACHED_GRAMMARS = 64

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll: Any = None
        self._sources: dict[Grammar, str] = {}
        self._lock = threading.Lock()
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._special = sorted(
            int(i) for i, t in added.items() if getattr(t, "special", False) and i < vocab_size
        )

    def ll_tokenizer(self, fallback_eos: int | None = None) -> Any:
        """llguidance's reading of the vocabulary (made at the first call), with the tokenizer's
        end-of-sequence id as llguidance's, or ``fallback_eos`` for a tokenizer without one
        (which id it is does not matter: each constraint maps its request's ends onto it)."""
        with self._lock:
            if self._ll is None:
                self._ll = self._read_vocabulary(fallback_eos)
            return self._ll

    def _read_vocabulary(self, fallback_eos: int | None) -> Any:
        try:
            import llguidance.hf
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise GrammarError(
                "constrained output needs the llguidance package: pip install llguidance"
            ) from exc
        if not getattr(self.tokenizer, "is_fast", False):
            raise GrammarError(
                f"constrained output needs a fast (tokenizers) tokenizer; "
                f"{type(self.tokenizer).__name__} is not one: give the model a tokenizer.json"
            )
        eos = self._end_marker(fallback_eos)
        try:
            return llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=self.vocab_size, eos_token=eos
            )
        except Exception as exc:  # llguidance reports a vocabulary it cannot read as it likes
            raise GrammarError(f"llguidance could not read this tokenizer: {exc}") from exc

    def _end_marker(self, fallback_eos: int | None) -> int:
        """The id llguidance takes for its end of sequence: one that is never text (a special
        token, or an id past the tokenizer's in a padded matrix), so that its bit in a mask
        says nothing about what the grammar wants as text. The tokenizer's own end where it is
        special; else the request's; else any special token; else a padded id."""
        special = set(self._special)
        for candidate in (getattr(self.tokenizer, "eos_token_id", None), fallback_eos):
            if candidate is not None and candidate in special:
                return int(candidate)
        if self._special:
            return self._special[0]
        if self.vocab_size > len(self.tokenizer):
            return len(self.tokenizer)
        raise GrammarError(
            "constrained output needs a token that is never text to mark the end for the "
            "grammar engine, and this tokenizer has no special token: add one (an EOS token)"
        )

    def check(self, grammar: Grammar, eos_ids: Sequence[int]) -> None:
        """A :class:`GrammarError` saying what is wrong with ``grammar``, if anything: one
        llguidance refuses, or one that cannot even begin (an empty language, text only a
        special token spells). Compiles it, so a generation after this reuses the result."""
        constraint = self.constraint(grammar, eos_ids, 0)  # its errors say what they are
        try:
            constraint._mask()
        except GrammarError as exc:
            raise GrammarError(
                f"the {grammar.kind} grammar is not usable: no output can even begin ({exc})"
            ) from exc

    def _source(self, grammar: Grammar) -> str:
        from llguidance import LLMatcher

        with self._lock:
            if grammar in self._sources:
                return self._sources[grammar]
        try:
            source = grammar.llguidance_source()
        except Exception as exc:  # a schema llguidance's JSON compiler refuses
            raise GrammarError(f"the {grammar.kind} grammar is not usable: {exc}") from exc
        error = LLMatcher.validate_grammar(source, self.ll_tokenizer())
        if error:
            raise GrammarError(f"the {grammar.kind} grammar is not usable: {error.strip()}")
        with self._lock:
            if len(self._sources) >= self.CACHED_GRAMMARS:
                self._sources.clear()
            self._sources[grammar] = source
        return source

    def constraint(
        self, grammar: Grammar, eos_ids: Sequence[int], prompt_length: int
    ) -> GrammarConstraint:
        """A fresh constraint for one generation whose prompt has ``prompt_length`` ids and
        which ends at any of ``eos_ids``."""
        from llguidance import LLMatcher

        if not eos_ids:
            raise GrammarError(
                "constrained output needs an end-of-sequence token to end the output when the "
                "grammar is complete, and this model has none: set eos_token_id"
            )
        ll = self.ll_tokenizer(min(eos_ids))
        matcher = LLMatcher(ll, self._source(grammar), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the {grammar.kind} grammar is not usable: {_first_line(matcher)}")
        ends = Ends(frozenset(int(t) for t in eos_ids), tuple(int(t) for t in ll.eos_tokens))
        return GrammarConstraint(
            matcher, self.vocab_size, prompt_length, grammar, ends, self._special
        )


@dataclass(frozen=True)
class Ends:
    """The ids that end a generation (``request``: the loop's end-of-sequence ids) and the ones
    llguidance's vocabulary reading knows as such (``matcher``)."""

    request: frozenset[int]
    matcher: tuple[int, ...]

    @property
    def all(self) -> frozenset[int]:
        return self.request | frozenset(self.matcher)


class GrammarConstraint:
    """One generation's way through a grammar: which tokens may follow a prefix.

    Every method takes the sequence it is asked about (prompt and generated ids) and first
    brings the matcher to that sequence's generated part, rolling back what differs from the
    last call (rejected drafts) and consuming what is new (accepted tokens), so callers need not
    say what happened in between. It only consumes tokens the grammar allows and never keeps a
    draft. An end-of-sequence id ends the sequence: where the grammar is complete, the mask
    allows the request's end-of-sequence ids (and no others); rows after one (a drafter that
    drafted past it) are unreachable and left all True. llguidance can still fail on a grammar
    midway (a recursion that never ends hits its parser's limits): that is a
    :class:`GrammarError` with its first line.
    """

    def __init__(
        self,
        matcher: Any,
        vocab_size: int,
        prompt_length: int,
        grammar: Grammar,
        ends: Ends,
        special: Sequence[int] = (),
    ) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.prompt_length = prompt_length
        self.grammar = grammar
        self.ends = ends
        self._stops = ends.all
        self._request_ends = torch.tensor(sorted(ends.request), dtype=torch.long)
        self._matcher_ends = torch.tensor(ends.matcher, dtype=torch.long)
        # special tokens other than the ends: llguidance may allow one its matcher then refuses
        self._special = torch.tensor([t for t in special if t not in self._stops], dtype=torch.long)
        self._consumed: list[int] = []  # generated ids the matcher has consumed, in order
        self._bits = torch.arange(8, dtype=torch.uint8)

    def allowed(self, ids: Sequence[int], first: int, rows: int) -> torch.Tensor:
        """Masks (rows, V), True where allowed, for rows whose row i follows ``ids[: first + i]``.

        A row after a token the grammar refuses is all True: no verification reaches it (the
        token before it is rejected, having probability 0 under the constrained target)."""
        out = torch.ones(rows, self.vocab_size, dtype=torch.bool)
        if not self._sync(ids[self.prompt_length : first]):
            return out  # after an end of sequence
        ahead = [int(t) for t in ids[first : first + rows - 1]]
        valid = self.matcher.validate_tokens(ahead) if ahead else 0
        valid = min(valid, self._end_index(ahead))
        for i in range(min(rows, valid + 1)):
            out[i] = self._mask()
            if i < valid:
                self._consume([ahead[i]])
        if valid:
            self.matcher.rollback(valid)
        return out

    def valid_prefix(self, ids: Sequence[int], tokens: Sequence[int]) -> int:
        """How many of ``tokens``, following ``ids``, the grammar allows in a row (an
        end-of-sequence id where the grammar is complete included, and nothing after it)."""
        if not tokens or not self._sync(ids[self.prompt_length :]):
            return 0
        tokens = [int(t) for t in tokens]
        end = self._end_index(tokens)
        valid = int(self.matcher.validate_tokens(tokens[:end]))
        if valid < end or end == len(tokens) or tokens[end] not in self.ends.request:
            return valid
        return end + int(self._accepting(tokens[:end]))

    def _accepting(self, tokens: list[int]) -> bool:
        """Whether the grammar is complete after ``tokens`` (allowed: checked by the caller)."""
        self._consume(tokens)
        try:
            return bool(self.matcher.is_accepting())
        finally:
            if tokens:
                self.matcher.rollback(len(tokens))

    def _end_index(self, tokens: Sequence[int]) -> int:
        return next((i for i, t in enumerate(tokens) if t in self._stops), len(tokens))

    def _sync(self, generated: Sequence[int]) -> bool:
        """Bring the matcher to ``generated``; False if it holds an end of sequence (the
        matcher then stands just before it)."""
        done = self._consumed
        common = min(len(done), len(generated))
        if list(generated[:common]) != done[:common]:
            common = next(i for i in range(common) if done[i] != generated[i])
        if common < len(done):
            self.matcher.rollback(len(done) - common)
            del done[common:]
        rest = [int(t) for t in generated[common:]]
        end = self._end_index(rest)
        ended = end < len(rest)
        rest = rest[:end]
        if rest:
            valid = self.matcher.validate_tokens(rest)
            if valid < len(rest):
                raise GrammarError(
                    f"token {rest[valid]} breaks the {self.grammar.kind} grammar: the sequence "
                    "asked about does not follow it"
                )
            self._consume(rest)
            done.extend(rest)
        return not ended

    def _consume(self, tokens: list[int]) -> None:
        if tokens and not self.matcher.consume_tokens(tokens):
            raise self._failure()

    def _failure(self) -> GrammarError:
        """llguidance's matcher in its error state, as an error that says where."""
        return GrammarError(
            f"the {self.grammar.kind} grammar failed after {len(self._consumed)} generated "
            f"tokens: {_first_line(self.matcher)}"
        )

    def _mask(self) -> torch.Tensor:
        packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        if self.matcher.is_error():
            raise self._failure()
        mask = ((packed.unsqueeze(-1) >> self._bits) & 1).flatten()[: self.vocab_size].bool()
        complete = bool(self.matcher.is_accepting())  # not llguidance's end bit: see ends
        mask[self._matcher_ends] = False
        mask[self._request_ends] = complete  # the loop's own ends, and only where allowed
        for token in self._special[mask[self._special]].tolist():
            if not self.matcher.validate_tokens([token]):  # allowed, yet refused when consumed
                mask[token] = False
        if not bool(mask.any()):
            raise GrammarError(
                f"the {self.grammar.kind} grammar allows no token after {len(self._consumed)} "
                "generated tokens: it asks for text this vocabulary cannot write (or that only "
                "a special token spells)"
            )
        return mask


def _first_line(matcher: Any) -> str:
    """llguidance's error, its first line (the rest is parser state), at most 300 characters."""
    text = str(matcher.get_error()).strip().splitlines()
    return (text[0] if text else "unknown error")[:300]
