//! The testkit's fault wrapper and the core's `Arc<S>` store impl must be
//! transparent: with no fault planned, they pass the whole conformance suite
//! and the state-machine test. Only then does a fault test through them say
//! something about the store underneath.

use std::sync::Arc;

use impersonation_core::MemoryStore;
use impersonation_testkit::faults::FaultyStore;
use impersonation_testkit::machine::{MachineConfig, run_state_machine};

mod faulty_store_without_faults {
    impersonation_testkit::store_conformance_tests!(async {
        impersonation_testkit::faults::FaultyStore::new(impersonation_core::MemoryStore::new())
    });
}

mod shared_store {
    impersonation_testkit::store_conformance_tests!(async {
        std::sync::Arc::new(impersonation_core::MemoryStore::new())
    });
}

#[test]
fn the_state_machine_holds_through_the_fault_wrapper() {
    let config = MachineConfig {
        cases: 200,
        max_steps: 50,
    };
    run_state_machine(config, || async { FaultyStore::new(MemoryStore::new()) });
}

#[test]
fn the_trail_holds_through_random_store_faults() {
    // 1000: a fault lands on the one store call that matters in few cases
    // (an end that the store made and whose answer was lost, then a read
    // the same second, needs about a thousand to be met every run).
    let config = MachineConfig {
        cases: 1000,
        max_steps: 40,
    };
    impersonation_testkit::fault_sequences::run_fault_sequences(config, || async {
        MemoryStore::new()
    });
}

/// The trail with calls racing each other: two or three at a time, each
/// a task of its own on two workers.
#[test]
fn the_trail_holds_with_calls_racing_each_other() {
    let config = MachineConfig {
        cases: 1000,
        max_steps: 40,
    };
    impersonation_testkit::fault_sequences::run_concurrent_sequences(config, || async {
        MemoryStore::new()
    });
}

/// The same with two processes of the app on one store.
#[test]
fn the_trail_holds_with_calls_racing_across_two_processes() {
    let config = MachineConfig {
        cases: 500,
        max_steps: 40,
    };
    impersonation_testkit::fault_sequences::run_concurrent_sequences_in_two_processes(
        config,
        || async {
            let store = Arc::new(MemoryStore::new());
            (Arc::clone(&store), store)
        },
    );
}

#[test]
fn cases_may_share_one_store() {
    // What a database adapter does: every case gets the same store, and the
    // cases' namespaces keep them apart.
    let shared = Arc::new(MemoryStore::new());
    let config = MachineConfig {
        cases: 200,
        max_steps: 50,
    };
    run_state_machine(config, || {
        let store = Arc::clone(&shared);
        async move { store }
    });
}
