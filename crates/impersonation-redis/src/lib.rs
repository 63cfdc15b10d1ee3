//! # impersonation-redis
//!
//! The `impersonation` [`Store`] on Redis, for a single server or a **Redis
//! Cluster**, chosen by configuration:
//!
//! ```no_run
//! use impersonation_redis::{RedisConfig, RedisStore};
//! # async fn example() -> Result<(), impersonation_redis::RedisStoreError> {
//! let single = RedisStore::connect(RedisConfig::new("redis://127.0.0.1:6379")?.namespace("app")?).await?;
//! let cluster = RedisStore::connect(RedisConfig::new("redis+cluster://10.0.0.1:7001,10.0.0.2:7002")?).await?;
//! # Ok(()) }
//! ```
//!
//! Every write is one Lua script (EVALSHA; on `NOSCRIPT` the call runs
//! again by the script's source, EVAL) confined to one hash slot: the slot of the
//! agent the write is about (see `docs/redis.md` for the key layout and slot
//! plan). A session change and its audit event (a Redis Stream entry) are
//! written together or not at all. `resolve` is one command. Only secret
//! hashes are stored.
//! Any Redis failure is [`StoreError::Unavailable`]: the SDK fails closed.
//!
//! ## Feature flags
//!
//! - `tls`: `rediss://` and `rediss+cluster://` URLs, over rustls (the
//!   `ring` provider): the server's certificate must chain to the system's
//!   roots, or to the authorities given to
//!   `RedisConfig::tls_root_certificates_pem`, and name the host the URL
//!   names. Without it such a URL is refused by [`RedisConfig::new`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod keys;
mod scripts;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::future::{join_all, try_join_all};
use impersonation_core::{
    AppendGuard, AuditDraft, AuditEvent, AuditPage, AuditQuery, Batching, ChainHead, ChainKey,
    DecodedSessions, EventHash, LiveFilter, Order, SecretHash, SecretLookup, Session, SessionId,
    ShadowUser, Start, StartOutcome, Store, StoreError, Touch, Transition,
};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use time::{Duration, OffsetDateTime};

use crate::keys::{
    Slot, audit_all, audit_index, chains, is_route, live_all, live_routes, live_set, stale_views,
    where_key,
};
use crate::scripts::{
    APPEND_MANY_SCRIPT, MARK_STALE, RECORD_CHECK_SCRIPT, REPAIR_LIVE_MARKER_SCRIPT, RESOLVE_SCRIPT,
    START_SCRIPT, ScriptCall, TRANSITION_SCRIPT, UNMARK_STALE,
};

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisStoreError {
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Redis could not be reached.
    #[error("cannot connect to Redis: {0}")]
    Connect(String),
    /// The server could lose the audit trail on restart and the
    /// configuration requires durability.
    #[error("Redis persistence is off, the audit trail would not survive a restart: {0}")]
    NotDurable(String),
}

/// What to do when the server keeps nothing on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Log a warning through `tracing` and go on (the default).
    Warn,
    /// Refuse to start.
    Require,
}

/// Connection settings.
/// Its `Debug` shows the URLs without their passwords.
#[derive(Clone)]
pub struct RedisConfig {
    urls: Vec<String>,
    /// The URL as given, its user and password masked, for `Debug`.
    shown: String,
    cluster: bool,
    namespace: String,
    retention: Duration,
    durability: Durability,
    /// PEM certificate authorities to verify a TLS server by.
    tls_roots_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.shown)
            .field("cluster", &self.cluster)
            .field("namespace", &self.namespace)
            .field("retention", &self.retention)
            .field("durability", &self.durability)
            .field("tls_roots", &self.tls_roots_pem.is_some())
            .finish()
    }
}

impl RedisConfig {
    /// `redis://host:port` for one server, `redis+cluster://h1:p1,h2:p2` for a
    /// cluster (any reachable nodes; the rest are discovered). A user and
    /// password written on the first node (`redis+cluster://:pw@h1:p1,h2:p2`)
    /// are every node's; a `,` in that password is written `%2C`, or it
    /// would split the list. Over TLS (feature `tls`): `rediss://` and
    /// `rediss+cluster://`.
    pub fn new(url: &str) -> Result<Self, RedisStoreError> {
        let cluster_nodes = url
            .strip_prefix("redis+cluster://")
            .map(|nodes| (nodes, "redis"))
            .or_else(|| {
                url.strip_prefix("rediss+cluster://")
                    .map(|nodes| (nodes, "rediss"))
            });
        // redis-rs reads `#insecure` as "verify nothing" wherever some
        // crate enables its insecure feature: never taken here.
        if url.contains('#') {
            return Err(RedisStoreError::Config(
                "a Redis URL with a fragment (`#…`, such as `#insecure`) is not taken".into(),
            ));
        }
        // Without the feature the client is built without TLS; said here,
        // not at connect.
        if !cfg!(feature = "tls")
            && (url.starts_with("rediss://") || url.starts_with("rediss+cluster://"))
        {
            return Err(RedisStoreError::Config(
                "TLS (rediss://) needs the `tls` feature of impersonation-redis".into(),
            ));
        }
        let (urls, cluster) = match cluster_nodes {
            Some((nodes, scheme)) => {
                let nodes: Vec<&str> = nodes.split(',').map(str::trim).collect();
                let auth = nodes
                    .first()
                    .and_then(|n| n.rsplit_once('@'))
                    .map(|(auth, _)| auth);
                let urls = nodes
                    .iter()
                    .map(|n| match auth {
                        Some(auth) if !n.contains('@') => format!("{scheme}://{auth}@{n}"),
                        _ => format!("{scheme}://{n}"),
                    })
                    .collect();
                (urls, true)
            }
            None if url.starts_with("redis://") || url.starts_with("rediss://") => {
                (vec![url.to_owned()], false)
            }
            // Only the scheme: the rest may hold a password.
            None => {
                let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
                return Err(RedisStoreError::Config(format!(
                    "not a Redis URL (scheme `{scheme}`; expected redis://, rediss://, \
                     redis+cluster:// or rediss+cluster://)"
                )));
            }
        };
        Ok(Self {
            urls,
            // The whole list masked up to its last `@`, not each node's
            // URL: a `,` in a password (RFC 3986 allows it unencoded)
            // splits it across two nodes, the first then with no `@`.
            shown: impersonation_core::redacted_url(url),
            cluster,
            namespace: "impersonation".into(),
            retention: Duration::days(1),
            durability: Durability::Warn,
            tls_roots_pem: None,
        })
    }

    /// Over TLS: verify the server by these certificate authorities (PEM)
    /// rather than the system's roots, as a managed Redis needs (its
    /// provider's CA) or one with a certificate of its own. The server's
    /// name must match its certificate either way.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls_root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_roots_pem = Some(pem.into());
        self
    }

    /// A client for one node, over TLS with the roots given if any.
    fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        #[cfg(feature = "tls")]
        {
            install_crypto_provider();
            if let Some(certificates) = self.certificates() {
                return redis::Client::build_with_tls(url, certificates);
            }
        }
        redis::Client::open(url)
    }

    /// The cluster's client, over TLS with the roots given if any.
    fn cluster_client(&self) -> redis::RedisResult<redis::cluster::ClusterClient> {
        #[allow(unused_mut)]
        let mut builder = redis::cluster::ClusterClientBuilder::new(self.urls.clone());
        #[cfg(feature = "tls")]
        {
            install_crypto_provider();
            if let Some(certificates) = self.certificates() {
                builder = builder.certs(certificates);
            }
        }
        builder.build()
    }

    /// The roots given, as the Redis client takes them.
    #[cfg(feature = "tls")]
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        self.tls_roots_pem
            .as_ref()
            .map(|pem| redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            })
    }

    /// Prefix of every key (default `impersonation`), so several apps share
    /// one Redis without collision. Letters, digits, `_`, `-` and `.`.
    pub fn namespace(mut self, namespace: &str) -> Result<Self, RedisStoreError> {
        let valid = !namespace.is_empty()
            && namespace.len() <= 64
            && namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !valid {
            return Err(RedisStoreError::Config(format!(
                "invalid namespace `{namespace}`"
            )));
        }
        self.namespace = namespace.to_owned();
        Ok(self)
    }

    /// How long a session's keys outlive its end of validity (default one
    /// day, at least [`MIN_RETENTION`]): ended sessions answer "ended"
    /// rather than "unknown" meanwhile, and a session nobody came back to
    /// is still there for `Impersonation::end_lapsed` to write its end
    /// event. The audit chains never expire. A shorter retention is
    /// refused: a negative one would expire a live session's keys before
    /// the session, and with none the keys of a session that lapsed go
    /// at once, before any sweep can record how it ended. Keys live a
    /// thousand years at most, however long the retention.
    pub fn retention(mut self, retention: Duration) -> Result<Self, RedisStoreError> {
        if retention < MIN_RETENTION {
            return Err(RedisStoreError::Config(format!(
                "retention {retention} is under the minimum of {MIN_RETENTION}"
            )));
        }
        self.retention = retention;
        Ok(self)
    }

    /// Refuse to start unless the server persists data (AOF or RDB
    /// snapshots) and never evicts keys (`maxmemory-policy noeviction`, or
    /// no `maxmemory` limit).
    #[must_use]
    pub fn require_durability(mut self) -> Self {
        self.durability = Durability::Require;
        self
    }
}

/// One connection handle for both modes. Both are multiplexed and cheap to
/// clone; the manager reconnects a single server, the cluster client follows
/// MOVED/ASK and failovers.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// What the server said at start-up about keeping data: on disk, and in
/// memory when it runs out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurabilityReport {
    /// `appendonly` per node (`None`: CONFIG is not allowed there).
    pub appendonly: Vec<Option<bool>>,
    /// `save` per node.
    pub save: Vec<Option<String>>,
    /// Per node, whether it may evict keys when full: a `maxmemory` limit
    /// with a `maxmemory-policy` other than `noeviction` (the default of
    /// some hosted services). An evicted chain head, live marker or
    /// session loses audit events or lets an agent start a second session.
    pub evicts: Vec<Option<bool>>,
}

impl DurabilityReport {
    /// Whether every node persists data and never evicts keys. `None` when
    /// it could not be read.
    pub fn durable(&self) -> Option<bool> {
        let mut all = true;
        for ((aof, save), evicts) in self.appendonly.iter().zip(&self.save).zip(&self.evicts) {
            match (aof, save, evicts) {
                (_, _, None) => return None,
                (_, _, Some(true)) => all = false,
                (Some(true), _, _) => {}
                (Some(false), Some(save), _) if !save.trim().is_empty() => {}
                (Some(false), Some(_), _) => all = false,
                _ => return None,
            }
        }
        Some(all)
    }
}

type HeadCache = Arc<tokio::sync::Mutex<Option<Option<ChainHead>>>>;

/// Most chain heads a store remembers before it lets go of those no
/// write holds.
const HEADS_CAPACITY: usize = 4_096;

/// The Redis store. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    ns: String,
    retention: Duration,
    durability: DurabilityReport,
    /// Per chain: a queue for this process's writes and the last head seen.
    heads: Arc<Mutex<HashMap<ChainKey, HeadCache>>>,
    /// The sessions lookups decoded last, to skip unchanged JSON.
    decoded: Arc<DecodedSessions>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &matches!(self.conn, Conn::Cluster(_)))
            .field("namespace", &self.ns)
            .finish_non_exhaustive()
    }
}

/// The shortest [`RedisConfig::retention`] accepted: five minutes.
pub const MIN_RETENTION: Duration = Duration::minutes(5);

/// Batched calls in flight at once, per kind (see [`Store::batching`]): one
/// measured best, since calls share the multiplexed connection and a
/// chain's appends queue behind each other.
const BATCHING: Batching = Batching {
    appends: 1,
    lookups: 1,
};

/// Writes retried when another process moved a chain's head meanwhile.
const CAS_ATTEMPTS: usize = 32;

/// Attempts of a view write (5, 10, 20, 40 and 80 ms apart).
const VIEW_ATTEMPTS: u32 = 6;

/// rustls needs a process-wide crypto provider, which the Redis client
/// does not choose: `ring`, unless the application installed one first.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Lost a race with another installer: theirs serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::unavailable(e)
}

/// The error for an append the script refused because its guard failed:
/// `"notfound"` when the session is gone, otherwise not active.
fn guard_refusal(why: &str, id: SessionId) -> StoreError {
    if why == "notfound" {
        StoreError::SessionNotFound(id)
    } else {
        StoreError::SessionNotActive(id)
    }
}

/// Whether a call's reply never came (the client's response timeout
/// passed, or the connection dropped): the call may or may not have run.
fn reply_lost(e: &redis::RedisError) -> bool {
    e.is_timeout() || e.is_connection_dropped()
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

use impersonation_core::unix_micros as micros;

/// A time stored as microseconds since the epoch, in the session hash's
/// `field`.
fn from_micros(field: &str, text: &str) -> Result<OffsetDateTime, StoreError> {
    let us: i64 = text.parse().map_err(|e| corrupt(field, e))?;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000).map_err(|e| corrupt(field, e))
}

/// An event's record could not be written (it cannot happen for the
/// plain data an event holds; a typed error all the same).
fn unrecorded(e: serde_json::Error) -> StoreError {
    corrupt("audit event", e)
}

/// An event read back from its stored record.
fn read_record(text: &str) -> Result<AuditEvent, StoreError> {
    AuditEvent::from_record(text).map_err(|e| corrupt("audit event", e))
}

fn to_json<T: serde::Serialize>(what: &str, value: &T) -> Result<String, StoreError> {
    // Room for a typical event or session record, so the buffer seldom grows.
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, value).map_err(|e| corrupt(what, e))?;
    String::from_utf8(out).map_err(|e| corrupt(what, e))
}

/// A session's stored fields, in the scripts' order.
fn session_fields(s: &Session) -> Result<[String; 8], StoreError> {
    Ok([
        to_json("session record", s)?,
        to_json("shadow user", &s.shadow)?,
        s.state.code().to_owned(),
        s.version.to_string(),
        micros(s.last_seen_at).to_string(),
        micros(s.last_checked_at).to_string(),
        micros(s.expires_at).to_string(),
        s.grant.idle_timeout.whole_microseconds().to_string(),
    ])
}

/// A damaged session hash (some of its fields but not all), as the error
/// it is, never read as "no session".
fn damaged(missing: &[&str]) -> StoreError {
    corrupt(
        "session hash",
        format!("fields missing: {}", missing.join(", ")),
    )
}

/// Whether a stored number is an integer as the client writes them: an
/// optional `-` and decimal digits, nothing else (the resolve script's
/// pattern, `^%-?%d+$`).
fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A session hash whose fields the scripts read as numbers are not.
fn not_numbers(fields: &[&str]) -> StoreError {
    corrupt(
        "session hash",
        format!("fields not numbers: {}", fields.join(", ")),
    )
}

/// A session from `[record, shadow, last_seen_us, last_checked_us, version]`,
/// reusing the last decode of this secret's session (`key`) when its
/// stored texts are unchanged.
fn decode_session(
    fields: &[Option<String>],
    key: Option<(SecretHash, &DecodedSessions)>,
) -> Result<Session, StoreError> {
    let [
        Some(record),
        Some(shadow),
        Some(seen),
        Some(checked),
        Some(version),
    ] = fields
    else {
        return Err(corrupt("session reply", format!("{} fields", fields.len())));
    };
    let mut session = match key {
        Some((key, decoded)) => decoded.decode(key, record, shadow),
        None => DecodedSessions::parse(record, shadow),
    }
    .map_err(|e| corrupt("session record", e))?;
    session.last_seen_at = from_micros("last_seen_us", seen)?;
    session.last_checked_at = from_micros("last_checked_us", checked)?;
    session.version = version.parse().map_err(|e| corrupt("version", e))?;
    Ok(session)
}

/// The session hash's fields the client decodes, then those only the
/// scripts read (the session's state and times, kept beside its record).
const SESSION_FIELDS: [&str; 8] = [
    "record",
    "shadow",
    "last_seen_us",
    "last_checked_us",
    "version",
    "state",
    "expires_us",
    "idle_us",
];

/// The fields of `SESSION_FIELDS` the resolve script reads as numbers
/// (it checks them with the pattern `is_integer` follows).
const SCRIPT_NUMBERS: [&str; 3] = ["last_seen_us", "expires_us", "idle_us"];

/// How many of `SESSION_FIELDS` the client decodes.
const DECODED_FIELDS: usize = 5;

fn parse_head(seq: &str, hash: &str) -> Result<Option<ChainHead>, StoreError> {
    if seq == "-1" {
        return Ok(None);
    }
    Ok(Some(ChainHead {
        seq: seq.parse().map_err(|e| corrupt("chain head", e))?,
        hash: EventHash::from_hex(hash).map_err(|e| corrupt("chain head hash", e))?,
    }))
}

/// A session read for a listing: `None` if its hash is damaged, which is
/// logged and left out, so that one damaged session does not fail a
/// revocation of all the others (it cannot be used: a lookup of it fails
/// as corrupt). Any other error fails the listing.
fn listed(
    id: SessionId,
    read: Result<Option<Session>, StoreError>,
) -> Result<Option<Option<Session>>, StoreError> {
    match read {
        Ok(session) => Ok(Some(session)),
        Err(StoreError::Corrupt(why)) => {
            tracing::error!(session = %id, error = %why, "a damaged session is left out of a listing; repair or delete its keys");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The head a compare-and-set script reported when the chain had moved:
/// `{'head', seq, hash}`.
fn moved_head(reply: &[String]) -> Result<Option<ChainHead>, StoreError> {
    parse_head(
        reply.get(1).map_or("-1", String::as_str),
        reply.get(2).map_or("", String::as_str),
    )
}

/// What a lookup by id writes back of a session's route key (`where`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PutBack {
    /// Nothing: the key held the route.
    No,
    /// The route, unless a key has come meanwhile: it was missing.
    IfMissing,
    /// The route, over what is there: it held something else (damage).
    OverDamage,
}

/// A write that follows a committed script (views, live sets, the route
/// key), whose data derives from what the script wrote. Its failure is
/// logged, not returned: a caller told that a committed change failed
/// would lose what it made (the secret of a session that exists and blocks
/// the agent's next start) or make it again (the same events twice).
/// `RedisStore::rebuild_indexes` rebuilds the views from the chains;
/// readers skip stale live-set entries.
fn after_commit(what: &str, written: Result<(), StoreError>) {
    if let Err(e) = written {
        tracing::error!(
            error = %e,
            "{what} could not be written after the change was committed; \
             the change stands (RedisStore::rebuild_indexes puts back missing audit views; \
             stale live-set entries are skipped by readers)"
        );
    }
}

/// The head a script reports beside its answer, at `at` and `at + 1`, when
/// it found the call already applied (sent again after a lost reply): the
/// chain may have moved on since. `None`: not reported.
fn reported_head(reply: &[String], at: usize) -> Result<Option<Option<ChainHead>>, StoreError> {
    match (reply.get(at), reply.get(at + 1)) {
        (Some(seq), Some(hash)) => parse_head(seq, hash).map(Some),
        _ => Ok(None),
    }
}

fn head_args(head: Option<ChainHead>) -> (String, String) {
    match head {
        Some(h) => (h.seq.to_string(), h.hash.to_hex()),
        None => ("-1".into(), String::new()),
    }
}

/// A session's keys' time to live, in milliseconds: until it expires,
/// then `retention` more. At most a thousand years: Redis refuses an
/// expiry past the end of its clock (`PX` near `i64::MAX`), and a huge
/// retention would overflow the sum.
fn ttl_ms(expires_at: OffsetDateTime, now: OffsetDateTime, retention: Duration) -> i64 {
    const MAX_TTL_MS: i64 = 1_000 * 366 * 24 * 3_600 * 1_000;
    let left = (expires_at - now)
        .max(Duration::ZERO)
        .saturating_add(retention);
    i64::try_from(left.whole_milliseconds())
        .unwrap_or(MAX_TTL_MS)
        .clamp(1, MAX_TTL_MS)
}

// The most events one view entry lists (one `XRANGE` of at most that many
// when the view is read), and the views.
use impersonation_core::views::{RUN_LEN, View};

/// One view key and its entries: (score, member).
type ViewEntries = (String, Vec<(i64, String)>);

/// One `ZADD` (scores and members) or `ZREM` (members) per view key.
fn view_commands(views: &[ViewEntries], command: &str) -> Vec<Cmd> {
    let adding = command == "ZADD";
    views
        .iter()
        .filter(|(_, entries)| !entries.is_empty())
        .map(|(key, entries)| {
            let mut c = Cmd::with_capacity(
                2 + 2 * entries.len(),
                command.len()
                    + key.len()
                    + entries.iter().map(|(_, m)| m.len() + 20).sum::<usize>(),
            );
            c.arg(command).arg(key);
            for (score, member) in entries {
                if adding {
                    c.arg(score);
                }
                c.arg(member);
            }
            c
        })
        .collect()
}

/// The entries of `old` that `new` does not list again (same key, same
/// member): those to take back once `new` replaces them.
fn views_without(old: Vec<ViewEntries>, new: &[ViewEntries]) -> Vec<ViewEntries> {
    old.into_iter()
        .map(|(key, entries)| {
            let again = new.iter().find(|(k, _)| *k == key).map(|(_, e)| e);
            let entries = entries
                .into_iter()
                .filter(|(_, m)| again.is_none_or(|e| !e.iter().any(|(_, n)| n == m)))
                .collect();
            (key, entries)
        })
        .collect()
}

/// A view entry's member: `first-seq|last-seq|first-event-id|chain`; or,
/// as written before runs, one event: `event-id|seq|route|chain`.
struct Member<'a> {
    first: u64,
    last: u64,
    id: &'a str,
    chain: ChainKey,
}

impl<'a> Member<'a> {
    fn parse(member: &'a str) -> Result<Self, StoreError> {
        let mut parts = member.splitn(4, '|');
        let (Some(first), Some(last), Some(id), Some(chain)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(corrupt("view entry", "not first|last|id|chain"));
        };
        let Ok(first) = first.parse::<u64>() else {
            // The earlier form: the event's id comes first, then its place.
            let seq: u64 = last.parse().map_err(|e| corrupt("view entry", e))?;
            if seq == u64::MAX {
                return Err(corrupt("view entry", "no stream id for its place"));
            }
            return Ok(Self {
                first: seq,
                last: seq,
                id: first,
                chain: ChainKey::from_stored(chain),
            });
        };
        let last: u64 = last.parse().map_err(|e| corrupt("view entry", e))?;
        // An event at `seq` is stream entry `0-(seq + 1)`.
        if last < first || last - first >= RUN_LEN as u64 || last == u64::MAX {
            return Err(corrupt("view entry", "run out of bounds"));
        }
        Ok(Self {
            first,
            last,
            id,
            chain: ChainKey::from_stored(chain),
        })
    }
}

impl RedisStore {
    /// Connects, loads nothing eagerly (scripts load on first use), and reads
    /// the server's persistence settings: warns through `tracing`, or refuses
    /// with [`RedisConfig::require_durability`], if the audit trail could be
    /// lost on restart.
    pub async fn connect(config: RedisConfig) -> Result<Self, RedisStoreError> {
        let connect_err = |e: redis::RedisError| RedisStoreError::Connect(e.to_string());
        // Roots for a plain-text URL would be ignored by the cluster client,
        // which then connects in plain text: refused for either kind.
        if config.tls_roots_pem.is_some() && !config.urls.iter().all(|u| u.starts_with("rediss://"))
        {
            return Err(RedisStoreError::Config(
                "TLS roots were given for a plain-text URL: use rediss:// (or rediss+cluster://)"
                    .into(),
            ));
        }
        let conn = if config.cluster {
            let client = config.cluster_client().map_err(connect_err)?;
            Conn::Cluster(client.get_async_connection().await.map_err(connect_err)?)
        } else {
            let url = config
                .urls
                .first()
                .ok_or_else(|| RedisStoreError::Config("no URL".into()))?;
            let client = config.client(url).map_err(connect_err)?;
            Conn::Single(ConnectionManager::new(client).await.map_err(connect_err)?)
        };
        let durability = Self::read_durability(&config).await;
        match (durability.durable(), config.durability) {
            (Some(true), _) => {}
            (Some(false), Durability::Require) => {
                return Err(RedisStoreError::NotDurable(format!("{durability:?}")));
            }
            (Some(false), Durability::Warn) => tracing::warn!(
                report = ?durability,
                "Redis keeps nothing on disk, or evicts keys when full: the impersonation audit trail \
                 can be lost; enable appendonly (appendfsync everysec or always) and set \
                 maxmemory-policy noeviction for production"
            ),
            (None, Durability::Require) => {
                return Err(RedisStoreError::NotDurable(
                    "CONFIG GET is not allowed, persistence unknown".into(),
                ));
            }
            (None, Durability::Warn) => {
                tracing::warn!("cannot read Redis persistence settings (CONFIG GET refused)")
            }
        }
        Ok(Self {
            conn,
            ns: config.namespace,
            retention: config.retention,
            durability,
            heads: Arc::new(Mutex::new(HashMap::new())),
            decoded: Arc::default(),
        })
    }

    async fn read_durability(config: &RedisConfig) -> DurabilityReport {
        let mut report = DurabilityReport {
            appendonly: Vec::new(),
            save: Vec::new(),
            evicts: Vec::new(),
        };
        for url in &config.urls {
            let read = async {
                let client = config.client(url)?;
                let mut c = client.get_multiplexed_async_connection().await?;
                let aof: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("appendonly")
                    .query_async(&mut c)
                    .await?;
                let save: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("save")
                    .query_async(&mut c)
                    .await?;
                // A limit of 0 is none: nothing is evicted, whatever the policy.
                let limit: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("maxmemory")
                    .query_async(&mut c)
                    .await?;
                let policy: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("maxmemory-policy")
                    .query_async(&mut c)
                    .await?;
                let evicts = match (limit.get(1), policy.get(1)) {
                    (Some(limit), Some(policy)) => {
                        Some(limit.trim() != "0" && policy.trim() != "noeviction")
                    }
                    _ => None,
                };
                Ok::<_, redis::RedisError>((
                    aof.get(1).map(|v| v == "yes"),
                    save.get(1).cloned(),
                    evicts,
                ))
            };
            let (aof, save, evicts) = read.await.unwrap_or((None, None, None));
            report.appendonly.push(aof);
            report.save.push(save);
            report.evicts.push(evicts);
        }
        report
    }

    /// The persistence settings read at start-up.
    pub fn durability(&self) -> &DurabilityReport {
        &self.durability
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn chain_cache(&self, chain: &ChainKey) -> HeadCache {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded, as the Diesel store's: one entry per chain ever written
        // (every agent, every customer revoked) would grow for the
        // process's life. Only entries no write holds go; a chain that
        // lost its entry reads its head once more.
        if heads.len() >= HEADS_CAPACITY && !heads.contains_key(chain) {
            heads.retain(|_, cache| Arc::strong_count(cache) > 1);
        }
        Arc::clone(heads.entry(chain.clone()).or_default())
    }

    /// Runs a compare-and-set script. On a Redis error the script may or may
    /// not have run, so the cached head is forgotten.
    ///
    /// The cluster client sends a call again when its connection drops,
    /// also after the script ran; the scripts answer such a second run as
    /// the first one did, since they find the call's first event at its
    /// place (`landed` in the scripts), so no write is made twice. A reply
    /// lost here (the response timeout passed, the connection dropped) is
    /// sent again once the same way: a server slow to answer (a slow
    /// `fsync`) has most likely run the call, and the caller learns its
    /// outcome rather than the failure of a write that was made.
    async fn invoke_cas(
        &self,
        call: &ScriptCall,
        cached: &mut Option<Option<ChainHead>>,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let answer = match call.invoke(&mut conn).await {
            Err(e) if reply_lost(&e) => {
                tracing::warn!(error = %e, "a write's reply was lost; sending the call again");
                call.invoke(&mut conn).await
            }
            answer => answer,
        };
        answer.map_err(|e| {
            *cached = None;
            unavailable(e)
        })
    }

    async fn read_head(&self, slot: &Slot) -> Result<Option<ChainHead>, StoreError> {
        let mut conn = self.conn.clone();
        let head: (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(slot.head())
            .arg("seq")
            .arg("hash")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match head {
            (Some(seq), Some(hash)) => parse_head(&seq, &hash),
            (None, None) => Ok(None),
            (seq, _) => Err(corrupt(
                "chain head",
                format!("without its {}", if seq.is_none() { "seq" } else { "hash" }),
            )),
        }
    }

    /// Runs independent commands: on one server as one pipeline (one
    /// write, one read), on a cluster concurrently (a cluster pipeline must
    /// stay in one hash slot, and these span several).
    async fn run_all(&self, cmds: Vec<Cmd>) -> Result<(), StoreError> {
        if cmds.is_empty() {
            return Ok(());
        }
        if let Conn::Single(_) = &self.conn {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd).ignore();
            }
            let mut conn = self.conn.clone();
            // Every command sent here sets what it sets (`SADD`, `HSET`,
            // `ZADD`, `SET`, `ZREM`…): one whose reply was lost goes again.
            return match pipe.query_async::<()>(&mut conn).await {
                Err(e) if reply_lost(&e) => pipe.query_async::<()>(&mut conn).await,
                done => done,
            }
            .map_err(unavailable);
        }
        let futures = cmds.into_iter().map(|cmd| {
            let mut conn = self.conn.clone();
            async move { cmd.query_async::<Value>(&mut conn).await }
        });
        try_join_all(futures).await.map_err(unavailable)?;
        Ok(())
    }

    /// Writes view entries (`ZADD`, `ZREM`), tried again a few times on a
    /// failure (a connection killed mid-write, which the client reopens):
    /// they are idempotent, and an entry missed for good hides its event
    /// from every query by that view until `rebuild_indexes`. At most
    /// about 150 ms more, then the failure is the caller's to log.
    async fn write_views(&self, cmds: Vec<Cmd>) -> Result<(), StoreError> {
        let mut wait = std::time::Duration::from_millis(5);
        let mut attempt = 1;
        loop {
            match self.run_all(cmds.clone()).await {
                Err(_) if attempt < VIEW_ATTEMPTS => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                written => return written,
            }
        }
    }

    /// The end of a committed script's view writes (`written`): a failure
    /// is logged, as [`after_commit`] logs it, and `chain` is marked in
    /// the stale-views hash from `seq` (its first event the views miss; an
    /// earlier mark's lower place is kept), so that the next `audit`
    /// rebuilds its views from there before it reads (the events are on the
    /// chain; only the views that find them are missing). If the mark
    /// cannot be written either, the views stay as they are until
    /// `rebuild_indexes`.
    async fn views_written(
        &self,
        what: &str,
        chain: &ChainKey,
        seq: u64,
        written: Result<(), StoreError>,
    ) {
        if written.is_ok() {
            return;
        }
        after_commit(what, written);
        // A fresh nonce each time, so that a rebuild that read the chain
        // before this failure does not take this mark with its own.
        let mut mark = redis::cmd("EVAL");
        mark.arg(MARK_STALE)
            .arg(1)
            .arg(stale_views(&self.ns))
            .arg(chain.as_str())
            .arg(seq)
            .arg(uuid::Uuid::now_v7().simple().to_string());
        if let Err(e) = self.write_views(vec![mark]).await {
            tracing::error!(
                error = %e,
                chain = %chain,
                "the chain could not be marked for a rebuild of its views either; \
                 RedisStore::rebuild_indexes puts them back"
            );
        }
    }

    /// Rebuilds the views of the chains marked stale ([`Self::views_written`])
    /// before `audit` reads them, each from its first missing event; a
    /// chain's mark is taken only once its views are back, and only if no
    /// later failure marked it again meanwhile. A chain whose views cannot
    /// be rebuilt (the server gone again, a damaged entry) keeps its mark
    /// and is logged at `error`, and the read goes on without it: one bad
    /// chain does not fail every query of the trail.
    async fn heal_stale_views(&self) {
        let mut conn = self.conn.clone();
        let read: redis::RedisResult<Vec<(String, String)>> = redis::cmd("HGETALL")
            .arg(stale_views(&self.ns))
            .query_async(&mut conn)
            .await;
        let marked = match read {
            Ok(marked) => marked,
            Err(e) => {
                tracing::warn!(error = %e, "the stale audit views could not be read; reading the views as they are");
                return;
            }
        };
        for (chain, mark) in marked {
            let key = ChainKey::from_stored(chain);
            match self.heal_chain(&key, &mark).await {
                Ok(indexed) => tracing::warn!(
                    chain = %key,
                    events = indexed,
                    "audit views missing after a failed write were rebuilt from the chain"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    chain = %key,
                    "audit views missing after a failed write could not be rebuilt; \
                     this read may miss the chain's events (RedisStore::rebuild_indexes)"
                ),
            }
        }
    }

    /// Rebuilds `chain`'s views from the position its stale `mark` names,
    /// then takes the mark if it is still that one; the events indexed.
    async fn heal_chain(&self, chain: &ChainKey, mark: &str) -> Result<u64, StoreError> {
        let from = mark
            .split_once('|')
            .and_then(|(seq, _)| seq.parse::<u64>().ok())
            .unwrap_or(0);
        let indexed = self.reindex_chain(chain, from).await?;
        let mut take = redis::cmd("EVAL");
        take.arg(UNMARK_STALE)
            .arg(1)
            .arg(stale_views(&self.ns))
            .arg(chain.as_str())
            .arg(mark);
        let mut conn = self.conn.clone();
        take.query_async::<Value>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(indexed)
    }

    /// Takes back view entries written beside a script for an outcome that
    /// did not happen; a failure is logged as `what` (readers skip such an
    /// entry meanwhile: no event of its id is at its place).
    async fn take_back_views(&self, what: &str, entries: Vec<ViewEntries>) {
        after_commit(
            what,
            self.write_views(view_commands(&entries, "ZREM")).await,
        );
    }

    /// The entries of `events` written, with those of `stale` (an
    /// attempt that did not land) taken back unless listed again: the
    /// commands that go out beside a script.
    fn views_beside(&self, entries: &[ViewEntries], stale: Vec<ViewEntries>) -> Vec<Cmd> {
        let mut cmds = view_commands(&views_without(stale, entries), "ZREM");
        cmds.extend(view_commands(entries, "ZADD"));
        cmds
    }

    /// The view entries of `events` (consecutive events of one chain, in
    /// chain order): per view key, the runs of consecutive events in that
    /// view ([`impersonation_core::views`]), each as its score and member
    /// `first-seq|last-seq|first-event-id|chain`. A batch's events mostly
    /// share their agent, customer, tenant and session, so a batch costs
    /// each view one entry, not one per event.
    fn view_entries(&self, events: &[&AuditEvent]) -> Vec<ViewEntries> {
        let mut out: Vec<ViewEntries> = Vec::new();
        let mut last: Option<(View, String)> = None;
        for run in impersonation_core::views::view_runs(events) {
            let member = format!(
                "{}|{}|{}|{}",
                run.first_seq,
                run.last_seq,
                run.first_id,
                run.chain.as_str()
            );
            // Runs of one key come out together.
            let same = last
                .as_ref()
                .is_some_and(|(v, k)| *v == run.view && *k == run.key);
            match out.last_mut() {
                Some((_, entries)) if same => entries.push((run.first_at_us, member)),
                _ => {
                    let key = match run.view {
                        View::All => audit_all(&self.ns),
                        v => audit_index(&self.ns, v.code(), &run.key),
                    };
                    out.push((key, vec![(run.first_at_us, member)]));
                    last = Some((run.view, run.key));
                }
            }
        }
        out
    }

    /// Appends one chain's share of a batch with one script call (more only
    /// if a guard refuses or another process moves the head). `items` carry
    /// their positions in the batch; each draft is sealed once, and only
    /// resealed (its place and hash) when a retry finds another head. Each
    /// position gets its result: a guard's refusal stands even if a later
    /// attempt for the rest fails (the service records a change refused for
    /// its ended session after the end, which an outage would not let it),
    /// and the rest share that failure.
    async fn append_chain(
        &self,
        chain: &ChainKey,
        items: Vec<(usize, AuditDraft, AppendGuard)>,
    ) -> Vec<(usize, Result<AuditEvent, StoreError>)> {
        let positions: Vec<usize> = items.iter().map(|(i, _, _)| *i).collect();
        let mut done = Vec::with_capacity(items.len());
        if let Err(e) = self.append_chain_deciding(chain, items, &mut done).await {
            let decided: std::collections::HashSet<usize> = done.iter().map(|(i, _)| *i).collect();
            done.extend(
                positions
                    .into_iter()
                    .filter(|i| !decided.contains(i))
                    .map(|i| (i, Err(e.clone()))),
            );
        }
        done
    }

    /// [`Self::append_chain`]'s attempts, each position's result put in
    /// `done` once decided.
    async fn append_chain_deciding(
        &self,
        chain: &ChainKey,
        items: Vec<(usize, AuditDraft, AppendGuard)>,
        done: &mut Vec<(usize, Result<AuditEvent, StoreError>)>,
    ) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let slot = Slot::of_chain(&self.ns, chain);
        let cache = self.chain_cache(chain);
        let mut cached = cache.lock().await;
        let mut drafts = Some(items);
        // Sealed events with their batch positions and guards. Every retry
        // follows a moved head or a refusal that shifted the batch, so it
        // reseals them all.
        let mut sealed: Vec<(usize, AuditEvent, AppendGuard)> = Vec::new();
        // The events as the last attempt, which wrote nothing, listed them
        // in the views: their entries are taken back with the next attempt
        // (all but those it lists again at the same place).
        let mut unwritten: Vec<AuditEvent> = Vec::new();
        for _ in 0..CAS_ATTEMPTS {
            let head = match *cached {
                Some(h) => h,
                None => self.read_head(&slot).await?,
            };
            let mut next = head;
            // Each event's record is written in the pass that hashes it.
            let mut records = Vec::with_capacity(sealed.len());
            if let Some(items) = drafts.take() {
                records.reserve(items.len());
                sealed = Vec::with_capacity(items.len());
                for (i, draft, guard) in items {
                    let (event, record) = draft.seal_to_record(next).map_err(unrecorded)?;
                    next = Some(event.head());
                    records.push(record);
                    sealed.push((i, event, guard));
                }
            } else {
                for (_, event, _) in &mut sealed {
                    records.push(event.reseal_to_record(next).map_err(unrecorded)?);
                    next = Some(event.head());
                }
            }
            // The guarding sessions, each once (a batch's events mostly
            // share one), and each event's guard as its place among them.
            let mut keys = vec![slot.head(), slot.chain()];
            let mut guarding: Vec<SessionId> = Vec::new();
            let guards: Vec<usize> = sealed
                .iter()
                .map(|(_, _, guard)| match guard {
                    AppendGuard::None => 0,
                    AppendGuard::SessionActive(id) => match guarding.iter().position(|g| g == id) {
                        Some(k) => k + 1,
                        None => {
                            guarding.push(*id);
                            keys.push(slot.session(*id));
                            guarding.len()
                        }
                    },
                })
                .collect();
            if !slot.owns_all(&keys.iter().map(String::as_str).collect::<Vec<_>>()) {
                return Err(StoreError::Corrupt(
                    "append script keys span hash slots".into(),
                ));
            }
            let (seq, hash) = head_args(head);
            let (last_seq, last_hash) = head_args(next);
            let bytes = seq.len()
                + hash.len()
                + last_seq.len()
                + last_hash.len()
                + records.iter().map(|r| r.len() + 4).sum::<usize>();
            let mut inv = ScriptCall::new(&APPEND_MANY_SCRIPT, &keys, 4 + 2 * records.len(), bytes);
            inv.arg(&seq).arg(&hash).arg(&last_seq).arg(&last_hash);
            for (guard, record) in guards.iter().zip(&records) {
                inv.arg(guard).arg(record.as_str());
            }
            // The views go out with the script, not after it: one round
            // trip for both. Readers skip an entry whose event is not at
            // its position, so entries of an attempt the script refuses
            // are harmless, and removed with the next attempt.
            let events: Vec<&AuditEvent> = sealed.iter().map(|(_, e, _)| e).collect();
            let entries = self.view_entries(&events);
            let stale = views_without(
                self.view_entries(&unwritten.iter().collect::<Vec<_>>()),
                &entries,
            );
            let mut views = view_commands(&stale, "ZREM");
            views.extend(view_commands(&entries, "ZADD"));
            // A chain's first event: the chain is listed before the script
            // writes it, as a start lists its own, so that no failure after
            // the script (a view write, the process) leaves a chain that
            // nothing lists and `verify_all` never checks.
            if sealed.first().is_some_and(|(_, e, _)| e.seq == 0) {
                self.run_all(vec![self.list_chain(chain)]).await?;
            }
            let (reply, indexed) =
                tokio::join!(self.invoke_cas(&inv, &mut cached), self.write_views(views));
            let reply = reply?;
            let status = reply.first().map(String::as_str);
            unwritten = if status == Some("ok") {
                Vec::new()
            } else {
                events.into_iter().cloned().collect()
            };
            match status {
                Some("head") => *cached = Some(moved_head(&reply)?),
                Some("ok") => {
                    *cached = Some(reported_head(&reply, 1)?.unwrap_or(next));
                    drop(cached);
                    let first = sealed.first().map_or(0, |(_, e, _)| e.seq);
                    self.views_written("the events' views", chain, first, indexed)
                        .await;
                    done.extend(sealed.into_iter().map(|(i, e, _)| (i, Ok(e))));
                    return Ok(());
                }
                Some("refused") => {
                    *cached = Some(head);
                    let refused: HashMap<usize, &str> = reply[1..]
                        .chunks(2)
                        .filter_map(|pair| match pair {
                            [at, why] => Some((at.parse().ok()?, why.as_str())),
                            _ => None,
                        })
                        .collect();
                    if refused.is_empty() {
                        return Err(corrupt("append reply", "refused nothing"));
                    }
                    let mut kept = Vec::with_capacity(sealed.len());
                    for (k, item) in std::mem::take(&mut sealed).into_iter().enumerate() {
                        let Some(why) = refused.get(&(k + 1)) else {
                            kept.push(item);
                            continue;
                        };
                        let AppendGuard::SessionActive(id) = item.2 else {
                            return Err(corrupt("append reply", "refused an unguarded event"));
                        };
                        done.push((item.0, Err(guard_refusal(why, id))));
                    }
                    // Those kept move up into the refused events' places.
                    sealed = kept;
                    if sealed.is_empty() {
                        // Every event refused: the refusals are the answer
                        // (a change refused for its ended session is then
                        // recorded after the end), whatever becomes of this
                        // attempt's view entries. Readers skip them; a
                        // failure to take them back is only logged.
                        drop(cached);
                        let stale: Vec<&AuditEvent> = unwritten.iter().collect();
                        self.take_back_views("a refused batch's views", self.view_entries(&stale))
                            .await;
                        return Ok(());
                    }
                }
                other => return Err(corrupt("append reply", format!("{other:?}"))),
            }
        }
        Err(StoreError::unavailable_because(
            "the chain head kept moving; gave up",
        ))
    }

    fn live_sets(&self, session: &Session) -> [String; 3] {
        [
            live_set(&self.ns, "subject", session.subject.id.as_str()),
            live_set(&self.ns, "tenant", session.tenant().as_str()),
            live_all(&self.ns),
        ]
    }

    /// The command that records session `id`'s route (the key that finds
    /// it by id), to live `ttl_ms` like the session's own keys.
    fn set_route(&self, id: SessionId, route: &str, ttl_ms: i64) -> Cmd {
        let mut c = redis::cmd("SET");
        c.arg(where_key(&self.ns, id))
            .arg(route)
            .arg("PX")
            .arg(ttl_ms);
        c
    }

    /// The command that puts `chain` in the chain list (if not yet there).
    fn list_chain(&self, chain: &ChainKey) -> Cmd {
        let mut c = redis::cmd("ZADD");
        c.arg(chains(&self.ns)).arg("NX").arg(0).arg(chain.as_str());
        c
    }

    async fn forget_live(&self, session: &Session, route: &str) -> Result<(), StoreError> {
        let mut cmds = self.live_removals(session, route);
        // And its route, written before the start, which would otherwise
        // stay for the session's validity and retention.
        let mut c = redis::cmd("DEL");
        c.arg(where_key(&self.ns, session.id));
        cmds.push(c);
        self.run_all(cmds).await
    }

    /// The commands that take `session` out of the live sets and the live
    /// routes.
    fn live_removals(&self, session: &Session, route: &str) -> Vec<Cmd> {
        let member = format!("{route}|{}", session.id);
        let mut cmds: Vec<Cmd> = self
            .live_sets(session)
            .into_iter()
            .map(|k| {
                let mut c = redis::cmd("SREM");
                c.arg(k).arg(&member);
                c
            })
            .collect();
        let mut c = redis::cmd("HDEL");
        c.arg(live_routes(&self.ns)).arg(session.id.to_string());
        cmds.push(c);
        cmds
    }

    async fn session_in(&self, slot: &Slot, id: SessionId) -> Result<Option<Session>, StoreError> {
        let mut conn = self.conn.clone();
        // Read as bytes: a key that is not a hash, or a field that is not
        // UTF-8, is damage (left out of a listing), not an outage.
        let raw: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(slot.session(id))
            .arg(&SESSION_FIELDS[..])
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                if e.code() == Some("WRONGTYPE") {
                    corrupt("session key", "not a hash")
                } else {
                    unavailable(e)
                }
            })?;
        let fields = raw
            .into_iter()
            .map(|f| f.map(String::from_utf8).transpose())
            .collect::<Result<Vec<Option<String>>, _>>()
            .map_err(|e| corrupt("session field", e))?;
        if fields.iter().all(Option::is_none) {
            return Ok(None);
        }
        let missing: Vec<&str> = SESSION_FIELDS
            .iter()
            .zip(&fields)
            .filter(|(_, f)| f.is_none())
            .map(|(name, _)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(damaged(&missing));
        }
        // The fields the resolve script reads as numbers must be integers
        // as it finds them, or a lookup by secret fails where this one
        // answers.
        let bad: Vec<&str> = SESSION_FIELDS
            .iter()
            .zip(&fields)
            .filter(|(name, f)| {
                SCRIPT_NUMBERS.contains(*name) && !f.as_deref().is_some_and(is_integer)
            })
            .map(|(name, _)| *name)
            .collect();
        if !bad.is_empty() {
            return Err(not_numbers(&bad));
        }
        decode_session(&fields[..DECODED_FIELDS], None).map(Some)
    }

    /// Session `id`'s route, and whether it came from the live sets
    /// because its own key (`where`) was missing or damaged (what to put
    /// back).
    ///
    /// The `where` key lives as long as the session's keys, but the write
    /// that extends it after an activation follows the committed script
    /// and may fail (logged by `after_commit`); the old expiry would then
    /// lose a session still in use, and a revocation by id would find
    /// nothing: fail open. A live session is always in `live:routes`
    /// (written before its start script, taken out when it ends), so a
    /// missing key is looked up there, in one step, before the answer is
    /// "no such session".
    ///
    /// A key that holds no route (damage: a hand edit, a partial restore)
    /// is taken as missing, so that it cannot send the lookup to another
    /// slot and answer "no such session" for a live one; the route found
    /// then is written over it.
    async fn route_of(&self, id: SessionId) -> Result<Option<(String, PutBack)>, StoreError> {
        let mut conn = self.conn.clone();
        let read: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET")
            .arg(where_key(&self.ns, id))
            .query_async(&mut conn)
            .await;
        let put_back = match read {
            Ok(None) => PutBack::IfMissing,
            Ok(Some(bytes)) => match String::from_utf8(bytes) {
                Ok(route) if is_route(&route) => return Ok(Some((route, PutBack::No))),
                _ => PutBack::OverDamage,
            },
            Err(e) if e.code() == Some("WRONGTYPE") => PutBack::OverDamage,
            Err(e) => return Err(unavailable(e)),
        };
        if put_back == PutBack::OverDamage {
            tracing::warn!(
                session = %id,
                "a session's route key is damaged; looking among the live routes"
            );
        }
        let live: Option<String> = redis::cmd("HGET")
            .arg(live_routes(&self.ns))
            .arg(id.to_string())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(live.filter(|r| is_route(r)).map(|r| (r, put_back)))
    }

    /// Rebuilds the derived views (audit indexes, chain list) from the chains
    /// themselves, after a crash between a script and its index writes:
    /// every event of each chain in `chains_to_scan` is put back in its
    /// views, and the chain in the chain list. Returns the events indexed.
    ///
    /// It also lists every live session in `live:routes` (which finds one
    /// by id when its own key has run out): run it once after upgrading
    /// from a version without that list, for the sessions live then.
    pub async fn rebuild_indexes(&self, chains_to_scan: &[ChainKey]) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let live: Vec<String> = redis::cmd("SMEMBERS")
            .arg(live_all(&self.ns))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let routes: Vec<(&str, &str)> = live
            .iter()
            .filter_map(|m| m.split_once('|'))
            .filter(|(route, _)| is_route(route))
            .map(|(route, id)| (id, route))
            .collect();
        for batch in routes.chunks(500) {
            let mut c = redis::cmd("HSET");
            c.arg(live_routes(&self.ns));
            for (id, route) in batch {
                c.arg(*id).arg(*route);
            }
            let _: Value = c.query_async(&mut conn).await.map_err(unavailable)?;
        }
        let mut indexed = 0;
        for chain in chains_to_scan {
            indexed += self.reindex_chain(chain, 0).await?;
            let mut conn = self.conn.clone();
            let _: Value = redis::cmd("ZADD")
                .arg(chains(&self.ns))
                .arg(0)
                .arg(chain.as_str())
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(indexed)
    }

    /// Writes the view entries of every event of `chain` from position
    /// `from` (idempotent); the events indexed.
    async fn reindex_chain(&self, chain: &ChainKey, from: u64) -> Result<u64, StoreError> {
        let mut indexed = 0;
        let mut from = from;
        loop {
            let page = self.chain_events(chain, from, 500).await?;
            let events: Vec<&AuditEvent> = page.iter().collect();
            self.run_all(view_commands(&self.view_entries(&events), "ZADD"))
                .await?;
            indexed += page.len() as u64;
            if page.len() < 500 {
                return Ok(indexed);
            }
            from += page.len() as u64;
        }
    }

    /// The events a view entry lists, read from their chain in one
    /// `XRANGE`; none if the entry's first event is not the one at that
    /// position (an attempt that wrote nothing listed it).
    async fn fetch_run(&self, member: &str) -> Result<Vec<AuditEvent>, StoreError> {
        let member = Member::parse(member)?;
        let slot = Slot::of_chain(&self.ns, &member.chain);
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(slot.chain())
            .arg(format!("0-{}", member.first + 1))
            .arg(format!("0-{}", member.last + 1))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut events = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let Some(json) = entry.get::<String>("e") else {
                return Err(corrupt("chain entry", "no event"));
            };
            let event = read_record(&json)?;
            if events.is_empty() && (event.seq != member.first || event.id.to_string() != member.id)
            {
                return Ok(Vec::new());
            }
            events.push(event);
        }
        Ok(events)
    }
}

/// Support for `cargo xtask bench`: bare commands on the store's own
/// connection, as baselines. Not part of the API.
#[doc(hidden)]
impl RedisStore {
    pub async fn bench_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(format!("{}:bench:{key}", self.ns))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    pub async fn bench_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}:bench:{key}", self.ns))
            .arg(value)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }
}

/// The writes, run by the `Store` methods on tasks of their own.
impl RedisStore {
    /// Runs a write on a task of its own: once begun, its script and the
    /// index and live-set writes after it all happen even if the caller is
    /// dropped (a client that went away), so no written event is missing
    /// from the views.
    async fn detached<T, Fut>(&self, write: impl FnOnce(RedisStore) -> Fut) -> Result<T, StoreError>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        tokio::spawn(write(self.clone())).await.map_err(|e| {
            StoreError::unavailable_because(format!("store call did not finish: {e}"))
        })?
    }

    async fn start_now(&self, start: Start) -> Result<StartOutcome, StoreError> {
        let (session, event, refusal) = start.into_parts();
        let chain = session.chain();
        let slot = Slot::of_chain(&self.ns, &chain);
        let ttl = ttl_ms(session.expires_at, session.created_at, self.retention);
        // The views a revocation reads are written first: a session may be
        // listed before it exists (reads skip it), never exist unlisted.
        let member = format!("{}|{}", slot.route, session.id);
        let mut intents = vec![self.set_route(session.id, &slot.route, ttl)];
        for set in self.live_sets(&session) {
            let mut c = redis::cmd("SADD");
            c.arg(set).arg(&member);
            intents.push(c);
        }
        let mut c = redis::cmd("HSET");
        c.arg(live_routes(&self.ns))
            .arg(session.id.to_string())
            .arg(&slot.route);
        intents.push(c);
        intents.push(self.list_chain(&chain));
        self.run_all(intents).await?;

        let keys = [
            slot.head(),
            slot.chain(),
            slot.live(),
            slot.session(session.id),
            slot.secret(&session.secret_hash.to_hex()),
        ];
        if !slot.owns_all(&keys.iter().map(String::as_str).collect::<Vec<_>>()) {
            return Err(StoreError::Corrupt(
                "start script keys span hash slots".into(),
            ));
        }
        let fields = session_fields(&session)?;
        let cache = self.chain_cache(&chain);
        let mut cached = cache.lock().await;
        // Entries of an attempt that found the head moved: taken back with
        // the next one.
        let mut stale: Vec<ViewEntries> = Vec::new();
        for _ in 0..CAS_ATTEMPTS {
            let head = match *cached {
                Some(h) => h,
                None => self.read_head(&slot).await?,
            };
            let (started, started_record) =
                event.clone().seal_to_record(head).map_err(unrecorded)?;
            let (refused, refused_record) =
                refusal.clone().seal_to_record(head).map_err(unrecorded)?;
            // The views of both outcomes go out beside the script, as an
            // append's do: a reply lost after the script ran (a single
            // server's client does not send it again) leaves its event
            // listed all the same. Readers skip the entry of the outcome
            // that did not happen (no event of its id at its place), and
            // it is taken back once the reply says which one did.
            let started_views = self.view_entries(&[&started]);
            let refused_views = self.view_entries(&[&refused]);
            let mut entries = started_views.clone();
            entries.extend(refused_views.iter().cloned());
            let views = self.views_beside(&entries, std::mem::take(&mut stale));
            let (seq, hash) = head_args(head);
            let mut inv = ScriptCall::new(&START_SCRIPT, &keys, 10 + fields.len(), 4096);
            inv.arg(&seq)
                .arg(&hash)
                .arg(session.id.to_string())
                .arg(ttl)
                .arg(started_record)
                .arg(started.seq)
                .arg(started.hash.to_hex())
                .arg(refused_record)
                .arg(refused.seq)
                .arg(refused.hash.to_hex());
            for f in &fields {
                inv.arg(f);
            }
            let (reply, indexed) =
                tokio::join!(self.invoke_cas(&inv, &mut cached), self.write_views(views));
            let reply = reply?;
            let status = reply.first().map(String::as_str);
            match status {
                Some("head") => {
                    *cached = Some(moved_head(&reply)?);
                    stale = entries;
                }
                Some("started") => {
                    *cached = Some(reported_head(&reply, 1)?.unwrap_or(Some(started.head())));
                    drop(cached);
                    self.views_written("the start's views", &started.chain, started.seq, indexed)
                        .await;
                    self.take_back_views(
                        "the unused refusal's view entries",
                        views_without(refused_views, &started_views),
                    )
                    .await;
                    return Ok(StartOutcome::Started {
                        session: Box::new(session),
                        event: started,
                    });
                }
                Some("refused") => {
                    *cached = Some(reported_head(&reply, 2)?.unwrap_or(Some(refused.head())));
                    drop(cached);
                    // The intents for the session that was not created go again.
                    after_commit(
                        "the refused start's live-set entries",
                        self.forget_live(&session, &slot.route).await,
                    );
                    self.views_written("the refusal's views", &refused.chain, refused.seq, indexed)
                        .await;
                    self.take_back_views(
                        "the unused start's view entries",
                        views_without(started_views, &refused_views),
                    )
                    .await;
                    // The reply names the session in the way; after a lost
                    // reply the script reads it again, and it may have ended
                    // since. The refusal is on record either way.
                    let marker = reply
                        .get(1)
                        .filter(|id| !id.is_empty())
                        .ok_or_else(|| {
                            StoreError::unavailable_because(
                                "the start was refused and audited, and the session in the way has ended since; try again",
                            )
                        })?;
                    let live: SessionId = match marker.parse() {
                        Ok(id) => id,
                        Err(e) => {
                            tracing::warn!(
                                error = %e,
                                "an agent's live-session marker is damaged; repairing it"
                            );
                            match self.repair_live_marker(&slot, &session, marker).await? {
                                Some(id) => id,
                                None => {
                                    return Err(StoreError::unavailable_because(
                                        "the start was refused and audited for a damaged live-session marker, which is cleared now; try again",
                                    ));
                                }
                            }
                        }
                    };
                    return Ok(StartOutcome::Refused {
                        live,
                        event: refused,
                    });
                }
                other => return Err(corrupt("start reply", format!("{other:?}"))),
            }
        }
        Err(StoreError::unavailable_because(
            "the chain head kept moving; gave up",
        ))
    }

    /// Puts right an agent's live-session marker that names no session
    /// (damage), which nothing else would ever clear: it is set to the
    /// agent's live session, found among all live ones, if that is live
    /// still when the marker is written, or else deleted; either only if
    /// it still holds `damaged`. Answers the live session the marker now
    /// names, which a start is refused for.
    async fn repair_live_marker(
        &self,
        slot: &Slot,
        starting: &Session,
        damaged: &str,
    ) -> Result<Option<SessionId>, StoreError> {
        let filter = LiveFilter {
            agent: Some(starting.agent.id.clone()),
            ..LiveFilter::default()
        };
        let live = self
            .live_sessions(&filter)
            .await?
            .into_iter()
            .map(|s| s.id)
            .find(|id| *id != starting.id);
        let replacement = live.map(|id| id.to_string()).unwrap_or_default();
        let keys = [slot.live(), slot.session(live.unwrap_or(starting.id))];
        let mut repair = ScriptCall::new(
            &REPAIR_LIVE_MARKER_SCRIPT,
            &keys,
            2,
            damaged.len() + replacement.len(),
        );
        repair.arg(damaged).arg(&replacement);
        let mut conn = self.conn.clone();
        let named: i64 = repair.invoke(&mut conn).await.map_err(unavailable)?;
        Ok(live.filter(|_| named == 1))
    }

    async fn transition_now(
        &self,
        transition: Transition,
    ) -> Result<(Session, AuditEvent), StoreError> {
        let (next, expected, draft) = transition.into_parts();
        let chain = next.chain();
        let slot = Slot::of_chain(&self.ns, &chain);
        let keys = [
            slot.head(),
            slot.chain(),
            slot.live(),
            slot.session(next.id),
            slot.secret(&next.secret_hash.to_hex()),
        ];
        if !slot.owns_all(&keys.iter().map(String::as_str).collect::<Vec<_>>()) {
            return Err(StoreError::Corrupt(
                "transition script keys span hash slots".into(),
            ));
        }
        let ttl = ttl_ms(next.expires_at, draft.at, self.retention);
        let fields = session_fields(&next)?;
        let cache = self.chain_cache(&chain);
        let mut cached = cache.lock().await;
        let mut stale: Vec<ViewEntries> = Vec::new();
        for _ in 0..CAS_ATTEMPTS {
            let head = match *cached {
                Some(h) => h,
                None => self.read_head(&slot).await?,
            };
            let (event, record) = draft.clone().seal_to_record(head).map_err(unrecorded)?;
            // Beside the script, as for a start.
            let entries = self.view_entries(&[&event]);
            let views = self.views_beside(&entries, std::mem::take(&mut stale));
            let (seq, hash) = head_args(head);
            let mut inv = ScriptCall::new(&TRANSITION_SCRIPT, &keys, 8 + fields.len(), 4096);
            inv.arg(&seq)
                .arg(&hash)
                .arg(expected.to_string())
                .arg(next.id.to_string())
                .arg(ttl)
                .arg(record)
                .arg(event.seq)
                .arg(event.hash.to_hex());
            for f in &fields {
                inv.arg(f);
            }
            let (reply, indexed) =
                tokio::join!(self.invoke_cas(&inv, &mut cached), self.write_views(views));
            let reply = reply?;
            let status = reply.first().map(String::as_str);
            // Nothing written: the entries are taken back.
            let unused = "the unused transition's view entries";
            match status {
                Some("head") => {
                    *cached = Some(moved_head(&reply)?);
                    stale = entries;
                }
                Some("ok") => {
                    *cached = Some(reported_head(&reply, 1)?.unwrap_or(Some(event.head())));
                    drop(cached);
                    // The key that finds the session by id lives as long as
                    // the session's own (an activation moves its expiry);
                    // an ended session leaves the live sets. One round trip.
                    let mut after = vec![self.set_route(next.id, &slot.route, ttl)];
                    if !next.state.is_live() {
                        after.extend(self.live_removals(&next, &slot.route));
                    }
                    after_commit(
                        "the session's route and live sets",
                        self.run_all(after).await,
                    );
                    self.views_written("the transition's views", &event.chain, event.seq, indexed)
                        .await;
                    return Ok((next, event));
                }
                Some("notfound") => {
                    *cached = Some(head);
                    drop(cached);
                    self.take_back_views(unused, entries).await;
                    return Err(StoreError::SessionNotFound(next.id));
                }
                Some("conflict") => {
                    *cached = Some(head);
                    drop(cached);
                    self.take_back_views(unused, entries).await;
                    return Err(StoreError::Conflict(next.id));
                }
                other => return Err(corrupt("transition reply", format!("{other:?}"))),
            }
        }
        Err(StoreError::unavailable_because(
            "the chain head kept moving; gave up",
        ))
    }

    async fn append_batch_now(
        &self,
        batch: Vec<(AuditDraft, AppendGuard)>,
    ) -> Vec<Result<AuditEvent, StoreError>> {
        // Each chain's share in one script call, the chains concurrently
        // (they may live on different nodes).
        // The drafts move into their chain's share (a chain key is a shared
        // string: cloning it is cheap).
        let n = batch.len();
        let mut by_chain: BTreeMap<ChainKey, Vec<(usize, AuditDraft, AppendGuard)>> =
            BTreeMap::new();
        for (i, (draft, guard)) in batch.into_iter().enumerate() {
            by_chain
                .entry(draft.chain.clone())
                .or_default()
                .push((i, draft, guard));
        }
        let writes = by_chain
            .into_iter()
            .map(|(chain, items)| async move { self.append_chain(&chain, items).await });
        let mut results: Vec<Option<Result<AuditEvent, StoreError>>> =
            (0..n).map(|_| None).collect();
        for done in join_all(writes).await {
            for (i, result) in done {
                results[i] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(corrupt("append batch", "an event got no result"))))
            .collect()
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn start(&self, start: Start) -> Result<StartOutcome, StoreError> {
        self.detached(|store| async move { store.start_now(start).await })
            .await
    }

    async fn transition(
        &self,
        transition: Transition,
    ) -> Result<(Session, AuditEvent), StoreError> {
        self.detached(|store| async move { store.transition_now(transition).await })
            .await
    }

    async fn append(
        &self,
        draft: AuditDraft,
        guard: AppendGuard,
    ) -> Result<AuditEvent, StoreError> {
        // A batch of one: the same script, guard and retry as a batch.
        self.detached(|store| async move {
            let chain = draft.chain.clone();
            let done = store.append_chain(&chain, vec![(0, draft, guard)]).await;
            match done.into_iter().next() {
                Some((_, result)) => result,
                None => Err(corrupt("append", "the event got no result")),
            }
        })
        .await
    }

    async fn append_batch(
        &self,
        batch: Vec<(AuditDraft, AppendGuard)>,
    ) -> Vec<Result<AuditEvent, StoreError>> {
        let n = batch.len();
        let written = self
            .detached(|store| async move { Ok(store.append_batch_now(batch).await) })
            .await;
        written.unwrap_or_else(|e| vec![Err(e); n])
    }

    async fn find_by_secrets(
        &self,
        lookups: &[SecretLookup],
        touch: Option<Touch>,
    ) -> Vec<Result<Option<Session>, StoreError>> {
        // One script each (the secrets live in different slots), sent
        // together over the multiplexed connection.
        join_all(lookups.iter().map(|l| self.find_by_secret(l, touch))).await
    }

    fn batching(&self) -> Batching {
        BATCHING
    }

    async fn find_by_secret(
        &self,
        secret: &SecretLookup,
        touch: Option<Touch>,
    ) -> Result<Option<Session>, StoreError> {
        if !is_route(&secret.route) {
            return Ok(None);
        }
        let slot = Slot::of_route(&self.ns, &secret.route);
        let prefix = slot.session_prefix();
        let mut inv = ScriptCall::new(
            &RESOLVE_SCRIPT,
            &[slot.secret(&secret.hash.to_hex())],
            3,
            prefix.len() + 40,
        );
        inv.arg(prefix);
        // No coalescing window (empty) means no touch: any number, -1 µs
        // included, is a window (`Touch::applies_to`).
        match touch {
            Some(t) => inv.arg(micros(t.now)).arg(t.coalesce_micros()),
            None => inv.arg(0).arg(""),
        };
        let mut conn = self.conn.clone();
        let reply: Option<Vec<Option<String>>> =
            inv.invoke(&mut conn).await.map_err(unavailable)?;
        let Some(reply) = reply else {
            return Ok(None);
        };
        // A tagged reply names the fields the script found damaged.
        let named = || {
            reply
                .iter()
                .skip(1)
                .flatten()
                .map(String::as_str)
                .collect::<Vec<_>>()
        };
        match reply.first().and_then(Option::as_deref) {
            Some("absent") => Err(StoreError::unavailable_because(
                "the secret names a session this node does not hold: its slot is moving, or the session's hash was removed; try again",
            )),
            Some("damaged") => Err(damaged(&named())),
            Some("malformed") => Err(not_numbers(&named())),
            _ => decode_session(&reply, Some((secret.hash, &self.decoded))).map(Some),
        }
    }

    async fn session(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        let Some((route, put_back)) = self.route_of(id).await? else {
            return Ok(None);
        };
        let found = self
            .session_in(&Slot::of_route(&self.ns, &route), id)
            .await?;
        if let (Some(s), PutBack::IfMissing | PutBack::OverDamage) = (&found, put_back) {
            // Put the key back, to live as long as the session's.
            let ttl = ttl_ms(s.expires_at, OffsetDateTime::now_utc(), self.retention);
            let mut put_back_cmd = self.set_route(id, &route, ttl);
            // Not over a key an activation has just written meanwhile;
            // over a damaged one (a session's route never changes, so at
            // worst an activation's longer expiry is shortened, and the
            // live routes find the session past it).
            if put_back == PutBack::IfMissing {
                put_back_cmd.arg("NX");
            }
            if let Err(e) = self.run_all(vec![put_back_cmd]).await {
                tracing::warn!(error = %e, session = %id, "the session's missing route key could not be put back; it is found through the live sets meanwhile");
            }
        }
        Ok(found)
    }

    async fn live_sessions(&self, filter: &LiveFilter) -> Result<Vec<Session>, StoreError> {
        let mut found = Vec::new();
        // An agent's sessions: the one its live marker names. A marker
        // that names no session id (damage) is logged, and the agent's
        // sessions are looked for among all live ones, so that a
        // revocation of them still reaches each.
        let by_marker = match &filter.agent {
            None => false,
            Some(agent) => {
                let slot = Slot::of_chain(&self.ns, &ChainKey::for_agent(agent));
                let mut conn = self.conn.clone();
                let read: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET")
                    .arg(slot.live())
                    .query_async(&mut conn)
                    .await;
                let marker = match read {
                    Ok(None) => Ok(None),
                    // Bytes that are no text are damage too.
                    Ok(Some(id)) => std::str::from_utf8(&id)
                        .map_err(|e| e.to_string())
                        .and_then(|id| id.parse::<SessionId>().map_err(|e| e.to_string()))
                        .map(Some),
                    // A key of another type: damaged, as the scripts read it.
                    Err(e) if e.code() == Some("WRONGTYPE") => Err(e.to_string()),
                    Err(e) => return Err(unavailable(e)),
                };
                match marker {
                    Ok(None) => true,
                    Ok(Some(id)) => match listed(id, self.session_in(&slot, id).await)? {
                        Some(Some(s)) => {
                            found.push(s);
                            true
                        }
                        // Damaged: left out, as a listing leaves one out.
                        None => true,
                        // A session that is gone (its hash deleted by hand,
                        // not restored), which the marker and its session's
                        // hash, written and living together, never name
                        // otherwise: damage, looked past as above.
                        Some(None) => {
                            tracing::warn!(
                                session = %id,
                                "an agent's live-session marker names a session that is gone; looking among all live sessions"
                            );
                            false
                        }
                    },
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            "an agent's live-session marker is damaged; looking among all live sessions"
                        );
                        false
                    }
                }
            }
        };
        if !by_marker {
            let set = match (&filter.subject, &filter.tenant) {
                (Some(s), _) => live_set(&self.ns, "subject", s.as_str()),
                (None, Some(t)) => live_set(&self.ns, "tenant", t.as_str()),
                (None, None) => live_all(&self.ns),
            };
            let mut conn = self.conn.clone();
            let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
                .arg(&set)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            // A member that is no text (damage) names no session: skipped,
            // as one that names none is, not a failure of the whole list.
            let members: Vec<String> = members
                .into_iter()
                .filter_map(|m| String::from_utf8(m).ok())
                .collect();
            let lookups = members.iter().filter_map(|m| {
                let (route, id) = m.split_once('|')?;
                let id: SessionId = id.parse().ok()?;
                Some(async move {
                    let read = self.session_in(&Slot::of_route(&self.ns, route), id).await;
                    listed(id, read).map(|s| (m, id, s))
                })
            });
            for (member, id, session) in try_join_all(lookups).await? {
                match session {
                    // Damaged: left out, and left listed.
                    None => {}
                    Some(Some(s)) if s.state.is_live() => found.push(s),
                    // Listed by a start whose script has not run yet: left
                    // alone, or the session would come to exist unlisted
                    // (and a revocation of all of its sessions miss it).
                    Some(None) if may_be_starting(id) => {}
                    // Ended, expired or never created: drop the stale entry
                    // (and, from the list of all, its live route).
                    _ => {
                        let mut conn = self.conn.clone();
                        let _: Value = redis::cmd("SREM")
                            .arg(&set)
                            .arg(member)
                            .query_async(&mut conn)
                            .await
                            .map_err(unavailable)?;
                        if filter.subject.is_none() && filter.tenant.is_none() {
                            let _: Value = redis::cmd("HDEL")
                                .arg(live_routes(&self.ns))
                                .arg(id.to_string())
                                .query_async(&mut conn)
                                .await
                                .map_err(unavailable)?;
                        }
                    }
                }
            }
        }
        found.retain(|s| s.state.is_live() && filter.matches(s));
        found.sort_by_key(|s| s.id);
        Ok(found)
    }

    async fn record_check(
        &self,
        id: SessionId,
        version: u64,
        checked_at: OffsetDateTime,
        shadow: &ShadowUser,
    ) -> Result<(), StoreError> {
        let Some((route, _)) = self.route_of(id).await? else {
            return Err(StoreError::SessionNotFound(id));
        };
        let slot = Slot::of_route(&self.ns, &route);
        let shadow = to_json("shadow user", shadow)?;
        let mut inv = ScriptCall::new(
            &RECORD_CHECK_SCRIPT,
            &[slot.session(id)],
            3,
            shadow.len() + 40,
        );
        inv.arg(version.to_string())
            .arg(micros(checked_at))
            .arg(shadow);
        let mut conn = self.conn.clone();
        let reply: String = inv.invoke(&mut conn).await.map_err(unavailable)?;
        match reply.as_str() {
            "ok" => Ok(()),
            "notfound" => Err(StoreError::SessionNotFound(id)),
            "conflict" => Err(StoreError::Conflict(id)),
            other => Err(corrupt("record_check reply", other)),
        }
    }

    async fn audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        self.heal_stale_views().await;
        let index = match View::for_query(query) {
            (View::All, _) => audit_all(&self.ns),
            (view, key) => audit_index(&self.ns, view.code(), &key),
        };
        let (low, high) = impersonation_core::views::entry_bounds(query);
        let (low, high) = (
            low.map_or("-inf".to_owned(), |v| v.to_string()),
            high.map_or("+inf".to_owned(), |v| v.to_string()),
        );
        let mut page = impersonation_core::views::PageReader::new(query);
        let batch = page.batch();
        let mut resume = Resume::default();
        loop {
            let (low, high) = resume.bounds(query.order, &low, &high);
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&index);
            match query.order {
                Order::Oldest => cmd.arg(&low).arg(&high).arg("BYSCORE"),
                Order::Newest => cmd.arg(&high).arg(&low).arg("BYSCORE").arg("REV"),
            };
            let asked = resume.limit(batch);
            cmd.arg("LIMIT").arg(0).arg(asked).arg("WITHSCORES");
            let mut conn = self.conn.clone();
            let read: Vec<(String, f64)> = cmd.query_async(&mut conn).await.map_err(unavailable)?;
            // Scores are whole microseconds, written as integers. A full
            // batch may have more behind it.
            let last = read
                .last()
                .filter(|_| read.len() == asked)
                .map(|&(_, score)| score as i64);
            let entries = resume.take_new(read);
            let fetched = try_join_all(entries.iter().map(|(m, _)| self.fetch_run(m))).await?;
            if page.push(fetched.into_iter().flatten(), last) {
                return Ok(page.finish());
            }
        }
    }

    async fn chain_events(
        &self,
        chain: &ChainKey,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        // An event at `seq` is stream entry `0-(seq + 1)`; none is past the last.
        let Some(from_entry) = from_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        let slot = Slot::of_chain(&self.ns, chain);
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(slot.chain())
            .arg(format!("0-{from_entry}"))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        reply
            .ids
            .into_iter()
            .map(|entry| {
                let json: String = entry
                    .get("e")
                    .ok_or_else(|| corrupt("chain entry", "no event"))?;
                read_record(&json)
            })
            .collect()
    }

    async fn chain_head(&self, chain: &ChainKey) -> Result<Option<ChainHead>, StoreError> {
        self.read_head(&Slot::of_chain(&self.ns, chain)).await
    }

    async fn chains(
        &self,
        after: Option<&ChainKey>,
        limit: u32,
    ) -> Result<Vec<ChainKey>, StoreError> {
        let start = after.map_or("-".to_owned(), |a| format!("({}", a.as_str()));
        let mut conn = self.conn.clone();
        let keys: Vec<String> = redis::cmd("ZRANGE")
            .arg(chains(&self.ns))
            .arg(start)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(keys.into_iter().map(ChainKey::from_stored).collect())
    }
}

/// Where the next batch of a view's entries starts: at the score of the
/// last entry read, leaving out the entries already read at that score.
/// Not at an offset, from the start or within that score: view entries
/// come and go while a page is read (an append refused by its guard takes
/// back the entries written beside its script), and one gone from before
/// an offset would move an unread one into the part already passed.
#[derive(Debug, Default, PartialEq)]
struct Resume {
    /// The last score read (whole microseconds), once a batch was read.
    score: Option<i64>,
    /// The entries read at `score`; the next batch reads past them.
    seen: Vec<String>,
}

impl Resume {
    /// The next batch's score bounds, from the query's `(low, high)`.
    fn bounds(&self, order: Order, low: &str, high: &str) -> (String, String) {
        match (self.score, order) {
            (None, _) => (low.to_owned(), high.to_owned()),
            (Some(score), Order::Oldest) => (score.to_string(), high.to_owned()),
            (Some(score), Order::Newest) => (low.to_owned(), score.to_string()),
        }
    }

    /// How many entries to ask for so that `batch` of them are new: the
    /// ones at `score` already read come again first.
    fn limit(&self, batch: usize) -> usize {
        batch + self.seen.len()
    }

    /// The entries of a batch just read, in the query's order, without
    /// those read before; and moves past them.
    fn take_new(&mut self, read: Vec<(String, f64)>) -> Vec<(String, f64)> {
        // Scores are whole microseconds, written as integers.
        let fresh: Vec<(String, f64)> = read
            .into_iter()
            .filter(|(member, score)| {
                !(self.score == Some(*score as i64) && self.seen.contains(member))
            })
            .collect();
        if let Some(&(_, last)) = fresh.last() {
            let last = last as i64;
            if self.score != Some(last) {
                self.seen.clear();
            }
            self.seen.extend(
                fresh
                    .iter()
                    .filter(|(_, score)| *score as i64 == last)
                    .map(|(member, _)| member.clone()),
            );
            self.score = Some(last);
        }
        fresh
    }
}

/// How long after its id was made a session may still be on its way into
/// the store: a start lists it in the live sets before its script writes
/// it. Far longer than a start takes; an entry whose start failed in
/// between is dropped once this has passed (reads skip it meanwhile).
const START_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether session `id` (a UUID v7, stamped when it was made) may still be
/// starting. A time ahead of this machine's clock counts as starting.
fn may_be_starting(id: SessionId) -> bool {
    let Some(stamp) = id.as_uuid().get_timestamp() else {
        return false;
    };
    let (secs, nanos) = stamp.to_unix();
    let made = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
    std::time::SystemTime::now()
        .duration_since(made)
        .map_or(true, |age| age < START_GRACE)
}

#[cfg(test)]
mod tests {
    use super::{Order, RedisConfig, Resume};

    fn entries(scores: &[i64]) -> Vec<(String, f64)> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &s)| (format!("m{i}"), s as f64))
            .collect()
    }

    fn scores(read: &[(String, f64)]) -> Vec<i64> {
        read.iter().map(|&(_, s)| s as i64).collect()
    }

    #[test]
    fn a_batch_resumes_at_the_last_score_past_what_was_read_there() {
        let mut r = Resume::default();
        assert_eq!(
            r.bounds(Order::Oldest, "-inf", "+inf"),
            ("-inf".into(), "+inf".into())
        );
        assert_eq!(r.limit(4), 4);
        let read = r.take_new(entries(&[10, 20, 30, 30]));
        assert_eq!(scores(&read), [10, 20, 30, 30]);
        assert_eq!(r.score, Some(30));
        assert_eq!(r.seen, ["m2", "m3"]);
        assert_eq!(
            r.bounds(Order::Oldest, "5", "+inf"),
            ("30".into(), "+inf".into())
        );
        assert_eq!(
            r.bounds(Order::Newest, "5", "+inf"),
            ("5".into(), "30".into())
        );
        // The next batch asks for the two again, and drops them.
        assert_eq!(r.limit(4), 6);
        let again = vec![
            ("m2".to_owned(), 30.0),
            ("m3".to_owned(), 30.0),
            ("m4".to_owned(), 30.0),
            ("m5".to_owned(), 40.0),
        ];
        let read = r.take_new(again);
        assert_eq!(read, [("m4".to_owned(), 30.0), ("m5".to_owned(), 40.0)]);
        // A new score starts the list again.
        assert_eq!((r.score, r.seen.clone()), (Some(40), vec!["m5".to_owned()]));
        // Nothing read: nothing moves.
        assert!(r.take_new(Vec::new()).is_empty());
        assert_eq!((r.score, r.seen.len()), (Some(40), 1));
    }

    /// An entry read at the last score that is gone by the next batch (an
    /// append refused by its guard took it back) does not make the next
    /// batch skip an unread one, as an offset past the read ones would.
    #[test]
    fn an_entry_gone_between_batches_hides_no_other() {
        let mut r = Resume::default();
        let first = vec![("gone".to_owned(), 30.0), ("kept".to_owned(), 30.0)];
        assert_eq!(r.take_new(first).len(), 2);
        // At score 30 now: `kept`, then `unread`; `gone` was removed.
        let next = vec![("kept".to_owned(), 30.0), ("unread".to_owned(), 30.0)];
        assert_eq!(r.take_new(next), [("unread".to_owned(), 30.0)]);
        // Newest first: scores fall; the same rule.
        let mut r = Resume::default();
        let read = r.take_new(entries(&[90, 80, 80]));
        assert_eq!(scores(&read), [90, 80, 80]);
        assert_eq!((r.score, r.seen.len()), (Some(80), 2));
    }

    #[test]
    fn neither_debug_output_nor_errors_show_a_password() {
        let config = RedisConfig::new("redis://:hunter2@cache.example:6379/").unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://***@cache.example:6379/"), "{shown}");
        let wrong = RedisConfig::new("postgres://app:hunter2@db/app").unwrap_err();
        assert!(!wrong.to_string().contains("hunter2"), "{wrong}");
        assert!(wrong.to_string().contains("`postgres`"), "{wrong}");
    }

    /// Without the `tls` feature a `rediss://` URL is refused when
    /// configured, with the reason, not at connect with the client's; the
    /// password stays out of the message.
    #[cfg(not(feature = "tls"))]
    #[test]
    fn a_tls_url_is_refused_with_the_reason() {
        let refused = RedisConfig::new("rediss://:hunter2@cache.example:6380").unwrap_err();
        assert!(refused.to_string().contains("TLS"), "{refused}");
        assert!(!refused.to_string().contains("hunter2"), "{refused}");
    }

    /// The cluster client takes one password for every node: written once,
    /// on the first node, it goes to the others too.
    #[test]
    fn a_cluster_password_on_the_first_node_is_every_nodes() {
        let config = RedisConfig::new("redis+cluster://:pw@a:7001, b:7002,u:other@c:7003").unwrap();
        assert_eq!(
            config.urls,
            [
                "redis://:pw@a:7001",
                "redis://:pw@b:7002",
                "redis://u:other@c:7003"
            ]
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("pw@") && !shown.contains("other@"),
            "{shown}"
        );
        // A `,` in the password: no part of it is shown.
        let comma = RedisConfig::new("redis+cluster://:pa55,w0rd@a:7001,b:7002").unwrap();
        let shown = format!("{comma:?}");
        assert!(
            !shown.contains("pa55") && !shown.contains("w0rd"),
            "{shown}"
        );
        let open = RedisConfig::new("redis+cluster://a:7001,b:7002").unwrap();
        assert_eq!(open.urls, ["redis://a:7001", "redis://b:7002"]);
    }

    /// Over TLS every node is reached over TLS; without the feature such a
    /// URL is refused by name.
    #[test]
    fn rediss_urls_need_the_tls_feature_and_make_every_node_tls() {
        for url in ["rediss://a:6380", "rediss+cluster://:pw@a:7001,b:7002"] {
            let config = RedisConfig::new(url);
            if cfg!(feature = "tls") {
                let config = config.unwrap();
                assert!(
                    config.urls.iter().all(|u| u.starts_with("rediss://")),
                    "{url}"
                );
            } else {
                let refused = config.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(refused.contains("`tls` feature"), "{refused}");
            }
        }
        if cfg!(feature = "tls") {
            let config = RedisConfig::new("rediss+cluster://:pw@a:7001,b:7002").unwrap();
            assert_eq!(config.urls, ["rediss://:pw@a:7001", "rediss://:pw@b:7002"]);
            assert!(config.cluster);
        }
    }

    /// A negative retention would give a live session's keys a TTL shorter
    /// than the session (1 ms, at the floor), and a zero one would drop a
    /// lapsed session's keys before its end is recorded: anything under
    /// the minimum is refused when configured.
    #[test]
    fn a_retention_under_the_minimum_is_refused() {
        let config = || RedisConfig::new("redis://127.0.0.1:6379").unwrap();
        assert!(config().retention(time::Duration::hours(-2)).is_err());
        assert!(config().retention(time::Duration::ZERO).is_err());
        let just_under = super::MIN_RETENTION - time::Duration::milliseconds(1);
        assert!(config().retention(just_under).is_err());
        assert!(config().retention(super::MIN_RETENTION).is_ok());
        assert!(config().retention(time::Duration::days(7)).is_ok());
    }

    /// A view entry is read as stream entries `0-(first + 1)` to
    /// `0-(last + 1)`: one whose place has no stream id is corrupt, not an
    /// overflow.
    #[test]
    fn a_view_entry_at_the_last_place_is_corrupt() {
        let max = u64::MAX;
        assert!(super::Member::parse(&format!("{max}|{max}|e|agent")).is_err());
        assert!(super::Member::parse(&format!("e|{max}|r|agent")).is_err());
        assert!(super::Member::parse("3|4|e|agent").is_ok());
    }
}
