//! The audit trail: append-only events in SHA-256 hash chains, their
//! verification, and exports as JSON lines and as the table people read.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::clock::{normalize, unix_micros};
use crate::id::{EventId, SessionId, TenantId, UserId};
use crate::policy::{has_forbidden_chars, is_forbidden_char};

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditAction {
    /// A session was requested and awaits the customer's consent.
    SessionRequested,
    /// A session started (or a pending one was consented to).
    SessionStarted,
    /// A session ended; `details.reason` says how.
    SessionEnded,
    /// Something was read during a session.
    Access,
    /// Something was changed during a session.
    Modification,
    /// An attempt was refused; `details.denial` has the code.
    Denied,
    /// Every impersonation of a customer was revoked
    /// ([`Impersonation::revoke_all_for_subject`](crate::Impersonation::revoke_all_for_subject)),
    /// or every one by an agent
    /// ([`Impersonation::revoke_all_for_agent`](crate::Impersonation::revoke_all_for_agent)):
    /// written in the customer's revocation chain
    /// ([`ChainKey::revocations_of`]) or the agent's chain before the
    /// sessions are ended, each with its own end event.
    SessionsRevoked,
}

impl AuditAction {
    /// The stable code stored by adapters.
    pub const fn code(self) -> &'static str {
        match self {
            Self::SessionRequested => "session_requested",
            Self::SessionStarted => "session_started",
            Self::SessionEnded => "session_ended",
            Self::Access => "access",
            Self::Modification => "modification",
            Self::Denied => "denied",
            Self::SessionsRevoked => "sessions_revoked",
        }
    }

    /// Parses a stored code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.code() == code)
    }

    /// The label in the human table (as in the seed guide: "User Impersonation", "Data Access"…).
    pub const fn label(self) -> &'static str {
        match self {
            Self::SessionRequested => "Impersonation Requested",
            Self::SessionStarted => "User Impersonation",
            Self::SessionEnded => "User Impersonation End",
            Self::Access => "Data Access",
            Self::Modification => "Data Modification",
            Self::Denied => "Denied Attempt",
            Self::SessionsRevoked => "Impersonation Revoked",
        }
    }

    /// Every action.
    pub const ALL: [AuditAction; 7] = [
        Self::SessionRequested,
        Self::SessionStarted,
        Self::SessionEnded,
        Self::Access,
        Self::Modification,
        Self::Denied,
        Self::SessionsRevoked,
    ];
}

/// Who performed an audited action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Actor {
    /// A person: the agent, an administrator, or the customer answering consent.
    User {
        /// Their id.
        id: UserId,
        /// Their display name at the time (shared text: cloning is cheap).
        name: Arc<str>,
    },
    /// The SDK itself (expiry, idle timeout, a failed policy re-check) or host code.
    System,
}

impl Actor {
    /// A person.
    pub fn user(id: UserId, name: impl Into<Arc<str>>) -> Self {
        Self::User {
            id,
            name: name.into(),
        }
    }

    /// The person's id, if a person.
    pub fn id(&self) -> Option<&UserId> {
        match self {
            Self::User { id, .. } => Some(id),
            Self::System => None,
        }
    }

    /// The name shown in the table.
    pub fn name(&self) -> &str {
        match self {
            Self::User { name, .. } => name,
            Self::System => "system",
        }
    }
}

/// A person named in an event (the impersonated customer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    /// Their id.
    pub id: UserId,
    /// Their display name at the time (shared text: cloning is cheap).
    pub name: Arc<str>,
}

/// Bounds on audit details, so a hostile caller cannot bloat the trail.
pub const MAX_DETAIL_ENTRIES: usize = 32;
/// Longest detail key, in bytes.
pub const MAX_DETAIL_KEY: usize = 64;
/// Longest detail value, in characters; longer ones are cut with an ellipsis.
pub const MAX_DETAIL_VALUE: usize = 1_000;

/// Structured details of an event: a bounded map of short strings.
///
/// Values are sanitised on insert: control and bidirectional formatting
/// characters become `�`, over-long values are cut. Never put a secret here.
///
/// Kept as a short list sorted by key (at most [`MAX_DETAIL_ENTRIES`]): an
/// event's handful of details costs the list and its values, not a tree
/// node sized for eleven. It serialises as a JSON object with its keys in order,
/// exactly as a sorted map does, so the audit hash does not depend on it.
///
/// Cloning is cheap: the list is shared, and copied only when a clone is
/// changed. The SDK's own keys (`method`, `route`, `status`, …) are static
/// text, not allocated per event.
#[derive(Clone, Default)]
pub struct Details(Option<Arc<Vec<Detail>>>);

/// One detail: its key (static text for the SDK's own keys) and value.
type Detail = (Cow<'static, str>, String);

/// The keys the SDK itself writes, kept as static text.
fn known_key(key: &str) -> Option<&'static str> {
    Some(match key {
        "after_end" => "after_end",
        "agent" => "agent",
        "agent_name" => "agent_name",
        "attempt" => "attempt",
        "cause" => "cause",
        "consented_by" => "consented_by",
        "denial" => "denial",
        "description" => "description",
        "expires_at" => "expires_at",
        "message" => "message",
        "method" => "method",
        "note" => "note",
        "reason" => "reason",
        "reason_text" => "reason_text",
        "read_only" => "read_only",
        "route" => "route",
        "status" => "status",
        "target" => "target",
        "text" => "text",
        "ticket" => "ticket",
        _ => return None,
    })
}

impl Details {
    /// No details.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a detail (sanitised); ignored past [`MAX_DETAIL_ENTRIES`] or with an invalid key.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl fmt::Display) -> Self {
        self.insert(key, value);
        self
    }

    /// Adds a detail (sanitised), replacing one with the same key; returns
    /// whether it was kept.
    pub fn insert(&mut self, key: &str, value: impl fmt::Display) -> bool {
        // A refused detail is not formatted or sanitised.
        self.insert_with(key, || value.to_string())
    }

    /// [`Details::insert`] of a value already in a `String` (moved, not copied).
    pub(crate) fn insert_owned(&mut self, key: &str, value: String) -> bool {
        self.insert_with(key, || value)
    }

    fn insert_with(&mut self, key: &str, value: impl FnOnce() -> String) -> bool {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_DETAIL_KEY
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        if !key_ok {
            return false;
        }
        let position = self.position(key);
        if position.is_err() && self.len() >= MAX_DETAIL_ENTRIES {
            return false;
        }
        let value = sanitize(value());
        // Shared with a clone: copied here, so the clone keeps its own.
        let entries = Arc::make_mut(self.0.get_or_insert_with(Arc::default));
        match position {
            Ok(i) => entries[i].1 = value,
            Err(i) => {
                let key = known_key(key).map_or_else(|| Cow::Owned(key.to_owned()), Cow::Borrowed);
                entries.insert(i, (key, value));
            }
        }
        true
    }

    /// Takes out the detail `key`, if there is one.
    pub(crate) fn remove(&mut self, key: &str) {
        if let Ok(i) = self.position(key)
            && let Some(entries) = self.0.as_mut()
        {
            Arc::make_mut(entries).remove(i);
        }
    }

    /// Keeps the first `len` details (by key).
    pub(crate) fn truncate(&mut self, len: usize) {
        if self.len() > len
            && let Some(entries) = self.0.as_mut()
        {
            Arc::make_mut(entries).truncate(len);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries().len()
    }

    fn entries(&self) -> &[Detail] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.entries().binary_search_by(|(k, _)| (**k).cmp(key))
    }

    /// A detail's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key)
            .ok()
            .map(|i| self.entries()[i].1.as_str())
    }

    /// Every detail, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries().iter().map(|(k, v)| (&**k, v.as_str()))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }
}

impl PartialEq for Details {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Details {}

impl fmt::Debug for Details {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Details {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Details {
    /// Reads a stored object as it was written (no sanitising, no bound:
    /// the stored text is what the hash covers). A repeated key is refused:
    /// the hash covers one value per key, and a reader that keeps the first
    /// of two (some JSON tools do) would show a value the hash never saw.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(DetailsVisitor)
    }
}

struct DetailsVisitor;

impl<'de> serde::de::Visitor<'de> for DetailsVisitor {
    type Value = Details;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of text values, each key once")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Details, A::Error> {
        let mut map = BTreeMap::<String, String>::new();
        while let Some((key, value)) = access.next_entry::<String, String>()? {
            if map.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "detail key `{}` appears twice",
                    key.escape_debug()
                )));
            }
            map.insert(key, value);
        }
        if map.is_empty() {
            return Ok(Details::default());
        }
        let entries = map
            .into_iter()
            .map(|(k, v)| {
                let key = known_key(&k).map_or(Cow::Owned(k), Cow::Borrowed);
                (key, v)
            })
            .collect();
        Ok(Details(Some(Arc::new(entries))))
    }
}

fn sanitize(text: String) -> String {
    // The common case: short and clean, kept as it is (no byte count above
    // the limit can hold more characters than the limit).
    if text.len() <= MAX_DETAIL_VALUE && !has_forbidden_chars(&text) {
        return text;
    }
    let cleaned = display_text(&text).into_owned();
    if cleaned.chars().count() > MAX_DETAIL_VALUE {
        let mut cut: String = cleaned.chars().take(MAX_DETAIL_VALUE - 1).collect();
        cut.push('…');
        cut
    } else {
        cleaned
    }
}

/// The key of one hash chain. By default one chain per support agent: the
/// agent whose impersonation the event is about, even when an administrator
/// revokes or the clock expires the session.
///
/// Cloning is cheap: the text is shared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChainKey(Arc<str>);

/// How the customers' revocation chains' keys start; no user id may
/// (`IdError::Reserved`), so no agent's chain is one of them.
pub(crate) const REVOCATIONS_PREFIX: &str = "revocations:";

impl ChainKey {
    /// The chain of an agent.
    pub fn for_agent(agent: &UserId) -> Self {
        Self(agent.shared())
    }

    /// The revocation chain of a customer: where
    /// [`revoke_all_for_subject`](crate::Impersonation::revoke_all_for_subject)
    /// writes its [`AuditAction::SessionsRevoked`] event before it ends the
    /// customer's sessions, and whose head a start reads before and after it
    /// writes its session (a start that a revocation overtook ends its
    /// session at once). `revocations:` and a SHA-256 of the customer's id,
    /// so it fits any store's key and stays apart from the agents' chains
    /// (a user id may not start with `revocations:`).
    pub fn revocations_of(subject: &UserId) -> Self {
        let digest = Sha256::new()
            .chain_update(b"impersonation-revocations-v1\0")
            .chain_update(subject.as_str().as_bytes())
            .finalize();
        Self(
            format!(
                "{REVOCATIONS_PREFIX}{}",
                base16ct::lower::encode_string(&digest)
            )
            .into(),
        )
    }

    /// Wraps a stored key.
    pub fn from_stored(key: impl Into<String>) -> Self {
        Self(key.into().into())
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A non-secret 64-bit digest of the key, as 16 hex characters: the
    /// routing part of session tokens and a safe hash tag for sharded stores.
    pub fn route(&self) -> String {
        let digest = Sha256::new()
            .chain_update(b"impersonation-route-v1\0")
            .chain_update(self.0.as_bytes())
            .finalize();
        base16ct::lower::encode_string(&digest[..8])
    }
}

impl fmt::Display for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SHA-256 digest in the chain; lower-case hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct EventHash([u8; 32]);

impl Serialize for EventHash {
    /// The hex is written from the stack: no `String` per hash.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0_u8; 64];
        let hex =
            base16ct::lower::encode_str(&self.0, &mut buf).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(hex)
    }
}

impl EventHash {
    /// The hash before the first event of every chain.
    pub const GENESIS: Self = Self([0; 32]);

    /// Wraps stored bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        base16ct::lower::encode_string(&self.0)
    }

    /// Parses hex.
    pub fn from_hex(text: &str) -> Result<Self, hex::FromHexError> {
        let mut out = [0_u8; 32];
        hex::decode_to_slice(text, &mut out)?;
        Ok(Self(out))
    }
}

impl fmt::Debug for EventHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventHash({})", &self.to_hex()[..12])
    }
}

impl From<EventHash> for String {
    fn from(h: EventHash) -> String {
        h.to_hex()
    }
}

impl TryFrom<String> for EventHash {
    type Error = hex::FromHexError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::from_hex(&text)
    }
}

/// The last event of a chain, as a store keeps it: enough to append the next
/// event and to notice a truncated chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// Position of the last event (0 for the first).
    pub seq: u64,
    /// Hash of the last event.
    pub hash: EventHash,
}

/// An event before a store places it in its chain. Built by the SDK's state
/// machine and service; a store seals it with [`AuditDraft::seal`] inside the
/// same atomic step that applies the session change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditDraft {
    /// Event id (UUID v7).
    pub id: EventId,
    /// When (UTC, microseconds).
    #[serde(with = "crate::serde_util::rfc3339")]
    pub at: OffsetDateTime,
    /// What happened.
    pub action: AuditAction,
    /// Who did it.
    pub actor: Actor,
    /// The impersonated customer.
    pub subject: Option<Party>,
    /// The customer's tenant.
    pub tenant: Option<TenantId>,
    /// The session.
    pub session: Option<SessionId>,
    /// The chain it belongs to.
    pub chain: ChainKey,
    /// Structured details.
    pub details: Details,
}

impl AuditDraft {
    /// A new draft at `at` (normalised to UTC microseconds).
    pub fn new(at: OffsetDateTime, action: AuditAction, actor: Actor, chain: ChainKey) -> Self {
        Self {
            id: EventId::new(),
            at: normalize(at),
            action,
            actor,
            subject: None,
            tenant: None,
            session: None,
            chain,
            details: Details::new(),
        }
    }

    /// Names the impersonated customer and their tenant.
    #[must_use]
    pub fn subject(mut self, id: UserId, name: impl Into<Arc<str>>, tenant: TenantId) -> Self {
        self.subject = Some(Party {
            id,
            name: name.into(),
        });
        self.tenant = Some(tenant);
        self
    }

    /// Names the session.
    #[must_use]
    pub fn session(mut self, session: SessionId) -> Self {
        self.session = Some(session);
        self
    }

    /// Sets the details.
    #[must_use]
    pub fn details(mut self, details: Details) -> Self {
        self.details = details;
        self
    }

    /// Places the draft after `head` (or first, with `None`) and computes its hash.
    pub fn seal(self, head: Option<ChainHead>) -> AuditEvent {
        let mut event = self.placed(head);
        event.hash = event.compute_hash();
        event
    }

    /// Seals the draft as [`seal`](Self::seal) does and writes its
    /// [record](AuditEvent::to_record) in the same pass: for a store that
    /// keeps events as text, one serialisation instead of two.
    pub fn seal_to_record(
        self,
        head: Option<ChainHead>,
    ) -> serde_json::Result<(AuditEvent, String)> {
        let mut event = self.placed(head);
        let record = event.hash_into_record()?;
        Ok((event, record))
    }

    /// The event after `head`, its hash not yet computed. Its time is
    /// normalised to UTC microseconds, as `new` does (the fields are
    /// public), so the event a store returns is the one it reads back.
    fn placed(self, head: Option<ChainHead>) -> AuditEvent {
        let (seq, prev_hash) = place_after(head);
        AuditEvent {
            id: self.id,
            at: normalize(self.at),
            action: self.action,
            actor: self.actor,
            subject: self.subject,
            tenant: self.tenant,
            session: self.session,
            chain: self.chain,
            details: self.details,
            seq,
            prev_hash,
            hash: EventHash::GENESIS,
        }
    }
}

/// The position and previous hash of an event placed after `head`.
fn place_after(head: Option<ChainHead>) -> (u64, EventHash) {
    match head {
        // Saturating: a head at `u64::MAX` (only a damaged store holds one)
        // places the event on the last one, which the store refuses.
        Some(h) => (h.seq.saturating_add(1), h.hash),
        None => (0, EventHash::GENESIS),
    }
}

/// One audit event, sealed in its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Event id (UUID v7).
    pub id: EventId,
    /// When (UTC, microseconds).
    #[serde(with = "crate::serde_util::rfc3339")]
    pub at: OffsetDateTime,
    /// What happened.
    pub action: AuditAction,
    /// Who did it.
    pub actor: Actor,
    /// The impersonated customer.
    pub subject: Option<Party>,
    /// The customer's tenant.
    pub tenant: Option<TenantId>,
    /// The session.
    pub session: Option<SessionId>,
    /// The chain it belongs to.
    pub chain: ChainKey,
    /// Structured details.
    pub details: Details,
    /// Position in the chain, from 0.
    pub seq: u64,
    /// Hash of the previous event ([`EventHash::GENESIS`] for the first).
    pub prev_hash: EventHash,
    /// SHA-256 over the previous hash and this event's canonical form.
    pub hash: EventHash,
}

/// Room for a typical event's canonical JSON (an access event is about
/// 350 bytes), so it usually reaches the hash or the record in one piece.
const CANONICAL_BUFFER: usize = 512;

/// Where a [`StackWriter`] sends its buffer when it fills, and at the end.
trait Spill {
    fn take(&mut self, data: &[u8]);
}

impl Spill for Sha256 {
    fn take(&mut self, data: &[u8]) {
        self.update(data);
    }
}

impl Spill for Vec<u8> {
    fn take(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }
}

/// Buffers the canonical JSON on the stack on its way into the hash or a
/// record: serde writes a few bytes at a time, and each write straight
/// into the hasher would pay its block bookkeeping (a quarter of the
/// append's instructions, measured), and each into a `Vec` a capacity
/// check and a `memcpy` call (about 1k instructions per event, measured).
struct StackWriter<S> {
    sink: S,
    buf: [u8; CANONICAL_BUFFER],
    len: usize,
}

impl<S: Spill> StackWriter<S> {
    fn new(sink: S) -> Self {
        Self {
            sink,
            buf: [0; CANONICAL_BUFFER],
            len: 0,
        }
    }

    /// The sink, having taken what is still buffered.
    fn finish(mut self) -> S {
        self.sink.take(&self.buf[..self.len]);
        self.sink
    }

    // Inlined into serde's many small writes, most of them a byte or two
    // of constant length: a call per write would cost more than the copy.
    #[inline]
    fn put(&mut self, data: &[u8]) {
        match self.buf.get_mut(self.len..self.len + data.len()) {
            Some(room) => {
                room.copy_from_slice(data);
                self.len += data.len();
            }
            None => self.spill(data),
        }
    }

    #[cold]
    fn spill(&mut self, data: &[u8]) {
        self.sink.take(&self.buf[..self.len]);
        self.len = 0;
        if data.len() > CANONICAL_BUFFER {
            self.sink.take(data);
        } else {
            self.buf[..data.len()].copy_from_slice(data);
            self.len = data.len();
        }
    }
}

impl<S: Spill> std::io::Write for StackWriter<S> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.put(data);
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.put(data);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The canonical form hashed into the chain: fixed field order, timestamp as
/// integer microseconds, so every store and language computes the same bytes.
#[derive(Serialize)]
struct Canonical<'a> {
    v: u8,
    id: &'a EventId,
    chain: &'a ChainKey,
    seq: u64,
    at_us: i64,
    action: &'static str,
    actor: &'a Actor,
    subject: &'a Option<Party>,
    tenant: &'a Option<TenantId>,
    session: &'a Option<SessionId>,
    details: &'a Details,
}

/// What a [record](AuditEvent::to_record) holds: the canonical fields,
/// then the two hashes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    #[allow(dead_code)] // checked before parsing: always 1 here
    v: u8,
    id: EventId,
    chain: ChainKey,
    seq: u64,
    at_us: i64,
    action: AuditAction,
    actor: Actor,
    // A record always writes these, `null` when empty: one without them
    // is refused rather than read as `None`.
    #[serde(deserialize_with = "Option::deserialize")]
    subject: Option<Party>,
    #[serde(deserialize_with = "Option::deserialize")]
    tenant: Option<TenantId>,
    #[serde(deserialize_with = "Option::deserialize")]
    session: Option<SessionId>,
    details: Details,
    prev_hash: EventHash,
    hash: EventHash,
}

/// What a record adds to the canonical JSON: the two hashes, their names
/// and punctuation.
const RECORD_TAIL: usize = 2 * 64 + 27;

/// Appends `hash` as lower-case hex.
fn push_hex(out: &mut Vec<u8>, hash: &EventHash) {
    let mut buf = [0_u8; 64];
    // 64 bytes is exactly the room 32 bytes of hex need.
    if let Ok(hex) = base16ct::lower::encode_str(&hash.0, &mut buf) {
        out.extend_from_slice(hex.as_bytes());
    }
}

impl AuditEvent {
    /// The canonical form of this event (what its hash covers).
    fn canonical(&self) -> Canonical<'_> {
        Canonical {
            v: 1,
            id: &self.id,
            chain: &self.chain,
            seq: self.seq,
            at_us: unix_micros(self.at),
            action: self.action.code(),
            actor: &self.actor,
            subject: &self.subject,
            tenant: &self.tenant,
            session: &self.session,
            details: &self.details,
        }
    }

    /// A hasher that has taken the domain tag and `prev_hash`: the
    /// canonical JSON follows.
    fn chain_hasher(&self) -> Sha256 {
        Sha256::new()
            .chain_update(b"impersonation-audit-v1\0")
            .chain_update(self.prev_hash.as_bytes())
    }

    /// Recomputes the hash from the event's content and `prev_hash`.
    pub fn compute_hash(&self) -> EventHash {
        let canonical = self.canonical();
        // The JSON goes into a buffer on the stack and from there into the
        // hash in a few large updates: serde writes a few bytes at a time,
        // and each write straight into the hasher would pay its block
        // bookkeeping (a quarter of the append's instructions, measured).
        // Serialising plain structs, strings and the details cannot fail;
        // a cut-short body would only make the hash mismatch, never pass.
        let mut hasher = StackWriter::new(self.chain_hasher());
        let _ = serde_json::to_writer(&mut hasher, &canonical);
        EventHash(hasher.finish().finalize().into())
    }

    /// Places the event after `head` (or first, with `None`) instead of
    /// where it was sealed, and computes its hash anew: for a store whose
    /// compare-and-set found the chain moved on, without going back to the
    /// draft (same result as sealing the draft on `head`).
    pub fn reseal(&mut self, head: Option<ChainHead>) {
        (self.seq, self.prev_hash) = place_after(head);
        self.hash = self.compute_hash();
    }

    /// [`reseal`](Self::reseal), returning the event's new
    /// [record](Self::to_record), written in the pass that hashes it.
    pub fn reseal_to_record(&mut self, head: Option<ChainHead>) -> serde_json::Result<String> {
        (self.seq, self.prev_hash) = place_after(head);
        self.hash_into_record()
    }

    /// The event as a store keeps it in text: its canonical JSON, byte for
    /// byte what its hash covers (fields `v`, `id`, `chain`, `seq`, `at_us`,
    /// `action`, `actor`, `subject`, `tenant`, `session`, `details`), with
    /// `prev_hash` and `hash` added at the end. A record as written here
    /// can be checked against its hash from the text alone;
    /// [`from_record`](Self::from_record) reads it back.
    ///
    /// Rows and entries written as records cannot be read by a version of
    /// the SDK from before records: upgrade every reader before the first
    /// writer.
    pub fn to_record(&self) -> serde_json::Result<String> {
        let out = self.canonical_json()?;
        self.close_record(out)
    }

    /// Reads a [record](Self::to_record). The hashes are taken as stored:
    /// [`verify_chain`] is what checks them, against the event as read (so
    /// a record whose text differs from the canonical form without changing
    /// the event, its keys reordered or escaped otherwise, still verifies;
    /// a tool that hashes the stored text would refuse it).
    ///
    /// It also reads an event stored as its serde JSON
    /// (`serde_json::to_string(&event)`), which the SDK's stores kept before
    /// records, so trails written then stay readable. The two are told
    /// apart by their first field: a record opens with `{"v":`.
    pub fn from_record(text: &str) -> serde_json::Result<Self> {
        use serde::de::Error as _;
        let Some(rest) = text.strip_prefix("{\"v\":") else {
            return serde_json::from_str(text);
        };
        // The version first, so a later one is named as such rather than
        // refused for a field this version does not know.
        if !rest.starts_with("1,") {
            let version: String = rest
                .chars()
                .take_while(|c| !matches!(c, ',' | '}'))
                .take(16)
                .collect();
            return Err(serde_json::Error::custom(format!(
                "unknown audit record version {version:?}"
            )));
        }
        let r: Record = serde_json::from_str(text)?;
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.at_us) * 1_000)
            .map_err(serde_json::Error::custom)?;
        Ok(Self {
            id: r.id,
            at,
            action: r.action,
            actor: r.actor,
            subject: r.subject,
            tenant: r.tenant,
            session: r.session,
            chain: r.chain,
            details: r.details,
            seq: r.seq,
            prev_hash: r.prev_hash,
            hash: r.hash,
        })
    }

    /// Writes the canonical JSON once, hashes it into `self.hash`, and
    /// returns it with the hashes added (the record).
    fn hash_into_record(&mut self) -> serde_json::Result<String> {
        let out = self.canonical_json()?;
        self.hash = EventHash(self.chain_hasher().chain_update(&out).finalize().into());
        self.close_record(out)
    }

    /// The canonical JSON, in a buffer with room for the hashes.
    fn canonical_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut writer = StackWriter::new(Vec::new());
        serde_json::to_writer(&mut writer, &self.canonical())?;
        // Usually all of it is still on the stack: the record's buffer is
        // allocated once, at its final size.
        let StackWriter {
            sink: spilled,
            buf,
            len,
        } = writer;
        let mut out = Vec::with_capacity(spilled.len() + len + RECORD_TAIL);
        out.extend_from_slice(&spilled);
        out.extend_from_slice(&buf[..len]);
        Ok(out)
    }

    /// Turns the canonical JSON into the record: the hashes go in before
    /// the object's closing brace.
    fn close_record(&self, mut out: Vec<u8>) -> serde_json::Result<String> {
        if out.pop() != Some(b'}') {
            return Err(serde::ser::Error::custom("canonical form is not an object"));
        }
        out.extend_from_slice(b",\"prev_hash\":\"");
        push_hex(&mut out, &self.prev_hash);
        out.extend_from_slice(b"\",\"hash\":\"");
        push_hex(&mut out, &self.hash);
        out.extend_from_slice(b"\"}");
        String::from_utf8(out).map_err(serde::ser::Error::custom)
    }

    /// The head a store keeps after appending this event.
    pub fn head(&self) -> ChainHead {
        ChainHead {
            seq: self.seq,
            hash: self.hash,
        }
    }

    /// The sentence in the table's Details column.
    pub fn describe(&self) -> String {
        let d = &self.details;
        let mut text = match self.action {
            AuditAction::SessionRequested => {
                "Requested impersonation; awaiting consent.".to_owned()
            }
            AuditAction::SessionStarted => match d.get("consented_by") {
                Some(_) => "Customer consented; impersonation session started.".to_owned(),
                None => "Started impersonation session.".to_owned(),
            },
            AuditAction::SessionEnded => {
                let how = match d.get("reason") {
                    Some("stopped") => "stopped by the agent",
                    Some("expired") => "maximum duration reached",
                    Some("idle_timeout") => "idle timeout",
                    Some("revoked") => "revoked",
                    Some("consent_denied") => "customer declined consent",
                    _ => "ended",
                };
                format!("Ended impersonation session ({how}).")
            }
            AuditAction::Access | AuditAction::Modification => match d.get("description") {
                Some(text) => text.to_owned(),
                None => match self.action {
                    AuditAction::Access => "Accessed data.".to_owned(),
                    _ => "Modified data.".to_owned(),
                },
            },
            AuditAction::SessionsRevoked => match d.get("cause") {
                Some("agent_revoked") => "Revoked every impersonation by the agent.".to_owned(),
                _ => "Revoked every impersonation of the customer.".to_owned(),
            },
            AuditAction::Denied => {
                let why = d.get("message").or(d.get("denial")).unwrap_or("denied");
                match d.get("attempt") {
                    Some(attempt) => format!("Refused {attempt}: {why}."),
                    None => format!("Refused: {why}."),
                }
            }
        };
        // Whose session it was, when someone else acted on it (the system
        // ending it, an admin revoking it, the customer consenting); a
        // name is free text, quoted.
        let by_the_agent = d
            .get("agent")
            .is_some_and(|agent| self.actor.id().is_some_and(|id| id.as_str() == agent));
        if !by_the_agent {
            if let Some(name) = d.get("agent_name") {
                let _ = write!(text, " Agent: \u{201C}{}\u{201D}.", quoted(name));
            } else if let Some(id) = d.get("agent") {
                let _ = write!(text, " Agent: {id}.");
            }
        }
        for key in ["reason_text", "ticket", "note", "cause"] {
            if let Some(value) = d.get(key) {
                let _ = match key {
                    // Free text goes in quotes, with the quotes it holds
                    // made plain, so it cannot pass for the row's own words
                    // (a reason ending "Ticket: SUP-1", say).
                    "reason_text" => write!(text, " Reason: \u{201C}{}\u{201D}.", quoted(value)),
                    "note" => write!(text, " Note: \u{201C}{}\u{201D}.", quoted(value)),
                    "ticket" => write!(text, " Ticket: {value}."),
                    _ => write!(text, " Cause: {value}."),
                };
            }
        }
        text
    }
}

/// What was wrong at the first bad position of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum BreakKind {
    /// The event belongs to another chain.
    WrongChain,
    /// The event's position is not the next one (an event was deleted, inserted or moved).
    OutOfSequence {
        /// The position the event claims.
        found: u64,
    },
    /// `prev_hash` is not the previous event's hash.
    BrokenLink,
    /// The event's content does not match its hash (it was edited).
    HashMismatch,
    /// The chain ends before the head the store recorded (events were cut off the end).
    Truncated {
        /// The head's position.
        head_seq: u64,
    },
    /// The last event is not the one the head records.
    HeadMismatch,
    /// An event at or after this position could not be read back: its
    /// stored record does not decode (damaged, or edited into a shape no
    /// writer makes, a detail key written twice, say).
    Unreadable,
}

/// The first bad position of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("audit chain {chain} breaks at position {position}: {kind:?}")]
pub struct ChainBreak {
    /// The chain.
    pub chain: ChainKey,
    /// The first bad position (0-based).
    pub position: u64,
    /// What was wrong there.
    pub kind: BreakKind,
}

/// A verified chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// The chain.
    pub chain: ChainKey,
    /// How many events verified.
    pub events: u64,
    /// The last event's hash.
    pub last_hash: EventHash,
}

/// Verifies a chain event by event, so a store can stream a long chain in pages.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    chain: ChainKey,
    next: u64,
    prev: EventHash,
    head: Option<ChainHead>,
}

impl ChainVerifier {
    /// A verifier for `chain`, expecting its first event.
    pub fn new(chain: ChainKey) -> Self {
        Self {
            chain,
            next: 0,
            prev: EventHash::GENESIS,
            head: None,
        }
    }

    /// A verifier that also holds each event against a head read before
    /// the events: the event at the head's position must be the one it
    /// names, or the chain breaks there ([`BreakKind::HeadMismatch`]).
    /// [`ChainVerifier::finish`] alone sees only the last event's hash,
    /// so a head that is behind its events and names another hash would
    /// be reported at the first event past it.
    pub fn with_head(chain: ChainKey, head: Option<ChainHead>) -> Self {
        Self {
            head,
            ..Self::new(chain)
        }
    }

    /// A verifier that goes on from a verified chain's end: its next
    /// event must follow `report`'s last.
    pub(crate) fn after(report: &ChainReport) -> Self {
        Self {
            next: report.events,
            prev: report.last_hash,
            ..Self::new(report.chain.clone())
        }
    }

    fn broken(&self, kind: BreakKind) -> ChainBreak {
        ChainBreak {
            chain: self.chain.clone(),
            position: self.next,
            kind,
        }
    }

    /// Checks the next event in order of position.
    pub fn push(&mut self, event: &AuditEvent) -> Result<(), ChainBreak> {
        if event.chain != self.chain {
            return Err(self.broken(BreakKind::WrongChain));
        }
        if event.seq != self.next {
            return Err(self.broken(BreakKind::OutOfSequence { found: event.seq }));
        }
        if event.prev_hash != self.prev {
            return Err(self.broken(BreakKind::BrokenLink));
        }
        if event.compute_hash() != event.hash {
            return Err(self.broken(BreakKind::HashMismatch));
        }
        if self
            .head
            .is_some_and(|h| h.seq == event.seq && h.hash != event.hash)
        {
            return Err(self.broken(BreakKind::HeadMismatch));
        }
        self.prev = event.hash;
        self.next = self.next.saturating_add(1);
        Ok(())
    }

    /// Ends verification, comparing with the head the store recorded.
    pub fn finish(self, head: Option<ChainHead>) -> Result<ChainReport, ChainBreak> {
        if let Some(head) = head {
            if head.seq.saturating_add(1) > self.next {
                return Err(self.broken(BreakKind::Truncated { head_seq: head.seq }));
            }
            if head.seq.saturating_add(1) < self.next || head.hash != self.prev {
                let mut b = self.broken(BreakKind::HeadMismatch);
                // The first event the head does not vouch for: past a
                // head that is behind, every event is as unanchored as
                // the last.
                b.position = if head.seq.saturating_add(1) < self.next {
                    head.seq.saturating_add(1)
                } else {
                    self.next.saturating_sub(1)
                };
                return Err(b);
            }
        }
        Ok(ChainReport {
            chain: self.chain,
            events: self.next,
            last_hash: self.prev,
        })
    }
}

/// Verifies a whole chain given in order of position; reports the first bad position.
///
/// ```
/// use impersonation_core::{AuditAction, AuditDraft, Actor, ChainKey, UserId, verify_chain};
/// let chain = ChainKey::for_agent(&UserId::from(1_u64));
/// let first = AuditDraft::new(time::OffsetDateTime::now_utc(), AuditAction::Access, Actor::System, chain.clone()).seal(None);
/// let second = AuditDraft::new(time::OffsetDateTime::now_utc(), AuditAction::Access, Actor::System, chain.clone()).seal(Some(first.head()));
/// assert!(verify_chain(&chain, [&first, &second], Some(second.head())).is_ok());
/// let mut edited = second.clone();
/// edited.details = edited.details.with("note", "edited");
/// assert_eq!(verify_chain(&chain, [&first, &edited], None).unwrap_err().position, 1);
/// ```
pub fn verify_chain<'a>(
    chain: &ChainKey,
    events: impl IntoIterator<Item = &'a AuditEvent>,
    head: Option<ChainHead>,
) -> Result<ChainReport, ChainBreak> {
    let mut verifier = ChainVerifier::with_head(chain.clone(), head);
    for event in events {
        verifier.push(event)?;
    }
    verifier.finish(head)
}

/// Writes events as JSON lines (one event per line, every field, RFC 3339 times).
///
/// Line separators, other control characters and bidirectional controls
/// (from a display name, which is kept as written) are written as `\u`
/// escapes, which read back as the same characters: a reader that also
/// splits lines at U+2028, U+2029 or U+0085 (Python's `splitlines`, some
/// log viewers) sees one event per line, and no text reorders how a line
/// shows.
///
/// # Errors
///
/// An event whose time RFC 3339 cannot write (a year before 0 or after
/// 9999: only a time given to [`AuditDraft::new`] by hand gets there)
/// fails the export rather than leave the event out of it, which would
/// leave a chain that no longer verifies and no word why.
pub fn to_json_lines<'a>(
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> Result<String, serde_json::Error> {
    let mut out = Vec::new();
    for event in events {
        event.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            EscapingFormatter,
        ))?;
        out.push(b'\n');
    }
    // The serializer writes whole characters and ASCII escapes only.
    String::from_utf8(out).map_err(serde::ser::Error::custom)
}

/// serde_json's compact output, with every [`is_forbidden_char`] in a
/// string written as a `\u` escape (serde_json escapes only those below
/// U+0020).
struct EscapingFormatter;

impl serde_json::ser::Formatter for EscapingFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut from = 0;
        for (at, c) in fragment.char_indices() {
            if is_forbidden_char(c) {
                writer.write_all(&fragment.as_bytes()[from..at])?;
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(writer, "\\u{unit:04x}")?;
                }
                from = at + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[from..])
    }
}

/// A name or other text as the trail shows it: line breaks, other
/// control characters and bidirectional controls as U+FFFD, as in
/// [`to_table`]. For a page that renders the trail itself: a display name
/// holding U+202E would otherwise show its letters reversed (escape the
/// result for HTML as well).
///
/// ```
/// assert_eq!(impersonation_core::display_text("Sam\u{202E}troppuS"), "Sam\u{FFFD}troppuS");
/// assert_eq!(impersonation_core::display_text("Olive Owner"), "Olive Owner");
/// ```
pub fn display_text(text: &str) -> Cow<'_, str> {
    if text.contains(is_forbidden_char) {
        Cow::Owned(
            text.chars()
                .map(|c| if is_forbidden_char(c) { '\u{FFFD}' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    }
}

/// Free text as [`AuditEvent::describe`] quotes it: its own curly double
/// quotes, and the marks drawn like them (double primes, the modifier
/// letters and the Hebrew gershayim, the fullwidth and CJK double quotes,
/// ditto marks, two right single quotes), made straight, so the closing
/// quote is the row's. (A list: a mark missing from it shows as written.)
fn quoted(text: &str) -> Cow<'_, str> {
    const LOOK_LIKE_QUOTES: [char; 14] = [
        '\u{02BA}', '\u{02EE}', '\u{05F4}', '\u{201C}', '\u{201D}', '\u{201E}', '\u{201F}',
        '\u{2033}', '\u{2036}', '\u{3003}', '\u{301D}', '\u{301E}', '\u{301F}', '\u{FF02}',
    ];
    if text.contains(LOOK_LIKE_QUOTES) || text.contains("\u{2019}\u{2019}") {
        Cow::Owned(
            text.replace("\u{2019}\u{2019}", "\"")
                .replace(LOOK_LIKE_QUOTES, "\""),
        )
    } else {
        Cow::Borrowed(text)
    }
}

/// The timestamp as the table shows it: `2024-11-06 10:15:03 AM UTC`.
pub fn table_timestamp(at: OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour repr:12]:[minute]:[second] [period] UTC"
    );
    at.checked_to_offset(time::UtcOffset::UTC)
        .and_then(|utc| utc.format(&format).ok())
        .unwrap_or_else(|| at.to_string())
}

/// A table cell: `\` and `|` escaped, and line breaks, other control
/// characters and bidirectional controls (from a display name, say)
/// shown as U+FFFD, so no text can end its row or start a forged one.
/// `<`, `&` and `[` are escaped too, so that a Markdown renderer shows
/// them as written: a name cannot become HTML that ends the row, a
/// character reference (`&#x202E;`) or a link whose text hides it.
fn cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            '<' => out.push_str("\\<"),
            '&' => out.push_str("\\&"),
            '[' => out.push_str("\\["),
            c if is_forbidden_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// The head of [`to_table`]: the column names and the Markdown rule below them.
pub const TABLE_HEAD: &str = "| Timestamp | Action | User Performing Action | Impersonated User | Details |\n|---|---|---|---|---|\n";

/// Renders events as the table people read (Markdown), with the columns of
/// the seed guide: Timestamp | Action | User Performing Action | Impersonated User | Details.
pub fn to_table<'a>(events: impl IntoIterator<Item = &'a AuditEvent>) -> String {
    let mut out = String::from(TABLE_HEAD);
    out.push_str(&table_rows(events));
    out
}

/// The rows of [`to_table`] without its head, one line per event: a long
/// trail can be written page by page after [`TABLE_HEAD`], without holding
/// it all.
pub fn table_rows<'a>(events: impl IntoIterator<Item = &'a AuditEvent>) -> String {
    let mut out = String::new();
    for e in events {
        let subject = e.subject.as_ref().map_or("", |s| &*s.name);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            table_timestamp(e.at),
            e.action.label(),
            cell(e.actor.name()),
            cell(subject),
            cell(&e.describe())
        );
    }
    out
}
