//! Developer tasks for the impersonation workspace, run as `cargo xtask <task>`.
//!
//! Everything CI does lives here rather than in shell scripts, so that a
//! developer and CI run exactly the same steps (`.ci/run` only calls
//! `cargo xtask ci`). Arguments are parsed by hand: the command set is tiny
//! and an argument-parsing crate would cost more build time than it saves.

mod bench;
mod ci;
mod demo;
mod fuzz;
mod services;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result};
use xshell::Shell;

/// Printed for `help` and, on stderr, for an unknown command.
const USAGE: &str = "\
usage: cargo xtask <task> [args...]

tasks:
  ci                  services up, fmt check, clippy, tests; ends with `N passed, M failed`
  services up         start PostgreSQL, MariaDB, Redis and a Redis Cluster if they are not up;
                      install Chromium and chromedriver for the browser test if missing
  services status     show, per service, whether it is reachable and installed
  services reset      drop what test runs left: imptest_* schemas, databases, Redis keys, SQLite files
  demo [args...]      the campground demo app on 127.0.0.1:3000 (SQLite); --walkthrough plays
                      its story over HTTP; --store, --url, --port, --help
  bench [args...]     the criterion benches of core, diesel, redis and oidc [args to criterion]
  bench http [args]   requests/s: bare axum vs the impersonation layer vs tower-sessions (wrk);
                      [--seconds N] [--connections N] [--rounds N] [--instructions] [variant...]
  fuzz [--cases N]    the OIDC fuzzers (proptest), N cases per property (default 100000)
  help                show this text
";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Dispatches on the task name; each task reports its own exit code so that
/// `demo`/`bench` can pass the child's code through and `ci` can print its
/// summary line last.
fn run(args: &[OsString]) -> Result<ExitCode> {
    // Task names are ASCII; a non-UTF-8 one is simply unknown. Arguments
    // passed through to cargo stay `OsString`s.
    let task = args.first().map(|a| a.to_string_lossy().into_owned());
    let rest = args.get(1..).unwrap_or_default();
    match (task.as_deref(), rest.first().and_then(|a| a.to_str())) {
        (Some("ci"), _) if rest.is_empty() => ci::run(),
        (Some("services"), Some("up")) if rest.len() == 1 => {
            services::up()?;
            Ok(ExitCode::SUCCESS)
        }
        (Some("services"), Some("reset")) if rest.len() == 1 => {
            let _lock = services::lock_test_services()?;
            services::reset_test_databases(&root_shell()?, &target_dir())?;
            println!("test schemas, databases, keys and files removed");
            Ok(ExitCode::SUCCESS)
        }
        (Some("services"), Some("status")) if rest.len() == 1 => {
            services::status()?;
            Ok(ExitCode::SUCCESS)
        }
        (Some("demo"), _) => demo::run(rest),
        (Some("bench"), _) => bench::run(rest),
        (Some("fuzz"), _) => fuzz::run(rest),
        (Some("help" | "-h" | "--help"), _) => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            let given: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
            if given.is_empty() {
                eprintln!("xtask: missing command\n\n{USAGE}");
            } else {
                eprintln!("xtask: unknown command: `{}`\n\n{USAGE}", given.join(" "));
            }
            Ok(ExitCode::from(2))
        }
    }
}

/// The workspace root: xtask lives one level below it. Every command runs
/// from here so that `cargo xtask` behaves the same from any subdirectory.
///
/// `cargo run` tells the process where its manifest is; that comes first.
/// The path compiled in is only a fallback: two checkouts sharing one
/// `CARGO_TARGET_DIR` can share one xtask binary, built in the other one.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

/// A shell whose current directory is the workspace root.
///
/// Its `psql` gives up on a server that does not answer within 10 s (a
/// port held by something that accepts and never speaks would otherwise
/// hold it, and the run, forever), and its `PATH` holds the `sbin`
/// directories, where root's tools live (`runuser`, `start-stop-daemon`,
/// and `ldconfig`, which dpkg looks for): a `PATH` kept by `su` or given
/// by `sudo env PATH=…` may lack them.
fn root_shell() -> Result<Shell> {
    let sh = Shell::new()?;
    sh.change_dir(workspace_root()?);
    sh.set_var("PGCONNECT_TIMEOUT", "10");
    sh.set_var("PATH", with_sbin(std::env::var_os("PATH")));
    for (name, value) in child_env() {
        sh.set_var(name, value);
    }
    Ok(sh)
}

/// What every command xtask runs gets besides its own environment: the
/// loopback addresses in `NO_PROXY` and `no_proxy`. The tests and the
/// walkthrough talk to servers on 127.0.0.1 through HTTP clients that
/// honour `http_proxy` (reqwest does, for loopback too), which a machine
/// behind a proxy sets for apt and npm. Both names get the hosts either
/// held (tools read one or the other first), and a `*` (every host)
/// leaves them as they are.
fn child_env() -> Vec<(&'static str, OsString)> {
    let lists = ["NO_PROXY", "no_proxy"].map(|name| std::env::var(name).ok());
    match with_loopback(&lists) {
        Some(hosts) => vec![("NO_PROXY", hosts.clone()), ("no_proxy", hosts)],
        None => Vec::new(),
    }
}

/// The hosts of `lists` (comma-separated, each at most once) with the
/// loopback names they lack; `None` if one of them is `*`.
fn with_loopback(lists: &[Option<String>]) -> Option<OsString> {
    let mut hosts: Vec<String> = Vec::new();
    let given = lists
        .iter()
        .flatten()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty());
    for host in given.chain(["127.0.0.1", "localhost", "::1"]) {
        if host == "*" {
            return None;
        }
        if !hosts.iter().any(|h| h == host) {
            hosts.push(host.to_owned());
        }
    }
    Some(hosts.join(",").into())
}

/// Cargo's target directory for this workspace as cargo resolves it
/// (`CARGO_TARGET_DIR`, a config's `build.target-dir`, else `target/`):
/// `cargo metadata`'s `target_directory`, or [`target_dir`]'s reading if
/// that cannot be had.
fn cargo_target_dir() -> PathBuf {
    let metadata = Command::new(cargo())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(workspace_root().unwrap_or_default())
        .stderr(std::process::Stdio::null())
        .output();
    metadata
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
        .and_then(|m| m["target_directory"].as_str().map(PathBuf::from))
        .unwrap_or_else(target_dir)
}

/// `path` with the `sbin` directories appended that it lacks: with no
/// `PATH`, the system's usual one; an empty entry (the current
/// directory, to a shell) is dropped.
fn with_sbin(path: Option<OsString>) -> OsString {
    let path = path.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|d| !d.as_os_str().is_empty())
        .collect();
    for sbin in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(sbin)) {
            dirs.push(sbin.into());
        }
    }
    // Only a directory holding `:` cannot be joined; such a PATH is kept.
    std::env::join_paths(&dirs).unwrap_or(path)
}

/// The cargo to run: `$CARGO` (set by `cargo run`, so nested builds use the
/// same toolchain as the one that started xtask), else `cargo` from PATH.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Runs `cargo <args>` from the workspace root with inherited stdin/stdout/
/// stderr, echoing the command first, as a child whose exit code is passed
/// through. For a command that holds a lock while cargo runs (`bench`):
/// the lock's descriptor would not survive an `exec`.
fn run_cargo_passthrough<I, S>(args: I) -> Result<ExitCode>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let (cmd, shown) = cargo_command(args, &[])?;
    run_child(cmd, &shown)
}

/// Runs `cmd` (echoed as `shown`) to its end; its exit code.
fn run_child(mut cmd: Command, shown: &str) -> Result<ExitCode> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    match status.code() {
        Some(0) => Ok(ExitCode::SUCCESS),
        // Exit codes are 0..=255 on Unix; anything else still means failure.
        Some(code) => Ok(u8::try_from(code).map_or(ExitCode::FAILURE, ExitCode::from)),
        None => anyhow::bail!("`{shown}` was killed by a signal ({status})"),
    }
}

/// Runs `cargo <args>` (with extra environment) in xtask's place, echoing
/// the command first: on Unix xtask becomes cargo (which `cargo run` in
/// turn replaces with the program), so that a signal sent to xtask's pid
/// (a script's `kill`, an IDE's stop button) reaches the demo, and no
/// child is left serving its port after xtask has gone. Elsewhere, as
/// [`run_cargo_passthrough`].
fn exec_cargo<I, S>(args: I, env: &[(&str, String)]) -> Result<ExitCode>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let (mut cmd, shown) = cargo_command(args, env)?;
        let error = cmd.exec();
        Err(error).with_context(|| format!("could not start `{shown}`"))
    }
    #[cfg(not(unix))]
    {
        let (cmd, shown) = cargo_command(args, env)?;
        run_child(cmd, &shown)
    }
}

/// `cargo <args>` from the workspace root with `env`, and the command as
/// echoed (already printed): a URL with credentials in it (`--url
/// postgres://app:pw@db/x`) is not shown; the demo prints it itself,
/// password masked.
fn cargo_command<I, S>(args: I, env: &[(&str, String)]) -> Result<(Command, String)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(cargo());
    cmd.args(args)
        .current_dir(workspace_root()?)
        .envs(child_env());
    for (name, value) in env {
        cmd.env(name, value);
    }
    let shown = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .map(|arg| {
            if holds_credentials(&arg) {
                "<url with credentials>".to_owned()
            } else {
                arg
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("$ {shown}");
    Ok((cmd, shown))
}

/// Whether an argument is a URL with credentials in it.
fn holds_credentials(arg: &str) -> bool {
    let lower = arg.to_ascii_lowercase();
    lower.contains("://") && (lower.contains('@') || lower.contains("password="))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `target/`
/// under the workspace root.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| workspace_root().ok().map(|root| root.join("target")))
        .unwrap_or_else(|| PathBuf::from("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loopback names join the hosts of both `NO_PROXY` spellings,
    /// once each; unset or empty ones give them alone; a `*` (every host)
    /// is left alone.
    #[test]
    fn loopback_joins_the_no_proxy_lists_once() {
        let lists = |upper: Option<&str>, lower: Option<&str>| {
            with_loopback(&[upper.map(str::to_owned), lower.map(str::to_owned)])
        };
        assert_eq!(lists(None, None).unwrap(), "127.0.0.1,localhost,::1");
        assert_eq!(lists(Some(""), None).unwrap(), "127.0.0.1,localhost,::1");
        assert_eq!(
            lists(None, Some(" corp.mirror , localhost")).unwrap(),
            "corp.mirror,localhost,127.0.0.1,::1"
        );
        assert_eq!(
            lists(Some("a.example"), Some("b.example,a.example")).unwrap(),
            "a.example,b.example,127.0.0.1,localhost,::1"
        );
        assert_eq!(lists(Some("*"), None), None);
    }

    /// Root's `sbin` directories join a `PATH` that lacks them, once; no
    /// `PATH` is the system's usual one; an empty entry is dropped.
    #[test]
    fn sbin_joins_the_path() {
        let joined = |p: Option<&str>| {
            with_sbin(p.map(OsString::from))
                .into_string()
                .unwrap_or_default()
        };
        assert_eq!(
            joined(Some("/usr/bin:/bin")),
            "/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
        );
        assert_eq!(
            joined(Some("/usr/sbin:/usr/bin")),
            "/usr/sbin:/usr/bin:/usr/local/sbin:/sbin"
        );
        assert_eq!(
            joined(None),
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
        );
        assert!(!joined(Some(":/usr/bin")).starts_with(':'));
        assert!(!joined(Some("/usr/bin::/bin")).contains("::"));
    }
}
