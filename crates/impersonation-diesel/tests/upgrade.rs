//! A database written before the audit views by runs (migration 2): the
//! migration lists every event already stored, and every query finds what a
//! scan of the whole trail finds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A build with one backend leaves the other backends' imports unused.
#![cfg_attr(
    not(all(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(unused_imports, dead_code)
)]

mod common;

use common::{Place, TestDb, raw};
use impersonation_core::{
    Actor, AppendGuard, AuditAction, AuditEvent, AuditQuery, Order, Store, UserId,
};
use impersonation_testkit::conformance::{all_events, must_start};
use impersonation_testkit::{World, epoch};

/// Migration 4's `down.sql` (it puts the runs' order back) for `place`'s backend.
fn runs_in_order_down(place: &Place) -> &'static str {
    match place {
        Place::Postgres { .. } => {
            include_str!("../migrations/postgres/00000000000004_runs_in_order/down.sql")
        }
        Place::Mysql { .. } => {
            include_str!("../migrations/mysql/00000000000004_runs_in_order/down.sql")
        }
        Place::Sqlite { .. } => {
            include_str!("../migrations/sqlite/00000000000004_runs_in_order/down.sql")
        }
    }
}

/// What undoes migration 4's effect, the runs' order in an index, on
/// `place`'s backend: its `down.sql`, or on MySQL and MariaDB (where the
/// primary key that gives the order now comes with the table, and the
/// `down.sql` keeps it) dropping that key: hold [`common::keys_lock`].
fn runs_order_undone(place: &Place) -> &'static str {
    match place {
        Place::Mysql { .. } => "ALTER TABLE impersonation_audit_runs DROP PRIMARY KEY;",
        _ => runs_in_order_down(place),
    }
}

/// What migration 2 (and every later one) undoes, and the rows that say
/// they ran, per backend: the later ones first, so that the upgrade below
/// runs them all on a populated database.
fn downgrade(place: &Place) -> String {
    let forget = |version: &str| {
        format!("\nDELETE FROM __diesel_schema_migrations WHERE version = '{version}';\n")
    };
    let steps: &[(&str, &str)] = match place {
        Place::Postgres { .. } => &[
            (runs_in_order_down(place), "00000000000004"),
            (
                include_str!("../migrations/postgres/00000000000002_audit_runs/down.sql"),
                "00000000000002",
            ),
        ],
        Place::Mysql { .. } => &[
            (runs_in_order_down(place), "00000000000004"),
            // Migration 3 (ids as binary strings).
            (
                include_str!("../migrations/mysql/00000000000003_ids_no_pad/down.sql"),
                "00000000000003",
            ),
            (
                include_str!("../migrations/mysql/00000000000002_audit_runs/down.sql"),
                "00000000000002",
            ),
        ],
        Place::Sqlite { .. } => &[
            (runs_in_order_down(place), "00000000000004"),
            (
                include_str!("../migrations/sqlite/00000000000002_audit_runs/down.sql"),
                "00000000000002",
            ),
        ],
    };
    steps
        .iter()
        .map(|(down, version)| format!("{down}{}", forget(version)))
        .collect()
}

async fn upgrade_lists_every_stored_event(db: TestDb) {
    upgrade_over(db, "").await;
}

/// [`upgrade_lists_every_stored_event`], with `left` run after the
/// downgrade: what a migration 2 that stopped part way left behind.
async fn upgrade_over(db: TestDb, left: &str) {
    let store = &db.store;
    let w = World::new();
    // Three agents, three customers in two tenants, a few batches each.
    for (a, c, tenant) in [(1, 1, "t1"), (2, 2, "t1"), (3, 3, "t2")] {
        let agent = w.agent(a);
        let (start, _) = w.begin(&agent, &w.customer(c, tenant), epoch());
        let (session, _) = must_start(store, start).await;
        for round in 0..3_i64 {
            let batch = (0..4_i64)
                .map(|i| {
                    (
                        session.draft(
                            epoch() + time::Duration::milliseconds(700 * round + i),
                            AuditAction::Access,
                            Actor::user(agent.id.clone(), "Agent"),
                        ),
                        AppendGuard::SessionActive(session.id),
                    )
                })
                .collect();
            for result in store.append_batch(batch).await {
                result.unwrap();
            }
        }
    }
    let everything = all_events(store, AuditQuery::default()).await;
    assert_eq!(everything.len(), 3 * (1 + 12));

    // Back to before migration 2 (its first statement drops the views),
    // then up again: the views now come from the stored events alone.
    raw(&db.place, &downgrade(&db.place)).await.unwrap();
    if !left.is_empty() {
        raw(&db.place, left).await.unwrap();
    }
    store.migrate().await.unwrap();
    // The same tables, indexes and triggers as a database migrated anew.
    #[cfg(feature = "mysql")]
    if let Place::Mysql { url } = &db.place {
        let Place::Mysql { url: anew } = common::mysql_db(1).await.place else {
            unreachable!()
        };
        assert_eq!(
            common::mysql_schema(url).await,
            common::mysql_schema(&anew).await
        );
    }

    let first = &everything[0];
    let queries = [
        AuditQuery::default(),
        AuditQuery {
            agent: Some(w.agent(1).id),
            ..AuditQuery::default()
        },
        AuditQuery {
            subject: first.subject.as_ref().map(|s| s.id.clone()),
            ..AuditQuery::default()
        },
        AuditQuery {
            tenant: first.tenant.clone(),
            ..AuditQuery::default()
        },
        AuditQuery {
            session: first.session,
            ..AuditQuery::default()
        },
        AuditQuery {
            actor: Some(UserId::new(w.agent(2).id.as_str()).unwrap()),
            ..AuditQuery::default()
        },
    ];
    for query in queries {
        for order in [Order::Oldest, Order::Newest] {
            let query = AuditQuery {
                order,
                limit: 5,
                ..query.clone()
            };
            let mut expected: Vec<&AuditEvent> =
                everything.iter().filter(|e| query.matches(e)).collect();
            expected.sort_by_key(|e| (e.at, e.id));
            if order == Order::Newest {
                expected.reverse();
            }
            let found = all_events(store, query.clone()).await;
            assert!(!found.is_empty(), "{query:?}");
            assert_eq!(
                found.iter().map(|e| e.id).collect::<Vec<_>>(),
                expected.iter().map(|e| e.id).collect::<Vec<_>>(),
                "{query:?}"
            );
        }
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_postgres_lists_every_stored_event() {
    upgrade_lists_every_stored_event(common::postgres_db(4).await).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_mariadb_lists_every_stored_event() {
    upgrade_lists_every_stored_event(common::mysql_db(4).await).await;
}

/// MySQL and MariaDB commit each `CREATE`, `ALTER` and `DROP` at once, so
/// a migration 2 that stopped part way (a lock wait timed out, a
/// connection was lost) leaves what it did, with no record that it ran.
/// The next `migrate` runs it again over that, and every view lists each
/// stored event once: after a stop among its inserts, and after a stop
/// once all of it had run but its version was not yet recorded; and so
/// does migration 3 after a stop among its `ALTER`s. Each ends with the
/// schema a database migrated anew has.
#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_migration_that_stopped_part_way_runs_again_on_mariadb() {
    let second = include_str!("../migrations/mysql/00000000000002_audit_runs/up.sql");
    let inserts: Vec<usize> = second
        .match_indices("INSERT INTO impersonation_audit_runs")
        .map(|(at, _)| at)
        .collect();
    assert_eq!(inserts.len(), 6);
    // Up to its fourth insert: the table and three views' runs.
    upgrade_over(common::mysql_db(4).await, &second[..inserts[3]]).await;
    upgrade_over(common::mysql_db(4).await, second).await;
    // Migration 2 on record, and migration 3 stopped after its sessions'
    // and chains' columns, before the events'.
    let third = include_str!("../migrations/mysql/00000000000003_ids_no_pad/up.sql");
    let events = third
        .find("ALTER TABLE impersonation_audit_events")
        .unwrap();
    upgrade_over(
        common::mysql_db(4).await,
        &format!(
            "{second}\nINSERT INTO __diesel_schema_migrations (version) \
             VALUES ('00000000000002');\n{}",
            &third[..events]
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_sqlite_lists_every_stored_event() {
    upgrade_lists_every_stored_event(common::sqlite_file_db(4).await).await;
}

/// Replicas that start at once migrate one database: each takes the
/// migration lock in turn, the first runs the migrations and the others
/// find nothing left to do. (diesel's harness takes no lock of its own:
/// without one, a second replica failed on a table the first had just
/// made, or on the version row it had just written.)
async fn replicas_start_at_once(config: impl Fn() -> impersonation_diesel::DieselConfig) {
    let mut starting = tokio::task::JoinSet::new();
    for _ in 0..4 {
        starting.spawn(impersonation_diesel::DieselStore::connect_and_migrate(
            config().max_connections(1),
        ));
    }
    while let Some(started) = starting.join_next().await {
        let store = started.unwrap().expect("every replica starts");
        let w = World::new();
        must_start(
            &store,
            w.begin(&w.agent(1), &w.customer(1, "t1"), epoch()).0,
        )
        .await;
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_on_postgres_all_migrate() {
    let schema = common::unique("imptest");
    replicas_start_at_once(|| {
        impersonation_diesel::DieselConfig::new(common::PG_URL).schema(schema.clone())
    })
    .await;
}

/// A least-privilege role, given its schema by a DBA and no right to
/// create schemas in the database, migrates that schema and starts
/// sessions in it. (PostgreSQL checks that right before it looks whether
/// the schema exists, so `CREATE SCHEMA IF NOT EXISTS` failed every
/// start-up.) A role with no right to create anything at all starts on
/// the migrated schema with the same call.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_not_create_schemas_migrates_its_own_on_postgres() {
    let name = common::unique("imptest");
    let superuser = Place::Postgres {
        schema: "public".into(),
    };
    // A role no one logs in as: the store connects as `postgres` acting
    // as it (`-c role=…`), whose rights every statement is then checked
    // against, so no password or auth rule is needed.
    raw(
        &superuser,
        &format!(
            "CREATE ROLE \"{name}\" NOLOGIN; \
             CREATE SCHEMA \"{name}\" AUTHORIZATION \"{name}\""
        ),
    )
    .await
    .unwrap();
    let url = format!("{}?options=-c%20role%3D{name}", common::PG_URL);
    let schema = name.clone();
    // In a task, so that the role and its schema go however it ends.
    let outcome = tokio::spawn(async move {
        let store = impersonation_diesel::DieselStore::connect_and_migrate(
            impersonation_diesel::DieselConfig::new(url)
                .schema(schema)
                .max_connections(1),
        )
        .await
        .expect("the role migrates its own schema");
        let w = World::new();
        let (session, _) = must_start(
            &store,
            w.begin(&w.agent(1), &w.customer(1, "t1"), epoch()).0,
        )
        .await;
        session.id
    })
    .await;
    // The app's own role, with exactly the rights docs/diesel.md gives
    // it, starts with the same call: the migrations are done, and nothing
    // is created.
    let app = format!("{name}_app");
    raw(
        &superuser,
        &format!(
            "CREATE ROLE \"{app}\" NOLOGIN; \
             GRANT USAGE ON SCHEMA \"{name}\" TO \"{app}\"; \
             SET search_path TO \"{name}\"; \
             GRANT SELECT, INSERT ON impersonation_audit_events, impersonation_audit_runs TO \"{app}\"; \
             GRANT SELECT, INSERT, UPDATE ON impersonation_sessions, impersonation_audit_chains TO \"{app}\"; \
             GRANT SELECT ON __diesel_schema_migrations TO \"{app}\""
        ),
    )
    .await
    .unwrap();
    let url = format!("{}?options=-c%20role%3D{app}", common::PG_URL);
    let schema = name.clone();
    let as_app = tokio::spawn(async move {
        let store = impersonation_diesel::DieselStore::connect_and_migrate(
            impersonation_diesel::DieselConfig::new(url)
                .schema(schema)
                .max_connections(1),
        )
        .await
        .expect("the app's role starts on migrated tables");
        let w = World::new();
        must_start(
            &store,
            w.begin(&w.agent(2), &w.customer(2, "t1"), epoch()).0,
        )
        .await;
    })
    .await;
    raw(
        &superuser,
        &format!("DROP SCHEMA \"{name}\" CASCADE; DROP ROLE \"{app}\"; DROP ROLE \"{name}\""),
    )
    .await
    .unwrap();
    if let Err(e) = as_app {
        std::panic::resume_unwind(e.into_panic());
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_on_mariadb_all_migrate() {
    let url = common::mysql_database().await;
    replicas_start_at_once(|| impersonation_diesel::DieselConfig::new(url.clone())).await;
}

/// SQLite has no lock to take beside the database: the migrations run in
/// one exclusive transaction, so a second process waits (up to its busy
/// timeout) and then finds them done. Several fresh files, each migrated by
/// four stores at once (each a process's own pool, as SQLite's locks do not
/// tell connections of one process from those of two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_on_sqlite_all_migrate() {
    for _ in 0..4 {
        let path = impersonation_testkit::scratch::scratch_file("imptest", "db");
        let url = format!("sqlite://{}", path.display());
        replicas_start_at_once(|| impersonation_diesel::DieselConfig::new(url.clone())).await;
    }
}

/// A migration held up by a lock (here a transaction holding the table
/// that migration 4 indexes) waits at most the migration wait, then
/// fails, and runs once the lock is gone. (PostgreSQL's `lock_timeout`
/// had been reset to wait forever once the migration lock was taken;
/// MySQL's metadata locks waited a year.)
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn a_migration_held_up_by_a_lock_gives_up(
    db: TestDb,
    config: impersonation_diesel::DieselConfig,
    hold: &str,
    release: &str,
) {
    let forget = runs_order_undone(&db.place);
    raw(
        &db.place,
        &format!(
            "{forget}\nDELETE FROM __diesel_schema_migrations WHERE version = '00000000000004';"
        ),
    )
    .await
    .unwrap();
    let mut holder = common::Held::open(&db.place).await;
    holder.run(hold).await;
    let wait = std::time::Duration::from_secs(2);
    let migrating =
        impersonation_diesel::DieselStore::connect_and_migrate(config.clone().migration_wait(wait));
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(30), migrating)
        .await
        .expect("the migration gave up within its wait");
    assert!(
        matches!(
            outcome,
            Err(impersonation_diesel::DieselError::Migration(_))
        ),
        "{outcome:?}"
    );
    holder.run(release).await;
    let store = impersonation_diesel::DieselStore::connect_and_migrate(config)
        .await
        .unwrap();
    let w = World::new();
    must_start(
        &store,
        w.begin(&w.agent(1), &w.customer(1, "t1"), epoch()).0,
    )
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_held_up_by_a_lock_gives_up_on_postgres() {
    let db = common::postgres_db(2).await;
    let Place::Postgres { schema } = &db.place else {
        unreachable!("a PostgreSQL test database")
    };
    let config = impersonation_diesel::DieselConfig::new(common::PG_URL).schema(schema.clone());
    a_migration_held_up_by_a_lock_gives_up(
        db,
        config,
        "BEGIN; LOCK TABLE impersonation_audit_runs IN ACCESS EXCLUSIVE MODE",
        "COMMIT",
    )
    .await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_held_up_by_a_lock_gives_up_on_mariadb() {
    let keys = common::keys_lock().await;
    let db = common::mysql_db(2).await;
    let Place::Mysql { url } = &db.place else {
        unreachable!("a MariaDB test database")
    };
    let config = impersonation_diesel::DieselConfig::new(url.clone());
    a_migration_held_up_by_a_lock_gives_up(
        db,
        config,
        "START TRANSACTION; SELECT 1 FROM impersonation_audit_runs LIMIT 1",
        "COMMIT",
    )
    .await;
    keys.release().await;
}

/// MySQL and MariaDB commit each `CREATE` at once, so a first migration
/// that failed part way (a trigger refused for want of a privilege under
/// binary logging, a connection lost) leaves what it made, with no record
/// that it ran. Here all of it is left, its version unrecorded: the next
/// `migrate` runs it again over that, and the store works.
#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_migration_that_stopped_part_way_runs_again_on_mariadb() {
    let url = common::mysql_database().await;
    let first = include_str!("../migrations/mysql/00000000000001_create/up.sql");
    raw(&Place::Mysql { url: url.clone() }, first)
        .await
        .unwrap();
    let store = impersonation_diesel::DieselStore::connect_and_migrate(
        impersonation_diesel::DieselConfig::new(url),
    )
    .await
    .unwrap();
    let w = World::new();
    let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    must_start(&store, start).await;
}

/// Servers that refuse a table without a primary key (MySQL's
/// `sql_require_primary_key`, on by default on some managed services;
/// MariaDB's `innodb_force_primary_key`) run every migration, and the
/// store works: on a new database, and on one an earlier migration 2 left
/// with a runs table without its key (migration 3 adds it there). The
/// setting is server-wide on MariaDB: on only while the keys lock is held.
#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_migration_runs_where_each_table_needs_a_primary_key_on_mariadb() {
    let fresh = common::mysql_database().await;
    let earlier = common::mysql_database().await;
    let place = Place::Mysql {
        url: earlier.clone(),
    };
    // Taken first: it turns the setting off, should a run have died with
    // it on, and the earlier migration 2 makes a table without a key.
    let mut keys = common::keys_lock().await;
    // What the earlier version of migrations 1 and 2 left, on record as run.
    let first = include_str!("../migrations/mysql/00000000000001_create/up.sql");
    let unkeyed = include_str!("fixtures/mysql_audit_runs_unkeyed.sql");
    raw(
        &place,
        &format!(
            "{first}\n{unkeyed}\n\
             CREATE TABLE __diesel_schema_migrations (\
                 version VARCHAR(50) PRIMARY KEY NOT NULL, \
                 run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);\n\
             INSERT INTO __diesel_schema_migrations (version) \
                 VALUES ('00000000000001'), ('00000000000002');"
        ),
    )
    .await
    .unwrap();
    keys.run("SET GLOBAL innodb_force_primary_key = ON").await;
    let mut migrated = Vec::new();
    for url in [&fresh, &earlier] {
        migrated.push(
            impersonation_diesel::DieselStore::connect_and_migrate(
                impersonation_diesel::DieselConfig::new(url.clone()),
            )
            .await,
        );
    }
    // Off again before anything here can fail.
    keys.release().await;
    for store in migrated {
        let store = store.unwrap();
        let w = World::new();
        let (session, _) = must_start(
            &store,
            w.begin(&w.agent(1), &w.customer(1, "t1"), epoch()).0,
        )
        .await;
        let draft = session.draft(
            epoch(),
            AuditAction::Access,
            Actor::user(session.agent.id.clone(), "Agent"),
        );
        store
            .append(draft, AppendGuard::SessionActive(session.id))
            .await
            .unwrap();
        assert_eq!(all_events(&store, AuditQuery::default()).await.len(), 2);
    }
    // A second primary key is refused: the earlier database's runs table
    // has its key now.
    let again = raw(
        &place,
        "ALTER TABLE impersonation_audit_runs \
         ADD PRIMARY KEY (view_name, view_key, chain, first_seq)",
    )
    .await;
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.contains("Multiple primary key")),
        "{again:?}"
    );
}

/// Audit pages read a view's runs in `(first_us, chain, first_seq)` order,
/// a batch at a time under a `LIMIT`. Since migration 4 an index holds
/// that whole order, so no backend sorts every run in range first (in the
/// planners' words: a `Sort` step, `Using filesort`, a temporary B-tree).
/// Undoing the migration brings the sort back, which shows the check sees it.
async fn runs_are_read_in_the_order_of_an_index(db: TestDb) {
    let w = World::new();
    for c in 1..=3 {
        let agent = w.agent(c);
        let (session, _) =
            must_start(&db.store, w.begin(&agent, &w.customer(c, "t1"), epoch()).0).await;
        for i in 0..5_i64 {
            let draft = session.draft(
                epoch() + time::Duration::seconds(10 * i),
                AuditAction::Access,
                Actor::user(agent.id.clone(), "Agent"),
            );
            db.store
                .append(draft, AppendGuard::SessionActive(session.id))
                .await
                .unwrap();
        }
    }
    let sorts = |plan: &[String]| {
        plan.iter()
            .any(|l| l.contains("Sort") || l.contains("filesort") || l.contains("TEMP B-TREE"))
    };
    let pages = ["ASC", "DESC"].map(|dir| {
        format!(
            "SELECT chain, first_seq, last_seq, first_us FROM impersonation_audit_runs \
             WHERE view_name = 'all' AND view_key = '' AND first_us >= 0 \
             ORDER BY first_us {dir}, chain {dir}, first_seq {dir} LIMIT 50"
        )
    });
    for page in &pages {
        let plan = common::plan(&db.place, page).await;
        assert!(!sorts(&plan), "{page}: {plan:#?}");
    }
    let down = runs_order_undone(&db.place);
    raw(&db.place, down).await.unwrap();
    let plan = common::plan(&db.place, &pages[0]).await;
    assert!(sorts(&plan), "before migration 4: {plan:#?}");
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_read_in_index_order_on_postgres() {
    runs_are_read_in_the_order_of_an_index(common::postgres_db(2).await).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_read_in_index_order_on_mariadb() {
    let keys = common::keys_lock().await;
    runs_are_read_in_the_order_of_an_index(common::mysql_db(2).await).await;
    keys.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_read_in_index_order_on_sqlite() {
    runs_are_read_in_the_order_of_an_index(common::sqlite_file_db(2).await).await;
}
