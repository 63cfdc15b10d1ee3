//! Crashes, races and tampering against real databases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A build with one backend (`--no-default-features --features sqlite`,
// say) leaves the other backends' helpers and imports unused.
#![cfg_attr(
    not(all(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(unused_imports)
)]

mod common;

use common::{Place, TestDb, raw};
use impersonation_core::{
    Activity, Actor, AuditAction, AuditQuery, BreakKind, ChainKey, Denial, Details, EndReason,
    Error, Impersonation, ListingMismatch, MemoryDirectory, Principal, Requester, SessionState,
    StartRequest, Store, StoreError,
};
use impersonation_diesel::DieselStore;
use impersonation_testkit::conformance::{all_events, must_start, whole_chain};
use impersonation_testkit::{World, epoch};

fn service(
    world: &World,
    store: DieselStore,
    people: &[Principal],
) -> Impersonation<DieselStore, MemoryDirectory> {
    let directory = MemoryDirectory::new();
    for p in people {
        directory.insert(p.clone());
    }
    Impersonation::new(store, directory).with_projection(world.rules.clone())
}

// --- races --------------------------------------------------------------------

/// 64 concurrent starts by one agent through separate pool connections:
/// exactly one live session, 63 typed refusals, every attempt audited, and
/// a chain that verifies.
/// Connections of each racing test's pool. The 64 tasks still race
/// (they queue for a connection); the bound keeps the tests that run at
/// once (one per core) under PostgreSQL's default 100 connections on a
/// machine with more cores than this one's two.
#[cfg(any(feature = "postgres", feature = "mysql"))]
const RACING_POOL: usize = 20;

async fn racing_starts(db: TestDb) {
    let w = World::new();
    let agent = w.agent(1);
    let customers: Vec<Principal> = (0..64).map(|n| w.customer(n, "t1")).collect();
    let mut people = customers.clone();
    people.push(agent.clone());
    let svc = service(&w, db.store.clone(), &people);
    let mut tasks = tokio::task::JoinSet::new();
    for c in &customers {
        let (svc, agent, target) = (svc.clone(), agent.clone(), c.id.clone());
        tasks.spawn(async move {
            svc.start(
                Requester::User(&agent),
                StartRequest::new(target, "Racing to help the customer"),
            )
            .await
        });
    }
    let (mut started, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(_) => started += 1,
            Err(Error::Denied(Denial::ActiveSessionExists)) => refused += 1,
            Err(other) => panic!("a racing start failed with {other:?}"),
        }
    }
    assert_eq!((started, refused), (1, 63));
    let live = db
        .store
        .live_sessions(&impersonation_core::LiveFilter {
            agent: Some(agent.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    let chain = ChainKey::for_agent(&agent.id);
    let events = whole_chain(&db.store, &chain).await;
    assert_eq!(events.len(), 64, "every attempt audited");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == AuditAction::Denied)
            .count(),
        63
    );
    let report = svc.verify_chain(&chain).await.unwrap().unwrap();
    assert_eq!(report.events, 64);
}

/// 1,000 concurrent records from 20 agents in 10 tenants: every chain verifies.
async fn concurrent_records(db: TestDb) {
    let w = World::new();
    let agents: Vec<Principal> = (0..20).map(|n| w.agent(n)).collect();
    let customers: Vec<Principal> = (0..10)
        .map(|n| w.customer(n, &format!("tenant{n}")))
        .collect();
    let people: Vec<Principal> = agents.iter().chain(customers.iter()).cloned().collect();
    let svc = service(&w, db.store.clone(), &people);
    let mut contexts = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let target = customers[i % 10].id.clone();
        let started = svc
            .start(
                Requester::User(agent),
                StartRequest::new(target, "Checking the bookings"),
            )
            .await
            .unwrap();
        contexts.push(svc.resolve(&started.secret).await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1_000 {
        let (svc, ctx) = (svc.clone(), contexts[i % 20].clone());
        tasks.spawn(async move {
            svc.record(&ctx, Activity::access(format!("Viewed page {i}.")))
                .await
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    for agent in &agents {
        let report = svc
            .verify_chain(&ChainKey::for_agent(&agent.id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report.events, 51, "start + 50 records");
    }
    for n in 0..10 {
        let in_tenant = all_events(
            &db.store,
            AuditQuery {
                tenant: Some(w.tenant(&format!("tenant{n}"))),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            in_tenant.len(),
            102,
            "two agents per tenant, 51 events each"
        );
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_starts_on_postgres() {
    racing_starts(common::postgres_db(RACING_POOL).await).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_starts_on_mariadb() {
    racing_starts(common::mysql_db(RACING_POOL).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_starts_on_sqlite() {
    racing_starts(common::sqlite_file_db(8).await).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_records_on_postgres() {
    concurrent_records(common::postgres_db(RACING_POOL).await).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_records_on_mariadb() {
    concurrent_records(common::mysql_db(RACING_POOL).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_records_on_sqlite() {
    concurrent_records(common::sqlite_file_db(8).await).await;
}

// --- a writer that holds a lock and never lets go ----------------------------

/// Another connection locks every chain row and sits in its transaction
/// (a host that died mid-write holds its locks until TCP notices, hours
/// later). A write on a locked chain fails as unavailable once the store's
/// `busy_timeout` has passed, rather than waiting with a pooled connection
/// for as long as the lock lives; once the holder lets go, it goes through.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn a_held_lock_fails_a_write_instead_of_stalling_it<H>(
    store: DieselStore,
    hold: impl AsyncFnOnce(String) -> H,
    release: impl AsyncFnOnce(H),
) {
    let w = World::new();
    let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let ended = || {
        session
            .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
            .unwrap()
    };
    let holder = hold("SELECT * FROM impersonation_audit_chains FOR UPDATE".into()).await;
    let waited = tokio::time::timeout(
        // A guard against the stall itself, not a timing assertion.
        std::time::Duration::from_secs(120),
        store.transition(ended()),
    )
    .await
    .expect("the write waited on the lock for two minutes");
    assert!(
        matches!(waited, Err(StoreError::Unavailable(_))),
        "{waited:?}"
    );
    release(holder).await;
    let (after, _) = store.transition(ended()).await.unwrap();
    assert_eq!(after.state, SessionState::Ended(EndReason::Stopped));
}

/// A PostgreSQL store on a schema of its own whose waits for a lock give
/// up after 1 s; and the schema.
#[cfg(feature = "postgres")]
async fn postgres_waiting_1s() -> (DieselStore, String) {
    postgres_waiting_1s_at(common::PG_URL.to_owned()).await
}

/// As [`postgres_waiting_1s`], over `url`.
#[cfg(feature = "postgres")]
async fn postgres_waiting_1s_at(url: String) -> (DieselStore, String) {
    let schema = common::unique("imptest");
    let store = DieselStore::connect_and_migrate(
        impersonation_diesel::DieselConfig::new(url)
            .schema(schema.clone())
            .busy_timeout(std::time::Duration::from_secs(1)),
    )
    .await
    .unwrap();
    (store, schema)
}

/// Another connection to `schema`, in a transaction that has run `lock`
/// and goes on holding what it locked.
#[cfg(feature = "postgres")]
async fn postgres_holding(schema: &str, lock: &str) -> diesel_async::AsyncPgConnection {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let mut conn = diesel_async::AsyncPgConnection::establish(common::PG_URL)
        .await
        .unwrap();
    conn.batch_execute(&format!("SET search_path TO \"{schema}\"; BEGIN; {lock}"))
        .await
        .unwrap();
    conn
}

/// Lets go of what a holder's transaction locked.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn rolled_back<C: diesel_async::SimpleAsyncConnection>(mut holder: C) {
    holder.batch_execute("ROLLBACK").await.unwrap();
}

/// A MariaDB store on a database of its own whose waits for a lock give
/// up after 1 s; and the database's URL.
#[cfg(feature = "mysql")]
async fn mariadb_waiting_1s() -> (DieselStore, String) {
    let url = common::mysql_database().await;
    let store = DieselStore::connect_and_migrate(
        impersonation_diesel::DieselConfig::new(url.clone())
            .busy_timeout(std::time::Duration::from_secs(1)),
    )
    .await
    .unwrap();
    (store, url)
}

/// Another connection to `url`, in a transaction that has run `lock` and
/// goes on holding what it locked.
#[cfg(feature = "mysql")]
async fn mariadb_holding(url: &str, lock: &str) -> diesel_async::AsyncMysqlConnection {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let mut conn = diesel_async::AsyncMysqlConnection::establish(url)
        .await
        .unwrap();
    conn.batch_execute("START TRANSACTION").await.unwrap();
    conn.batch_execute(lock).await.unwrap();
    conn
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_fails_a_write_instead_of_stalling_it_on_postgres() {
    let (store, schema) = postgres_waiting_1s().await;
    a_held_lock_fails_a_write_instead_of_stalling_it(
        store,
        async move |lock| postgres_holding(&schema, &lock).await,
        rolled_back,
    )
    .await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_fails_a_write_instead_of_stalling_it_on_mariadb() {
    let (store, url) = mariadb_waiting_1s().await;
    a_held_lock_fails_a_write_instead_of_stalling_it(
        store,
        async move |lock| mariadb_holding(&url, &lock).await,
        rolled_back,
    )
    .await;
}

/// Another connection holds one agent's chain head row (a writer that
/// died holding it). A batch of appends on that chain and others fails
/// that chain's events only, once the lock wait gives up: the others are
/// appended, not failed with it (on MariaDB, not after six retries of
/// the whole batch either), and the held chain takes appends again once
/// the row is let go. Two held chains fail the whole batch, after two
/// lock waits rather than one per held chain.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn a_held_chain_fails_only_its_own_appends<H>(
    store: &DieselStore,
    hold: impl AsyncFn(String) -> H,
    release: impl AsyncFn(H),
) {
    use impersonation_core::AppendGuard;
    use impersonation_testkit::conformance::assert_chain_verifies;
    let w = World::new();
    let mut sessions = Vec::new();
    for n in 1..=3 {
        let (start, _) = w.begin(&w.agent(n), &w.customer(n, "t1"), epoch());
        sessions.push(must_start(store, start).await.0);
    }
    let chains: Vec<String> = sessions
        .iter()
        .map(|s| format!("'{}'", s.chain()))
        .collect();
    let draft = |s: &impersonation_core::Session| {
        (
            s.draft(epoch(), AuditAction::Access, Actor::System),
            AppendGuard::None,
        )
    };
    let order = [0, 1, 2, 1, 0];
    let batch = || {
        order
            .iter()
            .map(|&i| draft(&sessions[i]))
            .collect::<Vec<_>>()
    };
    let appended = async |batch| {
        tokio::time::timeout(
            // A guard against a stall, not a timing assertion.
            std::time::Duration::from_secs(120),
            store.append_batch(batch),
        )
        .await
        .expect("the batch waited on the lock for two minutes")
    };
    let lock = |chains: &str| {
        format!("SELECT * FROM impersonation_audit_chains WHERE chain IN ({chains}) FOR UPDATE")
    };
    let holder = hold(lock(&chains[1])).await;
    for (i, result) in order.into_iter().zip(&appended(batch()).await) {
        match (i, result) {
            (1, Err(StoreError::Unavailable(_))) => {}
            (0 | 2, Ok(event)) => assert_eq!(event.chain, sessions[i].chain()),
            other => panic!("{other:?}"),
        }
    }
    release(holder).await;
    let holder = hold(lock(&format!("{}, {}", chains[1], chains[2]))).await;
    for result in appended(batch()).await {
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
    }
    release(holder).await;
    for result in store.append_batch(vec![draft(&sessions[1])]).await {
        result.unwrap();
    }
    for (s, events) in sessions.iter().zip([3, 2, 2]) {
        assert_eq!(assert_chain_verifies(store, &s.chain()).await, events);
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_chain_fails_only_its_own_appends_on_postgres() {
    let (store, schema) = postgres_waiting_1s().await;
    a_held_chain_fails_only_its_own_appends(
        &store,
        async |lock| postgres_holding(&schema, &lock).await,
        rolled_back,
    )
    .await;
}

/// PostgreSQL appends a one-chain batch whose head the process knows in
/// one statement (compare-and-set). Should that statement wait out the
/// lock timeout on a held head row, the batch fails then: the
/// transaction path would only wait on the same row a second time. Once
/// the row is free, the next append finds the head again.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_head_fails_a_one_chain_batch_after_one_wait_on_postgres() {
    use impersonation_core::AppendGuard;
    use impersonation_testkit::conformance::assert_chain_verifies;
    let schema = common::unique("imptest");
    let counter = impersonation_diesel::QueryCounter::new();
    let store = DieselStore::connect_and_migrate(
        impersonation_diesel::DieselConfig::new(common::PG_URL)
            .schema(schema.clone())
            .busy_timeout(std::time::Duration::from_secs(1))
            .query_counter(counter.clone()),
    )
    .await
    .unwrap();
    let w = World::new();
    let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    // Started here: the process knows its chain's head.
    let (session, _) = must_start(&store, start).await;
    let draft = || {
        vec![(
            session.draft(epoch(), AuditAction::Access, Actor::System),
            AppendGuard::None,
        )]
    };
    let holder = postgres_holding(
        &schema,
        &format!(
            "SELECT * FROM impersonation_audit_chains WHERE chain = '{}' FOR UPDATE",
            session.chain()
        ),
    )
    .await;
    let before = counter.queries();
    let results = tokio::time::timeout(
        // A guard against a stall, not a timing assertion.
        std::time::Duration::from_secs(120),
        store.append_batch(draft()),
    )
    .await
    .expect("the batch waited on the lock for two minutes");
    assert!(
        matches!(results.as_slice(), [Err(StoreError::Unavailable(_))]),
        "{results:?}"
    );
    assert_eq!(
        counter.queries() - before,
        1,
        "the compare-and-set alone, no transaction after it: {:?}",
        counter.recent()
    );
    rolled_back(holder).await;
    for result in store.append_batch(draft()).await {
        result.unwrap();
    }
    assert_eq!(assert_chain_verifies(&store, &session.chain()).await, 2);
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_chain_fails_only_its_own_appends_on_mariadb() {
    let (store, url) = mariadb_waiting_1s().await;
    a_held_chain_fails_only_its_own_appends(
        &store,
        async |lock| mariadb_holding(&url, &lock).await,
        rolled_back,
    )
    .await;
}

/// Another connection holds the row of one agent's session (a host that
/// died mid-transition). A lookup is a read: the batch that holds that
/// session's lookup and another's answers both, the held row untouched,
/// rather than waiting on the lock and failing every lookup in it. The
/// touch that waited out the lock timeout is left out for a while (30 s
/// here), so the next batches do not wait on the row again: their
/// lookups touch neither session, held or not, even once the row is
/// free, until the window has passed. A third session, looked up beside
/// them meanwhile, is touched (on PostgreSQL in a statement of its own).
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn a_held_session_row_fails_no_lookup<H>(
    store: &DieselStore,
    hold: impl AsyncFnOnce(String) -> H,
    release: impl AsyncFnOnce(H),
) {
    let w = World::new();
    // An idle timeout of an hour: a window of 30 s.
    let policy = w.policy.clone().idle_timeout(time::Duration::hours(1));
    let (first, first_secret) = w.begin_with(&policy, &w.agent(1), &w.customer(1, "t1"), epoch());
    let (first, _) = must_start(store, first).await;
    let (second, second_secret) = w.begin_with(&policy, &w.agent(2), &w.customer(2, "t1"), epoch());
    let (second, _) = must_start(store, second).await;
    let (third, third_secret) = w.begin_with(&policy, &w.agent(3), &w.customer(3, "t1"), epoch());
    let (third, _) = must_start(store, third).await;
    let both = [
        (first_secret.lookup(), first.id),
        (second_secret.lookup(), second.id),
    ];
    let look_up = async |seconds: i64, asked: &[(impersonation_core::SecretLookup, _)]| {
        let touch = impersonation_core::Touch {
            now: epoch() + time::Duration::seconds(seconds),
            coalesce: time::Duration::ZERO,
        };
        let lookups: Vec<_> = asked.iter().map(|(l, _)| l.clone()).collect();
        let found = tokio::time::timeout(
            // A guard against a stall, not a timing assertion.
            std::time::Duration::from_secs(120),
            store.find_by_secrets(&lookups, Some(touch)),
        )
        .await
        .expect("the lookup waited on the lock for two minutes");
        let ids: Vec<_> = found
            .into_iter()
            .map(|r| r.map(|s| s.map(|s| s.id)).map_err(|e| e.to_string()))
            .collect();
        let expected: Vec<_> = asked.iter().map(|(_, id)| Ok(Some(*id))).collect();
        assert_eq!(ids, expected);
    };
    let last_seen = async || {
        let mut seen = Vec::new();
        for id in [first.id, second.id, third.id] {
            let session = store.session(id).await.unwrap().unwrap();
            seen.push((session.last_seen_at - epoch()).whole_seconds());
        }
        seen
    };
    let holder = hold(format!(
        "SELECT * FROM impersonation_sessions WHERE id = '{}' FOR UPDATE",
        first.id
    ))
    .await;
    look_up(5, &both).await;
    assert_eq!(
        last_seen().await,
        [0, 0, 0],
        "the touch waited out the lock"
    );
    let all = [
        both[0].clone(),
        both[1].clone(),
        (third_secret.lookup(), third.id),
    ];
    look_up(6, &all).await;
    assert_eq!(
        last_seen().await,
        [0, 0, 6],
        "both touches are left out, the third's is written"
    );
    release(holder).await;
    look_up(34, &both).await;
    assert_eq!(last_seen().await, [0, 0, 6], "still left out at 34 s");
    look_up(35, &both).await;
    assert_eq!(
        last_seen().await,
        [35, 35, 6],
        "touched once the window passed"
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_row_fails_no_lookup_on_postgres() {
    let (store, schema) = postgres_waiting_1s().await;
    a_held_session_row_fails_no_lookup(
        &store,
        async move |lock| postgres_holding(&schema, &lock).await,
        rolled_back,
    )
    .await;
}

/// `PG_URL` with the server's messages in German for each connection, as
/// a server set up in a German locale words them (`cargo xtask services
/// up` generates the `de_DE.UTF-8` locale), and `more` options.
#[cfg(feature = "postgres")]
fn german_postgres_url(more: &str) -> String {
    format!(
        "{}?options=-c%20lc_messages%3Dde_DE.UTF-8{more}",
        common::PG_URL
    )
}

/// On a server that words its messages in German, the store asks for
/// English ones (its role may), so it still tells a lock timeout: the
/// held row fails no lookup. (Worded in German, the timeout was an
/// unknown error, and each lookup of the session failed.)
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_row_fails_no_lookup_on_a_german_postgres() {
    let (store, schema) = postgres_waiting_1s_at(german_postgres_url("")).await;
    a_held_session_row_fails_no_lookup(
        &store,
        async move |lock| postgres_holding(&schema, &lock).await,
        rolled_back,
    )
    .await;
}

/// A role that may not change its `lc_messages` (no superuser, no grant)
/// on a server that words its messages in German: the store's check of
/// the messages' language is refused quietly, its connections open, and
/// it serves a start and a lookup as ever (it warns once that it cannot
/// tell a lock timeout; `docs/diesel.md` says what to grant).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_not_change_its_messages_is_served_on_postgres() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let (owner, schema) = postgres_waiting_1s().await;
    drop(owner);
    // A role the tests' superuser may become (`SET ROLE`, here through the
    // connection's `role` option), with the store's tables of this schema
    // only. Roles are the cluster's: made once, and raced quietly.
    let mut admin = diesel_async::AsyncPgConnection::establish(common::PG_URL)
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE impersonation_plain NOLOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$; \
             GRANT USAGE ON SCHEMA \"{schema}\" TO impersonation_plain; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA \"{schema}\" TO impersonation_plain; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA \"{schema}\" TO impersonation_plain"
        ))
        .await
        .unwrap();
    let store = DieselStore::connect(
        impersonation_diesel::DieselConfig::new(german_postgres_url(
            "%20-c%20role%3Dimpersonation_plain",
        ))
        .schema(schema.clone()),
    )
    .await
    .unwrap();
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let found = store.find_by_secrets(&[secret.lookup()], None).await;
    assert!(
        matches!(found.as_slice(), [Ok(Some(s))] if s.id == session.id),
        "{found:?}"
    );
    // The store's connections act as the role (the grants above are all
    // it has): it could not have set its messages to English.
    let mut conn = diesel_async::AsyncPgConnection::establish(&german_postgres_url(
        "%20-c%20role%3Dimpersonation_plain",
    ))
    .await
    .unwrap();
    let refused = conn
        .batch_execute("SET lc_messages = 'C'")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("lc_messages"), "{refused}");
    assert!(
        !refused.contains("permission denied"),
        "worded in German: {refused}"
    );
}

/// A lookup whose idle touch is not due (coalesced) is a read: it locks
/// no row (a row lock is a write, flushed at commit), so the session's
/// row has no locker after it.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_whose_touch_is_not_due_locks_nothing_on_postgres() {
    use diesel::QueryableByName;
    use diesel::sql_types::Text;
    use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
    let db = common::postgres_db(2).await;
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&db.store, start).await;
    let touch = impersonation_core::Touch {
        now: epoch() + time::Duration::seconds(5),
        coalesce: time::Duration::hours(1),
    };
    let found = db
        .store
        .find_by_secrets(&[secret.lookup()], Some(touch))
        .await;
    assert!(matches!(found.as_slice(), [Ok(Some(_))]), "{found:?}");
    let Place::Postgres { schema } = &db.place else {
        panic!("a PostgreSQL test database");
    };
    #[derive(QueryableByName)]
    struct Locker {
        #[diesel(sql_type = Text)]
        xmax: String,
    }
    let mut conn = diesel_async::AsyncPgConnection::establish(common::PG_URL)
        .await
        .unwrap();
    conn.batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await
        .unwrap();
    let lockers = diesel::sql_query(format!(
        "SELECT xmax::text AS xmax FROM impersonation_sessions WHERE id = '{}'",
        session.id
    ))
    .load::<Locker>(&mut conn)
    .await
    .unwrap();
    let lockers: Vec<String> = lockers.into_iter().map(|l| l.xmax).collect();
    assert_eq!(lockers, ["0"]);
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_row_fails_no_lookup_on_mariadb() {
    let (store, url) = mariadb_waiting_1s().await;
    a_held_session_row_fails_no_lookup(
        &store,
        async move |lock| mariadb_holding(&url, &lock).await,
        rolled_back,
    )
    .await;
}

/// On a server whose messages are German for the store's user (its
/// `init_connect` sets them so for every user without SUPER, as a server
/// set to `lc_messages = de_DE` would for all), the store asks for English
/// ones, so it still tells a lock wait timeout: the held row fails no
/// lookup.
#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_row_fails_no_lookup_on_a_german_mariadb() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let (owner, url) = mariadb_waiting_1s().await;
    drop(owner);
    let db = url.rsplit('/').next().unwrap().to_owned();
    // The user and `init_connect` are the server's: made once, the same
    // for every run. `init_connect` runs for users without SUPER only, and
    // the tests' other connections are root's, so it touches none of them.
    let mut admin = diesel_async::AsyncMysqlConnection::establish(&url)
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE USER IF NOT EXISTS 'impersonation_de'@'%'; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON `{db}`.* TO 'impersonation_de'@'%'; \
             SET GLOBAL init_connect = 'SET lc_messages = ''de_DE'''"
        ))
        .await
        .unwrap();
    let german = format!("mysql://impersonation_de@127.0.0.1:3306/{db}");
    let mut plain = diesel_async::AsyncMysqlConnection::establish(&german)
        .await
        .unwrap();
    let worded = plain
        .batch_execute("SELECT * FROM no_such_table")
        .await
        .unwrap_err()
        .to_string();
    assert!(worded.contains("existiert nicht"), "in German: {worded}");
    let store = DieselStore::connect(
        impersonation_diesel::DieselConfig::new(german)
            .busy_timeout(std::time::Duration::from_secs(1)),
    )
    .await
    .unwrap();
    a_held_session_row_fails_no_lookup(
        &store,
        async move |lock| mariadb_holding(&url, &lock).await,
        rolled_back,
    )
    .await;
}

// --- tampering ----------------------------------------------------------------

/// Starts a session, records four accesses and stops: a chain of six events.
async fn six_event_chain(store: &DieselStore) -> ChainKey {
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let svc = service(&w, store.clone(), &[agent.clone(), customer.clone()]);
    let started = svc
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Tamper test"),
        )
        .await
        .unwrap();
    let ctx = svc.resolve(&started.secret).await.unwrap();
    for i in 1..=4 {
        svc.record(&ctx, Activity::access(format!("Viewed page {i}.")))
            .await
            .unwrap();
    }
    svc.stop(&started.secret, &agent).await.unwrap();
    ChainKey::for_agent(&agent.id)
}

fn bypass_triggers(place: &Place) -> &'static str {
    match place {
        // A superuser can switch triggers off for its session: exactly the
        // limit of database-level append-only (see docs/diesel.md).
        Place::Postgres { .. } => "SET session_replication_role = replica;",
        Place::Mysql { .. } | Place::Sqlite { .. } => {
            "DROP TRIGGER IF EXISTS impersonation_audit_events_no_update; DROP TRIGGER IF EXISTS impersonation_audit_events_no_delete; \
             DROP TRIGGER IF EXISTS impersonation_audit_runs_no_update; DROP TRIGGER IF EXISTS impersonation_audit_runs_no_delete;"
        }
    }
}

async fn tampering_is_refused_then_detected(db: TestDb) {
    let svc = Impersonation::new(db.store.clone(), MemoryDirectory::new());
    let chain = six_event_chain(&db.store).await;
    let c = chain.as_str();
    let intact = svc.verify_chain(&chain).await.unwrap().unwrap();
    assert_eq!(intact.events, 6);

    // The database itself refuses to change or remove audit rows.
    for sql in [
        format!("UPDATE impersonation_audit_events SET event = event WHERE chain = '{c}'"),
        format!("DELETE FROM impersonation_audit_events WHERE chain = '{c}'"),
    ] {
        let refused = raw(&db.place, &sql)
            .await
            .expect_err("the audit table accepted a change");
        assert!(refused.contains("append-only"), "{refused}");
    }
    assert!(svc.verify_chain(&chain).await.unwrap().is_ok());

    let bypass = bypass_triggers(&db.place);
    // A row written before records (the event's serde JSON, where rows
    // now keep its record) still reads and verifies.
    let events = whole_chain(&db.store, &chain).await;
    let legacy = serde_json::to_string(&events[1]).unwrap();
    assert!(!legacy.starts_with(r#"{"v":"#));
    // As an SQL literal as it is (MySQL would read a backslash as an escape).
    assert!(!legacy.contains('\\'));
    raw(
        &db.place,
        &format!(
            "{bypass} UPDATE impersonation_audit_events SET event = '{}' WHERE chain = '{c}' AND seq = 1",
            legacy.replace('\'', "''")
        ),
    )
    .await
    .unwrap();
    assert_eq!(whole_chain(&db.store, &chain).await, events);
    assert!(svc.verify_chain(&chain).await.unwrap().is_ok());
    // Edit one row.
    raw(
        &db.place,
        &format!("{bypass} UPDATE impersonation_audit_events SET event = REPLACE(event, 'Viewed page 2', 'Viewed page 9') WHERE chain = '{c}' AND seq = 2"),
    )
    .await
    .unwrap();
    let b = svc.verify_chain(&chain).await.unwrap().unwrap_err();
    assert_eq!((b.position, b.kind), (2, BreakKind::HashMismatch));

    // Delete one row (of another, intact chain).
    let chain = six_event_chain(&db.store).await;
    let c = chain.as_str();
    raw(
        &db.place,
        &format!("{bypass} DELETE FROM impersonation_audit_events WHERE chain = '{c}' AND seq = 3"),
    )
    .await
    .unwrap();
    let b = svc.verify_chain(&chain).await.unwrap().unwrap_err();
    assert_eq!(
        (b.position, b.kind),
        (3, BreakKind::OutOfSequence { found: 4 })
    );

    // Reorder two rows.
    let chain = six_event_chain(&db.store).await;
    let c = chain.as_str();
    raw(
        &db.place,
        &format!(
            "{bypass} UPDATE impersonation_audit_events SET seq = -1 WHERE chain = '{c}' AND seq = 1; \
             UPDATE impersonation_audit_events SET seq = 1 WHERE chain = '{c}' AND seq = 4; \
             UPDATE impersonation_audit_events SET seq = 4 WHERE chain = '{c}' AND seq = -1;"
        ),
    )
    .await
    .unwrap();
    let b = svc.verify_chain(&chain).await.unwrap().unwrap_err();
    assert_eq!(
        (b.position, b.kind),
        (1, BreakKind::OutOfSequence { found: 4 })
    );

    // Cut the last row off: the head row still names it.
    let chain = six_event_chain(&db.store).await;
    let c = chain.as_str();
    raw(
        &db.place,
        &format!("{bypass} DELETE FROM impersonation_audit_events WHERE chain = '{c}' AND seq = 5"),
    )
    .await
    .unwrap();
    let b = svc.verify_chain(&chain).await.unwrap().unwrap_err();
    assert_eq!(b.kind, BreakKind::Truncated { head_seq: 5 });
    // And the head row too: events with no head are a chain whose head
    // was taken away, not one that verifies as far as it goes.
    raw(
        &db.place,
        &format!("DELETE FROM impersonation_audit_chains WHERE chain = '{c}'"),
    )
    .await
    .unwrap();
    let b = svc.verify_chain(&chain).await.unwrap().unwrap_err();
    assert_eq!((b.position, b.kind), (4, BreakKind::HeadMismatch));
    // Verifying the whole store still finds that chain by its events.
    let headless = chain;

    // Take an event out of the listing alone (its run in the view of
    // every event): the chain verifies, and `verify_all`, reading the
    // listing beside the chains, says what it hides.
    let hidden = six_event_chain(&db.store).await;
    let c = hidden.as_str();
    raw(
        &db.place,
        &format!("{bypass} DELETE FROM impersonation_audit_runs WHERE view_name = 'all' AND chain = '{c}' AND first_seq <= 2 AND last_seq >= 2"),
    )
    .await
    .unwrap();
    assert!(svc.verify_chain(&hidden).await.unwrap().is_ok());
    let all = svc.verify_all().await.unwrap();
    // (Every other chain here is broken, and its events not compared.)
    assert_eq!(
        all.listing,
        [ListingMismatch::Count {
            chain: hidden,
            chained: 6,
            listed: 5
        }],
        "{all:?}"
    );
    // Take a customer's events out of their listing alone (their runs in
    // the view by customer): the listing of every event still shows them,
    // and `verify_listing` for the customer says what theirs hides.
    let chain = six_event_chain(&db.store).await;
    let c = chain.as_str();
    let customer = whole_chain(&db.store, &chain).await[0]
        .subject
        .clone()
        .unwrap()
        .id;
    raw(
        &db.place,
        &format!("{bypass} DELETE FROM impersonation_audit_runs WHERE view_name = 'subject' AND chain = '{c}'"),
    )
    .await
    .unwrap();
    assert_eq!(svc.verify_all().await.unwrap().listing, all.listing);
    let theirs = svc
        .verify_listing(&impersonation_core::AuditQuery {
            subject: Some(customer),
            ..impersonation_core::AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        theirs.listing,
        [ListingMismatch::Count {
            chain,
            chained: 6,
            listed: 0
        }],
        "{theirs:?}"
    );

    // A detail key written twice (a reader keeping the first value would
    // show one the hash never covered): the record does not read, which
    // is a break, and the whole store's check goes on past it.
    let chain = six_event_chain(&db.store).await;
    let c = chain.as_str();
    raw(
        &db.place,
        &format!(
            "{bypass} UPDATE impersonation_audit_events SET event = REPLACE(event, '\"description\":\"Viewed page 3.', '\"description\":\"Nothing to see.\",\"description\":\"Viewed page 3.') WHERE chain = '{c}' AND seq = 3"
        ),
    )
    .await
    .unwrap();
    let b = svc.verify_chain(&chain).await.unwrap().unwrap_err();
    assert_eq!((b.position, b.kind), (3, BreakKind::Unreadable));
    // A head that does not decode: a break of its chain, not an error
    // that stops the check of the others.
    let damaged = six_event_chain(&db.store).await;
    let c = damaged.as_str();
    raw(
        &db.place,
        &format!("UPDATE impersonation_audit_chains SET hash = 'not hex' WHERE chain = '{c}'"),
    )
    .await
    .unwrap();
    let b = svc.verify_chain(&damaged).await.unwrap().unwrap_err();
    assert_eq!(b.kind, BreakKind::HeadMismatch);
    let all = svc.verify_all().await.unwrap();
    for (chain, kind) in [
        (&headless, BreakKind::HeadMismatch),
        (&chain, BreakKind::Unreadable),
        (&damaged, BreakKind::HeadMismatch),
    ] {
        assert!(
            all.broken
                .iter()
                .any(|b| &b.chain == chain && b.kind == kind),
            "{all:?}"
        );
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_on_postgres_is_refused_then_detected() {
    tampering_is_refused_then_detected(common::postgres_db(4).await).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_on_mariadb_is_refused_then_detected() {
    tampering_is_refused_then_detected(common::mysql_db(4).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_on_sqlite_is_refused_then_detected() {
    tampering_is_refused_then_detected(common::sqlite_file_db(2).await).await;
}

/// A session row that no longer decodes (damaged, or written by a version
/// whose records this one refuses) answers its own lookup as corrupt; the
/// lookups batched with it, other requests', are answered as ever.
async fn a_damaged_session_row_fails_only_its_own_lookup(db: TestDb) {
    let w = World::new();
    let (start, damaged_secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (damaged, _) = must_start(&db.store, start).await;
    let (start, intact_secret) = w.begin(&w.agent(2), &w.customer(2, "t1"), epoch());
    let (intact, _) = must_start(&db.store, start).await;
    raw(
        &db.place,
        &format!(
            "UPDATE impersonation_sessions SET record = '{{}}' WHERE id = '{}'",
            damaged.id
        ),
    )
    .await
    .unwrap();
    // Another process, which has decoded neither session yet.
    let fresh = common::another_store_on(&db, 2).await;
    let found = fresh
        .find_by_secrets(&[damaged_secret.lookup(), intact_secret.lookup()], None)
        .await;
    assert!(
        matches!(found[0], Err(StoreError::Corrupt(_))),
        "{:?}",
        found[0]
    );
    assert_eq!(
        found[1].as_ref().unwrap().as_ref().map(|s| s.id),
        Some(intact.id)
    );
    // A listing (what `end_lapsed` and the revoke-alls rest on) leaves
    // the damaged row out and lists the intact one.
    for filter in [
        impersonation_core::LiveFilter::default(),
        impersonation_core::LiveFilter {
            tenant: Some(intact.tenant().clone()),
            ..Default::default()
        },
    ] {
        let live: Vec<_> = fresh
            .live_sessions(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(live, vec![intact.id], "{filter:?}");
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_session_row_on_postgres_fails_only_its_own_lookup() {
    a_damaged_session_row_fails_only_its_own_lookup(common::postgres_db(4).await).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_session_row_on_mariadb_fails_only_its_own_lookup() {
    a_damaged_session_row_fails_only_its_own_lookup(common::mysql_db(4).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_session_row_on_sqlite_fails_only_its_own_lookup() {
    a_damaged_session_row_fails_only_its_own_lookup(common::sqlite_file_db(2).await).await;
}

// --- crashes --------------------------------------------------------------------

/// Holds an uncommitted audit row at `(chain, seq)`, so the store's insert of
/// its own event at that position waits mid-transaction; then kills the
/// waiting connection from outside, as a crash or a network cut would.
#[cfg(feature = "postgres")]
mod postgres_crash {
    use diesel::QueryableByName;
    use diesel::sql_types::BigInt;
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

    use super::*;

    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = BigInt)]
        pid: i64,
    }

    async fn connect(schema: &str) -> AsyncPgConnection {
        let mut conn = AsyncPgConnection::establish(common::PG_URL).await.unwrap();
        conn.batch_execute(&format!("SET search_path TO \"{schema}\""))
            .await
            .unwrap();
        conn
    }

    async fn pids(conn: &mut AsyncPgConnection, sql: &str) -> Vec<i64> {
        diesel::sql_query(sql)
            .load::<Pid>(conn)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.pid)
            .collect()
    }

    /// Runs `write` while a blocker holds `(chain, seq)`, kills the writer's
    /// backend once it waits, and returns what the write returned.
    async fn killed_mid_write<T: Send + 'static>(
        schema: &str,
        chain: &ChainKey,
        seq: u64,
        write: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let mut blocker = connect(schema).await;
        blocker
            .batch_execute(&format!(
                "BEGIN; INSERT INTO impersonation_audit_events (id, chain, seq, at_us, action, event) \
                 VALUES ('blocker-{seq}', '{}', {seq}, 0, 'access', '{{}}')",
                chain.as_str()
            ))
            .await
            .unwrap();
        let blocker_pid = pids(&mut blocker, "SELECT pg_backend_pid()::bigint AS pid").await[0];
        let mut task = tokio::spawn(write);
        let mut admin = connect(schema).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let victim = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "the write never waited on the blocker"
            );
            // A write that did not wait at all says why.
            assert!(
                !task.is_finished(),
                "the write finished without waiting (its error: {:?})",
                (&mut task).await.map(Result::err)
            );
            let waiting = pids(
                &mut admin,
                &format!("SELECT pid::bigint AS pid FROM pg_stat_activity WHERE {blocker_pid} = ANY(pg_blocking_pids(pid))"),
            )
            .await;
            if let Some(pid) = <[_]>::first(&waiting) {
                break *pid;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        pids(
            &mut admin,
            &format!(
                "SELECT {victim}::bigint AS pid FROM (SELECT pg_terminate_backend({victim})) AS t"
            ),
        )
        .await;
        let result = task.await.unwrap();
        blocker.batch_execute("ROLLBACK").await.unwrap();
        result
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_killed_mid_transaction_leaves_neither_half() {
        let db = common::postgres_db(2).await;
        let Place::Postgres { schema } = &db.place else {
            unreachable!()
        };
        let w = World::new();
        let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
        let id = start.session().id;
        let chain = start.session().chain();
        let store = db.store.clone();
        let result =
            killed_mid_write(schema, &chain, 0, async move { store.start(start).await }).await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(db.store.session(id).await.unwrap().is_none(), "no session");
        assert!(
            db.store.chain_head(&chain).await.unwrap().is_none(),
            "no event"
        );
        assert!(
            all_events(
                &db.store,
                AuditQuery {
                    agent: Some(w.agent(1).id),
                    ..Default::default()
                }
            )
            .await
            .is_empty()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transition_killed_mid_transaction_leaves_neither_half() {
        let db = common::postgres_db(2).await;
        let Place::Postgres { schema } = &db.place else {
            unreachable!()
        };
        let w = World::new();
        let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
        let (session, _) = must_start(&db.store, start).await;
        let t = session
            .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
            .unwrap();
        let store = db.store.clone();
        let result = killed_mid_write(schema, &session.chain(), 1, async move {
            store.transition(t).await
        })
        .await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        let stored = db.store.session(session.id).await.unwrap().unwrap();
        assert_eq!(
            (stored.state, stored.version),
            (SessionState::Active, 0),
            "the session did not end"
        );
        let events = whole_chain(&db.store, &session.chain()).await;
        assert_eq!(events.len(), 1, "only the start event");
        // The store recovers: the same stop goes through afterwards.
        let t = session
            .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
            .unwrap();
        db.store.transition(t).await.unwrap();
        assert_eq!(whole_chain(&db.store, &session.chain()).await.len(), 2);
    }
}

#[cfg(feature = "mysql")]
mod mariadb_crash {
    use diesel::QueryableByName;
    use diesel::sql_types::BigInt;
    use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};

    use super::*;

    #[derive(QueryableByName)]
    struct Thread {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }

    /// A pooled connection the server closes while it is idle (a restart,
    /// a failover, `wait_timeout` overnight) leaves the pool at the first
    /// call that fails on it; the calls after that are served. (diesel-async
    /// judges a MySQL connection broken by its transaction state alone.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_closed_while_idle_leaves_the_pool() {
        let db = common::mysql_db(2).await;
        let Place::Mysql { url } = &db.place else {
            unreachable!()
        };
        let w = World::new();
        let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
        let (session, _) = must_start(&db.store, start).await;
        let (a, b) = tokio::join!(db.store.session(session.id), db.store.session(session.id));
        assert!(a.unwrap().is_some() && b.unwrap().is_some());

        // The server closes every connection the store holds.
        let mut admin = AsyncMysqlConnection::establish(url).await.unwrap();
        let name = url.rsplit('/').next().unwrap();
        let pooled = diesel::sql_query(format!(
            "SELECT CAST(ID AS SIGNED) AS id FROM information_schema.processlist \
             WHERE DB = '{name}' AND ID <> CONNECTION_ID()"
        ))
        .load::<Thread>(&mut admin)
        .await
        .unwrap();
        assert!(!pooled.is_empty(), "the store holds connections");
        for thread in &pooled {
            admin
                .batch_execute(&format!("KILL {}", thread.id))
                .await
                .unwrap();
        }

        // At most one failed call per closed connection, then service.
        let mut failed = 0;
        for _ in 0..10 {
            match db.store.session(session.id).await {
                Ok(found) => {
                    assert_eq!(found.map(|s| s.id), Some(session.id));
                    break;
                }
                Err(_) => failed += 1,
            }
        }
        assert!(failed <= pooled.len(), "{failed} calls failed");
        for _ in 0..4 {
            assert!(db.store.session(session.id).await.unwrap().is_some());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transition_killed_mid_transaction_leaves_neither_half() {
        let db = common::mysql_db(2).await;
        let Place::Mysql { url } = &db.place else {
            unreachable!()
        };
        let w = World::new();
        let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
        let (session, _) = must_start(&db.store, start).await;
        let chain = session.chain();
        let mut blocker = AsyncMysqlConnection::establish(url).await.unwrap();
        let blocker_id = diesel::sql_query("SELECT CAST(CONNECTION_ID() AS SIGNED) AS id")
            .load::<Thread>(&mut blocker)
            .await
            .unwrap()[0]
            .id;
        blocker
            .batch_execute(&format!(
                "START TRANSACTION; INSERT INTO impersonation_audit_events (id, chain, seq, at_us, action, event) \
                 VALUES ('blocker', '{}', 1, 0, 'access', '{{}}')",
                chain.as_str()
            ))
            .await
            .unwrap();
        let t = session
            .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
            .unwrap();
        let store = db.store.clone();
        let mut task = tokio::spawn(async move { store.transition(t).await });
        let mut admin = AsyncMysqlConnection::establish(url).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let victim = loop {
            if std::time::Instant::now() >= deadline {
                #[derive(QueryableByName, Debug)]
                #[allow(dead_code)] // read through Debug, in the message below
                struct Proc {
                    #[diesel(sql_type = diesel::sql_types::Text)]
                    info: String,
                }
                let procs = diesel::sql_query(
                    "SELECT CONCAT_WS(' | ', ID, COMMAND, STATE, TIME, COALESCE(INFO, '')) AS info FROM information_schema.processlist",
                )
                .load::<Proc>(&mut admin)
                .await
                .unwrap();
                let trx = diesel::sql_query(
                    "SELECT CONCAT_WS(' | ', trx_id, trx_state, trx_mysql_thread_id, COALESCE(trx_query, ''), COALESCE(trx_requested_lock_id, '')) AS info FROM information_schema.innodb_trx",
                )
                .load::<Proc>(&mut admin)
                .await
                .unwrap();
                panic!(
                    "the write never waited on the blocker (blocker {blocker_id}); processes: {procs:#?}; transactions: {trx:#?}"
                );
            }
            // A write that did not wait at all says why.
            assert!(
                !task.is_finished(),
                "the write finished without waiting (its error: {:?})",
                (&mut task).await.map(Result::err)
            );
            // Only the connection our blocker holds up: other tests run beside
            // this one. InnoDB does not always list a duplicate-key wait in
            // innodb_lock_waits, so a connection of this test's database
            // busy inserting into the events table counts as well.
            let waiting = diesel::sql_query(format!(
                "SELECT CAST(r.trx_mysql_thread_id AS SIGNED) AS id FROM information_schema.innodb_lock_waits w \
                 JOIN information_schema.innodb_trx r ON r.trx_id = w.requesting_trx_id \
                 JOIN information_schema.innodb_trx b ON b.trx_id = w.blocking_trx_id \
                 WHERE b.trx_mysql_thread_id = {blocker_id} \
                 UNION SELECT CAST(ID AS SIGNED) AS id FROM information_schema.processlist \
                 WHERE DB = DATABASE() AND ID <> {blocker_id} AND ID <> CONNECTION_ID() \
                 AND INFO LIKE 'INSERT INTO impersonation_audit_events%' AND TIME_MS > 200"
            ))
            .load::<Thread>(&mut admin)
            .await
            .unwrap();
            if let Some(t) = <[_]>::first(&waiting) {
                break t.id;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        admin
            .batch_execute(&format!("KILL CONNECTION {victim}"))
            .await
            .unwrap();
        let result = task.await.unwrap();
        blocker.batch_execute("ROLLBACK").await.unwrap();
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        let stored = db.store.session(session.id).await.unwrap().unwrap();
        assert_eq!(
            (stored.state, stored.version),
            (SessionState::Active, 0),
            "the session did not end"
        );
        assert_eq!(
            whole_chain(&db.store, &chain).await.len(),
            1,
            "only the start event"
        );
    }
}
