CREATE TABLE impersonation_sessions (
    id              TEXT PRIMARY KEY,
    agent           TEXT NOT NULL,
    subject         TEXT NOT NULL,
    tenant          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'active', 'ended')),
    secret_hash     TEXT NOT NULL UNIQUE,
    created_us      INTEGER NOT NULL,
    expires_us      INTEGER NOT NULL,
    idle_us         INTEGER NOT NULL,
    last_seen_us    INTEGER NOT NULL,
    last_checked_us INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    record          TEXT NOT NULL,
    shadow          TEXT NOT NULL
);
CREATE UNIQUE INDEX impersonation_sessions_one_live_per_agent
    ON impersonation_sessions (agent) WHERE state IN ('pending', 'active');
CREATE INDEX impersonation_sessions_live_subject
    ON impersonation_sessions (subject) WHERE state IN ('pending', 'active');
CREATE INDEX impersonation_sessions_live_tenant
    ON impersonation_sessions (tenant) WHERE state IN ('pending', 'active');

CREATE TABLE impersonation_audit_chains (
    chain TEXT PRIMARY KEY,
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);

CREATE TABLE impersonation_audit_events (
    id         TEXT PRIMARY KEY,
    chain      TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    at_us      INTEGER NOT NULL,
    action     TEXT NOT NULL,
    actor      TEXT,
    subject    TEXT,
    tenant     TEXT,
    session_id TEXT,
    event      TEXT NOT NULL,
    UNIQUE (chain, seq)
);
CREATE INDEX impersonation_audit_by_time    ON impersonation_audit_events (at_us, id);
CREATE INDEX impersonation_audit_by_agent   ON impersonation_audit_events (chain, at_us, id);
CREATE INDEX impersonation_audit_by_subject ON impersonation_audit_events (subject, at_us, id);
CREATE INDEX impersonation_audit_by_actor   ON impersonation_audit_events (actor, at_us, id);
CREATE INDEX impersonation_audit_by_tenant  ON impersonation_audit_events (tenant, at_us, id);
CREATE INDEX impersonation_audit_by_session ON impersonation_audit_events (session_id, at_us, id);

CREATE TRIGGER impersonation_audit_events_no_update
    BEFORE UPDATE ON impersonation_audit_events
    BEGIN SELECT RAISE(ABORT, 'impersonation_audit_events is append-only: UPDATE refused'); END;
CREATE TRIGGER impersonation_audit_events_no_delete
    BEFORE DELETE ON impersonation_audit_events
    BEGIN SELECT RAISE(ABORT, 'impersonation_audit_events is append-only: DELETE refused'); END;
