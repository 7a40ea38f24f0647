"""Stops are exact even when several tokens are accepted at once."""

from __future__ import annotations

import pytest
import torch

from specdecode import ModelDrafter, SpeculativeGenerator
from specdecode.decoding import TextStream
from specdecode.models import LoadedModel

PROMPT = "def add(a, b):"


def _self_drafting(tiny, arch="llama", k=6):
    """The target drafting for itself: every round accepts all k tokens at once."""
    t = tiny(arch)
    twin = LoadedModel(t.model, t.tokenizer, t.name, t.dtype, t.device)
    return SpeculativeGenerator(t, ModelDrafter(twin), draft_length=k)


def test_eos_inside_an_accepted_block_ends_the_output_there(tiny):
    gen = _self_drafting(tiny)
    full = gen.generate(PROMPT, max_new_tokens=40).token_ids
    eos_index = 9  # inside the second accepted block of 7 tokens
    eos = full[eos_index]
    first = full.index(eos)
    result = gen.generate(PROMPT, max_new_tokens=40, eos_token_id=eos)
    assert result.token_ids == full[: first + 1]
    assert result.finish_reason == "eos"
    # transformers agrees
    t = tiny("llama")
    enc = t.tokenizer(PROMPT, return_tensors="pt")
    ref = t.model.generate(**enc, do_sample=False, max_new_tokens=40, eos_token_id=eos)
    assert result.token_ids == ref[0, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("max_new", [1, 2, 5, 7, 8, 13, 30])
def test_max_new_tokens_is_exact(tiny, max_new):
    gen = _self_drafting(tiny)
    result = gen.generate(PROMPT, max_new_tokens=max_new, eos_token_id=[])
    assert len(result.token_ids) == max_new
    assert result.finish_reason == "length"
    assert result.stats.new_tokens == max_new


def test_stop_string_cuts_text_at_first_occurrence(tiny):
    gen = _self_drafting(tiny)
    full = gen.generate(PROMPT, max_new_tokens=40, eos_token_id=[])
    text = full.text
    stop = text[12:15]
    assert len(stop) == 3 and stop.strip()
    cut = text.index(stop)
    result = gen.generate(PROMPT, max_new_tokens=40, eos_token_id=[], stop=[stop])
    assert result.finish_reason == "stop_string"
    assert result.text == text[:cut]
    # the tokens kept are exactly those needed to complete the stop string
    tok = tiny("llama").tokenizer
    kept = tok.decode(result.token_ids)
    assert stop in kept and stop not in tok.decode(result.token_ids[:-1])
    # streamed pieces never contain the stop string
    pieces = [e.text for e in gen.stream(PROMPT, max_new_tokens=40, eos_token_id=[], stop=stop)]
    assert "".join(pieces) == text[:cut]


class _CharTokenizer:
    """Bytes as tokens, decoded as UTF-8 with replacement (like a byte-level BPE)."""

    def decode(self, ids, **_):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_never_splits_a_character():
    stream = TextStream(_CharTokenizer())
    pieces = [stream.push([b]).text for b in "né✓🙂".encode()]
    pieces.append(stream.flush())
    assert "".join(pieces) == "né✓🙂"
    assert all("\ufffd" not in piece for piece in pieces)


def test_text_stream_holds_back_a_possible_stop_string():
    stream = TextStream(_CharTokenizer(), stop_strings=["STOP"])
    out = [stream.push(list(b"abc ST")).text]
    assert out == ["abc "]
    update = stream.push(list(b"OP tail"))
    assert update.text == "" and update.keep_tokens == 2 and stream.stopped
    assert stream.text == "abc "
    other = TextStream(_CharTokenizer(), stop_strings=["STOP"])
    assert other.push(list(b"abc ST")).text == "abc "
    assert other.push(list(b"ART")).text == "START"


class _CountingTokenizer:
    """A tokenizer's decode, counting the ids it is asked to decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_text_stream_decodes_incrementally_to_the_whole_text(tiny, arch):
    """Each push decodes a bounded window, not the whole output again, and the text is the
    whole output's decode at every step, multi-byte characters split across pushes included."""
    tokenizer = tiny(arch).tokenizer
    text = ("Héllo wörld, ünïcode ✓ café 你好 世界 🙂 def add(a, b): return a + b\n" * 12).strip()
    ids = tokenizer(text)["input_ids"]
    counting = _CountingTokenizer(tokenizer)
    stream = TextStream(counting)
    gen = torch.Generator().manual_seed(0)
    released, start = [], 0
    while start < len(ids):
        size = int(torch.randint(1, 6, (1,), generator=gen))
        before = counting.decoded
        released.append(stream.push(ids[start : start + size]).text)
        start += size
        whole = tokenizer.decode(ids[:start], skip_special_tokens=True)
        assert stream._full == whole
        # a few windows of context, unsettled and pushed tokens (more while a character is
        # split), however long the output: decoding it whole would cost up to len(ids)
        assert counting.decoded - before <= 100
    released.append(stream.flush())
    assert "".join(released) == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 200


def test_text_stream_finds_a_stop_string_past_the_settled_text():
    stream = TextStream(_CharTokenizer(), stop_strings=["STOP"])
    out = [stream.push(list(bytes([b]))).text for b in b"a long line of text before the "]
    update = stream.push(list(b"ST"))
    assert update.text == ""
    update = stream.push(list(b"OP and after"))
    assert update.keep_tokens == 2 and stream.stopped
    assert "".join(out) + update.text == "a long line of text before the "
    assert stream.flush() == ""
