-- A first run whose candidate is not accepted still serves: a popularity baseline is published,
-- registered as kind 'baseline' (no ONNX artifact), until the first accepted model replaces it.
-- The gate may also be 'undecided' (too few users in the holdout to tell), and an accepted model
-- is refit on the whole snapshot: `lineage` records the gated model and the refit that serves.
ALTER TABLE recsys.model_registry
    ADD COLUMN kind text NOT NULL DEFAULT 'model' CHECK (kind IN ('model', 'baseline')),
    ADD COLUMN lineage jsonb NOT NULL DEFAULT '{}'::jsonb,
    ALTER COLUMN onnx_path DROP NOT NULL,
    ALTER COLUMN onnx_sha256 DROP NOT NULL,
    ADD CONSTRAINT model_registry_model_has_onnx
        CHECK (kind = 'baseline' OR (onnx_path IS NOT NULL AND onnx_sha256 IS NOT NULL));
ALTER TABLE recsys.model_registry DROP CONSTRAINT model_registry_decision_check;
ALTER TABLE recsys.model_registry
    ADD CONSTRAINT model_registry_decision_check CHECK (decision IN ('accepted', 'rejected', 'undecided'));

-- Downstream apps can tell a model's recommendations from the baseline's: every serving view gains
-- `served_by` ('model' or 'baseline'), set by publish and rollback from the registry. Existing views
-- are repointed with the column added (CREATE OR REPLACE VIEW keeps names, types and grants).
DO $$
DECLARE
    serving_tables jsonb;
    served text;
BEGIN
    SELECT p.tables, r.kind INTO serving_tables, served
    FROM recsys.published_versions p JOIN recsys.model_registry r USING (version) WHERE p.serving;
    IF serving_tables IS NULL THEN
        CREATE OR REPLACE VIEW recsys.user_recommendations AS
        SELECT NULL::bigint AS user_id, NULL::int AS rank, NULL::bigint AS item_id, NULL::real AS score,
               NULL::text AS model_version, NULL::timestamptz AS generated_at, NULL::text AS served_by
        WHERE false;
        CREATE OR REPLACE VIEW recsys.similar_items AS
        SELECT NULL::bigint AS item_id, NULL::int AS rank, NULL::bigint AS similar_item_id, NULL::real AS score,
               NULL::text AS model_version, NULL::text AS served_by
        WHERE false;
        CREATE OR REPLACE VIEW recsys.popular_items AS
        SELECT NULL::int AS rank, NULL::bigint AS item_id, NULL::real AS score, NULL::text AS model_version,
               NULL::text AS served_by
        WHERE false;
    ELSE
        EXECUTE format('CREATE OR REPLACE VIEW recsys.user_recommendations AS SELECT user_id, rank, item_id, score, '
                       'model_version, generated_at, %L::text AS served_by FROM recsys.%I',
                       served, serving_tables ->> 'user_recommendations');
        EXECUTE format('CREATE OR REPLACE VIEW recsys.similar_items AS SELECT item_id, rank, similar_item_id, score, '
                       'model_version, %L::text AS served_by FROM recsys.%I',
                       served, serving_tables ->> 'similar_items');
        EXECUTE format('CREATE OR REPLACE VIEW recsys.popular_items AS SELECT rank, item_id, score, model_version, '
                       '%L::text AS served_by FROM recsys.%I',
                       served, serving_tables ->> 'popular_items');
    END IF;
END
$$;
