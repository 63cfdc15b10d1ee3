//! One small query type for every backend: SQL text with `?` markers, each
//! replaced by a bound parameter in the backend's own placeholder style
//! (`$1` on PostgreSQL, `?` elsewhere).
//!
//! Unlike `diesel::sql_query`, it lets the connection cache the prepared
//! statement (keyed by its SQL text), so a hot query such as the
//! per-request session lookup costs one round trip, not a prepare and an
//! execute.

use diesel::QueryResult;
use diesel::QueryableByName;
use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, HasSqlType, Nullable, Text, Untyped};

/// A bound value.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
    OptText(Option<String>),
}

impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}

impl From<String> for Arg {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}

impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<Option<String>> for Arg {
    fn from(v: Option<String>) -> Self {
        Self::OptText(v)
    }
}

/// SQL text and its arguments, in order of the `?` markers. The text must
/// not contain `?` anywhere else (no literal question marks).
#[derive(Debug, Clone)]
pub(crate) struct Sql {
    text: String,
    args: Vec<Arg>,
    /// The longest list in the text (`IN (?, ...)`, `VALUES` rows, `OR`ed
    /// terms), as its builder declared with [`Sql::list`].
    longest_list: usize,
}

impl Sql {
    pub(crate) fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            args: Vec::new(),
            longest_list: 0,
        }
    }

    /// Declares a list of `n` items in the text: each length makes the
    /// statement a text of its own (see [`CachePolicy`]).
    pub(crate) fn list(&mut self, n: usize) {
        self.longest_list = self.longest_list.max(n);
    }

    /// Binds the next `?`.
    pub(crate) fn arg(mut self, value: impl Into<Arg>) -> Self {
        self.args.push(value.into());
        self
    }

    /// Appends text (with its own markers bound by later `arg` calls).
    pub(crate) fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// Appends text and binds one marker in it.
    pub(crate) fn push_arg(&mut self, text: &str, value: impl Into<Arg>) {
        self.text.push_str(text);
        self.args.push(value.into());
    }

    /// Runs the statement on `conn`; how many rows it changed.
    pub(crate) async fn execute(self, conn: &mut impl Runs) -> QueryResult<usize> {
        conn.run(self).await
    }

    /// Runs the query on `conn`; its rows.
    pub(crate) async fn load<U>(self, conn: &mut impl Fetches<U>) -> QueryResult<Vec<U>> {
        conn.fetch(self).await
    }
}

/// A connection the store's operations (`store_ops!`) run their [`Sql`] on.
///
/// PostgreSQL and MySQL go through diesel-async. SQLite runs each statement
/// on the wrapped synchronous connection, where diesel binds every value
/// by reference: diesel-async's own path would first copy each text
/// argument into an owned bind value, and clone it again, so that its
/// query could move to another thread. The store already runs each whole
/// SQLite call on one blocking thread, where the wrapper runs in place
/// (`InPlace`), and a `Sql` owns its arguments, so it moves there as it is.
///
/// Its methods are `run` and `fetch`, not `execute` and `load`:
/// diesel-async implements its `RunQueryDsl` for every type, connections
/// included, and those names would clash there.
pub(crate) trait Runs {
    /// Runs a statement; how many rows it changed.
    async fn run(&mut self, sql: Sql) -> QueryResult<usize>;
}

/// A connection that loads a [`Sql`] query's rows as `U` (a trait of its
/// own because the rows' bound names the connection's backend).
pub(crate) trait Fetches<U> {
    /// Runs a query; its rows.
    async fn fetch(&mut self, sql: Sql) -> QueryResult<Vec<U>>;
}

#[cfg(feature = "sqlite")]
impl Runs for crate::SqliteConn {
    async fn run(&mut self, sql: Sql) -> QueryResult<usize> {
        self.spawn_blocking(move |c| diesel::RunQueryDsl::execute(sql, c))
            .await
    }
}

#[cfg(feature = "sqlite")]
impl<U> Fetches<U> for crate::SqliteConn
where
    U: QueryableByName<diesel::sqlite::Sqlite> + Send + 'static,
{
    async fn fetch(&mut self, sql: Sql) -> QueryResult<Vec<U>> {
        self.spawn_blocking(move |c| diesel::RunQueryDsl::load::<U>(sql, c))
            .await
    }
}

/// Through diesel-async, for its own async connections.
#[cfg(any(feature = "postgres", feature = "mysql"))]
macro_rules! runs_async {
    ($conn:ty, $db:ty) => {
        impl Runs for $conn {
            async fn run(&mut self, sql: Sql) -> QueryResult<usize> {
                diesel_async::RunQueryDsl::execute(sql, self).await
            }
        }

        impl<U> Fetches<U> for $conn
        where
            U: QueryableByName<$db> + Send + 'static,
        {
            async fn fetch(&mut self, sql: Sql) -> QueryResult<Vec<U>> {
                diesel_async::RunQueryDsl::load::<U>(sql, self).await
            }
        }
    };
}

#[cfg(feature = "postgres")]
runs_async!(diesel_async::AsyncPgConnection, diesel::pg::Pg);
#[cfg(feature = "mysql")]
runs_async!(diesel_async::AsyncMysqlConnection, diesel::mysql::Mysql);

impl QueryId for Sql {
    type QueryId = ();
    // Not static: the statement cache keys on the SQL text instead.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Sql {
    type SqlType = Untyped;
}

/// Diesel's synchronous `execute` and `load`, for [`Runs`] on SQLite.
#[cfg(feature = "sqlite")]
impl diesel::RunQueryDsl<diesel::SqliteConnection> for Sql {}

/// How long a statement's lists may be for it to stay prepared on its
/// connection. A statement's text grows with its lists (the lookups' `IN`,
/// a batch's `VALUES`), so every length is a statement of its own, and the
/// connection's cache never lets one go.
pub(crate) trait CachePolicy {
    /// Statements with a longer list are prepared for one use.
    const MAX_CACHED_LIST: usize;
}

/// MySQL and MariaDB count every connection's prepared statements against
/// one server-wide limit (`max_prepared_stmt_count`, 16,382 by default),
/// which the lists' lengths would reach across a few app servers' pools.
/// Lists of up to 8 stay prepared: a lookup of up to 8 secrets, a batch of
/// up to 8 events and its view runs (one event has 6), so a connection
/// keeps a few dozen statements; a longer batch costs one more round trip
/// (its `PREPARE`), spread over its events.
#[cfg(feature = "mysql")]
impl CachePolicy for diesel::mysql::Mysql {
    const MAX_CACHED_LIST: usize = 8;
}

/// PostgreSQL keeps a connection's statements in that connection's own
/// backend process, with no server-wide limit, but every one costs that
/// process memory for as long as the connection lives: lists of up to 64
/// stay prepared (the batches of ordinary traffic; a longer one, under a
/// burst, is parsed for its one use), so a connection's statements stay
/// a bounded set rather than one per list length ever seen, up to 256.
#[cfg(feature = "postgres")]
impl CachePolicy for diesel::pg::Pg {
    const MAX_CACHED_LIST: usize = 64;
}

/// SQLite's statements live in this process, one cache per connection:
/// bounded as PostgreSQL's are.
#[cfg(feature = "sqlite")]
impl CachePolicy for diesel::sqlite::Sqlite {
    const MAX_CACHED_LIST: usize = 64;
}

impl<DB> QueryFragment<DB> for Sql
where
    DB: Backend + HasSqlType<Text> + HasSqlType<BigInt> + CachePolicy,
    String: ToSql<Text, DB>,
    i64: ToSql<BigInt, DB>,
    Option<String>: ToSql<Nullable<Text>, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        if self.longest_list > DB::MAX_CACHED_LIST {
            out.unsafe_to_cache_prepared();
        }
        let mut args = self.args.iter();
        for (i, part) in self.text.split('?').enumerate() {
            if i > 0 {
                match args.next() {
                    Some(Arg::Text(v)) => out.push_bind_param::<Text, String>(v)?,
                    Some(Arg::Int(v)) => out.push_bind_param::<BigInt, i64>(v)?,
                    Some(Arg::OptText(v)) => {
                        out.push_bind_param::<Nullable<Text>, Option<String>>(v)?
                    }
                    None => {
                        return Err(diesel::result::Error::QueryBuilderError(
                            "more `?` markers than arguments".into(),
                        ));
                    }
                }
            }
            out.push_sql(part);
        }
        if args.next().is_some() {
            return Err(diesel::result::Error::QueryBuilderError(
                "more arguments than `?` markers".into(),
            ));
        }
        Ok(())
    }
}
