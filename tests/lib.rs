//! Cross-crate scenarios of the impersonation workspace. The tests live in
//! `scenarios/`; as binding crates arrive, the same HTTP scenario runs here
//! against each of them.
#![forbid(unsafe_code)]
