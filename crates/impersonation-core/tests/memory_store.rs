//! The testkit's conformance suite and state-machine property test on `MemoryStore`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failed test

use impersonation_core::MemoryStore;
use impersonation_testkit::machine::{MachineConfig, run_state_machine};

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
