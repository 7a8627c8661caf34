-- Why a run failed, said as soon as Airflow knows (medsync.failures): the task that failed and
-- the error's class and message (medsync's messages carry no record contents). And what a
-- repair run was asked to do (levels, an exact window, dry_run), so the report can say it.
ALTER TABLE medsync.sync_run
    ADD COLUMN failed_task   text,
    ADD COLUMN error_class   text,
    ADD COLUMN error_message text,
    ADD COLUMN options       jsonb NOT NULL DEFAULT '{}';
CREATE INDEX sync_run_running_idx ON medsync.sync_run (source_system) WHERE status = 'running';
