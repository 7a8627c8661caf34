-- A source's request limit, shared by every task of every run (medsync.request_limit): tasks
-- share only this database, so the next free request slot of each source is kept here and each
-- request claims one with a single short UPDATE. The database's clock is the one clock of all workers.
CREATE TABLE medsync.request_limit (
    source_system text        PRIMARY KEY,
    next_slot     timestamptz NOT NULL              -- the earliest moment the next request may be sent
);
