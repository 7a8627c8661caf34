-- Sources without modification times (a PACS over DICOMweb) and without tombstones.

-- A record's version when its source gives none: the time its current content was first seen
-- (docs/dicomweb-mapping.md, "Versions"). One row per record: the hash of the content last seen.
CREATE TABLE medsync.content_version (
    source_system text        NOT NULL,
    level         text        NOT NULL,
    source_key    text        NOT NULL,
    content_hash  text        NOT NULL,
    first_seen_at timestamptz NOT NULL,
    PRIMARY KEY (source_system, level, source_key)
);

-- Where a source's change feed was read, by time: a run whose window starts at T reads the feed
-- from the last sequence number seen before T (Orthanc's /changes numbers its events).
CREATE TABLE medsync.change_feed_mark (
    source_system text        NOT NULL,
    seq           bigint      NOT NULL,
    changed_at    timestamptz NOT NULL,   -- the event's own time, as the source gives it
    PRIMARY KEY (source_system, seq)
);
CREATE INDEX change_feed_mark_time_idx ON medsync.change_feed_mark (source_system, changed_at);

-- Snapshot compares (DeletionMode.SNAPSHOT): a level listed whole and compared with A's live rows.
-- The cadence counts the snapshots of succeeded runs (medsync.snapshot).
CREATE TABLE medsync.snapshot_run (
    run_id        bigint      NOT NULL REFERENCES medsync.sync_run (id) ON DELETE CASCADE,
    source_system text        NOT NULL,
    level         text        NOT NULL,
    taken_at      timestamptz NOT NULL DEFAULT now(),
    listed        bigint      NOT NULL,
    tombstones    bigint      NOT NULL,
    seconds       double precision NOT NULL,
    PRIMARY KEY (run_id, level)
);
