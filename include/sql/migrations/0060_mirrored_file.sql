-- Files copied into A's bucket for sources without a bucket A can read (a PACS, files: mirror).
-- One row per instance whose current file A holds: where it was put, which version of the
-- instance it is the file of, and its size and SHA-256. An instance of the source that is live and
-- has no row here, or a row for another location or an older version, is copied by the next run's
-- mirror_files, so a copy that failed (or a run that failed) is retried until it succeeds.
CREATE TABLE medsync.mirrored_file (
    instance_id    uuid        PRIMARY KEY,     -- imaging.instance.id (A's tables are A's: no foreign key)
    source_system  text        NOT NULL,
    storage_bucket text        NOT NULL,
    storage_key    text        NOT NULL,
    source_version timestamptz,                 -- the instance's source_updated_at when its file was copied
    size_bytes     bigint      NOT NULL,
    sha256         text        NOT NULL,
    mirrored_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mirrored_file_source_idx ON medsync.mirrored_file (source_system);
