//! The testkit's conformance suite and state-machine property test on a real
//! Redis and on a real three-master Redis Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::future::Future;

use impersonation_redis::RedisStore;
use impersonation_testkit::fault_sequences::run_fault_sequences;
use impersonation_testkit::machine::{
    MachineConfig, edge_sequences, run_ops, run_state_machine, shared_store,
};

mod single {
    impersonation_testkit::store_conformance_tests!(super::common::single());
}

mod cluster {
    impersonation_testkit::store_conformance_tests!(super::common::cluster());
}

/// Two stores on one namespace, each with its own connection and cached
/// chain heads: two processes of an app.
mod two_instances {
    mod single {
        impersonation_testkit::store_pair_conformance_tests!(async {
            let ns = super::super::common::unique("imptest");
            let url = super::super::common::SINGLE;
            let first = super::super::common::store_at(url, &ns).await;
            (first, super::super::common::store_at(url, &ns).await)
        });
    }

    mod cluster {
        impersonation_testkit::store_pair_conformance_tests!(async {
            let ns = super::super::common::unique("imptest");
            let url = super::super::common::CLUSTER;
            let first = super::super::common::store_at(url, &ns).await;
            (first, super::super::common::store_at(url, &ns).await)
        });
    }
}

fn cases() -> u32 {
    std::env::var("IMPERSONATION_DB_MACHINE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

/// The state machine, or with `faults` the fault sequences (half as many
/// cases) on one store shared by the cases.
fn run<F, Fut>(make: F, faults: bool)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = RedisStore> + Send + 'static,
{
    let factory = shared_store(make);
    if faults {
        let config = MachineConfig {
            cases: cases().div_ceil(2),
            max_steps: 40,
        };
        run_fault_sequences(config, factory);
    } else {
        let config = MachineConfig {
            cases: cases(),
            max_steps: 50,
        };
        run_state_machine(config, factory);
    }
}

#[test]
fn state_machine_on_redis() {
    run(common::single, false);
}

#[test]
fn state_machine_on_redis_cluster() {
    run(common::cluster, false);
}

/// The trail under random store faults (`run_fault_sequences`).
#[test]
fn fault_sequences_on_redis() {
    run(common::single, true);
}

#[test]
fn fault_sequences_on_redis_cluster() {
    run(common::cluster, true);
}

/// The edge sequences: those that end a session's idle timeout between
/// its last touch and its last resolve (the resolve script's touch rule at
/// the idle edge), the expiry's cap on the idle deadline, and a re-check's
/// refreshed shadow user kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_sequences_on_redis() {
    for store in [common::single().await, common::cluster().await] {
        for ops in edge_sequences() {
            run_ops(store.clone(), false, &ops)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
