"""oneDNN-packed linear layers: the same products as torch's, switchable both ways, chosen only
where they can run, and the same greedy output through our loop as transformers' on torch's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from specdecode import SpeculativeGenerator
from specdecode.bench.catalog import ModeConfig, standard_modes
from specdecode.bench.modes import TransformersMode
from specdecode.decoding import GenerationRequest
from specdecode.drafters import FixedLength, ModelDrafter, PromptLookupDrafter
from specdecode.errors import InvalidSettingsError
from specdecode.models import load_model
from specdecode.models.kernels import (
    ONEDNN,
    TORCH,
    KernelError,
    PackedLinear,
    choose_kernels,
    onednn_usable,
    pack_linears,
)
from specdecode.sampling import SamplingSettings

needs_onednn = pytest.mark.skipif(
    not onednn_usable(torch.float32), reason="this torch build has no oneDNN packed linear"
)
CPU = torch.device("cpu")


def logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 17])
def test_packed_linear_computes_the_same_product(rows):
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 40)
    x = torch.randn(2, rows, 96, generator=gen)  # (B, T, in): leading dimensions kept
    with torch.no_grad():
        want, got = linear(x), PackedLinear(linear)(x)
    assert got.shape == (2, rows, 40)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(PackedLinear(linear).weight, linear.weight.detach())


@needs_onednn
def test_auto_picks_onednn_for_float32_and_bfloat16_cpu_models_only():
    assert choose_kernels("auto", CPU, torch.float32) == ONEDNN
    assert choose_kernels("auto", CPU, torch.qint8) == TORCH  # int8 has its own kernels
    assert choose_kernels("auto", CPU, torch.float16) == TORCH
    assert choose_kernels("auto", torch.device("cuda"), torch.bfloat16) == TORCH
    assert choose_kernels("torch", CPU, torch.float32) == TORCH


def test_impossible_kernel_choices_say_what_to_do():
    with pytest.raises(KernelError, match="choose one of auto, onednn, torch"):
        choose_kernels("mkl", CPU, torch.float32)
    with pytest.raises(KernelError, match="use --cpu-kernels torch or auto"):
        choose_kernels("onednn", torch.device("cuda"), torch.float32)
    with pytest.raises(KernelError, match="qint8"):
        choose_kernels("onednn", CPU, torch.qint8)
    assert issubclass(KernelError, InvalidSettingsError)  # the CLI prints it without traceback


@needs_onednn
def test_loading_packs_every_linear_and_can_switch_back(tiny_dir):
    plain = load_model(tiny_dir("qwen2"), device="cpu", kernels="torch")
    packed = load_model(tiny_dir("qwen2"), device="cpu", keep_torch_kernels=True)
    linears = sum(type(m) is nn.Linear for m in plain.model.modules())
    assert linears > 0 and packed.kernel_name == ONEDNN
    assert sum(type(m) is PackedLinear for m in packed.model.modules()) == linears
    assert not any(type(m) is nn.Linear for m in packed.model.modules())

    ids = [5, 6, 7, 8, 9, 10]
    assert torch.allclose(logits(packed.model, ids), logits(plain.model, ids), atol=1e-5)
    with packed.using_kernels(TORCH) as kind:
        assert kind == TORCH
        assert torch.equal(logits(packed.model, ids), logits(plain.model, ids))
    assert packed.kernel_name == ONEDNN
    assert sum(type(m) is PackedLinear for m in packed.model.modules()) == linears


@needs_onednn
def test_switching_needs_the_kept_layers(tiny_dir):
    packed = load_model(tiny_dir("llama"), device="cpu")  # originals freed
    kept_none = pytest.raises(KernelError, match="without keeping the original layers")
    with kept_none, packed.using_kernels(TORCH):
        pass
    with packed.using_kernels(TORCH, required=False) as kind:
        assert kind == ONEDNN  # stays where it is
    plain = load_model(tiny_dir("llama"), device="cpu", kernels="torch")
    with pytest.raises(KernelError, match="torch's kernels only"), plain.using_kernels(ONEDNN):
        pass


@needs_onednn
def test_a_packed_model_can_be_deep_copied(tiny):
    model = tiny("gpt2").model  # gpt2's Conv1D layers are not nn.Linear: only lm_head is packed
    kernels = pack_linears(copy.deepcopy(model))
    twin = copy.deepcopy(kernels.model)
    ids = [3, 4, 5]
    assert torch.equal(logits(twin, ids), logits(kernels.model, ids))


@needs_onednn
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("drafter", ["model", "lookup"])
def test_greedy_output_on_onednn_equals_transformers_on_torch_kernels(tiny_dir, arch, drafter):
    """Our loop on packed target (and draft) against transformers' ``generate`` on the same
    model switched back to torch's kernels, as the benchmark runs them."""
    target = load_model(tiny_dir(arch), device="cpu", keep_torch_kernels=True)
    if drafter == "model":
        draft = load_model(tiny_dir(arch, "perturbed"), device="cpu")
        assert draft.kernel_name == ONEDNN
        generator = SpeculativeGenerator(target, ModelDrafter(draft), FixedLength(4))
    else:
        generator = SpeculativeGenerator(target, PromptLookupDrafter(), FixedLength(4))
    tok = target.tokenizer
    for prompt in ["def add(a, b):", "the cat sat on the mat. the cat"]:
        ids = tok(prompt).input_ids
        with target.using_kernels(TORCH), torch.inference_mode():
            want = target.model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=24, min_new_tokens=24
            )[0, len(ids) :].tolist()
        got = generator.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[])
        assert got.token_ids == want


@needs_onednn
def test_transformers_modes_run_on_torch_kernels_ours_on_onednn(tiny_dir):
    target = load_model(tiny_dir("qwen2"), device="cpu", keep_torch_kernels=True)
    seen: list[str] = []
    target.model.register_forward_pre_hook(
        lambda module, args: seen.append(type(module.lm_head).__name__)
    )
    modes = {m.name: m for m in standard_modes(target, ["hf-plain", "ours-plain"], ModeConfig())}
    assert isinstance(modes["hf-plain"], TransformersMode)
    request = GenerationRequest(
        sampling=SamplingSettings(), max_new_tokens=4, eos_token_ids=frozenset(), stop_strings=()
    )
    prompt = target.tokenizer("def add(a, b):").input_ids
    modes["hf-plain"].run(prompt, request, seed=0)
    assert set(seen) == {"Linear"}
    seen.clear()
    modes["ours-plain"].run(prompt, request, seed=0)
    assert set(seen) == {"PackedLinear"}
    assert modes["hf-plain"].describe()["kernels"] == TORCH
    assert modes["ours-plain"].describe()["kernels"] == ONEDNN


@needs_onednn
def test_packing_copies_the_weights_it_leaves_out_of_the_checkpoint_mapping():
    """Without kept originals, the parameters left unpacked get memory of their own (so a
    memory-mapped checkpoint is let go), with the same values."""
    from specdecode.testing import make_tiny_model

    model = make_tiny_model(arch="qwen2")
    embedding = model.get_input_embeddings().weight
    before_ptr, before = embedding.data_ptr(), embedding.detach().clone()
    pack_linears(model)
    after = model.get_input_embeddings().weight
    assert after is embedding  # the same Parameter (ties hold), new storage
    assert after.data_ptr() != before_ptr and torch.equal(after, before)
    kept = make_tiny_model(arch="qwen2")
    ptr = kept.get_input_embeddings().weight.data_ptr()
    pack_linears(kept, keep_originals=True)  # the originals are kept as they are
    assert kept.get_input_embeddings().weight.data_ptr() == ptr
