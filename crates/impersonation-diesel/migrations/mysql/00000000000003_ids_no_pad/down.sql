-- Back to text under utf8mb4_bin. Fails on a unique key if two stored ids
-- differ only by trailing spaces (the collision migration 3 ended).
ALTER TABLE impersonation_audit_runs
    MODIFY view_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    MODIFY chain VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE impersonation_audit_events
    MODIFY chain VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    MODIFY actor VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    MODIFY subject VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    MODIFY tenant VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL;
ALTER TABLE impersonation_audit_chains
    MODIFY chain VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE impersonation_sessions
    MODIFY live_agent VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin AS (CASE WHEN state IN ('pending', 'active') THEN agent ELSE NULL END) STORED,
    MODIFY agent VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    MODIFY subject VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    MODIFY tenant VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
