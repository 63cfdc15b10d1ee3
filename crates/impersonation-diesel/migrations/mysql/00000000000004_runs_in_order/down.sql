ALTER TABLE impersonation_audit_runs DROP PRIMARY KEY;
