"""The pass profile (bench/step_profile.py): where a decoding pass's time goes."""

from __future__ import annotations

import json

import pytest
import torch

from specdecode.bench.step_profile import kernel_group, main, profile_passes
from specdecode.bench.synthetic import weight_bytes
from specdecode.models import load_model


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT", "matmul"),
        ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "matmul"),
        ("aten::addmm", "matmul"),
        ("mkldnn::_linear_pointwise", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_11", "other"),
        ("aten::silu", "other"),
        ("aten::bmm", "matmul"),
        ("triton_tem_fused_mm_0", "matmul"),
        ("quantized::linear_dynamic", "matmul"),
        ("triton_poi_fused_addmm_gelu_3", "other"),  # a bias fused with its activation
        ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_4", "other"),
        ("aten::summary_of_commits", "other"),  # "mm" inside a word is not a product
    ],
)
def test_kernels_are_grouped_by_name(name, group):
    assert kernel_group(name) == group


def test_each_size_is_timed_and_split_into_groups_and_the_session_keeps_the_context(tiny):
    loaded = tiny("qwen2")
    session = loaded.new_session()
    context = list(range(20, 52))
    passes = profile_passes(session, context, sizes=(1, 4), repetitions=3)
    assert [p.tokens for p in passes] == [1, 4]
    for item in passes:
        assert item.wall_seconds > 0 and item.profiled_seconds > 0
        assert set(item.kernel_seconds) == {"matmul", "attention", "other"}
        assert item.kernel_seconds["matmul"] > 0  # the linear layers ran, on oneDNN here
        assert item.kernel_seconds["attention"] > 0
        assert item.kernel_total > 0
        assert item.host_seconds >= 0
        assert item.top_kernels and item.top_kernels[0][1] >= item.top_kernels[-1][1]
    assert session.length == len(context)  # every timed pass was rolled back


def test_bad_sizes_are_refused_with_the_range(tiny):
    session = tiny("qwen2").new_session()
    with pytest.raises(ValueError, match=r"sizes must be in \[1, 8\]"):
        profile_passes(session, list(range(20, 28)), sizes=(0,))
    with pytest.raises(ValueError, match="non-empty context"):
        profile_passes(session, [], sizes=(1,))


def test_packed_weights_count_as_the_bytes_a_step_reads(tiny_dir):
    packed = load_model(tiny_dir("qwen2"), device="cpu", kernels="onednn")
    plain = load_model(tiny_dir("qwen2"), device="cpu", kernels="torch")
    assert weight_bytes(packed.model) == weight_bytes(plain.model)


def test_int8_weights_count_one_byte_each(tiny_dir):
    """Dynamically quantized layers keep their weights outside the parameters: a step still
    reads each of them, one byte a weight (with the float32 embeddings and norms beside)."""
    int8 = load_model(tiny_dir("qwen2"), device="cpu", dtype="int8")
    plain = load_model(tiny_dir("qwen2"), device="cpu", kernels="torch")
    linear = sum(
        module.weight.numel()
        for module in plain.model.modules()
        if isinstance(module, torch.nn.Linear)
    )
    assert weight_bytes(int8.model) == weight_bytes(plain.model) - 3 * linear


def test_the_command_writes_a_report(tmp_path):
    assert (
        main(
            [
                "--tiny",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--sizes",
                "1,3",
                "--context",
                "16",
                "--repetitions",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "profile.json").read_text())
    assert [p["tokens"] for p in report["passes"]] == [1, 3]
    assert report["weight_bytes"] > 0
    markdown = (tmp_path / "profile.md").read_text()
    assert "| 1 |" in markdown and "| 3 |" in markdown


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sizes", "0"], "--sizes must be in"),
        (["--sizes", "200"], "--sizes must be in"),
        (["--sizes", "one"], "comma-separated integers"),
        (["--repetitions", "0"], "--repetitions must be at least 1"),
        (["--dtype", "foo"], "--dtype must be one of"),
        (["--forward", "lean"], "--forward lean needs --model"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        main(["--tiny", "--device", "cpu", "--out", str(tmp_path), *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_is_refused_clearly_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--out", str(tmp_path)])
