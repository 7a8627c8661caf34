-- Indexes of the medsync page in the Airflow UI (medsync.ui): each of its queries reads an
-- index range instead of scanning a table. Only medsync's own tables: A's imaging.* tables
-- are A's, and the page reads them by their primary and unique keys only.

-- A source's last runs and the runs of the last weeks (the chart).
CREATE INDEX sync_run_source_started_idx ON medsync.sync_run (source_system, started_at DESC);

-- The open quarantine grouped by level and reason, with its oldest and newest entries and a
-- few keys per group, read from the index alone.
CREATE INDEX quarantine_open_reason_idx ON medsync.quarantine (source_system, level, reason, created_at)
    INCLUDE (source_key, updated_at) WHERE resolved_at IS NULL;

-- Pending children by age, and the longest waiting ones.
CREATE INDEX pending_study_since_idx    ON medsync.pending_study    (source_system, pending_since) INCLUDE (source_key, parent_key);
CREATE INDEX pending_sequence_since_idx ON medsync.pending_sequence (source_system, pending_since) INCLUDE (source_key, parent_key);
CREATE INDEX pending_instance_since_idx ON medsync.pending_instance (source_system, pending_since) INCLUDE (source_key, parent_key);
