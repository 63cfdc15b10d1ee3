DROP TABLE impersonation_audit_runs;
ALTER TABLE impersonation_audit_events
    ADD KEY impersonation_audit_by_time (at_us, id),
    ADD KEY impersonation_audit_by_agent (chain, at_us, id),
    ADD KEY impersonation_audit_by_subject (subject, at_us, id),
    ADD KEY impersonation_audit_by_actor (actor, at_us, id),
    ADD KEY impersonation_audit_by_tenant (tenant, at_us, id),
    ADD KEY impersonation_audit_by_session (session_id, at_us, id);
