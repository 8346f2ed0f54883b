-- `quarantine replay --reason R` re-admits quarantined rows once their cause is fixed: it stamps
-- replay_requested_at, the next run re-reads and re-validates those rows, and marks them
-- replayed_by with its run key (a row that fails again gets a new quarantine row of that run).
ALTER TABLE recsys.quarantine
    ADD COLUMN replay_requested_at timestamptz,
    ADD COLUMN replayed_by text;
-- Each extract looks up the few rows up for replay, then all entries of those rows.
CREATE INDEX quarantine_replay_idx ON recsys.quarantine (event_id) WHERE replay_requested_at IS NOT NULL;
CREATE INDEX quarantine_event_idx ON recsys.quarantine (event_id);
