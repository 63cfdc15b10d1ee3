//! `cargo xtask demo [args...]`: runs the campground demo app (`--walkthrough`
//! plays its story over HTTP; `--help` lists the options).

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Result;

/// The example package that demonstrates the SDK end to end.
const DEMO_PACKAGE: &str = "campground-demo";

/// Builds the demo, then runs `cargo run --quiet --package campground-demo --
/// [args...]` in xtask's place; with
/// `--store postgres|mariadb|redis` and no `--url`, first brings up the
/// local service that store's default URL points at, if it is down.
pub(crate) fn run(args: &[OsString]) -> Result<ExitCode> {
    let text: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    let store = store_of(&text);
    let own_url = text
        .iter()
        .any(|a| *a == "--url" || a.starts_with("--url="));
    // Asking for the help starts nothing.
    let help = text.iter().any(|a| *a == "-h" || *a == "--help");
    let service = match store.map(str::to_ascii_lowercase).as_deref() {
        Some("postgres" | "pg") => Some("postgresql"),
        Some("mariadb" | "mysql") => Some("mariadb"),
        Some("redis") => Some("redis"),
        _ => None,
    };
    if let (Some(service), false, false) = (service, own_url, help) {
        crate::services::up_one(service, "the demo", "Pass --url with your own credentials")?;
    }
    // Built first, with cargo's progress (a fresh clone's first build
    // takes minutes), then run `--quiet`: cargo's own `Running …` line
    // would print the arguments, a `--url`'s password with them.
    let built = crate::run_cargo_passthrough(["build", "--package", DEMO_PACKAGE])?;
    if built != ExitCode::SUCCESS {
        return Ok(built);
    }
    let mut cargo_args: Vec<OsString> = ["run", "--quiet", "--package", DEMO_PACKAGE, "--"]
        .into_iter()
        .map(OsString::from)
        .collect();
    cargo_args.extend_from_slice(args);
    crate::exec_cargo(cargo_args, &[])
}

/// The last `--store` given (`--store x` or `--store=x`), as the demo
/// reads its options.
fn store_of<'a>(text: &[&'a str]) -> Option<&'a str> {
    text.iter()
        .enumerate()
        .filter_map(|(i, a)| match a.strip_prefix("--store") {
            Some("") => text.get(i + 1).copied(),
            Some(rest) => rest.strip_prefix('='),
            None => None,
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::store_of;

    #[test]
    fn the_last_store_given_counts_as_the_demo_reads_it() {
        assert_eq!(
            store_of(&["--store", "memory", "--store=postgres"]),
            Some("postgres")
        );
        assert_eq!(
            store_of(&["--store=redis", "--store", "mariadb"]),
            Some("mariadb")
        );
        assert_eq!(store_of(&["--port", "0", "--storex", "y"]), None);
        assert_eq!(store_of(&["--store"]), None);
    }
}
