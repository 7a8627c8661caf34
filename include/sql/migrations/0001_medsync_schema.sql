-- medsync's own schema: sync state, quarantine, pending records and staging templates.
-- Applied once by the prepare task (see medsync.schema); never edit an applied migration,
-- add a new numbered file instead.

CREATE TABLE medsync.sync_run (
    id            bigserial   PRIMARY KEY,
    source_system text        NOT NULL,
    dag_run_id    text        NOT NULL,
    run_type      text        NOT NULL,      -- scheduled | manual | backfill | full_refresh
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    status        text        NOT NULL DEFAULT 'running',   -- running | succeeded | failed
    report        jsonb,
    UNIQUE (source_system, dag_run_id)
);

-- One row per run and level: the window it syncs and what each step counted.
CREATE TABLE medsync.sync_run_level (
    run_id        bigint      NOT NULL REFERENCES medsync.sync_run (id) ON DELETE CASCADE,
    level         text        NOT NULL,
    since         timestamptz NOT NULL,
    until         timestamptz NOT NULL,
    pull_counts   jsonb       NOT NULL DEFAULT '{}',
    merge_counts  jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, level),
    CHECK (since < until)
);

-- How far each level of each source is known to be synced. Only moves forward.
CREATE TABLE medsync.watermark (
    source_system text        NOT NULL,
    level         text        NOT NULL,
    synced_until  timestamptz NOT NULL,
    run_id        bigint,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_system, level)
);

-- Records whose newest known version is a tombstone, whether or not A ever stored them:
-- an older live version arriving later must not bring them back, and a parent coming
-- back must not revive children deleted by their own tombstone.
CREATE TABLE medsync.tombstone (
    source_system     text        NOT NULL,
    level             text        NOT NULL,
    source_key        text        NOT NULL,
    source_updated_at timestamptz NOT NULL,
    PRIMARY KEY (source_system, level, source_key)
);

-- Records held back with their reason (b-to-a.md); retried by every run against the current
-- mapping. One row per record: the newest held-back version.
CREATE TABLE medsync.quarantine (
    source_system     text        NOT NULL,
    level             text        NOT NULL,
    source_key        text        NOT NULL,
    source_updated_at timestamptz,            -- NULL when updated_at itself did not parse
    reason            text        NOT NULL,
    payload           jsonb       NOT NULL,   -- the record as the source sent it (PHI: same care as A's tables)
    first_run_id      bigint,
    last_run_id       bigint,
    attempts          integer     NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    resolved_at       timestamptz,
    resolved_run_id   bigint,
    PRIMARY KEY (source_system, level, source_key)
);
CREATE INDEX quarantine_open_idx ON medsync.quarantine (source_system, level) WHERE resolved_at IS NULL;

-- Staging templates: each run's staging tables are created LIKE these (see medsync.staging).
-- parent_key is the source's link to the parent (B: patient_id, study_id, series_uid).
CREATE TABLE medsync.stage_subject (
    source_key        text        NOT NULL,
    source_updated_at timestamptz NOT NULL,
    deleted           boolean     NOT NULL,
    new_id            uuid        NOT NULL,   -- used only if the record is new to A
    slice             smallint    NOT NULL DEFAULT 0,
    patient_code      text,
    patient_name      text,
    sex               text,
    birth_date        date
);
CREATE TABLE medsync.stage_study (
    source_key        text        NOT NULL,
    source_updated_at timestamptz NOT NULL,
    deleted           boolean     NOT NULL,
    new_id            uuid        NOT NULL,
    slice             smallint    NOT NULL DEFAULT 0,
    parent_key        text,
    study_uid         text,
    accession_number  text,
    study_at          timestamptz,
    description       text,
    status            text
);
CREATE TABLE medsync.stage_sequence (
    source_key        text        NOT NULL,
    source_updated_at timestamptz NOT NULL,
    deleted           boolean     NOT NULL,
    new_id            uuid        NOT NULL,
    slice             smallint    NOT NULL DEFAULT 0,
    parent_key        text,
    series_uid        text,
    series_number     integer,
    modality          text,
    body_part         text,
    laterality        text,
    description       text
);
CREATE TABLE medsync.stage_instance (
    source_key        text        NOT NULL,
    source_updated_at timestamptz NOT NULL,
    deleted           boolean     NOT NULL,
    new_id            uuid        NOT NULL,
    slice             smallint    NOT NULL DEFAULT 0,
    parent_key        text,
    sop_instance_uid  text,
    instance_number   integer,
    storage_bucket    text,
    storage_key       text,
    size_bytes        bigint,
    content_type      text
);

-- Live records whose parent is not in A yet (held back, quarantined, or in a later window).
-- Merged by every later run as soon as the parent is there.
CREATE TABLE medsync.pending_study    (LIKE medsync.stage_study INCLUDING DEFAULTS);
CREATE TABLE medsync.pending_sequence (LIKE medsync.stage_sequence INCLUDING DEFAULTS);
CREATE TABLE medsync.pending_instance (LIKE medsync.stage_instance INCLUDING DEFAULTS);
ALTER TABLE medsync.pending_study    ADD COLUMN source_system text NOT NULL, ADD COLUMN pending_since timestamptz NOT NULL DEFAULT now(), ADD PRIMARY KEY (source_system, source_key);
ALTER TABLE medsync.pending_sequence ADD COLUMN source_system text NOT NULL, ADD COLUMN pending_since timestamptz NOT NULL DEFAULT now(), ADD PRIMARY KEY (source_system, source_key);
ALTER TABLE medsync.pending_instance ADD COLUMN source_system text NOT NULL, ADD COLUMN pending_since timestamptz NOT NULL DEFAULT now(), ADD PRIMARY KEY (source_system, source_key);
