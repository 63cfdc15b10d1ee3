DROP TABLE impersonation_audit_events;
DROP FUNCTION impersonation_audit_append_only();
DROP TABLE impersonation_audit_chains;
DROP TABLE impersonation_sessions;
