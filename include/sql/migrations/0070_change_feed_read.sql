-- Orthanc's change feed read once per window (medsync.sources.dicomweb.feed): the first pull of
-- a run's window to need its changes reads them and keeps what they touched here; the run's other
-- pulls (one task per level) and their retries use it instead of reading the feed again.
CREATE TABLE medsync.change_feed_read (
    source_system text        NOT NULL,
    since         timestamptz NOT NULL,
    until         timestamptz NOT NULL,
    changes       integer     NOT NULL,   -- events dated in the window
    studies       text[]      NOT NULL,   -- Orthanc ids of the studies touched
    series        jsonb       NOT NULL,   -- Orthanc id of each series touched -> its study and SeriesInstanceUID
    read_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_system, since, until)
);

-- medsync.change_feed_mark (0020) now holds sparse marks: one per feed page read and one per
-- full listing, thinned to one a day once older than any scheduled window can start.
