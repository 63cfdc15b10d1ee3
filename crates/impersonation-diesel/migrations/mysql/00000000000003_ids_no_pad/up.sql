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
ALTER TABLE impersonation_audit_runs
    MODIFY view_key VARBINARY(255) NOT NULL,
    MODIFY chain VARBINARY(255) NOT NULL;
