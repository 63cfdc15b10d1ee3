//! The state-machine property test on every backend. Cases share one store
//! per backend (each case namespaces its ids), created inside the runner's
//! runtime because pooled connections belong to the runtime that made them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::future::Future;

use impersonation_diesel::DieselStore;
use impersonation_testkit::fault_sequences::{
    run_concurrent_sequences, run_concurrent_sequences_in_two_processes, run_fault_sequences,
};
use impersonation_testkit::machine::{
    MachineConfig, edge_sequences, run_ops, run_state_machine, shared_store,
};

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
    Fut: Future<Output = DieselStore> + Send + 'static,
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
    Fut: Future<Output = (DieselStore, DieselStore)> + Send + 'static,
{
    let config = MachineConfig {
        cases: cases().div_ceil(2),
        max_steps: 40,
    };
    run_concurrent_sequences_in_two_processes(config, shared_store(make));
}

#[cfg(feature = "postgres")]
#[test]
fn state_machine_on_postgres() {
    run(common::postgres, Run::Machine);
}

#[cfg(feature = "mysql")]
#[test]
fn state_machine_on_mariadb() {
    run(common::mysql, Run::Machine);
}

#[test]
fn state_machine_on_sqlite_file() {
    run(common::sqlite_file, Run::Machine);
}

#[test]
fn state_machine_on_sqlite_memory() {
    run(common::sqlite_memory, Run::Machine);
}

/// The trail under random store faults (`run_fault_sequences`).
#[cfg(feature = "postgres")]
#[test]
fn fault_sequences_on_postgres() {
    run(common::postgres, Run::Faults);
}

#[cfg(feature = "mysql")]
#[test]
fn fault_sequences_on_mariadb() {
    run(common::mysql, Run::Faults);
}

#[test]
fn fault_sequences_on_sqlite_file() {
    run(common::sqlite_file, Run::Faults);
}

/// The trail with service calls racing each other
/// (`run_concurrent_sequences`).
#[cfg(feature = "postgres")]
#[test]
fn concurrent_sequences_on_postgres() {
    run(common::postgres, Run::Concurrent);
}

#[cfg(feature = "mysql")]
#[test]
fn concurrent_sequences_on_mariadb() {
    run(common::mysql, Run::Concurrent);
}

#[test]
fn concurrent_sequences_on_sqlite_file() {
    run(common::sqlite_file, Run::Concurrent);
}

/// The same, calls spread over two processes of the app
/// (`run_concurrent_sequences_in_two_processes`).
#[cfg(feature = "postgres")]
#[test]
fn two_process_sequences_on_postgres() {
    run_two(common::postgres_pair);
}

#[cfg(feature = "mysql")]
#[test]
fn two_process_sequences_on_mariadb() {
    run_two(common::mysql_pair);
}

#[test]
fn two_process_sequences_on_sqlite_file() {
    run_two(common::sqlite_file_pair);
}

/// The edge sequences on every backend: those that end a session's idle
/// timeout between its last touch and its last resolve (the SQL's touch
/// rule at the idle edge, in microseconds), the expiry's cap on the idle
/// deadline, and a re-check's refreshed shadow user kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_sequences_on_every_backend() {
    async fn on(store: DieselStore) {
        for ops in edge_sequences() {
            run_ops(store.clone(), false, &ops)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    on(common::sqlite_file().await).await;
    on(common::sqlite_memory().await).await;
    #[cfg(feature = "postgres")]
    on(common::postgres().await).await;
    #[cfg(feature = "mysql")]
    on(common::mysql().await).await;
}
