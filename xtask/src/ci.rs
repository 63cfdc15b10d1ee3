//! `cargo xtask ci`: everything CI checks, in order, as one command.
//!
//! Every step runs even after an earlier one failed, so one run shows all
//! problems; the exit code is non-zero if any step failed. The last line is
//! `N passed, M failed`, summed over every libtest `test result:` line, so
//! CI can tell a green run from one that executed no test at all (which
//! counts as a failure here too).

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use xshell::{Shell, cmd};

/// `println!` that goes on when stdout has gone (`| head`, a log pipe
/// closed): the run still ends as its steps say, with its exit code.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// One CI step. Steps run in the order of [`steps`]; append to that list to
/// add one (e.g. a browser test).
struct Step {
    /// Shown in the step's header and in the summary.
    name: &'static str,
    /// Does the work; an error marks the step failed.
    run: fn(&mut Ci) -> Result<()>,
}

/// State shared by the steps.
struct Ci {
    /// Runs from the workspace root with `RUST_BACKTRACE=1`.
    sh: Shell,
    /// Everything the test runs printed on stdout, kept for counting.
    test_output: String,
    /// When the run's budget is spent: no test run goes on past it.
    deadline: Instant,
}

/// Packages built with only some of their features, as an app that picks
/// one would build them: `(package, features)`.
const SINGLE_FEATURE_SETS: &[(&str, &str)] = &[
    ("impersonation-diesel", "sqlite"),
    ("impersonation-diesel", "postgres"),
    ("impersonation-diesel", "mysql"),
    ("impersonation-diesel", "postgres-tls"),
    ("impersonation-redis", ""),
    ("impersonation-redis", "tls"),
    ("impersonation-oidc", ""),
    ("impersonation-axum", ""),
];

/// The SDK's crates, whose docs are also built one at a time, with their
/// own default features, as docs.rs builds them.
const SDK_CRATES: &[&str] = &[
    "impersonation-core",
    "impersonation-axum",
    "impersonation-diesel",
    "impersonation-redis",
    "impersonation-oidc",
    "impersonation-testkit",
];

/// The CI steps, in order.
fn steps() -> Vec<Step> {
    vec![
        Step {
            name: "services up",
            run: |_| crate::services::up(),
        },
        Step {
            name: "cargo fmt --all --check",
            run: |ci| {
                let cargo = crate::cargo();
                cmd!(ci.sh, "{cargo} fmt --all --check").run()?;
                Ok(())
            },
        },
        Step {
            name: "cargo clippy",
            run: |ci| {
                let cargo = crate::cargo();
                cmd!(
                    ci.sh,
                    "{cargo} clippy --workspace --all-targets --locked -- -D warnings"
                )
                .run()?;
                Ok(())
            },
        },
        Step {
            name: "cargo clippy, one feature set at a time",
            run: |ci| {
                // The workspace build unifies features (the demo turns on
                // every backend), so a build with one backend, as a user
                // picks it, is checked here on its own.
                let cargo = crate::cargo();
                for (package, features) in SINGLE_FEATURE_SETS {
                    cmd!(
                        ci.sh,
                        "{cargo} clippy --package {package} --no-default-features --features {features} --all-targets --locked -- -D warnings"
                    )
                    .run()?;
                }
                Ok(())
            },
        },
        Step {
            name: "the load bench builds, formatted and lint-free, from its Cargo.lock",
            run: |ci| {
                // The load bench is a workspace of its own (it keeps sqlx
                // and fred out of the SDK's build), built with `--locked`
                // by `cargo xtask bench http`: an SDK change must neither
                // break its code nor leave its lock file behind. Checked,
                // not built for speed: the bench's release build is its own.
                let cargo = crate::cargo();
                let manifest = crate::bench::HTTP_BENCH;
                // In the workspace's own target directory, not a second
                // tree under benches/http-load.
                let target = crate::cargo_target_dir();
                cmd!(ci.sh, "{cargo} fmt --manifest-path {manifest} --check").run()?;
                cmd!(
                    ci.sh,
                    "{cargo} clippy --locked --manifest-path {manifest} --target-dir {target} --all-targets -- -D warnings"
                )
                .run()?;
                Ok(())
            },
        },
        Step {
            name: "cargo doc",
            run: |ci| {
                // The public API's docs build without a warning (a broken
                // link, stray HTML): what a user reads on docs.rs.
                // The workspace unifies features: a link that only an
                // optional feature resolves is caught by the second pass.
                let cargo = crate::cargo();
                let _flags = ci.sh.push_env("RUSTDOCFLAGS", "-D warnings");
                cmd!(ci.sh, "{cargo} doc --workspace --no-deps --locked").run()?;
                for package in SDK_CRATES {
                    cmd!(ci.sh, "{cargo} doc --package {package} --no-deps --locked").run()?;
                }
                Ok(())
            },
        },
        Step {
            name: "reset test databases",
            run: |ci| crate::services::reset_test_databases(&ci.sh, &crate::target_dir()),
        },
        Step {
            name: "cargo test",
            run: |ci| {
                // Doc tests run even if the other tests failed: the summary
                // should count everything.
                // `--no-fail-fast`: a failing test binary does not hide
                // the ones after it.
                let all_targets =
                    ci.cargo_test(&["--workspace", "--all-targets", "--locked", "--no-fail-fast"]);
                let doc = ci.cargo_test(&["--workspace", "--doc", "--locked", "--no-fail-fast"]);
                all_targets.and(doc)
            },
        },
    ]
}

/// Runs every step and prints the summary; the exit code is the verdict.
pub(crate) fn run() -> Result<ExitCode> {
    // For the whole run: its tests' schemas must outlive it, and two builds
    // at once would only slow each other down on a small machine.
    let _lock = crate::services::lock_test_services()?;
    let sh = crate::root_shell()?;
    // CARGO_TARGET_DIR, if set, reaches cargo simply by inheritance: every
    // child gets our environment plus this.
    sh.set_var("RUST_BACKTRACE", "1");
    let started = Instant::now();
    let mut ci = Ci {
        sh,
        test_output: String::new(),
        deadline: started + RUN_BUDGET,
    };

    let mut failed_steps = Vec::new();
    for step in steps() {
        say!("\n==> {}", step.name);
        let step_started = Instant::now();
        let result = (step.run)(&mut ci);
        let elapsed = step_started.elapsed().as_secs_f64();
        match result {
            Ok(()) => say!("==> {}: ok ({elapsed:.1}s)", step.name),
            Err(err) => {
                say!("==> {}: FAILED ({elapsed:.1}s): {err:#}", step.name);
                failed_steps.push(step.name);
            }
        }
    }

    let counts = count_tests(&ci.test_output);
    say!("\n==> summary ({:.1}s)", started.elapsed().as_secs_f64());
    let mut ok = true;
    if !failed_steps.is_empty() {
        say!("failed steps: {}", failed_steps.join(", "));
        ok = false;
    }
    if counts.passed == 0 {
        say!("no test passed: a run that executes no test is a failure");
        ok = false;
    }
    // A failed test also fails its step; checked anyway in case a step
    // ever tolerates its command's exit code.
    if counts.failed > 0 {
        say!("{} test(s) failed", counts.failed);
        ok = false;
    }
    // The verdict line, last and alone on its line, for CI to read.
    say!("{} passed, {} failed", counts.passed, counts.failed);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

impl Ci {
    /// Runs `cargo test <args>`, echoing its stdout live while keeping a copy
    /// in `test_output` (stderr, where cargo reports progress, is inherited).
    fn cargo_test(&mut self, args: &[&str]) -> Result<()> {
        let shown = format!("cargo test {}", args.join(" "));
        // Its own deadline, or what is left of the run's, if sooner: a
        // run whose budget the steps before spent fails here, saying so,
        // rather than starting tests only to stop them.
        let limit = TEST_DEADLINE.min(self.deadline.saturating_duration_since(Instant::now()));
        if limit < LEAST_TEST_TIME {
            bail!(
                "the run's time was spent before `{shown}` could run ({} s left)",
                limit.as_secs()
            );
        }
        eprintln!("$ {shown}");
        let mut child = Command::new(crate::cargo())
            .arg("test")
            .args(args)
            .current_dir(self.sh.current_dir())
            .envs(crate::child_env())
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start `{shown}`"))?;
        let stdout = child.stdout.take().context("child has no stdout pipe")?;
        let watchdog = Watchdog::start(child.id(), limit, shown.clone());

        // Bytes, not `lines()`: a test may print invalid UTF-8, which must
        // not abort the run.
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        let mut out = std::io::stdout().lock();
        // Echoed while stdout takes it: a reader that goes away (`| head`,
        // a log pipe closed) stops the echo, not the reading, so the run
        // goes on to its end under the watchdog and holds its lock till
        // then, and its counts are still taken.
        let mut echo = true;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if echo && out.write_all(&line).and_then(|()| out.flush()).is_err() {
                echo = false;
            }
            self.test_output.push_str(&String::from_utf8_lossy(&line));
        }
        drop(out);

        let status = child.wait()?;
        if watchdog.finish() {
            bail!(
                "`{shown}` ran past its {} s and was stopped (a test hangs?)",
                limit.as_secs()
            );
        }
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    }
}

/// The fields of `/proc/<pid>/stat` after the process's name (state,
/// parent, …) for the process directory `proc_dir`. The name may hold
/// spaces and parentheses, so the fields are read after its last `)`.
fn stat_fields(proc_dir: &std::path::Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Every process under `pid` (children, theirs, …), read from `/proc`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let ppid = stat_fields(&entry.path())
            .and_then(|fields| fields.get(1).and_then(|p| p.parse::<u32>().ok()));
        if let Some(ppid) = ppid {
            parents.push((child, ppid));
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p && !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

/// How long one `cargo test` run (build included) may take before CI stops
/// it: a hung test fails the run instead of holding the machine (and the
/// test-services lock) forever. A cold run takes under 10 minutes here.
const TEST_DEADLINE: Duration = Duration::from_secs(45 * 60);

/// The least time a `cargo test` run is started with: less is left only
/// when the steps before it spent the run's time.
const LEAST_TEST_TIME: Duration = Duration::from_secs(60);

/// How long the whole run may take before its test runs are stopped (CI
/// allows 90 minutes; a cold run takes about ten).
const RUN_BUDGET: Duration = Duration::from_secs(80 * 60);

/// Kills a process, and every process under it, that outlives its
/// deadline. (By the tree, not a process group of its own: that would
/// take cargo out of the terminal's foreground group, and Ctrl-C would no
/// longer reach it.)
struct Watchdog {
    done: Arc<(Mutex<bool>, Condvar)>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(pid: u32, deadline: Duration, what: String) -> Self {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let fired = Arc::new(AtomicBool::new(false));
        let (d, f) = (Arc::clone(&done), Arc::clone(&fired));
        std::thread::spawn(move || {
            let (lock, cvar) = &*d;
            let Ok(guard) = lock.lock() else { return };
            let Ok((guard, timeout)) = cvar.wait_timeout_while(guard, deadline, |done| !*done)
            else {
                return;
            };
            if timeout.timed_out() && !*guard {
                f.store(true, Ordering::SeqCst);
                eprintln!("`{what}` passed its deadline; stopping it and its tests");
                // The run itself first: killed after its children, it
                // could see them die and exit on its own, with a status
                // of its choosing (seen: `sh` ending 0 after its `wait`).
                // Its children, found before it dies (then they belong to
                // init), follow in the same command.
                // The shell's own `kill`: a machine without procps has no
                // `kill` program, and a kill that failed would leave the
                // run hung, holding the test-services lock.
                let mut tree = vec![pid];
                tree.extend(descendants(pid));
                let killed = Command::new("sh")
                    .args(["-c", "kill -9 \"$@\"", "sh"])
                    .args(tree.iter().map(u32::to_string))
                    .status();
                match killed {
                    Ok(status) if status.success() => {}
                    // Some may have ended on their own meanwhile; the rest
                    // are gone, or the run waits on them still.
                    Ok(status) => eprintln!("`kill -9 {tree:?}` ended with {status}"),
                    Err(err) => eprintln!("could not stop `{what}` ({tree:?}): {err}"),
                }
            }
        });
        Self { done, fired }
    }

    /// Stops watching; whether the deadline had passed.
    fn finish(self) -> bool {
        let (lock, cvar) = &*self.done;
        if let Ok(mut done) = lock.lock() {
            *done = true;
        }
        cvar.notify_all();
        self.fired.load(Ordering::SeqCst)
    }
}

/// Test counts summed over a run's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
}

/// Sums every libtest summary line, e.g.
/// `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
fn count_tests(output: &str) -> Counts {
    let mut counts = Counts::default();
    for line in output.lines() {
        // Anchored at the line start so a test's own output quoting such a
        // line (indented, or mid-line) is not counted.
        let Some(rest) = line.strip_prefix("test result: ") else {
            continue;
        };
        // Skip the verdict ("ok." / "FAILED."): the counts tell it all.
        let Some((_, fields)) = rest.split_once(". ") else {
            continue;
        };
        for field in fields.split(';') {
            let mut words = field.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => counts.passed += n,
                "failed" => counts.failed += n,
                _ => {}
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> std::process::Child {
        Command::new("sh").args(["-c", script]).spawn().unwrap()
    }

    /// Whether `pid` is still running (not gone, not a zombie).
    fn running(pid: u32) -> bool {
        stat_fields(std::path::Path::new(&format!("/proc/{pid}")))
            .is_some_and(|fields| fields.first().is_some_and(|state| state != "Z"))
    }

    /// A run past its deadline is stopped, with the processes it started.
    #[test]
    fn the_watchdog_stops_a_hung_run_and_its_children() {
        let started = Instant::now();
        let mut child = shell("sleep 30 & sleep 31; wait");
        std::thread::sleep(Duration::from_millis(200));
        let sleeps = descendants(child.id());
        assert_eq!(sleeps.len(), 2, "{sleeps:?}");
        let watchdog = Watchdog::start(child.id(), Duration::from_millis(300), "sleep".into());
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(watchdog.finish(), "it fired");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not left to run"
        );
        std::thread::sleep(Duration::from_millis(200));
        for pid in sleeps {
            assert!(!running(pid), "sleep {pid} is gone");
        }
    }

    /// A run that ends in time is left alone.
    #[test]
    fn the_watchdog_leaves_a_run_that_ends_in_time() {
        let mut child = shell("true");
        let watchdog = Watchdog::start(child.id(), Duration::from_secs(30), "true".into());
        assert!(child.wait().unwrap().success());
        assert!(!watchdog.finish());
    }

    #[test]
    fn sums_every_result_line() {
        let output = "\
running 3 tests
test a ... ok
test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
        assert_eq!(
            count_tests(output),
            Counts {
                passed: 8,
                failed: 2
            }
        );
    }

    #[test]
    fn ignores_other_lines() {
        let output = "  test result: ok. 9 passed; 9 failed;\nsaid test result: ok. 1 passed;\n";
        assert_eq!(count_tests(output), Counts::default());
    }

    #[test]
    fn no_output_counts_nothing() {
        assert_eq!(count_tests(""), Counts::default());
    }
}
