//! `cargo xtask demo [args...]`: runs the campground demo app (`--walkthrough`
//! plays its story over HTTP; `--help` lists the options).

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

/// The example package that demonstrates the SDK end to end.
const DEMO_PACKAGE: &str = "campground-demo";

/// Runs `cargo run --quiet --package campground-demo -- [args...]`; with
/// `--store postgres|mariadb|redis` and no `--url`, first brings up the
/// local service that store's default URL points at, if it is down.
pub(crate) fn run(args: &[OsString]) -> Result<ExitCode> {
    let text: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    let store = text
        .iter()
        .position(|a| *a == "--store")
        .and_then(|i| text.get(i + 1))
        .copied()
        .or_else(|| text.iter().find_map(|a| a.strip_prefix("--store=")));
    let own_url = text
        .iter()
        .any(|a| *a == "--url" || a.starts_with("--url="));
    let service = match store.map(str::to_ascii_lowercase).as_deref() {
        Some("postgres" | "pg") => Some("postgresql"),
        Some("mariadb" | "mysql") => Some("mariadb"),
        Some("redis") => Some("redis"),
        _ => None,
    };
    if let (Some(service), false) = (service, own_url) {
        crate::services::up_one(service)?;
    }
    let mut cargo_args: Vec<OsString> = ["run", "--quiet", "--package", DEMO_PACKAGE, "--"]
        .into_iter()
        .map(OsString::from)
        .collect();
    cargo_args.extend_from_slice(args);
    crate::run_cargo_passthrough(cargo_args)
}
