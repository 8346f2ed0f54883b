-- Fencing: each claim of a retraining run gets a new generation. The steps of the run carry the
-- generation they started under, and every write that matters (stage rows, registry, validation's
-- commit, publish) checks it in its own transaction. A run declared dead gets a new generation too,
-- so a process that was paused past the liveness limit and wakes up can write nothing more.
ALTER TABLE recsys.pipeline_runs
    ADD COLUMN claim_generation bigint NOT NULL DEFAULT 0;

-- The highest event_id each run's extract had read (cumulative over earlier runs): rows appended with
-- an ingested_at already behind the watermark (a historical import after the first run) are found by
-- their larger event_id instead of being skipped without a word.
ALTER TABLE recsys.extract_watermarks
    ADD COLUMN max_event_id bigint;
