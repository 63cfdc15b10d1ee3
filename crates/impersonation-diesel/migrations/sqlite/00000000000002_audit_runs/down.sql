DROP TABLE impersonation_audit_runs;
CREATE INDEX impersonation_audit_by_time    ON impersonation_audit_events (at_us, id);
CREATE INDEX impersonation_audit_by_agent   ON impersonation_audit_events (chain, at_us, id);
CREATE INDEX impersonation_audit_by_subject ON impersonation_audit_events (subject, at_us, id);
CREATE INDEX impersonation_audit_by_actor   ON impersonation_audit_events (actor, at_us, id);
CREATE INDEX impersonation_audit_by_tenant  ON impersonation_audit_events (tenant, at_us, id);
CREATE INDEX impersonation_audit_by_session ON impersonation_audit_events (session_id, at_us, id);
