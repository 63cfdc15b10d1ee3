//! Requests whose clients go away mid-call (a closed browser tab, a
//! timeout in front of the app): the store call they carried must not
//! leave a transaction open on a pooled connection, where it would hold
//! the chain's lock (PostgreSQL, MariaDB) or the database's write lock
//! (SQLite) and stall every later request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use impersonation_core::{
    Activity, Actor, AppendGuard, AuditAction, AuditDraft, Impersonation, MemoryDirectory,
    Requester, StartRequest, Store,
};
use impersonation_diesel::{DieselConfig, DieselStore, QueryCounter};
use impersonation_testkit::World;

/// Takes the chain heads' lock from a connection of its own, waiting at
/// most a second.
fn probe(place: &common::Place) -> &'static str {
    match place {
        common::Place::Postgres { .. } => {
            "SET lock_timeout = '1s'; BEGIN; SELECT 1 FROM impersonation_audit_chains FOR UPDATE; ROLLBACK;"
        }
        common::Place::Mysql { .. } => {
            "SET SESSION innodb_lock_wait_timeout = 1; BEGIN; SELECT 1 FROM impersonation_audit_chains FOR UPDATE; ROLLBACK;"
        }
        common::Place::Sqlite { .. } => "PRAGMA busy_timeout = 1000; BEGIN IMMEDIATE; ROLLBACK;",
    }
}

/// On PostgreSQL a record on a chain whose head the process knows is one
/// statement, with no transaction to leave open; another process's
/// append before each round moves the head, so that the record takes
/// the transaction path, and `counter` (the store's) shows that records
/// were cut in the middle of one.
struct MovingHead {
    other: DieselStore,
    counter: Arc<QueryCounter>,
}

/// Each round drops a record at a later point of its store call, so that
/// many are dropped in the middle of their transaction; then a record, a
/// lookup and a stop must each finish well within the time a stuck lock
/// would take to give up, and the chain must verify.
async fn cancelled_records_leave_no_lock_behind(db: TestDb, moving: Option<MovingHead>) {
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let directory = MemoryDirectory::new();
    directory.insert(agent.clone());
    directory.insert(customer.clone());
    let svc = Impersonation::new(db.store.clone(), directory);
    let started = svc
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Cancelled requests"),
        )
        .await
        .unwrap();
    let ctx = svc.resolve(&started.secret).await.unwrap();
    // A lookup beside a record: the pool holds more than one connection,
    // so the next call may take another one than the call cut short.
    for _ in 0..4 {
        let (a, b) = tokio::join!(
            svc.record(&ctx, Activity::access("Warming the pool.")),
            svc.resolve_fresh(&started.secret)
        );
        a.unwrap();
        b.unwrap();
    }
    let mut cancelled = 0;
    let mut cut_in_a_transaction = 0;
    for round in 0..40_usize {
        let mut sent = 0;
        if let Some(m) = &moving {
            let moved = m
                .other
                .append_batch(vec![(
                    AuditDraft::new(svc.now(), AuditAction::Access, Actor::System, ctx.chain()),
                    AppendGuard::None,
                )])
                .await;
            assert!(moved.iter().all(Result::is_ok), "{moved:?}");
            sent = m.counter.queries();
        }
        // One record at a time, each the leader of its own store call,
        // dropped after `round` turns of the scheduler: from before its
        // first statement to after its commit. (Where the store's
        // statements are counted, once the record has started its
        // `round % 10`th: a statement takes longer than many turns.)
        let record = svc.record(&ctx, Activity::access("Viewed."));
        let cut = async {
            match &moving {
                Some(m) => {
                    while m.counter.queries() - sent < u64::try_from(round % 10).unwrap() {
                        tokio::task::yield_now().await;
                    }
                }
                None => {
                    for _ in 0..round {
                        tokio::task::yield_now().await;
                    }
                }
            }
        };
        tokio::select! {
            biased;
            _ = record => {}
            () = cut => {
                cancelled += 1;
                // What the record had sent when it was dropped: a `BEGIN`
                // and no end to it yet is a transaction cut short.
                if let Some(m) = &moving {
                    let ran = usize::try_from(m.counter.queries() - sent).unwrap();
                    let recent = m.counter.recent();
                    let ran = &recent[recent.len().saturating_sub(ran)..];
                    let began = ran.iter().rposition(|q| q == "BEGIN");
                    let ended = ran.iter().rposition(|q| q == "COMMIT" || q == "ROLLBACK");
                    if began.is_some_and(|b| ended.is_none_or(|e| e < b)) {
                        cut_in_a_transaction += 1;
                    }
                }
            }
        }
        // Nobody holds the chain's lock once the call is over: another
        // connection takes it within a second.
        if let Err(e) = common::raw(&db.place, probe(&db.place)).await {
            panic!("round {round}: a lock was left behind by a cancelled request: {e}");
        }
        let next = async {
            svc.record(&ctx, Activity::access("After the cut.")).await?;
            svc.resolve_fresh(&started.secret).await
        };
        match tokio::time::timeout(Duration::from_secs(2), next).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("round {round}: a request after the cancellation failed: {e}"),
            Err(_) => panic!("round {round}: a request after the cancellation is stuck"),
        }
    }
    assert!(cancelled > 0, "no record was cut short");
    if moving.is_some() {
        assert!(
            cut_in_a_transaction > 0,
            "no record was cut short in its transaction"
        );
    }
    let stop = svc.stop(&started.secret, &agent);
    tokio::time::timeout(Duration::from_secs(2), stop)
        .await
        .expect("stop is stuck")
        .unwrap();
    let report = svc.verify_all().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    let head = db
        .store
        .chain_head(&ctx.chain())
        .await
        .unwrap()
        .expect("a head");
    assert_eq!(report.events(), head.seq + 1);
}

/// A SQLite store on a file of its own with a short busy timeout: a write
/// lock left behind fails the next write within the test's own deadline.
async fn sqlite_waiting_500ms() -> TestDb {
    let path = common::scratch_file("imptest", "db").display().to_string();
    let config =
        DieselConfig::new(format!("sqlite://{path}")).busy_timeout(Duration::from_millis(500));
    TestDb {
        store: DieselStore::connect_and_migrate(config).await.unwrap(),
        place: common::Place::Sqlite { path },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_records_leave_no_lock_behind_on_sqlite() {
    cancelled_records_leave_no_lock_behind(sqlite_waiting_500ms().await, None).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_records_leave_no_lock_behind_on_postgres() {
    let schema = common::unique("imptest");
    let counter = QueryCounter::new();
    let store = DieselStore::connect_and_migrate(
        DieselConfig::new(common::PG_URL)
            .schema(schema.clone())
            .max_connections(8)
            .query_counter(Arc::clone(&counter)),
    )
    .await
    .unwrap();
    let db = TestDb {
        store,
        place: common::Place::Postgres { schema },
    };
    let other = common::another_store_on(&db, 2).await;
    cancelled_records_leave_no_lock_behind(db, Some(MovingHead { other, counter })).await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_records_leave_no_lock_behind_on_mariadb() {
    cancelled_records_leave_no_lock_behind(common::mysql_db(8).await, None).await;
}

#[tokio::test(flavor = "current_thread")]
async fn sqlite_works_on_a_current_thread_runtime_with_cancelled_requests() {
    // diesel-async's own SQLite wrapper would block in place (and panic
    // here) when a statement is dropped halfway; the store never drops one.
    cancelled_records_leave_no_lock_behind(sqlite_waiting_500ms().await, None).await;
}
