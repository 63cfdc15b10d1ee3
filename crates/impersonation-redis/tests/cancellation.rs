//! Requests whose clients go away mid-call: a write that reached Redis must
//! still get its index entries and live-set changes, or the audit views and
//! revocations would miss it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use impersonation_core::{
    Activity, AuditQuery, Impersonation, MemoryDirectory, Requester, StartRequest,
};
use impersonation_redis::RedisStore;
use impersonation_testkit::World;
use impersonation_testkit::conformance::{all_events, whole_chain};

/// Drops records, then a stop, at every point of their calls; afterwards
/// every event of the chain is found through the session's index, and the
/// ended session has left the live sets.
async fn cancelled_writes_are_indexed_all_the_same(store: RedisStore, on_cluster: bool) {
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let directory = MemoryDirectory::new();
    directory.insert(agent.clone());
    directory.insert(customer.clone());
    let svc = Impersonation::new(store.clone(), directory);
    let started = svc
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Cancelled requests"),
        )
        .await
        .unwrap();
    let ctx = svc.resolve(&started.secret).await.unwrap();
    let mut cancelled = 0;
    for round in 0..40_usize {
        let record = svc.record(&ctx, Activity::access("Viewed."));
        let cut = async {
            for _ in 0..round {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            biased;
            _ = record => {}
            () = cut => cancelled += 1,
        }
    }
    assert!(cancelled > 0, "no record was cut short");
    // A stop cut short as well, until one goes through.
    let mut rounds = 0;
    loop {
        let stop = svc.stop(&started.secret, &agent);
        let cut = async {
            for _ in 0..rounds {
                tokio::task::yield_now().await;
            }
        };
        let stopped = tokio::select! {
            biased;
            r = stop => r.is_ok(),
            () = cut => false,
        };
        rounds += 1;
        if stopped || svc.resolve_fresh(&started.secret).await.is_err() {
            break;
        }
    }
    // Let writes that outlived their callers finish.
    for _ in 0..100 {
        let chain = whole_chain(&store, &ctx.chain()).await;
        let indexed = all_events(
            &store,
            AuditQuery {
                session: Some(ctx.session()),
                ..AuditQuery::default()
            },
        )
        .await;
        // The live sets as Redis holds them: the store's listing would
        // skip an ended session's stale entry.
        let ns = store.namespace();
        let mut live = common::set_members(on_cluster, &format!("{ns}:live:all")).await;
        live.extend(
            common::set_members(
                on_cluster,
                &format!("{ns}:live:subject:{}", customer.id.as_str()),
            )
            .await,
        );
        if indexed.len() == chain.len() && live.is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let chain = whole_chain(&store, &ctx.chain()).await;
    let indexed = all_events(
        &store,
        AuditQuery {
            session: Some(ctx.session()),
            ..AuditQuery::default()
        },
    )
    .await;
    let live = common::set_members(on_cluster, &format!("{}:live:all", store.namespace())).await;
    panic!(
        "{} events in the chain, {} found through the session's index; live set entries left: {live:?}",
        chain.len(),
        indexed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_writes_are_indexed_all_the_same_on_a_single_server() {
    cancelled_writes_are_indexed_all_the_same(common::single().await, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_writes_are_indexed_all_the_same_on_a_cluster() {
    cancelled_writes_are_indexed_all_the_same(common::cluster().await, true).await;
}
