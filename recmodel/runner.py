"""Running the DAGs through real Airflow from the command line (demo, retrain) and tests.

Airflow reads its configuration when first imported, so the environment is set here before
any `airflow` import: AIRFLOW_HOME under $RECSYS_HOME, the DAGs and plugins of this checkout,
and a metadata database named `airflow` on the same Postgres server (or the user's own
AIRFLOW__DATABASE__SQL_ALCHEMY_CONN). Runs go through `DAG.test()`, which executes every task
in this process against the migrated metadata DB, so they show up in the Airflow UI.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from recmodel import db
from recmodel.config import Settings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class AirflowRunError(RuntimeError):
    """Airflow could not be set up or the DAG run did not succeed."""


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
        "AIRFLOW_CONN_RECSYS_DB": db.sqlalchemy_url(recsys_url, "psycopg2").replace("postgresql+psycopg2", "postgresql"),
        "RECSYS_DATABASE_URL": recsys_url,
        "RECSYS_HOME": str(env.home),
        "PYTHONPATH": python_path,
    }


def prepare_airflow(env: Settings, recsys_url: str) -> dict[str, str]:
    """Export the Airflow environment into this process and migrate the metadata DB."""
    variables = airflow_environment(env, recsys_url)
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != variables["AIRFLOW_HOME"]:
        log.warning("airflow was imported before its environment was set; settings may not apply")
    os.environ.update(variables)
    env.airflow_home.mkdir(parents=True, exist_ok=True)
    migrated = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=os.environ.copy(),
                              capture_output=True, text=True)
    if migrated.returncode != 0:
        tail = "\n".join((migrated.stderr or migrated.stdout).strip().splitlines()[-5:])
        raise AirflowRunError(f"`airflow db migrate` failed for {db.redact(variables['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN'])}:\n{tail}")
    return variables


def run_dag(dag_id: str, *, conf: dict[str, Any], logical_date: datetime) -> DagRunOutcome:
    """One run of `dag_id` through `DAG.test()`; the environment must be prepared first."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO_ROOT / "dags"))
    if bag.import_errors:
        raise AirflowRunError("DAG import errors: " + "; ".join(f"{k}: {v}" for k, v in bag.import_errors.items()))
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise AirflowRunError(f"DAG {dag_id!r} not found in {REPO_ROOT / 'dags'}")
    dag_run = dag.test(logical_date=logical_date, run_after=logical_date, run_conf=conf)
    task_states = {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state)
                   for ti in dag_run.get_task_instances()}
    task_seconds = {ti.task_id: (ti.end_date - ti.start_date).total_seconds()
                    for ti in dag_run.get_task_instances() if ti.start_date and ti.end_date}
    state = str(dag_run.state.value if hasattr(dag_run.state, "value") else dag_run.state)
    return DagRunOutcome(run_id=dag_run.run_id, state=state, task_states=task_states, task_seconds=task_seconds)
