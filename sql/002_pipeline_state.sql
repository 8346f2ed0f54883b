CREATE SCHEMA IF NOT EXISTS recsys;

-- One row per pipeline run (keyed by the run's as-of time, so a rerun updates its row).
CREATE TABLE recsys.pipeline_runs (
    run_key          text PRIMARY KEY,
    dag_run_id       text,
    as_of            timestamptz NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    status           text NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'success', 'failed', 'skipped', 'rejected')),
    stage            text,
    rows_extracted   bigint,
    rows_quarantined bigint,
    model_version    text,
    message          text,
    details          jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- Which ingested rows have been folded into a clean dataset snapshot.
CREATE TABLE recsys.extract_watermarks (
    run_key          text PRIMARY KEY,
    source           text NOT NULL DEFAULT 'interactions',
    low_watermark    timestamptz,           -- exclusive lower bound on ingested_at (before lookback)
    high_watermark   timestamptz NOT NULL,  -- inclusive upper bound on ingested_at
    rows_extracted   bigint NOT NULL,
    rows_clean       bigint NOT NULL,
    dataset_path     text NOT NULL,
    dataset_rows     bigint NOT NULL,
    committed_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recsys.quarantine (
    run_key        text NOT NULL,
    event_id       bigint NOT NULL,
    reason         text NOT NULL,
    row_data       jsonb NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_key, event_id, reason)
);
CREATE INDEX quarantine_reason_idx ON recsys.quarantine (reason);

CREATE TABLE recsys.model_registry (
    version          text PRIMARY KEY,
    parent_version   text REFERENCES recsys.model_registry (version),
    run_key          text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    dataset_path     text NOT NULL,
    watermark        timestamptz NOT NULL,
    train_rows       bigint NOT NULL,
    n_items          integer NOT NULL,
    device           text NOT NULL,
    metrics          jsonb NOT NULL DEFAULT '{}'::jsonb,  -- candidate, champion, popularity on the holdout
    decision         text CHECK (decision IN ('accepted', 'rejected')),
    reasons          jsonb NOT NULL DEFAULT '[]'::jsonb,
    artifact_dir     text NOT NULL,
    onnx_path        text NOT NULL,
    onnx_sha256      text NOT NULL,
    status           text NOT NULL DEFAULT 'candidate'
                     CHECK (status IN ('candidate', 'champion', 'rejected', 'retired'))
);
-- At most one champion, enforced by the database rather than by care.
CREATE UNIQUE INDEX model_registry_one_champion ON recsys.model_registry ((true)) WHERE status = 'champion';

CREATE TABLE recsys.published_versions (
    version       text PRIMARY KEY REFERENCES recsys.model_registry (version),
    tables        jsonb NOT NULL,        -- serving view name -> versioned table name
    row_counts    jsonb NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT now(),
    serving       boolean NOT NULL DEFAULT false,
    pruned_at     timestamptz
);
CREATE UNIQUE INDEX published_versions_one_serving ON recsys.published_versions ((true)) WHERE serving;
