//! `cargo xtask demo [--store KIND] [--url URL] [--port N] [--walkthrough]`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use campground_demo::{Demo, StoreKind, seed, walkthrough};
use tracing_subscriber::EnvFilter;

const HELP: &str = "\
campground-demo: a campground-management SaaS with the impersonation SDK wired in

USAGE: cargo xtask demo [OPTIONS]

OPTIONS:
  --store KIND     sqlite (default), postgres, mariadb, redis or memory
  --url URL        the store's URL (default: a file under target/demo, or
                   $CARGO_TARGET_DIR/demo, for SQLite, the local server
                   for the others); without
                   --store, the store its scheme names
  --port N         port on 127.0.0.1 (default 3000; 0 picks a free one)
  --walkthrough    play the story over HTTP (on a free port) and print the
                   audit table, then exit
  -h, --help       this text";

struct Args {
    store: StoreKind,
    url: Option<String>,
    port: u16,
    walkthrough: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Args>> {
    let mut parsed = Args {
        store: StoreKind::Sqlite,
        url: None,
        port: 3000,
        walkthrough: false,
    };
    let mut store_given = false;
    while let Some(arg) = args.next() {
        // `--store postgres` and `--store=postgres` alike.
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || match &inline {
            Some(v) => Ok(v.clone()),
            None => args.next().with_context(|| format!("{name} needs a value")),
        };
        match name {
            "--store" => {
                parsed.store = value()?.parse().map_err(anyhow::Error::msg)?;
                store_given = true;
            }
            "--url" => parsed.url = Some(value()?),
            "--port" => {
                parsed.port = value()?
                    .parse()
                    .context("--port takes a number from 0 to 65535")?;
            }
            "--walkthrough" if inline.is_none() => parsed.walkthrough = true,
            "-h" | "--help" if inline.is_none() => return Ok(None),
            _ => bail!("unknown argument `{arg}`\n\n{HELP}"),
        }
    }
    // A URL alone names its store.
    if let (false, Some(url)) = (store_given, &parsed.url) {
        parsed.store = StoreKind::of_url(url).with_context(|| {
            format!(
                "`{}` names no store this demo offers; pass --store",
                impersonation_core::redacted_url(url)
            )
        })?;
    }
    Ok(Some(parsed))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` when set (as for the
/// tests' files and the screenshots), else the workspace's `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let Some(args) = parse(std::env::args().skip(1))? else {
        println!("{HELP}");
        return Ok(());
    };
    let default_level = if args.walkthrough { "error" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();

    let url = match (&args.url, args.walkthrough, args.store) {
        (Some(url), _, _) => url.clone(),
        // The walkthrough starts from an empty SQLite file each time.
        (None, true, StoreKind::Sqlite) => {
            let file = target_dir().join("demo").join("walkthrough.sqlite3");
            for suffix in ["", "-wal", "-shm"] {
                let mut name = file.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(name);
            }
            format!("sqlite://{}", file.display())
        }
        (None, _, kind) => kind.default_url(&target_dir()),
    };
    let demo = Demo::open(args.store, &url).await?;
    let port = if args.walkthrough { 0 } else { args.port };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port} (try --port 0)"))?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    let app = demo.router(&base)?;

    if args.walkthrough {
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let color = std::io::stdout().is_terminal();
        let result = walkthrough::run(&base, &mut std::io::stdout(), color).await;
        server.abort();
        return result;
    }

    // A session whose agent walked away gets its end on the trail within
    // a minute of lapsing, not only when someone next uses it.
    let sweeper = Arc::clone(demo.service());
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            every.tick().await;
            if let Err(e) = sweeper.end_lapsed().await {
                tracing::warn!(error = %e, "could not end lapsed impersonation sessions");
            }
        }
    });

    println!("Campground Cloud (impersonation SDK demo) is running.");
    println!();
    println!("  Open {base} in your browser.");
    println!(
        "  Store: {} ({})",
        args.store,
        impersonation_core::redacted_url(&url)
    );
    println!();
    println!("Seeded people (sign in as anyone; it is a demo):");
    for p in seed::people()? {
        println!("  {:<14} {}", p.display_name, seed::describe(&p));
    }
    println!();
    println!("Try it: sign in as Sam Support, open the Support console, impersonate");
    println!("Olive Owner with a reason; see the banner, open Billing (refused) and");
    println!("Profile (card masked), press Stop, then read the Audit trail and verify it.");
    println!();
    println!("API (RFC 8693 token exchange): a signed-in agent gets their own access token");
    println!("at POST {base}/idp/token, exchanges it at POST {base}/oidc/token (client");
    println!(
        "{}:{}) for an impersonation token, and calls GET {base}/api/bookings with it.",
        campground_demo::api::CLIENT_ID,
        campground_demo::api::CLIENT_SECRET
    );
    println!("`cargo xtask demo --walkthrough` plays all of this over HTTP. Ctrl-C stops.");
    // Ctrl-C: the server takes no new connection and lets the requests in
    // flight finish, but gives them at most `SHUTDOWN_GRACE`: the
    // dashboard's live line is an event stream that does not end by
    // itself, and a tab left open on it would keep the demo running.
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signalled = Arc::clone(&stopping);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = tokio::signal::ctrl_c().await;
        signalled.notify_one();
    });
    tokio::select! {
        served = std::future::IntoFuture::into_future(server) => served?,
        () = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {}
    }
    Ok(())
}

/// How long Ctrl-C waits for requests in flight (open event streams among
/// them) before the demo exits.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn args(line: &str) -> Result<Option<Args>> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn options_take_their_value_after_a_space_or_an_equals_sign() {
        let a = args("--store=postgres --port=0 --walkthrough")
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.store, a.port, a.walkthrough),
            (StoreKind::Postgres, 0, true)
        );
        let a = args("--store redis --url redis://127.0.0.1:6380")
            .unwrap()
            .unwrap();
        assert_eq!(a.store, StoreKind::Redis);
        assert_eq!(a.url.as_deref(), Some("redis://127.0.0.1:6380"));
        assert!(args("--help").unwrap().is_none());
        for bad in [
            "--walkthrough=yes",
            "--store=oracle",
            "--port=x",
            "--frobnicate",
            "--url",
        ] {
            assert!(args(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_url_alone_names_its_store() {
        let a = args("--url postgres://postgres@127.0.0.1/test")
            .unwrap()
            .unwrap();
        assert_eq!(a.store, StoreKind::Postgres);
        let a = args("--url=mysql://root@127.0.0.1/test").unwrap().unwrap();
        assert_eq!(a.store, StoreKind::Mariadb);
        assert_eq!(args("").unwrap().unwrap().store, StoreKind::Sqlite);
        assert!(args("--url http://127.0.0.1").is_err());
        // An explicit store stays, and connecting then refuses the mismatch.
        let a = args("--store memory --url postgres://h/db")
            .unwrap()
            .unwrap();
        assert_eq!(a.store, StoreKind::Memory);
    }
}
