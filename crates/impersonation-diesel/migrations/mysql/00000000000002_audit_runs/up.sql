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
--
-- MySQL and MariaDB commit each CREATE, ALTER and DROP at once, so a run
-- of this migration that stopped part way (a lock wait timed out, a
-- connection was lost) leaves what it did, with no record that it ran.
-- Each step is written to run again over that: the table made if missing,
-- an event's run inserted only where it is not there yet, the indexes
-- dropped that are still there, the triggers made anew. (Each insert
-- reads the table it fills, so the server copies its rows to a temporary
-- table first. Nothing writes through the store before migrate succeeds,
-- so every run here is one event's, first_seq its seq.)
CREATE TABLE IF NOT EXISTS impersonation_audit_runs (
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
    SELECT 'all', '', e.at_us, e.chain, e.seq, e.seq FROM impersonation_audit_events e
    WHERE NOT EXISTS (SELECT 1 FROM impersonation_audit_runs r
          WHERE r.view_name = 'all' AND r.view_key = '' AND r.chain = e.chain AND r.first_seq = e.seq);
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'agent', e.chain, e.at_us, e.chain, e.seq, e.seq FROM impersonation_audit_events e
    WHERE NOT EXISTS (SELECT 1 FROM impersonation_audit_runs r
          WHERE r.view_name = 'agent' AND r.view_key = e.chain AND r.chain = e.chain AND r.first_seq = e.seq);
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'subject', e.subject, e.at_us, e.chain, e.seq, e.seq FROM impersonation_audit_events e
    WHERE e.subject IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM impersonation_audit_runs r
          WHERE r.view_name = 'subject' AND r.view_key = e.subject AND r.chain = e.chain AND r.first_seq = e.seq);
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'tenant', e.tenant, e.at_us, e.chain, e.seq, e.seq FROM impersonation_audit_events e
    WHERE e.tenant IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM impersonation_audit_runs r
          WHERE r.view_name = 'tenant' AND r.view_key = e.tenant AND r.chain = e.chain AND r.first_seq = e.seq);
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'actor', e.actor, e.at_us, e.chain, e.seq, e.seq FROM impersonation_audit_events e
    WHERE e.actor IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM impersonation_audit_runs r
          WHERE r.view_name = 'actor' AND r.view_key = e.actor AND r.chain = e.chain AND r.first_seq = e.seq);
INSERT INTO impersonation_audit_runs (view_name, view_key, first_us, chain, first_seq, last_seq)
    SELECT 'session', e.session_id, e.at_us, e.chain, e.seq, e.seq FROM impersonation_audit_events e
    WHERE e.session_id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM impersonation_audit_runs r
          WHERE r.view_name = 'session' AND r.view_key = e.session_id AND r.chain = e.chain AND r.first_seq = e.seq);
SET @impersonation_event_indexes = (
    SELECT GROUP_CONCAT(DISTINCT CONCAT(' DROP INDEX ', index_name) SEPARATOR ',')
    FROM information_schema.statistics
    WHERE table_schema = DATABASE()
      AND table_name = 'impersonation_audit_events'
      AND index_name IN ('impersonation_audit_by_time', 'impersonation_audit_by_agent', 'impersonation_audit_by_subject', 'impersonation_audit_by_actor', 'impersonation_audit_by_tenant', 'impersonation_audit_by_session'));
SET @impersonation_runs_ddl = IF(@impersonation_event_indexes IS NULL, 'DO 0',
    CONCAT('ALTER TABLE impersonation_audit_events', @impersonation_event_indexes));
PREPARE impersonation_runs_drop FROM @impersonation_runs_ddl;
EXECUTE impersonation_runs_drop;
DEALLOCATE PREPARE impersonation_runs_drop;
DROP TRIGGER IF EXISTS impersonation_audit_runs_no_update;
DROP TRIGGER IF EXISTS impersonation_audit_runs_no_delete;
CREATE TRIGGER impersonation_audit_runs_no_update BEFORE UPDATE ON impersonation_audit_runs
    FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'impersonation_audit_runs is append-only: UPDATE refused';
CREATE TRIGGER impersonation_audit_runs_no_delete BEFORE DELETE ON impersonation_audit_runs
    FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'impersonation_audit_runs is append-only: DELETE refused';
