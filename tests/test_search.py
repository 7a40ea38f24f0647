"""The skip-set search: space, cost model, profiles, prompt files, and a study that survives a
worker killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specdecode.errors import (
    InvalidSettingsError,
    ProfileMismatchError,
    PromptError,
    SearchError,
    SkipProfileError,
)
from specdecode.models import load_model
from specdecode.models.layerskip import SkipSet
from specdecode.prompts import Prompt, load_prompts
from specdecode.search import DraftSettings, ModelIdentity, SearchSpace, SkipProfile, load_profile
from specdecode.search.cost import CostModel, calibrate
from specdecode.search.space import skip_of_params
from specdecode.testing import make_tiny_model

optuna = pytest.importorskip("optuna")

LAYERS = 6
SPEC_BENCH_ROWS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
    {"question_id": 2, "category": "coding", "turns": ["def add(a, b):"]},
    {"question_id": 3, "category": "writing", "turns": ["The quick brown fox"]},
    {"question_id": 4, "category": "coding", "turns": ["for i in range(10):"]},
]


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search-llama")
    make_tiny_model(folder, "llama", layers=LAYERS, seed=0)
    return folder


@pytest.fixture(scope="module")
def target(tiny6):
    return load_model(tiny6, device="cpu")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "question.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in SPEC_BENCH_ROWS) + "\n")
    return path


# ----------------------------------------------------------------------------------- prompts
def test_spec_bench_jsonl_takes_the_first_turn(prompt_file):
    prompts = load_prompts(prompt_file)
    assert prompts[0] == Prompt("Write a poem.", "writing", "1")
    assert [p.id for p in load_prompts(prompt_file, categories=["coding"])] == ["2", "4"]
    assert [p.id for p in load_prompts(prompt_file, per_category=1)] == ["1", "2"]
    assert [p.id for p in load_prompts(prompt_file, per_category=1, offset=1)] == ["3", "4"]
    assert [p.id for p in load_prompts(prompt_file, limit=3, offset=1)] == ["2", "3", "4"]


def test_plain_text_prompts_one_a_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\n  second one\n")
    assert [(p.text, p.id) for p in load_prompts(path)] == [
        ("first prompt", "1"),
        ("  second one", "3"),
    ]


def test_bad_prompt_files_are_clear_errors(tmp_path, prompt_file):
    with pytest.raises(PromptError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{not json\n')
    with pytest.raises(PromptError, match="line 2"):
        load_prompts(bad)
    with pytest.raises(PromptError, match="categories are"):
        load_prompts(prompt_file, categories=["poetry"])


def test_the_shared_spec_bench_file_reads():
    path = Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    prompts = load_prompts(path, per_category=1)
    assert len(prompts) == len({p.category for p in load_prompts(path)}) >= 10


# ----------------------------------------------------------------------------------- space
def test_space_comes_from_the_layer_count_and_keeps_the_ends():
    space = SearchSpace(num_layers=30, keep_first=2, keep_last=1)
    assert space.searchable == list(range(2, 29))
    trial = optuna.trial.FixedTrial(space.params(SkipSet.of([5, 20], [21])))
    skip = space.suggest(trial)
    assert skip == SkipSet.of([5, 20], [21])
    assert skip_of_params(space.params(skip)) == skip
    for name, start in space.warm_starts().items():
        assert start.size > 0, name
        assert set(start.attention) | set(start.mlp) <= set(space.searchable), name


def test_space_constraints():
    space = SearchSpace(num_layers=10, min_ratio=0.2, max_ratio=0.5)
    assert not space.feasible(SkipSet.of([3]))
    assert space.feasible(SkipSet.of([3, 4], [5, 6]))
    assert not space.feasible(SkipSet.of(range(1, 9), range(1, 9)))
    with pytest.raises(InvalidSettingsError, match="none to skip"):
        SearchSpace(num_layers=2, keep_first=1, keep_last=1)
    with pytest.raises(InvalidSettingsError, match="impossible"):
        SearchSpace(num_layers=4, keep_first=1, keep_last=1, min_ratio=0.9)


def test_baselines_have_the_asked_make_up():
    space = SearchSpace(num_layers=30)
    random_set = space.random_skip(attention=7, mlp=3, seed=1)
    assert (len(random_set.attention), len(random_set.mlp)) == (7, 3)
    assert random_set == space.random_skip(7, 3, seed=1) != space.random_skip(7, 3, seed=2)
    other = space.every_other_layer()
    assert other.attention == other.mlp == tuple(range(2, 29, 2))


# ----------------------------------------------------------------------------------- cost
def test_cost_model_arithmetic():
    cost = CostModel(attention=0.02, mlp=0.01, verify=(1.0, 2.0, 1.5), step_seconds=0.1, context=10)
    skip = SkipSet.of(range(10), range(20))
    assert cost.draft_cost(skip) == pytest.approx(1 - 0.2 - 0.2)
    assert cost.verify_cost(3) == cost.verify_cost(9) == 1.5
    # 30 tokens from 2 rounds drafting nothing, 4 drafting one, 6 drafting four:
    # 2 * v(1) + 4 * v(2) + 6 * v(5) + (4 + 24) * c
    expected = 30 / (2 * 1.0 + 4 * 2.0 + 6 * 1.5 + 28 * 0.6)
    assert cost.speedup(30, {0: 2, 1: 4, 4: 6}, skip) == pytest.approx(expected)
    assert CostModel.from_dict(json.loads(json.dumps(cost.to_dict()))) == cost


def test_rounds_by_draft_from_generation_stats():
    from specdecode.decoding import GenerationStats
    from specdecode.search.evaluate import Evaluation

    totals = Evaluation()
    for drafts in ([3, 1, 0], [2, 2]):
        stats = GenerationStats()
        for d in drafts:
            stats.record_round(d, 0)
        totals.add(stats)
    assert totals.rounds_by_draft == {0: 1, 1: 1, 2: 2, 3: 1}
    assert totals.drafted == sum(d * n for d, n in totals.rounds_by_draft.items())


def test_calibration_measures_sane_costs(target):
    cost = calibrate(target, list(range(5, 60)), k=4, repeats=3)
    assert len(cost.verify) == 5 and cost.verify[0] == 1.0 and min(cost.verify) >= 1.0
    assert 0 <= cost.attention * LAYERS <= 1 and 0 <= cost.mlp * LAYERS <= 1
    assert cost.step_seconds > 0 and cost.context == 55


# ----------------------------------------------------------------------------------- profiles
def test_profile_round_trip_and_model_check(tmp_path, target, tiny6):
    profile = SkipProfile(
        model=ModelIdentity.of(target),
        attention=(2, 4),
        mlp=(3,),
        draft=DraftSettings(max_draft_tokens=5, threshold=0.6),
    )
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = load_profile(path)
    assert loaded == profile and loaded.skip == SkipSet.of([2, 4], [3])
    drafter = loaded.drafter(target)
    assert drafter.skip == loaded.skip and drafter.exit.threshold == 0.6
    other_folder = tmp_path / "other"
    make_tiny_model(other_folder, "llama", layers=LAYERS + 2)
    with pytest.raises(ProfileMismatchError, match="8 layers"):
        loaded.drafter(load_model(other_folder, device="cpu"))


def test_bad_profiles_are_clear_errors(tmp_path):
    with pytest.raises(SkipProfileError, match="cannot read"):
        load_profile(tmp_path / "none.json")
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(SkipProfileError, match="not a specdecode skip profile"):
        load_profile(path)


def test_generate_with_skip_profile_matches_plain(tmp_path, target, tiny6, capsys):
    from specdecode.cli.main import main

    profile = SkipProfile(ModelIdentity.of(target), (1, 3), (2,), DraftSettings())
    path = tmp_path / "p.json"
    profile.save(path)
    args = ["generate", "def add(a, b):", "--target", str(tiny6), "--max-new-tokens", "20"]
    assert main([*args, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--json", "--skip-profile", str(path)]) == 0
    skipped = json.loads(capsys.readouterr().out)
    assert skipped["token_ids"] == plain["token_ids"]
    assert skipped["stats"]["drafted"] > 0


def test_study_refuses_other_settings(tmp_path):
    from specdecode.search.study import SearchSettings, make_storage, open_study

    storage = make_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=5)
    settings = SearchSettings()
    open_study(storage, "s", settings, {"objective": "modelled"})
    with pytest.raises(SearchError, match="objective"):
        open_study(storage, "s", settings, {"objective": "tokens-per-second"})
    with pytest.raises(SearchError, match="no study"):
        open_study(storage, "absent", settings, {}, resume=True)


# ----------------------------------------------------------------------------------- studies
def search_command(tiny6, prompt_file, db: Path, name: str, trials: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "specdecode.cli.main",
        "search",
        "--target",
        str(tiny6),
        "--prompts",
        str(prompt_file),
        "--limit",
        "2",
        "--max-new-tokens",
        "12",
        "--trials",
        str(trials),
        "--storage",
        f"sqlite:///{db}",
        "--study-name",
        name,
        "--threads",
        "1",
        "--heartbeat",
        "1",
        "--no-progress",
        *extra,
    ]


def subprocess_env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def finished_count_read_only(db: Path, name: str) -> int:
    """Finished trials of a study, read without touching the database's schema: a poller that
    opened it through Optuna while the worker was still creating the tables could race it
    ("table ... already exists"). 0 while the tables or the study do not exist yet."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FROM trials JOIN studies USING (study_id) "
                "WHERE studies.study_name = ? AND trials.state IN ('COMPLETE', 'PRUNED')",
                (name,),
            ).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:  # no such table yet, or locked for a moment
        return 0


def finished(storage: str, name: str) -> dict[int, tuple]:
    """Finished trials of a study: number -> (state, params, value)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        return {t.number: (t.state, t.params, t.value) for t in study.get_trials(states=states)}
    except KeyError:  # the study is not created yet
        return {}


def test_killed_search_resumes_without_losing_trials(tmp_path, tiny6, prompt_file):
    db, name, trials = tmp_path / "study.db", "killed", 10
    storage = f"sqlite:///{db}"
    out = tmp_path / "best.json"
    command = search_command(tiny6, prompt_file, db, name, trials, "--out", str(out))
    worker = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while worker.poll() is None and finished_count_read_only(db, name) < 3:
            assert time.monotonic() < deadline, "the first worker finished no trial in 60 s"
            time.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert worker.returncode == -signal.SIGKILL, "the worker ended before it could be killed"
    before = finished(storage, name)
    assert 3 <= len(before) < trials

    rerun = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = finished(storage, name)
    for number, record in before.items():  # nothing finished before the kill was lost
        assert after[number] == record
    assert len(after) == trials  # counting went on from where the study was
    assert min(set(after) - set(before)) > max(before)
    assert f"{trials} finished trials ({trials - len(before)} in this run)" in rerun.stdout
    profile = load_profile(out)
    assert profile.model.num_layers == LAYERS and profile.measured is not None
    assert out.with_name("best-history.png").stat().st_size > 0
    assert out.with_name("best-skips.png").stat().st_size > 0
    rows = json.loads(out.with_name("best-trials.json").read_text())
    assert sorted(r["number"] for r in rows) == sorted(after)
    assert all(r["worker"] for r in rows)


def test_search_in_process_with_the_gp_sampler_and_plots(tmp_path, target):
    from specdecode.search import study as st
    from specdecode.search.plots import plot_history, plot_skip_frequency

    prompts = [target.tokenizer(r["turns"][0])["input_ids"] for r in SPEC_BENCH_ROWS[:2]]
    space = SearchSpace(target.num_layers)
    settings = st.SearchSettings(sampler="gp", trials=4, max_new_tokens=8, heartbeat=5)
    storage = st.make_storage(f"sqlite:///{tmp_path / 'gp.db'}", settings.heartbeat)
    fingerprint = st.fingerprint(target, prompts, space, settings)
    study = st.open_study(storage, "gp", settings, fingerprint)
    assert st.enqueue_warm_starts(study, space) == len(space.warm_starts()) > 0
    assert st.enqueue_warm_starts(study, space) == 0  # only into a fresh study
    cost = st.cost_model_of(study, lambda: calibrate(target, prompts[0], k=8, repeats=2))
    assert st.cost_model_of(study, lambda: pytest.fail("measured twice")) == cost
    seen = []
    objective = st.SkipObjective(target, prompts, space, settings, cost)
    assert st.run_search(study, objective, settings, on_trial=seen.append) == 4
    assert [p.finished for p in seen] == [1, 2, 3, 4]
    best = st.best_trial(study)
    assert best.value == max(p.best_value for p in seen)
    metrics = best.user_attrs["metrics"]
    assert metrics["c_model"] == pytest.approx(cost.draft_cost(skip_of_params(best.params)))
    plot_history(study.trials, "modelled", tmp_path / "h.png")
    assert plot_skip_frequency(study.trials, LAYERS, tmp_path / "s.png") >= 1
    assert (tmp_path / "h.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0


def test_compare_mode_prints_the_three_baselines(tmp_path, target, tiny6, prompt_file, capsys):
    from specdecode.cli.main import main

    profile = SkipProfile(ModelIdentity.of(target), (2, 4), (3,), DraftSettings(max_draft_tokens=4))
    profile.save(tmp_path / "p.json")
    out = tmp_path / "compare.json"
    args = ["search", "--target", str(tiny6), "--prompts", str(prompt_file), "--limit", "2"]
    args += ["--max-new-tokens", "8", "--compare", str(tmp_path / "p.json"), "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    for name in ("no speculation", "searched profile", "random, same make-up", "every other layer"):
        assert f"| {name} |" in table
    rows = json.loads(out.read_text())["rows"]
    assert (len(rows[2]["skip_attention"]), len(rows[2]["skip_mlp"])) == (2, 1)
    assert rows[0]["speedup"] == 1.0 and all(r["tokens_per_second"] > 0 for r in rows)
