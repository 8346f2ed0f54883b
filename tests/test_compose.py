"""docker-compose.yaml, checked statically (no Docker engine here): the Compose Specification's
schema, the services the DAGs need, the GPU worker and its queue, and every variable documented."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import resources

import jsonschema
import pytest
import yaml

from conftest import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yaml"
DEPLOY = REPO_ROOT / "docs" / "DEPLOY.md"
AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"}
LONG_RUNNING = AIRFLOW_SERVICES - {"airflow-init"} | {"postgres", "redis"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_the_file_follows_the_compose_specification(compose: dict) -> None:
    # The Compose Specification's JSON schema, as vendored (and pinned) by check-jsonschema.
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
                        .read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_every_service_the_pipeline_needs_is_there_and_healthy(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "redis"} | AIRFLOW_SERVICES <= set(services)
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], f"{name} has no health check"
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")  # its own database
        assert env["RECSYS_DATABASE_URL"].endswith("@postgres:5432/recsys")
        assert "recsys-home:/opt/recsys/home" in services[name]["volumes"]  # artifacts shared by every worker
        if name != "airflow-init":
            assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert "recsys-home" in compose["volumes"] and "postgres-data" in compose["volumes"]
    init = " ".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init and "python -m recmodel migrate" in init


def test_the_gpu_worker_reserves_a_gpu_and_takes_the_train_task(compose: dict, tmp_path) -> None:
    gpu = compose["services"]["airflow-worker-gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    assert "--queues gpu" in gpu["command"]
    assert "--queues default" in compose["services"]["airflow-worker"]["command"]
    queue = gpu["environment"]["RECSYS_TRAIN_QUEUE"]
    probe = ("import json\nfrom airflow.dag_processing.dagbag import DagBag\n"
             f"dag = DagBag(r'{REPO_ROOT / 'dags'}').dags['recsys_retrain']\n"
             "print(json.dumps({t.task_id: t.queue for t in dag.tasks}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                         env={**os.environ, "RECSYS_TRAIN_QUEUE": queue, "PYTHONPATH": str(REPO_ROOT),
                              "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    queues = json.loads(out.stdout.strip().splitlines()[-1])
    on_gpu = {"train", "refit"}  # the two tasks that train
    assert {t: q for t, q in queues.items() if t in on_gpu} == {t: "gpu" for t in on_gpu}
    assert {t: q for t, q in queues.items() if t not in on_gpu} == {t: "default" for t in queues if t not in on_gpu}


def test_every_variable_the_file_reads_is_documented(compose: dict) -> None:
    variables = set(re.findall(r"(?<!\$)\$\{(\w+)", COMPOSE.read_text()))  # $${X} is for the container shell
    assert {"POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET"} <= variables
    documented = DEPLOY.read_text()
    missing = sorted(v for v in variables if f"`{v}`" not in documented)
    assert not missing, f"variables used by docker-compose.yaml but not documented in docs/DEPLOY.md: {missing}"
    environment = compose["services"]["airflow-worker"]["environment"]
    undocumented = sorted(k for k in environment if k.startswith("RECSYS_") and f"`{k}`" not in documented)
    assert not undocumented, f"RECSYS_ settings the stack sets but docs/DEPLOY.md does not explain: {undocumented}"


# --- the local Celery stack (recmodel.celerystack) reads this file: the same environment, queues and concurrency


def test_the_local_stack_takes_the_files_environment_and_workers(compose: dict) -> None:
    from recmodel.celerystack import HOST_BOUND, read_compose

    shared = compose["x-airflow"]["environment"]
    assert HOST_BOUND <= set(shared)  # every variable the local stack sets for itself is one the file sets
    shape = read_compose(COMPOSE, {"AIRFLOW_WORKER_CONCURRENCY": "3", "RECSYS_RETRAIN_SCHEDULE": "@hourly"})
    assert set(shape.environment) == set(shared) - HOST_BOUND  # and everything else comes from the file
    assert shape.environment["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert shape.environment["RECSYS_TRAIN_QUEUE"] == "gpu"
    assert shape.environment["RECSYS_RETRAIN_SCHEDULE"] == "@hourly"  # ${VAR:-default} reads the environment
    assert {w.service: (w.queues, w.concurrency) for w in shape.workers} == {
        "airflow-worker": (("default",), 3), "airflow-worker-gpu": (("gpu", "default"), 1)}
    defaults = read_compose(COMPOSE, {})  # nothing set: the file's defaults, as Compose would use them
    assert defaults.environment["RECSYS_RETRAIN_SCHEDULE"] == "@daily"
    assert defaults.environment["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "300"
    assert [w.concurrency for w in defaults.workers] == [4, 1]


def test_compose_interpolation() -> None:
    from recmodel.celerystack import ComposeError, interpolate

    given = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET}/${SET:-d}/${EMPTY:-d}/${EMPTY-d}/${UNSET-d}/${UNSET}", given) == "x/x/d//d/"
    assert interpolate("$${HOSTNAME} costs $$5", given) == "${HOSTNAME} costs $5"
    assert interpolate("${SET:?needed}", given) == "x"
    with pytest.raises(ComposeError, match="requires EMPTY: set it"):
        interpolate("${EMPTY:?set it}", given)
    assert interpolate("${EMPTY?set it}", given) == ""  # without the colon, only unset is an error
    for unsupported in ("$SET", "${SET:+alt}", "${UNSET:-${SET}}", "${}"):  # syntax the reader does not implement
        with pytest.raises(ComposeError, match="unsupported interpolation"):
            interpolate(unsupported, given)


def test_workers_are_planned_so_every_queue_has_one(tmp_path) -> None:
    from recmodel.celerystack import ComposeError, plan_workers, read_compose

    shape = read_compose(COMPOSE, {})

    def names(count: int) -> list[str]:
        return [name for name, _ in plan_workers(shape, count)]

    assert names(1) == ["airflow-worker-gpu"]  # it takes gpu and default: the whole DAG
    assert names(2) == ["airflow-worker-gpu", "airflow-worker"]
    assert names(4) == ["airflow-worker-gpu", "airflow-worker", "airflow-worker-2", "airflow-worker-3"]
    with pytest.raises(ComposeError, match="at least 1"):
        plan_workers(shape, 0)
    gpu_only = tmp_path / "compose.yaml"
    gpu_only.write_text(COMPOSE.read_text().replace("--queues gpu,default", "--queues gpu"))
    with pytest.raises(ComposeError, match="leave queue\\(s\\) default without a worker"):
        plan_workers(read_compose(gpu_only, {}), 1)
    assert len(plan_workers(read_compose(gpu_only, {}), 2)) == 2


def test_each_local_worker_records_its_own_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from recmodel.celerystack import HOSTNAME_CALLABLE, WORKER_NAME, worker_hostname

    module, _, name = HOSTNAME_CALLABLE.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is worker_hostname  # what Airflow will import
    monkeypatch.delenv(WORKER_NAME, raising=False)
    host = worker_hostname()
    monkeypatch.setenv(WORKER_NAME, "airflow-worker-gpu")
    assert worker_hostname() == f"airflow-worker-gpu@{host}"
