//! What the chain stream holds, read raw: each event as its record (the
//! canonical JSON its hash covers, with the hashes added), so an event can
//! be checked against its hash from the stored text alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use impersonation_core::{
    Actor, AppendGuard, AuditAction, AuditEvent, Details, EndReason, Store, verify_chain,
};
use impersonation_testkit::conformance::{live_ids, must_start, whole_chain};
use impersonation_testkit::{World, epoch};
use time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_keeps_each_event_as_its_record() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (start, _) = w.begin(&agent, &customer, epoch());
    let (session, started) = must_start(&store, start).await;
    // A batch (the service's path under load), one of it refused by its
    // guard, and a single append; then the session ends.
    let access = |s: i64, what: &str| {
        session
            .draft(
                epoch() + Duration::seconds(s),
                AuditAction::Access,
                Actor::user(agent.id.clone(), "Agent \"1\" ✓"),
            )
            .details(Details::new().with("route", what))
    };
    let guard = AppendGuard::SessionActive(session.id);
    let ghost = AppendGuard::SessionActive(impersonation_core::SessionId::new());
    let results = store
        .append_batch(vec![
            (access(1, "/a"), guard),
            (access(2, "/b"), ghost),
            (access(3, "/c\u{1b}[31m"), guard),
        ])
        .await;
    assert!(results[1].is_err(), "the ghost session's event is refused");
    let single = store.append(access(4, "/d"), guard).await.unwrap();
    let stop = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    let (_, stopped) = store.transition(stop).await.unwrap();
    // Another process moves the head under this store's cached one: this
    // store's next batch is refused by the script's compare-and-set, and
    // resealed (place, hash and record) on the head the script reports.
    let other = common::store_at(common::SINGLE, &ns).await;
    let note = |s: i64| {
        session
            .draft(
                epoch() + Duration::seconds(s),
                AuditAction::Access,
                Actor::System,
            )
            .details(Details::new().with("note", "after the end"))
    };
    let elsewhere = other.append(note(5), AppendGuard::None).await.unwrap();
    let resealed = store
        .append_batch(vec![
            (note(6), AppendGuard::None),
            (note(7), AppendGuard::None),
        ])
        .await;
    let resealed: Vec<AuditEvent> = resealed.into_iter().map(Result::unwrap).collect();
    assert_eq!(resealed[0].prev_hash, elsewhere.hash);
    // What each call returned is what was stored.
    let mut returned = vec![
        started,
        results[0].clone().unwrap(),
        results[2].clone().unwrap(),
        single,
        stopped,
        elsewhere,
    ];
    returned.extend(resealed);

    let chain = session.chain();
    let events = whole_chain(&store, &chain).await;
    assert_eq!(events, returned, "start, three accesses, stop, three notes");
    let head = store.chain_head(&chain).await.unwrap();
    assert!(verify_chain(&chain, &events, head).is_ok());

    let key = format!("{}:chain", common::agent_keys(&ns, &chain));
    let mut raw = common::raw(common::SINGLE).await;
    let stream = common::stream_entries(&mut raw, &key).await;
    assert_eq!(stream.ids.len(), events.len());
    for (entry, event) in stream.ids.iter().zip(&events) {
        assert_eq!(entry.id, format!("0-{}", event.seq + 1));
        let stored: String = entry.get("e").expect("field e");
        assert_eq!(stored, event.to_record().unwrap());
        let read = AuditEvent::from_record(&stored).unwrap();
        assert_eq!(read.hash, read.compute_hash(), "seq {}", read.seq);
        assert_eq!(&read, event);
    }
}

/// The writes go out as `EVALSHA` of scripts the server is assumed to know.
/// A server that has forgotten them (`SCRIPT FLUSH`, or a restart with
/// persistence off, or a node new since a failover) answers `NOSCRIPT`;
/// the store runs the same call once more by the script's source
/// (`EVAL`), for the start, each append
/// (single and batched), the lookup, the policy re-check and the end, and
/// loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_forgot_the_scripts_gets_them_again() {
    let server = common::OwnServer::start();
    let store = common::store_at(&server.url(), &common::unique("imptest")).await;
    let mut raw = common::raw(&server.url()).await;
    let mut forget = async || {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw)
            .await
            .unwrap();
    };
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (start, secret) = w.begin(&agent, &customer, epoch());
    forget().await;
    let (session, started) = must_start(&store, start).await;
    let access = |s: i64| {
        session
            .draft(
                epoch() + Duration::seconds(s),
                AuditAction::Access,
                Actor::user(agent.id.clone(), "Agent 1"),
            )
            .details(Details::new().with("route", "/bookings"))
    };
    let guard = AppendGuard::SessionActive(session.id);
    forget().await;
    let single = store.append(access(1), guard).await.unwrap();
    forget().await;
    let batch: Vec<AuditEvent> = store
        .append_batch(vec![(access(2), guard), (access(3), guard)])
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    forget().await;
    let touch = impersonation_core::Touch {
        now: epoch() + Duration::seconds(30),
        coalesce: Duration::seconds(1),
    };
    let found = store
        .find_by_secret(&secret.lookup(), Some(touch))
        .await
        .unwrap();
    assert_eq!(found.map(|s| s.id), Some(session.id));
    forget().await;
    store
        .record_check(session.id, session.version, epoch(), &session.shadow)
        .await
        .unwrap();
    forget().await;
    let stop = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    let (_, stopped) = store.transition(stop).await.unwrap();

    let chain = session.chain();
    let events = whole_chain(&store, &chain).await;
    let mut expected = vec![started, single];
    expected.extend(batch);
    expected.push(stopped);
    assert_eq!(events, expected, "start, three accesses, stop");
    let head = store.chain_head(&chain).await.unwrap();
    assert!(verify_chain(&chain, &events, head).is_ok());
}

/// A session hash with some of its fields gone (a hand edit, a restore
/// gone wrong) is damage to report, not "no such session": a lookup by
/// secret and one by id both fail as corrupt, naming what is missing,
/// while the session's other keys stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_hash_missing_fields_is_reported_as_corrupt() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (start, secret) = w.begin(&agent, &customer, epoch());
    let (session, _) = must_start(&store, start).await;
    let mut raw = common::raw(common::SINGLE).await;
    let key = format!("{ns}:{{{}}}:s:{}", session.chain().route(), session.id);
    let touch = impersonation_core::Touch {
        now: epoch() + Duration::seconds(30),
        coalesce: Duration::seconds(1),
    };
    // One field the client decodes, then one only the scripts read.
    for (field, touched) in [("shadow", None), ("idle_us", Some(touch))] {
        let removed: u32 = redis::cmd("HDEL")
            .arg(&key)
            .arg(field)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(removed, 1, "{field} was stored");
        for found in [
            store.find_by_secret(&secret.lookup(), touched).await,
            store.session(session.id).await,
        ] {
            match found {
                Err(impersonation_core::StoreError::Corrupt(why)) => {
                    assert!(why.contains(field), "{why}");
                }
                other => panic!("without {field}: {other:?}"),
            }
        }
    }
    // Listings leave it out, and list the others: a revocation of all the
    // customer's sessions still reaches every other one.
    let (other, _) = w.begin(&w.agent(2), &customer, epoch());
    let (other, _) = must_start(&store, other).await;
    for filter in [
        impersonation_core::LiveFilter {
            subject: Some(customer.id.clone()),
            ..Default::default()
        },
        impersonation_core::LiveFilter::default(),
        impersonation_core::LiveFilter {
            agent: Some(agent.id.clone()),
            ..Default::default()
        },
    ] {
        let live = live_ids(&store, &filter).await;
        let expected = if filter.agent.is_some() {
            vec![]
        } else {
            vec![other.id]
        };
        assert_eq!(live, expected, "{filter:?}");
    }
    let seen: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg("last_seen_us")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        seen.as_deref(),
        Some(
            impersonation_core::unix_micros(session.last_seen_at)
                .to_string()
                .as_str()
        ),
        "a damaged session is not touched"
    );
}

/// A session hash whose fields only the scripts read hold something that
/// is not a number is damage too: reported as corrupt by every lookup,
/// touched or not (the script once failed on it, an outage), and left
/// out of listings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_hash_with_fields_not_numbers_is_reported_as_corrupt() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let customer = w.customer(1, "t1");
    let mut raw = common::raw(common::SINGLE).await;
    let touch = impersonation_core::Touch {
        now: epoch() + Duration::seconds(30),
        coalesce: Duration::seconds(1),
    };
    // Not numbers, or numbers the script's `tonumber` would take but the
    // client never writes.
    let damage = [
        ("expires_us", "soon"),
        ("idle_us", "1e6"),
        ("last_seen_us", " 12 "),
        ("expires_us", "0x1F"),
        ("idle_us", "+5"),
        ("last_seen_us", "+5"),
    ];
    for (n, (field, value)) in (1..).zip(damage) {
        let (start, secret) = w.begin(&w.agent(n), &customer, epoch());
        let (session, _) = must_start(&store, start).await;
        let key = format!("{ns}:{{{}}}:s:{}", session.chain().route(), session.id);
        let _: redis::Value = redis::cmd("HSET")
            .arg(&key)
            .arg(field)
            .arg(value)
            .query_async(&mut raw)
            .await
            .unwrap();
        for (how, found) in [
            (
                "touched",
                store.find_by_secret(&secret.lookup(), Some(touch)).await,
            ),
            (
                "untouched",
                store.find_by_secret(&secret.lookup(), None).await,
            ),
            ("by id", store.session(session.id).await),
        ] {
            match found {
                Err(impersonation_core::StoreError::Corrupt(why)) => {
                    assert!(why.contains(field), "{field}={value:?} {how}: {why}");
                }
                other => panic!("{field}={value:?} {how}: {other:?}"),
            }
        }
        assert_eq!(
            live_ids(&store, &impersonation_core::LiveFilter::default()).await,
            vec![],
            "{field}"
        );
    }
}

/// A session key overwritten with another type, or holding a field that
/// is not UTF-8, is damage like a missing field: reported as corrupt, and
/// left out of listings that go on to list the others (not an outage
/// that fails every revocation and `end_lapsed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_key_of_another_type_or_bytes_is_reported_as_corrupt() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let customer = w.customer(1, "t1");
    let mut raw = common::raw(common::SINGLE).await;
    let (other, _) = must_start(&store, w.begin(&w.agent(9), &customer, epoch()).0).await;
    for (n, what) in (1..).zip(["not a hash", "not UTF-8"]) {
        let (session, _) = must_start(&store, w.begin(&w.agent(n), &customer, epoch()).0).await;
        let key = format!("{ns}:{{{}}}:s:{}", session.chain().route(), session.id);
        let mut damage = redis::Cmd::new();
        match what {
            "not a hash" => damage.arg("SET").arg(&key).arg("overwritten"),
            _ => damage
                .arg("HSET")
                .arg(&key)
                .arg("shadow")
                .arg(&b"\xff\xfe"[..]),
        };
        let _: redis::Value = damage.query_async(&mut raw).await.unwrap();
        match store.session(session.id).await {
            Err(impersonation_core::StoreError::Corrupt(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
        for filter in [
            impersonation_core::LiveFilter {
                subject: Some(customer.id.clone()),
                ..Default::default()
            },
            impersonation_core::LiveFilter::default(),
        ] {
            assert_eq!(
                live_ids(&store, &filter).await,
                vec![other.id],
                "{what}: {filter:?}"
            );
        }
    }
}

/// However long the retention (here the longest `Duration` there is), a
/// session's keys get an expiry Redis takes, and the session starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_of_any_length_leaves_sessions_startable() {
    let ns = common::unique("imptest");
    let config = impersonation_redis::RedisConfig::new(common::SINGLE)
        .unwrap()
        .namespace(&ns)
        .unwrap()
        .retention(Duration::MAX)
        .unwrap();
    let store = impersonation_redis::RedisStore::connect(config)
        .await
        .unwrap();
    let w = World::new();
    let (session, _) = must_start(
        &store,
        w.begin(&w.agent(1), &w.customer(1, "t1"), epoch()).0,
    )
    .await;
    let key = format!("{ns}:{{{}}}:s:{}", session.chain().route(), session.id);
    let mut raw = common::raw(common::SINGLE).await;
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        ttl_ms > Duration::days(100 * 365).whole_milliseconds() as i64,
        "{ttl_ms}"
    );
    assert!(store.session(session.id).await.unwrap().is_some());
}

/// A chain far along (its head at place 10^14 - 1, set here by hand: no
/// test writes that many events) still takes events, single and batched,
/// each at its stream entry `0-<seq + 1>` written in digits: the scripts'
/// Lua writes a number from 10^14 on as `1e+14` unless told otherwise,
/// and no stream id reads so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_past_ten_to_the_fourteen_places_takes_events() {
    let ns = common::unique("imptest");
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (start, _) = w.begin(&agent, &customer, epoch());
    let (session, started) = must_start(&common::store_at(common::SINGLE, &ns).await, start).await;
    let chain = session.chain();
    let prefix = common::agent_keys(&ns, &chain);
    let mut raw = common::raw(common::SINGLE).await;
    let far: u64 = 100_000_000_000_000 - 1;
    redis::cmd("HSET")
        .arg(format!("{prefix}:head"))
        .arg("seq")
        .arg(far)
        .query_async::<i64>(&mut raw)
        .await
        .unwrap();
    // A store that has not seen the chain reads its head from the server.
    let store = common::store_at(common::SINGLE, &ns).await;
    let access = |s: i64| {
        session.draft(
            epoch() + Duration::seconds(s),
            AuditAction::Access,
            Actor::System,
        )
    };
    let guard = AppendGuard::SessionActive(session.id);
    let single = store.append(access(1), guard).await.unwrap();
    assert_eq!((single.seq, single.prev_hash), (far + 1, started.hash));
    let batch = store
        .append_batch(vec![(access(2), guard), (access(3), guard)])
        .await;
    let seqs: Vec<u64> = batch.into_iter().map(|r| r.unwrap().seq).collect();
    assert_eq!(seqs, [far + 2, far + 3]);
    let entries = common::stream_entries(&mut raw, &format!("{prefix}:chain")).await;
    let ids: Vec<&str> = entries.ids.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "0-1",
            "0-100000000000001",
            "0-100000000000002",
            "0-100000000000003"
        ]
    );
    let read = store.chain_events(&chain, far + 1, 10).await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [far + 1, far + 2, far + 3]
    );
}

/// A chain head with one of its two fields gone (a hand edit, a restore
/// gone wrong) is damage: an append, by a store that knew the head and
/// by one that reads it fresh, fails as corrupt naming the head (not an
/// outage that goes on being retried), and nothing is appended on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_head_missing_a_field_is_reported_as_corrupt() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (session, _) = must_start(&store, w.begin(&agent, &customer, epoch()).0).await;
    let keys = common::agent_keys(&ns, &session.chain());
    let mut raw = common::raw(common::SINGLE).await;
    let access = || {
        session.draft(
            epoch() + Duration::seconds(1),
            AuditAction::Access,
            Actor::System,
        )
    };
    let guard = AppendGuard::SessionActive(session.id);
    // The store knows the head it wrote.
    store.append(access(), guard).await.unwrap();
    let before = common::stream_entries(&mut raw, &format!("{keys}:chain"))
        .await
        .ids
        .len();
    for field in ["seq", "hash"] {
        let kept: (String, String) = redis::cmd("HMGET")
            .arg(format!("{keys}:head"))
            .arg("seq")
            .arg("hash")
            .query_async(&mut raw)
            .await
            .unwrap();
        let _: u32 = redis::cmd("HDEL")
            .arg(format!("{keys}:head"))
            .arg(field)
            .query_async(&mut raw)
            .await
            .unwrap();
        let fresh = common::store_at(common::SINGLE, &ns).await;
        for (who, s) in [
            ("the store that knew the head", &store),
            ("a fresh store", &fresh),
        ] {
            match s.append(access(), guard).await {
                Err(impersonation_core::StoreError::Corrupt(why)) => {
                    assert!(why.contains("chain head"), "{field}, {who}: {why}");
                }
                other => panic!("without {field}, {who}: {other:?}"),
            }
        }
        let _: () = redis::cmd("HSET")
            .arg(format!("{keys}:head"))
            .arg("seq")
            .arg(&kept.0)
            .arg("hash")
            .arg(&kept.1)
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    let after = common::stream_entries(&mut raw, &format!("{keys}:chain"))
        .await
        .ids
        .len();
    assert_eq!(after, before, "nothing was appended on a damaged head");
    // Mended, the chain goes on.
    store.append(access(), guard).await.unwrap();
}

/// A refused start leaves nothing of the session it did not create: not
/// its route key (written before the script), which would otherwise stay
/// for the session's validity and retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_leaves_no_route_behind() {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (session, _) = must_start(&store, w.begin(&agent, &customer, epoch()).0).await;
    for _ in 0..3 {
        let refused = store.start(w.begin(&agent, &customer, epoch()).0).await;
        assert!(
            matches!(
                refused,
                Ok(impersonation_core::StartOutcome::Refused { .. })
            ),
            "{refused:?}"
        );
    }
    let mut raw = common::raw(common::SINGLE).await;
    let routes: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:where:*"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(routes, [format!("{ns}:where:{}", session.id)]);
}

/// Ends `session` as stopped by its agent.
async fn stopped_by_its_agent<S: Store>(store: &S, session: &impersonation_core::Session) {
    let end = session
        .end(
            EndReason::Stopped,
            Actor::user(session.agent.id.clone(), "agent"),
            epoch(),
            Details::new(),
        )
        .unwrap();
    store.transition(end).await.unwrap();
}

/// A store of its own where agent 1 impersonates customer 1, for the tests
/// that damage the agent's live-session marker (`key`).
struct LiveMarker {
    store: impersonation_redis::RedisStore,
    w: World,
    agent: impersonation_core::Principal,
    customer: impersonation_core::Principal,
    session: impersonation_core::Session,
    key: String,
}

async fn a_live_session_and_its_marker() -> LiveMarker {
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (session, _) = must_start(&store, w.begin(&agent, &customer, epoch()).0).await;
    let key = format!("{}:live", common::agent_keys(&ns, &session.chain()));
    LiveMarker {
        store,
        w,
        agent,
        customer,
        session,
        key,
    }
}

/// Whether `key` exists on the single server.
async fn exists(key: &str) -> bool {
    let found: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut common::raw(common::SINGLE).await)
        .await
        .unwrap();
    found == 1
}

/// An agent's live-session marker that holds no string at all (a hash,
/// after a hand edit or a partial restore): the agent's session is still
/// listed, a start is refused for it, its end goes through whole and
/// takes the marker with it, and the next start goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_marker_of_another_type_neither_blocks_nor_breaks_the_agent() {
    let LiveMarker {
        store,
        w,
        agent,
        customer,
        session,
        key: marker_key,
    } = a_live_session_and_its_marker().await;
    let mut raw = common::raw(common::SINGLE).await;
    let damage = redis::pipe()
        .cmd("DEL")
        .arg(&marker_key)
        .cmd("HSET")
        .arg(&marker_key)
        .arg("f")
        .arg("v")
        .clone();
    let _: () = damage.query_async(&mut raw).await.unwrap();
    let filter = impersonation_core::LiveFilter {
        agent: Some(agent.id.clone()),
        ..Default::default()
    };
    assert_eq!(live_ids(&store, &filter).await, vec![session.id]);
    match store.start(w.begin(&agent, &customer, epoch()).0).await {
        Ok(impersonation_core::StartOutcome::Refused { live, .. }) => assert_eq!(live, session.id),
        other => panic!("{other:?}"),
    }
    // (The refused start put the marker right; damaged again, the end
    // meets it.)
    let _: () = damage.query_async(&mut raw).await.unwrap();
    let current = store.session(session.id).await.unwrap().unwrap();
    stopped_by_its_agent(&store, &current).await;
    assert!(!exists(&marker_key).await);
    must_start(&store, w.begin(&agent, &customer, epoch()).0).await;
}

/// An agent's live-session marker that holds a string naming no session
/// (damage) while the session lives: the session's end takes the marker
/// with it, as it takes one of another type, and the next start goes
/// ahead at once (before, it met the marker: a refusal on the trail
/// naming no live session, and a 503 to try again).
/// So does one that only looks like a session id (hex groups), and one
/// naming a session whose hash is gone (deleted by hand, not restored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_takes_a_live_marker_naming_no_session_with_it() {
    for value in [
        "not a session id".to_owned(),
        "0-0-0-0-0".to_owned(),
        impersonation_core::SessionId::new().to_string(),
    ] {
        an_end_takes_the_marker(&value).await;
    }
}

async fn an_end_takes_the_marker(value: &str) {
    let LiveMarker {
        store,
        w,
        agent,
        customer,
        session,
        key: marker_key,
    } = a_live_session_and_its_marker().await;
    let _: () = redis::cmd("SET")
        .arg(&marker_key)
        .arg(value)
        .query_async(&mut common::raw(common::SINGLE).await)
        .await
        .unwrap();
    stopped_by_its_agent(&store, &session).await;
    assert!(!exists(&marker_key).await, "{value}");
    let before = whole_chain(&store, &session.chain()).await.len();
    must_start(&store, w.begin(&agent, &customer, epoch()).0).await;
    let after = whole_chain(&store, &session.chain()).await;
    assert_eq!(after.len(), before + 1, "the start's event alone");
}

/// A start that meets the agent's live marker set to `value` (damage):
/// refused for the agent's live `session`, the marker naming it again;
/// with no session live, the marker cleared (a 503: try again), and the
/// next start goes ahead.
async fn a_start_repairs_a_damaged_marker(
    store: &impersonation_redis::RedisStore,
    w: &World,
    session: &impersonation_core::Session,
    marker_key: &str,
    value: &str,
) {
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let set = || async {
        let mut raw = common::raw(common::SINGLE).await;
        let _: () = redis::cmd("SET")
            .arg(marker_key)
            .arg(value)
            .query_async(&mut raw)
            .await
            .unwrap();
    };
    let marker = || async {
        let mut raw = common::raw(common::SINGLE).await;
        let value: Option<String> = redis::cmd("GET")
            .arg(marker_key)
            .query_async(&mut raw)
            .await
            .unwrap();
        value
    };
    set().await;
    match store.start(w.begin(&agent, &customer, epoch()).0).await {
        Ok(impersonation_core::StartOutcome::Refused { live, .. }) => assert_eq!(live, session.id),
        other => panic!("{value:?}: {other:?}"),
    }
    assert_eq!(marker().await, Some(session.id.to_string()));
    stopped_by_its_agent(store, session).await;
    set().await;
    let refused = store.start(w.begin(&agent, &customer, epoch()).0).await;
    assert!(
        matches!(refused, Err(impersonation_core::StoreError::Unavailable(_))),
        "{value:?}: {refused:?}"
    );
    assert_eq!(marker().await, None);
    must_start(store, w.begin(&agent, &customer, epoch()).0).await;
}

/// An empty live marker names no session (nor a lost reply's empty
/// answer): a start meets it as a damaged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_live_marker_is_a_damaged_one() {
    let m = a_live_session_and_its_marker().await;
    a_start_repairs_a_damaged_marker(&m.store, &m.w, &m.session, &m.key, "").await;
}

/// A live marker that only looks like a session id, or names a session
/// whose hash is gone (an operator deleted it to end it, say), is met as a
/// damaged one: before, the agent's every start was refused for a session
/// nothing could end, until the marker ran out a day or more later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_naming_no_stored_session_is_a_damaged_one() {
    for value in [
        "0-0-0-0-0".to_owned(),
        impersonation_core::SessionId::new().to_string(),
    ] {
        let m = a_live_session_and_its_marker().await;
        a_start_repairs_a_damaged_marker(&m.store, &m.w, &m.session, &m.key, &value).await;
    }
}

/// The case an operator makes: a live session's hash deleted by hand (to
/// end it). Its marker, left naming it, is met as damage: the agent's next
/// start is refused and audited with a 503 to try again, the marker
/// cleared, and the start after goes ahead (before, every start was
/// refused for the gone session until the marker ran out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_hash_deleted_by_hand_does_not_block_its_agent() {
    let LiveMarker {
        store,
        w,
        agent,
        customer,
        session,
        key: marker_key,
    } = a_live_session_and_its_marker().await;
    let ns = marker_key.split(':').next().unwrap().to_owned();
    let hash = format!("{ns}:{{{}}}:s:{}", session.chain().route(), session.id);
    assert!(exists(&hash).await, "{hash}");
    let _: () = redis::cmd("DEL")
        .arg(&hash)
        .query_async(&mut common::raw(common::SINGLE).await)
        .await
        .unwrap();
    let refused = store.start(w.begin(&agent, &customer, epoch()).0).await;
    assert!(
        matches!(refused, Err(impersonation_core::StoreError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(!exists(&marker_key).await);
    must_start(&store, w.begin(&agent, &customer, epoch()).0).await;
}

/// A live marker or a live-set member holding bytes that are no text
/// (damage) fails no listing: the agent's session is found among all live
/// ones, and the member is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_no_text_in_a_marker_or_live_set_fail_no_listing() {
    let LiveMarker {
        store,
        agent,
        session,
        key: marker_key,
        ..
    } = a_live_session_and_its_marker().await;
    let ns = marker_key.split(':').next().unwrap().to_owned();
    let mut raw = common::raw(common::SINGLE).await;
    let damage = redis::pipe()
        .cmd("SET")
        .arg(&marker_key)
        .arg(&b"\xff\xfe"[..])
        .cmd("SADD")
        .arg(format!("{ns}:live:all"))
        .arg(&b"\xff|\xfe"[..])
        .clone();
    let _: () = damage.query_async(&mut raw).await.unwrap();
    let filter = impersonation_core::LiveFilter {
        agent: Some(agent.id.clone()),
        ..Default::default()
    };
    assert_eq!(live_ids(&store, &filter).await, vec![session.id]);
    assert_eq!(
        live_ids(&store, &impersonation_core::LiveFilter::default()).await,
        vec![session.id]
    );
}

/// A session's route key (`where`) that holds no route (damage) does not
/// hide the live session from a lookup by id, which a revocation by id
/// rests on: it is found by its live route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_route_key_does_not_hide_a_live_session() {
    let LiveMarker {
        store,
        session,
        key: marker_key,
        ..
    } = a_live_session_and_its_marker().await;
    let ns = marker_key.split(':').next().unwrap().to_owned();
    let where_key = format!("{ns}:where:{}", session.id);
    let read_where = || async {
        let value: Option<String> = redis::cmd("GET")
            .arg(&where_key)
            .query_async(&mut common::raw(common::SINGLE).await)
            .await
            .unwrap();
        value
    };
    let route = read_where().await.expect("the route key");
    for damage in [&b"x"[..], &b"\xff"[..], &b"0123456789abcdef0"[..]] {
        let _: () = redis::cmd("SET")
            .arg(&where_key)
            .arg(damage)
            .query_async(&mut common::raw(common::SINGLE).await)
            .await
            .unwrap();
        let found = store.session(session.id).await.unwrap();
        assert_eq!(found.map(|s| s.id), Some(session.id), "{damage:?}");
        // And the key is put right, so the next lookup goes straight there.
        assert_eq!(read_where().await.as_ref(), Some(&route), "{damage:?}");
    }
}

/// An agent's live-session marker that names no session id (damage) does
/// not fail a listing of the agent's sessions, which a revocation of them
/// all rests on: the agent's live session is found among all live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_live_marker_still_lists_the_agents_session() {
    let LiveMarker {
        store,
        w,
        agent,
        customer,
        session,
        key: marker_key,
    } = a_live_session_and_its_marker().await;
    let (other, _) = must_start(&store, w.begin(&w.agent(2), &customer, epoch()).0).await;
    let damage = |key: String| async move {
        let mut raw = common::raw(common::SINGLE).await;
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("not a session id")
            .query_async(&mut raw)
            .await
            .unwrap();
    };
    damage(marker_key.clone()).await;
    let filter = impersonation_core::LiveFilter {
        agent: Some(agent.id.clone()),
        ..Default::default()
    };
    assert_eq!(live_ids(&store, &filter).await, vec![session.id]);
    let both = impersonation_core::LiveFilter {
        agent: Some(agent.id.clone()),
        subject: Some(customer.id.clone()),
        ..Default::default()
    };
    assert_eq!(live_ids(&store, &both).await, vec![session.id]);
    assert_ne!(session.id, other.id);

    // A start meets the damaged marker: refused for the agent's live
    // session, and the marker names it again; with none live, cleared.
    a_start_repairs_a_damaged_marker(&store, &w, &session, &marker_key, "not a session id").await;
}

/// A batch whose later attempt fails (here the chain's stream is damaged,
/// so writing the events kept after a refusal errs) still answers the
/// refusal it decided first: the change refused for its ended session
/// gets `SessionNotActive`, on which the service records it after the
/// end, and only the rest gets the failure. (Before, the whole chain's
/// share got the failure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_decided_before_a_failed_attempt_stands() {
    use impersonation_core::StoreError;
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (first, _) = must_start(&store, w.begin(&agent, &customer, epoch()).0).await;
    stopped_by_its_agent(&store, &first).await;
    let (second, _) = must_start(&store, w.begin(&agent, &customer, epoch()).0).await;
    let stream = format!("{}:chain", common::agent_keys(&ns, &first.chain()));
    let mut raw = common::raw(common::SINGLE).await;
    let damage = redis::pipe()
        .cmd("DEL")
        .arg(&stream)
        .cmd("SET")
        .arg(&stream)
        .arg("not a stream")
        .clone();
    let _: () = damage.query_async(&mut raw).await.unwrap();
    let access = |s: &impersonation_core::Session| {
        s.draft(
            epoch(),
            AuditAction::Access,
            Actor::user(agent.id.clone(), "Agent 1"),
        )
    };
    let results = store
        .append_batch(vec![
            (access(&first), AppendGuard::SessionActive(first.id)),
            (access(&second), AppendGuard::SessionActive(second.id)),
        ])
        .await;
    assert!(
        matches!(&results[0], Err(StoreError::SessionNotActive(id)) if *id == first.id),
        "{results:?}"
    );
    assert!(
        matches!(&results[1], Err(e) if !matches!(e, StoreError::SessionNotActive(_))),
        "{results:?}"
    );
}

/// Any coalescing window is one, -1 µs included (a session last seen
/// before `now` is touched, as `Touch::applies_to` says): the script's
/// "no touch" is no window at all, not a number a caller could send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_of_any_window_is_written() {
    let store = common::single().await;
    let w = World::new();
    for (agent, coalesce) in [(1, Duration::microseconds(-1)), (2, Duration::ZERO)] {
        let (start, secret) = w.begin(&w.agent(agent), &w.customer(1, "t1"), epoch());
        let (session, _) = must_start(&store, start).await;
        let touch = impersonation_core::Touch {
            now: epoch() + Duration::seconds(10),
            coalesce,
        };
        assert!(touch.applies_to(&session));
        store
            .find_by_secret(&secret.lookup(), Some(touch))
            .await
            .unwrap()
            .unwrap();
        let seen = store
            .session(session.id)
            .await
            .unwrap()
            .unwrap()
            .last_seen_at;
        assert_eq!(seen, touch.now, "coalescing {coalesce}");
    }
}

/// A customer's listing is read from a view of its own (`ns:audit:subject:
/// <id>`): its entries taken out by someone with the database, the chain
/// and the listing of every event stay as they were. `verify_all` finds
/// nothing; `verify_listing` for the customer says the listing hides their
/// events, and once the views are rebuilt from the chain, that it shows
/// each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_listing_finds_a_customers_view_emptied_by_hand() {
    use impersonation_core::{
        Activity, AuditQuery, Impersonation, ListingMismatch, MemoryDirectory, Requester,
        StartRequest,
    };
    let ns = common::unique("imptest");
    let store = common::store_at(common::SINGLE, &ns).await;
    let w = World::new();
    let agent = w.agent(1);
    let customers = [w.customer(1, "t1"), w.customer(2, "t1")];
    let directory = MemoryDirectory::new();
    directory.insert(agent.clone());
    for c in &customers {
        directory.insert(c.clone());
    }
    let service = Impersonation::new(store.clone(), directory);
    for c in &customers {
        let started = service
            .start(
                Requester::User(&agent),
                StartRequest::new(c.id.clone(), "Customer cannot see bookings"),
            )
            .await
            .unwrap();
        let ctx = service.resolve(&started.secret).await.unwrap();
        service
            .record(&ctx, Activity::access("Viewed bookings."))
            .await
            .unwrap();
        service.stop(&started.secret, &agent).await.unwrap();
    }
    let first = AuditQuery {
        subject: Some(customers[0].id.clone()),
        ..AuditQuery::default()
    };
    let report = service.verify_listing(&first).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!((report.events(), report.selected), (6, 3));

    let view = format!("{ns}:audit:subject:{}", customers[0].id.as_str());
    let mut conn = common::raw(common::SINGLE).await;
    let removed: u32 = redis::cmd("ZREMRANGEBYRANK")
        .arg(&view)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(removed > 0);
    assert!(service.verify_all().await.unwrap().is_ok());
    let report = service.verify_listing(&first).await.unwrap();
    assert!(report.broken.is_empty(), "{report:?}");
    let chain = impersonation_core::ChainKey::for_agent(&agent.id);
    assert_eq!(
        report.listing,
        [ListingMismatch::Count {
            chain: chain.clone(),
            chained: 3,
            listed: 0
        }]
    );
    // The other customer's listing is as it was.
    let second = AuditQuery {
        subject: Some(customers[1].id.clone()),
        ..AuditQuery::default()
    };
    assert!(service.verify_listing(&second).await.unwrap().is_ok());

    assert_eq!(store.rebuild_indexes(&[chain]).await.unwrap(), 6);
    let report = service.verify_listing(&first).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.selected, 3);
}
