//! The storage contract. Any backend implements [`Store`]; the testkit's
//! conformance suite and state-machine test check that it keeps every promise.

use std::fmt;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::audit::{AuditAction, AuditDraft, AuditEvent, ChainHead, ChainKey};
use crate::id::{EventId, SessionId, TenantId, UserId};
use crate::projection::ShadowUser;
use crate::secret::{SecretHash, SecretLookup};
use crate::session::{Session, Start, Transition};

/// A backend's error, shared so that one failed call can answer every
/// caller it carried (see [`Store::append_batch`]).
pub type BackendError = std::sync::Arc<dyn std::error::Error + Send + Sync>;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No session with that id.
    #[error("session {0} not found")]
    SessionNotFound(SessionId),
    /// The session changed since the transition was computed (version mismatch).
    #[error("session {0} changed concurrently")]
    Conflict(SessionId),
    /// An append required an active session and the session is not active.
    #[error("session {0} is not active")]
    SessionNotActive(SessionId),
    /// The backend cannot be reached or failed mid-operation. Nothing is
    /// assumed written; callers fail closed.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BackendError),
    /// A stored row could not be read back (corruption, schema drift).
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Wraps a backend error as unavailability.
    pub fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(std::sync::Arc::new(error))
    }

    /// Unavailability described by a message (no underlying error value).
    pub fn unavailable_because(message: impl Into<String>) -> Self {
        let boxed: Box<dyn std::error::Error + Send + Sync> = message.into().into();
        Self::Unavailable(boxed.into())
    }
}

/// What a store did with a [`Start`].
#[derive(Debug, Clone)]
pub enum StartOutcome {
    /// The session and its event were written.
    Started {
        /// The stored session.
        session: Box<Session>,
        /// Its sealed event.
        event: AuditEvent,
    },
    /// The agent already had a live session; only the refusal event was written.
    Refused {
        /// The agent's live session.
        live: SessionId,
        /// The sealed refusal event.
        event: AuditEvent,
    },
}

/// The idle touch `find_by_secret` may apply in the same round trip.
///
/// A store sets `last_seen_at = now` only when the session is active, not
/// past `expires_at`, not past its idle deadline (`last_seen_at +
/// grant.idle_timeout`), and `last_seen_at + min(coalesce,
/// grant.idle_timeout / 2) <= now` (a longer coalescing would let a busy
/// session idle out). It returns the record as it was *before* the touch,
/// so the caller judges expiry on it. [`Touch::applies_to`] is the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    /// The time of the request.
    pub now: OffsetDateTime,
    /// Skip the write when the last one is more recent than this (or than
    /// half the session's idle timeout, if that is shorter).
    pub coalesce: Duration,
}

impl Touch {
    /// Whether a store should write this touch on `session`.
    pub fn applies_to(&self, session: &Session) -> bool {
        session.state == crate::session::SessionState::Active
            && self.now < session.expires_at
            && self.now < session.idle_deadline()
            && session
                .last_seen_at
                .saturating_add(self.coalesce_for(session))
                <= self.now
    }

    /// The coalescing that applies to `session`: at most half its idle
    /// timeout.
    pub fn coalesce_for(&self, session: &Session) -> Duration {
        self.coalesce.min(session.grant.idle_timeout / 2_i32)
    }

    /// The coalescing asked, in whole microseconds for a store's own
    /// arithmetic (SQL, a script): held within ±2⁶² µs (146,000 years),
    /// so that no sum or difference with a time in microseconds overflows
    /// 64 bits, and it means what the window itself means for any time a
    /// session holds; its sign kept (a negative window is always due).
    /// Rounded up to the next microsecond: session times are whole
    /// microseconds, so `last_seen + window <= now` holds exactly when it
    /// holds with the window rounded up, never a part of one sooner.
    pub fn coalesce_micros(&self) -> i64 {
        const BOUND: i128 = 1 << 62;
        let nanos = self.coalesce.whole_nanoseconds();
        let up = nanos.div_euclid(1_000) + i128::from(nanos.rem_euclid(1_000) != 0);
        let clamped = up.clamp(-BOUND, BOUND);
        i64::try_from(clamped).unwrap_or_default()
    }
}

/// How many batched calls of each kind a store serves at once (see
/// [`Store::batching`]); `0` for a kind means no batching for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batching {
    /// [`Store::append_batch`] calls in flight at once.
    pub appends: usize,
    /// [`Store::find_by_secrets`] calls in flight at once.
    pub lookups: usize,
}

impl Batching {
    /// No batching: one store call per append and per lookup.
    pub const OFF: Self = Self {
        appends: 0,
        lookups: 0,
    };
}

/// A condition on an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendGuard {
    /// Append unconditionally (denied attempts outside any session).
    None,
    /// Append only while this session is active, atomically with the check.
    /// The session is one of the event's own chain (its agent's): a store
    /// answers [`StoreError::SessionNotFound`] for a session of another
    /// chain, whose state the chain's write does not hold still (and which a
    /// store that keeps each agent's data apart, in one shard, cannot see).
    SessionActive(SessionId),
}

/// Which live (pending or active) sessions to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveFilter {
    /// Of this agent.
    pub agent: Option<UserId>,
    /// On this customer.
    pub subject: Option<UserId>,
    /// In this tenant.
    pub tenant: Option<TenantId>,
}

impl LiveFilter {
    /// Whether a session matches (live-ness aside).
    pub fn matches(&self, s: &Session) -> bool {
        self.agent.as_ref().is_none_or(|a| *a == s.agent.id)
            && self.subject.as_ref().is_none_or(|u| *u == s.subject.id)
            && self.tenant.as_ref().is_none_or(|t| t == s.tenant())
    }
}

/// Order of an audit query.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Oldest first.
    #[default]
    Oldest,
    /// Newest first.
    Newest,
}

/// Where a page of audit results ended: the last event's time and id.
/// Opaque to clients ([`AuditCursor::encode`]); stores compare by `(at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuditCursor {
    /// The last event's time.
    pub at: OffsetDateTime,
    /// The last event's id.
    pub id: EventId,
}

/// A cursor string that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid audit cursor")]
pub struct CursorError;

impl AuditCursor {
    /// The cursor after an event.
    pub fn after(event: &AuditEvent) -> Self {
        Self {
            at: event.at,
            id: event.id,
        }
    }

    /// An opaque, URL-safe string.
    pub fn encode(&self) -> String {
        let nanos = self.at.unix_timestamp_nanos();
        URL_SAFE_NO_PAD.encode(format!("{nanos}:{}", self.id.as_uuid().simple()))
    }

    /// Reads a string from [`AuditCursor::encode`].
    pub fn decode(text: &str) -> Result<Self, CursorError> {
        if text.len() > 128 {
            return Err(CursorError);
        }
        let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| CursorError)?;
        let raw = String::from_utf8(raw).map_err(|_| CursorError)?;
        let (nanos, id) = raw.split_once(':').ok_or(CursorError)?;
        let nanos: i128 = nanos.parse().map_err(|_| CursorError)?;
        let at = OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| CursorError)?;
        let id = Uuid::parse_str(id).map_err(|_| CursorError)?;
        Ok(Self {
            at,
            id: EventId::from_uuid(id),
        })
    }
}

impl fmt::Display for AuditCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

/// Largest page a store returns.
pub const MAX_PAGE: u32 = 1_000;

/// A filtered, paginated audit query. Every filter is optional and they combine with AND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Events in this agent's chain.
    pub agent: Option<UserId>,
    /// Events performed by this person.
    pub actor: Option<UserId>,
    /// Events about this impersonated customer.
    pub subject: Option<UserId>,
    /// Events in this tenant.
    pub tenant: Option<TenantId>,
    /// Events of this session.
    pub session: Option<SessionId>,
    /// Events of this action.
    pub action: Option<AuditAction>,
    /// At or after.
    pub since: Option<OffsetDateTime>,
    /// Strictly before.
    pub until: Option<OffsetDateTime>,
    /// Order of results.
    pub order: Order,
    /// Continue after this cursor.
    pub cursor: Option<AuditCursor>,
    /// Page size (1 to [`MAX_PAGE`]).
    pub limit: u32,
}

impl Default for AuditQuery {
    fn default() -> Self {
        Self {
            agent: None,
            actor: None,
            subject: None,
            tenant: None,
            session: None,
            action: None,
            since: None,
            until: None,
            order: Order::Oldest,
            cursor: None,
            limit: 100,
        }
    }
}

impl AuditQuery {
    /// Every event, oldest first, 100 a page.
    pub fn new() -> Self {
        Self::default()
    }

    /// The page size, clamped to 1..=[`MAX_PAGE`].
    pub fn page_size(&self) -> usize {
        self.limit.clamp(1, MAX_PAGE) as usize
    }

    /// Whether an event passes the filters (the cursor aside).
    pub fn matches(&self, e: &AuditEvent) -> bool {
        self.agent
            .as_ref()
            .is_none_or(|a| e.chain == ChainKey::for_agent(a))
            && self.actor.as_ref().is_none_or(|a| e.actor.id() == Some(a))
            && self
                .subject
                .as_ref()
                .is_none_or(|s| e.subject.as_ref().map(|p| &p.id) == Some(s))
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| e.tenant.as_ref() == Some(t))
            && self.session.is_none_or(|s| e.session == Some(s))
            && self.action.is_none_or(|a| e.action == a)
            && self.since.is_none_or(|t| e.at >= t)
            && self.until.is_none_or(|t| e.at < t)
    }

    /// Whether an event comes after the cursor in this query's order.
    pub fn after_cursor(&self, e: &AuditEvent) -> bool {
        match self.cursor {
            None => true,
            Some(c) => {
                let key = AuditCursor::after(e);
                match self.order {
                    Order::Oldest => key > c,
                    Order::Newest => key < c,
                }
            }
        }
    }
}

/// One page of audit results.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    /// The events, in the query's order.
    pub events: Vec<AuditEvent>,
    /// Where the next page starts; `None` on the last page (a page short
    /// of the page size may have one: see [`Store::audit`]).
    pub next: Option<AuditCursor>,
}

/// Where sessions and the audit trail live.
///
/// The contract, which the testkit's conformance suite checks:
///
/// * **Whole transitions.** [`Store::start`] and [`Store::transition`] write
///   the session change and its audit event together or not at all; there is
///   no method that writes a session state without its event.
/// * **One live session per agent**, enforced atomically by `start`: two
///   racing starts cannot both win; the loser gets its refusal event written.
/// * **Chains.** Each appended event is sealed with [`AuditDraft::seal`] on
///   its chain's current head, inside the same atomic step, so chains never
///   fork. Events are never updated or deleted.
/// * **Secrets.** Only [`SecretHash`]es are stored.
/// * **Versions.** `transition` applies only if the stored version equals
///   [`Transition::expected_version`], else [`StoreError::Conflict`].
/// * **Fail closed.** Any backend failure is an error, never a guess.
#[async_trait]
pub trait Store: Send + Sync {
    /// Creates a session and its start event, or, if the agent already has a
    /// live session, writes only the refusal event.
    async fn start(&self, start: Start) -> Result<StartOutcome, StoreError>;

    /// Applies a state transition and its event, compare-and-set on version.
    async fn transition(&self, transition: Transition)
    -> Result<(Session, AuditEvent), StoreError>;

    /// Appends an event (access, modification, refusal) to its chain.
    async fn append(&self, event: AuditDraft, guard: AppendGuard)
    -> Result<AuditEvent, StoreError>;

    /// Appends several events, each under its own guard, in order, and
    /// returns one result per event in the same order. Each event is judged
    /// alone: a refused guard does not stop the others. A store that can
    /// write a batch in one round trip (one transaction, one script) should
    /// override this and [`Store::batching`]; the default appends one by one.
    async fn append_batch(
        &self,
        batch: Vec<(AuditDraft, AppendGuard)>,
    ) -> Vec<Result<AuditEvent, StoreError>> {
        let mut results = Vec::with_capacity(batch.len());
        for (event, guard) in batch {
            results.push(self.append(event, guard).await);
        }
        results
    }

    /// The per-request lookup: finds a session by secret hash and applies the
    /// idle touch in the same round trip (see [`Touch`]). Returns the record
    /// as it was before the touch.
    async fn find_by_secret(
        &self,
        secret: &SecretLookup,
        touch: Option<Touch>,
    ) -> Result<Option<Session>, StoreError>;

    /// Several [`Store::find_by_secret`] lookups, each touched as `touch`
    /// says; one result per lookup, in order. The default looks them up one
    /// by one; a store that can answer them in one round trip should
    /// override it (see [`Store::batching`]).
    async fn find_by_secrets(
        &self,
        lookups: &[SecretLookup],
        touch: Option<Touch>,
    ) -> Vec<Result<Option<Session>, StoreError>> {
        let mut results = Vec::with_capacity(lookups.len());
        for lookup in lookups {
            results.push(self.find_by_secret(lookup, touch).await);
        }
        results
    }

    /// Group commit: how many [`Store::append_batch`] and
    /// [`Store::find_by_secrets`] calls the service keeps in flight at
    /// once. Callers that arrive while that many are running wait and share
    /// the next call. The default turns it off: every append and lookup is
    /// its own call, which suits a store that answers at once, such as
    /// [`crate::MemoryStore`]. A store whose batched calls cost one round
    /// trip whatever their size says how many it serves in parallel.
    fn batching(&self) -> Batching {
        Batching::OFF
    }

    /// A session by id.
    async fn session(&self, id: SessionId) -> Result<Option<Session>, StoreError>;

    /// Live (pending or active) sessions matching the filter. A session
    /// stored damaged (one whose own lookup fails as
    /// [`StoreError::Corrupt`]) may be left out, logged, so that one
    /// damaged record does not stop `end_lapsed` or a revocation of all
    /// the others; it serves no one, since its lookup fails.
    async fn live_sessions(&self, filter: &LiveFilter) -> Result<Vec<Session>, StoreError>;

    /// Records a passed policy re-check: `last_checked_at` and a refreshed
    /// shadow user, only if the record still has `version` (else `Conflict`).
    /// Not a state change, so no audit event.
    async fn record_check(
        &self,
        id: SessionId,
        version: u64,
        checked_at: OffsetDateTime,
        shadow: &ShadowUser,
    ) -> Result<(), StoreError>;

    /// A page of audit events. A page may hold fewer events than the
    /// page size, even none, and still have a `next` cursor (a store may
    /// bound each call's work, as [`crate::views::PageReader`] does):
    /// only a `None` cursor ends the trail. It shows each chained event
    /// once, as [`Store::chain_events`] reads it, and only of chains that
    /// [`Store::chains`] lists: `verify_all` holds it to that.
    async fn audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError>;

    /// Up to `limit` events of a chain from position `from_seq`, in order
    /// of position: `limit` of them while the chain has that many more (a
    /// shorter list is the chain's end, as verification reads it).
    async fn chain_events(
        &self,
        chain: &ChainKey,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;

    /// The head of a chain, `None` if it has no events.
    async fn chain_head(&self, chain: &ChainKey) -> Result<Option<ChainHead>, StoreError>;

    /// Chain keys in order, after `after`, up to `limit`: `limit` of them
    /// while more follow (a shorter page ends the listing, as
    /// `verify_all` reads it). Every chain with an event is listed; a store that lists a chain before its first
    /// write (as an intent, beside the write) may also list one whose
    /// first write then failed: it has no events, and its head is `None`.
    async fn chains(
        &self,
        after: Option<&ChainKey>,
        limit: u32,
    ) -> Result<Vec<ChainKey>, StoreError>;
}

#[async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    async fn start(&self, start: Start) -> Result<StartOutcome, StoreError> {
        (**self).start(start).await
    }
    async fn transition(&self, t: Transition) -> Result<(Session, AuditEvent), StoreError> {
        (**self).transition(t).await
    }
    async fn append(&self, e: AuditDraft, g: AppendGuard) -> Result<AuditEvent, StoreError> {
        (**self).append(e, g).await
    }
    async fn append_batch(
        &self,
        b: Vec<(AuditDraft, AppendGuard)>,
    ) -> Vec<Result<AuditEvent, StoreError>> {
        (**self).append_batch(b).await
    }
    async fn find_by_secrets(
        &self,
        l: &[SecretLookup],
        t: Option<Touch>,
    ) -> Vec<Result<Option<Session>, StoreError>> {
        (**self).find_by_secrets(l, t).await
    }
    fn batching(&self) -> Batching {
        (**self).batching()
    }
    async fn find_by_secret(
        &self,
        h: &SecretLookup,
        t: Option<Touch>,
    ) -> Result<Option<Session>, StoreError> {
        (**self).find_by_secret(h, t).await
    }
    async fn session(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        (**self).session(id).await
    }
    async fn live_sessions(&self, f: &LiveFilter) -> Result<Vec<Session>, StoreError> {
        (**self).live_sessions(f).await
    }
    async fn record_check(
        &self,
        id: SessionId,
        v: u64,
        at: OffsetDateTime,
        s: &ShadowUser,
    ) -> Result<(), StoreError> {
        (**self).record_check(id, v, at, s).await
    }
    async fn audit(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        (**self).audit(q).await
    }
    async fn chain_events(
        &self,
        c: &ChainKey,
        from: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        (**self).chain_events(c, from, limit).await
    }
    async fn chain_head(&self, c: &ChainKey) -> Result<Option<ChainHead>, StoreError> {
        (**self).chain_head(c).await
    }
    async fn chains(
        &self,
        after: Option<&ChainKey>,
        limit: u32,
    ) -> Result<Vec<ChainKey>, StoreError> {
        (**self).chains(after, limit).await
    }
}

/// Most sessions a [`DecodedSessions`] remembers before it starts over.
const DECODED_CAPACITY: usize = 4_096;

/// Sessions a store decoded last, by secret hash, for stores that keep a
/// session as JSON text (its record and its shadow user): a lookup whose
/// stored texts are exactly the ones decoded last time for that secret
/// skips the parse. The texts are compared whole, so an edited or
/// re-checked session is always parsed afresh.
///
/// Its `Debug` shows how many sessions it holds, not their texts: a
/// stored shadow user's text holds the customer's copied and masked
/// values, which [`ShadowUser`]'s own `Debug` leaves out.
#[derive(Default)]
pub struct DecodedSessions {
    entries: std::sync::Mutex<std::collections::HashMap<SecretHash, Decoded>>,
}

impl std::fmt::Debug for DecodedSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self
            .entries
            .lock()
            .map_or_else(|e| e.into_inner().len(), |e| e.len());
        f.debug_struct("DecodedSessions")
            .field("sessions", &held)
            .finish()
    }
}

struct Decoded {
    record: Box<str>,
    shadow: Box<str>,
    session: Session,
}

impl DecodedSessions {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The session stored as `record` (a [`Session`] as JSON) with `shadow`
    /// (its [`ShadowUser`] as JSON), for the secret `key`.
    pub fn decode(
        &self,
        key: SecretHash,
        record: &str,
        shadow: &str,
    ) -> Result<Session, serde_json::Error> {
        let lock = || self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = lock().get(&key)
            && *known.record == *record
            && *known.shadow == *shadow
        {
            return Ok(known.session.clone());
        }
        let session = Self::parse(record, shadow)?;
        let mut entries = lock();
        if entries.len() >= DECODED_CAPACITY {
            entries.clear();
        }
        entries.insert(
            key,
            Decoded {
                record: record.into(),
                shadow: shadow.into(),
                session: session.clone(),
            },
        );
        Ok(session)
    }

    /// The session stored as `record` with `shadow`, parsed without the
    /// cache (for a lookup that has no secret to key it by).
    pub fn parse(record: &str, shadow: &str) -> Result<Session, serde_json::Error> {
        let mut session: Session = serde_json::from_str(record)?;
        session.shadow = serde_json::from_str(shadow)?;
        Ok(session)
    }
}

/// A database URL as it may be shown in a log line, an error or a `Debug`
/// output. Everything between the scheme and the last `@` (a user name and
/// password) becomes `***`, and so does the value of every `password=`
/// query parameter; the rest (scheme, hosts, database) stays, to tell
/// which database is meant.
///
/// ```
/// use impersonation_core::redacted_url;
///
/// assert_eq!(redacted_url("postgres://app:hunter2@db:5432/app"), "postgres://***@db:5432/app");
/// assert_eq!(redacted_url("postgres://db/app?password=hunter2"), "postgres://db/app?password=***");
/// assert_eq!(redacted_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
/// ```
pub fn redacted_url(url: &str) -> String {
    const PASSWORD: &str = "password=";
    if !url.contains("://") {
        // Not a URL: a `key=value` connection string (`host=db password =
        // 'x y'`), whose spacing and quoting are the driver's. Everything
        // after the keyword goes.
        return match url.to_ascii_lowercase().find("password") {
            Some(at) => format!("{}password***", &url[..at]),
            None => url.to_owned(),
        };
    }
    // The query's passwords first: one may hold an `@`, which the user
    // name and password below would otherwise end at.
    let mut url = url.to_owned();
    let mut from = 0;
    while let Some(found) = url[from..].to_ascii_lowercase().find(PASSWORD) {
        let start = from + found + PASSWORD.len();
        let end = url[start..].find('&').map_or(url.len(), |i| start + i);
        url.replace_range(start..end, "***");
        from = start + "***".len();
    }
    match url.split_once("://") {
        // The last `@`: a password may hold `@` or `/` unencoded.
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
            None => url,
        },
        None => url,
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::redacted_url;
    use proptest::prelude::*;

    #[test]
    fn a_redacted_url_keeps_what_names_the_database() {
        for (url, shown) in [
            (
                "postgres://app:pw@db.example:5432/x",
                "postgres://***@db.example:5432/x",
            ),
            ("mysql://root@127.0.0.1/test", "mysql://***@127.0.0.1/test"),
            ("redis://:s3cret@127.0.0.1/", "redis://***@127.0.0.1/"),
            (
                "redis+cluster://u:p@a:7001,b:7002",
                "redis+cluster://***@a:7001,b:7002",
            ),
            ("postgres://app:pa/ss@db/x", "postgres://***@db/x"),
            ("postgres://app:p@ss@db/x", "postgres://***@db/x"),
            (
                "postgres://db/x?sslmode=require&Password=pw&a=b",
                "postgres://db/x?sslmode=require&Password=***&a=b",
            ),
            ("sqlite://target/demo/x.db", "sqlite://target/demo/x.db"),
            ("host=db password = 'a b' dbname=x", "host=db password***"),
            ("host=db PASSWORD=x", "host=db password***"),
            (":memory:", ":memory:"),
            ("", ""),
        ] {
            assert_eq!(redacted_url(url), shown, "{url}");
        }
    }

    proptest! {
        #[test]
        fn no_password_is_shown(
            scheme in "[a-z+]{1,12}",
            user in "[^/?#]{0,12}",
            password in "[^&]{6,24}",
            host in "[a-z0-9.:,]{1,24}",
            path in "(/[a-z0-9_.]{0,12}){0,2}",
            in_query in any::<bool>(),
        ) {
            let url = if in_query {
                format!("{scheme}://{host}{path}?password={password}")
            } else {
                format!("{scheme}://{user}:{password}@{host}{path}")
            };
            let shown = redacted_url(&url);
            // Some password could be spelled by what is left (a host that
            // contains it): only the case where it is not.
            let left = format!("{scheme}://***@{host}{path}?password=***");
            prop_assume!(!left.contains(&password));
            prop_assert!(!shown.contains(&password), "{url} shown as {shown}");
        }
    }
}
