-- A failed recsys_fresh_data check records a row of its own kind, `fresh_data`. Migration 004, as it
-- shipped, allowed only retrain, rollback and freshness; a later edit of 004 added the kind, but a
-- database migrated before that edit kept the old CHECK and refused the row (and with it the
-- alert). Shipped migrations are never edited: this one widens the CHECK on every database, whichever
-- version of 004 it ran.
ALTER TABLE recsys.pipeline_runs
    DROP CONSTRAINT IF EXISTS pipeline_runs_kind_check,
    ADD CONSTRAINT pipeline_runs_kind_check CHECK (kind IN ('retrain', 'rollback', 'freshness', 'fresh_data'));
