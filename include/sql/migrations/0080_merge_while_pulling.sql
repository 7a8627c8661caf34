-- Merging a level while it is still being pulled (medsync.early_merge): a pull commits its
-- staging in numbered chunks (1, 2, ...; 0 is a row staged outside a pull's chunks, such as a
-- snapshot's tombstone), and the chunks merged into A before the level's merge task runs are
-- recorded here, a row per merge (it takes the chunks first_chunk to last_chunk) with what it
-- counted, so that the merge task leaves them out and adds their figures to the level's.
ALTER TABLE medsync.stage_subject  ADD COLUMN chunk integer NOT NULL DEFAULT 0;
ALTER TABLE medsync.stage_study    ADD COLUMN chunk integer NOT NULL DEFAULT 0;
ALTER TABLE medsync.stage_sequence ADD COLUMN chunk integer NOT NULL DEFAULT 0;
ALTER TABLE medsync.stage_instance ADD COLUMN chunk integer NOT NULL DEFAULT 0;

CREATE TABLE medsync.early_merge_chunk (
    run_id    bigint      NOT NULL REFERENCES medsync.sync_run (id) ON DELETE CASCADE,
    level     text        NOT NULL,
    slice       smallint    NOT NULL,
    first_chunk integer     NOT NULL,
    last_chunk  integer     NOT NULL,
    counts      jsonb       NOT NULL,             -- the merge's MergeCounts
    merged_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, level, slice, first_chunk),
    CHECK (first_chunk <= last_chunk)
);
