-- The audit views by runs (impersonation_core::views): one row per run
-- of a batch's consecutive same-chain events that share a view's key,
-- instead of one entry per event in each of six indexes. Events written
-- before this migration get one run each.
--
-- The table has its primary key from the start: servers that refuse a
-- table without one (MySQL's sql_require_primary_key, on by default on
-- some managed services; MariaDB's innodb_force_primary_key) would refuse
-- it otherwise. A run is one chain's events from first_seq on, in one
-- view, so the key is unique; its ids are binary strings (as migration 3
-- makes every id), so two chains whose ids differ only by trailing spaces
-- cannot collide in it. Migration 4 adds the key where an earlier version
-- of this migration made the table without it.
CREATE TABLE impersonation_audit_runs (
    view_name VARCHAR(16) NOT NULL,
    view_key  VARBINARY(255) NOT NULL,
    first_us  BIGINT NOT NULL,
    chain     VARBINARY(255) NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq  BIGINT NOT NULL,
    PRIMARY KEY (view_name, view_key, chain, first_seq),
    KEY impersonation_audit_runs_by_view (view_name, view_key, first_us)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
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
ALTER TABLE impersonation_audit_events
    DROP INDEX impersonation_audit_by_time,
    DROP INDEX impersonation_audit_by_agent,
    DROP INDEX impersonation_audit_by_subject,
    DROP INDEX impersonation_audit_by_actor,
    DROP INDEX impersonation_audit_by_tenant,
    DROP INDEX impersonation_audit_by_session;
CREATE TRIGGER impersonation_audit_runs_no_update BEFORE UPDATE ON impersonation_audit_runs
    FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'impersonation_audit_runs is append-only: UPDATE refused';
CREATE TRIGGER impersonation_audit_runs_no_delete BEFORE DELETE ON impersonation_audit_runs
    FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'impersonation_audit_runs is append-only: DELETE refused';
