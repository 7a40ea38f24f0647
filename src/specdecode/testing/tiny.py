"""Tiny random causal LMs with a real byte-level BPE tokenizer, saved as ordinary HF folders.

Everything is built locally in well under a second: a tokenizer trained on a few lines of text,
and a model of one of several architectures built from a small config with seeded weights.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "qwen2", "gpt2", "mistral")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "Héllo wörld, ünïcode ✓ café naïve 你好 世界 🙂",
    "import torch\nx = torch.zeros(3, 4)\nprint(x.shape)\n",
]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _trained_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok


def tiny_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer (any text encodes) with ``<|endoftext|>`` as BOS/EOS/pad."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_trained_tokenizer(vocab_size),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _config(
    arch: str, vocab_size: int, layers: int, hidden: int, context: int, **fields: Any
) -> Any:
    """The tiny config of ``arch``; ``fields`` set more of it (or override these)."""
    from transformers import AutoConfig

    common: dict[str, Any] = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0}
    if arch == "gpt2":
        sizes = {"n_layer": layers, "n_embd": hidden, "n_head": 4, "n_positions": context}
        return AutoConfig.for_model("gpt2", **(sizes | common | fields))
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    sizes = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": context,
        "tie_word_embeddings": False,
    }
    return AutoConfig.for_model(arch, **(sizes | common | fields))


def make_tiny_model(
    folder: str | Path | None = None,
    arch: str = "llama",
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    vocab_size: int = 320,
    context: int = 512,
    init_std: float = 0.2,
    **config_fields: Any,
) -> Any:
    """Build a seeded random model; save it with its tokenizer to ``folder`` when one is given.

    ``init_std`` is larger than a real model's so that the output distribution is peaked enough
    for greedy ties to be vanishingly rare; ``config_fields`` set more of the config (e.g.
    ``sliding_window=16``). Returns the model (eval mode, float32).
    """
    from transformers import AutoModelForCausalLM

    config = _config(arch, vocab_size, layers, hidden, context, **config_fields)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    model.generation_config.pad_token_id = 0
    if folder is not None:
        folder = Path(folder)
        model.save_pretrained(folder)
        tiny_tokenizer(vocab_size).save_pretrained(folder)
    return model


def perturbed_copy(folder: str | Path, out: str | Path, scale: float, seed: int = 1) -> None:
    """Save a copy of the model in ``folder`` with Gaussian noise (std ``scale``) on its weights:
    a draft that agrees with the target often but not always."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
