"""Progress of long stage loops as log lines, at most every `PROGRESS_SECONDS`.

A log line, not a terminal bar, because the same loops run in an Airflow task, whose log is a
file an operator tails in the UI, and under `python -m recmodel retrain`, whose terminal shows
the stages' log records. Either way nobody waits more than a few seconds without a word.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

PROGRESS_SECONDS = 8.0  # below the 10 s of silence an operator tolerates, with room for one slow step


class Progress:
    """Counts work done of `total` and logs `label: done/total unit (share), elapsed, ~left` when due."""

    def __init__(self, log: logging.Logger, label: str, total: int, unit: str, *, limit_seconds: float | None = None,
                 every: float = PROGRESS_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.label, self.total, self.unit = log, label, max(total, 1), unit
        self.limit_seconds, self.every, self.clock = limit_seconds, every, clock
        self.done = 0
        self.started = self.last_report = clock()

    def advance(self, n: int = 1, detail: str = "") -> None:
        """Count `n` more units; log a line if the last one is `every` seconds old."""
        self.done += n
        now = self.clock()
        if now - self.last_report >= self.every:
            self.last_report = now
            self.log.info("%s", self.line(now, detail))

    def line(self, now: float, detail: str = "") -> str:
        elapsed = now - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        if left is not None and self.limit_seconds is not None:
            left = min(left, max(self.limit_seconds - elapsed, 0.0))  # a time budget ends the work sooner
        eta = f", ~{left:.0f} s left" if left is not None else ""
        return (f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%})"
                f"{', ' + detail if detail else ''}, {elapsed:.0f} s{eta}")
