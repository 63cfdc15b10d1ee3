//! Requests per second of one small handler, served by one tokio worker
//! pinned to core 0 while wrk loads it from core 1:
//!
//! - `bare`: the handler alone;
//! - `layer-<store>`: behind the impersonation layer, under a live
//!   impersonation (resolve, shadow user, one audit event per request);
//! - `layer-<store>-tuned`: the same with the idle touch and the policy
//!   re-check written at most every 5 s (`Config`), so resolve is a read;
//! - `layer-<store>-unaudited`: tuned, with `audit_when` off (resolve only);
//! - `ts-<store>`: behind tower-sessions 0.14 with its store on the same
//!   backend, the handler reading one value from the session;
//! - `bare-auth`: the handler behind the stand-in for the host app's own
//!   authentication (which puts the signed-in `Principal` in the request),
//!   reading that user: the app without the SDK;
//! - `layer-ordinary`: behind the layer, a signed-in user who is not
//!   impersonating anyone (the app's everyday traffic: no store call);
//! - `ts-audited-<store>`: tower-sessions as above, and the handler then
//!   writes one raw audit record as the floor does: what a team would build
//!   by hand to keep every access on record;
//! - `floor-<store>`: no SDK, no session: the handler itself writes one
//!   audit-sized JSON record per request before answering (memory: hashed
//!   into a chain under a mutex; Redis: one `XADD`; SQLite and PostgreSQL:
//!   one `INSERT` through a sqlx pool). It is the least any library can do that keeps
//!   "no access without an audit record", and so the ceiling for an audited
//!   request on that backend.
//!
//! Usage: `impersonation-http-bench [--seconds N] [--connections N] [--rounds N] [--instructions] [VARIANT...]`
//! (`cargo xtask bench http`). The `serve` subcommand is internal.
//!
//! `--instructions` runs each server under `valgrind --tool=callgrind` and
//! reports the instructions it executes per request (after a warm-up, all
//! its threads): a count that, unlike requests per second, does not move
//! with the machine's other load, for comparing two versions of the code.
//! It leaves out the database servers' work, and valgrind hides SHA-NI, so
//! SHA-256 counts about ten times what it costs on a CPU that has it.

use std::io::{BufRead, BufReader};
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::extract::Request;
use axum::middleware::{Next, from_fn_with_state};
use axum::routing::get;
use impersonation_axum::{EffectiveUser, ImpersonationLayer};
use impersonation_core::{
    Config, Impersonation, MemoryDirectory, MemoryStore, Principal, Requester, StartRequest, Store,
    TenantId, UserId,
};
use impersonation_testkit::scratch::{scratch_file, unique_name};
use tower_sessions::{Session, SessionManagerLayer};

const VARIANTS: &[&str] = &[
    "bare",
    "bare-auth",
    "layer-ordinary",
    "layer-memory",
    "layer-memory-tuned",
    "layer-memory-unaudited",
    "ts-memory",
    "layer-sqlite",
    "layer-sqlite-tuned",
    "layer-sqlite-unaudited",
    "ts-sqlite",
    "layer-postgres",
    "layer-postgres-tuned",
    "layer-postgres-unaudited",
    "ts-postgres",
    "layer-redis",
    "layer-redis-tuned",
    "layer-redis-unaudited",
    "ts-redis",
    "ts-audited-memory",
    "ts-audited-sqlite",
    "ts-audited-postgres",
    "ts-audited-redis",
    "floor-memory",
    "floor-sqlite",
    "floor-postgres",
    "floor-redis",
];

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        let (Some(variant), Some(port)) = (args.get(1), args.get(2)) else {
            bail!("usage: serve VARIANT PORT");
        };
        let port: u16 = port.parse()?;
        // One tokio worker, as a multi-thread runtime (how servers run;
        // the SQLite store's blocking threads run beside it).
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(serve(variant, port));
    }
    let mut seconds = 10u64;
    let mut connections = 32u32;
    let mut rounds = 1usize;
    let mut mode = Mode::Time;
    let mut chosen = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => seconds = it.next().context("--seconds N")?.parse()?,
            "--connections" => connections = it.next().context("--connections N")?.parse()?,
            "--rounds" => rounds = it.next().context("--rounds N")?.parse::<usize>()?.max(1),
            "--instructions" => mode = Mode::Instructions,
            "--help" | "-h" => {
                println!(
                    "usage: impersonation-http-bench [--seconds N] [--connections N] [--rounds N] [--instructions] [VARIANT...]\nvariants: {}",
                    VARIANTS.join(" ")
                );
                return Ok(());
            }
            v if VARIANTS.contains(&v) => chosen.push(v.to_owned()),
            other => bail!("unknown argument {other}; variants: {}", VARIANTS.join(" ")),
        }
    }
    if chosen.is_empty() {
        chosen = VARIANTS.iter().map(|v| (*v).to_owned()).collect();
    }
    if !chosen.iter().any(|v| v == "bare") {
        chosen.insert(0, "bare".into());
    }
    // Every round measures every variant once, bare first: a ratio is
    // taken within its round, so drift between rounds cancels out. Even
    // rounds take the others in reverse order, so that no variant always
    // follows the same one (in one full run, layer-redis measured 5-15%
    // below layer-redis-tuned, next after it, in every round, and level
    // with it when the two alternated alone; their instructions per
    // request are the same).
    let mut results: Vec<(String, Vec<Sample>)> =
        chosen.iter().map(|v| (v.clone(), Vec::new())).collect();
    let bare = results.iter().position(|(v, _)| v == "bare").unwrap_or(0);
    let others: Vec<usize> = (0..results.len()).filter(|&i| i != bare).collect();
    for round in 1..=rounds {
        let mut order = others.clone();
        if round % 2 == 0 {
            order.reverse();
        }
        for i in std::iter::once(bare).chain(order) {
            let (variant, runs) = &mut results[i];
            let sample = measure(variant, seconds, connections, mode)?;
            match mode {
                Mode::Time => println!(
                    "round {round}: {variant:<26} {:>10.0} req/s  CPU/request: server {:>5.1} us, databases {:>5.1} us",
                    sample.rps, sample.server_us, sample.db_us
                ),
                Mode::Instructions => println!(
                    "round {round}: {variant:<26} {:>10.0} instructions/request (server, under callgrind)",
                    sample.instructions
                ),
            }
            runs.push(sample);
        }
    }
    match mode {
        Mode::Time => report(&results, seconds, connections),
        Mode::Instructions => {
            println!(
                "\nInstructions per request executed by the server process (medians, thousands), \
                 under callgrind: no database servers' work; SHA-256 without SHA-NI\n"
            );
            table(|name| {
                let runs = &results.iter().find(|(v, _)| v == name)?.1;
                let median = median(&mut runs.iter().map(|r| r.instructions).collect::<Vec<_>>());
                Some(format!("{:.1}k", median / 1000.0))
            });
        }
    }
    Ok(())
}

/// What a run measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Requests per second and CPU time per request.
    Time,
    /// Instructions per request, under callgrind.
    Instructions,
}

/// One timed run of one variant.
#[derive(Clone, Copy)]
struct Sample {
    /// Requests per second, as wrk counted them.
    rps: f64,
    /// CPU time of the server process per request, in microseconds.
    server_us: f64,
    /// CPU time of the database servers (Redis, PostgreSQL, MariaDB) per
    /// request, in microseconds.
    db_us: f64,
    /// Instructions the server executed per request (`Mode::Instructions`
    /// only; zero otherwise).
    instructions: f64,
}

/// The database servers whose CPU time is counted per request.
const DATABASE_PROCESSES: &[&str] = &["redis-server", "postgres", "mariadbd", "mysqld"];

/// CPU ticks (user + system) of one process.
fn process_ticks(pid: i32) -> Result<u64> {
    let stat = procfs::process::Process::new(pid)?.stat()?;
    Ok(stat.utime + stat.stime)
}

/// CPU ticks of every database server process running now.
fn database_ticks() -> Result<u64> {
    let mut ticks = 0;
    for process in procfs::process::all_processes()? {
        // A process may exit while the list is read: skip it.
        let Ok(stat) = process.and_then(|p| p.stat()) else {
            continue;
        };
        if DATABASE_PROCESSES.contains(&stat.comm.as_str()) {
            ticks += stat.utime + stat.stime;
        }
    }
    Ok(ticks)
}

/// Waits (up to 20 s) until the machine is nearly idle, so that work left
/// over from the previous variant (PostgreSQL's autovacuum and
/// checkpoints after thousands of inserts, say) does not land on the next
/// one's figure.
fn settle() -> Result<()> {
    let busy_and_total = || -> Result<(u64, u64)> {
        let cpu = <procfs::KernelStats as procfs::CurrentSI>::current()?.total;
        let idle = cpu.idle + cpu.iowait.unwrap_or(0);
        let busy = cpu.user
            + cpu.nice
            + cpu.system
            + cpu.irq.unwrap_or(0)
            + cpu.softirq.unwrap_or(0)
            + cpu.steal.unwrap_or(0);
        Ok((busy, busy + idle))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut last = busy_and_total()?;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = busy_and_total()?;
        let (busy, total) = (now.0 - last.0, now.1 - last.1);
        last = now;
        if total > 0 && busy * 100 < total * 5 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            eprintln!(
                "warning: the machine stayed busy ({}% of CPU) before the next variant",
                busy * 100 / total.max(1)
            );
            return Ok(());
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Median requests/s and median ratio to the same round's bare handler,
/// with the ratios' range when there were several rounds.
fn cell(results: &[(String, Vec<Sample>)], name: &str) -> Option<String> {
    let bare = &results.iter().find(|(v, _)| v == "bare")?.1;
    let runs = &results.iter().find(|(v, _)| v == name)?.1;
    let mut ratios: Vec<f64> = runs.iter().zip(bare).map(|(r, b)| r.rps / b.rps).collect();
    let rps = median(&mut runs.iter().map(|r| r.rps).collect::<Vec<_>>());
    let ratio = median(&mut ratios);
    Some(if ratios.len() > 1 {
        format!(
            "{rps:.0} req/s = {ratio:.2} ({:.2}-{:.2})",
            ratios[0],
            ratios[ratios.len() - 1]
        )
    } else {
        format!("{rps:.0} req/s = {ratio:.2}")
    })
}

/// Median CPU per request, server + databases, in microseconds.
fn cpu_cell(results: &[(String, Vec<Sample>)], name: &str) -> Option<String> {
    let runs = &results.iter().find(|(v, _)| v == name)?.1;
    let server = median(&mut runs.iter().map(|r| r.server_us).collect::<Vec<_>>());
    let db = median(&mut runs.iter().map(|r| r.db_us).collect::<Vec<_>>());
    Some(format!("{server:.1} + {db:.1}"))
}

fn report(results: &[(String, Vec<Sample>)], seconds: u64, connections: u32) {
    let rounds = results.first().map_or(0, |(_, runs)| runs.len());
    println!(
        "\n{seconds} s per variant, {rounds} round(s): medians, and the range of the ratio over rounds; \
         wrk -t1 -c{connections} on core 1, server on core 0 (one tokio worker)\n"
    );
    table(|name| cell(results, name));
    println!(
        "\nCPU per request in microseconds, medians: the server process + the database servers \
         ({}); the cost a request puts on the machine, whichever core it lands on\n",
        DATABASE_PROCESSES.join(", ")
    );
    table(|name| cpu_cell(results, name));
}

/// One table of the report: a row per backend, a column per kind of
/// variant, each cell as `get` gives it for the variant's name.
fn table(get: impl Fn(&str) -> Option<String>) {
    println!(
        "| backend | layer, defaults (audited) | layer, 5 s touch/re-check (audited) | layer, 5 s, audit off | tower-sessions 0.14 | tower-sessions + raw audit write | floor: one raw audit write |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, name) in [
        ("none (bare handler)", "bare"),
        ("none (handler behind the host's auth, no SDK)", "bare-auth"),
        ("none (layer, not impersonating)", "layer-ordinary"),
    ] {
        if let Some(c) = get(name) {
            println!("| {label} | {c} | | | | | |");
        }
    }
    for backend in ["memory", "sqlite", "postgres", "redis"] {
        let or_dash = |name: String| get(&name).unwrap_or_else(|| "-".into());
        println!(
            "| {backend} | {} | {} | {} | {} | {} | {} |",
            or_dash(format!("layer-{backend}")),
            or_dash(format!("layer-{backend}-tuned")),
            or_dash(format!("layer-{backend}-unaudited")),
            or_dash(format!("ts-{backend}")),
            or_dash(format!("ts-audited-{backend}")),
            or_dash(format!("floor-{backend}")),
        );
    }
}

fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(args: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .arg("-s")
        .args(args)
        .output()
        .context("could not run curl (is it installed?)")?;
    if !out.status.success() {
        bail!("curl {args:?} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wrk(
    variant: &str,
    url: &str,
    header: Option<&str>,
    seconds: u64,
    connections: u32,
) -> Result<(f64, u64)> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"));
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    if !out.status.success() {
        bail!(
            "{variant}: wrk failed ({}); is it installed? (`cargo xtask bench http` installs it)\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // A wrong answer spoils the figure; a slow one is part of it, and is
    // reported (wrk counts a request over 2 s as a timeout).
    let socket_errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"));
    let only_timeouts = socket_errors.is_some_and(|e| {
        e.split(',').all(|part| {
            let part = part.trim();
            part.starts_with("timeout") || part.ends_with(" 0")
        })
    });
    if text.contains("Non-2xx or 3xx responses") || (socket_errors.is_some() && !only_timeouts) {
        bail!("{variant}: wrk saw errors:\n{text}");
    }
    if let Some(errors) = socket_errors {
        let max = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Latency"))
            .unwrap_or_default();
        eprintln!("warning: {variant}: requests over 2 s ({errors}); latency avg/stdev/max: {max}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .context("wrk printed no Requests/sec")?
        .trim()
        .parse()
        .context("parsing Requests/sec")?;
    // "  1234567 requests in 6.00s, ..."
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .context("wrk printed no request count")?
        .0
        .trim()
        .parse()
        .context("parsing the request count")?;
    Ok((rps, requests))
}

fn measure(variant: &str, seconds: u64, connections: u32, mode: Mode) -> Result<Sample> {
    settle()?;
    let port = free_port()?;
    let exe = std::env::current_exe()?;
    // callgrind writes its dump beside this path, as `<path>.1`.
    let callgrind_out =
        (mode == Mode::Instructions).then(|| scratch_file("imptest_callgrind", "out"));
    let mut command = Command::new("taskset");
    command.args(["-c", "0"]);
    if let Some(callgrind_out) = &callgrind_out {
        // valgrind runs the server in its own process: the pid stays the server's.
        command
            .args(["valgrind", "--tool=callgrind", "--quiet"])
            .arg(format!("--callgrind-out-file={}", callgrind_out.display()));
    }
    let mut child = command
        .arg(exe)
        .args(["serve", variant, &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("server stdout")?;
    // taskset execs the server: this is the server's own pid.
    let pid = i32::try_from(child.id()).context("server pid")?;
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let header = line
        .strip_prefix("READY")
        .with_context(|| format!("{variant}: server did not start: {line}"))?
        .trim()
        .to_owned();
    let url = format!("http://127.0.0.1:{port}/");
    let header = if variant.starts_with("ts-") {
        let headers = curl(&["-D", "-", "-o", "/dev/null", &format!("{url}login")])?;
        let cookie = headers
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("set-cookie")
                    .then(|| value.trim().to_owned())
            })
            .context("tower-sessions set no cookie")?;
        let pair = cookie.split(';').next().unwrap_or_default().to_owned();
        Some(format!("Cookie: {pair}"))
    } else if header.is_empty() {
        None
    } else {
        Some(header)
    };
    // Each variant must really serve its user before it is timed.
    let mut check = vec!["-f"];
    if let Some(h) = &header {
        check.extend(["-H", h.as_str()]);
    }
    check.push(&url);
    let body = curl(&check)?;
    if !body.starts_with("hello ") || (variant != "bare" && !body.contains("Cora Customer")) {
        bail!("{variant}: unexpected body {body:?}");
    }
    wrk(variant, &url, header.as_deref(), 2, connections)?; // warm-up
    if let Some(callgrind_out) = callgrind_out {
        callgrind_control(&["-z"], pid)?; // count from here
        let (rps, requests) = wrk(variant, &url, header.as_deref(), seconds, connections)?;
        callgrind_control(&["-d"], pid)?; // writes <callgrind_out>.1
        drop(server);
        let dump_path = callgrind_out.with_extension("out.1");
        let dump = std::fs::read_to_string(&dump_path).context("reading callgrind's dump");
        for path in [&callgrind_out, &dump_path] {
            let _ = std::fs::remove_file(path);
        }
        let dump = dump?;
        let total: f64 = dump
            .lines()
            .find_map(|l| l.strip_prefix("summary:"))
            .context("callgrind's dump has no summary")?
            .trim()
            .parse()
            .context("parsing callgrind's summary")?;
        return Ok(Sample {
            rps,
            server_us: 0.0,
            db_us: 0.0,
            instructions: total / requests.max(1) as f64,
        });
    }
    let (server0, db0) = (process_ticks(pid)?, database_ticks()?);
    let (rps, requests) = wrk(variant, &url, header.as_deref(), seconds, connections)?;
    let (server1, db1) = (process_ticks(pid)?, database_ticks()?);
    drop(server);
    let us_per_tick = 1e6 / procfs::ticks_per_second() as f64;
    let per_request = |ticks: u64| ticks as f64 * us_per_tick / requests.max(1) as f64;
    Ok(Sample {
        rps,
        server_us: per_request(server1.saturating_sub(server0)),
        db_us: per_request(db1.saturating_sub(db0)),
        instructions: 0.0,
    })
}

/// Runs `callgrind_control ARGS PID` (zero the counts, dump them).
fn callgrind_control(args: &[&str], pid: i32) -> Result<()> {
    let out = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control (apt-get install valgrind)")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn people() -> Result<(Principal, Principal)> {
    let tenant = TenantId::new("bench")?;
    let agent = Principal::new(UserId::new("agent")?, "Abe Agent", tenant.clone())
        .with_permissions(["impersonation:start", "bookings:read"]);
    let customer = Principal::new(UserId::new("customer")?, "Cora Customer", tenant)
        .with_permissions(["bookings:read"]);
    Ok((agent, customer))
}

/// The stand-in for the host app's own authentication: it puts the
/// signed-in `Principal` into every request, one clone per request. The
/// person is shared state (an `Arc`): a closure holding the `Principal`
/// itself would be cloned with the closure by `from_fn` on every request,
/// charging the variants behind it three clones of a person per request,
/// which no real auth layer pays and tower-sessions' variants, having no
/// such layer, would not.
async fn signed_in(
    axum::extract::State(user): axum::extract::State<Arc<Principal>>,
    mut req: Request,
    next: Next,
) -> axum::response::Response {
    req.extensions_mut().insert(Principal::clone(&user));
    next.run(req).await
}

async fn store_for(backend: &str) -> Result<Arc<dyn Store>> {
    use impersonation_diesel::{DieselConfig, DieselStore};
    Ok(match backend {
        "memory" => Arc::new(MemoryStore::new()),
        "sqlite" => {
            let path = scratch_file("imptest_bench", "db");
            Arc::new(
                DieselStore::connect_and_migrate(DieselConfig::new(format!(
                    "sqlite://{}",
                    path.display()
                )))
                .await?,
            )
        }
        "postgres" => Arc::new(
            DieselStore::connect_and_migrate(
                DieselConfig::new(PG_URL).schema(unique_name("imptest_bench")),
            )
            .await?,
        ),
        "redis" => {
            let config = impersonation_redis::RedisConfig::new(REDIS_URL)?
                .namespace(&unique_name("imptest_bench"))?;
            Arc::new(impersonation_redis::RedisStore::connect(config).await?)
        }
        other => bail!("unknown backend {other}"),
    })
}

async fn serve(variant: &str, port: u16) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let (app, ready) = if variant == "bare" {
        let app = Router::new().route("/", get(|| async { "hello world" }));
        (app, String::new())
    } else if variant == "bare-auth" {
        // The app without the SDK: the same host auth and a handler that
        // reads the signed-in user, so `layer-ordinary` against this is
        // what the layer adds to everyday traffic.
        let (_, customer) = people()?;
        let app = Router::new()
            .route(
                "/",
                get(
                    |axum::Extension(user): axum::Extension<Principal>| async move {
                        format!("hello {}", user.display_name)
                    },
                ),
            )
            .layer(from_fn_with_state(Arc::new(customer), signed_in));
        let csrf = "c".repeat(43);
        (app, format!("Cookie: impersonation-csrf={csrf}"))
    } else if variant == "layer-ordinary" {
        let (agent, customer) = people()?;
        let directory = MemoryDirectory::new();
        directory.insert(agent);
        let service = Impersonation::new(MemoryStore::new(), directory);
        let app = Router::new()
            .route(
                "/",
                get(|user: EffectiveUser| async move { format!("hello {}", user.display_name()) }),
            )
            .layer(ImpersonationLayer::new(service).development_mode())
            // The host app's auth: an ordinary customer, signed in.
            .layer(from_fn_with_state(Arc::new(customer), signed_in));
        // A browser that already holds its CSRF cookie.
        let csrf = "c".repeat(43);
        (app, format!("Cookie: impersonation-csrf={csrf}"))
    } else if let Some(rest) = variant.strip_prefix("layer-") {
        let (backend, tuned, audited) = if let Some(b) = rest.strip_suffix("-unaudited") {
            (b, true, false)
        } else if let Some(b) = rest.strip_suffix("-tuned") {
            (b, true, true)
        } else {
            (rest, false, true)
        };
        let (agent, customer) = people()?;
        let directory = MemoryDirectory::new();
        directory.insert(agent.clone());
        directory.insert(customer.clone());
        let mut service = Impersonation::new(store_for(backend).await?, directory);
        if tuned {
            service = service.with_config(Config {
                touch_interval: time::Duration::seconds(5),
                recheck_interval: time::Duration::seconds(5),
                ..Config::default()
            });
        }
        let started = service
            .start(
                Requester::User(&agent),
                StartRequest::new(customer.id.clone(), "Load bench session"),
            )
            .await?;
        let mut layer = ImpersonationLayer::new(service).development_mode();
        if !audited {
            layer = layer.audit_when(|_, _| false);
        }
        let app = Router::new()
            .route(
                "/",
                get(|user: EffectiveUser| async move { format!("hello {}", user.display_name()) }),
            )
            .layer(layer)
            // The host app's auth: the signed-in agent.
            .layer(from_fn_with_state(Arc::new(agent), signed_in));
        (
            app,
            format!("Authorization: Bearer {}", started.secret.expose()),
        )
    } else if let Some(backend) = variant.strip_prefix("floor-") {
        (floor_app(backend).await?, String::new())
    } else if let Some(rest) = variant.strip_prefix("ts-") {
        // `ts-audited-*`: what a team would build by hand to keep "no access
        // without an audit record": the session read, then one raw write.
        let (backend, audit) = match rest.strip_prefix("audited-") {
            Some(backend) => (backend, Some(RawAudit::open(backend).await?)),
            None => (rest, None),
        };
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let app = Router::new()
            .route(
                "/",
                get(move |session: Session| async move {
                    let user = match session.get::<String>("user").await {
                        Ok(Some(user)) => user,
                        _ => return Ok("hello nobody".to_owned()),
                    };
                    if let Some(audit) = &audit {
                        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        audit.write(floor_record(n)).await?;
                    }
                    Ok::<_, axum::http::StatusCode>(format!("hello {user}"))
                }),
            )
            .route(
                "/login",
                get(|session: Session| async move {
                    match session.insert("user", "Cora Customer").await {
                        Ok(()) => "signed in",
                        Err(_) => "failed",
                    }
                }),
            );
        let app = match backend {
            "memory" => app.layer(
                SessionManagerLayer::new(tower_sessions::MemoryStore::default()).with_secure(false),
            ),
            "sqlite" => {
                use tower_sessions_sqlx_store::{SqliteStore, sqlx::SqlitePool};
                let path = scratch_file("imptest_bench", "db");
                let pool =
                    SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?;
                let store = SqliteStore::new(pool);
                store.migrate().await?;
                app.layer(SessionManagerLayer::new(store).with_secure(false))
            }
            "postgres" => {
                use tower_sessions_sqlx_store::{PostgresStore, sqlx::PgPool};
                let pool = PgPool::connect(PG_URL).await?;
                let store = PostgresStore::new(pool)
                    .with_schema_name(unique_name("imptest_bench"))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                store.migrate().await?;
                app.layer(SessionManagerLayer::new(store).with_secure(false))
            }
            "redis" => {
                use tower_sessions_redis_store::RedisStore;
                use tower_sessions_redis_store::fred::prelude::{ClientLike, Config, Pool};
                let pool = Pool::new(Config::from_url(REDIS_URL)?, None, None, None, 6)?;
                pool.init().await?;
                app.layer(SessionManagerLayer::new(RedisStore::new(pool)).with_secure(false))
            }
            other => bail!("unknown backend {other}"),
        };
        (app, String::new())
    } else {
        bail!("unknown variant {variant}");
    };
    println!("READY {ready}");
    axum::serve(listener, app).await?;
    Ok(())
}

/// One audit-sized record, as JSON (what the layer's access event holds).
fn floor_record(n: u64) -> String {
    serde_json::json!({
        "id": uuid::Uuid::now_v7(),
        "at_us": time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000,
        "seq": n,
        "action": "access",
        "actor": {"kind": "user", "id": "agent", "name": "Abe Agent"},
        "subject": {"id": "customer", "name": "Cora Customer"},
        "tenant": "bench",
        "session": "0193f1a2-7c3e-7b1a-9c55-0a1b2c3d4e5f",
        "details": {"method": "GET", "route": "/", "status": 200},
    })
    .to_string()
}

/// One raw audit write per request, as a team would hand-build it: the
/// floor variants call it alone, the `ts-audited-*` ones after reading the
/// tower-sessions session.
#[derive(Clone)]
enum RawAudit {
    /// A hash chain under a mutex, every record kept.
    Memory(Arc<std::sync::Mutex<([u8; 32], Vec<String>)>>),
    /// One `XADD` per record.
    Redis(redis::aio::MultiplexedConnection, Arc<str>),
    /// One committed `INSERT` per record (WAL, synchronous=FULL).
    Sqlite(tower_sessions_sqlx_store::sqlx::SqlitePool),
    /// One committed `INSERT` per record.
    Postgres(tower_sessions_sqlx_store::sqlx::PgPool, Arc<str>),
}

impl RawAudit {
    async fn open(backend: &str) -> Result<Self> {
        use tower_sessions_sqlx_store::sqlx::{self, PgPool, SqlitePool, sqlite};
        Ok(match backend {
            "memory" => Self::Memory(Arc::default()),
            "redis" => {
                let client = redis::Client::open(REDIS_URL)?;
                let conn = client.get_multiplexed_async_connection().await?;
                Self::Redis(
                    conn,
                    format!("{}:floor", unique_name("imptest_bench")).into(),
                )
            }
            "sqlite" => {
                // WAL and synchronous=FULL: each commit on disk, as our SQLite store does.
                let options = sqlite::SqliteConnectOptions::new()
                    .filename(scratch_file("imptest_bench", "db"))
                    .create_if_missing(true)
                    .journal_mode(sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlite::SqliteSynchronous::Full);
                let pool = SqlitePool::connect_with(options).await?;
                sqlx::query("CREATE TABLE floor (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
                    .execute(&pool)
                    .await?;
                Self::Sqlite(pool)
            }
            "postgres" => {
                let pool = PgPool::connect(PG_URL).await?;
                let table = unique_name("imptest_bench");
                sqlx::query(&format!(
                    "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)"
                ))
                .execute(&pool)
                .await?;
                Self::Postgres(
                    pool,
                    format!("INSERT INTO {table} (body) VALUES ($1)").into(),
                )
            }
            other => bail!("no raw audit writer for {other}"),
        })
    }

    /// Writes one record; `Err` if the backend refused it.
    async fn write(&self, record: String) -> Result<(), axum::http::StatusCode> {
        use sha2::{Digest, Sha256};
        use tower_sessions_sqlx_store::sqlx;
        fn unavailable<E>(_: E) -> axum::http::StatusCode {
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
        match self {
            Self::Memory(chain) => {
                let mut chain = chain.lock().unwrap_or_else(|e| e.into_inner());
                let hash: [u8; 32] = Sha256::new()
                    .chain_update(chain.0)
                    .chain_update(record.as_bytes())
                    .finalize()
                    .into();
                chain.0 = hash;
                chain.1.push(record);
                Ok(())
            }
            Self::Redis(conn, key) => {
                let mut conn = conn.clone();
                redis::cmd("XADD")
                    .arg(&**key)
                    .arg("*")
                    .arg("e")
                    .arg(record)
                    .query_async::<String>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(unavailable)
            }
            Self::Sqlite(pool) => sqlx::query("INSERT INTO floor (body) VALUES ($1)")
                .bind(record)
                .execute(pool)
                .await
                .map(drop)
                .map_err(unavailable),
            Self::Postgres(pool, insert) => sqlx::query(insert)
                .bind(record)
                .execute(pool)
                .await
                .map(drop)
                .map_err(unavailable),
        }
    }
}

/// The floor variants: the handler writes one record per request itself.
async fn floor_app(backend: &str) -> Result<Router> {
    use std::sync::atomic::{AtomicU64, Ordering};

    let counter = Arc::new(AtomicU64::new(0));
    let audit = RawAudit::open(backend).await?;
    Ok(Router::new().route(
        "/",
        get(move || async move {
            let record = floor_record(counter.fetch_add(1, Ordering::Relaxed));
            audit.write(record).await.map(|()| "hello Cora Customer")
        }),
    ))
}
