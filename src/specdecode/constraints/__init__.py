"""Structured output: constrain what the target may say (JSON, a JSON schema, a regex, a Lark
grammar, one of several strings) without changing what it would say among what is allowed.

A :class:`Grammar` says what is allowed; :class:`GrammarConstraint` follows one generation
through it and masks the tokens that would leave it, for the target's verification rows and for
the draft's own choices alike (see :mod:`specdecode.constraints.grammar`).
"""

from specdecode.constraints.grammar import Grammar, GrammarCompiler, GrammarConstraint

__all__ = ["Grammar", "GrammarCompiler", "GrammarConstraint"]
