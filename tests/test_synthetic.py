"""The synthetic (GPU) benchmark, run on tiny models on the CPU; on CUDA when there is one."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from specdecode.bench.synthetic import (
    TINY,
    build_pair,
    main,
    memory_bandwidth,
    run_synthetic,
    weight_bytes,
)
from specdecode.models import ModelSession


def test_the_draft_is_the_targets_first_layers_and_eps_sets_how_far_apart_they_are():
    target, draft = build_pair(TINY, torch.device("cpu"), torch.float32)
    assert len(draft.model.model.layers) == TINY.draft_layers
    assert draft.model.model.layers[0] is target.model.model.layers[0]
    assert draft.model.lm_head is target.model.lm_head
    # the draft shares every weight it has: the target's bytes count each tensor once
    assert weight_bytes(draft.model) < weight_bytes(target.model)
    ids = list(range(20, 60))

    def logits(model):
        return ModelSession(model).forward(ids, len(ids))

    close = (logits(target.model) - logits(draft.model)).abs().mean()
    far_spec = dataclasses.replace(TINY, eps=1.0)
    far_target, far_draft = build_pair(far_spec, torch.device("cpu"), torch.float32)
    far = (logits(far_target.model) - logits(far_draft.model)).abs().mean()
    assert close < far / 5


def test_memory_bandwidth_is_a_positive_rate():
    assert memory_bandwidth(torch.device("cpu"), 1 << 22, repeats=2) > 1e8


def test_a_tiny_run_reports_every_mode_identity_and_the_bound(tmp_path):
    report = run_synthetic(
        TINY,
        torch.device("cpu"),
        tmp_path,
        dtypes=["float32"],
        full_dtypes=["float32"],
        ks=[3],
        prompts=2,
        prompt_tokens=24,
        max_new_tokens=20,
        compile_backend="eager",  # traces the same graphs as inductor, without generating code
        progress=lambda line: None,
    )
    assert report.errors == []
    modes = {m.name: m for m in report.modes}
    assert set(modes) == {
        "float32 hf-plain",
        "float32 ours-plain (compiled)",
        "float32 ours-plain (compiled, per-token read back)",
        "float32 ours-plain (eager)",
        "float32 ours-draft k=3 (compiled)",
        "float32 ours-draft k=3 (compiled, per-token read back)",
        "float32 ours-draft k=3 (eager)",
        "float32 hf-assisted k=3",
    }
    for mode in modes.values():
        assert mode.tokens_per_second and mode.tokens_per_second > 0
        assert all(len(t) == 20 for t in mode.tokens)
        if mode.name != "float32 hf-plain":
            assert mode.identical_prompts == 2, mode.name  # float32: identical to transformers
    draft = modes["float32 ours-draft k=3 (compiled)"]
    assert draft.alpha is not None and 0 < draft.alpha <= 1
    assert draft.c is not None and 0 < draft.c < 1  # 1 of 4 layers
    assert draft.bound and draft.efficiency and draft.identical_to_our_plain == 2
    assert modes["float32 ours-plain (compiled)"].bandwidth_fraction is not None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["modes"]) == 8
    assert "ours-draft k=3 (compiled)" in (tmp_path / "results.md").read_text()


def _short_run(tmp_path, **kwargs):
    """One prompt of 16 tokens, 8 new, k = 2, on the CPU, with the ``eager`` compile backend."""
    return run_synthetic(
        TINY,
        torch.device("cpu"),
        tmp_path,
        ks=[2],
        prompts=1,
        prompt_tokens=16,
        max_new_tokens=8,
        compile_backend="eager",
        progress=lambda line: None,
        **kwargs,
    )


def test_other_dtypes_run_only_the_identity_modes_and_failures_are_recorded(tmp_path):
    bad = dataclasses.replace(TINY, draft_layers=TINY.num_layers)  # no layers left to scale
    code = main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--dtypes",
            "float32",
            "--draft-layers",
            str(bad.draft_layers),
            "--compile-backend",
            "eager",
        ]
    )
    assert code == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert any("draft_layers must be" in e for e in saved["errors"])
    report = _short_run(tmp_path, dtypes=["bfloat16"], full_dtypes=[])
    assert [m.name for m in report.modes] == [
        "bfloat16 hf-plain",
        "bfloat16 ours-plain (compiled)",
        "bfloat16 ours-draft k=2 (compiled)",
    ]
    # where device time is short, modes can be chosen (here: all but our eager ones)
    chosen = ["hf-plain", "plain", "plain-per-token", "draft", "draft-per-token", "hf-assisted"]
    report = _short_run(tmp_path, dtypes=["float32"], full_dtypes=["float32"], modes=chosen)
    assert [m.name for m in report.modes] == [
        "float32 hf-plain",
        "float32 ours-plain (compiled)",
        "float32 ours-plain (compiled, per-token read back)",
        "float32 ours-draft k=2 (compiled)",
        "float32 ours-draft k=2 (compiled, per-token read back)",
        "float32 hf-assisted k=2",
    ]
    assert report.settings["modes"] == chosen
    # freezing needs inductor: with the eager backend its mode records why, and the run goes on
    report = _short_run(tmp_path, dtypes=["float32"], full_dtypes=[], modes=["plain-frozen"])
    assert [m.name for m in report.modes] == ["float32 ours-plain (compiled, frozen)"]
    assert "inductor" in (report.modes[0].error or "") and report.errors
    with pytest.raises(ValueError, match="unknown modes"):
        _short_run(tmp_path, dtypes=["float32"], modes=["plain", "fast"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_sessions_on_cuda_match_transformers_in_float32(tmp_path):
    """The CUDA-graph path (inductor, reduce-overhead) on tiny models: float32 tokens equal."""
    report = run_synthetic(
        TINY,
        torch.device("cuda"),
        tmp_path,
        dtypes=["float32"],
        full_dtypes=[],
        ks=[3],
        prompts=2,
        prompt_tokens=24,
        max_new_tokens=24,
        progress=lambda line: None,
    )
    assert report.errors == []
    for mode in report.modes[1:]:
        assert mode.identical_prompts == 2, mode.name
