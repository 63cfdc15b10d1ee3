-- Audit pages read a view's runs in (first_us, chain, first_seq) order.
-- InnoDB adds a table's primary key to each of its other indexes, so with
-- this key the view index (view_name, view_key, first_us) holds the whole
-- order, and a page's LIMIT stops the scan early instead of sorting every
-- run in range first. (A run is one chain's events from first_seq on, in
-- one view: the key is unique.) Rebuilds the table: writes wait meanwhile.
--
-- Migration 2 now makes the table with this key (servers that set
-- sql_require_primary_key refuse a table without one), and migration 3
-- adds it to a table an earlier migration 2 made without, so it is added
-- here only where that earlier migration 3 ran too.
SET @impersonation_runs_keyed = (
    SELECT COUNT(*) FROM information_schema.table_constraints
    WHERE table_schema = DATABASE()
      AND table_name = 'impersonation_audit_runs'
      AND constraint_type = 'PRIMARY KEY');
SET @impersonation_runs_ddl = IF(@impersonation_runs_keyed = 0,
    'ALTER TABLE impersonation_audit_runs ADD PRIMARY KEY (view_name, view_key, chain, first_seq)',
    'DO 0');
PREPARE impersonation_runs_key FROM @impersonation_runs_ddl;
EXECUTE impersonation_runs_key;
DEALLOCATE PREPARE impersonation_runs_key;
