-- The run manifest: the resolved settings, library versions, every stage's outcome and output, and
-- each artifact's path with its sha256. The same document is written as manifest.json in the run
-- folder; this copy survives the folder and is what `python -m recmodel reproduce` reads first.
ALTER TABLE recsys.pipeline_runs ADD COLUMN IF NOT EXISTS manifest jsonb NOT NULL DEFAULT '{}'::jsonb;
