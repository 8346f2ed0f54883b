"""The Airflow Assets of this project: what triggers a retrain, and what a published version updates.

- `FRESH_INTERACTIONS` is updated by the `recsys_fresh_data` DAG when at least
  `RECSYS_RETRAIN_MIN_NEW_ROWS` interactions arrived since the last snapshot; `recsys_retrain`
  runs on its cron schedule *or* when this asset is updated.
- `PUBLISHED_RECOMMENDATIONS` is updated by every successful publish; consumers schedule their own
  DAGs on it (`schedule=[PUBLISHED_RECOMMENDATIONS]`) to chain after a new version serves.

Light on purpose: the DAG files import it at parse time.
"""

from __future__ import annotations

from airflow.sdk import Asset

FRESH_INTERACTIONS = Asset(name="recsys_fresh_interactions", uri="recsys://interactions/fresh")
PUBLISHED_RECOMMENDATIONS = Asset(name="recsys_published_recommendations", uri="recsys://serving/published")
