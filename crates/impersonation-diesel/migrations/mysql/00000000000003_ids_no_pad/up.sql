-- Host ids compare byte for byte, trailing spaces included. utf8mb4_bin
-- is a PAD SPACE collation: under it 'ann' = 'ann ', so two people whose
-- ids differ only by trailing spaces shared one live-session slot, one
-- audit chain and each other's views. A binary string compares its bytes
-- with no padding on MySQL and MariaDB alike (a NO PAD text collation has
-- a different name on each). Ids are at most 255 bytes (MAX_ID_LEN).
ALTER TABLE impersonation_sessions
    MODIFY agent VARBINARY(255) NOT NULL,
    MODIFY subject VARBINARY(255) NOT NULL,
    MODIFY tenant VARBINARY(255) NOT NULL,
    MODIFY live_agent VARBINARY(255) AS (CASE WHEN state IN ('pending', 'active') THEN agent ELSE NULL END) STORED;
ALTER TABLE impersonation_audit_chains
    MODIFY chain VARBINARY(255) NOT NULL;
ALTER TABLE impersonation_audit_events
    MODIFY chain VARBINARY(255) NOT NULL,
    MODIFY actor VARBINARY(255) NULL,
    MODIFY subject VARBINARY(255) NULL,
    MODIFY tenant VARBINARY(255) NULL;
-- The runs table has its primary key from migration 2 now. One an earlier
-- migration 2 made without it gets it here, in the same ALTER: a server
-- that has since come to require keys (sql_require_primary_key,
-- innodb_force_primary_key) refuses to alter a table that stays without.
SET @impersonation_runs_keyed = (
    SELECT COUNT(*) FROM information_schema.table_constraints
    WHERE table_schema = DATABASE()
      AND table_name = 'impersonation_audit_runs'
      AND constraint_type = 'PRIMARY KEY');
SET @impersonation_runs_ddl = CONCAT(
    'ALTER TABLE impersonation_audit_runs',
    ' MODIFY view_key VARBINARY(255) NOT NULL,',
    ' MODIFY chain VARBINARY(255) NOT NULL',
    IF(@impersonation_runs_keyed = 0,
       ', ADD PRIMARY KEY (view_name, view_key, chain, first_seq)', ''));
PREPARE impersonation_runs_alter FROM @impersonation_runs_ddl;
EXECUTE impersonation_runs_alter;
DEALLOCATE PREPARE impersonation_runs_alter;
