//! `cargo xtask fuzz [--cases N]`: the long run of the OIDC crate's
//! structure-aware fuzzers (proptest, stable toolchain), optimised. CI runs
//! the same properties with a few hundred cases; this runs `N` (default
//! 100,000) of each. Failing inputs land in
//! `crates/impersonation-oidc/tests/fuzz.proptest-regressions`: commit them.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};

const DEFAULT_CASES: u32 = 100_000;

pub(crate) fn run(args: &[OsString]) -> Result<ExitCode> {
    let mut cases = DEFAULT_CASES;
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--cases" => {
                cases = it
                    .next()
                    .context("--cases N")?
                    .parse()
                    .context("--cases takes a number")?;
            }
            other => bail!("unknown argument {other}; usage: cargo xtask fuzz [--cases N]"),
        }
    }
    // The fuzz target serves its issuer on the in-memory store: it needs
    // none of the test services.
    println!("fuzz: {cases} cases per property (release build)");
    let cargo_args: Vec<OsString> = [
        "test",
        "--release",
        "--locked",
        "-p",
        "impersonation-oidc",
        "--test",
        "fuzz",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    crate::exec_cargo(cargo_args, &[("IMP_FUZZ_CASES", cases.to_string())])
}
