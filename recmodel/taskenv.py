"""What a task learns from Airflow: the run's as-of time and conf, and where the database is.

Every DAG task and the Recommender page (in the api-server) find the recsys database through the
Airflow connection `recsys_db` (set it with ``AIRFLOW_CONN_RECSYS_DB``, a secrets backend or the UI),
the way Airflow deployments hand out credentials; without one they fall back to
``RECSYS_DATABASE_URL`` (or the embedded Postgres), like the CLI. Airflow is imported inside the
functions: the CLI and the DAG files stay light.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from recmodel import db
from recmodel.config import settings

RECSYS_CONN_ID = "recsys_db"


def database_url() -> str:
    """The `recsys_db` connection's URL when Airflow defines one, else the environment's database.

    The one place that decides which database the DAGs and the Recommender page act on, so a rollback
    button, a stale alert and a retrain never disagree about it.
    """
    uri = _connection_uri(RECSYS_CONN_ID)
    if uri is None:
        return db.resolve_url(settings())
    # Airflow names the type "postgres"; libpq and SQLAlchemy both take the long form.
    return "postgresql://" + uri.removeprefix("postgres://") if uri.startswith("postgres://") else uri


def _in_task() -> bool:
    """Whether this runs inside a task (a worker's task runner, `dag.test()`, a task's failure callback):
    the Task SDK has its channel to the supervisor there. Airflow makes the same check."""
    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    return getattr(runner, "SUPERVISOR_COMMS", None) is not None


def _connection_uri(conn_id: str) -> str | None:
    """Connection `conn_id` as a URI, or None when Airflow defines none.

    A task asks through the Task SDK (the worker holds no metadata-DB credentials; the API server
    answers). Elsewhere, in the api-server that serves the Recommender page, the Task SDK's lookup
    searches the metadata DB only when the process announced itself as a server, so the core model's
    lookup is used: the configured secrets backend, ``AIRFLOW_CONN_*`` variables, then the metadata DB.
    """
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        if _in_task():
            from airflow.sdk import Connection

            return Connection.get(conn_id).get_uri()
        from airflow.models.connection import Connection as StoredConnection

        return StoredConnection.get_connection_from_secrets(conn_id).get_uri()
    except AirflowNotFoundException:
        return None


def as_of_and_conf(context: dict[str, Any]) -> tuple[datetime, dict[str, Any]]:
    """A recsys_retrain run's as-of time and its other conf: ``conf["as_of"]`` when given (the CLI and
    the UI pass it), else the end of the scheduled data interval (or the run's run_after)."""
    conf = dict(context["dag_run"].conf or {})
    as_of = conf.pop("as_of", None)
    if as_of:
        when = datetime.fromisoformat(as_of)
        if when.tzinfo is None:
            raise ValueError(f"conf as_of must carry a timezone, got {as_of!r}")
    else:
        when = context.get("data_interval_end") or context["dag_run"].run_after
    return when, conf
