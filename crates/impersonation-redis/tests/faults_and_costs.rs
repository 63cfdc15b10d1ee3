//! On a Redis server of the test's own: commands per call (INFO
//! commandstats), connections killed and the server restarted during work,
//! and the persistence check at start-up.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::OwnServer;
use impersonation_core::{
    Activity, Actor, AuditAction, ChainKey, Details, EndReason, Error, Impersonation,
    MemoryDirectory, Principal, Requester, StartOutcome, StartRequest, Store,
};
use impersonation_redis::{RedisConfig, RedisStore, RedisStoreError};
use impersonation_testkit::conformance::{all_events, whole_chain};
use impersonation_testkit::{World, epoch};

async fn admin(server: &OwnServer) -> redis::aio::MultiplexedConnection {
    common::raw(&server.url()).await
}

/// Calls per command since the server started.
async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// What ran between two snapshots, leaving out the INFO calls themselves.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .filter_map(|(name, calls)| {
            let d = calls - before.get(name).copied().unwrap_or(0);
            (d > 0).then(|| (name.clone(), d))
        })
        .collect()
}

/// Top-level commands as MONITOR sees them: a script's own calls are tagged
/// `lua` and left out, and so are this test's INFO calls.
struct Monitor {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(server: &OwnServer) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new("redis-cli")
            .args(["-p", &server.port.to_string(), "monitor"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        Self { child, lines }
    }

    /// The top-level commands seen since the last call.
    fn take(&self) -> Vec<String> {
        std::thread::sleep(std::time::Duration::from_millis(150));
        let mut lines = self.lines.lock().unwrap();
        lines
            .drain(..)
            .filter(|l| l.contains('[') && !l.contains(" lua]"))
            .filter_map(|l| l.split('"').nth(1).map(str::to_lowercase))
            .filter(|command| command != "info")
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scripts(d: &BTreeMap<String, u64>) -> u64 {
    d.get("evalsha").copied().unwrap_or(0) + d.get("eval").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_is_one_command_and_start_and_stop_one_script_call_each() {
    let server = OwnServer::start();
    let store = common::store_at(&server.url(), &common::unique("imptest")).await;
    let mut info = admin(&server).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    // Warm up: scripts loaded, the chain head cached.
    for _ in 0..2 {
        let (start, warm) = w.begin(&agent, &customer, epoch());
        let StartOutcome::Started { session, .. } = store.start(start).await.unwrap() else {
            panic!("refused")
        };
        store.find_by_secret(&warm.lookup(), None).await.unwrap();
        let stop = session
            .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
            .unwrap();
        store.transition(stop).await.unwrap();
    }

    let monitor = Monitor::start(&server);
    monitor.take();
    let (start, secret) = w.begin(&agent, &customer, epoch());
    let before = commandstats(&mut info).await;
    let StartOutcome::Started { session, .. } = store.start(start).await.unwrap() else {
        panic!("refused")
    };
    let start_cost = delta(&before, &commandstats(&mut info).await);
    let start_sent = monitor.take();

    let touch = impersonation_core::Touch {
        now: epoch() + time::Duration::seconds(5),
        coalesce: time::Duration::ZERO,
    };
    let before = commandstats(&mut info).await;
    assert!(
        store
            .find_by_secret(&secret.lookup(), Some(touch))
            .await
            .unwrap()
            .is_some()
    );
    let resolve_cost = delta(&before, &commandstats(&mut info).await);
    let resolve_sent = monitor.take();

    let stop = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    let before = commandstats(&mut info).await;
    store.transition(stop).await.unwrap();
    let stop_cost = delta(&before, &commandstats(&mut info).await);
    let stop_sent = monitor.take();

    println!("start sent {start_sent:?}\nresolve sent {resolve_sent:?}\nstop sent {stop_sent:?}");
    println!(
        "server-side calls (scripts' own included): start {start_cost:?}, resolve {resolve_cost:?}, stop {stop_cost:?}"
    );
    assert_eq!(resolve_sent, ["evalsha"], "resolve is one command");
    assert_eq!(scripts(&resolve_cost), 1);
    assert_eq!(
        scripts(&start_cost),
        1,
        "start is one script call: {start_cost:?}"
    );
    assert_eq!(
        scripts(&stop_cost),
        1,
        "stop is one script call: {stop_cost:?}"
    );
    assert!(
        !start_sent.iter().any(|c| c == "hmget"),
        "a warm head cache reads nothing first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_leave_no_session_without_its_events() {
    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let store = common::store_at(&server.url(), &ns).await;
    let w = World::new();
    let agents: Vec<Principal> = (0..6).map(|n| w.agent(n)).collect();
    let customer = w.customer(1, "t1");
    let mut people = agents.clone();
    people.push(customer.clone());
    let directory = MemoryDirectory::new();
    for p in &people {
        directory.insert(p.clone());
    }
    let svc = Impersonation::new(store.clone(), directory);

    let stop_killing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = std::sync::Arc::clone(&stop_killing);
        let mut conn = admin(&server).await;
        tokio::spawn(async move {
            let mut kills = 0_u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _: Result<redis::Value, _> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .arg("SKIPME")
                    .arg("yes")
                    .query_async(&mut conn)
                    .await;
                kills += 1;
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
            kills
        })
    };
    let mut workers = tokio::task::JoinSet::new();
    for agent in agents.clone() {
        let (svc, target) = (svc.clone(), customer.id.clone());
        workers.spawn(async move {
            let (mut served, mut failed) = (0_u32, 0_u32);
            for _ in 0..40 {
                let Ok(started) = svc
                    .start(
                        Requester::User(&agent),
                        StartRequest::new(target.clone(), "Working through failures"),
                    )
                    .await
                else {
                    failed += 1;
                    // A start whose reply was lost may have succeeded: end
                    // whatever is live before the next attempt.
                    let _ = svc
                        .revoke_all_for_agent(
                            &agent.id,
                            impersonation_core::Initiator::System,
                            "cleanup",
                        )
                        .await;
                    continue;
                };
                match svc.resolve(&started.secret).await {
                    Ok(ctx) => {
                        served += 1;
                        let _ = svc.record(&ctx, Activity::access("Viewed.")).await;
                    }
                    Err(_) => failed += 1,
                }
                if svc.stop(&started.secret, &agent).await.is_err() {
                    failed += 1;
                    let _ = svc
                        .revoke_all_for_agent(
                            &agent.id,
                            impersonation_core::Initiator::System,
                            "cleanup",
                        )
                        .await;
                }
            }
            (served, failed)
        });
    }
    let (mut served, mut failed) = (0, 0);
    while let Some(r) = workers.join_next().await {
        let (s, f) = r.unwrap();
        served += s;
        failed += f;
    }
    stop_killing.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.await.unwrap();
    println!("{kills} CLIENT KILLs; {served} requests served, {failed} operations failed");
    // How many calls a kill lands on depends on timing; what must hold is
    // below, whatever it was.
    assert!(kills > 0 && served + failed > 0);

    // The last kill may have hit the store's connection after the last
    // operation: its next command fails (closed) while it reconnects. Wait
    // until it answers again before checking.
    let mut settled = false;
    for _ in 0..100 {
        if store.chains(None, 1).await.is_ok() {
            settled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(settled, "the connection manager never reconnected");

    // Invariants over everything that was written.
    let mut conn = admin(&server).await;
    let session_keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*:s:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut events = Vec::new();
    for agent in &agents {
        let chain = ChainKey::for_agent(&agent.id);
        let report = svc.verify_chain(&chain).await.unwrap();
        assert!(report.is_ok(), "chain of {} broken: {report:?}", agent.id);
        events.extend(whole_chain(&store, &chain).await);
    }
    assert!(!session_keys.is_empty());
    // A view write that failed even when tried again (the kills go on the
    // whole time) was logged, and `rebuild_indexes` puts its entries back
    // from the chains, the record of truth. (A strict check without it,
    // that every event is listed by its writes alone, passed eight runs
    // alone and failed one under CI's load.)
    let chains: Vec<ChainKey> = agents.iter().map(|a| ChainKey::for_agent(&a.id)).collect();
    store.rebuild_indexes(&chains).await.unwrap();
    for key in session_keys {
        let id: impersonation_core::SessionId = key.rsplit(':').next().unwrap().parse().unwrap();
        let session = store
            .session(id)
            .await
            .unwrap()
            .expect("a session the index knows");
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.session == Some(id) && e.action != AuditAction::Denied)
            .collect();
        assert_eq!(
            mine.first().map(|e| e.action),
            Some(AuditAction::SessionStarted),
            "session {id} has no start event"
        );
        let ends = mine
            .iter()
            .filter(|e| e.action == AuditAction::SessionEnded)
            .count();
        assert_eq!(
            ends,
            usize::from(!session.state.is_live()),
            "session {id}: {ends} end events, state {}",
            session.state
        );
        // Every event of the session is in its audit view.
        let listed: Vec<_> = all_events(
            &store,
            impersonation_core::AuditQuery {
                session: Some(id),
                ..impersonation_core::AuditQuery::default()
            },
        )
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
        for event in events.iter().filter(|e| e.session == Some(id)) {
            assert!(
                listed.contains(&event.id),
                "session {id}: {:?} event {} is in no view",
                event.action,
                event.seq
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_serves_nothing_it_lost() {
    let mut server = OwnServer::start();
    let store = common::store_at(&server.url(), &common::unique("imptest")).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let directory = MemoryDirectory::new();
    directory.insert(agent.clone());
    directory.insert(customer.clone());
    let svc = Impersonation::new(store.clone(), directory);
    let started = svc
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Before the restart"),
        )
        .await
        .unwrap();
    let ctx = svc.resolve(&started.secret).await.unwrap();

    server.restart(); // persistence is off: everything is gone
    // A read of the session resolved a moment ago is not served either:
    // its audit write finds no session (or no server), and the binding
    // withholds the response.
    let mut refused = Vec::new();
    for _ in 0..100 {
        match svc.record(&ctx, Activity::access("Viewed bookings.")).await {
            Ok(_) => panic!("an access was recorded in a session the server no longer has"),
            Err(e) => refused.push(e.http_status()),
        }
        if refused.last() == Some(&401) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(refused.last(), Some(&401), "{refused:?}");
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        match svc.resolve_fresh(&started.secret).await {
            Ok(_) => panic!("a request was served from a session the server no longer has"),
            Err(e) => outcomes.push(e.http_status()),
        }
        if outcomes.last() == Some(&401) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        outcomes.last(),
        Some(&401),
        "after reconnecting, the lost session is unknown: {outcomes:?}"
    );
    // The store recovers: a new session, with its start event, on the emptied server.
    let again = svc
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "After the restart"),
        )
        .await
        .unwrap();
    assert!(svc.resolve(&again.secret).await.is_ok());
    let chain = ChainKey::for_agent(&agent.id);
    let events = whole_chain(&store, &chain).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].session, Some(again.session.id));
    assert!(svc.verify_chain(&chain).await.unwrap().is_ok());
    let _ = Error::Unauthenticated;
}

/// A reply slower than the client's response timeout (500 ms; here the
/// server holds writes back for 700 ms, as a slow `fsync` would) is not
/// taken for a failed write: the call goes again, and the server answers
/// it as it did the first (the start's listing writes set what they set;
/// a script finds its call landed), so a start and an append each come
/// back done, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_slower_than_the_timeout_is_not_a_failed_write() {
    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let store = common::store_at(&server.url(), &ns).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    // Writes held back for 700 ms, as a slow `fsync` would.
    let conn = admin(&server).await;
    let hold_writes = || async {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(700)
            .arg("WRITE")
            .query_async(&mut conn.clone())
            .await
            .unwrap();
    };
    hold_writes().await;
    let outcome = store
        .start(w.begin(&agent, &customer, epoch()).0)
        .await
        .expect("a slow reply is not a failure");
    let StartOutcome::Started { session, .. } = outcome else {
        panic!("{outcome:?}");
    };
    // And an append, whose script goes out first (its chain is listed).
    hold_writes().await;
    let access = session.draft(epoch(), AuditAction::Access, Actor::System);
    store
        .append(
            access,
            impersonation_core::AppendGuard::SessionActive(session.id),
        )
        .await
        .expect("a slow reply is not a failure");
    let events = whole_chain(&store, &session.chain()).await;
    assert_eq!(
        events.iter().map(|e| e.action).collect::<Vec<_>>(),
        [AuditAction::SessionStarted, AuditAction::Access]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_is_checked_at_start_up() {
    let server = OwnServer::start();
    let config = || {
        RedisConfig::new(&server.url())
            .unwrap()
            .namespace(&common::unique("imptest"))
            .unwrap()
    };
    let lax = RedisStore::connect(config()).await.unwrap();
    assert_eq!(
        lax.durability().durable(),
        Some(false),
        "--save '' --appendonly no keeps nothing"
    );
    assert!(matches!(
        RedisStore::connect(config().require_durability()).await,
        Err(RedisStoreError::NotDurable(_))
    ));
    let mut conn = admin(&server).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("yes")
        .query_async(&mut conn)
        .await
        .unwrap();
    let strict = RedisStore::connect(config().require_durability())
        .await
        .unwrap();
    assert_eq!(strict.durability().durable(), Some(true));
    assert_eq!(strict.durability().evicts, [Some(false)]);

    // On disk, but a server that evicts keys when full (a limit and an
    // evicting policy) can still lose the trail; a limit that refuses
    // writes instead does not.
    let set = |name: &'static str, value: &'static str| {
        let mut conn = conn.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    set("maxmemory", "1gb").await;
    set("maxmemory-policy", "volatile-lru").await;
    let evicting = RedisStore::connect(config()).await.unwrap();
    assert_eq!(evicting.durability().evicts, [Some(true)]);
    assert_eq!(evicting.durability().durable(), Some(false));
    assert!(matches!(
        RedisStore::connect(config().require_durability()).await,
        Err(RedisStoreError::NotDurable(_))
    ));
    set("maxmemory-policy", "noeviction").await;
    let strict = RedisStore::connect(config().require_durability())
        .await
        .unwrap();
    assert_eq!(strict.durability().durable(), Some(true));
}

/// A store on `server` in namespace `ns` that keeps ended sessions for
/// `retention`.
async fn retaining(server: &OwnServer, ns: &str, retention: time::Duration) -> RedisStore {
    let config = RedisConfig::new(&server.url())
        .unwrap()
        .namespace(ns)
        .unwrap()
        .retention(retention)
        .unwrap();
    RedisStore::connect(config).await.unwrap()
}

/// Every key of namespace `ns`, with its PTTL (-1: none).
async fn key_ttls(server: &OwnServer, ns: &str) -> Vec<(String, i64)> {
    let mut conn = admin(server).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut ttls = Vec::with_capacity(keys.len());
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        ttls.push((key, ttl));
    }
    ttls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keys_expire_by_ttl_beside_the_cores_own_check() {
    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let store = retaining(&server, &ns, time::Duration::minutes(5)).await;
    let w = World::new();
    let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let StartOutcome::Started { session, .. } = store.start(start).await.unwrap() else {
        panic!("refused")
    };
    let keys = key_ttls(&server, &ns).await;
    let expected = (session.expires_at - session.created_at + time::Duration::minutes(5))
        .whole_milliseconds() as i64;
    let mut timed = 0;
    for (key, ttl) in &keys {
        if key.contains(":s:")
            || key.contains(":k:")
            || key.ends_with(":live")
            || key.contains(":where:")
        {
            assert!(
                *ttl > expected - 5_000 && *ttl <= expected,
                "{key}: PTTL {ttl}, expected about {expected}"
            );
            timed += 1;
        } else {
            assert_eq!(
                *ttl, -1,
                "{key}: the audit trail and its views never expire"
            );
        }
    }
    assert_eq!(timed, 4, "session, secret, live and where keys: {keys:?}");
}

/// A session started pending consent and activated later lives longer than
/// its start gave its keys: the key that finds it by id (`where`) is
/// extended with the others, or `session(id)` (revoke, stop by id, the
/// policy re-check) would lose it while it is still in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activating_a_session_extends_the_key_that_finds_it_by_id() {
    use impersonation_core::{Consent, Policy};

    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let retention = time::Duration::minutes(5);
    let store = retaining(&server, &ns, retention).await;
    let w = World::new();
    let policy = Policy::default().consent(Consent::Required {
        timeout: time::Duration::minutes(10),
    });
    let (start, _) = w.begin_with(&policy, &w.agent(1), &w.customer(1, "t1"), epoch());
    let StartOutcome::Started { session, .. } = store.start(start).await.unwrap() else {
        panic!("refused")
    };
    let activated_at = epoch() + time::Duration::minutes(9);
    let activation = session.activate(Actor::System, activated_at).unwrap();
    let (active, _) = store.transition(activation).await.unwrap();
    let expected = (active.expires_at - activated_at + retention).whole_milliseconds() as i64;

    let keys = key_ttls(&server, &ns).await;
    let mut timed = 0;
    for (key, ttl) in keys
        .iter()
        .filter(|(k, _)| k.contains(":s:") || k.contains(":where:"))
    {
        assert!(
            *ttl > expected - 5_000 && *ttl <= expected,
            "{key}: PTTL {ttl}, expected about {expected}"
        );
        timed += 1;
    }
    assert_eq!(timed, 2, "session and where keys: {keys:?}");
    assert_eq!(store.session(active.id).await.unwrap(), Some(active));
}

/// The write that extends the `where` key after an activation follows the
/// committed script and may fail; the key then runs out with the start's
/// shorter expiry while the session is still in use. Finding the session
/// by id must not fail open (a revocation that finds nothing leaves the
/// agent impersonating): a live session is looked up in the live routes
/// and its key put back. A user the server lets write everything but the
/// `where` keys stands in for a connection lost right after the script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_whose_route_key_ran_out_is_still_found_and_revoked() {
    use impersonation_core::{Consent, Policy};

    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let retention = time::Duration::minutes(5);
    let mut conn = admin(&server).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("nowhere")
        .arg("on")
        .arg(">nowhere-password")
        .arg(format!("~{ns}:{{*"))
        .arg(format!("~{ns}:live:*"))
        .arg(format!("~{ns}:audit:*"))
        .arg(format!("~{ns}:chains"))
        .arg("+@all")
        .query_async(&mut conn)
        .await
        .unwrap();
    let store = retaining(&server, &ns, retention).await;
    let limited = RedisStore::connect(
        RedisConfig::new(&format!(
            "redis://nowhere:nowhere-password@127.0.0.1:{}",
            server.port
        ))
        .unwrap()
        .namespace(&ns)
        .unwrap()
        .retention(retention)
        .unwrap(),
    )
    .await
    .unwrap();

    let w = World::new();
    let policy = Policy::default().consent(Consent::Required {
        timeout: time::Duration::minutes(10),
    });
    // On the wall clock: the key put back lives from now.
    let started_at = time::OffsetDateTime::now_utc();
    let (start, _) = w.begin_with(&policy, &w.agent(1), &w.customer(1, "t1"), started_at);
    let StartOutcome::Started { session, .. } = store.start(start).await.unwrap() else {
        panic!("refused")
    };
    let where_key = format!("{ns}:where:{}", session.id);
    let pttl = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut c = redis::cmd("PTTL");
        c.arg(&where_key);
        let conn = conn.clone();
        async move {
            let mut conn = conn;
            c.query_async::<i64>(&mut conn).await.unwrap()
        }
    };
    let started_ttl = pttl(&mut conn).await;
    let activated_at = started_at;
    let activation = session.activate(Actor::System, activated_at).unwrap();
    let (active, _) = limited.transition(activation).await.unwrap();
    assert_eq!(
        pttl(&mut conn).await / 1000,
        started_ttl / 1000,
        "the limited user could not extend the where key"
    );

    // Its start's expiry runs out while the session is live.
    let removed: u32 = redis::cmd("DEL")
        .arg(&where_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert_eq!(
        store.session(active.id).await.unwrap(),
        Some(active.clone())
    );
    let expected = (active.expires_at - activated_at + retention).whole_milliseconds() as i64;
    let ttl = pttl(&mut conn).await;
    assert!(
        ttl > expected - 5_000 && ttl <= expected,
        "the where key is put back to live as long as the session: PTTL {ttl}, expected about {expected}"
    );

    // And a revocation by id (`Impersonation::revoke` reads the session
    // by id, then ends it) ends it.
    redis::cmd("DEL")
        .arg(&where_key)
        .query_async::<u32>(&mut conn)
        .await
        .unwrap();
    let found = store.session(active.id).await.unwrap().unwrap();
    let revocation = found
        .end(
            EndReason::Revoked,
            Actor::System,
            activated_at,
            Details::new(),
        )
        .unwrap();
    let (ended, _) = store.transition(revocation).await.unwrap();
    assert!(!ended.state.is_live());
    // Read before any listing, which drops a stale entry itself.
    let routes: u32 = redis::cmd("HLEN")
        .arg(format!("{ns}:live:routes"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(routes, 0, "an ended session leaves the live routes");
    assert!(
        store
            .live_sessions(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );

    // A session started before the live routes existed (its entry
    // missing) is listed there again by `rebuild_indexes`.
    let w2 = World::new();
    let (start, _) = w2.begin(&w2.agent(1), &w2.customer(1, "t1"), started_at);
    let StartOutcome::Started { session: older, .. } = store.start(start).await.unwrap() else {
        panic!("refused")
    };
    for (cmd, key) in [
        ("HDEL", format!("{ns}:live:routes")),
        ("DEL", format!("{ns}:where:{}", older.id)),
    ] {
        let mut c = redis::cmd(cmd);
        c.arg(&key);
        if cmd == "HDEL" {
            c.arg(older.id.to_string());
        }
        let removed: u32 = c.query_async(&mut conn).await.unwrap();
        assert_eq!(removed, 1, "{cmd} {key}");
    }
    assert_eq!(store.session(older.id).await.unwrap(), None, "lost");
    store.rebuild_indexes(&[]).await.unwrap();
    assert_eq!(
        store.session(older.id).await.unwrap().map(|s| s.id),
        Some(older.id)
    );

    // An id nobody knows costs two lookups, whatever the number of live
    // sessions: no scan.
    let before = commandstats(&mut conn).await;
    let unknown = impersonation_core::SessionId::new();
    assert_eq!(store.session(unknown).await.unwrap(), None);
    let after = commandstats(&mut conn).await;
    assert_eq!(
        delta(&before, &after),
        BTreeMap::from([("get".to_owned(), 1), ("hget".to_owned(), 1)])
    );
}

/// Stores in namespace `ns` on `server`: one as a user the server lets
/// write everything but the audit views (the chains, sessions, routes and
/// live sets, not the views, `ns:audit:…`), and one with every key.
async fn without_views(server: &OwnServer, ns: &str) -> (RedisStore, RedisStore) {
    without_views_but(server, ns, &[]).await
}

/// [`without_views`], the user also let write the keys `also` names.
async fn without_views_but(
    server: &OwnServer,
    ns: &str,
    also: &[String],
) -> (RedisStore, RedisStore) {
    let mut conn = admin(server).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("noviews")
        .arg("on")
        .arg(">noviews-password")
        .arg(format!("~{ns}:{{*"))
        .arg(format!("~{ns}:where:*"))
        .arg(format!("~{ns}:live:*"))
        .arg(format!("~{ns}:chains"))
        .arg(also.iter().map(|k| format!("~{k}")).collect::<Vec<_>>())
        .arg("+@all")
        .query_async(&mut conn)
        .await
        .unwrap();
    let store = |url: String| async move {
        RedisStore::connect(RedisConfig::new(&url).unwrap().namespace(ns).unwrap())
            .await
            .unwrap()
    };
    let limited = store(format!(
        "redis://noviews:noviews-password@127.0.0.1:{}",
        server.port
    ))
    .await;
    (limited, store(server.url()).await)
}

/// Agent 1 of a fresh world starts impersonating customer 1 on `store`,
/// records an access and stops: three events, each written through
/// `store`. The session, ended.
async fn start_access_stop(store: &RedisStore) -> impersonation_core::Session {
    use impersonation_core::AppendGuard;
    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let StartOutcome::Started { session, .. } = store.start(start).await.unwrap() else {
        panic!("refused");
    };
    let access = session.draft(
        epoch(),
        AuditAction::Access,
        Actor::user(agent.id.clone(), "Agent 1"),
    );
    store
        .append(access, AppendGuard::SessionActive(session.id))
        .await
        .unwrap();
    let stop = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    let (ended, _) = store.transition(stop).await.unwrap();
    assert!(!ended.state.is_live());
    ended
}

/// A write after a committed script (views, live sets, the route key) that
/// fails does not make the change a failure: a start would lose its
/// secret while its session blocks the agent, an append would be sent
/// again and written twice. The change stands and the views are rebuilt
/// from the chain. A user the server lets write everything but the audit
/// views stands in for a connection lost right after the script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_write_that_fails_after_its_script_does_not_fail_the_change() {
    use impersonation_core::AuditQuery;
    use impersonation_testkit::conformance::all_events;

    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let (limited, whole) = without_views(&server, &ns).await;

    let session = start_access_stop(&limited).await;

    // All three are on the chain, each once; the views list none of them
    // until they are rebuilt from it.
    let chain = whole_chain(&whole, &session.chain()).await;
    let actions: Vec<AuditAction> = chain.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            AuditAction::SessionStarted,
            AuditAction::Access,
            AuditAction::SessionEnded
        ]
    );
    let by_session = || AuditQuery {
        session: Some(session.id),
        ..AuditQuery::default()
    };
    assert!(all_events(&whole, by_session()).await.is_empty());
    // The chain verifies, and `verify_all` (the listing of every event)
    // and `verify_listing` for the session (a view of its own) say the
    // listing hides it.
    let service = Impersonation::new(whole.clone(), MemoryDirectory::new());
    let listings = [AuditQuery::default(), by_session()];
    for query in &listings {
        let report = service.verify_listing(query).await.unwrap();
        assert!(report.broken.is_empty(), "{report:?}");
        assert_eq!(
            report.listing,
            [impersonation_core::ListingMismatch::Count {
                chain: session.chain(),
                chained: 3,
                listed: 0
            }],
            "{query:?}"
        );
        assert!(!report.is_ok());
    }
    assert_eq!(whole.rebuild_indexes(&[session.chain()]).await.unwrap(), 3);
    assert_eq!(all_events(&whole, by_session()).await, chain);
    for query in &listings {
        let report = service.verify_listing(query).await.unwrap();
        assert!(report.is_ok(), "{query:?}: {report:?}");
        assert_eq!((report.events(), report.selected), (3, 3), "{query:?}");
    }
}

/// A chain the list of chains leaves out (its `ns:chains` entry taken
/// away by someone with the database) is never verified by `verify_all`
/// alone; the listing shows its events, and the report says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_all_reports_a_listed_chain_the_list_of_chains_leaves_out() {
    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let (_, store) = without_views(&server, &ns).await;
    let session = start_access_stop(&store).await;
    let service = Impersonation::new(store.clone(), MemoryDirectory::new());
    let report = service.verify_all().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.events(), 3);

    let mut conn = admin(&server).await;
    let removed: u32 = redis::cmd("ZREM")
        .arg(format!("{ns}:chains"))
        .arg(session.chain().as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let report = service.verify_all().await.unwrap();
    assert!(report.verified.is_empty() && report.broken.is_empty());
    assert_eq!(
        report.listing,
        [impersonation_core::ListingMismatch::UnlistedChain {
            chain: session.chain(),
            listed: 3
        }]
    );
    assert!(!report.is_ok());
}

/// When the views cannot be written after a committed script but the
/// chain can be marked for them, the next `audit` rebuilds the marked
/// chain's views before it reads: the events are found without anyone
/// running `rebuild_indexes` (before, they were missing from every query
/// until then, with no error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_that_failed_are_rebuilt_by_the_next_audit_read() {
    use impersonation_core::AuditQuery;
    use impersonation_testkit::conformance::all_events;

    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let stale = format!("{ns}:views:stale");
    let (limited, whole) = without_views_but(&server, &ns, std::slice::from_ref(&stale)).await;

    let w = World::new();
    let session = start_access_stop(&limited).await;

    let mut conn = admin(&server).await;
    let marked: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&stale)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(marked.len(), 1, "{marked:?}");
    assert_eq!(marked[0].0, session.chain().as_str());
    assert!(
        marked[0].1.starts_with("0|"),
        "from the start's place: {marked:?}"
    );
    let by_session = || AuditQuery {
        session: Some(session.id),
        ..AuditQuery::default()
    };
    let chain = whole_chain(&whole, &session.chain()).await;
    assert_eq!(chain.len(), 3);
    assert_eq!(all_events(&whole, by_session()).await, chain);
    let left: i64 = redis::cmd("HLEN")
        .arg(&stale)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "the mark is taken once the views are back");

    // A marked chain whose views cannot be rebuilt (its stream damaged)
    // keeps its mark, and fails no read of the rest of the trail.
    let other = impersonation_core::ChainKey::for_agent(&w.agent(2).id);
    let stream = format!("{}:chain", common::agent_keys(&ns, &other));
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(&stream)
        .arg("not a stream")
        .cmd("HSET")
        .arg(&stale)
        .arg(other.as_str())
        .arg("0|n")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(all_events(&whole, by_session()).await, chain);
    let kept: Option<String> = redis::cmd("HGET")
        .arg(&stale)
        .arg(other.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some("0|n"));
}

/// An append refused for its ended session is answered as refused even
/// when its attempt's view entries cannot be taken back: the service
/// records a change made meanwhile after the end on that answer, and an
/// outage would leave the change off the trail. The user the server lets
/// write everything but the audit views stands in for a shard of the
/// views failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_append_is_a_refusal_even_when_its_views_cannot_be_taken_back() {
    use impersonation_core::{AppendGuard, StoreError};

    let server = OwnServer::start();
    let ns = common::unique("imptest");
    let (limited, _) = without_views(&server, &ns).await;

    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let StartOutcome::Started { session, .. } = limited.start(start).await.unwrap() else {
        panic!("refused");
    };
    let stop = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    limited.transition(stop).await.unwrap();
    let change = session.draft(
        epoch(),
        AuditAction::Modification,
        Actor::user(agent.id.clone(), "Agent 1"),
    );
    let refused = limited
        .append(change, AppendGuard::SessionActive(session.id))
        .await;
    assert!(
        matches!(refused, Err(StoreError::SessionNotActive(id)) if id == session.id),
        "{refused:?}"
    );
    let actions: Vec<AuditAction> = whole_chain(&limited, &session.chain())
        .await
        .iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [AuditAction::SessionStarted, AuditAction::SessionEnded]
    );
}

/// A start whose event cannot be written (here: the chain head evicted, so
/// the event's stream id is taken) writes nothing else either. Redis does
/// not undo a script's earlier writes when a later one fails, so the event
/// goes first: no live session without its start event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_event_cannot_be_written_leaves_no_session() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let StartOutcome::Started { session, .. } = store.start(start).await.unwrap() else {
        panic!("refused");
    };
    let stop = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    store.transition(stop).await.unwrap();
    let chain = session.chain();
    let head = format!("{}:head", common::agent_keys(&ns, &chain));
    let mut conn = common::raw(common::SINGLE).await;
    let removed: u32 = redis::cmd("DEL")
        .arg(&head)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1, "the head key is {head}");

    // A fresh process (no cached head) reads no head, seals the start as
    // the chain's first event, and its stream id is taken.
    let fresh = common::store_at(common::SINGLE, &ns).await;
    let (start, _) = w.begin(&agent, &w.customer(2, "t1"), epoch());
    let id = start.session().id;
    assert!(fresh.start(start).await.is_err());
    assert_eq!(fresh.session(id).await.unwrap(), None, "no session");
    let live = impersonation_core::LiveFilter {
        agent: Some(agent.id.clone()),
        ..impersonation_core::LiveFilter::default()
    };
    assert!(fresh.live_sessions(&live).await.unwrap().is_empty());
    assert_eq!(
        whole_chain(&fresh, &chain).await.len(),
        2,
        "start and stop only"
    );
}
