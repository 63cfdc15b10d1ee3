//! What each call costs in statements, counted through diesel's
//! instrumentation, and what an outage does: the SDK fails closed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A build with one backend (`--no-default-features --features sqlite`,
// say) leaves the other backends' helpers and imports unused.
#![cfg_attr(
    not(all(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(unused_imports)
)]

mod common;

use std::sync::Arc;

use impersonation_core::{
    Activity, Config, Error, Impersonation, MemoryDirectory, Principal, Requester, StartRequest,
    StoreError,
};
use impersonation_diesel::{DieselConfig, DieselError, DieselStore, QueryCounter};
use impersonation_testkit::World;
use time::Duration;

struct Costs {
    start: u64,
    resolve: u64,
    resolve_coalesced: u64,
    /// A resolve within `Config::reuse_interval` of a store read.
    resolve_reused: u64,
    record: u64,
    stop: u64,
    prepared_in_steady_state: u64,
}

async fn costs(config: DieselConfig) -> Costs {
    let counter = QueryCounter::new();
    let store = DieselStore::connect_and_migrate(
        config
            .query_counter(Arc::clone(&counter))
            .max_connections(1),
    )
    .await
    .unwrap();
    let w = World::new();
    let directory = MemoryDirectory::new();
    let (agent, customer): (Principal, Principal) = (w.agent(1), w.customer(1, "t1"));
    directory.insert(agent.clone());
    directory.insert(customer.clone());
    let clock = impersonation_core::ManualClock::new(impersonation_testkit::epoch());
    let svc = Impersonation::new(store, directory)
        .with_clock(clock.clone())
        .with_config(Config {
            touch_interval: Duration::seconds(10),
            ..Config::default()
        });
    // Warm up: every statement prepared and cached once.
    for _ in 0..2 {
        let s = svc
            .start(
                Requester::User(&agent),
                StartRequest::new(customer.id.clone(), "Warming the caches"),
            )
            .await
            .unwrap();
        clock.advance(Duration::seconds(11));
        let ctx = svc.resolve(&s.secret).await.unwrap();
        svc.resolve(&s.secret).await.unwrap();
        svc.record(&ctx, Activity::access("Viewed.")).await.unwrap();
        svc.stop(&s.secret, &agent).await.unwrap();
    }
    let measure = |before: u64| counter.queries() - before;
    let prepared = counter.prepared();
    let q = counter.queries();
    let s = svc
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Counting statements"),
        )
        .await
        .unwrap();
    let start = measure(q);
    clock.advance(Duration::seconds(11));
    let q = counter.queries();
    let ctx = svc.resolve_fresh(&s.secret).await.unwrap();
    let resolve = measure(q);
    let recent = counter.recent();
    for sql in &recent[recent.len() - resolve as usize..] {
        println!("  resolve ran: {}", &sql[..sql.len().min(110)]);
    }
    let q = counter.queries();
    svc.resolve_fresh(&s.secret).await.unwrap();
    let resolve_coalesced = measure(q);
    let q = counter.queries();
    svc.resolve(&s.secret).await.unwrap();
    let resolve_reused = measure(q);
    let q = counter.queries();
    svc.record(&ctx, Activity::access("Viewed.")).await.unwrap();
    let record = measure(q);
    let q = counter.queries();
    svc.stop(&s.secret, &agent).await.unwrap();
    let stop = measure(q);
    Costs {
        start,
        resolve,
        resolve_coalesced,
        resolve_reused,
        record,
        stop,
        prepared_in_steady_state: counter.prepared() - prepared,
    }
}

/// `start`, `record` and `stop` (the service's calls) cost what
/// `docs/diesel.md`'s table says on this backend.
fn assert_calls(c: &Costs, (start, record, stop): (u64, u64, u64)) {
    assert_eq!(
        (c.start, c.record, c.stop),
        (start, record, stop),
        "start, record and stop: update docs/diesel.md's cost table with a change"
    );
}

fn report(name: &str, c: &Costs) {
    println!(
        "{name}: start {} statements, resolve {} (touch written) / {} (touch coalesced) / {} (reused), record {}, stop {}, newly prepared {}",
        c.start,
        c.resolve,
        c.resolve_coalesced,
        c.resolve_reused,
        c.record,
        c.stop,
        c.prepared_in_steady_state
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_is_one_cached_statement_on_postgres() {
    let c = costs(DieselConfig::new(common::PG_URL).schema(common::unique("imptest"))).await;
    report("postgres", &c);
    assert_eq!(c.resolve, 1, "find and touch in one statement");
    assert_eq!(c.resolve_coalesced, 1);
    assert_eq!(c.resolve_reused, 0, "a session read a moment ago is reused");
    assert_eq!(
        c.record, 1,
        "an append on a known head is one statement (compare-and-set)"
    );
    assert_eq!(
        c.prepared_in_steady_state, 0,
        "every statement comes from the cache: one round trip each"
    );
    assert_calls(&c, (13, 1, 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_costs_on_sqlite() {
    let path = common::scratch_file("imptest", "db");
    let c = costs(DieselConfig::new(format!("sqlite://{}", path.display()))).await;
    report("sqlite", &c);
    assert_eq!(
        (c.resolve, c.resolve_coalesced),
        (2, 1),
        "select, then the touch only when due"
    );
    assert_eq!(c.resolve_reused, 0, "a session read a moment ago is reused");
    assert_calls(&c, (14, 8, 10));
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_costs_on_mariadb() {
    let db = common::mysql_db(1).await;
    let common::Place::Mysql { url } = db.place else {
        unreachable!()
    };
    let c = costs(DieselConfig::new(url)).await;
    report("mariadb", &c);
    assert_eq!(
        (c.resolve, c.resolve_coalesced),
        (2, 1),
        "select, then the touch only when due"
    );
    assert_eq!(c.resolve_reused, 0, "a session read a moment ago is reused");
    assert_calls(&c, (13, 7, 9));
}

#[tokio::test]
async fn an_unreachable_database_is_a_typed_error() {
    // Port 1 on loopback: nothing listens there.
    let config = DieselConfig::new("postgres://postgres@127.0.0.1:1/test")
        .connect_timeout(std::time::Duration::from_secs(2));
    match DieselStore::connect(config).await {
        Err(DieselError::Connect(_)) => {}
        #[cfg(not(feature = "postgres"))]
        Err(DieselError::FeatureDisabled(_)) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert!(matches!(
        DieselStore::connect(DieselConfig::new("oracle://x")).await,
        Err(DieselError::UnsupportedUrl(_))
    ));
}

/// A SQLite database that lives in one connection (`:memory:` in any of
/// its spellings) is served by that one connection: calls at once all
/// find the tables the migration made. A URL naming no file (a temporary
/// database per connection, deleted when it closes) is refused.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_sqlite_database_of_one_connection_keeps_to_it_and_a_nameless_one_is_refused() {
    for url in [
        "sqlite://:memory:",
        "sqlite://file::memory:",
        "sqlite://file:trail?mode=memory",
    ] {
        let store = DieselStore::connect_and_migrate(DieselConfig::new(url).max_connections(8))
            .await
            .unwrap();
        let w = World::new();
        let directory = MemoryDirectory::new();
        let customer = w.customer(1, "t1");
        directory.insert(customer.clone());
        let agents: Vec<Principal> = (1..=8).map(|n| w.agent(n)).collect();
        for agent in &agents {
            directory.insert(agent.clone());
        }
        let svc = Arc::new(Impersonation::new(store, directory));
        let mut starts = tokio::task::JoinSet::new();
        for agent in agents {
            let (svc, target) = (Arc::clone(&svc), customer.id.clone());
            starts.spawn(async move {
                svc.start(
                    Requester::User(&agent),
                    StartRequest::new(target, "Checking one connection"),
                )
                .await
                .map(|started| started.session.id)
            });
        }
        let mut started = 0;
        while let Some(outcome) = starts.join_next().await {
            outcome.unwrap().unwrap_or_else(|e| panic!("{url}: {e}"));
            started += 1;
        }
        assert_eq!(started, 8, "{url}");
    }
    for url in ["sqlite://", "sqlite://file:"] {
        match DieselStore::connect(DieselConfig::new(url)).await {
            Err(DieselError::Config(message)) => {
                assert!(message.contains("names no file"), "{message}")
            }
            other => panic!("{url}: expected a configuration error, got {other:?}"),
        }
    }
}

/// A TCP proxy between the store and PostgreSQL, which the test can cut.
#[cfg(feature = "postgres")]
struct Proxy {
    port: u16,
    accept: tokio::task::JoinHandle<()>,
    links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

#[cfg(feature = "postgres")]
impl Proxy {
    async fn to(upstream: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let links = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = Arc::clone(&links);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().unwrap().push(link);
            }
        });
        Self {
            port,
            accept,
            links,
        }
    }

    /// The network goes away: no new connections, open ones dropped.
    fn cut(&self) {
        self.accept.abort();
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_fails_closed() {
    let proxy = Proxy::to("127.0.0.1:5432").await;
    let config = DieselConfig::new(format!("postgres://postgres@127.0.0.1:{}/test", proxy.port))
        .schema(common::unique("imptest"))
        .wait_timeout(std::time::Duration::from_secs(2))
        .connect_timeout(std::time::Duration::from_secs(2));
    let store = DieselStore::connect_and_migrate(config).await.unwrap();
    let w = World::new();
    let directory = MemoryDirectory::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    directory.insert(agent.clone());
    directory.insert(customer.clone());
    let svc = Impersonation::new(store, directory);
    let started = svc
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Before the outage"),
        )
        .await
        .unwrap();
    let ctx = svc.resolve(&started.secret).await.unwrap();

    proxy.cut();
    // A read of the session resolved a moment ago is not served either:
    // its audit write fails, and the binding withholds the response.
    let err = svc
        .record(&ctx, Activity::access("Viewed bookings."))
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 503, "{err:?}");
    let err = svc.resolve_fresh(&started.secret).await.unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Unavailable(_))),
        "{err:?}"
    );
    assert_eq!(
        err.http_status(),
        503,
        "no request is served as an impersonated user the SDK could not check"
    );
    let err = svc
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "During the outage"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 503);
}

/// The one-statement append trusts a head cached in this process; when
/// another process has moved the chain (here: ended the session), the
/// compare-and-set fails, the transaction path runs, and the guard holds.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cached_head_falls_back_and_the_guard_holds_on_postgres() {
    use impersonation_core::{
        Actor, AppendGuard, AuditAction, Details, EndReason, Store, verify_chain,
    };
    let schema = common::unique("imptest");
    let config = || DieselConfig::new(common::PG_URL).schema(schema.clone());
    let counter = QueryCounter::new();
    let here = DieselStore::connect_and_migrate(config().query_counter(Arc::clone(&counter)))
        .await
        .unwrap();
    let elsewhere = DieselStore::connect(config()).await.unwrap();
    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), impersonation_testkit::epoch());
    let (session, _) = impersonation_testkit::conformance::must_start(&here, start).await;
    let access = |i: i64| {
        (
            session
                .draft(
                    impersonation_testkit::epoch() + Duration::seconds(i),
                    AuditAction::Access,
                    Actor::user(agent.id.clone(), "Agent 1"),
                )
                .details(Details::new().with("i", i)),
            AppendGuard::SessionActive(session.id),
        )
    };
    // The head is known here: one statement.
    let q = counter.queries();
    let first = here.append_batch(vec![access(1), access(2)]).await;
    assert!(first.iter().all(Result::is_ok), "{first:?}");
    assert_eq!(counter.queries() - q, 1);
    // Another process ends the session, moving the head.
    let end = session
        .end(
            EndReason::Revoked,
            Actor::System,
            impersonation_testkit::epoch() + Duration::seconds(3),
            Details::new(),
        )
        .unwrap();
    elsewhere.transition(end).await.unwrap();
    // Here the cached head is stale: refused, and nothing forks.
    let late = here.append_batch(vec![access(4)]).await;
    assert!(
        matches!(late.as_slice(), [Err(StoreError::SessionNotActive(_))]),
        "{late:?}"
    );
    let unguarded = here
        .append_batch(vec![(access(5).0, AppendGuard::None)])
        .await;
    assert_eq!(unguarded[0].as_ref().unwrap().seq, 4);
    let events = impersonation_testkit::conformance::whole_chain(&here, &session.chain()).await;
    let head = here.chain_head(&session.chain()).await.unwrap();
    let report = verify_chain(&session.chain(), &events, head).unwrap();
    assert_eq!(
        report.events, 5,
        "start, two accesses, the end, one unguarded"
    );
}

/// Batches of every length from 1 to 100 events. Where a statement's text
/// grows with its lists (a `VALUES` list), each length is a statement of
/// its own, which a connection would keep prepared for its life: those of
/// short lists stay prepared (on MariaDB, whose prepared statements count
/// against one server-wide limit, `max_prepared_stmt_count`, up to 8;
/// elsewhere up to 64), a longer one is prepared for one use. (Seen here:
/// MariaDB 8 statements for lengths 1-8, SQLite 73 for 1-64, PostgreSQL,
/// whose appends mostly keep one text, 20.)
async fn batches_of_every_length_keep_a_bounded_set_prepared(
    config: DieselConfig,
    kept_up_to: i64,
) {
    use impersonation_core::{Actor, AppendGuard, AuditAction, Store};
    use impersonation_testkit::conformance::{must_start, whole_chain};

    let counter = QueryCounter::new();
    let store = DieselStore::connect_and_migrate(
        config
            .query_counter(Arc::clone(&counter))
            .max_connections(1),
    )
    .await
    .unwrap();
    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), impersonation_testkit::epoch());
    let (session, _) = must_start(&store, start).await;
    let batches = |lengths: std::ops::RangeInclusive<i64>| {
        let (store, session, agent) = (&store, &session, &agent);
        async move {
            for n in lengths {
                let batch = (0..n)
                    .map(|i| {
                        let draft = session.draft(
                            impersonation_testkit::epoch() + Duration::seconds(n * 100 + i),
                            AuditAction::Access,
                            Actor::user(agent.id.clone(), "Agent 1"),
                        );
                        (draft, AppendGuard::SessionActive(session.id))
                    })
                    .collect();
                for appended in store.append_batch(batch).await {
                    appended.unwrap();
                }
            }
        }
    };
    let before = counter.prepared();
    batches(1..=kept_up_to).await;
    let short = counter.prepared() - before;
    assert!(
        short <= 2 * kept_up_to as u64,
        "{short} statements kept prepared for {kept_up_to} batch lengths"
    );
    let before = counter.prepared();
    batches(kept_up_to + 1..=100).await;
    assert_eq!(
        counter.prepared() - before,
        0,
        "a longer batch keeps no statement"
    );
    assert_eq!(
        whole_chain(&store, &session.chain()).await.len(),
        1 + (1..=100).sum::<usize>()
    );
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_every_length_keep_few_statements_prepared_on_mariadb() {
    let url = common::mysql_database().await;
    batches_of_every_length_keep_a_bounded_set_prepared(DieselConfig::new(url), 8).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_every_length_keep_a_bounded_set_prepared_on_postgres() {
    let config = DieselConfig::new(common::PG_URL).schema(common::unique("imptest"));
    batches_of_every_length_keep_a_bounded_set_prepared(config, 64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_every_length_keep_a_bounded_set_prepared_on_sqlite() {
    let path = common::scratch_file("imptest", "db");
    let config = DieselConfig::new(format!("sqlite://{}", path.display()));
    batches_of_every_length_keep_a_bounded_set_prepared(config, 64).await;
}
