-- MySQL commits each CREATE at once, so a run that fails part way (a
-- trigger refused for want of a privilege under binary logging) cannot be
-- rolled back: every statement here may run again over what one left.
-- utf8mb4_bin: ids compare byte for byte (case-sensitive), as in Rust.
CREATE TABLE IF NOT EXISTS impersonation_sessions (
    id              CHAR(36) NOT NULL PRIMARY KEY,
    agent           VARCHAR(255) NOT NULL,
    subject         VARCHAR(255) NOT NULL,
    tenant          VARCHAR(255) NOT NULL,
    state           VARCHAR(16) NOT NULL,
    secret_hash     CHAR(64) NOT NULL,
    created_us      BIGINT NOT NULL,
    expires_us      BIGINT NOT NULL,
    idle_us         BIGINT NOT NULL,
    last_seen_us    BIGINT NOT NULL,
    last_checked_us BIGINT NOT NULL,
    version         BIGINT NOT NULL,
    record          LONGTEXT NOT NULL,
    shadow          LONGTEXT NOT NULL,
    -- MySQL has no partial index; a stored generated column that is NULL for
    -- ended sessions, under a unique index, is the equivalent.
    live_agent      VARCHAR(255) AS (CASE WHEN state IN ('pending', 'active') THEN agent ELSE NULL END) STORED,
    CONSTRAINT impersonation_sessions_state CHECK (state IN ('pending', 'active', 'ended')),
    UNIQUE KEY impersonation_sessions_secret (secret_hash),
    UNIQUE KEY impersonation_sessions_one_live_per_agent (live_agent),
    KEY impersonation_sessions_subject (subject, state),
    KEY impersonation_sessions_tenant (tenant, state)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS impersonation_audit_chains (
    chain VARCHAR(255) NOT NULL PRIMARY KEY,
    seq   BIGINT NOT NULL,
    hash  CHAR(64) NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS impersonation_audit_events (
    id         CHAR(36) NOT NULL PRIMARY KEY,
    chain      VARCHAR(255) NOT NULL,
    seq        BIGINT NOT NULL,
    at_us      BIGINT NOT NULL,
    action     VARCHAR(32) NOT NULL,
    actor      VARCHAR(255) NULL,
    subject    VARCHAR(255) NULL,
    tenant     VARCHAR(255) NULL,
    session_id CHAR(36) NULL,
    event      LONGTEXT NOT NULL,
    UNIQUE KEY impersonation_audit_position (chain, seq),
    KEY impersonation_audit_by_time (at_us, id),
    KEY impersonation_audit_by_agent (chain, at_us, id),
    KEY impersonation_audit_by_subject (subject, at_us, id),
    KEY impersonation_audit_by_actor (actor, at_us, id),
    KEY impersonation_audit_by_tenant (tenant, at_us, id),
    KEY impersonation_audit_by_session (session_id, at_us, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

DROP TRIGGER IF EXISTS impersonation_audit_events_no_update;
DROP TRIGGER IF EXISTS impersonation_audit_events_no_delete;
CREATE TRIGGER impersonation_audit_events_no_update BEFORE UPDATE ON impersonation_audit_events
    FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'impersonation_audit_events is append-only: UPDATE refused';
CREATE TRIGGER impersonation_audit_events_no_delete BEFORE DELETE ON impersonation_audit_events
    FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'impersonation_audit_events is append-only: DELETE refused';
