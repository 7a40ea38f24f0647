"""Checking that a draft model speaks the target's vocabulary."""

from __future__ import annotations

from typing import Any

from specdecode.errors import VocabularyMismatchError


def check_same_vocabulary(target_tokenizer: Any, draft_tokenizer: Any) -> None:
    """Raise :class:`VocabularyMismatchError` unless both tokenizers map the same strings to the
    same ids.

    The embedding matrices may still be padded to different sizes (Qwen2.5 0.5B and 1.5B are such
    a pair): only the tokenizers' own vocabularies are compared.
    """
    target_vocab = target_tokenizer.get_vocab()
    draft_vocab = draft_tokenizer.get_vocab()
    if target_vocab == draft_vocab:
        return
    only_target = len(target_vocab.keys() - draft_vocab.keys())
    only_draft = len(draft_vocab.keys() - target_vocab.keys())
    moved = sum(
        1 for tok, idx in target_vocab.items() if tok in draft_vocab and draft_vocab[tok] != idx
    )
    raise VocabularyMismatchError(
        "the draft model's tokenizer does not match the target's "
        f"(target {len(target_vocab)} tokens, draft {len(draft_vocab)}; {only_target} only in the "
        f"target, {only_draft} only in the draft, {moved} with different ids). A draft model must "
        "share the target's tokenizer (e.g. a smaller model of the same family); otherwise use "
        "--prompt-lookup or a layer-skip profile."
    )
