//! Store operations, written once and stamped out for each backend's
//! connection type by `store_ops!`, with the few dialect differences in
//! small `dialect` modules. Every write is one transaction that first locks
//! the head row of the chain it appends to: that lock serialises the chain
//! (no fork), and since a session's state changes only under its agent's
//! chain lock, it also makes the one-live-session check atomic.

use std::collections::BTreeSet;

use impersonation_core::{AppendGuard, AuditDraft, AuditEvent, ChainHead, SessionId, StoreError};

use crate::rows::{corrupt, micros};
use crate::sql::Sql;

/// What an operation can fail with: a database error (classified by the
/// caller, which may retry) or a store-level outcome.
#[derive(Debug)]
pub(crate) enum OpError {
    Db(diesel::result::Error),
    Store(StoreError),
    /// An append batch gave up waiting for this chain's head row, which
    /// another transaction holds (a row lock; SQLite's whole-database lock
    /// is a `Db` error, retried whole). The batch wrote nothing.
    ChainLocked(impersonation_core::ChainKey),
}

impl From<diesel::result::Error> for OpError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Db(e)
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Deadlocks, serialisation failures and busy databases: the transaction
/// was rolled back and may simply be run again.
pub(crate) fn retryable(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match e {
        Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
        Error::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("deadlock")
                || m.contains("Deadlock")
                || m.contains("database is locked")
                || m.contains("Lock wait timeout")
        }
        _ => false,
    }
}

/// Whether a statement gave up waiting for a lock another transaction
/// holds (PostgreSQL's `lock_timeout`, InnoDB's lock wait, SQLite's busy
/// timeout).
pub(crate) fn lock_timed_out(e: &diesel::result::Error) -> bool {
    match e {
        diesel::result::Error::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("lock timeout")
                || m.contains("Lock wait timeout")
                || m.contains("database is locked")
        }
        _ => false,
    }
}

/// The sessions whose idle touch last waited out the lock timeout, by the
/// hash of the secret they were looked up by, each with the time (the
/// touch's `now`) until which their touches are left out.
///
/// Such a touch met a row another transaction holds: one a host that died
/// mid-write left open, say, which the server keeps until TCP notices
/// (minutes; hours without keepalives). Without this, every lookup batch
/// asking for that session waited `busy_timeout` again, and every other
/// request in the batch with it. With it, such a row costs one wait per
/// window. The window is at most [`HeldTouches::WINDOW`] and a quarter of
/// the session's idle timeout, and ends at least that long before the
/// session's idle deadline: the next request after it still touches in
/// time, so a session in use does not idle out for a touch left out.
/// Every session whose touch was in the statement that timed out is noted
/// (the database does not say which row held it up): a batch-mate's touch
/// waits out the window too. (No `Debug`: it would print secret hashes.)
#[derive(Default)]
pub(crate) struct HeldTouches(
    std::sync::Mutex<std::collections::HashMap<String, time::OffsetDateTime>>,
);

impl HeldTouches {
    /// The longest a touch is left out after it timed out.
    pub(crate) const WINDOW: time::Duration = time::Duration::seconds(30);

    fn entries(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, time::OffsetDateTime>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any of `hashes` (hex) has its touch left out at `now`;
    /// forgets the entries whose window has passed.
    pub(crate) fn any(
        &self,
        hashes: &[impersonation_core::SecretHash],
        now: time::OffsetDateTime,
    ) -> bool {
        let mut entries = self.entries();
        if entries.is_empty() {
            return false;
        }
        entries.retain(|_, until| *until > now);
        !entries.is_empty() && hashes.iter().any(|h| entries.contains_key(&h.to_hex()))
    }

    /// Whether the touch of the session looked up by `hash` (hex) is left
    /// out at `now`.
    pub(crate) fn skips(&self, hash: &str, now: time::OffsetDateTime) -> bool {
        self.entries().get(hash).is_some_and(|until| *until > now)
    }

    /// Leaves out the touches of `sessions` (the hash hex of each, its
    /// idle timeout and its idle deadline) from `now` on, each for its
    /// window; forgets the entries whose window has passed.
    pub(crate) fn note<'a>(
        &self,
        sessions: impl IntoIterator<Item = (&'a str, time::Duration, time::OffsetDateTime)>,
        now: time::OffsetDateTime,
    ) {
        let mut entries = self.entries();
        entries.retain(|_, until| *until > now);
        for (hash, idle_timeout, idle_deadline) in sessions {
            let window = Self::WINDOW.min(idle_timeout / 4_i32);
            let until = now
                .saturating_add(window)
                .min(idle_deadline.saturating_sub(window));
            if until > now {
                entries.insert(hash.to_owned(), until);
            }
        }
    }
}

#[allow(dead_code)] // each dialect uses only what its backend needs
pub(crate) mod dialect {
    pub(crate) mod postgres {
        /// The coalescing a touch applies to a session, given the asked
        /// one (`?`): at most half the session's idle timeout.
        pub(crate) const COALESCE: &str = "LEAST(?, idle_us / 2)";
        pub(crate) const LOCK: &str = " FOR UPDATE";
        pub(crate) const UPSERT_CHAIN: &str = "INSERT INTO impersonation_audit_chains (chain, seq, hash) VALUES (?, -1, '') ON CONFLICT (chain) DO NOTHING";
        /// Lock first: an upsert on an existing row takes no lock here.
        pub(crate) const UPSERT_FIRST: bool = false;
        /// Find and touch in one statement (a data-modifying CTE).
        pub(crate) const ONE_STATEMENT_TOUCH: bool = true;
        /// The column a live session's agent is matched on (with
        /// `state IN ('pending', 'active')`, the partial index's condition).
        pub(crate) const LIVE_AGENT: &str = "agent";
        /// The partial indexes' condition says it already.
        pub(crate) const ALL_LIVE: &str = "";
    }
    pub(crate) mod mysql {
        /// The coalescing a touch applies to a session, given the asked
        /// one (`?`): at most half the session's idle timeout.
        pub(crate) const COALESCE: &str = "LEAST(?, idle_us DIV 2)";
        pub(crate) const LOCK: &str = " FOR UPDATE";
        pub(crate) const UPSERT_CHAIN: &str =
            "INSERT IGNORE INTO impersonation_audit_chains (chain, seq, hash) VALUES (?, -1, '')";
        /// Lock first: INSERT IGNORE on an existing key takes a shared lock,
        /// and two of those upgrading to exclusive would deadlock.
        pub(crate) const UPSERT_FIRST: bool = false;
        pub(crate) const ONE_STATEMENT_TOUCH: bool = false;
        /// The generated column under the one-live-session index (`agent`
        /// has no index of its own here: matched on it, a start's locking
        /// read scans every session ever held).
        pub(crate) const LIVE_AGENT: &str = "live_agent";
        /// What narrows a listing of every live session to an index: the
        /// one-live-session index holds NULL for every ended session, so
        /// its non-NULL range is the live ones (`state` has no index of
        /// its own here, and matched on it alone, the listing reads every
        /// session ever held).
        pub(crate) const ALL_LIVE: &str = " AND live_agent IS NOT NULL";
    }
    pub(crate) mod sqlite {
        /// The coalescing a touch applies to a session, given the asked
        /// one (`?`): at most half the session's idle timeout.
        pub(crate) const COALESCE: &str = "MIN(?, idle_us / 2)";
        /// SQLite locks the whole database for a writer; no row locks.
        pub(crate) const LOCK: &str = "";
        pub(crate) const UPSERT_CHAIN: &str = "INSERT INTO impersonation_audit_chains (chain, seq, hash) VALUES (?, -1, '') ON CONFLICT (chain) DO NOTHING";
        /// Write first, so the transaction takes the write lock at once
        /// (waiting on busy_timeout) instead of failing to upgrade later.
        pub(crate) const UPSERT_FIRST: bool = true;
        pub(crate) const ONE_STATEMENT_TOUCH: bool = false;
        pub(crate) const LIVE_AGENT: &str = "agent";
        /// The partial indexes' condition says it already.
        pub(crate) const ALL_LIVE: &str = "";
    }
}

pub(crate) fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A sealed event with its record (`AuditEvent::to_record`), the text its
/// `event` column keeps, written in the pass that computed its hash.
#[derive(Clone)]
pub(crate) struct Sealed {
    pub(crate) event: AuditEvent,
    pub(crate) record: String,
}

impl Sealed {
    /// Seals `draft` after `head`.
    pub(crate) fn new(draft: AuditDraft, head: Option<ChainHead>) -> Result<Self, OpError> {
        let (event, record) = draft.seal_to_record(head).map_err(unrecorded)?;
        Ok(Self { event, record })
    }

    /// An event sealed elsewhere (bench loading).
    pub(crate) fn of(event: AuditEvent) -> Result<Self, OpError> {
        let record = event.to_record().map_err(unrecorded)?;
        Ok(Self { event, record })
    }
}

/// An event's record could not be written (it cannot happen for the
/// plain data an event holds; a typed error all the same).
fn unrecorded(e: serde_json::Error) -> OpError {
    OpError::Store(corrupt("audit event", e))
}

/// Binds an event's ten columns, in the order of the INSERTs.
pub(crate) fn event_args(sql: Sql, sealed: &Sealed) -> Result<Sql, OpError> {
    let event = &sealed.event;
    Ok(sql
        .arg(event.id.to_string())
        .arg(event.chain.as_str())
        .arg(count(event.seq))
        .arg(micros(event.at))
        .arg(event.action.code())
        .arg(event.actor.id().map(|a| a.as_str().to_owned()))
        .arg(event.subject.as_ref().map(|s| s.id.as_str().to_owned()))
        .arg(event.tenant.as_ref().map(|t| t.as_str().to_owned()))
        .arg(event.session.map(|s| s.to_string()))
        .arg(sealed.record.clone()))
}

/// Appends `(?, ...), (?, ...)` for `events`, binding each event's columns.
pub(crate) fn event_rows<'a>(
    mut sql: Sql,
    events: impl IntoIterator<Item = &'a Sealed>,
) -> Result<Sql, OpError> {
    let mut rows = 0;
    for (i, event) in events.into_iter().enumerate() {
        rows = i + 1;
        sql.push(if i == 0 {
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        });
        sql = event_args(sql, event)?;
    }
    sql.list(rows);
    Ok(sql)
}

/// The view entries of `events` (one append's, on one chain, in chain
/// order: see [`impersonation_core::views`]) as `(?, ...), (?, ...)` rows
/// of `impersonation_audit_runs`; `None` for no events.
pub(crate) fn run_rows<'a>(
    mut sql: Sql,
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> Option<Sql> {
    let events: Vec<&AuditEvent> = events.into_iter().collect();
    let runs = impersonation_core::views::view_runs(&events);
    if runs.is_empty() {
        return None;
    }
    sql.list(runs.len());
    for (i, run) in runs.into_iter().enumerate() {
        sql.push(if i == 0 {
            "(?, ?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?, ?)"
        });
        sql = sql
            .arg(run.view.code())
            .arg(run.key)
            .arg(run.first_at_us)
            .arg(run.chain.as_str())
            .arg(count(run.first_seq))
            .arg(count(run.last_seq));
    }
    Some(sql)
}

/// The `INSERT` of `impersonation_audit_runs`, up to its `VALUES`.
pub(crate) const INSERT_RUNS: &str = "INSERT INTO impersonation_audit_runs \
     (view_name, view_key, first_us, chain, first_seq, last_seq) VALUES ";

/// The sessions whose activity guards some append of `batch`.
pub(crate) fn guarded_sessions(batch: &[(AuditDraft, AppendGuard)]) -> BTreeSet<SessionId> {
    batch
        .iter()
        .filter_map(|(_, g)| match g {
            AppendGuard::SessionActive(id) => Some(*id),
            AppendGuard::None => None,
        })
        .collect()
}

/// `(?, ?, ...)` with `n` markers.
pub(crate) fn markers(sql: &mut Sql, n: usize) {
    sql.list(n);
    sql.push("(");
    for i in 0..n {
        sql.push(if i == 0 { "?" } else { ", ?" });
    }
    sql.push(")");
}

/// One statement that appends `events` (sealed after `expected`, all on
/// one chain) if the chain's head is still `expected` and every `guarded`
/// session is active, and otherwise writes nothing: it inserts all the
/// events or none. PostgreSQL only (a data-modifying CTE). (Passing the rows
/// as one JSON parameter, for a statement text that never varies, measured
/// about 10% slower than this VALUES list.)
pub(crate) fn cas_sql(
    expected: ChainHead,
    events: &[Sealed],
    guarded: &BTreeSet<SessionId>,
) -> Result<Sql, OpError> {
    let (Some(first), Some(last)) = (
        events.first().map(|s| &s.event),
        events.last().map(|s| &s.event),
    ) else {
        return Err(OpError::Store(StoreError::Corrupt("an empty batch".into())));
    };
    let mut sql = Sql::new(
        "WITH head AS (UPDATE impersonation_audit_chains SET seq = ?, hash = ? \
         WHERE chain = ? AND seq = ? AND hash = ?",
    )
    .arg(count(last.seq))
    .arg(last.hash.to_hex())
    .arg(first.chain.as_str())
    .arg(count(expected.seq))
    .arg(expected.hash.to_hex());
    if !guarded.is_empty() {
        // Only the chain's own sessions: their state changes move its head.
        sql.push(
            " AND (SELECT count(*) FROM impersonation_sessions WHERE state = 'active' AND agent = ? AND id IN ",
        );
        sql = sql.arg(first.chain.as_str());
        markers(&mut sql, guarded.len());
        for id in guarded {
            sql = sql.arg(id.to_string());
        }
        sql.push(") = ?");
        sql = sql.arg(i64::try_from(guarded.len()).unwrap_or(i64::MAX));
    }
    sql.push(
        " RETURNING chain), appended AS (INSERT INTO impersonation_audit_events \
         (id, chain, seq, at_us, action, actor, subject, tenant, session_id, event) \
         SELECT v.* FROM (VALUES ",
    );
    let mut sql = event_rows(sql, events)?;
    sql.push(
        ") AS v WHERE EXISTS (SELECT 1 FROM head)) \
         INSERT INTO impersonation_audit_runs \
         (view_name, view_key, first_us, chain, first_seq, last_seq) \
         SELECT r.* FROM (VALUES ",
    );
    let mut sql = run_rows(sql, events.iter().map(|s| &s.event))
        .ok_or_else(|| OpError::Store(StoreError::Corrupt("an empty batch".into())))?;
    // The runs go in exactly when the events do (both hang on the head's
    // update), so the rows this statement reports say whether they did.
    sql.push(") AS r WHERE EXISTS (SELECT 1 FROM head)");
    Ok(sql)
}

macro_rules! store_ops {
    ($module:ident, $conn:ty, $dialect:ident) => {
        pub(crate) mod $module {
            use diesel_async::AsyncConnection;
            use impersonation_core::{
                AppendGuard, AuditDraft, AuditEvent, AuditPage, AuditQuery, ChainHead, DecodedSessions,
                ChainKey, LiveFilter, Order, SecretHash, Session, SessionId, ShadowUser, Start,
                StartOutcome, StoreError, Touch, Transition,
            };
            use std::collections::{BTreeMap, BTreeSet, HashMap};

            use time::OffsetDateTime;

            use crate::ops::{OpError, Sealed, count, event_rows, guarded_sessions, markers};
            use crate::ops::dialect::$dialect as d;
            use crate::rows::{
                EventRow, HeadRow, IdRow, IdStateRow, KeyRow, KeyedSessionRow, RunRow, SessionColumns, SessionRow, StateRow,
                VersionRow, micros, to_json,
            };
            use crate::sql::Sql;

            type Conn = $conn;

            const SESSION_COLUMNS: &str = "record, shadow, last_seen_us, last_checked_us, version";

            fn corrupt(what: &str, e: impl std::fmt::Display) -> OpError {
                OpError::Store(StoreError::Corrupt(format!("{what}: {e}")))
            }

            async fn head_row(conn: &mut Conn, chain: &ChainKey) -> Result<Option<HeadRow>, OpError> {
                let sql = Sql::new(format!("SELECT seq, hash FROM impersonation_audit_chains WHERE chain = ?{}", d::LOCK))
                    .arg(chain.as_str());
                Ok(sql.load::<HeadRow>(conn).await?.into_iter().next())
            }

            /// Locks the chain's head row (creating it if needed) and returns the head.
            async fn lock_chain(conn: &mut Conn, chain: &ChainKey) -> Result<Option<ChainHead>, OpError> {
                if d::UPSERT_FIRST {
                    Sql::new(d::UPSERT_CHAIN).arg(chain.as_str()).execute(conn).await?;
                }
                let row = match head_row(conn, chain).await? {
                    Some(row) => row,
                    None => {
                        Sql::new(d::UPSERT_CHAIN).arg(chain.as_str()).execute(conn).await?;
                        head_row(conn, chain)
                            .await?
                            .ok_or_else(|| corrupt("chain head", "vanished after insert"))?
                    }
                };
                Ok(row.into_head()?)
            }

            async fn append_sealed(conn: &mut Conn, sealed: &Sealed) -> Result<(), OpError> {
                insert_events(conn, &[sealed]).await?;
                set_head(conn, &sealed.event).await
            }

            /// Inserts events in one statement (one row each).
            async fn insert_events(conn: &mut Conn, events: &[&Sealed]) -> Result<(), OpError> {
                if events.is_empty() {
                    return Ok(());
                }
                let sql = Sql::new(
                    "INSERT INTO impersonation_audit_events \
                     (id, chain, seq, at_us, action, actor, subject, tenant, session_id, event) VALUES ",
                );
                event_rows(sql, events.iter().copied())?.execute(conn).await?;
                // Their view entries: one batch's events are on one chain
                // each, in chain order, so group them by chain.
                let mut chains: Vec<&ChainKey> = events.iter().map(|s| &s.event.chain).collect();
                chains.sort();
                chains.dedup();
                for chain in chains {
                    let of_chain = events.iter().map(|s| &s.event).filter(|e| &e.chain == chain);
                    if let Some(sql) = crate::ops::run_rows(Sql::new(crate::ops::INSERT_RUNS), of_chain) {
                        sql.execute(conn).await?;
                    }
                }
                Ok(())
            }


            /// Moves the chain's head row to `event`.
            async fn set_head(conn: &mut Conn, event: &AuditEvent) -> Result<(), OpError> {
                Sql::new("UPDATE impersonation_audit_chains SET seq = ?, hash = ? WHERE chain = ?")
                    .arg(count(event.seq))
                    .arg(event.hash.to_hex())
                    .arg(event.chain.as_str())
                    .execute(conn)
                    .await?;
                Ok(())
            }

            async fn insert_session(conn: &mut Conn, s: &Session) -> Result<(), OpError> {
                let c = SessionColumns::of(s)?;
                Sql::new(
                    "INSERT INTO impersonation_sessions \
                     (id, agent, subject, tenant, state, secret_hash, created_us, expires_us, idle_us, \
                      last_seen_us, last_checked_us, version, record, shadow) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .arg(c.id)
                .arg(c.agent)
                .arg(c.subject)
                .arg(c.tenant)
                .arg(c.state)
                .arg(c.secret_hash)
                .arg(c.created_us)
                .arg(c.expires_us)
                .arg(c.idle_us)
                .arg(c.last_seen_us)
                .arg(c.last_checked_us)
                .arg(c.version)
                .arg(c.record)
                .arg(c.shadow)
                .execute(conn)
                .await?;
                Ok(())
            }

            /// Bench baseline: a bare single-row SELECT by a unique key.
            pub(crate) async fn baseline_select(conn: &mut Conn, hash: &str) -> Result<usize, OpError> {
                Ok(Sql::new("SELECT id FROM impersonation_sessions WHERE secret_hash = ?")
                    .arg(hash)
                    .load::<IdRow>(conn)
                    .await?
                    .len())
            }

            /// Bench baseline: a bare single-row INSERT.
            pub(crate) async fn baseline_insert(conn: &mut Conn, id: &str) -> Result<(), OpError> {
                Sql::new("INSERT INTO impersonation_bench_rows (id, body) VALUES (?, ?)")
                    .arg(id)
                    .arg("a row of about the size of a session record's columns")
                    .execute(conn)
                    .await?;
                Ok(())
            }

            /// Bench setup: the scratch table of the INSERT baseline.
            pub(crate) async fn bench_prepare(conn: &mut Conn) -> Result<(), OpError> {
                Sql::new("CREATE TABLE IF NOT EXISTS impersonation_bench_rows (id VARCHAR(64) PRIMARY KEY, body TEXT NOT NULL)")
                    .execute(conn)
                    .await?;
                Ok(())
            }

            /// Bench setup: appends already-sealed events in bulk, many rows
            /// per statement, and moves each chain's head to its last event.
            pub(crate) async fn bulk_append(conn: &mut Conn, events: &[AuditEvent]) -> Result<(), OpError> {
                conn.transaction::<_, OpError, _>(async |conn| {
                    for batch in events.chunks(500) {
                        let sealed = batch.iter().cloned().map(Sealed::of).collect::<Result<Vec<_>, _>>()?;
                        let batch: Vec<&Sealed> = sealed.iter().collect();
                        insert_events(conn, &batch).await?;
                    }
                    let mut heads: std::collections::BTreeMap<&ChainKey, &AuditEvent> = std::collections::BTreeMap::new();
                    for e in events {
                        heads.insert(&e.chain, e);
                    }
                    for e in heads.values() {
                        lock_chain(conn, &e.chain).await?;
                        set_head(conn, e).await?;
                    }
                    Ok(())
                })
                .await
            }

            pub(crate) async fn ping(conn: &mut Conn) -> Result<(), OpError> {
                Sql::new("SELECT 1").execute(conn).await?;
                Ok(())
            }

            pub(crate) async fn start(conn: &mut Conn, start: &Start) -> Result<StartOutcome, OpError> {
                conn.transaction::<_, OpError, _>(async |conn| {
                    let session = start.session();
                    let head = lock_chain(conn, &session.chain()).await?;
                    let live = Sql::new(format!(
                        "SELECT id FROM impersonation_sessions WHERE {} = ? AND state IN ('pending', 'active'){}",
                        d::LIVE_AGENT,
                        d::LOCK
                    ))
                    .arg(session.agent.id.as_str())
                    .load::<IdRow>(conn)
                    .await?;
                    if let Some(row) = live.into_iter().next() {
                        let live: SessionId = row.id.parse().map_err(|e| corrupt("session id", e))?;
                        let sealed = Sealed::new(start.refusal().clone(), head)?;
                        append_sealed(conn, &sealed).await?;
                        return Ok(StartOutcome::Refused { live, event: sealed.event });
                    }
                    insert_session(conn, session).await?;
                    let sealed = Sealed::new(start.event().clone(), head)?;
                    append_sealed(conn, &sealed).await?;
                    Ok(StartOutcome::Started {
                        session: Box::new(session.clone()),
                        event: sealed.event,
                    })
                })
                .await
            }

            pub(crate) async fn transition(conn: &mut Conn, t: &Transition) -> Result<(Session, AuditEvent), OpError> {
                conn.transaction::<_, OpError, _>(async |conn| {
                    let next = t.next();
                    let head = lock_chain(conn, &next.chain()).await?;
                    let current = Sql::new(format!("SELECT version FROM impersonation_sessions WHERE id = ?{}", d::LOCK))
                        .arg(next.id.to_string())
                        .load::<VersionRow>(conn)
                        .await?;
                    let Some(current) = current.into_iter().next() else {
                        return Err(OpError::Store(StoreError::SessionNotFound(next.id)));
                    };
                    if current.version != count(t.expected_version()) {
                        return Err(OpError::Store(StoreError::Conflict(next.id)));
                    }
                    let c = SessionColumns::of(next)?;
                    Sql::new(
                        "UPDATE impersonation_sessions SET state = ?, expires_us = ?, last_seen_us = ?, \
                         last_checked_us = ?, version = ?, record = ?, shadow = ? WHERE id = ?",
                    )
                    .arg(c.state)
                    .arg(c.expires_us)
                    .arg(c.last_seen_us)
                    .arg(c.last_checked_us)
                    .arg(c.version)
                    .arg(c.record)
                    .arg(c.shadow)
                    .arg(c.id)
                    .execute(conn)
                    .await?;
                    let sealed = Sealed::new(t.event().clone(), head)?;
                    append_sealed(conn, &sealed).await?;
                    Ok((next.clone(), sealed.event))
                })
                .await
            }

            pub(crate) async fn append(conn: &mut Conn, draft: &AuditDraft, guard: AppendGuard) -> Result<AuditEvent, OpError> {
                conn.transaction::<_, OpError, _>(async |conn| {
                    let head = lock_chain(conn, &draft.chain).await?;
                    if let AppendGuard::SessionActive(id) = guard {
                        // Under the agent's chain lock the state of the agent's
                        // session cannot change; another agent's session
                        // cannot guard the event (`AppendGuard`).
                        let state = Sql::new("SELECT state FROM impersonation_sessions WHERE id = ? AND agent = ?")
                            .arg(id.to_string())
                            .arg(draft.chain.as_str())
                            .load::<StateRow>(conn)
                            .await?;
                        match state.into_iter().next() {
                            None => return Err(OpError::Store(StoreError::SessionNotFound(id))),
                            Some(row) if row.state != "active" => {
                                return Err(OpError::Store(StoreError::SessionNotActive(id)));
                            }
                            Some(_) => {}
                        }
                    }
                    let sealed = Sealed::new(draft.clone(), head)?;
                    append_sealed(conn, &sealed).await?;
                    Ok(sealed.event)
                })
                .await
            }

            /// A batch of appends in one transaction: each chain's head row is
            /// locked once, in key order (so two batches cannot deadlock), each
            /// guarded session is read once under those locks, and every event
            /// goes into one INSERT.
            pub(crate) async fn append_batch(
                conn: &mut Conn,
                batch: &[(AuditDraft, AppendGuard)],
            ) -> Result<Vec<Result<AuditEvent, StoreError>>, OpError> {
                conn.transaction::<_, OpError, _>(async |conn| {
                    let mut heads: BTreeMap<&ChainKey, Option<ChainHead>> =
                        batch.iter().map(|(d, _)| (&d.chain, None)).collect();
                    for (chain, head) in heads.iter_mut() {
                        // Every lock comes before any write: a chain whose
                        // row another transaction holds past the lock
                        // timeout fails the batch with nothing written,
                        // naming the chain, for the caller to append the
                        // others without it.
                        *head = match lock_chain(conn, chain).await {
                            Err(OpError::Db(e)) if !d::LOCK.is_empty() && crate::ops::lock_timed_out(&e) => {
                                return Err(OpError::ChainLocked((*chain).clone()));
                            }
                            other => other?,
                        };
                    }
                    let guarded = guarded_sessions(batch);
                    // Each guarding session's agent and state.
                    let mut states: HashMap<String, (String, String)> = HashMap::new();
                    if !guarded.is_empty() {
                        let mut sql = Sql::new("SELECT id, agent, state FROM impersonation_sessions WHERE id IN ");
                        markers(&mut sql, guarded.len());
                        for id in &guarded {
                            sql = sql.arg(id.to_string());
                        }
                        for row in sql.load::<IdStateRow>(conn).await? {
                            states.insert(row.id, (row.agent, row.state));
                        }
                    }
                    let mut results = Vec::with_capacity(batch.len());
                    for (draft, guard) in batch {
                        if let AppendGuard::SessionActive(id) = guard {
                            // Only a session of the event's own chain guards it.
                            let state = states
                                .get(&id.to_string())
                                .filter(|(agent, _)| agent.as_str() == draft.chain.as_str())
                                .map(|(_, state)| state.as_str());
                            match state {
                                None => {
                                    results.push(Err(StoreError::SessionNotFound(*id)));
                                    continue;
                                }
                                Some("active") => {}
                                Some(_) => {
                                    results.push(Err(StoreError::SessionNotActive(*id)));
                                    continue;
                                }
                            }
                        }
                        let head = heads
                            .get_mut(&draft.chain)
                            .ok_or_else(|| corrupt("chain head", "not locked"))?;
                        let sealed = Sealed::new(draft.clone(), *head)?;
                        *head = Some(sealed.event.head());
                        results.push(Ok(sealed));
                    }
                    let sealed: Vec<&Sealed> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
                    insert_events(conn, &sealed).await?;
                    // The last event of each chain is its new head.
                    let mut last: BTreeMap<&ChainKey, &AuditEvent> = BTreeMap::new();
                    for s in &sealed {
                        last.insert(&s.event.chain, &s.event);
                    }
                    for event in last.values() {
                        set_head(conn, event).await?;
                    }
                    Ok(results.into_iter().map(|r| r.map(|s| s.event)).collect())
                })
                .await
            }

            /// [`cas_sql`](crate::ops::cas_sql) on a pooled connection.
            #[allow(dead_code)] // only the PostgreSQL store calls it
            pub(crate) async fn append_cas(
                conn: &mut Conn,
                expected: ChainHead,
                events: &[Sealed],
                guarded: &BTreeSet<SessionId>,
            ) -> Result<bool, OpError> {
                let inserted = crate::ops::cas_sql(expected, events, guarded)?.execute(conn).await?;
                Ok(inserted > 0)
            }

            /// Lookups in one statement (the touch in a second one, or in
            /// the same one on PostgreSQL: its data-modifying CTE runs
            /// whether or not it is read, and the outer SELECT sees the rows
            /// as they were before it).
            pub(crate) async fn find_by_secrets(
                conn: &mut Conn,
                hashes: &[SecretHash],
                touch: Option<Touch>,
                decoded: &DecodedSessions,
                writes: &crate::WriteGate,
                held: &crate::ops::HeldTouches,
            ) -> Result<Vec<Result<Option<Session>, StoreError>>, OpError> {
                if hashes.is_empty() {
                    return Ok(Vec::new());
                }
                let now = touch.map(|t| micros(t.now)).unwrap_or_default();
                let coalesce = touch
                    .map(|t| t.coalesce_micros())
                    .unwrap_or_default();
                // A session whose touch waited out the lock timeout lately
                // is left out of the touch (`HeldTouches`): the statement
                // that touches in the lookup cannot leave it out, so the
                // batch that asks for one touches in a second statement.
                let touch_in_query =
                    d::ONE_STATEMENT_TOUCH && touch.is_some_and(|t| !held.any(hashes, t.now));
                // The touch in the lookup waited out the lock timeout.
                let mut touch_timed_out = false;
                // `head` and the list of the asked hashes.
                let asking = |head: &str| {
                    let mut sql = Sql::new(head);
                    markers(&mut sql, hashes.len());
                    for hash in hashes {
                        sql = sql.arg(hash.to_hex());
                    }
                    sql
                };
                // The lookup alone: a read.
                let plain = || {
                    asking(&format!(
                        "SELECT secret_hash, id, {SESSION_COLUMNS} FROM impersonation_sessions WHERE secret_hash IN "
                    ))
                };
                let rows = if touch_in_query {
                    let mut sql = asking(
                        "WITH prev AS (SELECT id, secret_hash, record, shadow, last_seen_us, last_checked_us, version \
                         FROM impersonation_sessions WHERE secret_hash IN ",
                    );
                    // (`idle_us` in the coalescing is the session's: `prev`
                    // has no such column.) Only the rows whose touch is due
                    // are updated, so only they are locked.
                    sql.push(&format!(
                        "), touched AS (UPDATE impersonation_sessions s SET last_seen_us = ? FROM prev \
                         WHERE s.id = prev.id AND s.state = 'active' AND s.expires_us > ? \
                         AND s.idle_us > ? - s.last_seen_us AND s.last_seen_us <= ? - {} RETURNING s.id) \
                         SELECT secret_hash, id, record, shadow, last_seen_us, last_checked_us, version FROM prev",
                        d::COALESCE
                    ));
                    // `idle_us` may be i64::MAX (never idle): the sums are
                    // written as differences, which cannot overflow BIGINT.
                    sql = sql.arg(now).arg(now).arg(now).arg(now).arg(coalesce);
                    match sql.load::<KeyedSessionRow>(conn).await {
                        Ok(rows) => rows,
                        // A touch that waited out the lock timeout on a row
                        // another transaction holds (a host that died
                        // mid-write holds its locks until TCP notices)
                        // fails no lookup: the rows are read again,
                        // untouched, and their touches are left out for a
                        // while (`HeldTouches`).
                        // (Touches wait for each other, rather than skip a
                        // row one holds, so that the latest one stands.)
                        Err(e) if crate::ops::lock_timed_out(&e) => {
                            tracing::warn!(error = %e, "an idle touch could not be written; the lookup answers without it, and the touch is left out for a while");
                            touch_timed_out = true;
                            plain().load::<KeyedSessionRow>(conn).await?
                        }
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    plain().load::<KeyedSessionRow>(conn).await?
                };
                let asked: HashMap<String, SecretHash> = hashes.iter().map(|h| (h.to_hex(), *h)).collect();
                // Each row decoded on its own: one that cannot be (damaged,
                // or written by a version whose records this one refuses)
                // answers its own lookup as corrupt, not the whole batch,
                // which holds other requests' lookups.
                let mut found: HashMap<String, Result<Session, StoreError>> = HashMap::new();
                // The sessions whose touch is due: their ids, and the
                // hashes they were asked by.
                let mut due = Vec::new();
                for keyed in rows {
                    let session = match asked.get(&keyed.secret_hash) {
                        Some(key) => keyed.row.into_session_via(*key, decoded),
                        None => keyed.row.into_session(),
                    };
                    if (!touch_in_query || touch_timed_out)
                        && let Ok(session) = &session
                        && let Some(t) = touch
                        && t.applies_to(session)
                        && !held.skips(&keyed.secret_hash, t.now)
                    {
                        due.push((keyed.id, keyed.secret_hash.clone()));
                    }
                    found.insert(keyed.secret_hash, session);
                }
                // Leaves out the touches of the `due` sessions for a while.
                let note_held = |due: &[(String, String)]| {
                    if let Some(t) = touch {
                        held.note(
                            due.iter().filter_map(|(_, hash)| {
                                let session = found.get(hash)?.as_ref().ok()?;
                                Some((hash.as_str(), session.grant.idle_timeout, session.idle_deadline()))
                            }),
                            t.now,
                        );
                    }
                };
                if touch_timed_out {
                    note_held(&due);
                } else if !due.is_empty() {
                    // The lookup itself read without waiting; the touch is a write.
                    let _turn = writes.hold().await;
                    let mut sql = Sql::new("UPDATE impersonation_sessions SET last_seen_us = ? WHERE id IN ").arg(now);
                    markers(&mut sql, due.len());
                    for (id, _) in &due {
                        sql = sql.arg(id.clone());
                    }
                    sql.push(&format!(
                        " AND state = 'active' AND expires_us > ? AND idle_us > ? - last_seen_us AND last_seen_us <= ? - {}",
                        d::COALESCE
                    ));
                    // A touch that waited out the lock timeout on a row
                    // another transaction holds fails no lookup: the rows
                    // are read, and their touches are left out for a while
                    // (`HeldTouches`). Any other failure (a lost
                    // connection, a read-only server) is the store's, as
                    // ever.
                    match sql.arg(now).arg(now).arg(now).arg(coalesce).execute(conn).await {
                        Err(e) if crate::ops::lock_timed_out(&e) => {
                            tracing::warn!(error = %e, "an idle touch could not be written; the lookup answers without it, and the touch is left out for a while");
                            note_held(&due);
                        }
                        Err(e) if crate::ops::retryable(&e) => {
                            tracing::warn!(error = %e, "an idle touch could not be written; the lookup answers without it");
                        }
                        other => {
                            other?;
                        }
                    }
                }
                Ok(hashes.iter().map(|h| found.get(&h.to_hex()).cloned().transpose()).collect())
            }

            pub(crate) async fn find_by_secret(
                conn: &mut Conn,
                hash: &SecretHash,
                touch: Option<Touch>,
                decoded: &DecodedSessions,
                writes: &crate::WriteGate,
                held: &crate::ops::HeldTouches,
            ) -> Result<Option<Session>, OpError> {
                let found = find_by_secrets(conn, std::slice::from_ref(hash), touch, decoded, writes, held).await?;
                Ok(found.into_iter().next().transpose()?.flatten())
            }

            pub(crate) async fn session(conn: &mut Conn, id: SessionId) -> Result<Option<Session>, OpError> {
                let row = Sql::new(format!("SELECT {SESSION_COLUMNS} FROM impersonation_sessions WHERE id = ?"))
                    .arg(id.to_string())
                    .load::<SessionRow>(conn)
                    .await?
                    .into_iter()
                    .next();
                Ok(row.map(SessionRow::into_session).transpose()?)
            }

            pub(crate) async fn live_sessions(conn: &mut Conn, filter: &LiveFilter) -> Result<Vec<Session>, OpError> {
                let mut sql = Sql::new(format!(
                    "SELECT {SESSION_COLUMNS} FROM impersonation_sessions WHERE state IN ('pending', 'active')"
                ));
                if let Some(agent) = &filter.agent {
                    sql.push_arg(&format!(" AND {} = ?", d::LIVE_AGENT), agent.as_str());
                }
                if let Some(subject) = &filter.subject {
                    sql.push_arg(" AND subject = ?", subject.as_str());
                }
                if let Some(tenant) = &filter.tenant {
                    sql.push_arg(" AND tenant = ?", tenant.as_str());
                }
                if filter.agent.is_none() && filter.subject.is_none() && filter.tenant.is_none() {
                    sql.push(d::ALL_LIVE);
                }
                sql.push(" ORDER BY id");
                let rows = sql.load::<SessionRow>(conn).await?;
                // A row that does not decode (damage) is logged and left
                // out, so that it does not stop `end_lapsed` or a
                // revocation of all the others; a lookup of that session
                // fails as corrupt, so it serves no one.
                Ok(rows
                    .into_iter()
                    .filter_map(|row| {
                        row.into_session()
                            .inspect_err(|e| tracing::error!(error = %e, "a live session's row does not decode; left out of the listing"))
                            .ok()
                    })
                    .collect())
            }

            pub(crate) async fn record_check(
                conn: &mut Conn,
                id: SessionId,
                version: u64,
                checked_at: OffsetDateTime,
                shadow: &ShadowUser,
            ) -> Result<(), OpError> {
                let updated = Sql::new(
                    "UPDATE impersonation_sessions SET last_checked_us = ?, shadow = ? WHERE id = ? AND version = ?",
                )
                .arg(micros(checked_at))
                .arg(to_json("shadow user", shadow)?)
                .arg(id.to_string())
                .arg(count(version))
                .execute(conn)
                .await?;
                if updated > 0 {
                    return Ok(());
                }
                // MySQL counts only changed rows: an identical update reports
                // 0 yet matched. Tell that apart from a real mismatch.
                let current = Sql::new("SELECT version FROM impersonation_sessions WHERE id = ?")
                    .arg(id.to_string())
                    .load::<VersionRow>(conn)
                    .await?;
                match current.into_iter().next() {
                    None => Err(OpError::Store(StoreError::SessionNotFound(id))),
                    Some(row) if row.version == count(version) => Ok(()),
                    Some(_) => Err(OpError::Store(StoreError::Conflict(id))),
                }
            }

            /// A page of the trail through its view's entries (see
            /// [`impersonation_core::views`]): the entries in time order,
            /// a batch at a time, each run's events read by position, until
            /// no entry still unread can hold an event that belongs on the
            /// page.
            pub(crate) async fn audit(conn: &mut Conn, query: &AuditQuery) -> Result<AuditPage, OpError> {
                use impersonation_core::views::{PageReader, View, entry_bounds};
                let (view, key) = View::for_query(query);
                let (low, high) = entry_bounds(query);
                let (dir, past) = match query.order {
                    Order::Oldest => ("ASC", ">"),
                    Order::Newest => ("DESC", "<"),
                };
                let mut page = PageReader::new(query);
                let batch = page.batch();
                // Where the last batch of runs ended, in the sort order: the
                // next one starts past it (keyset), so a page that needs many
                // batches does not make the database count through the
                // earlier ones again, as an OFFSET would.
                let mut after: Option<(i64, String, i64)> = None;
                loop {
                    let mut sql = Sql::new(
                        "SELECT chain, first_seq, last_seq, first_us FROM impersonation_audit_runs \
                         WHERE view_name = ?",
                    )
                    .arg(view.code());
                    sql.push_arg(" AND view_key = ?", key.clone());
                    if let Some(low) = low {
                        sql.push_arg(" AND first_us >= ?", low);
                    }
                    if let Some(high) = high {
                        sql.push_arg(" AND first_us <= ?", high);
                    }
                    if let Some((us, chain, seq)) = &after {
                        // The plain bound first, for the index's range scan.
                        sql.push_arg(&format!(" AND first_us {past}= ?"), *us);
                        sql.push_arg(&format!(" AND (first_us {past} ?"), *us);
                        sql.push_arg(" OR (first_us = ?", *us);
                        sql.push_arg(&format!(" AND (chain {past} ?"), chain.clone());
                        sql.push_arg(" OR (chain = ?", chain.clone());
                        sql.push_arg(&format!(" AND first_seq {past} ?))))"), *seq);
                    }
                    sql.push(&format!(" ORDER BY first_us {dir}, chain {dir}, first_seq {dir}"));
                    sql.push_arg(" LIMIT ?", count(batch as u64));
                    let runs = sql.load::<RunRow>(conn).await?;
                    after = runs.last().map(|r| (r.first_us, r.chain.clone(), r.first_seq));
                    let mut events = Vec::new();
                    if !runs.is_empty() {
                        let mut sql = Sql::new("SELECT event FROM impersonation_audit_events WHERE ");
                        sql.list(runs.len());
                        for (i, run) in runs.iter().enumerate() {
                            if i > 0 {
                                sql.push(" OR ");
                            }
                            sql.push_arg("(chain = ?", run.chain.clone());
                            sql.push_arg(" AND seq >= ?", run.first_seq);
                            sql.push_arg(" AND seq <= ?)", run.last_seq);
                        }
                        for row in sql.load::<EventRow>(conn).await? {
                            events.push(row.into_event()?);
                        }
                    }
                    let last = runs.last().filter(|_| runs.len() == batch).map(|r| r.first_us);
                    if page.push(events, last) {
                        return Ok(page.finish());
                    }
                }
            }

            pub(crate) async fn chain_events(
                conn: &mut Conn,
                chain: &ChainKey,
                from_seq: u64,
                limit: u32,
            ) -> Result<Vec<AuditEvent>, OpError> {
                let rows = Sql::new("SELECT event FROM impersonation_audit_events WHERE chain = ? AND seq >= ? ORDER BY seq LIMIT ?")
                    .arg(chain.as_str())
                    .arg(count(from_seq))
                    .arg(i64::from(limit))
                    .load::<EventRow>(conn)
                    .await?;
                Ok(rows.into_iter().map(EventRow::into_event).collect::<Result<_, _>>()?)
            }

            pub(crate) async fn chain_head(conn: &mut Conn, chain: &ChainKey) -> Result<Option<ChainHead>, OpError> {
                let row = Sql::new("SELECT seq, hash FROM impersonation_audit_chains WHERE chain = ?")
                    .arg(chain.as_str())
                    .load::<HeadRow>(conn)
                    .await?
                    .into_iter()
                    .next();
                Ok(row.map(HeadRow::into_head).transpose()?.flatten())
            }

            pub(crate) async fn chains(conn: &mut Conn, after: Option<&ChainKey>, limit: u32) -> Result<Vec<ChainKey>, OpError> {
                // The heads name every chain that has one; the events name
                // a chain whose head row was taken away, which must still
                // be listed for `verify_all` to report it. Each side stops
                // at `limit` keys in the order of its index.
                let mut sql = Sql::new("SELECT chain FROM (SELECT chain FROM impersonation_audit_chains WHERE seq >= 0");
                if let Some(after) = after {
                    sql.push_arg(" AND chain > ?", after.as_str());
                }
                sql.push_arg(" ORDER BY chain LIMIT ?) h UNION SELECT chain FROM (SELECT DISTINCT chain FROM impersonation_audit_events", i64::from(limit));
                if let Some(after) = after {
                    sql.push_arg(" WHERE chain > ?", after.as_str());
                }
                sql.push_arg(" ORDER BY chain LIMIT ?) e", i64::from(limit));
                sql.push_arg(" ORDER BY chain LIMIT ?", i64::from(limit));
                let rows = sql.load::<KeyRow>(conn).await?;
                Ok(rows.into_iter().map(|r| ChainKey::from_stored(r.chain)).collect())
            }
        }
    };
}

#[cfg(feature = "postgres")]
store_ops!(pg, diesel_async::AsyncPgConnection, postgres);
#[cfg(feature = "mysql")]
store_ops!(mysql, diesel_async::AsyncMysqlConnection, mysql);
#[cfg(feature = "sqlite")]
store_ops!(sqlite, crate::SqliteConn, sqlite);

#[cfg(test)]
mod tests {
    use super::HeldTouches;
    use impersonation_core::SecretHash;
    use time::{Duration, OffsetDateTime};

    fn hash(n: u8) -> SecretHash {
        SecretHash::from_hex(&format!("{n:02x}").repeat(32)).expect("64 hex digits")
    }

    /// A touch is left out for 30 s, or a quarter of the session's idle
    /// timeout if that is shorter (a touch coalesces at most half of it,
    /// so a session in use cannot idle out meanwhile); then it is
    /// forgotten.
    #[test]
    fn a_touch_is_left_out_for_its_window_then_forgotten() {
        let held = HeldTouches::default();
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let (long, short, other) = (hash(1), hash(2), hash(3));
        let far = t0 + Duration::hours(1);
        held.note(
            [
                (long.to_hex().as_str(), Duration::hours(1), far),
                (short.to_hex().as_str(), Duration::minutes(1), far),
            ],
            t0,
        );
        let at = |s: i64| t0 + Duration::seconds(s);
        assert!(held.skips(&long.to_hex(), at(29)));
        assert!(!held.skips(&long.to_hex(), at(30)));
        assert!(held.skips(&short.to_hex(), at(14)));
        assert!(!held.skips(&short.to_hex(), at(15)));
        assert!(!held.skips(&other.to_hex(), at(0)));
        assert!(held.any(&[other, short], at(14)));
        assert!(!held.any(&[other], at(14)));
        // Past the windows the entries go.
        assert!(!held.any(&[long, short], at(30)));
        assert!(held.entries().is_empty());
    }

    /// A session near its idle deadline gets a shorter window, or none:
    /// the window ends at least its own length before the deadline, so the
    /// next request after it still touches in time. (Idle timeout 2 min,
    /// last seen at 0, looked up at 100 s: a window to 130 s would let it
    /// idle out at 120 s although it was in use.)
    #[test]
    fn a_touch_near_the_idle_deadline_is_not_left_out_past_it() {
        let held = HeldTouches::default();
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let at = |s: i64| t0 + Duration::seconds(s);
        let (late, early) = (hash(1), hash(2));
        held.note(
            [
                (late.to_hex().as_str(), Duration::minutes(2), at(120)),
                (early.to_hex().as_str(), Duration::minutes(2), at(120)),
            ],
            at(100),
        );
        assert!(!held.skips(&late.to_hex(), at(100)));
        assert!(held.entries().is_empty(), "nothing to leave out");
        held.note(
            [(early.to_hex().as_str(), Duration::minutes(2), at(120))],
            at(80),
        );
        assert!(held.skips(&early.to_hex(), at(89)));
        assert!(!held.skips(&early.to_hex(), at(90)));
        // Noting forgets the windows that have passed (on MySQL and
        // SQLite nothing else does).
        held.note(
            [(late.to_hex().as_str(), Duration::minutes(2), at(300))],
            at(95),
        );
        assert_eq!(held.entries().len(), 1);
    }
}
