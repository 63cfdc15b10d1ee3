//! `cargo xtask demo [args...]`: runs the walkthrough example.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

/// The example package that demonstrates the SDK end to end.
const DEMO_PACKAGE: &str = "impersonation-walkthrough";

/// Runs `cargo run --quiet --package impersonation-walkthrough -- [args...]`.
pub(crate) fn run(args: &[OsString]) -> Result<ExitCode> {
    let mut cargo_args: Vec<OsString> = ["run", "--quiet", "--package", DEMO_PACKAGE, "--"]
        .into_iter()
        .map(OsString::from)
        .collect();
    cargo_args.extend_from_slice(args);
    crate::run_cargo_passthrough(cargo_args)
}
