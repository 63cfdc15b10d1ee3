//! `cargo xtask bench [args...]`: runs the criterion benchmarks;
//! `cargo xtask bench http [args...]`: the HTTP load bench (wrk).

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

/// Packages that have benchmarks; add a package here to have `cargo xtask
/// bench` run its benches too.
const BENCH_PACKAGES: &[&str] = &[
    "impersonation-core",
    "impersonation-diesel",
    "impersonation-redis",
    "impersonation-oidc",
];

/// Features the benched packages need (the Diesel benches run on
/// PostgreSQL and SQLite).
const BENCH_FEATURES: &str = "impersonation-diesel/postgres,impersonation-diesel/sqlite";

/// The load bench's manifest: a workspace of its own, so the
/// tower-sessions stores it compares against (sqlx, fred) stay out of CI.
pub(crate) const HTTP_BENCH: &str = "benches/http-load/Cargo.toml";

/// Runs `cargo bench --package <p>... [args...]`, e.g. `cargo xtask bench --
/// --save-baseline main` to forward options to criterion; or, for `http`,
/// the load bench with its arguments (`--seconds N`, `--connections N`,
/// `--rounds N` for medians over interleaved rounds, `--instructions` for
/// instructions per request under callgrind, variant names).
pub(crate) fn run(args: &[OsString]) -> Result<ExitCode> {
    // The benches make schemas and keys of their own; a CI run starting
    // meanwhile would clear them (and skew the figures).
    let _lock = crate::services::lock_test_services()?;
    // Only the servers the benches use (SQLite is embedded): not the test
    // tools, the browser or the German locale `services up` adds.
    for service in ["postgresql", "redis"] {
        crate::services::up_one(service, "the bench", "Give it that access")?;
    }
    if args.first().and_then(|a| a.to_str()) == Some("http") {
        crate::services::ensure_tools(&[("/usr/bin/wrk", "wrk"), ("/usr/bin/curl", "curl")])?;
        if args.iter().any(|a| a == "--instructions") {
            crate::services::ensure_tools(&[("/usr/bin/valgrind", "valgrind")])?;
        }
        let mut cargo_args: Vec<OsString> = [
            "run",
            "--release",
            "--locked",
            "--manifest-path",
            HTTP_BENCH,
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        // In the workspace's own target directory, not a second tree
        // under benches/http-load.
        cargo_args.push("--target-dir".into());
        cargo_args.push(crate::cargo_target_dir().into_os_string());
        cargo_args.push("--".into());
        cargo_args.extend_from_slice(&args[1..]);
        return crate::run_cargo_passthrough(cargo_args);
    }
    let mut cargo_args: Vec<OsString> =
        vec!["bench".into(), "--features".into(), BENCH_FEATURES.into()];
    for package in BENCH_PACKAGES {
        cargo_args.push("--package".into());
        cargo_args.push(package.into());
    }
    cargo_args.extend_from_slice(args);
    crate::run_cargo_passthrough(cargo_args)
}
