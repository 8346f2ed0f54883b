-- Source tables written by the users' applications. Created only when absent, so an
-- existing deployment keeps its own definitions (columns must match DESIGN.md).
CREATE TABLE IF NOT EXISTS items (
    item_id     bigint PRIMARY KEY,
    title       text NOT NULL,
    description text,
    tags        text[],
    created_at  timestamptz,
    active      boolean DEFAULT true
);

CREATE TABLE IF NOT EXISTS interactions (
    event_id    bigserial PRIMARY KEY,
    user_id     bigint NOT NULL,
    item_id     bigint NOT NULL,
    event_type  text NOT NULL,
    value       real,
    occurred_at timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now()
);

-- The extract reads by ingestion time; without this index every run scans the table.
CREATE INDEX IF NOT EXISTS interactions_ingested_at_idx ON interactions (ingested_at, event_id);
