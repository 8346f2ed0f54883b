-- pipeline_runs also records rollbacks and freshness alerts, not only retraining runs, so
-- operators read one log. `alerts` lists every notification sent for the row (kind, time,
-- message, channels), whether or not an e-mail could be sent.
ALTER TABLE recsys.pipeline_runs
    ADD COLUMN kind text NOT NULL DEFAULT 'retrain' CHECK (kind IN ('retrain', 'rollback', 'freshness')),
    ADD COLUMN alerts jsonb NOT NULL DEFAULT '[]'::jsonb;
CREATE INDEX pipeline_runs_kind_as_of_idx ON recsys.pipeline_runs (kind, as_of DESC);
