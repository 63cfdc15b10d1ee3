//! `cargo xtask demo [args...]`: runs the campground demo app (`--walkthrough`
//! plays its story over HTTP; `--help` lists the options).

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

/// The example package that demonstrates the SDK end to end.
const DEMO_PACKAGE: &str = "campground-demo";

/// Runs `cargo run --quiet --package campground-demo -- [args...]`.
pub(crate) fn run(args: &[OsString]) -> Result<ExitCode> {
    let mut cargo_args: Vec<OsString> = ["run", "--quiet", "--package", DEMO_PACKAGE, "--"]
        .into_iter()
        .map(OsString::from)
        .collect();
    cargo_args.extend_from_slice(args);
    crate::run_cargo_passthrough(cargo_args)
}
