-- A copy of shared/contracts/a-schema.sql (service A owns it), for the demo, tests and docker-compose.
-- tests/test_contracts.py checks that it matches the contract when the contract is beside the repo.
-- Service A's imaging tables, as service A owns them in production.
-- The sync writes into these tables and must not change their shape;
-- its own tables (staging, state, quarantine) live in a schema of its own.

CREATE SCHEMA IF NOT EXISTS imaging;

CREATE TABLE IF NOT EXISTS imaging.subject (
    id                uuid        PRIMARY KEY,            -- issued by the application, never by the database
    source_system     text        NOT NULL DEFAULT 'a',   -- 'a': created in A itself; otherwise the source's name ('b', 'c', ...)
    source_key        text,                               -- the record's id in its source; NULL for A's own rows
    patient_code      text        NOT NULL,               -- MRN / DICOM PatientID
    patient_name      text,                               -- PHI: 'Family^Given' as in DICOM PN
    sex               char(1)     CHECK (sex IN ('M', 'F', 'O')),   -- NULL: unknown
    birth_date        date,
    source_updated_at timestamptz,                        -- updated_at of the source record last applied
    deleted_at        timestamptz,                        -- soft delete; NULL: live
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_system, source_key),
    CHECK ((source_system = 'a') = (source_key IS NULL))
);

CREATE TABLE IF NOT EXISTS imaging.study (
    id                uuid        PRIMARY KEY,
    subject_id        uuid        NOT NULL REFERENCES imaging.subject (id),
    source_system     text        NOT NULL DEFAULT 'a',
    source_key        text,
    study_uid         text        NOT NULL,               -- DICOM StudyInstanceUID
    accession_number  text,
    study_at          timestamptz,
    description       text,
    status            text        NOT NULL
                      CHECK (status IN ('REQUESTED', 'ACQUIRING', 'COMPLETED', 'CANCELLED')),
    source_updated_at timestamptz,
    deleted_at        timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_system, source_key),
    CHECK ((source_system = 'a') = (source_key IS NULL))
);
CREATE INDEX IF NOT EXISTS study_subject_id_idx ON imaging.study (subject_id);

CREATE TABLE IF NOT EXISTS imaging.sequence (
    id                uuid        PRIMARY KEY,
    study_id          uuid        NOT NULL REFERENCES imaging.study (id),
    source_system     text        NOT NULL DEFAULT 'a',
    source_key        text,
    series_uid        text        NOT NULL,               -- DICOM SeriesInstanceUID
    series_number     integer,
    modality          text        NOT NULL
                      CHECK (modality IN ('CT', 'MR', 'PT', 'NM', 'US', 'CR', 'DX', 'MG', 'RF', 'XA', 'OT')),
    body_part         text
                      CHECK (body_part IN ('HEAD', 'BRAIN', 'NECK', 'CHEST', 'ABDOMEN', 'PELVIS', 'CSPINE',
                                           'TSPINE', 'LSPINE', 'SHOULDER', 'KNEE', 'HAND', 'FOOT', 'BREAST',
                                           'WHOLEBODY')),
    laterality        char(1)     CHECK (laterality IN ('L', 'R', 'B')),   -- NULL: not paired / not given
    description       text,
    source_updated_at timestamptz,
    deleted_at        timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_system, source_key),
    CHECK ((source_system = 'a') = (source_key IS NULL))
);
CREATE INDEX IF NOT EXISTS sequence_study_id_idx ON imaging.sequence (study_id);

CREATE TABLE IF NOT EXISTS imaging.instance (
    id                uuid        PRIMARY KEY,
    sequence_id       uuid        NOT NULL REFERENCES imaging.sequence (id),
    source_system     text        NOT NULL DEFAULT 'a',
    source_key        text,
    sop_instance_uid  text        NOT NULL,               -- DICOM SOPInstanceUID
    instance_number   integer,
    storage_bucket    text        NOT NULL,               -- the S3 bucket that holds the file: A's own or a source's
    storage_key       text        NOT NULL,               -- object key inside storage_bucket, no leading '/'
    size_bytes        bigint,
    content_type      text,
    source_updated_at timestamptz,
    deleted_at        timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_system, source_key),
    CHECK ((source_system = 'a') = (source_key IS NULL))
);
CREATE INDEX IF NOT EXISTS instance_sequence_id_idx ON imaging.instance (sequence_id);
