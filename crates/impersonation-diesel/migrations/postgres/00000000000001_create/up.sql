-- Sessions: the record as JSON plus the columns queries and constraints need.
-- Text ids use the "C" collation so ordering is byte order, as in Rust.
CREATE TABLE impersonation_sessions (
    id              TEXT COLLATE "C" PRIMARY KEY,
    agent           TEXT COLLATE "C" NOT NULL,
    subject         TEXT COLLATE "C" NOT NULL,
    tenant          TEXT COLLATE "C" NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'active', 'ended')),
    secret_hash     TEXT NOT NULL UNIQUE,
    created_us      BIGINT NOT NULL,
    expires_us      BIGINT NOT NULL,
    idle_us         BIGINT NOT NULL,
    last_seen_us    BIGINT NOT NULL,
    last_checked_us BIGINT NOT NULL,
    version         BIGINT NOT NULL,
    record          TEXT NOT NULL,
    shadow          TEXT NOT NULL
);

-- One live session per agent, enforced by the database itself.
CREATE UNIQUE INDEX impersonation_sessions_one_live_per_agent
    ON impersonation_sessions (agent) WHERE state IN ('pending', 'active');
CREATE INDEX impersonation_sessions_live_subject
    ON impersonation_sessions (subject) WHERE state IN ('pending', 'active');
CREATE INDEX impersonation_sessions_live_tenant
    ON impersonation_sessions (tenant) WHERE state IN ('pending', 'active');

-- The head of each audit chain: locked by every write to the chain.
CREATE TABLE impersonation_audit_chains (
    chain TEXT COLLATE "C" PRIMARY KEY,
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);

-- Audit events: the event as JSON (exactly as hashed) plus indexed columns.
CREATE TABLE impersonation_audit_events (
    id         TEXT COLLATE "C" PRIMARY KEY,
    chain      TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL,
    at_us      BIGINT NOT NULL,
    action     TEXT NOT NULL,
    actor      TEXT COLLATE "C",
    subject    TEXT COLLATE "C",
    tenant     TEXT COLLATE "C",
    session_id TEXT COLLATE "C",
    event      TEXT NOT NULL,
    UNIQUE (chain, seq)
);
CREATE INDEX impersonation_audit_by_time    ON impersonation_audit_events (at_us, id);
CREATE INDEX impersonation_audit_by_agent   ON impersonation_audit_events (chain, at_us, id);
CREATE INDEX impersonation_audit_by_subject ON impersonation_audit_events (subject, at_us, id);
CREATE INDEX impersonation_audit_by_actor   ON impersonation_audit_events (actor, at_us, id);
CREATE INDEX impersonation_audit_by_tenant  ON impersonation_audit_events (tenant, at_us, id);
CREATE INDEX impersonation_audit_by_session ON impersonation_audit_events (session_id, at_us, id);

-- Append-only at the database level: UPDATE, DELETE and TRUNCATE are refused
-- for every role that does not disable triggers (see docs/diesel.md).
CREATE FUNCTION impersonation_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'impersonation_audit_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER impersonation_audit_events_no_change
    BEFORE UPDATE OR DELETE ON impersonation_audit_events
    FOR EACH ROW EXECUTE FUNCTION impersonation_audit_append_only();
CREATE TRIGGER impersonation_audit_events_no_truncate
    BEFORE TRUNCATE ON impersonation_audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION impersonation_audit_append_only();
