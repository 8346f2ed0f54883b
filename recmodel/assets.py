"""The Airflow Assets of this project: what triggers a retrain, and what a published version updates.

- `FRESH_INTERACTIONS` is updated by the `recsys_fresh_data` DAG when at least
  `RECSYS_RETRAIN_MIN_NEW_ROWS` interactions arrived since the last snapshot; `recsys_retrain`
  runs on its cron schedule *or* when this asset is updated.
- `PUBLISHED_RECOMMENDATIONS` is updated by every successful publish; consumers schedule their own
  DAGs on it (`schedule=[PUBLISHED_RECOMMENDATIONS]`) to chain after a new version serves.

Light on purpose: the DAG files import it at parse time.
"""

from __future__ import annotations

import os

from airflow.sdk import Asset

FRESH_INTERACTIONS = Asset(name="recsys_fresh_interactions", uri="recsys://interactions/fresh")
PUBLISHED_RECOMMENDATIONS = Asset(name="recsys_published_recommendations", uri="recsys://serving/published")
MIN_NEW_ROWS_ENV = "RECSYS_RETRAIN_MIN_NEW_ROWS"


def min_new_rows() -> int:
    raw = os.environ.get(MIN_NEW_ROWS_ENV, "10000")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MIN_NEW_ROWS_ENV} must be a whole number of interactions, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{MIN_NEW_ROWS_ENV} must be >= 1, got {raw!r}")
    return value
