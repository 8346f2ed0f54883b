"""The command line as a user runs it (subprocesses), with the bad inputs a user gives it."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from conftest import REPO_ROOT
from recmodel import db


def recmodel(*args: str, url: str | None, home: Path, timeout: float = 300,
             path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECSYS_HOME": str(home), "PYTHONPATH": str(REPO_ROOT), "PATH": path or os.environ["PATH"]}
    env.pop("RECSYS_DATABASE_URL", None)
    if url is not None:
        env["RECSYS_DATABASE_URL"] = url
    return subprocess.run([sys.executable, "-m", "recmodel", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=timeout, check=False)


def test_unreachable_database_is_named_without_its_password(tmp_path: Path) -> None:
    out = recmodel("status", url="postgresql://app:s3cret@127.0.0.1:1/recsys", home=tmp_path)
    assert out.returncode == 2
    assert "cannot connect to Postgres at postgresql://app:***@127.0.0.1:1/recsys" in out.stdout
    assert "s3cret" not in out.stdout + out.stderr


def test_not_a_postgres_url(tmp_path: Path) -> None:
    out = recmodel("migrate", url="mysql://x@localhost/db", home=tmp_path)
    assert out.returncode == 2 and "must point to PostgreSQL" in out.stdout


def test_retrain_on_empty_tables_says_what_to_do(db_url: str, tmp_path: Path) -> None:
    out = recmodel("retrain", url=db_url, home=tmp_path)
    assert out.returncode == 2
    assert "interactions table is empty" in out.stdout and "seed" in out.stdout


def test_bad_conf_is_refused_before_anything_runs(db_url: str, tmp_path: Path) -> None:
    out = recmodel("retrain", "--conf", "{epochs: 2}", url=db_url, home=tmp_path)
    assert out.returncode == 2 and "--conf is not valid JSON" in out.stdout
    out = recmodel("retrain", "--conf", '{"epoch": 2}', url=db_url, home=tmp_path)
    assert out.returncode == 2 and "unknown pipeline setting(s): epoch" in out.stdout


def test_rollback_to_an_unknown_version(db_url: str, tmp_path: Path) -> None:
    out = recmodel("rollback", "v20990101000000", url=db_url, home=tmp_path)
    assert out.returncode == 2 and "no such version in the registry" in out.stdout


def test_rollback_is_recorded_in_pipeline_runs_as_the_dag_records_it(db_url: str, tmp_path: Path) -> None:
    from datetime import datetime

    from recmodel.publish import publish
    from test_publish import frames, register

    first, second = "v20261101000000", "v20261102000000"
    register(db_url, first, second)
    for n, version in enumerate((first, second)):
        publish(db_url, version, frames(5, 3, seed=n), generated_at=datetime(2026, 11, 2, tzinfo=UTC), keep_versions=3)
    done = recmodel("rollback", first, url=db_url, home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    refused = recmodel("rollback", first, url=db_url, home=tmp_path)  # it serves already
    assert refused.returncode == 2 and "already serving" in refused.stdout
    with db.connect(db_url) as conn:
        rows = conn.execute("SELECT kind, status, stage, model_version, message, finished_at IS NOT NULL, run_key "
                            "FROM recsys.pipeline_runs ORDER BY started_at").fetchall()
    assert [row[:6] for row in rows] == [
        ("rollback", "success", "rollback", first, f"{first} now serves (was {second})", True),
        ("rollback", "failed", "rollback", None,
         f"rollback failed: PublishError: {first} is already serving; nothing to roll back", True)]
    assert all(row[6].startswith("rollback:cli__") for row in rows) and rows[0][6] != rows[1][6]


def test_reproduce_refuses_a_malformed_or_unknown_run_key_before_creating_anything(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recmodel import registry

    temp = tmp_path / "tmp"
    (temp / "reproduce-a").mkdir(parents=True)  # so that `a/../x` could climb out of it
    monkeypatch.setenv("TMPDIR", str(temp))
    hostile = recmodel("reproduce", "a/../x", url=db_url, home=tmp_path)
    assert hostile.returncode == 2 and "'a/../x' is not a run key" in hostile.stdout, hostile.stdout
    unknown = recmodel("reproduce", "20261201T235959Z", url=db_url, home=tmp_path)
    assert unknown.returncode == 2 and "no run 20261201T235959Z" in unknown.stdout, unknown.stdout
    registry.record_event(db_url, "20261130T000000Z", kind="retrain", status="skipped", stage="extract",
                          message="nothing new")
    untrained = recmodel("reproduce", "20261130T000000Z", url=db_url, home=tmp_path)
    assert untrained.returncode == 2 and "has no manifest with a train stage" in untrained.stdout, untrained.stdout
    # Nothing created, nothing left behind (the libraries' own caches aside: torch keeps one there).
    assert [p.name for p in temp.iterdir() if p.name.startswith(("reproduce-", "x-"))] == ["reproduce-a"]
    assert not any((temp / "reproduce-a").iterdir())


@pytest.mark.parametrize("layout", ["missing", "ratings_only"])
def test_malformed_movielens_folder(db_url: str, tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "ml"
    if layout == "ratings_only":
        folder.mkdir()
        (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    out = recmodel("import", "movielens", str(folder), url=db_url, home=tmp_path)
    assert out.returncode == 2
    assert str(folder) in out.stdout.replace("\n", "")


def test_quarantine_replay_names_reasons_and_counts(db_url: str, tmp_path: Path) -> None:
    bad = recmodel("quarantine", "replay", "--reason", "gremlins", url=db_url, home=tmp_path)
    assert bad.returncode == 2 and "unknown quarantine reason 'gremlins'; reasons: null_user_id" in bad.stdout
    with db.transaction(db_url) as conn:
        conn.execute("INSERT INTO recsys.quarantine (run_key, event_id, reason, row_data) VALUES "
                     "('r1', 1, 'unknown_item', '{}'), ('r1', 2, 'unknown_item', '{}'), ('r2', 3, 'unknown_item', '{}')")
    one_run = recmodel("quarantine", "replay", "--reason", "unknown_item", "--run", "r1", url=db_url, home=tmp_path)
    assert one_run.returncode == 0 and "marked 2 quarantine entries (unknown_item of run r1)" in one_run.stdout
    again = recmodel("quarantine", "replay", "--reason", "unknown_item", "--run", "r1", url=db_url, home=tmp_path)
    assert "nothing to replay" in again.stdout


def test_seed_status_and_db_url(db_url: str, tmp_path: Path) -> None:
    out = recmodel("seed", "--users", "50", "--items", "40", "--events", "600", url=db_url, home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded 600 interactions and 40 items" in out.stdout
    status = recmodel("status", url=db_url, home=tmp_path)
    assert status.returncode == 0 and "nothing published yet" in status.stdout
    printed = recmodel("db", "url", url=db_url, home=tmp_path)
    assert printed.returncode == 0 and "/t_" in printed.stdout


def test_embedded_database_starts_when_no_url_is_set(tmp_path: Path) -> None:
    out = recmodel("db", "url", url=None, home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().startswith("postgresql://") and "recsys" in out.stdout
    assert (tmp_path / "pg" / "PG_VERSION").exists()
    with psycopg.connect(out.stdout.strip()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert recmodel("db", "down", url=None, home=tmp_path).returncode == 0


@pytest.mark.slow
def test_bench_times_every_stage_beside_its_baselines_and_through_airflow(db_url: str, tmp_path: Path) -> None:
    import json

    output, plot = tmp_path / "bench.json", tmp_path / "scaling.png"
    out = recmodel("bench", "--events", "4000", "--sizes", "2000", "--epochs", "1", "--score-users", "300",
                   "--score-items", "200", "--output", str(output), "--plot", str(plot), url=db_url, home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(output.read_text())
    stages = result["stages"]
    assert set(stages) == {"extract", "validate", "train", "export", "gate", "refit", "score", "publish",
                           "publish_past_long_reader", "explanations", "end_to_end", "daily_warm_retrain"}
    assert all(stage["seconds"] > 0 for stage in stages.values())
    assert all(stages[name]["peak_rss_mb"] > 0 for name in stages if name != "end_to_end")
    assert stages["extract"]["rows"] == 4000
    assert stages["extract"]["baseline_rows_per_s"] > 0 and stages["extract"]["limit_rows_per_s"] > 0
    assert stages["train"]["tokens_per_s"] > 0 and 0 <= stages["train"]["input_wait_share"] < 1
    assert stages["score"]["users_per_s"] > 0 and stages["score"]["ort_vs_torch"] > 0
    assert stages["publish"]["copy_vs_executemany"] > 0 and stages["publish"]["reader_errors"] == 0
    behind_reader = stages["publish_past_long_reader"]  # gave way to the long transaction, failed no reader
    assert behind_reader["lock_waits"] >= 1 and behind_reader["reader_errors"] == 0 and behind_reader["reader_queries"] > 0
    explained = stages["explanations"]  # the same users scored and published with and without because_item_id
    assert explained["rows"] > 0 and explained["score_and_publish_ratio"] > 0 and explained["publish_ratio"] > 0
    assert set(stages["end_to_end"]["tasks"]) == {"extract", "validate", "train", "export", "gate", "refit",
                                                  "plan_scoring", "score_users[0]", "score_items", "publish"}
    assert 0 <= stages["end_to_end"]["airflow_overhead_share"] < 1
    daily = stages["daily_warm_retrain"]  # the next day's default run after a day's events
    assert daily["new_events"] == 100 and daily["train"]["stopped_by"] in ("early_stopping", "time_budget", "epochs")
    assert set(result["scaling"]) == {"2000", "4000"}
    assert plot.read_bytes().startswith(b"\x89PNG")
    with psycopg.connect(db_url) as conn:  # the user's database is untouched, the scratch ones are gone
        assert conn.execute("SELECT count(*) FROM interactions").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'recsys_bench%'").fetchone()[0] == 0


def test_bench_refuses_bad_sizes(db_url: str, tmp_path: Path) -> None:
    out = recmodel("bench", "--sizes", "1000,lots", url=db_url, home=tmp_path)
    assert out.returncode == 2 and "--sizes must be comma-separated integers, got '1000,lots'" in out.stdout


def test_the_celery_stack_is_refused_before_anything_starts(db_url: str, tmp_path: Path) -> None:
    out = recmodel("demo", "--executor", "celery", "--workers", "0", url=db_url, home=tmp_path)
    assert out.returncode == 2 and "--workers must be at least 1, not 0" in out.stdout
    nothing_on_path = tmp_path / "empty-bin"
    nothing_on_path.mkdir()
    no_redis = recmodel("demo", "--executor", "celery", url=db_url, home=tmp_path, path=str(nothing_on_path))
    assert no_redis.returncode == 2 and "--executor celery needs redis-server" in no_redis.stdout
    out = recmodel("bench", "celery", "--shards", "1", url=db_url, home=tmp_path)
    assert out.returncode == 2 and "--shards >= 2" in out.stdout
    with db.connect(db_url) as conn:  # the demo seeded nothing
        assert conn.execute("SELECT count(*) FROM interactions").fetchone()[0] == 0


def write_movielens(folder: Path, users: int = 60, items: int = 80, events: int = 2400) -> None:
    """A small MovieLens-format folder made from the synthetic generator."""
    from datetime import datetime

    from recmodel.synth import generate

    data = generate(users, items, events, seed=3, end=datetime(2020, 1, 1, tzinfo=UTC))
    folder.mkdir()
    genres = data.items["tags"].map(lambda tags: "|".join(t.title() for t in tags[:2]))
    pd.DataFrame({"movieId": data.items["item_id"], "title": data.items["title"], "genres": genres}).to_csv(
        folder / "movies.csv", index=False)
    ratings = data.interactions.drop_duplicates(["user_id", "item_id"])
    pd.DataFrame({"userId": ratings["user_id"], "movieId": ratings["item_id"], "rating": 4.0,
                  "timestamp": ratings["occurred_at"].astype("int64") // 10**6}).to_csv(folder / "ratings.csv",
                                                                                        index=False)


@pytest.mark.slow
def test_bench_accuracy_scores_what_a_default_retrain_published(db_url: str, tmp_path: Path) -> None:
    """60 users are too few for the gate (gate_min_users 100): the run publishes the baseline, which the
    bench scores from the view like any published version, beside the classical baselines."""
    import json

    folder = tmp_path / "ml"
    write_movielens(folder)
    output = tmp_path / "accuracy.json"
    out = recmodel("bench", "accuracy", "--movielens", str(folder), "--output", str(output), url=db_url, home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(output.read_text())["accuracy"]
    assert set(result["models"]) == {"published view", "ease", "item_knn", "popularity", "text only"}
    assert {"cold_item_users", "warm_item_ndcg@10", "new_item_share@10"} <= set(result["models"]["ease"])
    assert 0 <= result["similar_items"]["cooccurrence_overlap"] <= 1 and result["cold_items"]["items"] == 0
    assert result["served_by"] == ["baseline"] and result["version"].endswith("-baseline")
    assert result["users"] == 60 and result["served_share"] == 1.0
    assert result["holdout"]["users"] < 100 and result["defaults"]["gate_min_users"] == 100
    for name, row in result["models"].items():
        low, high = row["ndcg@10_ci"]
        assert low <= row["ndcg@10"] <= high
        if name != "published view":
            assert row["model_ratio_ndcg@10"] > 0
    # the baseline is popularity minus seen items, computed on the same data: the same lists
    # (ties at the tenth place may break differently)
    assert result["models"]["published view"]["ndcg@10"] == pytest.approx(result["models"]["popularity"]["ndcg@10"],
                                                                          abs=0.01)
    assert "published/this NDCG" in out.stdout
    with psycopg.connect(db_url) as conn:  # the scratch databases are gone
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'recsys_bench%'").fetchone()[0] == 0


@pytest.mark.slow
def test_bench_accuracy_runs_its_retrains_with_the_settings_and_seeds_given(db_url: str, tmp_path: Path) -> None:
    """`--conf` reaches each retrain (here a model published whatever the gate says, read through a text encoder
    fine-tuned for one step, which the tuned text-only reference reads too) and `--seeds` runs one per seed."""
    import json

    folder = tmp_path / "ml"
    write_movielens(folder)
    output = tmp_path / "accuracy.json"
    conf = {"gate_enforced": False, "epochs": 2, "d_model": 16, "text_finetune_steps": 1}
    out = recmodel("bench", "accuracy", "--movielens", str(folder), "--output", str(output), "--conf",
                   json.dumps(conf), "--seeds", "5,6", url=db_url, home=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    written = json.loads(output.read_text())
    runs, summary = written["runs"], written["over_seeds"]
    assert [run["conf"] for run in runs] == [{**conf, "seed": 5}, {**conf, "seed": 6}]
    for run in runs:
        assert run["served_by"] == ["model"] and run["published_training"]["text_encoder"]["steps"] == 1
        assert {"text only", "text only (tuned encoder)"} <= set(run["models"])
    values = [run["models"]["published view"]["ndcg@10"] for run in runs]
    assert [row["ndcg@10"] for row in summary["runs"]] == values
    assert summary["published_view"]["ndcg@10"]["mean"] == pytest.approx(sum(values) / 2)
    assert "text encoder fine-tuned for 1 steps" in out.stdout and "mean [95% t]" in out.stdout


def test_bench_accuracy_needs_a_folder(db_url: str, tmp_path: Path) -> None:
    out = recmodel("bench", "accuracy", url=db_url, home=tmp_path)
    assert out.returncode == 2 and "--movielens DIR" in out.stdout


@pytest.mark.parametrize("conf, message", [('{"epoch": 2}', "unknown pipeline setting(s): epoch"),
                                           ('{"as_of": "2026-01-01T00:00:00+00:00"}', "pipeline settings only"),
                                           ("[2]", "must be a JSON object")])
def test_bench_accuracy_refuses_bad_settings_before_any_work(db_url: str, tmp_path: Path, conf: str,
                                                             message: str) -> None:
    out = recmodel("bench", "accuracy", "--movielens", str(tmp_path), "--conf", conf, url=db_url, home=tmp_path)
    assert out.returncode == 2 and message in out.stdout


@pytest.mark.parametrize("extra, message", [(["--seeds", "13,x"], "comma-separated list of integers"),
                                            (["--seeds", "13,13"], "distinct non-negative seeds"),
                                            (["--seeds", "13,14", "--ablations"], "runs no ablations"),
                                            (["--seeds", "13,14", "--conf", '{"seed": 2}'], "runs no ablations")])
def test_bench_accuracy_refuses_bad_seeds_before_any_work(db_url: str, tmp_path: Path, extra: list[str],
                                                          message: str) -> None:
    out = recmodel("bench", "accuracy", "--movielens", str(tmp_path), *extra, url=db_url, home=tmp_path)
    assert out.returncode == 2 and message in out.stdout


def stream(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recmodel", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT, start_new_session=True)


def timed_lines(process: subprocess.Popen, timeout: float) -> list[tuple[float, str]]:
    """Every line the process prints with the second it arrived, until it exits."""
    import time

    started, lines = time.monotonic(), []
    for line in process.stdout:
        lines.append((time.monotonic() - started, line.rstrip("\n")))
        assert time.monotonic() - started < timeout, "\n".join(text for _, text in lines)
    process.wait(timeout=30)
    return lines


@pytest.mark.slow
def test_demo_speaks_as_it_goes_prints_no_error_and_hands_apps_a_login_then_ui_opens_the_state(
        pg_server_url: str, db_url: str, tmp_path: Path) -> None:
    """The newcomer's first hour: `demo` is never quiet for long, a success prints no error, the login it
    prints reads recommendations with titles, and `ui` serves Airflow on that state without retraining."""
    import json
    import signal
    import urllib.request
    import uuid

    from psycopg import sql

    from recmodel.cli import QUIET_SECONDS
    from recmodel.runner import free_port

    metadata = f"airflow_{uuid.uuid4().hex[:8]}"  # a metadata DB of its own: `ui` unpauses the DAGs there
    db.ensure_database(pg_server_url, metadata)
    env = {**os.environ, "RECSYS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT),
           "RECSYS_DATABASE_URL": db_url, "AIRFLOW_HOME": str(tmp_path / "airflow"),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db.sqlalchemy_url(db.with_database(pg_server_url, metadata))}
    try:
        demo = stream(["demo", "--users", "300", "--items", "150", "--events", "8000"], env)
        lines = timed_lines(demo, timeout=600)
        output = "\n".join(text for _, text in lines)
        assert demo.returncode == 0, output
        gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(lines)]
        # The heartbeat speaks after QUIET_SECONDS of silence; it polls each second, and a loaded CI
        # core may deliver a line a moment late.
        assert max(gaps) <= QUIET_SECONDS + 3, f"silent for {max(gaps):.0f} s:\n{output}"
        assert "error" not in output.lower() and "xcom not found" not in output.lower(), output
        assert "train: " in output or "epoch 1/" in output  # the stages' progress reached the terminal
        [train_log] = (tmp_path / "airflow" / "logs" / "dag_id=recsys_retrain").glob("run_id=*/task_id=train/attempt=1.log")
        records = [json.loads(line) for line in train_log.read_text().splitlines()]  # the UI's task log of `train`
        assert any(r["event"].startswith("epoch 1/") for r in records)
        assert all(r["level"] != "error" for r in records) and all(r["timestamp"] for r in records)
        app_url = next(text.split("'")[1] for _, text in lines if text.strip().startswith("psql 'postgresql://"))
        with psycopg.connect(app_url) as app:
            titled = app.execute("SELECT r.item_id, c.title FROM recsys.user_recommendations r "
                                 "JOIN recsys.item_catalog c USING (item_id) WHERE r.rank = 1").fetchall()
            assert len(titled) == 300 and all(title for _, title in titled)

        port = free_port()
        ui = stream(["ui", "--port", str(port)], env)
        seen = []
        for line in ui.stdout:
            seen.append(line)
            if line.startswith("Recommender page:") or ui.poll() is not None:
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=10) as health:
            assert health.status == 200, "".join(seen)
        ui.send_signal(signal.SIGINT)
        rest = ui.communicate(timeout=120)[0]
        assert ui.returncode == 0, "".join(seen) + rest
        assert "recsys_retrain as of" not in "".join(seen)  # it opened the state as it was: no retrain first
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(metadata)))
            conn.execute("DROP ROLE IF EXISTS recsys_app")


def test_db_down_stops_the_embedded_server_and_refuses_a_configured_one(db_url: str, tmp_path: Path) -> None:
    up = recmodel("db", "up", url=None, home=tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr
    pid = int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0])
    down = recmodel("db", "down", url=None, home=tmp_path)
    assert down.returncode == 0 and "stopped the embedded Postgres" in down.stdout
    assert not (tmp_path / "pg" / "postmaster.pid").exists()
    assert not db._alive(pid)
    again = recmodel("db", "down", url=None, home=tmp_path)
    assert again.returncode == 0 and "no embedded Postgres is running" in again.stdout
    yours = recmodel("db", "down", url=db_url, home=tmp_path)
    assert yours.returncode == 2 and "RECSYS_DATABASE_URL is set" in yours.stdout
