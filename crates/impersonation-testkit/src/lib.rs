//! # impersonation-testkit
//!
//! What every `Store` adapter runs, ours and our users':
//!
//! * [`store_conformance_tests!`]: one test per promise of the `Store` trait
//!   ([`conformance`]), from a factory expression;
//! * [`store_pair_conformance_tests!`]: the racing cases again over two
//!   instances of the store on the same data (two processes), from a
//!   factory of pairs;
//! * [`machine::run_state_machine`]: the state-machine property test that
//!   drives the real service on your store and checks the SDK's invariants
//!   after every step;
//! * [`faults::FaultyStore`]: fails a chosen call before or after the inner
//!   write, to show the service fails closed around a store call that
//!   fails (it wraps whole calls: that a failed write of your store leaves
//!   neither half is for a test against your database itself);
//! * [`fault_sequences::run_fault_sequences`]: random sequences of service
//!   calls on your store behind that wrapper, a random call failing before
//!   or after your store acts, and the trail checked for completeness (no
//!   session found without its start record, one end event each, chains
//!   that verify) after every step;
//! * [`fault_sequences::run_concurrent_sequences`]: the same calls with
//!   no fault, up to three at a time as tasks of their own, so that
//!   starts race revocations and records race stops on your store, and
//!   the same checks after every step (and
//!   [`fault_sequences::run_concurrent_sequences_in_two_processes`], the
//!   calls spread over two instances of the app);
//! * [`scratch`]: unique names and SQLite file paths that keep parallel
//!   tests apart on shared servers.
//!
//! ```no_run
//! // tests/conformance.rs of an adapter crate
//! impersonation_testkit::store_conformance_tests!(async { impersonation_core::MemoryStore::new() });
//!
//! #[test]
//! fn state_machine() {
//!     impersonation_testkit::machine::run_state_machine(
//!         impersonation_testkit::machine::MachineConfig { cases: 64, max_steps: 50 },
//!         || async { impersonation_core::MemoryStore::new() },
//!     );
//! }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A test kit fails by panicking: that is how a test reports a broken promise.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

pub mod conformance;
pub mod fault_sequences;
pub mod faults;
pub mod machine;
pub mod scratch;
pub mod world;

pub use world::{World, epoch};
