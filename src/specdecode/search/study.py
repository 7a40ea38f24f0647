"""Searching the skip set with Optuna (Bayesian optimisation, as in Draft & Verify).

A study lives in an Optuna storage: a SQLite file by default, so that a crashed or killed search
continues where it was when rerun with the same study name; a PostgreSQL URL lets workers on
several machines share one study. Each trial asks the sampler for a skip set (see
:mod:`specdecode.search.space`), generates greedily on the calibration prompts with it and
returns the objective:

- ``modelled`` (default): the speedup the measured cost model predicts from the trial's own
  acceptance counts (see :mod:`specdecode.search.cost`); deterministic, so free of timing noise;
- ``tokens-per-second``: measured throughput of self-speculative generation.

After every prompt the running value is reported, so a pruner can stop clearly bad trials early.
Trials record who ran them and what they measured as user attributes. ``trials`` is the study's
total: a resumed worker, or one of several, stops when the study holds that many finished trials
(parallel workers may overshoot by one trial each, as each checks before starting one).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from specdecode.drafters.layerskip import LayerSkipDrafter
from specdecode.errors import SearchError
from specdecode.models import LoadedModel
from specdecode.models.layerskip import SkipSet
from specdecode.search.cost import CostModel
from specdecode.search.evaluate import Evaluation, evaluate
from specdecode.search.profile import DraftSettings
from specdecode.search.space import SearchSpace, skip_of_params

OBJECTIVES = ("modelled", "tokens-per-second")
SAMPLERS = ("tpe", "gp")
_MAX_INFEASIBLE_STREAK = 200


@dataclass(frozen=True)
class SearchSettings:
    """How a search runs."""

    objective: str = "modelled"  # one of OBJECTIVES
    sampler: str = "tpe"  # one of SAMPLERS
    seed: int = 0  # the sampler's seed (worker 0 of a fresh study uses it as is)
    worker: int = 0  # index of this worker among several sharing a study (seeds differ)
    trials: int = 60  # the study's total number of finished trials
    timeout: float | None = None  # seconds this worker may spend (checked between trials)
    max_new_tokens: int = 64  # per calibration prompt
    draft: DraftSettings = field(default_factory=DraftSettings)
    prune: bool = True  # stop clearly bad trials after the first prompts
    warm_start: bool = True  # enqueue the space's known good skip sets in a fresh study
    heartbeat: int = 15  # seconds; a trial silent for 4x this is failed and retried once

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise SearchError(
                f"unknown objective {self.objective!r}: choose {' or '.join(OBJECTIVES)}"
            )
        if self.sampler not in SAMPLERS:
            raise SearchError(f"unknown sampler {self.sampler!r}: choose {' or '.join(SAMPLERS)}")
        if self.trials < 1 or self.max_new_tokens < 2 or self.heartbeat < 1:
            raise SearchError("--trials and --heartbeat must be >= 1, --max-new-tokens >= 2")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - optuna is in the search extra
        raise SearchError("the search needs optuna: pip install 'specdecode[search]'") from exc
    return optuna


# ----------------------------------------------------------------------------------- the study
def make_storage(url: str, heartbeat: int, attempts: int = 5) -> Any:
    """An Optuna RDB storage with heartbeats: trials of a killed worker are failed and retried.

    Workers starting together on an empty database race to create its tables, and the losers
    fail; they try again (``attempts`` in all) and find the tables made.
    """
    from sqlalchemy.exc import SQLAlchemyError

    url = with_postgres_driver(url)
    for attempt in range(attempts):
        try:
            storage = _rdb_storage(url, heartbeat)
            break
        except ImportError as exc:
            raise SearchError(f"the storage {url} needs a driver that is missing: {exc}") from exc
        except SQLAlchemyError as exc:  # unreachable server, bad URL, a creation race
            if attempt == attempts - 1:
                raise SearchError(f"cannot open the study storage {url}: {exc}") from exc
            time.sleep(0.5 * (attempt + 1))
    if url.startswith("sqlite"):
        _tune_sqlite(storage.engine)
    return storage


def _rdb_storage(url: str, heartbeat: int) -> Any:
    import warnings

    optuna = _optuna()
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=4 * heartbeat,
            heartbeat_stale_trial_callback=retry,
        )


def with_postgres_driver(url: str) -> str:
    """A plain ``postgresql://`` URL names the driver that is installed: SQLAlchemy 2.1 assumes
    psycopg 3, the ``search`` extra installs psycopg2."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise SearchError(f"{url} needs a PostgreSQL driver: pip install 'specdecode[search]'")


def _tune_sqlite(engine: Any) -> None:
    """Write-ahead log and fewer fsyncs: every trial commits a few times, and a full fsync each
    time is slow on a busy disk. A killed worker loses nothing (what was written stays in the
    OS); only a power cut could lose the last commits."""
    from sqlalchemy import event

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened so far reconnect with the pragmas


def make_sampler(settings: SearchSettings, seed: int) -> Any:
    optuna = _optuna()
    if settings.sampler == "gp":
        import warnings

        with warnings.catch_warnings():  # deterministic_objective is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(
                seed=seed, deterministic_objective=settings.objective == "modelled"
            )
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(settings: SearchSettings) -> Any:
    optuna = _optuna()
    if not settings.prune:
        return optuna.pruners.NopPruner()
    # from the 6th trial on, stop one whose running value after 2+ prompts is below the median
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)


def open_study(
    storage: Any,
    name: str,
    settings: SearchSettings,
    fingerprint: dict[str, Any],
    resume: bool = False,
) -> Any:
    """Create the study, or load it when it exists (it must when ``resume``).

    ``fingerprint`` holds what must agree for trials to be comparable (model, prompts,
    objective, draft settings, space); a study made with another is refused.
    """
    optuna = _optuna()
    exists = name in optuna.study.get_all_study_names(storage)
    if resume and not exists:
        raise SearchError(f"there is no study {name!r} to resume in this storage")
    existing = len(optuna.load_study(study_name=name, storage=storage).trials) if exists else 0
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=make_sampler(settings, worker_seed(settings.seed, settings.worker, existing)),
        pruner=make_pruner(settings),
        direction="maximize",
        load_if_exists=True,
    )
    fingerprint = json.loads(json.dumps(fingerprint))
    saved = study.user_attrs.get("fingerprint")
    if saved is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif saved != fingerprint:
        differ = sorted(k for k in {*saved, *fingerprint} if saved.get(k) != fingerprint.get(k))
        raise SearchError(
            f"the study {name!r} was made with other settings ({', '.join(differ)} differ): "
            "rerun with those, or give a new --study-name"
        )
    return study


def worker_seed(seed: int, worker: int, existing_trials: int) -> int:
    """The sampler seed: ``seed`` itself for worker 0 of a fresh study, else derived from it, so
    that workers and resumed runs do not propose the same random trials again."""
    if worker == 0 and existing_trials == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{worker}:{existing_trials}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def enqueue_warm_starts(
    study: Any, space: SearchSpace, extra: Sequence[SkipSet] = (), builtin: bool = True
) -> int:
    """Queue ``extra`` skip sets, and the space's own warm starts when ``builtin``, in a study
    that has no trial yet (a resumed study has its history already). Returns how many."""
    if study.trials:
        return 0
    starts = [*extra, *(space.warm_starts().values() if builtin else ())]
    for skip in starts:
        study.enqueue_trial(space.params(skip), skip_if_exists=True)
    return len(starts)


def cost_model_of(study: Any, measure: Callable[[], CostModel]) -> CostModel:
    """The study's cost model: measured by its first worker, shared by all that follow."""
    saved = study.user_attrs.get("cost_model")
    if saved is None:
        study.set_user_attr("cost_model", measure().to_dict())
        saved = study.user_attrs["cost_model"]
    return CostModel.from_dict(saved)


# ----------------------------------------------------------------------------------- trials
class SkipObjective:
    """One trial: a skip set from the sampler, greedy generation on the prompts, the objective."""

    def __init__(
        self,
        target: LoadedModel,
        prompts: Sequence[Sequence[int]],
        space: SearchSpace,
        settings: SearchSettings,
        cost: CostModel,
    ) -> None:
        self.target = target
        self.prompts = prompts
        self.space = space
        self.settings = settings
        self.cost = cost
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, trial: Any) -> float:
        optuna = _optuna()
        skip = self.space.suggest(trial)
        trial.set_user_attr("worker", self.worker)
        if not self.space.feasible(skip):
            trial.set_user_attr("infeasible", True)
            raise optuna.TrialPruned("skip ratio outside the allowed range")
        twin = self._evaluated_twin(trial)
        if twin is not None:  # greedy counts are deterministic: the same set scores the same
            trial.set_user_attr(
                "metrics", {**twin.user_attrs["metrics"], "duplicate_of": twin.number}
            )
            return float(twin.value)
        drafter = LayerSkipDrafter(self.target, skip, self.settings.draft.exit())

        def report(index: int, totals: Evaluation) -> None:
            trial.report(self.value(totals, skip), step=index)
            if trial.should_prune():
                self._record(trial, totals, skip)
                raise optuna.TrialPruned(f"pruned after {index + 1} prompts")

        k = self.settings.draft.max_draft_tokens
        totals = evaluate(
            self.target, drafter, self.prompts, self.settings.max_new_tokens, k, on_prompt=report
        )
        self._record(trial, totals, skip)
        return self.value(totals, skip)

    def _evaluated_twin(self, trial: Any) -> Any | None:
        """A complete trial with the same skip set, when the objective is deterministic."""
        if self.settings.objective != "modelled":
            return None
        optuna = _optuna()
        complete = trial.study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
        )
        return next((t for t in complete if t.params == trial.params), None)

    def value(self, totals: Evaluation, skip: SkipSet) -> float:
        if self.settings.objective == "tokens-per-second":
            return totals.tokens_per_second
        return self.cost.speedup(totals.decoded, totals.rounds_by_draft, skip)

    def _record(self, trial: Any, totals: Evaluation, skip: SkipSet) -> None:
        """What the trial measured, as one user attribute (one write to the storage)."""
        step = totals.draft_step_seconds
        metrics = {
            "alpha": totals.alpha,
            "tau": totals.tau,
            "tokens_per_second": totals.tokens_per_second,
            "modelled_speedup": self.cost.speedup(totals.decoded, totals.rounds_by_draft, skip),
            "c_model": self.cost.draft_cost(skip),
            "c_timed": None if step is None else step / self.cost.step_seconds,
            "skip_ratio": skip.ratio(self.space.num_layers),
            "prompts_done": totals.prompts,
            "drafted": totals.drafted,
            "accepted": totals.accepted,
        }
        trial.set_user_attr("metrics", metrics)


# ----------------------------------------------------------------------------------- the run
def finished_trials(study: Any) -> list[Any]:
    """Trials that count towards ``trials``: complete, or pruned after running."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [
        t
        for t in study.get_trials(deepcopy=False, states=states)
        if not t.user_attrs.get("infeasible")
    ]


def best_trial(study: Any) -> Any | None:
    """The complete trial with the highest value, or None."""
    optuna = _optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value, default=None)


@dataclass(frozen=True)
class SearchProgress:
    """Where a study stands after one of this worker's trials."""

    finished: int  # the study's finished trials (all workers)
    total: int  # the study's target
    best_value: float | None
    last_state: str  # COMPLETE, PRUNED or FAIL of this worker's last trial


def run_search(
    study: Any,
    objective: SkipObjective,
    settings: SearchSettings,
    on_trial: Callable[[SearchProgress], None] | None = None,
) -> int:
    """Run trials until the study holds ``settings.trials`` finished ones or the time is up.

    Each trial goes through ``study.optimize``, which keeps its heartbeat (a killed worker's
    trial is failed after the grace period and retried once). Returns how many trials this
    worker finished.
    """
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    mine: list[Any] = []
    done = streak = 0
    while len(finished_trials(study)) < settings.trials:
        if deadline is not None and time.monotonic() >= deadline:
            break
        study.optimize(objective, n_trials=1, callbacks=[lambda _, trial: mine.append(trial)])
        trial = mine[-1]
        streak = streak + 1 if trial.user_attrs.get("infeasible") else 0
        if streak >= _MAX_INFEASIBLE_STREAK:
            raise SearchError(
                "the last trials all had a skip ratio outside --min/--max-skip-ratio: widen it"
            )
        done += streak == 0
        if on_trial is not None:
            best = best_trial(study)
            on_trial(
                SearchProgress(
                    finished=len(finished_trials(study)),
                    total=settings.trials,
                    best_value=None if best is None else best.value,
                    last_state=trial.state.name,
                )
            )
    return done


def trial_summary(trial: Any) -> dict[str, Any]:
    """A finished trial as plain data (for JSON output)."""
    skip = skip_of_params(trial.params)
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "skip_attention": list(skip.attention),
        "skip_mlp": list(skip.mlp),
        "worker": trial.user_attrs.get("worker"),
        **trial.user_attrs.get("metrics", {}),
    }


def fingerprint(
    target: LoadedModel,
    prompts: Sequence[Sequence[int]],
    space: SearchSpace,
    settings: SearchSettings,
) -> dict[str, Any]:
    """What trials of one study must share to be comparable."""
    blob = json.dumps([list(p) for p in prompts]).encode()
    return {
        "config_hash": target.config_hash(),
        "num_layers": target.num_layers,
        "prompts_sha256": hashlib.sha256(blob).hexdigest()[:16],
        "objective": settings.objective,
        "max_new_tokens": settings.max_new_tokens,
        "draft": asdict(settings.draft),
        "space": space.describe(),
    }
