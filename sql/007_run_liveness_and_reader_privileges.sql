-- Liveness of a retraining run: while one of its steps executes, the step's process stamps
-- `heartbeat_at` every few seconds and names the step in `active_step`. A run whose step stopped
-- stamping (its process was killed, its worker lost) is dead, not running: the next run marks it
-- failed instead of waiting it out, and one run at a time is enforced on what is alive.
ALTER TABLE recsys.pipeline_runs
    ADD COLUMN heartbeat_at timestamptz,
    ADD COLUMN active_step text;

-- Published tables' unique indexes were created on the staging table and kept its name
-- ("…__staging_user_id_rank_idx" and the like); name them after the table they index.
DO $$
DECLARE
    found record;
BEGIN
    FOR found IN
        SELECT indexname, tablename FROM pg_indexes
        WHERE schemaname = 'recsys' AND indexname LIKE '%staging%' AND tablename NOT LIKE '%\_\_staging'
    LOOP
        EXECUTE format('ALTER INDEX recsys.%I RENAME TO %I', found.indexname, found.tablename || '_key');
    END LOOP;
END
$$;

-- Postgres grants PUBLIC the right to connect to a new database and to create temporary tables in
-- it, so recsys_reader could do both. Revoke them from PUBLIC here. Where PUBLIC still had them (a
-- database this project did not create), the login roles that exist now keep both through explicit
-- grants, so an app's roles are not locked out. recsys_reader gets CONNECT only, and roles created
-- later get what is granted to them, nothing by default.
DO $$
DECLARE
    existing record;
    public_could_connect boolean;
BEGIN
    SELECT datacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(datacl) a
                                     WHERE a.grantee = 0 AND a.privilege_type = 'CONNECT')
    INTO public_could_connect FROM pg_database WHERE datname = current_database();
    EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    FOR existing IN
        SELECT rolname FROM pg_roles
        WHERE public_could_connect AND rolcanlogin AND rolname <> current_user
          AND NOT (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'recsys_reader')
                   AND pg_has_role(oid, 'recsys_reader', 'MEMBER'))
    LOOP
        EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), existing.rolname);
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'recsys_reader') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO recsys_reader', current_database());
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'database privileges unchanged (not the owner): REVOKE CONNECT, TEMPORARY ON DATABASE % FROM PUBLIC '
                  'and GRANT CONNECT to recsys_reader yourself (docs/OPERATIONS.md)', current_database();
END
$$;
