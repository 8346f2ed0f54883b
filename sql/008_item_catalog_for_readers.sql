-- Every app that renders recommendations needs the items' titles, but recsys_reader cannot read
-- the source table `items` (it may hold columns an app should not see). This view is the part of
-- the catalog an app may read. Like the serving views it runs with its owner's privileges, so the
-- grant below is all it takes. It names only the two columns the pipeline already requires, so
-- the owners of `items` stay free to drop or change every other column.
CREATE VIEW recsys.item_catalog AS
SELECT item_id, title FROM public.items;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'recsys_reader') THEN
        EXECUTE 'GRANT SELECT ON recsys.item_catalog TO recsys_reader';
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'recsys_reader not granted recsys.item_catalog (insufficient privilege): grant SELECT yourself';
END
$$;
