"""``specdecode bench`` on tiny models from configs: files, fields, identity, loud failures."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from specdecode.bench import (
    REFERENCE,
    BenchCase,
    BenchOptions,
    BenchRunner,
    Mode,
    ModeConfig,
    ModeOutput,
    leviathan_speedup,
    run_benchmark,
    standard_modes,
    write_report,
)
from specdecode.bench.catalog import (
    HF_ASSISTED,
    MODE_NAMES,
    NEEDS_SKIP,
    OURS_DRAFT,
    OURS_PLAIN,
    select_modes,
)
from specdecode.bench.costs import StepCosts
from specdecode.bench.modes import TransformersMode, assistant_settings
from specdecode.bench.runner import BenchRun, Record, first_difference
from specdecode.bench.stats import ALL, merge_stats, summarize
from specdecode.cli import bench as bench_cli
from specdecode.cli.main import main
from specdecode.decoding import GenerationStats, SpeculativeGenerator
from specdecode.errors import InvalidSettingsError
from specdecode.models import load_model
from specdecode.testing import make_tiny_model, perturbed_copy

NEW = 8  # new tokens per generation: enough for several rounds, few enough to stay fast
PROMPTS = [
    {"question_id": 1, "category": "code", "turns": ["def add(a, b):\n    return"]},
    {"question_id": 2, "category": "code", "turns": ["for i in range(10):"]},
    {"question_id": 3, "category": "chat", "turns": ["The quick brown fox jumps over"]},
    {"question_id": 4, "category": "chat", "turns": ["Speculative decoding drafts tokens"]},
]


# ------------------------------------------------------------------------------ pure parts
def test_leviathan_bound_matches_the_paper_formula():
    # (1 - a^(k+1)) / ((1 - a)(k c + 1)) with a = 0.8, k = 4, c = 0.1
    assert leviathan_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8**5) / (0.2 * 1.4))
    assert leviathan_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)  # nothing accepted
    assert leviathan_speedup(1.0, 4, 0.1) == pytest.approx(5 / 1.4)  # everything accepted
    # cost-aware: the measured verification cost replaces the 1 in the denominator
    assert leviathan_speedup(0.8, 4, 0.1, 1.8) == pytest.approx((1 - 0.8**5) / (0.2 * 2.2))
    with pytest.raises(ValueError):
        leviathan_speedup(1.2, 4, 0.1)


def test_merge_stats_adds_counters_and_positions():
    a, b = GenerationStats(), GenerationStats()
    a.record_round(drafted=3, accepted=1)
    b.record_round(drafted=5, accepted=5)
    a.new_tokens, b.new_tokens, a.draft_seconds, b.draft_seconds = 2, 6, 0.5, 0.25
    total = merge_stats([a, b])
    assert (total.rounds, total.drafted, total.accepted, total.rejected_rounds) == (2, 8, 6, 1)
    assert total.drafted_per_position == [2, 2, 2, 1, 1]
    assert total.accepted_per_position == [2, 1, 1, 1, 1]
    assert total.new_tokens == 8 and total.draft_seconds == pytest.approx(0.75)
    assert total.alpha == pytest.approx(6 / 7)


def test_efficiency_over_our_plain_loop_leaves_the_prefill_out():
    case = BenchCase(prompt_id="1", category="code", prompt_ids=[1, 2, 3])
    run = BenchRun(cases=[case], modes=[REFERENCE, OURS_PLAIN, OURS_DRAFT], greedy=True)

    def record(mode, seconds, ttft, rounds):
        stats = GenerationStats(new_tokens=9, prompt_tokens=3)
        stats.total_seconds, stats.time_to_first_token = seconds, ttft
        for _ in range(rounds):
            stats.record_round(drafted=2, accepted=1)
        return Record("1", "code", mode, 0, 0, seconds, 3, list(range(9)), None, None,
                      None if mode == REFERENCE else stats, True)  # fmt: skip

    # a 6 s prefill in every mode; decoding 8 tokens: 8 s plain, 2 s with drafts
    run.records = [record(REFERENCE, 20.0, 6.0, 0), record(OURS_PLAIN, 14.0, 6.0, 0),
                   record(OURS_DRAFT, 8.0, 6.0, 4)]  # fmt: skip
    costs = StepCosts(context_tokens=3, repetitions=1, target_step=1.0, verify={2: 1.0},
                      draft_step={"draft": 0.1}, kernels="onednn")  # fmt: skip
    plain_of = {OURS_DRAFT: OURS_PLAIN}
    (draft,) = [
        s for s in summarize(run, costs, {OURS_DRAFT: "draft"}, plain_of)
        if s.mode == OURS_DRAFT and s.category == ALL
    ]  # fmt: skip
    assert draft.speedup_median == pytest.approx(20.0 / 8.0)  # tokens/s, prefill included
    # the bound is held against decoding alone: 4x over our plain loop, not 14 / 8
    assert draft.efficiency_cost_aware == pytest.approx(4.0 / draft.bound_cost_aware)
    assert any("prefill" in note for note in draft.notes)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2  # one ended early
    assert first_difference([], [4]) == 0


def test_select_modes_keeps_the_reference_and_rejects_what_cannot_run():
    available = [m for m in MODE_NAMES if m != "ours-layer-skip"]
    assert select_modes(["ours-draft"], available) == [REFERENCE, "ours-draft"]
    assert select_modes(None, available) == available
    with pytest.raises(InvalidSettingsError, match="unknown mode"):
        select_modes(["fastest"], available)
    with pytest.raises(InvalidSettingsError, match="--skip-profile"):
        select_modes(["ours-layer-skip"], available)


# ------------------------------------------------------------------------------ with models
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny target and a perturbed copy of it as its draft (agrees often, not always)."""
    target = tmp_path_factory.mktemp("bench-target")
    draft = tmp_path_factory.mktemp("bench-draft")
    make_tiny_model(target, "llama", seed=0)
    perturbed_copy(target, draft, scale=0.03)
    return target, draft


@pytest.fixture(scope="module")
def models(folders):
    return tuple(load_model(folder, device="cpu") for folder in folders)


@pytest.fixture(scope="module")
def cases(models):
    target, _ = models
    encoder = SpeculativeGenerator(target)
    return [
        BenchCase(str(p["question_id"]), p["category"], encoder.encode(p["turns"][0]))
        for p in PROMPTS
    ]


def test_modes_rotate_so_each_takes_every_slot(models):
    target, draft = models
    modes = standard_modes(target, [REFERENCE, OURS_PLAIN, OURS_DRAFT], ModeConfig(), draft=draft)
    runner = BenchRunner(target, modes, {}, repeats=2)
    firsts = [runner.order(i, r)[0].name for i in range(3) for r in range(2)]
    assert set(firsts) == {REFERENCE, OURS_PLAIN, OURS_DRAFT}
    assert sorted(m.name for m in runner.order(1, 1)) == sorted(m.name for m in modes)


def test_a_draft_with_a_prompt_window_has_a_cost_of_its_own(models):
    """transformers' assistant reads the whole prompt, our windowed draft does not: the bench
    must time their draft steps apart, not take one for the other."""
    target, draft = models
    names = [HF_ASSISTED, OURS_DRAFT]
    plain = {m.name: m for m in standard_modes(target, names, ModeConfig(), draft=draft)}
    windowed = ModeConfig(draft_prompt_window=8)
    cut = {m.name: m for m in standard_modes(target, names, windowed, draft=draft)}
    assert plain[OURS_DRAFT].cost_probe.key == plain[HF_ASSISTED].cost_probe.key
    assert cut[OURS_DRAFT].cost_probe.key == f"{cut[HF_ASSISTED].cost_probe.key}, prompt window 8"
    assert cut[OURS_DRAFT].generator.drafter.prompt_window == 8


def test_a_lean_draft_is_timed_apart_from_transformers_assistant(models, folders):
    """Our draft mode runs the lean forward, transformers' assistant its own: the bench times
    the two draft steps apart, each on the forward that mode runs."""
    target, _ = models
    draft = load_model(folders[1], device="cpu", forward="lean")
    modes = {
        m.name: m
        for m in standard_modes(target, [HF_ASSISTED, OURS_DRAFT], ModeConfig(), draft=draft)
    }
    ours, theirs = modes[OURS_DRAFT].cost_probe, modes[HF_ASSISTED].cost_probe
    assert theirs.key == f"{ours.key}, transformers' forward"
    assert ours.drafter.draft.lean is not None and theirs.drafter.draft.lean is None
    assert modes[HF_ASSISTED].assistant.model is draft.model


def test_heuristic_schedule_starts_equal_on_every_call(models, cases):
    """transformers writes the heuristic's last draft length back into the assistant's config;
    the mode gives every call a fresh copy and restores the original."""
    target, draft = models
    original = draft.model.generation_config
    before = original.to_dict()
    overrides = {"num_assistant_tokens": 5, "num_assistant_tokens_schedule": "heuristic"}
    with assistant_settings(draft.model, overrides) as config:
        assert draft.model.generation_config is config and config.num_assistant_tokens == 5
    assert draft.model.generation_config is original
    mode = TransformersMode("hf", target, assistant=draft, assistant_overrides=overrides)
    plain = TransformersMode(REFERENCE, target)
    runner = BenchRunner(target, [plain, mode], {"max_new_tokens": NEW}, warmup=0)
    run = runner.run(cases[:2])
    assert not run.mismatches
    assert draft.model.generation_config is original
    assert original.to_dict() == before
    assert mode.describe()["num_assistant_tokens"] == 5


def _check_summary_fields(summary, family: str) -> None:
    """Every field that applies to a mode is filled."""
    always = [
        "tokens_per_second_median",
        "tokens_per_second_aggregate",
        "speedup_median",
        "speedup_aggregate",
        "tau",
        "identical",
    ]
    drafting = [
        "alpha",
        "acceptance_per_position",
        "mean_draft_length",
        "draft_time_share",
        "draft_prefill_share",
        "c",
        "verify_cost",
        "bound_paper",
        "bound_cost_aware",
        "efficiency_paper",
        "efficiency_cost_aware",
    ]
    wanted = always + (drafting if family == "ours-drafting" else [])
    missing = [f for f in wanted if summary.get(f) is None]
    assert not missing, f"{summary['mode']}/{summary['category']}: empty {missing}"
    for name in ("tokens_per_second_median", "speedup_median", "tau"):
        assert math.isfinite(summary[name]) and summary[name] > 0


def _in_git_checkout() -> bool:
    """Whether specdecode runs from a git checkout (so a commit must be recorded)."""
    folder = Path(bench_cli.__file__).parent
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True)
    return done.returncode == 0


def _write_prompts(tmp_path) -> str:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def _bench_args(folders, tmp_path, out) -> list[str]:
    return [
        "bench",
        "--target",
        str(folders[0]),
        "--draft",
        str(folders[1]),
        "--prompts",
        _write_prompts(tmp_path),
        "--limit",
        "1",
        "--max-new-tokens",
        str(NEW),
        "--warmup",
        "1",
        "--cost-repeats",
        "2",
        "--out",
        str(out),
    ]


def test_bench_cli_writes_every_file_with_every_field(folders, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(_bench_args(folders, tmp_path, out)) == 0
    for name in (
        "results.json",
        "results.md",
        "speedup_by_category.png",
        "acceptance_by_position.png",
    ):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())

    env = data["environment"]
    assert env["cpu_model"] and env["cpu_cores"] >= 1
    if _in_git_checkout():  # others may commit meanwhile: check the form, not the value
        assert re.fullmatch("[0-9a-f]{40}", env["git_commit"]) and env["git_dirty"] is not None
    assert env["libraries"]["torch"] and env["libraries"]["transformers"]
    assert data["settings"]["dtype"] == "float32" and data["settings"]["threads"] >= 1
    assert set(data["modes"]) == {m for m in MODE_NAMES if m not in NEEDS_SKIP}
    assert data["modes"]["hf-assisted"]["num_assistant_tokens"] == 20  # transformers' default
    assert data["modes"]["hf-assisted-k5-heuristic"]["num_assistant_tokens_schedule"] == "heuristic"

    assert [p["category"] for p in data["prompts"]] == ["code", "chat"]  # --limit 1 per category
    assert data["identity"] == {"checked": True, "all_identical": True, "mismatches": []}
    assert len(data["records"]) == 2 * len(data["modes"])
    assert all(r["identical"] and r["seconds"] > 0 for r in data["records"])
    assert all(len(r["token_ids"]) == r["new_tokens"] == NEW for r in data["records"])

    costs = data["costs"]
    assert costs["target_step_seconds"] > 0 and costs["verify_cost"] and costs["c"]
    assert all(v > 0 for v in costs["c"].values())

    summaries = data["summaries"]
    assert {s["category"] for s in summaries} == {"code", "chat", ALL}
    for s in summaries:
        drafting = s["mode"] in ("ours-draft", "ours-prompt-lookup", "ours-lookup-draft")
        family = "ours-drafting" if drafting and s["alpha"] is not None else "other"
        _check_summary_fields(s, family)
        if s["mode"].startswith("hf-") and s["mode"] != REFERENCE:
            assert s["alpha"] is None and any(
                "not reported by transformers" in n for n in s["notes"]
            )
    ours = next(s for s in summaries if s["mode"] == OURS_DRAFT and s["category"] == ALL)
    _check_summary_fields(ours, "ours-drafting")
    ref = next(s for s in summaries if s["mode"] == REFERENCE and s["category"] == ALL)
    assert ref["speedup_median"] == pytest.approx(1.0) and ref["tau"] == pytest.approx(1.0)

    markdown = (out / "results.md").read_text()
    assert "token-identical to hf-plain" in markdown and "| ours-draft |" in markdown
    assert "bound (cost-aware)" in markdown
    captured = capsys.readouterr()
    assert "ours-draft" in captured.out and "NOT TOKEN-IDENTICAL" not in captured.err


class AlteredMode(Mode):
    """Wraps a mode and changes one token of its output: a deliberately wrong mode."""

    def __init__(self, inner: Mode, position: int) -> None:
        self.inner, self.position = inner, position
        self.name, self.family = inner.name, inner.family

    def run(self, prompt_ids, request, seed):
        out = self.inner.run(prompt_ids, request, seed)
        ids = list(out.token_ids)
        ids[self.position] = (ids[self.position] + 1) % 320
        return ModeOutput(ids, out.stats, out.target_passes, out.draft_passes)

    def describe(self):
        return {**self.inner.describe(), "altered_position": self.position}


def test_a_long_prompt_category_gets_costs_measured_at_its_own_context(models, cases, tmp_path):
    """Bounds of a long-prompt category come from passes at its context, not the run's."""
    target, draft = models
    long_ids = (cases[0].prompt_ids * 200)[:400]
    run_cases = [*cases[:2], BenchCase("long", "rag", long_ids)]
    modes = standard_modes(target, [REFERENCE, OURS_DRAFT], ModeConfig(k=3), draft=draft)
    report = run_benchmark(
        target,
        modes,
        run_cases,
        {"max_new_tokens": NEW, "do_sample": False},
        BenchOptions(warmup=0, cost_repetitions=1),
        {"target": "tiny"},
    )
    assert list(report.category_costs) == ["rag"]
    own = report.category_costs["rag"]
    assert own.context_tokens >= 400 > report.costs.context_tokens
    assert set(own.draft_step) == set(report.costs.draft_step)
    rag = next(s for s in report.summaries if s.mode == OURS_DRAFT and s.category == "rag")
    assert any("this category's context" in note for note in rag.notes)
    assert rag.c == pytest.approx(own.c(modes[1].cost_probe.key))
    code = next(s for s in report.summaries if s.mode == OURS_DRAFT and s.category == "code")
    assert not any("this category's context" in note for note in code.notes)
    write_report(report, tmp_path, plots=False)
    assert "at the context of rag" in (tmp_path / "results.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["category_costs"]["rag"]["context_tokens"] == own.context_tokens


def test_a_non_identical_mode_is_reported_loudly(models, cases, tmp_path):
    target, draft = models
    modes = standard_modes(target, [REFERENCE, OURS_PLAIN, OURS_DRAFT], ModeConfig(), draft=draft)
    modes[2] = AlteredMode(modes[2], position=3)
    seen = []
    report = run_benchmark(
        target,
        modes,
        cases[:2],
        {"max_new_tokens": NEW, "do_sample": False},
        BenchOptions(warmup=0, cost_repetitions=1),
        {"target": "tiny"},
        on_mismatch=seen.append,
    )
    assert [(m.mode, m.prompt_id, m.position) for m in seen] == [
        (OURS_DRAFT, cases[0].prompt_id, 3),
        (OURS_DRAFT, cases[1].prompt_id, 3),
    ]
    assert report.all_identical is False
    summary = next(s for s in report.summaries if s.mode == OURS_DRAFT and s.category == ALL)
    assert summary.identical is False and summary.identical_runs == 0
    plain = next(s for s in report.summaries if s.mode == OURS_PLAIN and s.category == ALL)
    assert plain.identical is True
    write_report(report, tmp_path, plots=False)
    markdown = (tmp_path / "results.md").read_text()
    assert "TOKEN IDENTITY FAILED" in markdown
    assert f"on prompt {cases[0].prompt_id}" in markdown and "at new token 3" in markdown
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["identity"]["all_identical"] is False
    assert data["identity"]["mismatches"][0]["position"] == 3


def test_the_cli_fails_loudly_on_a_difference(folders, tmp_path, capsys, monkeypatch):
    real = bench_cli.standard_modes

    def with_a_wrong_mode(*args, **kwargs):
        modes = real(*args, **kwargs)
        return [AlteredMode(m, 2) if m.name == OURS_PLAIN else m for m in modes]

    monkeypatch.setattr(bench_cli, "standard_modes", with_a_wrong_mode)
    argv = _bench_args(folders, tmp_path, tmp_path / "out")
    argv += ["--modes", OURS_PLAIN, "--warmup", "0", "--no-plots"]
    assert main(argv) == bench_cli.IDENTITY_FAILED
    err = capsys.readouterr().err
    assert "NOT TOKEN-IDENTICAL" in err and "ours-plain differs from hf-plain on prompt 1" in err
    assert "at new token 2" in err


def test_sampling_skips_the_identity_check(models, cases):
    target, draft = models
    modes = standard_modes(target, [REFERENCE, OURS_DRAFT], ModeConfig(), draft=draft)
    runner = BenchRunner(target, modes, {"max_new_tokens": NEW, "temperature": 0.8}, warmup=0)
    run = runner.run(cases[:1])
    assert run.greedy is False and run.mismatches == []
    assert all(r.identical is None for r in run.records)
    assert len(run.records) == 2


def test_a_skip_profile_adds_the_layer_skip_mode(models, folders, tmp_path):
    from specdecode.search.profile import DraftSettings, ModelIdentity, SkipProfile

    target, _ = models
    profile = tmp_path / "skip.json"
    SkipProfile(
        ModelIdentity.of(target), attention=(1,), mlp=(1,), draft=DraftSettings(max_draft_tokens=3)
    ).save(profile)
    out = tmp_path / "out"
    argv = _bench_args(folders, tmp_path, out)
    argv += ["--skip-profile", str(profile), "--modes", "ours-layer-skip", "--no-plots"]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["modes"]) == [REFERENCE, "ours-layer-skip"]
    drafter = data["modes"]["ours-layer-skip"]["drafter"]
    assert (drafter["skip_attention"], drafter["skip_mlp"]) == ([1], [1])
    length = data["modes"]["ours-layer-skip"]["draft_length"]
    assert (length["schedule"], length["initial_k"]) == ("auto", 3)  # the profile's k
    assert data["identity"]["all_identical"] is True
    assert "ours-layer-skip" in data["costs"]["c"]
    summary = next(
        s for s in data["summaries"] if s["mode"] == "ours-layer-skip" and s["category"] == ALL
    )
    assert summary["mean_draft_length"] > 0 and summary["c"] > 0
