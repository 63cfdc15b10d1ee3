//! # impersonation-diesel
//!
//! The `impersonation` [`Store`] on Diesel 2, async through `diesel-async`:
//! **PostgreSQL** and **MySQL/MariaDB** with pure-Rust drivers, **SQLite**
//! bundled (no system library) on a blocking-pool wrapper. One code path
//! serves all three; the backend is chosen by the URL.
//!
//! ```no_run
//! use impersonation_diesel::{DieselConfig, DieselStore};
//! # async fn example() -> Result<(), impersonation_diesel::DieselError> {
//! let store = DieselStore::connect(DieselConfig::new("sqlite://target/impersonation.db")).await?;
//! store.migrate().await?; // embedded migrations, idempotent
//! let service = impersonation_core::Impersonation::new(store, impersonation_core::MemoryDirectory::new());
//! # Ok(()) }
//! ```
//!
//! URLs: `postgres://user@host/db`, `mysql://user@host/db` (or `mariadb://`),
//! `sqlite://path/to/file.db`, `sqlite://:memory:`.
//!
//! Every transition is one database transaction that writes the session
//! change and its audit event or neither; each chain's head row is locked by
//! every write to it, so chains never fork and "one live session per agent"
//! is checked atomically, with a unique index as the database's own
//! guarantee. Any database failure is a [`StoreError::Unavailable`]: the SDK
//! fails closed. See `docs/diesel.md` for the schema.
//!
//! ## Feature flags
//!
//! - `sqlite` (default): SQLite, bundled.
//! - `postgres`: PostgreSQL through `tokio-postgres`.
//! - `postgres-tls`: PostgreSQL over TLS (rustls) for a URL with
//!   `sslmode=require`: the server's certificate and name are verified,
//!   against the Mozilla roots or the authorities given to
//!   `DieselConfig::tls_root_certificates_pem`. Without `sslmode=require`
//!   a connection is not encrypted.
//! - `mysql`: MySQL and MariaDB through `mysql_async`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod ops;
mod rows;
mod sql;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use impersonation_core::{
    AppendGuard, AuditDraft, AuditEvent, AuditPage, AuditQuery, Batching, ChainHead, ChainKey,
    DecodedSessions, LiveFilter, SecretLookup, Session, SessionId, ShadowUser, Start, StartOutcome,
    Store, StoreError, Touch, Transition,
};
use time::OffsetDateTime;

use crate::ops::{OpError, retryable};

/// SQLite through diesel-async's wrapper, with its statements run in place:
/// the store moves each whole call (every statement of a transaction) onto
/// one blocking thread itself (`on_blocking_thread`), rather than the
/// wrapper hopping to the blocking pool and back for every statement.
#[cfg(feature = "sqlite")]
pub(crate) type SqliteConn = diesel_async::sync_connection_wrapper::SyncConnectionWrapper<
    diesel::SqliteConnection,
    sqlite_setup::InPlace,
>;

/// Counts the statements a store sends and the statements it prepares,
/// through diesel's instrumentation: for metrics, and for tests that pin down
/// how many statements a call costs.
#[derive(Debug, Default)]
pub struct QueryCounter {
    queries: AtomicU64,
    prepared: AtomicU64,
    recent: std::sync::Mutex<std::collections::VecDeque<String>>,
}

/// How many statement texts a [`QueryCounter`] keeps.
const RECENT_STATEMENTS: usize = 32;

impl QueryCounter {
    /// A counter at zero.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Statements sent so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Statements prepared (and cached) so far.
    pub fn prepared(&self) -> u64 {
        self.prepared.load(Ordering::Relaxed)
    }

    /// The texts of the most recent statements (bind values are not kept),
    /// oldest first.
    pub fn recent(&self) -> Vec<String> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }
}

struct Counting(Arc<QueryCounter>);

impl diesel::connection::Instrumentation for Counting {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        use diesel::connection::InstrumentationEvent as E;
        match event {
            E::StartQuery { query, .. } => {
                self.0.queries.fetch_add(1, Ordering::Relaxed);
                let mut recent = self.0.recent.lock().unwrap_or_else(|e| e.into_inner());
                if recent.len() == RECENT_STATEMENTS {
                    recent.pop_front();
                }
                // The debug form of a query carries its binds; keep only the
                // SQL. Written, not `to_string()`: a query whose binds fail
                // to format (a malformed statement) leaves a partial text
                // here, and fails as an error where it runs, not as a panic.
                let mut text = String::new();
                let _ = std::fmt::Write::write_fmt(&mut text, format_args!("{query}"));
                recent.push_back(text.split(" -- binds:").next().unwrap_or("").to_owned());
            }
            E::CacheQuery { .. } => {
                self.0.prepared.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

fn instrument<C: diesel_async::AsyncConnection>(conn: &mut C, counter: &Option<Arc<QueryCounter>>) {
    if let Some(counter) = counter {
        conn.set_instrumentation(Counting(Arc::clone(counter)));
    }
}

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
    /// SQLite.
    Sqlite,
}

impl BackendKind {
    /// The backend a URL names.
    pub fn of_url(url: &str) -> Result<Self, DieselError> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        match scheme {
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "mysql" | "mariadb" => Ok(Self::Mysql),
            "sqlite" | "file" => Ok(Self::Sqlite),
            _ => Err(DieselError::UnsupportedUrl(scheme.to_owned())),
        }
    }
}

/// Why connecting or migrating failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DieselError {
    /// The URL's scheme names no supported database.
    #[error(
        "unsupported database URL scheme `{0}` (expected postgres://, mysql://, mariadb:// or sqlite://)"
    )]
    UnsupportedUrl(String),
    /// The backend's cargo feature is not enabled.
    #[error("this build lacks the `{0}` feature of impersonation-diesel")]
    FeatureDisabled(&'static str),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database could not be reached.
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    /// The migrations failed.
    #[error("migrations failed: {0}")]
    Migration(String),
}

/// Connection settings. Their `Debug` shows the URL without its password.
#[derive(Clone)]
pub struct DieselConfig {
    url: String,
    max_connections: usize,
    wait_timeout: Duration,
    connect_timeout: Duration,
    busy_timeout: Duration,
    migration_wait: Duration,
    schema: Option<String>,
    counter: Option<Arc<QueryCounter>>,
    /// PEM certificate authorities to verify a PostgreSQL server by.
    tls_roots_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for DieselConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DieselConfig")
            .field("url", &impersonation_core::redacted_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("wait_timeout", &self.wait_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("busy_timeout", &self.busy_timeout)
            .field("migration_wait", &self.migration_wait)
            .field("schema", &self.schema)
            .field("counter", &self.counter)
            .field("tls_roots", &self.tls_roots_pem.is_some())
            .finish()
    }
}

impl DieselConfig {
    /// Settings for a database URL, with 8 connections and 5-second timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 8,
            wait_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(5),
            migration_wait: MIGRATION_WAIT,
            schema: None,
            counter: None,
            tls_roots_pem: None,
        }
    }

    /// PostgreSQL over TLS (a URL with `sslmode=require`): verify the
    /// server by these certificate authorities (PEM, one or more
    /// certificates) rather than the Mozilla roots, as a managed database
    /// needs (Amazon RDS's, Cloud SQL's) or one with a certificate of its
    /// own. The server's name must match its certificate either way.
    #[cfg(feature = "postgres-tls")]
    #[must_use]
    pub fn tls_root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_roots_pem = Some(pem.into());
        self
    }

    /// Counts every statement the store's connections send.
    #[must_use]
    pub fn query_counter(mut self, counter: Arc<QueryCounter>) -> Self {
        self.counter = Some(counter);
        self
    }

    /// The pool's size (an in-memory SQLite database always uses one connection).
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a request waits for a free connection before failing closed.
    #[must_use]
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// How long opening a connection may take.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long each attempt of a write waits for a lock another writer
    /// holds (default 5 s): SQLite's `busy_timeout`, PostgreSQL's
    /// `lock_timeout`, MySQL and MariaDB's `innodb_lock_wait_timeout` and
    /// `lock_wait_timeout` (whole seconds, rounded up, at most a year;
    /// elsewhere whole milliseconds, at most about 24.8 days, what
    /// PostgreSQL and SQLite take). PostgreSQL then fails the write; the
    /// others retry it, up to six attempts. A writer that died holding a
    /// lock then costs a failed write, not a connection stuck for hours.
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How long [`DieselStore::migrate`] waits, on PostgreSQL and MySQL,
    /// for each lock it needs (default 5 minutes): the migration lock
    /// another replica holds, then each lock its statements take (a long
    /// transaction reading a table it alters). Past it the migration fails
    /// and can be run again. (SQLite waits its `busy_timeout`.)
    #[must_use]
    pub fn migration_wait(mut self, wait: Duration) -> Self {
        self.migration_wait = wait;
        self
    }

    /// PostgreSQL: keep the tables in this schema (created by [`DieselStore::migrate`]).
    /// Letters, digits and `_` only.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    #[cfg(feature = "sqlite")]
    fn sqlite_path(&self) -> String {
        let rest = self
            .url
            .strip_prefix("sqlite://")
            .or_else(|| self.url.strip_prefix("file://"))
            .unwrap_or(&self.url);
        rest.to_owned()
    }
}

/// How SQLite opens a filename (diesel opens it with `SQLITE_OPEN_URI`).
#[cfg(feature = "sqlite")]
#[derive(Debug, PartialEq, Eq)]
enum SqliteOpen {
    /// A file, shared by every connection.
    File,
    /// A database of each connection's own: `:memory:`, `file::memory:`,
    /// a `file:` URI with `mode=memory`, or with `vfs=memdb` and a name
    /// that memdb does not share (one not beginning with `/` or `\`, or
    /// `/` alone).
    PerConnection,
    /// No name (`sqlite://`, `file:`, `file://localhost`): a temporary file
    /// of each connection's own, deleted when it closes.
    Temporary,
}

/// Reads `path` as SQLite's `sqlite3ParseUri` does: a `file:` URI (the
/// scheme in lower case, as SQLite compares it) drops an empty or
/// `localhost` authority, ends its name at `?` and its query at `#`,
/// decodes `%HH` escapes in the name and in each parameter, and ends
/// either at a `%00`.
#[cfg(feature = "sqlite")]
fn sqlite_open(path: &str) -> SqliteOpen {
    if path.is_empty() {
        return SqliteOpen::Temporary;
    }
    if path == ":memory:" {
        return SqliteOpen::PerConnection;
    }
    let Some(mut uri) = path.strip_prefix("file:") else {
        return SqliteOpen::File;
    };
    if let Some(rest) = uri.strip_prefix("//") {
        let end = rest.find('/').unwrap_or(rest.len());
        // Another authority is an error when SQLite opens it: let it say so.
        if !matches!(&rest[..end], "" | "localhost") {
            return SqliteOpen::File;
        }
        uri = &rest[end..];
    }
    let uri = uri.split_once('#').map_or(uri, |(before, _)| before);
    let (name, query) = uri.split_once('?').unwrap_or((uri, ""));
    let decoded = |text: &str| -> Vec<u8> {
        percent_encoding::percent_decode_str(text)
            .take_while(|&b| b != 0)
            .collect()
    };
    let name = decoded(name);
    let param = |key: &[u8]| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .filter(|(k, _)| decoded(k) == key)
            .map(|(_, value)| decoded(value))
            .next_back()
    };
    // memdb shares a database between connections only under a name of
    // more than one byte beginning with `/` or `\`.
    let memdb_shared = name.len() > 1 && matches!(name.first(), Some(b'/' | b'\\'));
    let memory = name == b":memory:"
        || param(b"mode").is_some_and(|mode| mode == b"memory")
        || (param(b"vfs").is_some_and(|vfs| vfs == b"memdb") && !memdb_shared);
    if memory {
        SqliteOpen::PerConnection
    } else if name.is_empty() {
        SqliteOpen::Temporary
    } else {
        SqliteOpen::File
    }
}

#[derive(Clone)]
enum Backend {
    #[cfg(feature = "postgres")]
    /// The pool, and how its connections (and the migrations') are secured.
    Postgres(Pool<diesel_async::AsyncPgConnection>, pg_setup::Tls),
    #[cfg(feature = "mysql")]
    Mysql(Pool<diesel_async::AsyncMysqlConnection>),
    #[cfg(feature = "sqlite")]
    Sqlite(Pool<SqliteConn>),
}

/// The Diesel store. Cheap to clone (it is a pool handle).
#[derive(Clone)]
pub struct DieselStore {
    backend: Backend,
    /// Read by the PostgreSQL and MariaDB migrations, which open a
    /// connection of their own.
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    config: DieselConfig,
    /// The last chain heads this process wrote, for the one-statement
    /// append on PostgreSQL (a compare-and-set on the head: a stale entry
    /// only costs a fall-back to the transaction).
    heads: Arc<std::sync::Mutex<std::collections::HashMap<ChainKey, ChainHead>>>,
    /// The sessions lookups decoded last, to skip unchanged JSON.
    decoded: Arc<DecodedSessions>,
    /// SQLite: this process's writers, one at a time.
    writes: WriteGate,
    /// The sessions whose idle touch waited out the lock timeout lately.
    held: Arc<ops::HeldTouches>,
}

/// SQLite lets one writer in at a time, and a writer that finds the lock
/// taken polls for it with growing sleeps (up to 100 ms each): under a
/// steady stream of commits from this process, one waiting writer (the
/// idle touch, say, which every lookup then waits on) could miss the lock
/// for a second or more. The process's own writers take turns here
/// instead, first come first served, each once it holds its connection
/// (so a turn never waits on the pool); only other processes' writers
/// meet the busy handler. On the other databases it lets everyone through.
#[derive(Clone, Default)]
pub(crate) struct WriteGate(Option<Arc<tokio::sync::Mutex<()>>>);

impl WriteGate {
    /// Turns on SQLite; on the other databases, a gate that is always open.
    fn for_backend(kind: BackendKind) -> Self {
        Self((kind == BackendKind::Sqlite).then(Arc::default))
    }

    /// Waits for this process's turn to write (at once off SQLite).
    pub(crate) async fn hold(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.0 {
            Some(gate) => Some(Arc::clone(gate).lock_owned().await),
            None => None,
        }
    }
}

impl std::fmt::Debug for DieselStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: print only the backend.
        f.debug_struct("DieselStore")
            .field("backend", &self.kind())
            .finish_non_exhaustive()
    }
}

fn valid_schema(schema: &str) -> bool {
    !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(feature = "postgres")]
mod pg_setup {
    use diesel::ConnectionResult;
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

    /// How a connection is secured, built once per store.
    #[derive(Clone)]
    pub(crate) struct Tls {
        #[cfg(feature = "postgres-tls")]
        config: std::sync::Arc<rustls::ClientConfig>,
    }

    impl Tls {
        #[cfg(feature = "postgres-tls")]
        pub(crate) fn of(config: &super::DieselConfig) -> Result<Self, super::DieselError> {
            use rustls_pki_types::{CertificateDer, pem::PemObject as _};
            let bad = |what: String| super::DieselError::Config(format!("TLS: {what}"));
            let mut roots = rustls::RootCertStore::empty();
            match &config.tls_roots_pem {
                Some(pem) => {
                    for cert in CertificateDer::pem_slice_iter(pem) {
                        let cert = cert.map_err(|e| bad(format!("the root certificates: {e}")))?;
                        roots
                            .add(cert)
                            .map_err(|e| bad(format!("a root certificate: {e}")))?;
                    }
                    if roots.is_empty() {
                        return Err(bad("no certificate in the root certificates' PEM".into()));
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let mut client = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            // PostgreSQL 17 refuses a direct TLS start (`sslnegotiation=
            // direct`) that does not name its protocol; the others ignore it.
            client.alpn_protocols = vec![b"postgresql".to_vec()];
            Ok(Self {
                config: std::sync::Arc::new(client),
            })
        }

        #[cfg(not(feature = "postgres-tls"))]
        pub(crate) fn of(_: &super::DieselConfig) -> Result<Self, super::DieselError> {
            Ok(Self {})
        }
    }

    /// Opens the connection: over TLS when the URL asks for it.
    #[cfg(feature = "postgres-tls")]
    async fn open(url: &str, tls: &Tls) -> ConnectionResult<AsyncPgConnection> {
        use tokio_postgres::config::SslMode;
        let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            diesel::ConnectionError::InvalidConnectionUrl(with_causes(&e))
        })?;
        if config.get_ssl_mode() != SslMode::Require {
            return AsyncPgConnection::establish(url).await;
        }
        let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls.config).clone());
        let (client, connection) = config
            .connect(connector)
            .await
            .map_err(|e| diesel::ConnectionError::BadConnection(with_causes(&e)))?;
        AsyncPgConnection::try_from_client_and_connection(client, connection).await
    }

    /// The error and its sources: the handshake's cause (an unknown
    /// issuer, a name that does not match) and a URL's bad option are in
    /// the sources, not the message.
    #[cfg(feature = "postgres-tls")]
    fn with_causes(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }

    #[cfg(not(feature = "postgres-tls"))]
    async fn open(url: &str, _: &Tls) -> ConnectionResult<AsyncPgConnection> {
        if url.contains("sslmode=require") {
            return Err(diesel::ConnectionError::InvalidConnectionUrl(
                "sslmode=require needs the `postgres-tls` feature of impersonation-diesel".into(),
            ));
        }
        AsyncPgConnection::establish(url).await
    }

    /// Sets the session's `lc_messages` to `C` where the role may (a
    /// superuser, or a role granted `SET ON PARAMETER lc_messages`), and
    /// notes in `impersonation.english_messages` whether the server's
    /// messages are English after it, by a division by zero's.
    ///
    /// The store tells a lock timeout and a deadlock by their messages
    /// (diesel-async keeps a PostgreSQL error's message, not its
    /// SQLSTATE), which a server with a German `lc_messages`, say, words
    /// in German: a held session row would then fail lookups, and a
    /// deadlocked write would not be tried again. Both refusals are
    /// caught in the block, so neither reaches the server's log.
    const ENGLISH_MESSAGES: &str = "DO $$ DECLARE m text; BEGIN \
         BEGIN PERFORM set_config('lc_messages', 'C', false); \
         EXCEPTION WHEN insufficient_privilege THEN NULL; END; \
         BEGIN PERFORM 1 / 0; \
         EXCEPTION WHEN division_by_zero THEN GET STACKED DIAGNOSTICS m = MESSAGE_TEXT; END; \
         PERFORM set_config('impersonation.english_messages', (m = 'division by zero')::text, false); \
         END $$";

    /// Warns, once a process, that the server's messages are not English
    /// and the role may not change that.
    fn warn_of_messages() {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "PostgreSQL answers this role in a language other than English (lc_messages), \
                 and the role may not change it: the store recognises a lock timeout and a \
                 deadlock by their English messages, so a held session row fails lookups and a \
                 deadlocked write is not tried again. As a superuser, run \
                 `ALTER ROLE <role> SET lc_messages = 'C'` (or, on PostgreSQL 15 and later, \
                 `GRANT SET ON PARAMETER lc_messages TO <role>`)"
            );
        }
    }

    pub(crate) async fn establish(
        url: String,
        schema: Option<String>,
        lock_timeout: std::time::Duration,
        counter: Option<std::sync::Arc<super::QueryCounter>>,
        tls: Tls,
    ) -> ConnectionResult<AsyncPgConnection> {
        let mut conn = open(&url, &tls).await?;
        // A write waits this long for a lock another connection holds (a
        // host that died mid-transaction holds its locks until TCP notices,
        // hours): past it the write fails closed instead of taking a pooled
        // connection with it. PostgreSQL's own default is to wait forever.
        let ms = super::whole_millis(lock_timeout);
        // The server's messages in English where the role may have them
        // (`ENGLISH_MESSAGES`), in the same round trip as the lock
        // timeout; then whether they are, in a second (once a connection).
        conn.batch_execute(&format!("SET lock_timeout = '{ms}ms'; {ENGLISH_MESSAGES}"))
            .await
            .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
        let english: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
            "current_setting('impersonation.english_messages')",
        ))
        .get_result(&mut conn)
        .await
        .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
        if english != "true" {
            warn_of_messages();
        }
        if let Some(schema) = schema {
            // The schema name was validated: letters, digits and `_` only.
            conn.batch_execute(&format!("SET search_path TO \"{schema}\""))
                .await
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
        }
        super::instrument(&mut conn, &counter);
        Ok(conn)
    }
}

#[cfg(feature = "mysql")]
mod mysql_setup {
    use diesel::ConnectionResult;
    use diesel_async::{AsyncConnection, AsyncMysqlConnection, SimpleAsyncConnection};

    pub(crate) async fn establish(
        url: String,
        lock_timeout: std::time::Duration,
        counter: Option<std::sync::Arc<super::QueryCounter>>,
    ) -> ConnectionResult<AsyncMysqlConnection> {
        let url = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url,
        };
        let mut conn = AsyncMysqlConnection::establish(&url).await?;
        // Read committed: plain reads see the latest commit, and InnoDB takes
        // no gap locks that could deadlock concurrent appends.
        conn.batch_execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
        // As on PostgreSQL, a bounded wait for another writer's row lock
        // (InnoDB counts whole seconds; its default is 50), and for a
        // table's metadata lock (an `ALTER` behind a long transaction, or
        // a statement behind the `ALTER`; the default is a year).
        // And its messages in English, whatever the server's
        // `lc_messages`: the store tells a lock wait timeout and a deadlock
        // by their messages (diesel-async keeps a MySQL error's message,
        // not its code). Any user may set it for their session.
        let secs = super::whole_seconds(lock_timeout);
        conn.batch_execute(&format!(
            "SET SESSION innodb_lock_wait_timeout = {secs}; SET SESSION lock_wait_timeout = {secs}; \
             SET SESSION lc_messages = 'en_US'"
        ))
        .await
        .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
        super::instrument(&mut conn, &counter);
        Ok(conn)
    }
}

#[cfg(feature = "sqlite")]
mod sqlite_setup {
    use std::error::Error;
    use std::future::{Future, ready};
    use std::pin::Pin;

    use diesel::connection::SimpleConnection;
    use diesel::{Connection, ConnectionResult, RunQueryDsl, SqliteConnection};
    use diesel_async::sync_connection_wrapper::SpawnBlocking;

    /// Runs the wrapper's "blocking" tasks at once, on the calling thread:
    /// that thread is already one of tokio's blocking threads.
    pub(crate) struct InPlace;

    type TaskResult<R> = Result<R, Box<dyn Error + Send + Sync + 'static>>;

    impl SpawnBlocking for InPlace {
        fn spawn_blocking<'a, R>(
            &mut self,
            task: impl FnOnce() -> R + Send + 'static,
        ) -> Pin<Box<dyn Future<Output = TaskResult<R>> + Send + 'a>>
        where
            R: Send + 'static,
        {
            Box::pin(ready(Ok(task())))
        }

        fn get_runtime() -> Self {
            InPlace
        }
    }

    pub(crate) async fn establish(
        path: String,
        busy_ms: u64,
        counter: Option<std::sync::Arc<super::QueryCounter>>,
    ) -> ConnectionResult<super::SqliteConn> {
        let opened = tokio::task::spawn_blocking(move || {
            let bad =
                |e: diesel::result::Error| diesel::ConnectionError::BadConnection(e.to_string());
            let mut conn = SqliteConnection::establish(&path)?;
            // busy_timeout makes writers queue; WAL lets readers run beside
            // the writer; FULL sync keeps a committed audit event through a
            // power loss.
            conn.batch_execute(&format!("PRAGMA busy_timeout = {busy_ms}"))
                .map_err(bad)?;
            // Turning a new database to WAL needs its exclusive lock, and
            // SQLite answers "locked" at once, without the busy timeout's
            // wait, while another connection is turning it too (waiting
            // there could deadlock): processes opening a new file at once
            // try again, for as long as the busy timeout.
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(busy_ms);
            // SQLite answers the mode it is in, and no error, when it
            // cannot switch (a file system without shared memory).
            let mode = loop {
                match diesel::sql_query("PRAGMA journal_mode = WAL")
                    .get_result::<crate::rows::JournalMode>(&mut conn)
                {
                    Ok(mode) => break mode.journal_mode,
                    Err(e) if crate::ops::retryable(&e) && std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(e) => return Err(bad(e)),
                }
            };
            if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
                tracing::warn!(
                    journal_mode = %mode,
                    "SQLite could not switch this database to WAL: readers will hold up writers' commits"
                );
            }
            conn.batch_execute("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
                .map_err(bad)?;
            Ok::<_, diesel::ConnectionError>(conn)
        })
        .await
        .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
        let mut conn = super::SqliteConn::with_runtime(opened?, InPlace);
        super::instrument(&mut conn, &counter);
        Ok(conn)
    }
}

fn pool_error(e: impl std::fmt::Display) -> OpError {
    OpError::Store(StoreError::unavailable_because(format!(
        "connection pool: {e}"
    )))
}

macro_rules! build_pool {
    ($conn:ty, $config:expr, $setup:expr) => {{
        let mut manager_config = ManagerConfig::<$conn>::default();
        manager_config.custom_setup = Box::new($setup);
        // No `SELECT 1` on every checkout (it would double each call's round
        // trips): a connection is dropped when the driver reports it broken.
        // One that died silently fails its next request, closed, and is replaced.
        manager_config.recycling_method = RecyclingMethod::Fast;
        let manager = AsyncDieselConnectionManager::<$conn>::new_with_config(
            $config.url.clone(),
            manager_config,
        );
        Pool::builder(manager)
            .max_size($config.max_connections)
            .wait_timeout(Some($config.wait_timeout))
            .create_timeout(Some($config.connect_timeout))
            .recycle_timeout(Some($config.connect_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| DieselError::Config(e.to_string()))?
    }};
}

/// Runs `$body` with `$conn` bound to a pooled connection of the store's
/// backend and `$ops` to that backend's operations, as a unit that runs to
/// its end once it has its connection, even if the caller is dropped: a
/// request whose client went away must not hand a connection back to the
/// pool in the middle of a transaction, where it would hold the chain's
/// lock (or SQLite's write lock) and stall every later request. The body
/// owns what it uses: each listed name is cloned into it.
macro_rules! with_conn {
    // A call that writes: on SQLite it waits for the process's turn to write
    // (`WriteGate`) once it has its connection, and holds it to its end.
    ($self:expr, write, [$($cap:ident),*], |$conn:ident, $ops:ident| $body:expr) => {
        with_conn!(@run $self, true, [$($cap),*], |$conn, $ops| $body)
    };
    ($self:expr, [$($cap:ident),*], |$conn:ident, $ops:ident| $body:expr) => {
        with_conn!(@run $self, false, [$($cap),*], |$conn, $ops| $body)
    };
    (@run $self:expr, $writes:expr, [$($cap:ident),*], |$conn:ident, $ops:ident| $body:expr) => {{
        match &$self.backend {
            #[cfg(feature = "postgres")]
            Backend::Postgres(pool, _) => {
                let mut pooled = pool.get().await.map_err(pool_error)?;
                $( let $cap = $cap.clone(); )*
                detached(async move {
                    use crate::ops::pg as $ops;
                    let $conn = &mut *pooled;
                    $body
                })
                .await
            }
            #[cfg(feature = "mysql")]
            Backend::Mysql(pool) => {
                let mut pooled = pool.get().await.map_err(pool_error)?;
                $( let $cap = $cap.clone(); )*
                detached(async move {
                    use crate::ops::mysql as $ops;
                    let result = async {
                        let $conn = &mut *pooled;
                        $body
                    }
                    .await;
                    if matches!(result, Err(OpError::Db(_))) {
                        drop_if_closed(pooled).await;
                    }
                    result
                })
                .await
            }
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(pool) => {
                let pooled = pool.get().await.map_err(pool_error)?;
                let turn = if $writes { $self.writes.hold().await } else { None };
                $( let $cap = $cap.clone(); )*
                on_blocking_thread(pooled, async move |$conn: &mut SqliteConn| {
                    use crate::ops::sqlite as $ops;
                    let _turn = turn;
                    $body
                })
                .await
            }
        }
    }};
}

/// After a call the database failed (not a refusal of the store's own,
/// such as a session no longer active), pings its MySQL connection and
/// takes it out of the pool if it is gone or does not answer within a
/// second. diesel-async reports a MySQL connection broken only by its
/// transaction state, so one the server closed (a restart, a failover,
/// `wait_timeout` overnight) would otherwise go back to the pool and fail
/// every call it is handed to until the app restarts. The ping costs a
/// round trip on that error path only.
#[cfg(feature = "mysql")]
async fn drop_if_closed(
    mut pooled: deadpool::managed::Object<
        AsyncDieselConnectionManager<diesel_async::AsyncMysqlConnection>,
    >,
) {
    use diesel_async::pooled_connection::PoolableConnection;
    let ping = pooled.ping(&RecyclingMethod::Verified);
    if !matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Ok(()))
    ) {
        tracing::warn!("a MySQL connection went away; it leaves the pool");
        drop(deadpool::managed::Object::take(pooled));
    }
}

/// Runs a call on its own task, so that dropping the caller does not drop
/// it halfway.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn detached<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<T, OpError>> + Send + 'static,
) -> Result<T, OpError> {
    tokio::spawn(call).await.map_err(task_error)?
}

/// Runs a whole SQLite call (all its statements) on one blocking thread,
/// which also cannot be cancelled halfway.
#[cfg(feature = "sqlite")]
async fn on_blocking_thread<T, F>(
    mut pooled: deadpool::managed::Object<AsyncDieselConnectionManager<SqliteConn>>,
    call: F,
) -> Result<T, OpError>
where
    T: Send + 'static,
    F: AsyncFnOnce(&mut SqliteConn) -> Result<T, OpError> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    // Every statement runs in place (`InPlace`), so the future is ready
    // after one poll; `block_on` only drives it.
    tokio::task::spawn_blocking(move || runtime.block_on(call(&mut pooled)))
        .await
        .map_err(task_error)?
}

fn task_error(e: tokio::task::JoinError) -> OpError {
    OpError::Store(StoreError::unavailable_because(format!(
        "store call did not finish: {e}"
    )))
}

/// How long a migration waits for a lock by default (another replica
/// migrating, the app's own writes): five minutes.
const MIGRATION_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// A wait in whole seconds for MySQL's lock waits: rounded up, at least
/// one, at most a year (`lock_wait_timeout`'s own limit).
#[cfg(feature = "mysql")]
fn whole_seconds(wait: std::time::Duration) -> u64 {
    const YEAR: u64 = 365 * 24 * 3600;
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
        .clamp(1, YEAR)
}

/// `wait` in whole milliseconds, rounded up, as PostgreSQL's `lock_timeout`
/// and SQLite's `busy_timeout` take it: at least 1, at most `i32::MAX`
/// (about 24.8 days), which PostgreSQL refuses past and SQLite would read
/// as 0 (no wait at all).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
fn whole_millis(wait: std::time::Duration) -> u64 {
    const MAX_MS: u64 = 2_147_483_647;
    u64::try_from(wait.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(u64::from(!wait.subsec_nanos().is_multiple_of(1_000_000)))
        .clamp(1, MAX_MS)
}

/// Attempts of a write that hit a deadlock, serialisation failure or busy database.
const WRITE_ATTEMPTS: u32 = 6;

fn store_error(e: OpError) -> StoreError {
    use diesel::result::{DatabaseErrorKind, Error};
    match e {
        OpError::Store(e) => e,
        // MySQL and MariaDB quote the duplicated value in the message
        // (`Duplicate entry '…' for key …`): for the sessions' unique
        // keys, a secret's lookup hash. Only the constraint is named.
        OpError::Db(Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) => {
            StoreError::unavailable_because(match info.constraint_name() {
                Some(constraint) => format!("a unique constraint was violated ({constraint})"),
                None => "a unique constraint was violated".to_owned(),
            })
        }
        OpError::Db(e) => StoreError::unavailable(e),
        OpError::ChainLocked(chain) => chain_locked(&chain),
    }
}

/// An append on `chain` that gave up waiting for its head row.
fn chain_locked(chain: &ChainKey) -> StoreError {
    StoreError::unavailable_because(format!(
        "audit chain {chain} is locked by another transaction past the lock timeout"
    ))
}

impl DieselStore {
    /// Opens a connection pool and checks that the database answers.
    pub async fn connect(config: DieselConfig) -> Result<Self, DieselError> {
        if let Some(schema) = &config.schema
            && !valid_schema(schema)
        {
            return Err(DieselError::Config(format!(
                "invalid schema name `{schema}`"
            )));
        }
        // Each arm gives the pool and the configuration the store keeps
        // (SQLite's may differ from the one asked for).
        let (backend, config) = match BackendKind::of_url(&config.url)? {
            #[cfg(feature = "postgres")]
            BackendKind::Postgres => {
                let (schema, counter) = (config.schema.clone(), config.counter.clone());
                let lock_timeout = config.busy_timeout;
                let tls = pg_setup::Tls::of(&config)?;
                let tls_for_pool = tls.clone();
                let pool =
                    build_pool!(diesel_async::AsyncPgConnection, config, move |url: &str| {
                        Box::pin(pg_setup::establish(
                            url.to_owned(),
                            schema.clone(),
                            lock_timeout,
                            counter.clone(),
                            tls_for_pool.clone(),
                        ))
                    });
                (Backend::Postgres(pool, tls), config)
            }
            #[cfg(feature = "mysql")]
            BackendKind::Mysql => {
                let counter = config.counter.clone();
                let lock_timeout = config.busy_timeout;
                let pool = build_pool!(
                    diesel_async::AsyncMysqlConnection,
                    config,
                    move |url: &str| {
                        Box::pin(mysql_setup::establish(
                            url.to_owned(),
                            lock_timeout,
                            counter.clone(),
                        ))
                    }
                );
                (Backend::Mysql(pool), config)
            }
            #[cfg(feature = "sqlite")]
            BackendKind::Sqlite => {
                let path = config.sqlite_path();
                let busy_ms = whole_millis(config.busy_timeout);
                let mut config = config.clone();
                match sqlite_open(&path) {
                    SqliteOpen::File => {}
                    // Each connection would be its own database: one
                    // connection, kept, holds the store.
                    SqliteOpen::PerConnection => config.max_connections = 1,
                    SqliteOpen::Temporary => {
                        return Err(DieselError::Config(
                            "the SQLite URL names no file: an empty name opens a temporary \
                             database that is deleted when its connection closes (name a \
                             file, or `:memory:` for a database that lives with the store)"
                                .into(),
                        ));
                    }
                }
                let counter = config.counter.clone();
                let pool = build_pool!(SqliteConn, config, move |_url: &str| {
                    Box::pin(sqlite_setup::establish(
                        path.clone(),
                        busy_ms,
                        counter.clone(),
                    ))
                });
                (Backend::Sqlite(pool), config)
            }
            #[allow(unreachable_patterns)]
            BackendKind::Postgres => return Err(DieselError::FeatureDisabled("postgres")),
            #[allow(unreachable_patterns)]
            BackendKind::Mysql => return Err(DieselError::FeatureDisabled("mysql")),
            #[allow(unreachable_patterns)]
            BackendKind::Sqlite => return Err(DieselError::FeatureDisabled("sqlite")),
        };
        Self::checked(backend, config).await
    }

    async fn checked(backend: Backend, config: DieselConfig) -> Result<Self, DieselError> {
        let mut store = Self {
            backend,
            config,
            heads: Arc::default(),
            decoded: Arc::default(),
            writes: WriteGate::default(),
            held: Arc::default(),
        };
        store.writes = WriteGate::for_backend(store.kind());
        let ping: Result<(), OpError> =
            async { with_conn!(store, [], |conn, ops| ops::ping(conn).await) }.await;
        ping.map_err(|e| DieselError::Connect(store_error(e).to_string()))?;
        Ok(store)
    }

    /// [`DieselStore::connect`], then [`DieselStore::migrate`].
    pub async fn connect_and_migrate(config: DieselConfig) -> Result<Self, DieselError> {
        let store = Self::connect(config).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// The backend.
    pub fn kind(&self) -> BackendKind {
        match &self.backend {
            #[cfg(feature = "postgres")]
            Backend::Postgres(..) => BackendKind::Postgres,
            #[cfg(feature = "mysql")]
            Backend::Mysql(_) => BackendKind::Mysql,
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(_) => BackendKind::Sqlite,
        }
    }

    /// Runs the embedded migrations that have not run yet (idempotent; safe
    /// to call at every start-up, also from several replicas at once: on
    /// PostgreSQL and MySQL they take turns under a lock on the server, on
    /// SQLite under the database's own lock, for at most the busy timeout).
    pub async fn migrate(&self) -> Result<(), DieselError> {
        let fail = |e: &dyn std::fmt::Display| DieselError::Migration(e.to_string());
        match &self.backend {
            #[cfg(feature = "postgres")]
            Backend::Postgres(_, tls) => {
                let mut conn = pg_setup::establish(
                    self.config.url.clone(),
                    None,
                    self.config.migration_wait,
                    None,
                    tls.clone(),
                )
                .await
                .map_err(|e| fail(&e))?;
                use diesel_async::SimpleAsyncConnection;
                // Replicas starting at once migrate one at a time: diesel's
                // harness takes no lock, and the second would fail on a table
                // the first just made. The lock is the session's, so it ends
                // with the connection. (The schema name is checked.) It
                // waits, as every statement of the migrations after it,
                // at most the migration wait (the connection's
                // `lock_timeout`), as on MySQL.
                let schema = self.config.schema.as_deref().unwrap_or("");
                conn.batch_execute(&format!(
                    "SELECT pg_advisory_lock(hashtext('impersonation_migrations:{schema}'))"
                ))
                .await
                .map_err(|e| fail(&e))?;
                if !schema.is_empty() {
                    // Created only if missing: PostgreSQL checks the right
                    // to create schemas in the database before it looks
                    // whether one exists, so a role given its schema by a
                    // DBA (and no CREATE on the database) would fail
                    // `CREATE SCHEMA IF NOT EXISTS` on every start.
                    conn.batch_execute(&format!(
                        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = '{schema}') \
                         THEN CREATE SCHEMA \"{schema}\"; END IF; END $$; SET search_path TO \"{schema}\""
                    ))
                    .await
                    .map_err(|e| fail(&e))?;
                }
                let applied = diesel_async::RunQueryDsl::load::<rows::MigrationVersion>(
                    diesel::sql_query(APPLIED_MIGRATIONS),
                    &mut conn,
                )
                .await;
                if all_applied::<diesel::pg::Pg>(&migrations::POSTGRES, applied) {
                    return Ok(());
                }
                migrate_async(conn, migrations::POSTGRES).await
            }
            #[cfg(feature = "mysql")]
            Backend::Mysql(_) => {
                use diesel_async::RunQueryDsl;
                let wait = self.config.migration_wait;
                let mut conn = mysql_setup::establish(self.config.url.clone(), wait, None)
                    .await
                    .map_err(|e| fail(&e))?;
                // As on PostgreSQL: one migrator per database at a time. The
                // lock is the connection's; its name, 15 + 40 characters, is
                // within MySQL's 64 (MariaDB takes longer ones).
                let secs = whole_seconds(wait);
                let locked = diesel::sql_query(format!(
                    "SELECT CAST(COALESCE(GET_LOCK(CONCAT('imp_migrations:', \
                     SHA1(COALESCE(DATABASE(), ''))), {secs}), 0) AS SIGNED) AS locked"
                ))
                .load::<rows::Locked>(&mut conn)
                .await
                .map_err(|e| fail(&e))?;
                if locked.into_iter().next().is_none_or(|row| row.locked != 1) {
                    return Err(DieselError::Migration(format!(
                        "another process held the migration lock for {secs} s"
                    )));
                }
                let applied = diesel::sql_query(APPLIED_MIGRATIONS)
                    .load::<rows::MigrationVersion>(&mut conn)
                    .await;
                if all_applied::<diesel::mysql::Mysql>(&migrations::MYSQL, applied) {
                    return Ok(());
                }
                migrate_async(conn, migrations::MYSQL).await
            }
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(pool) => {
                // On the pool's own connection: an in-memory database exists only there.
                let conn = pool.get().await.map_err(|e| fail(&e))?;
                let outcome = on_blocking_thread(conn, async |conn: &mut SqliteConn| {
                    conn.spawn_blocking(|conn| {
                        use diesel_migrations::MigrationHarness;
                        // SQLite has no lock beside the database to take:
                        // the whole run is one exclusive transaction (each
                        // migration a savepoint in it), so processes
                        // starting at once take turns, waiting up to the
                        // busy timeout, and the later ones find nothing
                        // left to do.
                        Ok(conn
                            .exclusive_transaction(|conn| {
                                conn.run_pending_migrations(migrations::SQLITE).map(|_| ())
                            })
                            .map_err(|e| e.to_string()))
                    })
                    .await
                    .map_err(OpError::Db)
                })
                .await
                .map_err(|e| fail(&store_error(e)))?;
                outcome.map_err(|e| fail(&e))
            }
        }
    }
}

mod migrations {
    use diesel_migrations::{EmbeddedMigrations, embed_migrations};
    #[cfg(feature = "postgres")]
    pub(crate) const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
    #[cfg(feature = "mysql")]
    pub(crate) const MYSQL: EmbeddedMigrations = embed_migrations!("migrations/mysql");
    #[cfg(feature = "sqlite")]
    pub(crate) const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
}

/// Whether every migration in `migrations` is among those diesel's
/// harness recorded as run (`applied`, as read from its table, which may
/// not exist yet).
#[cfg(any(feature = "postgres", feature = "mysql"))]
fn all_applied<DB: diesel::backend::Backend>(
    migrations: &diesel_migrations::EmbeddedMigrations,
    applied: diesel::QueryResult<Vec<rows::MigrationVersion>>,
) -> bool {
    use diesel::migration::MigrationSource;
    let applied = match applied {
        Ok(applied) => applied,
        Err(e) => {
            tracing::debug!(error = %e, "no table of migrations run to read; running diesel's harness");
            return false;
        }
    };
    MigrationSource::<DB>::migrations(migrations).is_ok_and(|embedded| {
        embedded.iter().all(|m| {
            let version = m.name().version().to_string();
            applied.iter().any(|a| a.version == version)
        })
    })
}

/// The query of the migrations diesel's harness recorded as run. Read
/// before the harness runs: with nothing pending, `migrate` is done
/// without it, since it creates its own table (`IF NOT EXISTS`) on every
/// run, a right a role that only reads and writes the store's tables
/// does not have.
#[cfg(any(feature = "postgres", feature = "mysql"))]
const APPLIED_MIGRATIONS: &str = "SELECT version FROM __diesel_schema_migrations";

/// Runs sync diesel_migrations on an async connection, on a blocking thread.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn migrate_async<C>(
    conn: C,
    migrations: diesel_migrations::EmbeddedMigrations,
) -> Result<(), DieselError>
where
    C: diesel_async::AsyncConnection + 'static,
    diesel_async::async_connection_wrapper::AsyncConnectionWrapper<C>:
        diesel::Connection<Backend = C::Backend> + diesel_migrations::MigrationHarness<C::Backend>,
{
    let outcome = tokio::task::spawn_blocking(move || {
        use diesel_migrations::MigrationHarness;
        let mut wrapper =
            diesel_async::async_connection_wrapper::AsyncConnectionWrapper::<C>::from(conn);
        wrapper
            .run_pending_migrations(migrations)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| DieselError::Migration(e.to_string()))?;
    outcome.map_err(DieselError::Migration)
}

impl DieselStore {
    async fn write<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, OpError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(OpError::Db(e)) if retryable(&e) && attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "retrying a write after a transient conflict");
                    tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                    attempt += 1;
                }
                other => return other.map_err(store_error),
            }
        }
    }
}

/// Most chain heads a store remembers (PostgreSQL) before it starts over.
const HEADS_CAPACITY: usize = 4_096;

impl DieselStore {
    fn cached_heads(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<ChainKey, ChainHead>> {
        self.heads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember_heads<'a>(&self, events: impl Iterator<Item = &'a AuditEvent>) {
        if !self.appends_by_cached_head() {
            return;
        }
        let mut heads = self.cached_heads();
        for event in events {
            // Bounded as the decoded sessions are: one entry per agent who
            // ever wrote would grow for the process's life. Starting over
            // costs each chain one append by the transaction.
            if heads.len() >= HEADS_CAPACITY && !heads.contains_key(&event.chain) {
                heads.clear();
            }
            heads.insert(event.chain.clone(), event.head());
        }
    }

    fn forget_heads<'a>(&self, chains: impl Iterator<Item = &'a ChainKey>) {
        let mut heads = self.cached_heads();
        for chain in chains {
            heads.remove(chain);
        }
    }

    fn appends_by_cached_head(&self) -> bool {
        #[cfg(feature = "postgres")]
        if matches!(self.backend, Backend::Postgres(..)) {
            return true;
        }
        false
    }

    /// PostgreSQL's fast path for a batch on one chain whose head this
    /// process knows: one statement that moves the head by compare-and-set,
    /// checks every guard and inserts the events, or does nothing. Every
    /// state change of a session appends to its agent's chain, so an
    /// unmoved head means no guard changed since the statement's snapshot.
    /// `None` (nothing written) sends the batch down the transaction path.
    async fn append_by_cached_head(
        &self,
        batch: &[(AuditDraft, AppendGuard)],
    ) -> Option<Vec<Result<AuditEvent, StoreError>>> {
        if !self.appends_by_cached_head() {
            return None;
        }
        let chain = &batch.first()?.0.chain;
        if batch.iter().any(|(d, _)| d.chain != *chain) {
            return None;
        }
        // Sealed after the newest head this process expects, and that
        // head moved on at once, so the next batch can follow before this
        // one commits (it waits on the row lock, then finds its expected
        // head). Should this one fail, the next one's compare fails too.
        let (expected, events) = {
            let mut heads = self.cached_heads();
            let expected = *heads.get(chain)?;
            let mut head = Some(expected);
            let mut events = Vec::with_capacity(batch.len());
            for (draft, _) in batch {
                let sealed = ops::Sealed::new(draft.clone(), head).ok()?;
                head = Some(sealed.event.head());
                events.push(sealed);
            }
            if let Some(last) = events.last() {
                heads.insert(chain.clone(), last.event.head());
            }
            (expected, events)
        };
        let guarded = ops::guarded_sessions(batch);
        let events = Arc::new(events);
        let written: Result<bool, OpError> = async {
            with_conn!(self, write, [events, guarded], |conn, ops| ops::append_cas(
                conn, expected, &events, &guarded
            )
            .await)
        }
        .await;
        match written {
            Ok(true) => Some(
                Arc::unwrap_or_clone(events)
                    .into_iter()
                    .map(|s| Ok(s.event))
                    .collect(),
            ),
            // It waited out the lock timeout on the head row, which
            // another transaction holds (a host that died mid-write): the
            // transaction path would only wait on the same row again. The
            // statement wrote nothing; its chain's events fail at once, as
            // the transaction path fails them, after one wait, not two.
            Err(OpError::Db(e)) if ops::lock_timed_out(&e) => {
                self.forget_heads(std::iter::once(chain));
                Some(batch.iter().map(|_| Err(chain_locked(chain))).collect())
            }
            // Not written (or, on an error, unknown): the transaction path
            // re-reads the head and seals the drafts again. Should the
            // statement have committed after all, their event ids meet the
            // primary key there and the batch fails: it is never written
            // twice, though its callers then hear of a failure.
            Ok(false) | Err(_) => {
                self.forget_heads(std::iter::once(chain));
                None
            }
        }
    }
}

/// Support for `cargo xtask bench`: baselines on the store's own pool and a
/// bulk loader. Not part of the API; it bypasses the store's guarantees.
#[doc(hidden)]
impl DieselStore {
    pub async fn bench_prepare(&self) -> Result<(), StoreError> {
        let r: Result<_, OpError> =
            async { with_conn!(self, [], |conn, ops| ops::bench_prepare(conn).await) }.await;
        r.map_err(store_error)
    }

    pub async fn bench_baseline_select(&self, hash: &str) -> Result<usize, StoreError> {
        let hash = hash.to_owned();
        let r: Result<_, OpError> = async {
            with_conn!(self, [hash], |conn, ops| ops::baseline_select(conn, &hash)
                .await)
        }
        .await;
        r.map_err(store_error)
    }

    pub async fn bench_baseline_insert(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        let r: Result<_, OpError> = async {
            with_conn!(self, [id], |conn, ops| ops::baseline_insert(conn, &id)
                .await)
        }
        .await;
        r.map_err(store_error)
    }

    pub async fn bench_bulk_append(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let events = Arc::new(events.to_vec());
        let r: Result<_, OpError> = async {
            with_conn!(self, [events], |conn, ops| ops::bulk_append(conn, &events)
                .await)
        }
        .await;
        r.map_err(store_error)
    }
}

#[async_trait]
impl Store for DieselStore {
    async fn start(&self, start: Start) -> Result<StartOutcome, StoreError> {
        let start = Arc::new(start);
        let outcome = self
            .write(|| async {
                with_conn!(self, write, [start], |conn, ops| ops::start(conn, &start)
                    .await)
            })
            .await?;
        match &outcome {
            StartOutcome::Started { event, .. } | StartOutcome::Refused { event, .. } => {
                self.remember_heads(std::iter::once(event));
            }
        }
        Ok(outcome)
    }

    async fn transition(
        &self,
        transition: Transition,
    ) -> Result<(Session, AuditEvent), StoreError> {
        let transition = Arc::new(transition);
        let (session, event) = self
            .write(|| async {
                with_conn!(self, write, [transition], |conn, ops| ops::transition(
                    conn,
                    &transition
                )
                .await)
            })
            .await?;
        self.remember_heads(std::iter::once(&event));
        Ok((session, event))
    }

    async fn append(
        &self,
        event: AuditDraft,
        guard: AppendGuard,
    ) -> Result<AuditEvent, StoreError> {
        let event = Arc::new(event);
        let event = self
            .write(|| async {
                with_conn!(self, write, [event], |conn, ops| ops::append(
                    conn, &event, guard
                )
                .await)
            })
            .await?;
        self.remember_heads(std::iter::once(&event));
        Ok(event)
    }

    async fn append_batch(
        &self,
        batch: Vec<(AuditDraft, AppendGuard)>,
    ) -> Vec<Result<AuditEvent, StoreError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        if let Some(results) = self.append_by_cached_head(&batch).await {
            return results;
        }
        let n = batch.len();
        let mut results: Vec<Option<Result<AuditEvent, StoreError>>> = vec![None; n];
        // The positions still to append: a chain whose head row another
        // transaction holds (a writer that died holding it, say) fails its
        // own events, and the batch goes on without them, so that one
        // stuck chain does not fail other agents' appends. Once: a second
        // held chain (many a dead writer held, or a lock on the whole
        // table) fails the rest, so that a batch waits at most two lock
        // timeouts, with every append of the process queued behind it.
        let mut set_aside = false;
        let mut left: Vec<usize> = (0..n).collect();
        let batch = Arc::new(batch);
        // The whole batch, unless a chain was set aside.
        let mut part = Arc::clone(&batch);
        loop {
            let outcome = self
                .write(|| async {
                    with_conn!(self, write, [part], |conn, ops| {
                        match ops::append_batch(conn, &part).await {
                            Err(OpError::ChainLocked(chain)) => Ok(Err(chain)),
                            other => other.map(Ok),
                        }
                    })
                })
                .await;
            let failed = match outcome {
                Ok(Ok(appended)) => {
                    self.remember_heads(appended.iter().filter_map(|r| r.as_ref().ok()));
                    for (&i, result) in left.iter().zip(appended) {
                        results[i] = Some(result);
                    }
                    break;
                }
                Ok(Err(chain)) if !set_aside => {
                    tracing::warn!(chain = %chain, "an audit chain's head row is held past the lock timeout; appending the batch without its events");
                    set_aside = true;
                    self.forget_heads(std::iter::once(&chain));
                    left.retain(|&i| {
                        let locked = batch[i].0.chain == chain;
                        if locked {
                            results[i] = Some(Err(chain_locked(&chain)));
                        }
                        !locked
                    });
                    if left.is_empty() {
                        break;
                    }
                    part = Arc::new(left.iter().map(|&i| batch[i].clone()).collect());
                    continue;
                }
                Ok(Err(chain)) => {
                    tracing::warn!(chain = %chain, "a second audit chain's head row is held past the lock timeout; failing the rest of the batch");
                    chain_locked(&chain)
                }
                // The transaction rolled back: nothing in it was written.
                Err(e) => e,
            };
            self.forget_heads(part.iter().map(|(d, _)| &d.chain));
            for &i in &left {
                results[i] = Some(Err(failed.clone()));
            }
            break;
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(StoreError::unavailable_because(
                        "an append was not attempted",
                    ))
                })
            })
            .collect()
    }

    async fn find_by_secrets(
        &self,
        lookups: &[SecretLookup],
        touch: Option<Touch>,
    ) -> Vec<Result<Option<Session>, StoreError>> {
        let hashes: Arc<Vec<_>> = Arc::new(lookups.iter().map(|l| l.hash).collect());
        let (decoded, writes, held) = (&self.decoded, &self.writes, &self.held);
        let outcome = self
            .write(|| async {
                with_conn!(self, [hashes, decoded, writes, held], |conn, ops| {
                    ops::find_by_secrets(conn, &hashes, touch, &decoded, &writes, &held).await
                })
            })
            .await;
        match outcome {
            Ok(found) => found,
            Err(e) => vec![Err(e); lookups.len()],
        }
    }

    fn batching(&self) -> Batching {
        // One call of each kind in flight: measured best on every backend.
        // A second append on the same chain only waits on the first one's
        // row lock (pipelining them on one PostgreSQL connection measured
        // slower still: its commits are flushed one by one), and a second
        // lookup only makes smaller batches.
        Batching {
            appends: 1,
            lookups: 1,
        }
    }

    async fn find_by_secret(
        &self,
        secret: &SecretLookup,
        touch: Option<Touch>,
    ) -> Result<Option<Session>, StoreError> {
        let (hash, decoded, writes, held) = (secret.hash, &self.decoded, &self.writes, &self.held);
        self.write(|| async {
            with_conn!(self, [decoded, writes, held], |conn, ops| {
                ops::find_by_secret(conn, &hash, touch, &decoded, &writes, &held).await
            })
        })
        .await
    }

    async fn session(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        let r: Result<_, OpError> =
            async { with_conn!(self, [], |conn, ops| ops::session(conn, id).await) }.await;
        r.map_err(store_error)
    }

    async fn live_sessions(&self, filter: &LiveFilter) -> Result<Vec<Session>, StoreError> {
        let r: Result<_, OpError> = async {
            with_conn!(self, [filter], |conn, ops| ops::live_sessions(
                conn, &filter
            )
            .await)
        }
        .await;
        r.map_err(store_error)
    }

    async fn record_check(
        &self,
        id: SessionId,
        version: u64,
        checked_at: OffsetDateTime,
        shadow: &ShadowUser,
    ) -> Result<(), StoreError> {
        self.write(|| async {
            with_conn!(self, write, [shadow], |conn, ops| ops::record_check(
                conn, id, version, checked_at, &shadow
            )
            .await)
        })
        .await
    }

    async fn audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        let r: Result<_, OpError> =
            async { with_conn!(self, [query], |conn, ops| ops::audit(conn, &query).await) }.await;
        r.map_err(store_error)
    }

    async fn chain_events(
        &self,
        chain: &ChainKey,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let r: Result<_, OpError> = async {
            with_conn!(self, [chain], |conn, ops| ops::chain_events(
                conn, &chain, from_seq, limit
            )
            .await)
        }
        .await;
        r.map_err(store_error)
    }

    async fn chain_head(&self, chain: &ChainKey) -> Result<Option<ChainHead>, StoreError> {
        let r: Result<_, OpError> = async {
            with_conn!(self, [chain], |conn, ops| ops::chain_head(conn, &chain)
                .await)
        }
        .await;
        r.map_err(store_error)
    }

    async fn chains(
        &self,
        after: Option<&ChainKey>,
        limit: u32,
    ) -> Result<Vec<ChainKey>, StoreError> {
        let after = after.cloned();
        let r: Result<_, OpError> = async {
            with_conn!(self, [after], |conn, ops| ops::chains(
                conn,
                after.as_ref(),
                limit
            )
            .await)
        }
        .await;
        r.map_err(store_error)
    }
}

#[cfg(test)]
mod tests {
    use super::DieselConfig;

    /// The names SQLite opens as a database per connection, or as a
    /// temporary file, are told from a file's.
    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_names_that_are_no_shared_file_are_told_apart() {
        use super::{SqliteOpen, sqlite_open};
        let files = [
            "trail.db",
            "/var/lib/app/trail.db",
            "file:trail.db",
            "file:trail.db?mode=rwc",
            "file:memory.db",
            "file:///var/lib/app/trail.db",
            "file://localhost/var/lib/app/trail.db",
            "file:/tmp/trail?vfs=memdb",
            "FILE:trail.db",
            "FILE::memory:",
            "FILE:",
        ];
        let per_connection = [
            ":memory:",
            "file::memory:",
            "file:trail?mode=memory",
            "file:trail?cache=shared&mode=memory",
            "file::memory:?cache=shared",
            "file:trail?vfs=memdb",
            "file:%3Amemory%3A",
            "file:x?mode=%6Demory",
            "file:x?%6Dode=memory",
            "file://localhost/:memory:?mode=memory",
            "file:/?vfs=memdb",
            "file:///?vfs=memdb",
            "file:%2F?vfs=memdb",
        ];
        let temporary = [
            "",
            "file:",
            "file:?mode=rwc",
            "file:#x",
            "file://",
            "file://localhost",
            "file:%00trail.db",
        ];
        for (paths, how) in [
            (&files[..], SqliteOpen::File),
            (&per_connection[..], SqliteOpen::PerConnection),
            (&temporary[..], SqliteOpen::Temporary),
        ] {
            for path in paths {
                assert_eq!(sqlite_open(path), how, "{path}");
            }
        }
    }

    /// A statement whose markers and arguments disagree (a bug of ours)
    /// fails as an error on a counted connection, not as a panic in the
    /// counter, which formats every statement it sees.
    #[cfg(feature = "sqlite")]
    #[test]
    fn a_malformed_statement_on_a_counted_connection_is_an_error() {
        use diesel::{Connection, RunQueryDsl};
        let counter = super::QueryCounter::new();
        let mut conn = diesel::SqliteConnection::establish(":memory:").expect("in-memory SQLite");
        conn.set_instrumentation(super::Counting(std::sync::Arc::clone(&counter)));
        let run = |sql: crate::sql::Sql, conn: &mut diesel::SqliteConnection| {
            // Diesel's synchronous call, as `Runs` makes it on SQLite.
            RunQueryDsl::execute(sql, conn)
        };
        let missing = run(crate::sql::Sql::new("SELECT ?"), &mut conn);
        assert!(
            matches!(missing, Err(diesel::result::Error::QueryBuilderError(_))),
            "{missing:?}"
        );
        let extra = run(crate::sql::Sql::new("SELECT 1").arg(1_i64), &mut conn);
        assert!(
            matches!(extra, Err(diesel::result::Error::QueryBuilderError(_))),
            "{extra:?}"
        );
        assert_eq!(counter.queries(), 2, "both reached the counter");
        run(crate::sql::Sql::new("CREATE TABLE t (v BIGINT)"), &mut conn).expect("create");
        let inserted = run(
            crate::sql::Sql::new("INSERT INTO t (v) VALUES (?)").arg(7_i64),
            &mut conn,
        );
        assert_eq!(inserted.ok(), Some(1), "a well-formed statement runs");
    }

    /// MySQL's lock waits in whole seconds: rounded up, at least one, and
    /// a wait of "forever" (`Duration::MAX`) a year, not an overflow.
    #[cfg(feature = "mysql")]
    #[test]
    fn lock_waits_are_whole_seconds_within_mysqls_range() {
        use std::time::Duration;
        assert_eq!(super::whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(super::whole_seconds(Duration::from_millis(2_500)), 3);
        assert_eq!(super::whole_seconds(Duration::from_secs(300)), 300);
        assert_eq!(super::whole_seconds(Duration::MAX), 365 * 24 * 3600);
    }

    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[test]
    fn lock_waits_are_whole_milliseconds_within_postgres_and_sqlites_range() {
        use std::time::Duration;
        assert_eq!(super::whole_millis(Duration::from_micros(1)), 1);
        assert_eq!(super::whole_millis(Duration::from_micros(2_500)), 3);
        assert_eq!(super::whole_millis(Duration::from_secs(5)), 5_000);
        assert_eq!(super::whole_millis(Duration::MAX), 2_147_483_647);
    }

    #[test]
    fn debug_output_leaves_the_password_out() {
        let config = DieselConfig::new("postgres://app:hunter2@db.example/app");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("postgres://***@db.example/app"), "{shown}");
    }

    /// MySQL's duplicate-key message quotes the value (a secret's lookup
    /// hash for the sessions' unique key): the store's error leaves it out.
    #[test]
    fn a_duplicate_keys_value_stays_out_of_the_stores_error() {
        use diesel::result::{DatabaseErrorKind, Error};
        let hash = "5f2b8c0e4d1a9b7c3e6f0a2d4b8c1e7f";
        let mysql = Error::DatabaseError(
            DatabaseErrorKind::UniqueViolation,
            Box::new(format!(
                "Duplicate entry '{hash}' for key 'impersonation_sessions_secret'"
            )),
        );
        let shown = super::store_error(super::ops::OpError::Db(mysql)).to_string();
        assert!(!shown.contains(hash), "{shown}");
        assert!(shown.contains("unique constraint"), "{shown}");
        // Other database errors keep their message.
        let other = Error::DatabaseError(
            DatabaseErrorKind::SerializationFailure,
            Box::new("could not serialize access".to_owned()),
        );
        let shown = super::store_error(super::ops::OpError::Db(other)).to_string();
        assert!(shown.contains("could not serialize access"), "{shown}");
    }
}
