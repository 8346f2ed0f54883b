"""Running the DAGs through real Airflow from the command line (demo, retrain) and tests.

Airflow reads its configuration when first imported, so the environment is set here before
any `airflow` import: AIRFLOW_HOME under $RECSYS_HOME, the DAGs and plugins of this checkout,
and a metadata database named `airflow` on the same Postgres server (or the user's own
AIRFLOW__DATABASE__SQL_ALCHEMY_CONN). Runs go through `DAG.test()`, which executes every task
in this process against the migrated metadata DB, so they show up in the Airflow UI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from recmodel import db
from recmodel.config import Settings
from recmodel.stages import RETRAIN_DAG_ID

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class AirflowRunError(RuntimeError):
    """Airflow could not be set up or the DAG run did not succeed."""


class DagRunInProgress(AirflowRunError):
    """A run of the DAG with the same logical date is running already (a second `retrain --as-of` of it)."""


@dataclass(frozen=True)
class DagRunOutcome:
    run_id: str
    state: str
    task_states: dict[str, str]
    task_seconds: dict[str, float]  # each task instance's own duration (end - start)

    @property
    def succeeded(self) -> bool:
        return self.state == "success"


def airflow_environment(env: Settings, recsys_url: str) -> dict[str, str]:
    """Environment variables that point Airflow at this project and its databases."""
    metadata_url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    if not metadata_url:
        db.ensure_database(recsys_url, db.AIRFLOW_DB)
        metadata_url = db.sqlalchemy_url(db.with_database(recsys_url, db.AIRFLOW_DB), "psycopg2")
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "AIRFLOW_HOME": str(env.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
        # Airflow's own chatter stays at WARNING, but the stages' progress (epochs, rows, shards) reaches the
        # terminal of `retrain` and every task log.
        "AIRFLOW__LOGGING__NAMESPACE_LEVELS": os.environ.get("AIRFLOW__LOGGING__NAMESPACE_LEVELS", "recmodel=INFO"),
        **database_environment(recsys_url),
        "RECSYS_HOME": str(env.home),
        "PYTHONPATH": python_path,
    }


def database_environment(recsys_url: str) -> dict[str, str]:
    """The recsys database for the CLI (RECSYS_DATABASE_URL) and, the same one, for DAG tasks (the Airflow
    connection `recsys_db`, which is what tasks read: `recmodel.taskenv`)."""
    return {"AIRFLOW_CONN_RECSYS_DB": db.sqlalchemy_url(recsys_url, "psycopg2").replace("postgresql+psycopg2", "postgresql"),
            "RECSYS_DATABASE_URL": recsys_url}


def prepare_airflow(env: Settings, recsys_url: str) -> dict[str, str]:
    """Export the Airflow environment into this process and migrate the metadata DB."""
    variables = airflow_environment(env, recsys_url)
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != variables["AIRFLOW_HOME"]:
        log.warning("airflow was imported before its environment was set; settings may not apply")
    os.environ.update(variables)
    env.airflow_home.mkdir(parents=True, exist_ok=True)
    _airflow_command("db", "migrate", what=f"for {db.redact(variables['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN'])}")
    return variables


def _airflow_command(*args: str, what: str = "") -> None:
    """Run `airflow ARGS` in this process's environment; on failure raise with the last lines it printed."""
    done = subprocess.run([sys.executable, "-m", "airflow", *args], env=os.environ.copy(), capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise AirflowRunError(f"`airflow {' '.join(args)}` failed{' ' + what if what else ''}:\n{tail}")


class TaskLogFiles(logging.Handler):
    """Writes each record logged while a task runs to that task instance's log file, as a worker would.

    `DAG.test()` runs the tasks in this process and writes no task logs, so the Airflow UI would show
    nothing for a run started from the command line. This handler appends the stages' records, as the
    JSON lines Airflow's log reader parses, to the file the UI reads for the running task instance.
    """

    def __init__(self) -> None:
        super().__init__()
        from airflow.configuration import conf
        from jinja2 import Template

        self.folder = Path(conf.get("logging", "base_log_folder"))
        self.template = Template(conf.get("logging", "log_filename_template"))

    def emit(self, record: logging.LogRecord) -> None:
        from airflow.sdk import get_current_context

        try:
            ti = get_current_context()["ti"]
        except Exception:  # noqa: BLE001 - not inside a task (DAG parsing, the run's bookkeeping)
            return
        try:
            path = self.folder / self.template.render(ti=ti, try_number=ti.try_number)
            path.parent.mkdir(parents=True, exist_ok=True)
            line = {"timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
                    "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage()}
            with path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(line) + "\n")
        except Exception:  # noqa: BLE001 - a log file must never fail the task
            self.handleError(record)


def run_dag(dag_id: str, *, conf: dict[str, Any], logical_date: datetime) -> DagRunOutcome:
    """One run of `dag_id` through `DAG.test()`; the environment must be prepared first.

    The stages' log records also go to each task instance's log file (`TaskLogFiles`), so the
    run's task logs in the Airflow UI fill as it goes.
    """
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO_ROOT / "dags"))
    if bag.import_errors:
        raise AirflowRunError("DAG import errors: " + "; ".join(f"{k}: {v}" for k, v in bag.import_errors.items()))
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise AirflowRunError(f"DAG {dag_id!r} not found in {REPO_ROOT / 'dags'}")
    # DAG.test clears the task instances of a run with the same logical date before it starts: a second
    # `retrain --as-of A` beside the first must be refused before it does.
    _refuse_a_run_in_progress(dag_id, logical_date)
    task_logs, ours = TaskLogFiles(), logging.getLogger("recmodel")
    ours.addHandler(task_logs)
    try:
        dag_run = dag.test(logical_date=logical_date, run_after=logical_date, run_conf=conf)
    except IntegrityError:  # both created the run at the same moment; the other one goes on
        raise DagRunInProgress(_in_progress_message(dag_id, logical_date)) from None
    finally:
        ours.removeHandler(task_logs)
    instances = dag_run.get_task_instances()
    task_states = {_task_name(ti): str(ti.state.value if hasattr(ti.state, "value") else ti.state) for ti in instances}
    task_seconds = {_task_name(ti): (ti.end_date - ti.start_date).total_seconds()
                    for ti in instances if ti.start_date and ti.end_date}
    state = str(dag_run.state.value if hasattr(dag_run.state, "value") else dag_run.state)
    return DagRunOutcome(run_id=dag_run.run_id, state=state, task_states=task_states, task_seconds=task_seconds)


def _refuse_a_run_in_progress(dag_id: str, logical_date: datetime) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.state import DagRunState

    for state in (DagRunState.QUEUED, DagRunState.RUNNING):
        if DagRun.find(dag_id=dag_id, logical_date=logical_date, state=state):
            raise DagRunInProgress(_in_progress_message(dag_id, logical_date))


def _in_progress_message(dag_id: str, logical_date: datetime) -> str:
    return (f"a run of {dag_id} for {logical_date:%Y-%m-%d %H:%M:%S} UTC is already in progress (started by another "
            "`retrain` with the same --as-of, or the scheduler): one run per as-of. Wait for it to finish, or retrain "
            "another as-of")


def _task_name(ti: Any) -> str:
    """task_id, with the map index for mapped tasks (score_users[2]) so shards do not overwrite each other."""
    return f"{ti.task_id}[{ti.map_index}]" if ti.map_index is not None and ti.map_index >= 0 else ti.task_id


UI_COMPONENTS = ("api-server", "scheduler", "dag-processor")
DEMO_DAGS = (RETRAIN_DAG_ID, "recsys_rollback", "recsys_freshness", "recsys_fresh_data", "recsys_outcomes")
UI_ADMIN = "admin"


@dataclass
class AirflowStack:
    """Airflow's own processes (api-server, scheduler, dag-processor, workers), started for the demo's UI and tests.

    Each component leads its own process group (`start_new_session`), so a signal to the group
    reaches the children that the component itself would leave behind if it died first.
    """

    base_url: str
    username: str
    password: str
    processes: dict[str, subprocess.Popen]
    log_dir: Path
    environment: dict[str, str]  # what the components run with (this process's environment on top)

    def exited(self) -> list[str]:
        """The components that are no longer running."""
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def launch(self, name: str, args: list[str], environment: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `airflow ARGS` as component `name`, its output in `name.log` of the log folder."""
        with open(self.log_dir / f"{name}.log", "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "airflow", *args],
                                       env={**os.environ, **self.environment, **(environment or {})},
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        """SIGKILL component `name` and every process under it, in its group or not, at once."""
        import psutil

        process = self.processes.pop(name)
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        _stop_groups([process])

    def halt(self, name: str, timeout: float = 600.0) -> None:
        """Stop component `name` as a service manager would: SIGTERM to it alone (a Celery worker then
        finishes the tasks it runs), SIGKILL to its group if it has not exited after `timeout` s."""
        process = self.processes.pop(name)
        process.terminate()
        if not _exited_unreaped(process.pid, timeout=timeout):
            os.killpg(process.pid, signal.SIGKILL)
        _stop_groups([process])

    def stop(self) -> None:
        """Stop each component with everything it started (the scheduler's log server and executor workers)."""
        _stop_groups(list(self.processes.values()))


def _stop_groups(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each leader's process group, SIGKILL what is left after 30 s, and reap the leaders.

    A leader is reaped only after its group got its last signal: until then its pid, and with it the
    group id, cannot be handed to an unrelated process (a Postgres backend, say) that the signal would hit.
    """
    running = [p for p in processes if p.returncode is None]
    for process in running:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for process in running:
        if not _exited_unreaped(process.pid, timeout=30):
            os.killpg(process.pid, signal.SIGKILL)
    for process in running:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # children that outlived their leader
        except ProcessLookupError:
            pass  # the leader was the group's last member
        process.wait()


def _exited_unreaped(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for child `pid` to exit, leaving it a zombie (WNOWAIT) so its pid stays ours."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.2)
    return False


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stack_environment(variables: dict[str, str], port: int) -> dict[str, str]:
    """The variables every component needs to find each other: one API URL and one JWT secret.
    The executor, log server port and users may come from `variables` or this process's environment."""
    import secrets

    def given(name: str, default: str) -> str:
        return variables.get(name) or os.environ.get(name) or default

    return {
        **variables,
        # Task logs, what the UI shows of a run, get the records at this level only, whatever
        # `namespace_levels` says: above INFO they would be empty. (The CLI's quieter WARNING is for its
        # own terminal, where DAG.test runs the tasks.)
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "DEBUG" if given("AIRFLOW__LOGGING__LOGGING_LEVEL", "").upper() == "DEBUG"
                                           else "INFO",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API_AUTH__JWT_SECRET": given("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(32)),
        "AIRFLOW__CORE__EXECUTOR": given("AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
        # The scheduler's log server would take 8793 and clash with a second stack on the machine.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": given("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", str(free_port())),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": given("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", f"{UI_ADMIN}:admin"),
    }


def start_stack(variables: dict[str, str], port: int, log_dir: Path, *,
                components: tuple[str, ...] = UI_COMPONENTS, timeout: float = 180.0) -> AirflowStack:
    """Start Airflow's components as subprocesses and wait until the API server answers."""
    env = stack_environment(variables, port)
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = AirflowStack(base_url=f"http://127.0.0.1:{port}", username=UI_ADMIN, password="", processes={},
                         log_dir=log_dir, environment=env)
    try:
        # The API server first: the scheduler's tasks report to it, and would fail if it were not up yet.
        for component in sorted(components, key=lambda c: c != "api-server"):
            args = [component]
            if component == "api-server":
                args += ["--port", str(port), "--host", "127.0.0.1", "--workers", "1"]
            stack.launch(component, args)
            if component == "api-server":
                _wait_healthy(stack, timeout)
    except BaseException:  # a component that did not start, or Ctrl-C while waiting: stop what did
        stack.stop()
        raise
    seen = {**os.environ, **env}
    passwords = Path(seen.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
                     or Path(seen["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated")
    stack.password = json.loads(passwords.read_text()).get(UI_ADMIN, "") if passwords.exists() else ""
    return stack


def _wait_healthy(stack: AirflowStack, timeout: float) -> None:
    """Until the API server answers its health check; raises if a component exits or time runs out."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if dead := stack.exited():
            log_file = stack.log_dir / f"{dead[0]}.log"
            tail = log_file.read_text(errors="replace").strip().splitlines()[-8:]
            raise AirflowRunError(f"airflow {dead[0]} exited (log {log_file}):\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(f"{stack.base_url}/api/v2/monitor/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AirflowRunError(f"the Airflow API server did not answer on {stack.base_url} within {timeout:.0f} s "
                                  f"(logs in {stack.log_dir})")
        time.sleep(1)


def register_dags() -> None:
    """Put this checkout's DAGs into the metadata DB, as the dag-processor would on its first pass."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        known = {dag_id for dag_id in DEMO_DAGS if session.get(DagModel, dag_id) is not None}
    if known != set(DEMO_DAGS):
        _airflow_command("dags", "reserialize")


def set_paused(dag_ids: tuple[str, ...], paused: bool) -> None:
    """Pause or unpause DAGs already known to the metadata DB (a triggered run of a paused DAG never starts)."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        for dag_id in dag_ids:
            model = session.get(DagModel, dag_id)
            if model is None:
                raise AirflowRunError(f"DAG {dag_id!r} is not in the metadata DB yet; run it once or start the dag-processor")
            model.is_paused = paused
