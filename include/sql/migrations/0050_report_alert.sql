-- When a run's report alert went out (medsync.tasks.alert_on_report): a report task that runs
-- again (a retry, or cleared) finds it here and does not send it twice.
ALTER TABLE medsync.sync_run ADD COLUMN report_alerted_at timestamptz;
