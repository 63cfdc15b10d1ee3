//! Hash slots on the cluster, namespaces, and racing starts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use impersonation_core::{
    Activity, Actor, AppendGuard, AuditAction, AuditQuery, ChainKey, Denial, Details, EndReason,
    Error, Impersonation, LiveFilter, MemoryDirectory, Principal, Requester, StartRequest, Store,
    StoreError,
};
use impersonation_redis::RedisStore;
use impersonation_testkit::conformance::{
    all_events, assert_chain_verifies, must_start, whole_chain,
};
use impersonation_testkit::{World, epoch};

fn service(
    world: &World,
    store: RedisStore,
    people: &[Principal],
) -> Impersonation<RedisStore, MemoryDirectory> {
    let directory = MemoryDirectory::new();
    for p in people {
        directory.insert(p.clone());
    }
    Impersonation::new(store, directory).with_projection(world.rules.clone())
}

async fn node(port: u16) -> redis::aio::MultiplexedConnection {
    common::raw(&format!("redis://127.0.0.1:{port}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_an_agent_lives_in_the_agents_slot() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::CLUSTER, &ns).await;
    let w = World::new();
    let agents: Vec<Principal> = (0..6).map(|n| w.agent(n)).collect();
    let customer = w.customer(1, "t1");
    let mut people = agents.clone();
    people.push(customer.clone());
    let svc = service(&w, store, &people);
    for agent in &agents {
        let started = svc
            .start(
                Requester::User(agent),
                StartRequest::new(customer.id.clone(), "Checking slots"),
            )
            .await
            .unwrap();
        let ctx = svc.resolve(&started.secret).await.unwrap();
        svc.record(&ctx, Activity::access("Viewed.")).await.unwrap();
        svc.stop(&started.secret, agent).await.unwrap();
    }
    // Every key written, from every node, by its hash tag.
    let mut by_tag: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut untagged = 0;
    for port in [7001, 7002, 7003] {
        let mut conn = node(port).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{ns}:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        for key in keys {
            match key
                .split_once('{')
                .and_then(|(_, rest)| rest.split_once('}'))
            {
                Some((tag, _)) => {
                    by_tag.entry(tag.to_owned()).or_default().insert(key);
                }
                None => untagged += 1,
            }
        }
    }
    assert_eq!(by_tag.len(), agents.len(), "one tag per agent");
    assert!(
        untagged > 0,
        "the derived views live outside the agents' slots"
    );
    let mut conn = node(7001).await;
    for agent in &agents {
        let route = ChainKey::for_agent(&agent.id).route();
        let keys = by_tag
            .get(&route)
            .expect("the agent's keys are tagged with its route");
        let expected: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{{{route}}}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let kinds: BTreeSet<&str> = keys.iter().filter_map(|k| k.rsplit(':').next()).collect();
        assert!(
            kinds.contains("head") && kinds.contains("chain"),
            "{keys:?}"
        );
        for key in keys {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(slot, expected, "{key} is outside the agent's slot");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_with_different_namespaces_never_see_each_other() {
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let a = common::single().await;
    let b = common::single().await;
    let svc_a = service(&w, a.clone(), &[agent.clone(), customer.clone()]);
    let svc_b = service(&w, b.clone(), &[agent.clone(), customer.clone()]);
    let started = svc_a
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Namespace A"),
        )
        .await
        .unwrap();
    let ctx = svc_a.resolve(&started.secret).await.unwrap();
    svc_a
        .record(&ctx, Activity::access("Viewed."))
        .await
        .unwrap();

    assert!(matches!(
        svc_b.resolve(&started.secret).await,
        Err(Error::Unauthenticated)
    ));
    assert!(b.session(started.session.id).await.unwrap().is_none());
    assert!(
        b.live_sessions(&LiveFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        b.live_sessions(&LiveFilter {
            agent: Some(agent.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty()
    );
    assert!(all_events(&b, AuditQuery::default()).await.is_empty());
    assert!(b.chains(None, 100).await.unwrap().is_empty());
    // The same agent starts in B as if A did not exist.
    let other = svc_b
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Namespace B"),
        )
        .await
        .unwrap();
    assert_ne!(other.session.id, started.session.id);
    assert_eq!(all_events(&a, AuditQuery::default()).await.len(), 2);
    assert_eq!(all_events(&b, AuditQuery::default()).await.len(), 1);
}

/// 64 concurrent starts by one agent, each through a store instance of its
/// own (own connection, own head cache): as 64 processes would race.
async fn racing_starts(url: &str) {
    let ns = common::unique("imptest");
    let w = World::new();
    let agent = w.agent(1);
    let customers: Vec<Principal> = (0..64).map(|n| w.customer(n, "t1")).collect();
    let mut people = customers.clone();
    people.push(agent.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for c in &customers {
        let svc = service(&w, common::store_at(url, &ns).await, &people);
        let (agent, target) = (agent.clone(), c.id.clone());
        tasks.spawn(async move {
            svc.start(
                Requester::User(&agent),
                StartRequest::new(target, "Racing to help"),
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
    let store = common::store_at(url, &ns).await;
    let live = store
        .live_sessions(&LiveFilter {
            agent: Some(agent.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    let chain = ChainKey::for_agent(&agent.id);
    assert_eq!(
        whole_chain(&store, &chain).await.len(),
        64,
        "every attempt audited"
    );
    let svc = service(&w, store, &people);
    assert_eq!(svc.verify_chain(&chain).await.unwrap().unwrap().events, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_starts_on_redis_leave_one_live_session() {
    racing_starts(common::SINGLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_starts_on_the_cluster_leave_one_live_session() {
    racing_starts(common::CLUSTER).await;
}

/// Four store instances (four head caches, as four processes) append
/// batches to one agent's chain at once: every loser of a compare-and-set
/// reseals its batch on the head that won, and no event is lost or placed
/// twice.
async fn racing_appends(url: &str) {
    let ns = common::unique("imptest");
    let w = World::new();
    let agent = w.agent(1);
    let first = common::store_at(url, &ns).await;
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&first, start).await;
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..4_i64 {
        let store = common::store_at(url, &ns).await;
        let (session, agent) = (session.clone(), agent.clone());
        tasks.spawn(async move {
            for b in 0..10_i64 {
                let batch = (0..4_i64)
                    .map(|i| {
                        let draft = session
                            .draft(
                                epoch(),
                                AuditAction::Access,
                                Actor::user(agent.id.clone(), "Agent 1"),
                            )
                            .details(Details::new().with("p", p).with("n", b * 4 + i));
                        (draft, AppendGuard::SessionActive(session.id))
                    })
                    .collect();
                for result in store.append_batch(batch).await {
                    result.unwrap();
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let chain = whole_chain(&first, &session.chain()).await;
    assert_eq!(assert_chain_verifies(&first, &session.chain()).await, 161);
    let written: BTreeSet<(&str, &str)> = chain
        .iter()
        .skip(1)
        .map(|e| (e.details.get("p").unwrap(), e.details.get("n").unwrap()))
        .collect();
    assert_eq!(written.len(), 160, "each event once");
    // The views went out with each attempt; those of attempts that lost
    // the race were taken back: the session's view lists each event once,
    // in entries whose first event is the one they name.
    let key = format!("{ns}:audit:session:{}", session.id);
    let members: Vec<String> = if url == common::SINGLE {
        redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut node(6379).await)
            .await
            .unwrap()
    } else {
        let client = redis::cluster::ClusterClient::new(vec![
            "redis://127.0.0.1:7001",
            "redis://127.0.0.1:7002",
            "redis://127.0.0.1:7003",
        ])
        .unwrap();
        let mut conn = client.get_async_connection().await.unwrap();
        redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    let mut listed: Vec<u64> = Vec::new();
    for member in &members {
        let parts: Vec<&str> = member.splitn(4, '|').collect();
        let (first, last): (u64, u64) = (parts[0].parse().unwrap(), parts[1].parse().unwrap());
        assert_eq!(
            chain[first as usize].id.to_string(),
            parts[2],
            "entry {member} names the event at its place"
        );
        listed.extend(first..=last);
    }
    listed.sort_unstable();
    assert_eq!(
        listed,
        (0..chain.len() as u64).collect::<Vec<_>>(),
        "no entry left behind by a lost race, and every event listed once"
    );
    let viewed = all_events(
        &first,
        AuditQuery {
            session: Some(session.id),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(viewed.len(), chain.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appends_on_redis_are_resealed_not_lost() {
    racing_appends(common::SINGLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appends_on_the_cluster_are_resealed_not_lost() {
    racing_appends(common::CLUSTER).await;
}

/// A batch whose middle event is refused (its session ended): the events
/// after it move up into its place, and the chain stays gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_in_a_batch_leaves_no_gap() {
    let store = common::single().await;
    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let (ended, _) = must_start(&store, start).await;
    let stop = ended
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    store.transition(stop).await.unwrap();
    let (start, _) = w.begin(&agent, &w.customer(2, "t1"), epoch());
    let (live, _) = must_start(&store, start).await;
    let access = |s: &impersonation_core::Session| {
        (
            s.draft(
                epoch(),
                AuditAction::Access,
                Actor::user(agent.id.clone(), "Agent 1"),
            ),
            AppendGuard::SessionActive(s.id),
        )
    };
    // Each session guards more than one event, and one event is unguarded.
    let (unguarded, _) = access(&live);
    let results = store
        .append_batch(vec![
            access(&live),
            access(&ended),
            access(&live),
            access(&ended),
            (unguarded, AppendGuard::None),
        ])
        .await;
    assert_eq!(results.len(), 5);
    let (a, c, e) = (
        results[0].as_ref().unwrap(),
        results[2].as_ref().unwrap(),
        results[4].as_ref().unwrap(),
    );
    assert!(matches!(results[1], Err(StoreError::SessionNotActive(_))));
    assert!(matches!(results[3], Err(StoreError::SessionNotActive(_))));
    assert_eq!((a.seq, c.seq, e.seq), (3, 4, 5));
    assert_eq!(c.prev_hash, a.hash);
    assert_eq!(e.prev_hash, c.hash);
    assert_eq!(assert_chain_verifies(&store, &live.chain()).await, 6);
}

/// A view written before entries listed runs (`event-id|seq|route|chain`,
/// one event each) still reads back every event, beside entries of today.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_written_one_event_per_entry_still_read() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let (live, _) = must_start(&store, start).await;
    let access = |i: i64| {
        (
            live.draft(
                epoch() + time::Duration::seconds(i),
                AuditAction::Access,
                Actor::user(agent.id.clone(), "Agent 1"),
            ),
            AppendGuard::SessionActive(live.id),
        )
    };
    for result in store.append_batch((1..=4).map(access).collect()).await {
        result.unwrap();
    }
    let chain = whole_chain(&store, &live.chain()).await;
    // The session's view as the earlier form wrote it.
    let key = format!("{ns}:audit:session:{}", live.id);
    let mut conn = node(6379).await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    for event in &chain {
        let member = format!(
            "{}|{}|{}|{}",
            event.id,
            event.seq,
            event.chain.route(),
            event.chain.as_str()
        );
        let _: () = redis::cmd("ZADD")
            .arg(&key)
            .arg(event.at.unix_timestamp_nanos() / 1_000)
            .arg(member)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for result in store.append_batch(vec![access(5)]).await {
        result.unwrap();
    }
    let viewed = all_events(
        &store,
        AuditQuery {
            session: Some(live.id),
            ..AuditQuery::default()
        },
    )
    .await;
    let want = whole_chain(&store, &live.chain()).await;
    assert_eq!(want.len(), chain.len() + 1);
    assert_eq!(
        viewed, want,
        "every event once: the earlier entries and the new one"
    );
}

/// A start lists its session in the live sets before its script writes the
/// session. A read of the live sessions in between must leave that entry
/// alone: if it dropped it, the session would come to exist unlisted, and
/// a revocation of all of the customer's sessions would miss it. An entry
/// whose session never came, long ago, is dropped.
#[tokio::test]
async fn a_session_listed_before_it_exists_stays_listed() {
    use impersonation_core::{SessionId, UserId};

    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let set = format!("{ns}:live:subject:olive");
    let starting = format!("r|{}", SessionId::new());
    let long_ago = uuid::Builder::from_unix_timestamp_millis(1_600_000_000_000, &[7; 10]);
    let never_came = format!("r|{}", SessionId::from_uuid(long_ago.into_uuid()));
    let mut conn = common::raw(common::SINGLE).await;
    let _: () = redis::cmd("SADD")
        .arg(&set)
        .arg(&starting)
        .arg(&never_came)
        .query_async(&mut conn)
        .await
        .unwrap();

    let filter = LiveFilter {
        subject: Some(UserId::new("olive").unwrap()),
        ..LiveFilter::default()
    };
    assert!(store.live_sessions(&filter).await.unwrap().is_empty());
    let left: BTreeSet<String> = redis::cmd("SMEMBERS")
        .arg(&set)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, BTreeSet::from([starting]));
}

/// Two stores on one namespace, each with its own cached head (two
/// processes), and a session of agent 1 that the second one started: its
/// cached head is the start's.
async fn two_processes() -> (
    RedisStore,
    RedisStore,
    World,
    Principal,
    impersonation_core::Session,
) {
    let ns = common::unique("imptest");
    let first = common::store_at(common::SINGLE, &ns).await;
    let again = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&again, start).await;
    (first, again, w, agent, session)
}

/// The cluster client sends a call again when its connection drops, also
/// after the script ran and only the reply was lost; the second run then
/// finds the head the first one made. Two stores on one namespace play
/// that out: each has its own cached head, so the second one sends the
/// very call the first one already applied, sealed against the old head.
/// Every kind of write is taken as done, once: no event twice, a stop
/// not taken for a conflict, a start not refused by its own session.
#[tokio::test]
async fn a_write_sent_again_after_its_reply_was_lost_is_applied_once() {
    use impersonation_core::StartOutcome;

    let (first, again, w, agent, session) = two_processes().await;
    let chain = session.chain();

    let access = (
        session.draft(
            epoch(),
            AuditAction::Access,
            Actor::user(agent.id.clone(), "Agent 1"),
        ),
        AppendGuard::SessionActive(session.id),
    );
    let applied = first.append(access.0.clone(), access.1).await.unwrap();
    let resent = again.append(access.0, access.1).await.unwrap();
    assert_eq!(resent, applied);

    let stop = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    let (_, applied) = first.transition(stop.clone()).await.unwrap();
    let (ended, resent) = again.transition(stop).await.unwrap();
    assert_eq!(resent, applied);
    assert!(!ended.state.is_live());

    let (start, _) = w.begin(&agent, &w.customer(2, "t1"), epoch());
    let StartOutcome::Started { session: live, .. } = first.start(start.clone()).await.unwrap()
    else {
        panic!("the start is refused");
    };
    let StartOutcome::Started {
        session: resent, ..
    } = again.start(start).await.unwrap()
    else {
        panic!("the call sent again is refused by the session it started");
    };
    assert_eq!(resent.id, live.id);

    // A start refused (the agent has a live session), then sent again.
    let (start, _) = w.begin(&agent, &w.customer(3, "t1"), epoch());
    let refused = first.start(start.clone()).await.unwrap();
    let StartOutcome::Refused {
        live: in_the_way, ..
    } = refused
    else {
        panic!("a second live session");
    };
    assert_eq!(in_the_way, live.id);
    match again.start(start).await.unwrap() {
        StartOutcome::Refused {
            live: in_the_way, ..
        } => assert_eq!(in_the_way, live.id),
        StartOutcome::Started { .. } => panic!("a second live session"),
    }

    // start, access, stop, start, refusal: each once.
    assert_eq!(assert_chain_verifies(&first, &chain).await, 5);
    let ids: BTreeSet<String> = whole_chain(&first, &chain)
        .await
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(ids.len(), 5, "no event written twice");
    let listed = first
        .live_sessions(&LiveFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.agent.id == agent.id)
        .map(|s| s.id)
        .collect::<Vec<_>>();
    assert_eq!(listed, [live.id], "the live session is still listed");
}

/// As above, when other writes reached the chain between the call's first
/// run and its second: the second run finds the head moved past the call's
/// events, and the script finds the call's first event at its place, which
/// tells it that the call ran.
#[tokio::test]
async fn a_write_sent_again_after_others_followed_it_is_applied_once() {
    use impersonation_core::StartOutcome;

    let (first, again, w, agent, session) = two_processes().await;
    let chain = session.chain();
    let draft = |s: &impersonation_core::Session| {
        s.draft(
            epoch(),
            AuditAction::Access,
            Actor::user(agent.id.clone(), "Agent 1"),
        )
    };
    // Another write after each call's first run.
    let (access, other) = (draft(&session), draft(&session));
    let applied = first
        .append(access.clone(), AppendGuard::SessionActive(session.id))
        .await
        .unwrap();
    first.append(other, AppendGuard::None).await.unwrap();
    let resent = again
        .append(access, AppendGuard::SessionActive(session.id))
        .await
        .unwrap();
    assert_eq!(resent, applied);

    let stop = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    let (_, applied) = first.transition(stop.clone()).await.unwrap();
    first
        .append(draft(&session), AppendGuard::None)
        .await
        .unwrap();
    let (_, resent) = again.transition(stop).await.unwrap();
    assert_eq!(resent, applied);

    let (start, _) = w.begin(&agent, &w.customer(2, "t1"), epoch());
    let StartOutcome::Started { session: live, .. } = first.start(start.clone()).await.unwrap()
    else {
        panic!("the start is refused");
    };
    first.append(draft(&live), AppendGuard::None).await.unwrap();
    let StartOutcome::Started {
        session: resent, ..
    } = again.start(start).await.unwrap()
    else {
        panic!("the call sent again is refused by the session it started");
    };
    assert_eq!(resent.id, live.id);

    // start, access, other, stop, other, start, other: each once.
    assert_eq!(assert_chain_verifies(&first, &chain).await, 7);
    let ids: BTreeSet<String> = whole_chain(&first, &chain)
        .await
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(ids.len(), 7, "no event written twice");
}

/// The masters of the test cluster, as (id, port), and the id of the one
/// that serves `slot`, read from `CLUSTER NODES`.
async fn masters_and_owner(slot: u16) -> (Vec<(String, u16)>, String) {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut node(7001).await)
        .await
        .unwrap();
    let mut masters = Vec::new();
    let mut owner = None;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || !fields[2].contains("master") {
            continue;
        }
        let port: u16 = fields[1]
            .split(['@', ':'])
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap();
        let serves = fields[8..].iter().any(|range| {
            // `[…]` marks a slot in the middle of a move.
            let (from, to) = range.split_once('-').unwrap_or((range, range));
            match (from.parse::<u16>(), to.parse::<u16>()) {
                (Ok(from), Ok(to)) => (from..=to).contains(&slot),
                _ => false,
            }
        });
        if serves {
            owner = Some(fields[0].to_owned());
        }
        masters.push((fields[0].to_owned(), port));
    }
    (masters, owner.expect("a master serves every slot"))
}

/// One `MIGRATE` at a time in this test binary: a node blocks while it
/// migrates, waiting for the target's answer, so two tests migrating in
/// opposite directions between the same two nodes at once wait on each
/// other until `MIGRATE`'s own timeout (seen: both failed with `IOERR`).
static MIGRATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Moves `keys` from the node at `from` to the one at `to` (`MIGRATE`).
async fn migrate(from: &mut redis::aio::MultiplexedConnection, to: u16, keys: &[String]) {
    let _one_at_a_time = MIGRATING.lock().await;
    let _: () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(to)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(keys)
        .query_async(from)
        .await
        .unwrap();
}

/// A cluster in the middle of moving an agent's slot to another node
/// (resharding) has some of its keys on the new node and the rest on the
/// old one. A lookup whose session has gone ahead while its secret has not
/// must not answer that there is no such session: the layer would clear
/// the agent's cookie of a session that lives on, which would then stand
/// in the way of the agent's next one. Meanwhile it fails as an
/// unreachable store does (503, to be tried again: Redis 7 refuses the
/// resolve script's read of the session's key, which it no longer holds),
/// and once the slot has moved it finds the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_in_the_middle_of_a_slot_move_does_not_lose_the_session() {
    lookup_in_the_middle_of_a_slot_move(false).await;
}

/// As above, the other way round: the secret's key has gone ahead, the
/// session's has not. Redis sends the lookup to the new node (`ASK`),
/// where the session's key is not yet: there it must not read as no
/// session either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_whose_secret_moved_ahead_of_its_session_does_not_lose_it() {
    lookup_in_the_middle_of_a_slot_move(true).await;
}

/// Moves an agent's slot to another master key by key, the secret's key
/// first or the session's, and looks the session up between the two.
async fn lookup_in_the_middle_of_a_slot_move(secret_first: bool) {
    let ns = common::unique("imptest");
    let store = common::store_at(common::CLUSTER, &ns).await;
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let lookup = secret.lookup();
    let session_key = format!("{ns}:{{{}}}:s:{}", lookup.route, session.id);
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&session_key)
        .query_async(&mut node(7001).await)
        .await
        .unwrap();
    let (masters, owner) = masters_and_owner(slot).await;
    let source_port = masters.iter().find(|(id, _)| *id == owner).unwrap().1;
    let (target, target_port) = masters.iter().find(|(id, _)| *id != owner).unwrap().clone();
    let (mut source, mut dest) = (node(source_port).await, node(target_port).await);
    let set_slot = |state: &str, id: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
        cmd
    };
    let _: () = set_slot("IMPORTING", &owner)
        .query_async(&mut dest)
        .await
        .unwrap();
    let _: () = set_slot("MIGRATING", &target)
        .query_async(&mut source)
        .await
        .unwrap();
    // One of the two has gone ahead; the other has not.
    let secret_key = format!("{ns}:{{{}}}:k:{}", lookup.route, lookup.hash.to_hex());
    let ahead = if secret_first {
        secret_key
    } else {
        session_key
    };
    migrate(&mut source, target_port, std::slice::from_ref(&ahead)).await;
    let found = store.find_by_secret(&lookup, None).await;
    match &found {
        Ok(Some(s)) => assert_eq!(s.id, session.id),
        Ok(None) => panic!("a lookup in the middle of the move lost the session"),
        Err(e) => assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}"),
    }
    // The rest of the slot follows, and the slot is the target's.
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query_async(&mut source)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        migrate(&mut source, target_port, &keys).await;
    }
    let _: () = set_slot("NODE", &target)
        .query_async(&mut dest)
        .await
        .unwrap();
    for (_, port) in &masters {
        if *port != target_port {
            let _: () = set_slot("NODE", &target)
                .query_async(&mut node(*port).await)
                .await
                .unwrap();
        }
    }
    let found = store.find_by_secret(&lookup, None).await.unwrap();
    assert_eq!(found.map(|s| s.id), Some(session.id));
}
