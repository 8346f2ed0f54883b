"""recsys_retrain on CeleryExecutor, for real: Redis, Airflow's api-server, dag-processor and scheduler, and two
Celery workers, all local processes started as docker-compose.yaml defines them (`recmodel.celerystack`: the
same environment, queues and concurrency), with Airflow's metadata in Postgres.

The workers are the compose file's two: `airflow-worker` on `default`, `airflow-worker-gpu` on `gpu` and
`default`. One LocalExecutor run and one Celery run score the same snapshot (two databases cloned from
one seed) and must publish the same lists. Then two faults on the live stack, each on a day of new data:
a worker SIGKILLed while it holds a scoring shard, and Redis stopped while the scheduler queues a task.
Everything is read back from Airflow's own task-instance records, through its REST API.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from conftest import SMALL_MODEL, blocked, seed_small, serving_state, staged_tables
from recmodel import db

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.celery,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (Debian: apt-get install redis-server)")]

DAG = "recsys_retrain"
NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
SHARDS = 4
CONF = {**SMALL_MODEL, "score_shards": SHARDS, "refit_epochs": 0}  # no refit: a quarter less time per run
LENIENT = {**CONF, "gate_champion_tolerance": 1.0}  # a fault run must reach scoring whatever its metric
GPU_WORKER, CPU_WORKER = "airflow-worker-gpu", "airflow-worker"
# What the test sets, as a user of docker-compose.yaml would in .env: one task at a time per worker (two cores
# here), a dead worker's task failed after 20 s without heartbeats, and a quick retry.
STACK_VARIABLES = {"AIRFLOW_WORKER_CONCURRENCY": "1", "AIRFLOW_TASK_HEARTBEAT_TIMEOUT": "20",
                   "RECSYS_RETRY_DELAY_SECONDS": "5",
                   # Only the runs the test triggers: no scheduled run of the retrain DAG starts on unpausing it.
                   "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
RUN_TIMEOUT = 420


MODEL_FILES = ("model.pt", "model_config.json", "vocab.npy", "model.onnx", "model.onnx.data", "item_vectors.npy")


@dataclass
class Cluster:
    stack: object  # recmodel.celerystack.CeleryStack
    api: object  # recmodel.celerystack.AirflowApi
    url: str  # the recsys database the workers serve
    home: Path  # their RECSYS_HOME
    local_url: str  # the LocalExecutor run's clone of it
    local_home: Path


def version_of(when: datetime) -> str:
    return "v" + when.strftime("%Y%m%d%H%M%S")


def run_key_of(when: datetime) -> str:
    from recmodel.registry import run_key_for

    return run_key_for(when)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 300, every: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def state_of(api, run_id: str, task_id: str) -> str | None:
    return next((ti["state"] for ti in api.task_instances(DAG, run_id) if ti["task_id"] == task_id), None)


def run_through(api, conf: dict, timeout: float = RUN_TIMEOUT) -> tuple[str, str]:
    run_id = api.trigger(DAG, conf)
    return run_id, api.wait_for_run(DAG, run_id, timeout)


@contextmanager
def holding_the_run(url: str, when: datetime) -> Iterator[None]:
    """Hold the row lock of the run's `pipeline_runs` row: every stage's bookkeeping waits on it, so the
    tasks that start meanwhile stay running until the block ends."""
    with db.connect(url) as conn:
        locked = conn.execute("SELECT 1 FROM recsys.pipeline_runs WHERE run_key = %s FOR UPDATE",
                              (run_key_of(when),)).fetchone()
        assert locked, "the run has no row yet"
        yield


def published(url: str) -> dict[str, list[tuple]]:
    """Every row of the three serving views, in order."""
    with db.connect(url) as conn:
        return {view: conn.execute(sql.SQL("SELECT * FROM recsys.{} ORDER BY 1, 2, 3").format(sql.Identifier(view)))
                .fetchall() for view in ("user_recommendations", "similar_items", "popular_items")}


def assert_whole(url: str, version: str, users: int) -> None:
    """The views serve exactly `version`, a full list for every one of `users` users, and no staged leftovers."""
    versions, rows, served, champions, serving = serving_state(url)
    assert versions == [version] and champions == [version] == serving
    assert served == users and rows == users * 20
    assert staged_tables(url) == 0


def model_files(home: Path) -> dict[str, str]:
    from recmodel.artifacts import sha256_file

    folder = home / "models" / version_of(NOW)
    return {name: sha256_file(folder / name) for name in MODEL_FILES}


def users_up_to(url: str, when: datetime) -> int:
    with db.connect(url) as conn:
        return conn.execute("SELECT count(DISTINCT user_id) FROM interactions WHERE occurred_at <= %s",
                            (when,)).fetchone()[0]


def drop(server_url: str, *names: str) -> None:
    with psycopg.connect(db.libpq_url(server_url), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def cluster(pg_server_url: str, airflow_ready: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from recmodel.celerystack import SERVER_COMPONENTS, AirflowApi, read_compose, start_celery_stack
    from recmodel.config import Settings
    from recmodel.runner import airflow_environment, free_port, start_stack

    tag = uuid.uuid4().hex[:8]
    names = {"celery": f"celery_{tag}", "local": f"local_{tag}", "meta": f"celery_meta_{tag}"}
    db.ensure_database(pg_server_url, names["celery"])
    url = db.with_database(pg_server_url, names["celery"])
    db.migrate(url)
    seed_small(url, NOW)
    db.ensure_database(pg_server_url, names["local"], template=names["celery"])  # the same snapshot, row for row
    local_url = db.with_database(pg_server_url, names["local"])
    db.ensure_database(pg_server_url, names["meta"])
    metadata = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db.sqlalchemy_url(
        db.with_database(pg_server_url, names["meta"]), "psycopg2")}
    base = tmp_path_factory.mktemp("celery")
    home, local_home = base / "celery-home", base / "local-home"

    def variables(recsys_url: str, home: Path) -> dict[str, str]:
        (home / "airflow").mkdir(parents=True)
        return {**airflow_environment(Settings(home=home, database_url=None), recsys_url), **metadata,
                "AIRFLOW_HOME": str(home / "airflow"), **STACK_VARIABLES}

    stack = None
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in STACK_VARIABLES.items():
                patch.setenv(key, value)  # read by the compose file's `${...}` as Compose would
            local_variables = {**variables(local_url, local_home), **read_compose().environment,
                               "AIRFLOW__CORE__EXECUTOR": "LocalExecutor"}
            subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env={**os.environ, **local_variables},
                           check=True, capture_output=True)
            local = start_stack(local_variables, free_port(), base / "local-logs", components=SERVER_COMPONENTS)
            try:
                api = AirflowApi(local.base_url, local.username, local.password)
                api.wait_for_dag(DAG)
                api.set_paused(DAG, False)
                _, state = run_through(api, {**CONF, "as_of": NOW.isoformat()})
                assert state == "success", f"the LocalExecutor run {state} (logs in {local.log_dir})"
            finally:
                local.stop()
            stack = start_celery_stack(variables(url, home), base / "celery-logs", workers=2)
        api = AirflowApi(stack.base_url, stack.airflow.username, stack.airflow.password)
        yield Cluster(stack=stack, api=api, url=url, home=home, local_url=local_url, local_home=local_home)
    finally:
        if stack is not None:
            stack.stop()
        drop(pg_server_url, *names.values())


def worker_of(ti: dict) -> str:
    """The worker service a task instance ran on, from its recorded host name (`service@host`)."""
    return (ti["hostname"] or "").split("@")[0]


def set_consuming(cluster: Cluster, worker: str, queue: str, on: bool) -> None:
    """Have one worker start or stop taking tasks from `queue` (`celery control add_consumer|cancel_consumer`);
    returns once the worker has confirmed it."""
    from recmodel.celerystack import celery_command

    node = cluster.stack.node(worker)
    command = "add_consumer" if on else "cancel_consumer"
    reply = celery_command(cluster.stack.airflow.environment, "control", "--destination", node, command, queue,
                           timeout=30)
    assert "ok" in (reply or {}).get(node, {}), f"{node} did not confirm {command} {queue}: {reply}"


def running(cluster: Cluster, run_id: str, *task_ids: str) -> list[dict]:
    return [ti for ti in cluster.api.task_instances(DAG, run_id) if ti["task_id"] in task_ids and ti["state"] == "running"]


def test_the_dag_runs_on_both_workers_and_publishes_what_local_executor_does(cluster: Cluster) -> None:
    run_id = cluster.api.trigger(DAG, {**CONF, "as_of": NOW.isoformat()})
    wait_until(lambda: state_of(cluster.api, run_id, "refit") == "success", "refit", RUN_TIMEOUT, every=0.2)
    # Which free worker takes a shard is Celery's choice, and `score_items` runs beside the shards: on a slow
    # machine one worker can run every shard while the other is busy. So the test makes the spread certain, as
    # an operator could: it holds the tasks until both workers run one, then the worker holding a shard stops
    # taking `default` tasks, and the other must run the shards left (at least two of the four).
    def both_busy() -> list[dict]:
        busy = running(cluster, run_id, "score_items", "score_users")
        return busy if len(busy) == 2 else []

    holder = None
    try:
        with holding_the_run(cluster.url, NOW):
            held = next(ti for ti in wait_until(both_busy, "both workers to run a scoring task")
                        if ti["task_id"] == "score_users")
            holder = worker_of(held)
            set_consuming(cluster, holder, "default", on=False)
        state = cluster.api.wait_for_run(DAG, run_id, RUN_TIMEOUT)
    finally:  # both workers on `default` again, for the next tests
        if holder is not None:
            set_consuming(cluster, holder, "default", on=True)
    instances = cluster.api.task_instances(DAG, run_id)
    assert state == "success", {ti["task_id"]: ti["state"] for ti in instances}
    assert {ti["state"] for ti in instances} == {"success"}
    shards = [ti for ti in instances if ti["task_id"] == "score_users"]
    assert sorted(ti["map_index"] for ti in shards) == list(range(SHARDS))
    fan_out = sorted((ti["start_date"], ti["task_id"], ti["map_index"], worker_of(ti), ti["duration"]) for ti in instances
                     if ti["task_id"] in ("plan_scoring", "score_items", "score_users"))
    assert {worker_of(ti) for ti in shards} == {GPU_WORKER, CPU_WORKER}, fan_out
    assert {ti["queue"] for ti in shards} == {"default"}
    train = next(ti for ti in instances if ti["task_id"] == "train")
    assert (worker_of(train), train["queue"]) == (GPU_WORKER, "gpu")
    assert {worker_of(ti) for ti in instances} <= {GPU_WORKER, CPU_WORKER}

    # What an operator reads in the UI: the stage's own lines in the task log a worker wrote.
    shard = shards[0]
    log = cluster.api.task_log(DAG, run_id, "score_users", shard["try_number"], shard["map_index"])
    assert any("scored shard" in line for line in log), log

    assert_whole(cluster.url, version_of(NOW), users_up_to(cluster.url, NOW))
    # Same snapshot, same training: the same model files, byte for byte, the same gate figures and the same lists.
    assert model_files(cluster.home) == model_files(cluster.local_home)
    with db.connect(cluster.url) as conn, db.connect(cluster.local_url) as local:
        gates = [c.execute("SELECT onnx_sha256, metrics FROM recsys.model_registry WHERE version = %s",
                           (version_of(NOW),)).fetchone() for c in (conn, local)]
    assert gates[0] == gates[1]
    assert published(cluster.url) == published(cluster.local_url)


def test_a_worker_killed_holding_a_shard_is_replaced_by_the_other(cluster: Cluster, reliability_figure) -> None:
    later = NOW + timedelta(days=1)
    seed_small(cluster.url, later, events=1500, seed=2)
    run_id = cluster.api.trigger(DAG, {**LENIENT, "as_of": later.isoformat()})
    wait_until(lambda: state_of(cluster.api, run_id, "refit") == "success", "refit", RUN_TIMEOUT)
    with holding_the_run(cluster.url, later):
        victim = wait_until(lambda: running(cluster, run_id, "score_users"), "a scoring shard to run")[0]
        wait_until(lambda: blocked(cluster.url), "the shard to wait on the run's row")
        killed = worker_of(victim)
        service = cluster.stack.workers[killed]
        cluster.stack.kill_worker(killed)
    try:
        killed_at = time.monotonic()
        state = cluster.api.wait_for_run(DAG, run_id, RUN_TIMEOUT)
        reliability_figure("celery: run finished after a worker's SIGKILL (s)", round(time.monotonic() - killed_at))
        assert state == "success"
        tries = cluster.api.tries(DAG, run_id, "score_users", victim["map_index"])
        assert [(t["try_number"], worker_of(t), t["state"]) for t in tries] == [
            (1, killed, "failed"), (2, ({GPU_WORKER, CPU_WORKER} - {killed}).pop(), "success")]
        assert_whole(cluster.url, version_of(later), users_up_to(cluster.url, later))
    finally:  # back to two workers for the next test, whatever happened here
        cluster.stack.start_worker(killed, service)
        cluster.stack.wait_for_workers()


def test_redis_stopped_mid_run_ends_cleanly(cluster: Cluster, reliability_figure) -> None:
    before = serving_state(cluster.url)
    later = NOW + timedelta(days=2)
    seed_small(cluster.url, later, events=1500, seed=3)
    run_id = cluster.api.trigger(DAG, {**LENIENT, "as_of": later.isoformat()})
    wait_until(lambda: state_of(cluster.api, run_id, "train") == "running", "training", RUN_TIMEOUT)
    cluster.stack.redis.stop()  # the gpu worker loses its broker mid-task
    try:
        # Training reports to the api-server, not the broker: it finishes. The scheduler then queues the
        # next task, and that send fails while the broker is down: Airflow marks the task for a retry.
        def sent_into_the_outage() -> list[str]:
            return [ti["task_id"] for ti in cluster.api.task_instances(DAG, run_id)
                    if ti["task_id"] != "train" and ti["state"] in ("up_for_retry", "failed")]
        failed_sends = wait_until(sent_into_the_outage, "a task queued while Redis was down", RUN_TIMEOUT)
        assert serving_state(cluster.url) == before  # meanwhile the views serve the previous version whole
    finally:
        cluster.stack.redis.start()
    state = cluster.api.wait_for_run(DAG, run_id, RUN_TIMEOUT)
    reliability_figure("celery: run with Redis stopped mid-run", f"{state}; sends that failed, then ran again: "
                                                                 f"{failed_sends}")
    # The broker is back before the retry (RECSYS_RETRY_DELAY_SECONDS later): the run completes, whole.
    assert state == "success"
    assert_whole(cluster.url, version_of(later), users_up_to(cluster.url, later))
