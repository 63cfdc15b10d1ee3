CREATE INDEX impersonation_audit_runs_by_view
    ON impersonation_audit_runs (view_name, view_key, first_us);
DROP INDEX impersonation_audit_runs_in_order;
