//! The testkit's conformance suite and state-machine property test on `MemoryStore`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failed test

use impersonation_core::MemoryStore;
use impersonation_testkit::machine::{MachineConfig, edge_sequences, run_ops, run_state_machine};

mod conformance {
    impersonation_testkit::store_conformance_tests!(async {
        impersonation_core::MemoryStore::new()
    });
}

/// Clones of a `MemoryStore` share their state: two handles on one store,
/// as the two-instance cases ask for.
mod two_instances {
    impersonation_testkit::store_pair_conformance_tests!(async {
        let store = impersonation_core::MemoryStore::new();
        (store.clone(), store)
    });
}

/// The suite's promise to adapter authors: a factory may hand every case
/// the same database. Here every case gets one shared store (clones of a
/// `MemoryStore` share their state), and the cases run one after another
/// on it, each meeting the rows of the ones before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_passes_on_one_shared_store() {
    let shared = MemoryStore::new();
    impersonation_testkit::conformance::run_all(|| {
        let store = shared.clone();
        async move { store }
    })
    .await;
}

#[test]
fn state_machine_invariants_hold_on_the_memory_store() {
    let cases = std::env::var("IMPERSONATION_MACHINE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    run_state_machine(
        MachineConfig {
            cases,
            max_steps: 50,
        },
        || async { MemoryStore::new() },
    );
}

/// The state machine's model at the edges random sequences rarely reach
/// (`machine::edge_sequences`): a resolve served from the reuse cache, or
/// one whose touch is coalesced, does not move the store's `last_seen` (a
/// model that counted every resolve expects the last resolve to find the
/// session live, and fails there); the expiry caps the idle deadline; a
/// customer's change refreshes the stored shadow user.
#[test]
fn the_machine_follows_the_edge_sequences() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for ops in edge_sequences() {
        runtime
            .block_on(run_ops(MemoryStore::new(), false, &ops))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A query the memory store's index does not narrow (an action alone)
/// reads at most `views::MIN_SCAN` events per call (for a small page),
/// as the view-backed stores do: on a trail of 3,000 accesses and one
/// change at its end, the first page comes back empty with a cursor, and
/// following the cursors finds the change, once.
#[tokio::test]
async fn a_sparse_query_reads_a_bounded_number_of_events_per_call() {
    use impersonation_core::{
        Actor, AppendGuard, AuditAction, AuditQuery, Order, Store, views::MIN_SCAN,
    };
    use impersonation_testkit::conformance::must_start;
    use impersonation_testkit::{World, epoch};
    let store = MemoryStore::new();
    let w = World::new();
    let agent = w.agent(1);
    let (session, _) = must_start(&store, w.begin(&agent, &w.customer(1, "t1"), epoch()).0).await;
    let actor = Actor::user(agent.id.clone(), "agent");
    for chunk in 0..30_i64 {
        let batch = (0..100_i64)
            .map(|i| {
                let n = chunk * 100 + i;
                let action = if n == 2_999 {
                    AuditAction::Modification
                } else {
                    AuditAction::Access
                };
                let at = epoch() + time::Duration::milliseconds(1 + n);
                (session.draft(at, action, actor.clone()), AppendGuard::None)
            })
            .collect();
        for result in store.append_batch(batch).await {
            result.unwrap();
        }
    }
    let mut query = AuditQuery {
        action: Some(AuditAction::Modification),
        order: Order::Oldest,
        limit: 1,
        ..AuditQuery::default()
    };
    let first = store.audit(&query).await.unwrap();
    assert!(first.events.is_empty(), "{} events", first.events.len());
    assert!(first.next.is_some(), "a cursor to go on from");
    let mut found = Vec::new();
    let mut calls = 0;
    query.cursor = None;
    loop {
        calls += 1;
        let page = store.audit(&query).await.unwrap();
        found.extend(page.events.into_iter().map(|e| e.action));
        match page.next {
            Some(next) => query.cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(found, [AuditAction::Modification]);
    // 3,001 events (the start's too), at most MIN_SCAN read per call.
    assert_eq!(calls, 3_001_usize.div_ceil(MIN_SCAN));
}

/// The cache of decoded sessions that text-keeping stores share prints
/// how many it holds, not the stored texts: a shadow user's text holds
/// the customer's copied and masked values, which `ShadowUser`'s own
/// `Debug` leaves out.
#[test]
fn decoded_sessions_print_no_stored_values() {
    use impersonation_core::DecodedSessions;
    use impersonation_testkit::{World, epoch};
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let record = serde_json::to_string(start.session()).unwrap();
    let shadow = serde_json::to_string(&start.session().shadow).unwrap();
    assert!(shadow.contains("Europe/Lisbon"), "{shadow}");
    assert!(shadow.contains("9010"), "{shadow}");
    let cache = DecodedSessions::new();
    let decoded = cache.decode(secret.hash(), &record, &shadow).unwrap();
    assert_eq!(decoded.id, start.session().id);
    let printed = format!("{cache:?}");
    assert_eq!(printed, "DecodedSessions { sessions: 1 }");
}
