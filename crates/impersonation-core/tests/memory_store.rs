//! The testkit's conformance suite and state-machine property test on `MemoryStore`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failed test

use impersonation_core::MemoryStore;
use impersonation_testkit::machine::{MachineConfig, run_state_machine};

mod conformance {
    impersonation_testkit::store_conformance_tests!(async {
        impersonation_core::MemoryStore::new()
    });
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
