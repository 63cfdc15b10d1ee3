//! Test databases: each test gets its own PostgreSQL schema, MariaDB
//! database or SQLite file, so tests run in parallel without seeing each other.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A build with one backend (`--no-default-features --features sqlite`,
// say) leaves the other backends' helpers and imports unused.
#![cfg_attr(
    not(all(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(unused_imports)
)]

use impersonation_diesel::{DieselConfig, DieselStore};

pub(crate) const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub(crate) const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";

pub(crate) use impersonation_testkit::scratch::{scratch_file, unique_name as unique};

/// A test database: its store, and where to reach it with raw SQL.
pub(crate) struct TestDb {
    pub(crate) store: DieselStore,
    pub(crate) place: Place,
}

pub(crate) enum Place {
    Postgres { schema: String },
    Mysql { url: String },
    Sqlite { path: String },
}

#[cfg(feature = "postgres")]
pub(crate) async fn postgres_db(pool: usize) -> TestDb {
    let schema = unique("imptest");
    let config = DieselConfig::new(PG_URL)
        .schema(schema.clone())
        .max_connections(pool);
    let store = DieselStore::connect_and_migrate(config)
        .await
        .expect("PostgreSQL test store");
    TestDb {
        store,
        place: Place::Postgres { schema },
    }
}

#[cfg(feature = "postgres")]
pub(crate) async fn postgres() -> DieselStore {
    postgres_db(8).await.store
}

/// A second store, with a pool of its own, on `db`'s database: another
/// process of the app.
pub(crate) async fn another_store_on(db: &TestDb, pool: usize) -> DieselStore {
    let config = match &db.place {
        Place::Postgres { schema } => DieselConfig::new(PG_URL).schema(schema.clone()),
        Place::Mysql { url } => DieselConfig::new(url.clone()),
        Place::Sqlite { path } => DieselConfig::new(format!("sqlite://{path}")),
    };
    DieselStore::connect_and_migrate(config.max_connections(pool))
        .await
        .expect("a second store on the test database")
}

#[cfg(feature = "postgres")]
pub(crate) async fn postgres_pair() -> (DieselStore, DieselStore) {
    let db = postgres_db(4).await;
    let other = another_store_on(&db, 4).await;
    (db.store, other)
}

/// A new, empty MariaDB database of the test's own; its URL.
#[cfg(feature = "mysql")]
pub(crate) async fn mysql_database() -> String {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let db = unique("imptest");
    let mut admin = diesel_async::AsyncMysqlConnection::establish(&format!("{MYSQL_SERVER}/test"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .await
        .unwrap();
    format!("{MYSQL_SERVER}/{db}")
}

/// MariaDB's named lock `impersonation_tests_keys`, held on a connection
/// of its own until [`KeysLock::release`] (or the test's process ends).
/// `innodb_force_primary_key` is a server-wide setting: the test that
/// turns it on holds this lock meanwhile, and so does every test that
/// drops a primary key, which the setting would refuse.
#[cfg(feature = "mysql")]
pub(crate) struct KeysLock(diesel_async::AsyncMysqlConnection);

/// Takes the [`KeysLock`], waiting for it, and turns
/// `innodb_force_primary_key` off: on only while its holder wants it, even
/// if a test that turned it on died before turning it off.
#[cfg(feature = "mysql")]
pub(crate) async fn keys_lock() -> KeysLock {
    use diesel::QueryableByName;
    use diesel::sql_types::BigInt;
    use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    #[derive(QueryableByName)]
    struct Got {
        #[diesel(sql_type = BigInt)]
        got: i64,
    }
    let mut conn = diesel_async::AsyncMysqlConnection::establish(&format!("{MYSQL_SERVER}/test"))
        .await
        .unwrap();
    let got: Got = diesel::sql_query(
        "SELECT CAST(COALESCE(GET_LOCK('impersonation_tests_keys', 600), 0) AS SIGNED) AS got",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(got.got, 1, "the keys lock was not free within 600 s");
    conn.batch_execute("SET GLOBAL innodb_force_primary_key = OFF")
        .await
        .unwrap();
    KeysLock(conn)
}

#[cfg(feature = "mysql")]
impl KeysLock {
    /// Runs `sql` on the lock's connection (`SET GLOBAL`, say).
    pub(crate) async fn run(&mut self, sql: &str) {
        use diesel_async::SimpleAsyncConnection;
        self.0.batch_execute(sql).await.unwrap();
    }

    /// Turns `innodb_force_primary_key` off and lets the lock go.
    pub(crate) async fn release(mut self) {
        self.run(
            "SET GLOBAL innodb_force_primary_key = OFF; \
             DO RELEASE_LOCK('impersonation_tests_keys')",
        )
        .await;
    }
}

#[cfg(feature = "mysql")]
pub(crate) async fn mysql_db(pool: usize) -> TestDb {
    let url = mysql_database().await;
    let store =
        DieselStore::connect_and_migrate(DieselConfig::new(url.clone()).max_connections(pool))
            .await
            .expect("MariaDB test store");
    TestDb {
        store,
        place: Place::Mysql { url },
    }
}

#[cfg(feature = "mysql")]
pub(crate) async fn mysql() -> DieselStore {
    mysql_db(8).await.store
}

#[cfg(feature = "mysql")]
pub(crate) async fn mysql_pair() -> (DieselStore, DieselStore) {
    let db = mysql_db(4).await;
    let other = another_store_on(&db, 4).await;
    (db.store, other)
}

pub(crate) async fn sqlite_file_db(pool: usize) -> TestDb {
    let path = scratch_file("imptest", "db").display().to_string();
    let config = DieselConfig::new(format!("sqlite://{path}")).max_connections(pool);
    let store = DieselStore::connect_and_migrate(config)
        .await
        .expect("SQLite file store");
    TestDb {
        store,
        place: Place::Sqlite { path },
    }
}

pub(crate) async fn sqlite_file() -> DieselStore {
    sqlite_file_db(4).await.store
}

pub(crate) async fn sqlite_file_pair() -> (DieselStore, DieselStore) {
    let db = sqlite_file_db(2).await;
    let other = another_store_on(&db, 2).await;
    (db.store, other)
}

pub(crate) async fn sqlite_memory() -> DieselStore {
    DieselStore::connect_and_migrate(DieselConfig::new("sqlite://:memory:"))
        .await
        .expect("SQLite memory store")
}

/// A connection of its own to a PostgreSQL or MySQL test database (its
/// schema the search path), for a test to hold a transaction open on.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) enum Held {
    #[cfg(feature = "postgres")]
    Postgres(Box<diesel_async::AsyncPgConnection>),
    #[cfg(feature = "mysql")]
    Mysql(diesel_async::AsyncMysqlConnection),
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl Held {
    pub(crate) async fn open(place: &Place) -> Self {
        use diesel_async::{AsyncConnection, SimpleAsyncConnection};
        match place {
            #[cfg(feature = "postgres")]
            Place::Postgres { schema } => {
                let mut conn = diesel_async::AsyncPgConnection::establish(PG_URL)
                    .await
                    .unwrap();
                conn.batch_execute(&format!("SET search_path TO \"{schema}\""))
                    .await
                    .unwrap();
                Self::Postgres(Box::new(conn))
            }
            #[cfg(feature = "mysql")]
            Place::Mysql { url } => Self::Mysql(
                diesel_async::AsyncMysqlConnection::establish(url)
                    .await
                    .unwrap(),
            ),
            _ => panic!("no connection to hold on SQLite"),
        }
    }

    /// Runs `sql` on the held connection.
    pub(crate) async fn run(&mut self, sql: &str) {
        use diesel_async::SimpleAsyncConnection;
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(conn) => conn.batch_execute(sql).await.unwrap(),
            #[cfg(feature = "mysql")]
            Self::Mysql(conn) => conn.batch_execute(sql).await.unwrap(),
        }
    }
}

/// Runs raw SQL statements against a test database (to tamper, say).
pub(crate) async fn raw(place: &Place, sql: &str) -> Result<(), String> {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    match place {
        #[cfg(feature = "postgres")]
        Place::Postgres { schema } => {
            let mut conn = diesel_async::AsyncPgConnection::establish(PG_URL)
                .await
                .map_err(|e| e.to_string())?;
            conn.batch_execute(&format!("SET search_path TO \"{schema}\"; {sql}"))
                .await
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "mysql")]
        Place::Mysql { url } => {
            let mut conn = diesel_async::AsyncMysqlConnection::establish(url)
                .await
                .map_err(|e| e.to_string())?;
            conn.batch_execute(sql).await.map_err(|e| e.to_string())
        }
        Place::Sqlite { path } => {
            use diesel::Connection;
            let mut conn = diesel::SqliteConnection::establish(path).map_err(|e| e.to_string())?;
            diesel::connection::SimpleConnection::batch_execute(&mut conn, sql)
                .map_err(|e| e.to_string())
        }
        #[allow(unreachable_patterns)]
        _ => Err("backend feature disabled".into()),
    }
}

/// A MySQL or MariaDB test database's schema as one sorted line per
/// column, index column and trigger: two databases migrated alike give
/// the same lines.
#[cfg(feature = "mysql")]
pub(crate) async fn mysql_schema(url: &str) -> Vec<String> {
    use diesel::QueryableByName;
    use diesel::sql_types::Text;
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text)]
        line: String,
    }
    mysql_rows::<Line>(
        url,
        "SELECT CONCAT_WS(' ', 'column', table_name, column_name, column_type, \
                 IFNULL(collation_name, '-'), is_nullable, IFNULL(column_default, '-'), \
                 IFNULL(generation_expression, '-')) AS line \
             FROM information_schema.columns WHERE table_schema = DATABASE() \
         UNION ALL \
         SELECT CONCAT_WS(' ', 'index', table_name, index_name, seq_in_index, column_name, \
                 non_unique) \
             FROM information_schema.statistics WHERE table_schema = DATABASE() \
         UNION ALL \
         SELECT CONCAT_WS(' ', 'trigger', trigger_name, event_object_table, action_timing, \
                 event_manipulation, action_statement) \
             FROM information_schema.triggers WHERE trigger_schema = DATABASE() \
         ORDER BY line",
    )
    .await
    .into_iter()
    .map(|l| l.line)
    .collect()
}

/// `sql`'s rows on a MySQL or MariaDB test database.
#[cfg(feature = "mysql")]
async fn mysql_rows<L>(url: &str, sql: &str) -> Vec<L>
where
    L: diesel::QueryableByName<diesel::mysql::Mysql> + Send + 'static,
{
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let mut conn = diesel_async::AsyncMysqlConnection::establish(url)
        .await
        .unwrap();
    diesel::sql_query(sql).load::<L>(&mut conn).await.unwrap()
}

/// The planner's account of `sql` on a test database, one line per step:
/// PostgreSQL's `EXPLAIN` (sequential scans off, so that a table of a few
/// rows is read as a large one would be), MySQL's `EXPLAIN` `Extra`
/// column, SQLite's `EXPLAIN QUERY PLAN` details.
pub(crate) async fn plan(place: &Place, sql: &str) -> Vec<String> {
    use diesel::QueryableByName;
    use diesel::sql_types::{Nullable, Text};
    match place {
        #[cfg(feature = "postgres")]
        Place::Postgres { schema } => {
            use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
            #[derive(QueryableByName)]
            struct Line {
                #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
                line: String,
            }
            let mut conn = diesel_async::AsyncPgConnection::establish(PG_URL)
                .await
                .unwrap();
            conn.batch_execute(&format!(
                "SET search_path TO \"{schema}\"; SET enable_seqscan = off"
            ))
            .await
            .unwrap();
            diesel::sql_query(format!("EXPLAIN {sql}"))
                .load::<Line>(&mut conn)
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.line)
                .collect()
        }
        #[cfg(feature = "mysql")]
        Place::Mysql { url } => {
            #[derive(QueryableByName)]
            struct Line {
                #[diesel(sql_type = Nullable<Text>, column_name = "Extra")]
                extra: Option<String>,
            }
            mysql_rows::<Line>(url, &format!("EXPLAIN {sql}"))
                .await
                .into_iter()
                .map(|l| l.extra.unwrap_or_default())
                .collect()
        }
        Place::Sqlite { path } => {
            use diesel::{Connection, RunQueryDsl};
            #[derive(QueryableByName)]
            struct Line {
                #[diesel(sql_type = Text)]
                detail: String,
            }
            let mut conn = diesel::SqliteConnection::establish(path).unwrap();
            diesel::sql_query(format!("EXPLAIN QUERY PLAN {sql}"))
                .load::<Line>(&mut conn)
                .unwrap()
                .into_iter()
                .map(|l| l.detail)
                .collect()
        }
        #[allow(unreachable_patterns)]
        _ => unreachable!("backend feature disabled"),
    }
}
