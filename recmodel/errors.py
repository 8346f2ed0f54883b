"""The two ways a stage stops a run short of publishing, besides crashing.

`PermanentError`: the run fails, and a retry would fail the same way (bad data, a bad setting, a
refused run), so Airflow fails the task at once instead of retrying it. `RunEnds`: nothing is wrong
but there is nothing (more) to do: no new data, newer data already serves, or the gate kept the
champion; Airflow marks the task skipped and `run_all` returns the outcome.
"""

from __future__ import annotations


class PermanentError(Exception):
    """A failure that a retry would repeat."""


class RunEnds(Exception):
    """The run stops here without failing, with `outcome` as the run's status.

    With `records_status` off, the status a stage already recorded stays (the gate's "rejected").
    """

    outcome = "skipped"
    records_status = True


class NothingNew(RunEnds):
    """No interactions arrived since the last snapshot that a model was judged on."""


class SupersededRun(RunEnds):
    """The serving version was built on data newer than this run's interval: training would be wasted."""


class NothingToPublish(RunEnds):
    """The gate kept the champion: no model and no baseline to publish."""

    outcome = "rejected"
    records_status = False
