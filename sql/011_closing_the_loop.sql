-- Closing the loop: what each served version achieved, why each item was recommended, and how far into
-- the long tail each version's lists reach (docs/OPERATIONS.md, "Realized outcomes and the long tail").

-- When each version served. Publish and rollback close the open period and open the next one in their
-- swap transaction. Periods before this migration are inferred from publish times: each version served
-- from its publish until the next publish (a rollback was not dated then).
CREATE TABLE recsys.serving_periods (
    version    text NOT NULL REFERENCES recsys.model_registry (version),
    started_at timestamptz NOT NULL,
    ended_at   timestamptz,
    PRIMARY KEY (version, started_at),
    CHECK (ended_at IS NULL OR ended_at >= started_at)
);
CREATE UNIQUE INDEX serving_periods_one_open ON recsys.serving_periods ((true)) WHERE ended_at IS NULL;
INSERT INTO recsys.serving_periods (version, started_at, ended_at)
SELECT version, published_at,
       CASE WHEN serving THEN NULL
            ELSE coalesce(lead(published_at) OVER (ORDER BY published_at, version), published_at) END
FROM recsys.published_versions;

-- The first new item (one the user had never touched) each user touched while a version served, and its
-- rank in the list that version served the user and in its popularity list; in both lists the items the
-- user had touched before it are skipped, as an app hides what a user already has. One row per version
-- and user; the outcomes task keeps the earliest such event as late rows arrive.
CREATE TABLE recsys.outcome_events (
    version      text NOT NULL REFERENCES recsys.model_registry (version),
    user_id      bigint NOT NULL,
    item_id      bigint NOT NULL,
    event_id     bigint NOT NULL,
    occurred_at  timestamptz NOT NULL,
    had_list     boolean NOT NULL,  -- the version's user_recommendations held a list for the user
    served_rank  integer,           -- NULL: not in that list
    popular_rank integer,           -- NULL: not in the version's popular_items
    PRIMARY KEY (version, user_id)
);
-- How far the outcomes task has read interactions (by ingested_at); one row.
CREATE TABLE recsys.outcome_progress (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    ingested_through timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Per version: hit rate and NDCG at 10 of what it served, and of its popularity list over the same users.
CREATE VIEW recsys.realized_outcomes AS
WITH scored AS (
    SELECT version, had_list, occurred_at,
           coalesce(served_rank <= 10, false) AS hit,
           coalesce(popular_rank <= 10, false) AS popular_hit,
           CASE WHEN served_rank <= 10 THEN 1 / log(2, served_rank + 1.0) ELSE 0 END AS gain,
           CASE WHEN popular_rank <= 10 THEN 1 / log(2, popular_rank + 1.0) ELSE 0 END AS popular_gain
    FROM recsys.outcome_events
)
SELECT version,
       count(*) FILTER (WHERE had_list) AS users,
       count(*) FILTER (WHERE NOT had_list) AS users_without_list,
       avg(hit::int) FILTER (WHERE had_list)::float8 AS hit_rate_at_10,
       avg(gain) FILTER (WHERE had_list)::float8 AS ndcg_at_10,
       avg(popular_hit::int) FILTER (WHERE had_list)::float8 AS popular_hit_rate_at_10,
       avg(popular_gain) FILTER (WHERE had_list)::float8 AS popular_ndcg_at_10,
       min(occurred_at) AS first_event_at,
       max(occurred_at) AS last_event_at
FROM scored
GROUP BY version;

-- "Is this a new item for the user?" is one index probe, not a scan of the user's history. On a large
-- interactions table, build it first with CREATE INDEX CONCURRENTLY under this name (OPERATIONS.md).
CREATE INDEX IF NOT EXISTS interactions_user_item_idx ON interactions (user_id, item_id, occurred_at);

-- Long-tail figures of the lists each version published: catalog coverage, tail share, novelty.
ALTER TABLE recsys.model_registry ADD COLUMN long_tail jsonb NOT NULL DEFAULT '{}'::jsonb;

-- The outcomes check records its runs (and its underperformance alerts) in pipeline_runs.
ALTER TABLE recsys.pipeline_runs
    DROP CONSTRAINT IF EXISTS pipeline_runs_kind_check,
    ADD CONSTRAINT pipeline_runs_kind_check
        CHECK (kind IN ('retrain', 'rollback', 'freshness', 'fresh_data', 'outcomes'));

-- user_recommendations gains `because_item_id`: the history item that most explains the recommendation
-- (NULL where the popularity baseline served). Tables already published get the column (NULL), so a
-- rollback to them keeps the view's columns; the view lists it after served_by.
DO $$
DECLARE
    published record;
    serving_table text;
    served text;
BEGIN
    FOR published IN
        SELECT tables ->> 'user_recommendations' AS name FROM recsys.published_versions WHERE pruned_at IS NULL
    LOOP
        IF to_regclass(format('recsys.%I', published.name)) IS NOT NULL THEN
            EXECUTE format('ALTER TABLE recsys.%I ADD COLUMN IF NOT EXISTS because_item_id bigint', published.name);
        END IF;
    END LOOP;
    SELECT p.tables ->> 'user_recommendations', r.kind INTO serving_table, served
    FROM recsys.published_versions p JOIN recsys.model_registry r USING (version) WHERE p.serving;
    IF serving_table IS NULL THEN
        CREATE OR REPLACE VIEW recsys.user_recommendations AS
        SELECT NULL::bigint AS user_id, NULL::int AS rank, NULL::bigint AS item_id, NULL::real AS score,
               NULL::text AS model_version, NULL::timestamptz AS generated_at, NULL::text AS served_by,
               NULL::bigint AS because_item_id
        WHERE false;
    ELSE
        EXECUTE format('CREATE OR REPLACE VIEW recsys.user_recommendations AS SELECT user_id, rank, item_id, score, '
                       'model_version, generated_at, %L::text AS served_by, because_item_id FROM recsys.%I',
                       served, serving_table);
    END IF;
END
$$;
