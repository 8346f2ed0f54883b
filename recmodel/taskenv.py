"""What a task learns from Airflow: the run's as-of time and conf, and where the database is.

DAG tasks find the recsys database through the Airflow connection `recsys_db` (set it with
``AIRFLOW_CONN_RECSYS_DB``, a secrets backend or the UI), the way Airflow deployments hand out
credentials; without one they fall back to ``RECSYS_DATABASE_URL`` (or the embedded Postgres),
like the CLI. Airflow is imported inside the functions: the CLI and the DAG files stay light.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from recmodel import db
from recmodel.config import settings

RECSYS_CONN_ID = "recsys_db"


def database_url() -> str:
    """The `recsys_db` connection's URL when Airflow defines one, else the environment's database."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = Connection.get(RECSYS_CONN_ID)
    except AirflowNotFoundException:
        return db.resolve_url(settings())
    uri = connection.get_uri()
    # Airflow names the type "postgres"; libpq and SQLAlchemy both take the long form.
    return "postgresql://" + uri.removeprefix("postgres://") if uri.startswith("postgres://") else uri


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
