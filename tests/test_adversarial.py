"""Attacks an adversarial operator tried against a real Postgres, each a regression test of a defect.

Huge and NULL ids, non-finite values, a rerun of the champion's interval, a future as-of, a run
killed after validation, two runs at once, a publish behind a reader's long transaction, leftovers
of a killed publish, and a NULL id under `seed`. Outcomes and figures go to the reliability report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, UTC
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest

from conftest import REPO_ROOT, SMALL_MODEL, seed_small
from recmodel import db, pipeline, registry
from recmodel.config import ConfigError
from recmodel.extract import fresh_interactions
from recmodel.registry import RunRefused

pytestmark = pytest.mark.reliability

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
BIGGEST_ID = 2**63 - 1  # beyond 2**53, float64 cannot hold it: it would land on another id
INSERT_EVENT = """
INSERT INTO interactions (user_id, item_id, event_type, value, occurred_at, ingested_at)
VALUES (%s, %s, %s, %s, %s, %s)
"""


def add_events(url: str, rows: list[tuple]) -> None:
    with db.transaction(url) as conn:
        conn.cursor().executemany(INSERT_EVENT, rows)


def loosen_source_columns(url: str) -> None:
    """What the attacker did: a source whose id and time columns allow NULL."""
    with db.transaction(url) as conn:
        for column in ("user_id", "item_id", "occurred_at"):
            conn.execute(f"ALTER TABLE interactions ALTER COLUMN {column} DROP NOT NULL")


def quarantine_reasons(url: str, run_key: str) -> dict[str, int]:
    with db.connect(url) as conn:
        return dict(conn.execute("SELECT reason, count(*) FROM recsys.quarantine WHERE run_key = %s GROUP BY 1",
                                 (run_key,)).fetchall())


@pytest.mark.slow
def test_huge_ids_are_served_exactly_even_beside_a_null_id(recsys_env: str, reliability_figure) -> None:
    seed_small(recsys_env, NOW)
    loosen_source_columns(recsys_env)
    at = NOW - timedelta(hours=2)
    add_events(recsys_env, [(BIGGEST_ID, item, "view", None, at + timedelta(minutes=item), at) for item in (3, 4, 5)]
               + [(None, 6, "view", None, at, at)])
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    pipeline.run_all(ctx)
    with db.connect(recsys_env) as conn:
        served = conn.execute("SELECT count(*) FROM recsys.user_recommendations WHERE user_id = %s",
                              (BIGGEST_ID,)).fetchone()[0]
        wrong = conn.execute("SELECT count(*) FROM recsys.user_recommendations WHERE user_id < 1").fetchone()[0]
    dataset = pd.read_parquet(ctx.files.dataset)
    assert served == 20 and wrong == 0  # its own list, under its own id; nobody served under a corrupted one
    assert dataset["user_id"].dtype == np.int64 and (dataset["user_id"] == BIGGEST_ID).sum() == 3
    assert quarantine_reasons(recsys_env, ctx.run_key) == {"null_user_id": 1}
    reliability_figure("huge id (2**63-1) beside a NULL id: users served under a wrong id", wrong)


def test_non_finite_values_and_null_times_are_quarantined_and_never_stop_a_run(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    loosen_source_columns(recsys_env)
    at = NOW - timedelta(hours=1)
    with db.transaction(recsys_env) as conn:
        for item, value in ((7, "Infinity"), (10, "-Infinity"), (11, "NaN")):
            conn.execute(INSERT_EVENT.replace("%s, %s, %s)", "%s::real, %s, %s)"), (9, item, "rating", value, at, at))
        conn.execute(INSERT_EVENT, (9, 8, "view", None, None, at))  # NULL occurred_at
        conn.execute(INSERT_EVENT, (9, 9, "view", None, at, at))  # NULL value: no value, which is fine
    ctx = pipeline.make_context(NOW, SMALL_MODEL)
    validated = pipeline.step_validate(ctx, pipeline.step_extract(ctx))
    assert quarantine_reasons(recsys_env, ctx.run_key) == {"non_finite_value": 3, "null_occurred_at": 1}
    with db.connect(recsys_env) as conn:
        stored = sorted(r[0] for r in conn.execute(
            "SELECT row_data ->> 'value' FROM recsys.quarantine WHERE reason = 'non_finite_value'"))
        watermark = conn.execute("SELECT count(*) FROM recsys.extract_watermarks WHERE run_key = %s",
                                 (ctx.run_key,)).fetchone()[0]
    assert stored == ["-inf", "inf", "nan"] and watermark == 1  # written as text; the run went on
    dataset = pd.read_parquet(validated.snapshot.dataset_path)
    assert np.isfinite(dataset["value"].dropna()).all() and dataset["occurred_at"].notna().all()
    no_value = dataset[(dataset["user_id"] == 9) & (dataset["item_id"] == 9) & (dataset["occurred_at"] == at)]
    assert len(no_value) == 1 and no_value["value"].isna().all()  # a NULL value is no value: the row is clean


@pytest.mark.slow
def test_a_rerun_of_the_champions_interval_is_refused_and_changes_nothing(recsys_env: str) -> None:
    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, SMALL_MODEL)
    published = pipeline.run_all(first).version
    with db.connect(recsys_env) as conn:
        before = conn.execute("SELECT version, status, decision, onnx_sha256 FROM recsys.model_registry").fetchall()
    rerun = pipeline.make_context(NOW, {**SMALL_MODEL, "gate_min_metric": 1.0})  # a gate that rejects
    with pytest.raises(RunRefused, match=f"{published} .*published versions are immutable"):
        pipeline.run_all(rerun)
    with db.connect(recsys_env) as conn:
        after = conn.execute("SELECT version, status, decision, onnx_sha256 FROM recsys.model_registry").fetchall()
    assert after == before
    champion = pipeline.verified_champion(recsys_env)  # its files still match their sha256
    assert champion is None or champion.version == published


def test_a_future_as_of_is_refused_and_the_watermark_never_passes_now(recsys_env: str, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    seed_small(recsys_env, now)
    with pytest.raises(ConfigError, match="is in the future"):
        pipeline.make_context(datetime(2030, 1, 1, tzinfo=UTC), SMALL_MODEL)
    from test_cli import recmodel

    out = recmodel("retrain", "--as-of", "2030-01-01T00:00:00+00:00", url=recsys_env, home=tmp_path)
    assert out.returncode == 2 and "is in the future" in out.stdout
    # Within the clock-skew tolerance: allowed, but the watermark stops at the database's clock.
    ctx = pipeline.make_context(now + timedelta(minutes=4), SMALL_MODEL)
    pipeline.step_validate(ctx, pipeline.step_extract(ctx))
    with db.connect(recsys_env) as conn:
        high, committed = conn.execute("SELECT high_watermark, committed_at FROM recsys.extract_watermarks").fetchone()
    assert high <= committed < ctx.as_of
    with db.transaction(recsys_env) as conn:  # arrives after that run: ingested_at = now()
        conn.execute("INSERT INTO interactions (user_id, item_id, event_type, occurred_at) VALUES (1, 2, 'view', now())")
    assert fresh_interactions(recsys_env)[0] >= 1


def test_rows_validated_by_a_run_that_died_are_trained_by_the_next(recsys_env: str, monkeypatch) -> None:
    seed_small(recsys_env, NOW)
    died = pipeline.make_context(NOW, SMALL_MODEL)
    pipeline.step_validate(died, pipeline.step_extract(died))  # the snapshot is committed ...
    with db.transaction(recsys_env) as conn:  # ... then the process is killed inside training
        conn.execute("UPDATE recsys.pipeline_runs SET stage = 'train', active_step = 'train', "
                     "heartbeat_at = now() - interval '1 hour' WHERE run_key = %s", (died.run_key,))
    rows, running = fresh_interactions(recsys_env)
    assert rows == 8000 and not running  # due, and a dead run does not count as running
    following = pipeline.make_context(NOW + timedelta(hours=1), SMALL_MODEL)
    extracted = pipeline.step_extract(following)
    with db.connect(recsys_env) as conn:
        status, message = conn.execute("SELECT status, message FROM recsys.pipeline_runs WHERE run_key = %s",
                                       (died.run_key,)).fetchone()
    assert status == "failed" and "the run died: no heartbeat from step train" in message
    validated = pipeline.step_validate(following, extracted)
    assert validated.new_rows == 0 and validated.snapshot.dataset_path == str(died.files.dataset)


CHILD = ("import json, sys\nfrom datetime import datetime\nfrom recmodel import pipeline\n"
         "pipeline.run_all(pipeline.make_context(datetime.fromisoformat(sys.argv[1]), json.loads(sys.argv[2])))\n")


@pytest.mark.slow
def test_one_run_at_a_time_and_a_killed_one_is_taken_as_dead(recsys_env: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seed_small(recsys_env, NOW)
    first = pipeline.make_context(NOW, SMALL_MODEL)
    child = subprocess.Popen([sys.executable, "-c", CHILD, NOW.isoformat(), json.dumps(SMALL_MODEL)],
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        # One read per look: between two steps the run is briefly not live, so a second read may find no run.
        while not (live := registry.live_runs(recsys_env)) or live[0][1] != "train":
            assert child.poll() is None, child.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run never reached training"
            time.sleep(0.2)
        second = pipeline.make_context(NOW + timedelta(hours=1), SMALL_MODEL)
        with pytest.raises(RunRefused, match=f"another retrain is running on this database: run {first.run_key} "
                                             r"\(step train"):
            pipeline.step_extract(second)
        from test_cli import recmodel

        cli = recmodel("retrain", "--as-of", (NOW + timedelta(hours=1)).isoformat(), url=recsys_env, home=tmp_path)
        assert cli.returncode == 2 and "another retrain is running" in cli.stdout
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    monkeypatch.setattr(registry, "STALE_AFTER_SECONDS", 1.0)  # instead of waiting five minutes
    time.sleep(1.5)
    pipeline.step_extract(second)  # the killed run no longer holds the database
    with db.connect(recsys_env) as conn:
        status = conn.execute("SELECT status FROM recsys.pipeline_runs WHERE run_key = %s", (first.run_key,)).fetchone()
    assert status == ("failed",)


def test_a_reader_holding_a_long_transaction_stalls_neither_readers_nor_the_publish(db_url: str,
                                                                                   reliability_figure) -> None:
    from test_publish import frames, register

    from recmodel.publish import publish

    register(db_url, "v20261101000000", "v20261102000000")
    publish(db_url, "v20261101000000", frames(200, 20, 0), generated_at=NOW, keep_versions=3)
    latencies: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with psycopg.connect(db.libpq_url(db_url), autocommit=True) as conn:
                while not stop.is_set():
                    started = time.perf_counter()
                    conn.execute("SELECT item_id FROM recsys.user_recommendations WHERE user_id = %s",
                                 (int(rng.integers(1, 201)),)).fetchall()
                    latencies.append(time.perf_counter() - started)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    holder = psycopg.connect(db.libpq_url(db_url))
    holder.execute("SELECT count(*) FROM recsys.user_recommendations").fetchone()  # and keeps the transaction open
    released = threading.Timer(2.0, holder.commit)
    released.start()
    try:
        result = publish(db_url, "v20261102000000", frames(200, 20, 1), generated_at=NOW, keep_versions=3)
    finally:
        released.join()
        holder.close()
        stop.set()
        for thread in threads:
            thread.join()
    with db.connect(db_url) as conn:
        serving = conn.execute("SELECT DISTINCT model_version FROM recsys.user_recommendations").fetchall()
    assert not errors and serving == [("v20261102000000",)]
    assert result.lock_waits >= 1  # it gave way to the long transaction instead of queueing readers behind it
    p99 = float(np.percentile(latencies, 99)) * 1000
    reliability_figure("reader p99 while a publish waits on a 2 s reader transaction",
                       f"{p99:.1f} ms over {len(latencies):,} reads (max {max(latencies) * 1000:.1f} ms), "
                       f"{result.lock_waits} swap lock waits")


def test_a_publish_killed_between_load_and_swap_leaves_nothing_behind(db_url: str) -> None:
    from test_publish import frames, register

    from recmodel.publish import load_staging, publish

    register(db_url, "v20261101000000", "v20261102000000")
    load_staging(db_url, "v20261101000000", frames(20, 5, 0), NOW)  # ... and then the process was killed
    publish(db_url, "v20261102000000", frames(20, 5, 1), generated_at=NOW, keep_versions=3)
    with db.connect(db_url) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'recsys' "
                                             "AND tablename LIKE 'user_recommendations%' ORDER BY 1")]
        indexes = [r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'recsys' "
                                              "AND tablename LIKE 'user_recommendations%'")]
    assert tables == ["user_recommendations__v20261102000000"]
    assert indexes == ["user_recommendations__v20261102000000_key"]  # named after its table, not "staging"


def test_rollback_refuses_a_model_whose_files_were_tampered_with(db_url: str) -> None:
    from test_publish import frames, register

    from recmodel.publish import PublishError, publish, rollback

    register(db_url, "v20261101000000", "v20261102000000")
    for number, version in enumerate(("v20261101000000", "v20261102000000")):
        publish(db_url, version, frames(10, 5, number), generated_at=NOW, keep_versions=3)
    with db.connect(db_url) as conn:
        onnx = Path(conn.execute("SELECT onnx_path FROM recsys.model_registry WHERE version = 'v20261101000000'"
                                 ).fetchone()[0])
    onnx.write_bytes(onnx.read_bytes() + b"tampered")
    with pytest.raises(PublishError, match="cannot roll back to v20261101000000: .* has sha256 .* refusing"):
        rollback(db_url, "v20261101000000")
    with db.connect(db_url) as conn:
        serving = conn.execute("SELECT version FROM recsys.published_versions WHERE serving").fetchone()[0]
    assert serving == "v20261102000000"


def test_the_reader_role_cannot_create_temp_tables_or_reach_other_databases(pg_server_url: str, db_url: str) -> None:
    import uuid

    login = f"app_{uuid.uuid4().hex[:8]}"
    other = f"t_{uuid.uuid4().hex[:12]}"
    db.ensure_database(pg_server_url, other)  # e.g. the Airflow metadata database
    with db.connect(db_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {login} LOGIN PASSWORD 'pw' IN ROLE recsys_reader")
    parsed = psycopg.conninfo.conninfo_to_dict(db.libpq_url(db_url))
    try:
        with psycopg.connect(**{**parsed, "user": login, "password": "pw"}) as conn:
            assert conn.execute("SELECT count(*) FROM recsys.popular_items").fetchone()[0] == 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TEMP TABLE scratch (x int)")
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(**{**parsed, "dbname": other, "user": login, "password": "pw"})
    finally:
        with db.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")
            with db.connect(db_url, autocommit=True) as owner:
                owner.execute(f"DROP OWNED BY {login}")
            conn.execute(f"DROP ROLE IF EXISTS {login}")


def test_migration_007_keeps_existing_login_roles_connected(pg_server_url: str) -> None:
    """A database PUBLIC could connect to (not created by this project): its existing roles keep access."""
    import uuid

    name, role = f"t_{uuid.uuid4().hex[:12]}", f"app_{uuid.uuid4().hex[:8]}"
    with db.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # Postgres's defaults: PUBLIC may connect
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    url = db.with_database(pg_server_url, name)
    try:
        db.migrate(url)
        parsed = psycopg.conninfo.conninfo_to_dict(db.libpq_url(url))
        with psycopg.connect(**{**parsed, "user": role, "password": "pw"}) as conn:
            conn.execute("CREATE TEMP TABLE scratch (x int)")  # what it could do before, it still can
        with db.connect(url) as conn:
            public = conn.execute("SELECT has_database_privilege('recsys_reader', current_database(), 'TEMPORARY'), "
                                  "has_database_privilege('recsys_reader', current_database(), 'CONNECT')").fetchone()
        assert public == (False, True)
    finally:
        with db.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_seed_appends_beside_a_null_id(recsys_env: str) -> None:
    from recmodel.synth import seed_database

    seed_small(recsys_env, NOW)
    loosen_source_columns(recsys_env)
    add_events(recsys_env, [(None, 3, "view", None, NOW - timedelta(hours=1), NOW - timedelta(hours=1))])
    summary = seed_database(recsys_env, users=200, items=150, events=500, seed=3, now=NOW + timedelta(days=1))
    assert summary.appended and summary.events_added == 500


def test_every_setting_is_range_checked_before_any_work(db_url: str, tmp_path: Path) -> None:
    from test_cli import recmodel

    for bad, message in ((
            {"learning_rate": -1}, "learning_rate must be within (0, 1]"), ({"dropout": 5}, "dropout must be within"),
            ({"value_min": 10, "value_max": 0}, "value_min (10.0) must not exceed value_max"),
            ({"gate_metric": "bogus"}, "gate_metric must be one of"),
            ({"training_window_days": -1}, "training_window_days must be within"),
            ({"epochs": 1e12}, "epochs must be within [1, 1000]"),
            ({"gate_champion_tolerance": 5}, "gate_champion_tolerance must be within [0, 1]")):
        with pytest.raises(ConfigError) as refused:
            pipeline.PipelineConfig.from_overrides(bad)
        assert message in str(refused.value)
    for text in ('{"learning_rate": NaN}', '{"holdout_days": Infinity}'):
        out = recmodel("retrain", "--conf", text, url=db_url, home=tmp_path)
        assert out.returncode == 2 and "must be within" in out.stdout and "Traceback" not in out.stdout + out.stderr
