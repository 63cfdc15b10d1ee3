//! `cargo xtask bench [args...]`: runs the benchmarks.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

/// Packages that have benchmarks; add a package here to have `cargo xtask
/// bench` run its benches too.
const BENCH_PACKAGES: &[&str] = &[
    "impersonation-core",
    "impersonation-diesel",
    "impersonation-redis",
];

/// Features the benched packages need (the Diesel benches run on
/// PostgreSQL and SQLite).
const BENCH_FEATURES: &str = "impersonation-diesel/postgres,impersonation-diesel/sqlite";

/// Runs `cargo bench --package <p>... [args...]`, e.g. `cargo xtask bench --
/// --save-baseline main` to forward options to criterion.
pub(crate) fn run(args: &[OsString]) -> Result<ExitCode> {
    crate::services::up()?;
    let mut cargo_args: Vec<OsString> =
        vec!["bench".into(), "--features".into(), BENCH_FEATURES.into()];
    for package in BENCH_PACKAGES {
        cargo_args.push("--package".into());
        cargo_args.push(package.into());
    }
    cargo_args.extend_from_slice(args);
    crate::run_cargo_passthrough(cargo_args)
}
