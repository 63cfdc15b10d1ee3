//! Rows as stored, and their conversion to and from the core's types.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use impersonation_core::{
    AuditEvent, ChainHead, DecodedSessions, EventHash, SecretHash, Session, ShadowUser, StoreError,
};
use time::OffsetDateTime;

/// Microseconds since the Unix epoch: the stored form of every timestamp,
/// exact on every backend and ordered as integers.
pub(crate) use impersonation_core::unix_micros as micros;

pub(crate) fn from_micros(us: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {us}: {e}")))
}

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

pub(crate) fn to_json<T: serde::Serialize>(what: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| corrupt(what, e))
}

/// What `PRAGMA journal_mode` answers (SQLite).
#[cfg(feature = "sqlite")]
#[derive(QueryableByName)]
pub(crate) struct JournalMode {
    #[diesel(sql_type = Text)]
    pub(crate) journal_mode: String,
}

/// A session row: the record as JSON, plus the columns that change without a
/// transition (the idle touch, the re-check) and therefore win over the JSON.
#[derive(QueryableByName)]
pub(crate) struct SessionRow {
    #[diesel(sql_type = Text)]
    record: String,
    #[diesel(sql_type = Text)]
    shadow: String,
    #[diesel(sql_type = BigInt)]
    last_seen_us: i64,
    #[diesel(sql_type = BigInt)]
    last_checked_us: i64,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

impl SessionRow {
    pub(crate) fn into_session(self) -> Result<Session, StoreError> {
        let mut session: Session =
            serde_json::from_str(&self.record).map_err(|e| corrupt("session record", e))?;
        let shadow: ShadowUser =
            serde_json::from_str(&self.shadow).map_err(|e| corrupt("shadow user", e))?;
        session.shadow = shadow;
        self.with_bookkeeping(session)
    }

    /// As [`SessionRow::into_session`], reusing the last decode of this
    /// secret's session when its stored texts are unchanged.
    pub(crate) fn into_session_via(
        self,
        key: SecretHash,
        decoded: &DecodedSessions,
    ) -> Result<Session, StoreError> {
        let session = decoded
            .decode(key, &self.record, &self.shadow)
            .map_err(|e| corrupt("session record", e))?;
        self.with_bookkeeping(session)
    }

    /// The columns that change without a transition win over the JSON.
    fn with_bookkeeping(&self, mut session: Session) -> Result<Session, StoreError> {
        session.last_seen_at = from_micros(self.last_seen_us)?;
        session.last_checked_at = from_micros(self.last_checked_us)?;
        session.version = u64::try_from(self.version).map_err(|e| corrupt("version", e))?;
        Ok(session)
    }
}

/// The columns a session is written with.
pub(crate) struct SessionColumns {
    pub(crate) id: String,
    pub(crate) agent: String,
    pub(crate) subject: String,
    pub(crate) tenant: String,
    pub(crate) state: &'static str,
    pub(crate) secret_hash: String,
    pub(crate) created_us: i64,
    pub(crate) expires_us: i64,
    pub(crate) idle_us: i64,
    pub(crate) last_seen_us: i64,
    pub(crate) last_checked_us: i64,
    pub(crate) version: i64,
    pub(crate) record: String,
    pub(crate) shadow: String,
}

impl SessionColumns {
    pub(crate) fn of(s: &Session) -> Result<Self, StoreError> {
        let idle_us = i64::try_from(s.grant.idle_timeout.whole_microseconds()).unwrap_or(i64::MAX);
        Ok(Self {
            id: s.id.to_string(),
            agent: s.agent.id.as_str().to_owned(),
            subject: s.subject.id.as_str().to_owned(),
            tenant: s.subject.tenant.as_str().to_owned(),
            state: s.state.code(),
            secret_hash: s.secret_hash.to_hex(),
            created_us: micros(s.created_at),
            expires_us: micros(s.expires_at),
            idle_us,
            last_seen_us: micros(s.last_seen_at),
            last_checked_us: micros(s.last_checked_at),
            version: i64::try_from(s.version).map_err(|e| corrupt("version", e))?,
            record: to_json("session record", s)?,
            shadow: to_json("shadow user", &s.shadow)?,
        })
    }
}

/// A migration diesel's harness recorded as run.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[derive(QueryableByName)]
pub(crate) struct MigrationVersion {
    #[diesel(sql_type = Text)]
    pub(crate) version: String,
}

/// `GET_LOCK`'s answer: 1 when the lock is held.
#[cfg(feature = "mysql")]
#[derive(QueryableByName)]
pub(crate) struct Locked {
    #[diesel(sql_type = BigInt)]
    pub(crate) locked: i64,
}

#[derive(QueryableByName)]
pub(crate) struct EventRow {
    #[diesel(sql_type = Text)]
    event: String,
}

impl EventRow {
    pub(crate) fn into_event(self) -> Result<AuditEvent, StoreError> {
        AuditEvent::from_record(&self.event).map_err(|e| corrupt("audit event", e))
    }
}

/// One entry of an audit view (`impersonation_audit_runs`).
#[derive(QueryableByName)]
pub(crate) struct RunRow {
    #[diesel(sql_type = Text)]
    pub(crate) chain: String,
    #[diesel(sql_type = BigInt)]
    pub(crate) first_seq: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) last_seq: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) first_us: i64,
}

#[derive(QueryableByName)]
pub(crate) struct HeadRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    hash: String,
}

impl HeadRow {
    /// `None` for a head row created in this transaction but holding no event yet.
    pub(crate) fn into_head(self) -> Result<Option<ChainHead>, StoreError> {
        if self.seq < 0 {
            return Ok(None);
        }
        let hash = EventHash::from_hex(&self.hash).map_err(|e| corrupt("chain head hash", e))?;
        Ok(Some(ChainHead {
            seq: u64::try_from(self.seq).map_err(|e| corrupt("chain head", e))?,
            hash,
        }))
    }
}

#[derive(QueryableByName)]
pub(crate) struct KeyRow {
    #[diesel(sql_type = Text)]
    pub(crate) chain: String,
}

#[derive(QueryableByName)]
pub(crate) struct IdRow {
    #[diesel(sql_type = Text)]
    pub(crate) id: String,
}

#[derive(QueryableByName)]
pub(crate) struct VersionRow {
    #[diesel(sql_type = BigInt)]
    pub(crate) version: i64,
}

#[derive(QueryableByName)]
pub(crate) struct StateRow {
    #[diesel(sql_type = Text)]
    pub(crate) state: String,
}

#[derive(QueryableByName)]
pub(crate) struct IdStateRow {
    #[diesel(sql_type = Text)]
    pub(crate) id: String,
    #[diesel(sql_type = Text)]
    pub(crate) agent: String,
    #[diesel(sql_type = Text)]
    pub(crate) state: String,
}

/// A session row with the secret hash it was found by.
#[derive(QueryableByName)]
pub(crate) struct KeyedSessionRow {
    #[diesel(sql_type = Text)]
    pub(crate) secret_hash: String,
    #[diesel(sql_type = Text)]
    pub(crate) id: String,
    #[diesel(embed)]
    pub(crate) row: SessionRow,
}
