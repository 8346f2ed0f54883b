-- The first new items of versions whose tables were pruned (`keep_versions`): they cannot be ranked any more,
-- so `recsys_outcomes` keeps them here, one row per version and user like `recsys.outcome_events`, and an
-- update that reads the same interactions again finds them already kept instead of counting them again.
-- A version's `outcome_events` rows judged before its tables went are kept as they were; a first new item
-- that a later interaction changed (or revealed) is kept here instead (docs/OPERATIONS.md, "Realized
-- outcomes and the long tail").
CREATE TABLE recsys.outcome_unjudged (
    version     text NOT NULL REFERENCES recsys.model_registry (version),
    user_id     bigint NOT NULL,
    item_id     bigint NOT NULL,
    event_id    bigint NOT NULL,
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (version, user_id)
);
