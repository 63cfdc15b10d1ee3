-- The audit views by runs (impersonation_core::views): one row per run
-- of a batch's consecutive same-chain events that share a view's key,
-- instead of one entry per event in each of six indexes. Events written
-- before this migration get one run each.
CREATE TABLE impersonation_audit_runs (
    view_name TEXT NOT NULL,
    view_key  TEXT COLLATE "C" NOT NULL,
    first_us  BIGINT NOT NULL,
    chain     TEXT COLLATE "C" NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq  BIGINT NOT NULL
);
CREATE INDEX impersonation_audit_runs_by_view
    ON impersonation_audit_runs (view_name, view_key, first_us);
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'all', '', at_us, chain, seq, seq FROM impersonation_audit_events;
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'agent', chain, at_us, chain, seq, seq FROM impersonation_audit_events;
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'subject', subject, at_us, chain, seq, seq FROM impersonation_audit_events WHERE subject IS NOT NULL;
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'tenant', tenant, at_us, chain, seq, seq FROM impersonation_audit_events WHERE tenant IS NOT NULL;
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'actor', actor, at_us, chain, seq, seq FROM impersonation_audit_events WHERE actor IS NOT NULL;
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'session', session_id, at_us, chain, seq, seq FROM impersonation_audit_events WHERE session_id IS NOT NULL;
DROP INDEX impersonation_audit_by_time;
DROP INDEX impersonation_audit_by_agent;
DROP INDEX impersonation_audit_by_subject;
DROP INDEX impersonation_audit_by_actor;
DROP INDEX impersonation_audit_by_tenant;
DROP INDEX impersonation_audit_by_session;
CREATE FUNCTION impersonation_audit_runs_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'impersonation_audit_runs is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER impersonation_audit_runs_no_change
    BEFORE UPDATE OR DELETE ON impersonation_audit_runs
    FOR EACH ROW EXECUTE FUNCTION impersonation_audit_runs_append_only();
CREATE TRIGGER impersonation_audit_runs_no_truncate
    BEFORE TRUNCATE ON impersonation_audit_runs
    FOR EACH STATEMENT EXECUTE FUNCTION impersonation_audit_runs_append_only();
