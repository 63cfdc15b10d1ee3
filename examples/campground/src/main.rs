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
  --url URL        the store's URL (default: a file under target/demo for
                   SQLite, the local server for the others)
  --port N         port on 127.0.0.1 (default 3000; 0 picks a free one)
  --walkthrough    play the story over HTTP and print the audit table, then exit
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
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--store" => parsed.store = value("--store")?.parse().map_err(anyhow::Error::msg)?,
            "--url" => parsed.url = Some(value("--url")?),
            "--port" => {
                parsed.port = value("--port")?
                    .parse()
                    .context("--port takes a number from 0 to 65535")?;
            }
            "--walkthrough" => parsed.walkthrough = true,
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown argument `{other}`\n\n{HELP}"),
        }
    }
    Ok(Some(parsed))
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target")
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
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
