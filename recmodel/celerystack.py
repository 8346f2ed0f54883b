"""The production shape of docker-compose.yaml as local processes: Redis, Airflow on CeleryExecutor, Celery workers.

docker-compose.yaml is the one description of the distributed deployment. This module reads it rather
than restating it: the Airflow services' shared environment (executor, train queue, the RECSYS_ and
scheduler settings) and each worker service's queues and concurrency come from the file, with
`${VAR:-default}` interpolated from the environment as Compose does. Only what names a container
host or holds a secret (`HOST_BOUND`) is set here for this machine. So the stack that
`demo --executor celery` and the Celery tests start cannot drift from the one `docker compose up` starts.

On one machine every worker shares the host name, so each worker's task instances are recorded
under its service name (`worker_hostname`): `airflow-worker-gpu@host`, as a container would
have its own host name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recmodel.runner import REPO_ROOT, AirflowRunError, AirflowStack, free_port, start_stack

COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
AIRFLOW_ANCHOR = "x-airflow"  # the Compose extension every Airflow service builds on
# Set for this machine by the local stack: container addresses, secrets and paths inside the image.
HOST_BOUND = frozenset({
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "RECSYS_DATABASE_URL", "AIRFLOW_CONN_RECSYS_DB", "RECSYS_HOME",
})
WORKER_NAME = "RECSYS_WORKER_NAME"  # the worker service a local worker process stands for
HOSTNAME_CALLABLE = "recmodel.celerystack.worker_hostname"
CELERY_APP = "airflow.providers.celery.executors.celery_executor.app"
SERVER_COMPONENTS = ("api-server", "dag-processor", "scheduler")
# `$$`, or `${NAME}` with an optional `:-`, `-`, `:?` or `?` part; any other `$` is syntax this reader refuses.
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}$]*))?\}|\$")


class ComposeError(ValueError):
    """docker-compose.yaml lacks what the local stack needs, or a variable it requires is unset."""


@dataclass(frozen=True)
class WorkerService:
    """One Celery worker service of docker-compose.yaml: its queues and how many tasks it runs at once."""

    service: str
    queues: tuple[str, ...]
    concurrency: int


@dataclass(frozen=True)
class ComposeShape:
    environment: dict[str, str]  # the Airflow services' shared settings, interpolated, without HOST_BOUND
    workers: tuple[WorkerService, ...]  # in the file's order


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation: `${X}`, `${X:-default}` (unset or empty), `${X-default}` (unset),
    `${X:?message}` and `${X?message}` (required), and `$$` for a literal `$`."""
    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(1) is None:
            raise ComposeError(f"unsupported interpolation at {text[match.start():match.start() + 20]!r} in "
                               "docker-compose.yaml: the local stack reads ${X}, ${X:-default}, ${X-default}, "
                               "${X:?message}, ${X?message} and $$")
        name, operator, argument = match.group(1), match.group(2) or "", match.group(3) or ""
        value = variables.get(name)
        missing = value is None or (operator.startswith(":") and value == "")
        if operator.endswith("-"):
            return argument if missing else value
        if operator.endswith("?") and missing:
            raise ComposeError(f"docker-compose.yaml requires {name}: {argument or 'it is not set'}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def read_compose(path: Path = COMPOSE_FILE, variables: Mapping[str, str] | None = None) -> ComposeShape:
    """The shared Airflow environment and the worker services, as docker-compose.yaml defines them."""
    import yaml

    variables = os.environ if variables is None else variables
    document = yaml.safe_load(path.read_text())
    try:
        shared = document[AIRFLOW_ANCHOR]["environment"]
        services = document["services"]
    except (KeyError, TypeError) as missing:
        raise ComposeError(f"{path} has no {missing} (expected `{AIRFLOW_ANCHOR}.environment` and `services`)") from None
    environment = {key: interpolate(str(value), variables) for key, value in shared.items() if key not in HOST_BOUND}
    commands = {name: _command_text(service.get("command")) for name, service in services.items()}
    workers = tuple(_worker(name, interpolate(command, variables))
                    for name, command in commands.items() if command.startswith("celery worker"))
    if not workers:
        raise ComposeError(f"{path} defines no `celery worker` service")
    return ComposeShape(environment=environment, workers=workers)


def _command_text(command: str | list | None) -> str:
    """A service's command as one string (Compose takes a string or a list)."""
    return shlex.join(map(str, command)) if isinstance(command, list) else str(command or "")


def _worker(service: str, command: str) -> WorkerService:
    parser = argparse.ArgumentParser(prog=service, add_help=False, exit_on_error=False)
    parser.add_argument("--queues", "-q", default="default")
    parser.add_argument("--concurrency", "-c", type=int, default=16)  # Airflow's [celery] worker_concurrency
    try:
        options, _ = parser.parse_known_args(shlex.split(command)[2:])
    except argparse.ArgumentError as error:
        raise ComposeError(f"service {service}: cannot read its command {command!r}: {error}") from None
    queues = tuple(q for q in options.queues.split(",") if q)
    if not queues or options.concurrency < 1:
        raise ComposeError(f"service {service}: a worker needs a queue and a concurrency of at least 1 ({command!r})")
    return WorkerService(service=service, queues=queues, concurrency=options.concurrency)


def plan_workers(shape: ComposeShape, count: int) -> list[tuple[str, WorkerService]]:
    """`count` local workers, named: the worker service that takes the train queue first (as a deployment
    has its GPU worker), then the others in turn (`--scale`). Refuses a plan that leaves a queue the DAGs
    use (the train queue and `default`) without a worker."""
    if count < 1:
        raise ComposeError(f"--workers must be at least 1, not {count}")
    train_queue = shape.environment.get("RECSYS_TRAIN_QUEUE", "default")
    trainer, *others = sorted(shape.workers, key=lambda w: train_queue not in w.queues)
    rest = others or [trainer]
    services = [trainer, *(rest[n % len(rest)] for n in range(count - 1))]
    plan: list[tuple[str, WorkerService]] = []
    for service in services:
        same = sum(1 for _, w in plan if w.service == service.service)
        plan.append((service.service if same == 0 else f"{service.service}-{same + 1}", service))
    served = {q for _, w in plan for q in w.queues}
    unserved = sorted({train_queue, "default"} - served)
    if unserved:
        raise ComposeError(f"{count} worker(s) from docker-compose.yaml leave queue(s) {', '.join(unserved)} "
                           "without a worker: tasks there would wait forever")
    return plan


def worker_hostname() -> str:
    """`[core] hostname_callable` of the local workers: `service@host`, so two workers on one machine are
    told apart in the task-instance records (and the UI) as two containers would be."""
    host = socket.getfqdn()
    name = os.environ.get(WORKER_NAME)
    return f"{name}@{host}" if name else host


@dataclass
class RedisServer:
    """Debian's `redis-server` on a loopback port, its data (and the queued tasks) kept across a restart."""

    port: int
    folder: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AirflowRunError("redis-server is not installed (Debian: `apt-get install redis-server`); "
                                  "the Celery stack needs it as its broker")
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "redis.log", "ab") as out:
            # A save point (one change in 60 s) makes Redis snapshot on shutdown, so a restart finds the
            # queued tasks again, as a Redis with persistence would.
            self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                             "--dir", str(self.folder), "--save", "60 1", "--daemonize", "no"],
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AirflowRunError(f"redis-server did not start on port {self.port} (log {self.folder / 'redis.log'})")
            time.sleep(0.1)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SHUTDOWN as a service manager would (SIGTERM: Redis saves, then exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass
class CeleryStack:
    """Redis, Airflow's api-server, dag-processor and scheduler on CeleryExecutor, and Celery workers."""

    airflow: AirflowStack  # its `environment` is what every component, worker or not, runs with
    redis: RedisServer
    workers: dict[str, WorkerService] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.airflow.base_url

    def check_alive(self) -> None:
        """Raise, naming it and its log, if Redis or any Airflow component or worker has exited."""
        if self.redis.process is None or self.redis.process.poll() is not None:
            raise AirflowRunError(f"redis-server exited (log {self.redis.folder / 'redis.log'})")
        if dead := self.airflow.exited():
            raise AirflowRunError(f"airflow {dead[0]} exited (log {self.airflow.log_dir / (dead[0] + '.log')})")

    def start_worker(self, name: str, service: WorkerService) -> None:
        """`airflow celery worker` as the compose service runs it, under its own Celery node name and host name."""
        args = ["celery", "worker", "--queues", ",".join(service.queues), "--concurrency", str(service.concurrency),
                "--celery-hostname", f"{name}@%h", "--pid", str(self.airflow.log_dir / f"{name}.pid"),
                # Every local worker writes task logs into the one shared log folder, which the api-server
                # reads directly; a log server per worker would only contend for one port.
                "--skip-serve-logs"]
        self.airflow.launch(name, args, {WORKER_NAME: name})
        self.workers[name] = service

    @staticmethod
    def node(name: str) -> str:
        """The Celery node name of the worker `name` (`--celery-hostname name@%h`): where control commands go."""
        return f"{name}@{socket.gethostname()}"

    def wait_for_workers(self, timeout: float = 120.0) -> None:
        """Until every started worker answers a Celery ping (the compose file's worker health check)."""
        expected = {self.node(name) for name in self.workers}
        deadline = time.monotonic() + timeout
        while True:
            answered = celery_ping(self.airflow.environment)
            if expected <= answered:
                return
            dead = [name for name in self.airflow.exited() if name in self.workers]
            if dead or time.monotonic() > deadline:
                raise AirflowRunError(f"worker(s) {', '.join(dead or sorted(expected - answered))} did not come up "
                                      f"(logs in {self.airflow.log_dir})")
            time.sleep(2)

    def stop_worker(self, name: str) -> None:
        """Celery's warm shutdown (SIGTERM): the worker finishes what it runs, then exits."""
        self.airflow.halt(name)
        self.workers.pop(name, None)

    def kill_worker(self, name: str) -> None:
        """SIGKILL a worker with every process under it, as if its machine had died."""
        self.airflow.kill(name)
        self.workers.pop(name, None)

    def stop(self) -> None:
        try:
            self.airflow.stop()
        finally:
            self.redis.stop()


def celery_ping(environment: Mapping[str, str]) -> set[str]:
    """The Celery node names that answer a ping through the broker (`celery inspect ping`)."""
    return set(celery_command(environment, "inspect", "ping") or {})


def celery_command(environment: Mapping[str, str], *command: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """A Celery remote-control command (`celery inspect ...`, `celery control ...`) sent through the broker:
    the workers' replies by node name, or None when none came back in time."""
    try:
        done = subprocess.run([sys.executable, "-m", "celery", "--app", CELERY_APP, *command, "--timeout",
                               str(timeout), "--json"], env={**os.environ, **environment}, capture_output=True,
                              text=True, check=False, timeout=60 + timeout)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(done.stdout.strip().splitlines()):
        try:
            replies = json.loads(line)
        except ValueError:
            continue
        if isinstance(replies, dict):  # `inspect`: one object by node
            return replies
        if isinstance(replies, list):  # `control`: a list of one-node objects
            return {node: reply for one in replies if isinstance(one, dict) for node, reply in one.items()}
    return None


def stack_environment(airflow_variables: Mapping[str, str], redis: RedisServer,
                      shape: ComposeShape) -> dict[str, str]:
    """Airflow's local environment (`runner.airflow_environment`) with the compose file's shared settings
    on top, and the broker and result backend pointed at this machine's Redis and metadata database."""
    metadata = airflow_variables["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    return {
        **airflow_variables,
        **shape.environment,
        "AIRFLOW__CELERY__BROKER_URL": redis.url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata.replace("+psycopg2", "", 1),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE,
    }


def start_celery_stack(airflow_variables: Mapping[str, str], log_dir: Path, *, workers: int = 2,
                       port: int | None = None, compose: Path = COMPOSE_FILE) -> CeleryStack:
    """Redis, then the api-server, dag-processor and scheduler on CeleryExecutor, then `workers` workers."""
    shape = read_compose(compose)
    plan = plan_workers(shape, workers)
    redis = RedisServer(port=free_port(), folder=log_dir / "redis")
    environment = stack_environment(airflow_variables, redis, shape)
    try:
        redis.start()
        airflow = start_stack(environment, port or free_port(), log_dir, components=SERVER_COMPONENTS)
    except BaseException:
        redis.stop()
        raise
    stack = CeleryStack(airflow=airflow, redis=redis)
    try:
        for name, service in plan:
            stack.start_worker(name, service)
        stack.wait_for_workers()
    except BaseException:
        stack.stop()
        raise
    return stack


# --- Airflow's REST API: trigger a run, wait for it, read its task instances -----------------------------------


@dataclass
class AirflowApi:
    """The few calls of Airflow's public REST API (v2) that run a DAG and read back where its tasks ran."""

    base_url: str
    username: str
    password: str
    token: str = ""

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        if not self.token:
            response = httpx.post(f"{self.base_url}/auth/token", json={"username": self.username,
                                                                       "password": self.password}, timeout=30)
            response.raise_for_status()
            self.token = response.json()["access_token"]
        response = httpx.request(method, f"{self.base_url}/api/v2{path}", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {self.token}"})
        if response.status_code >= 400:
            raise AirflowRunError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    def wait_for_dag(self, dag_id: str, timeout: float = 180.0) -> None:
        """Until the dag-processor has parsed `dag_id` into the metadata DB."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", f"/dags/{dag_id}")
                return
            except AirflowRunError:
                if time.monotonic() > deadline:
                    raise AirflowRunError(f"DAG {dag_id} was not parsed within {timeout:.0f} s") from None
                time.sleep(2)

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self._call("PATCH", f"/dags/{dag_id}", {"is_paused": paused})

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> str:
        body = {"logical_date": None, "conf": conf, **({"dag_run_id": run_id} if run_id else {})}
        return self._call("POST", f"/dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float,
                     check: Callable[[], None] | None = None) -> str:
        """The run's final state; `check` (raising to give up, e.g. `CeleryStack.check_alive`) runs at each poll."""
        deadline = time.monotonic() + timeout
        while (state := self.run_state(dag_id, run_id)) not in ("success", "failed"):
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise AirflowRunError(f"run {run_id} of {dag_id} still {state} after {timeout:.0f} s")
            time.sleep(2)
        return state

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")["task_instances"]

    def clear(self, dag_id: str, run_id: str, task_ids: list[str]) -> None:
        """Run `task_ids` of a finished run again, and everything downstream of them (the UI's "Clear")."""
        self._call("POST", f"/dags/{dag_id}/clearTaskInstances",
                   {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "include_downstream": True,
                    "only_failed": False, "reset_dag_runs": True})

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> list[str]:
        """The events of one try's task log, as the UI shows them."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}?map_index={map_index}"
        content = self._call("GET", path).get("content") or []
        return [line.get("event", "") if isinstance(line, dict) else str(line) for line in content]

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        """Every try of one task instance, the earlier ones from Airflow's task-instance history."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        path += f"/{map_index}/tries" if map_index >= 0 else "/tries"
        return self._call("GET", path)["task_instances"]

