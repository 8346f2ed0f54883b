-- Reader-facing views exist from the start (empty, with the contract's columns), so
-- downstream apps can be deployed before the first model is published. Publishing
-- repoints them with CREATE OR REPLACE VIEW, which keeps names, types and grants.
CREATE VIEW recsys.user_recommendations AS
SELECT NULL::bigint AS user_id, NULL::int AS rank, NULL::bigint AS item_id, NULL::real AS score,
       NULL::text AS model_version, NULL::timestamptz AS generated_at
WHERE false;

CREATE VIEW recsys.similar_items AS
SELECT NULL::bigint AS item_id, NULL::int AS rank, NULL::bigint AS similar_item_id, NULL::real AS score,
       NULL::text AS model_version
WHERE false;

CREATE VIEW recsys.popular_items AS
SELECT NULL::int AS rank, NULL::bigint AS item_id, NULL::real AS score, NULL::text AS model_version
WHERE false;

-- recsys_reader may read the three serving views and nothing else. Creating a role needs
-- CREATEROLE; on a managed database without it we say so and carry on.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'recsys_reader') THEN
        CREATE ROLE recsys_reader NOLOGIN;
    END IF;
    EXECUTE 'GRANT USAGE ON SCHEMA recsys TO recsys_reader';
    EXECUTE 'GRANT SELECT ON recsys.user_recommendations, recsys.similar_items, recsys.popular_items TO recsys_reader';
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'recsys_reader role not created (insufficient privilege): grant it SELECT on the recsys views yourself';
END
$$;
