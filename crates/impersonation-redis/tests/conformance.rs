//! The testkit's conformance suite and state-machine property test on a real
//! Redis and on a real three-master Redis Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::future::Future;

use impersonation_redis::RedisStore;
use impersonation_testkit::fault_sequences::{
    run_concurrent_sequences, run_concurrent_sequences_in_two_processes, run_fault_sequences,
};
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
        impersonation_testkit::store_pair_conformance_tests!(super::super::common::pair_at(
            super::super::common::SINGLE
        ));
    }

    mod cluster {
        impersonation_testkit::store_pair_conformance_tests!(super::super::common::pair_at(
            super::super::common::CLUSTER
        ));
    }
}

fn cases() -> u32 {
    std::env::var("IMPERSONATION_DB_MACHINE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

/// Which property a test runs.
#[derive(Clone, Copy)]
enum Run {
    /// The state machine.
    Machine,
    /// The fault sequences (half as many cases).
    Faults,
    /// The concurrent sequences (half as many cases).
    Concurrent,
}

/// Runs `what` on one store shared by the cases.
fn run<F, Fut>(make: F, what: Run)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = RedisStore> + Send + 'static,
{
    let factory = shared_store(make);
    let half = MachineConfig {
        cases: cases().div_ceil(2),
        max_steps: 40,
    };
    match what {
        Run::Machine => run_state_machine(
            MachineConfig {
                cases: cases(),
                max_steps: 50,
            },
            factory,
        ),
        Run::Faults => run_fault_sequences(half, factory),
        Run::Concurrent => run_concurrent_sequences(half, factory),
    }
}

/// The concurrent sequences in two processes (half as many cases), on one
/// pair of stores on the same data, shared by the cases.
fn run_two<F, Fut>(make: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (RedisStore, RedisStore)> + Send + 'static,
{
    let config = MachineConfig {
        cases: cases().div_ceil(2),
        max_steps: 40,
    };
    run_concurrent_sequences_in_two_processes(config, shared_store(make));
}

#[test]
fn state_machine_on_redis() {
    run(common::single, Run::Machine);
}

#[test]
fn state_machine_on_redis_cluster() {
    run(common::cluster, Run::Machine);
}

/// The trail under random store faults (`run_fault_sequences`).
#[test]
fn fault_sequences_on_redis() {
    run(common::single, Run::Faults);
}

#[test]
fn fault_sequences_on_redis_cluster() {
    run(common::cluster, Run::Faults);
}

/// The trail with service calls racing each other
/// (`run_concurrent_sequences`).
#[test]
fn concurrent_sequences_on_redis() {
    run(common::single, Run::Concurrent);
}

#[test]
fn concurrent_sequences_on_redis_cluster() {
    run(common::cluster, Run::Concurrent);
}

/// The same, calls spread over two processes of the app
/// (`run_concurrent_sequences_in_two_processes`).
#[test]
fn two_process_sequences_on_redis() {
    run_two(|| common::pair_at(common::SINGLE));
}

#[test]
fn two_process_sequences_on_redis_cluster() {
    run_two(|| common::pair_at(common::CLUSTER));
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
