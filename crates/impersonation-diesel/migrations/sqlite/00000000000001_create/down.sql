DROP TABLE impersonation_audit_events;
DROP TABLE impersonation_audit_chains;
DROP TABLE impersonation_sessions;
