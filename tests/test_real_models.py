"""Greedy identity on the real pretrained models, where they have been pulled.

These tests never download anything: without `specdecode models pull NAME` they skip. They load
float32 models of 135M to 1.5B parameters, so they take seconds to a minute each.
"""

from __future__ import annotations

import pytest

from specdecode import ModelDrafter, PromptLookupDrafter, SpeculativeGenerator
from specdecode.errors import ModelNotPulledError
from specdecode.models import load_model
from specdecode.models.pull import pulled_path

from .conftest import REAL_HOME

pytestmark = pytest.mark.real_model

PROMPT = "def fibonacci(n):\n    "


def pulled(name: str):
    try:
        return pulled_path(name, REAL_HOME)
    except ModelNotPulledError:
        pytest.skip(f"{name} is not pulled (specdecode models pull {name})")


def hf_greedy(target, prompt: str, new: int) -> list[int]:
    enc = target.tokenizer(prompt, return_tensors="pt")
    out = target.model.generate(**enc, do_sample=False, max_new_tokens=new)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_smollm2_prompt_lookup_and_layer_skip_are_lossless():
    from specdecode.drafters.layerskip import LayerSkipDrafter
    from specdecode.models.layerskip import SkipSet

    target = load_model(pulled("smollm2-135m"), device="cpu")
    reference = hf_greedy(target, PROMPT, 48)
    layers = target.num_layers
    upper_half = list(range(layers // 2, layers - 1, 2))
    for drafter in (
        PromptLookupDrafter(),
        LayerSkipDrafter(target, SkipSet(attention=tuple(upper_half), mlp=tuple(upper_half))),
    ):
        result = SpeculativeGenerator(target, drafter, 4).generate(PROMPT, max_new_tokens=48)
        assert result.token_ids == reference, drafter.name


def test_qwen_coder_pair_is_lossless():
    pulled("qwen2.5-coder-0.5b")
    target = load_model(pulled("qwen2.5-coder-1.5b"), device="cpu")
    draft = load_model(pulled("qwen2.5-coder-0.5b"), device="cpu")
    reference = hf_greedy(target, PROMPT, 24)
    result = SpeculativeGenerator(target, ModelDrafter(draft), 4).generate(
        PROMPT, max_new_tokens=24
    )
    assert result.token_ids == reference
    # the GPU's defaults, forced here: greedy drafts and plain tokens chosen on the device
    on_device = SpeculativeGenerator(target, ModelDrafter(draft, on_device=True), 4)
    assert on_device.generate(PROMPT, max_new_tokens=24).token_ids == reference
    bursts = SpeculativeGenerator(target, None, tokens_per_sync=5)
    assert bursts.generate(PROMPT, max_new_tokens=24).token_ids == reference
    assert result.stats.accepted > 0


def test_qwen_coder_logprobs_match_transformers():
    """Each token's log-probability from speculative rounds equals transformers' own step's
    (``output_logits``), and the prompt's equal one full forward's."""
    import torch

    pulled("qwen2.5-coder-0.5b")
    target = load_model(pulled("qwen2.5-coder-1.5b"), device="cpu")
    draft = load_model(pulled("qwen2.5-coder-0.5b"), device="cpu")
    enc = target.tokenizer(PROMPT, return_tensors="pt")
    out = target.model.generate(
        **enc, do_sample=False, max_new_tokens=16, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, enc["input_ids"].shape[1] :].tolist()
    steps = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
    expected = [float(steps[i, t]) for i, t in enumerate(tokens)]
    result = SpeculativeGenerator(target, ModelDrafter(draft), 4).generate(
        PROMPT, max_new_tokens=16, logprobs=3, prompt_logprobs=0
    )
    assert result.token_ids == tokens and result.stats.accepted > 0
    assert result.logprobs is not None and result.prompt_logprobs is not None
    assert [lp.logprob for lp in result.logprobs] == pytest.approx(expected, abs=2e-3)
    with torch.no_grad():
        full = torch.log_softmax(target.model(**enc).logits[0].float(), dim=-1)
    ids = enc["input_ids"][0].tolist()
    prompt_expected = [float(full[i, t]) for i, t in enumerate(ids[1:])]
    assert [lp.logprob for lp in result.prompt_logprobs] == pytest.approx(prompt_expected, abs=2e-3)
