"""Two search workers share one study in a real PostgreSQL server: every finished trial is
counted once, by the worker that ran it, and the study stops at its total."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import pytest

from specdecode.search.study import with_postgres_driver

from .test_search import SPEC_BENCH_ROWS, search_command, subprocess_env

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg2", reason="the postgresql driver (psycopg2-binary) is not installed")

pytestmark = pytest.mark.postgres
URL_VARIABLE = "SPECDECODE_TEST_POSTGRES_URL"  # a server .ci/run started; else we start one


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return None if initdb is None else Path(initdb).resolve().parent


def _as_postgres_user() -> list[str]:
    """initdb refuses to run as root: run the server as the postgres user then."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user to run the server as")
    return ["runuser", "-u", "postgres", "--"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url():
    """The URL of a PostgreSQL server on loopback: CI's, or a private one for this module."""
    if os.environ.get(URL_VARIABLE):
        yield os.environ[URL_VARIABLE]
        return
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip(
            f"no PostgreSQL server binaries (apt-get install postgresql) and no {URL_VARIABLE}"
        )
    prefix = _as_postgres_user()
    home = Path(tempfile.mkdtemp(prefix="specdecode-pg-"))
    if prefix:
        shutil.chown(home, "postgres")
    data, port = home / "data", _free_port()
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-N"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "log")]
    subprocess.run([*pg_ctl, "-w", "-o", options, "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_share_one_study(tmp_path, postgres_url):
    from specdecode.testing import make_tiny_model

    model = tmp_path / "model"
    make_tiny_model(model, "llama", layers=6, seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in SPEC_BENCH_ROWS) + "\n")
    name, trials = f"shared-{uuid.uuid4().hex[:8]}", 10
    workers = []
    for index in range(2):
        command = search_command(model, prompts, tmp_path / "unused.db", name, trials)
        storage_at = command.index("--storage") + 1
        command[storage_at] = postgres_url
        command += [
            "--worker",
            str(index),
            "--no-final-eval",
            "--out",
            str(tmp_path / f"{index}.json"),
        ]
        workers.append(
            subprocess.Popen(
                command,
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, err[-2000:]
        outputs.append(out)

    study = optuna.load_study(study_name=name, storage=with_postgres_driver(postgres_url))
    trials_by_state = Counter(t.state.name for t in study.trials)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    # the total is reached; each worker may start one last trial before it sees that
    assert trials <= len(done) <= trials + 1, trials_by_state
    assert trials_by_state.get("RUNNING", 0) == 0 and trials_by_state.get("FAIL", 0) == 0
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # none lost, none numbered twice
    by_worker = Counter(t.user_attrs["worker"] for t in done)
    assert len(by_worker) == 2, by_worker  # both took part
    ran = [int(out.split(" in this run")[0].rsplit("(", 1)[1]) for out in outputs]
    assert sorted(ran) == sorted(by_worker.values())  # each counted what it ran, once
    assert sum(ran) == len(done)
