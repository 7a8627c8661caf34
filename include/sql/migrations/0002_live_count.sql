-- A's live rows per source and level, kept by the merges in the same transaction as the
-- rows they insert, delete or bring back (see medsync.live_count), so that a run's report
-- costs what the run changed instead of a count of A's tables. A level's row is created by
-- an exact count (the first prepare that needs it) and counted again by every full refresh.
CREATE TABLE medsync.live_count (
    source_system text        NOT NULL,
    level         text        NOT NULL,
    live          bigint      NOT NULL,
    counted_at    timestamptz NOT NULL,              -- the last exact count
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_system, level)
);
