//! The whole flow in a real browser: Debian's headless Chromium, driven
//! through chromedriver (WebDriver) by fantoccini. `cargo xtask ci`
//! installs both when they are missing. Screenshots land in
//! `<target>/screenshots/` for people to look at.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use campground_demo::{Demo, StoreKind};
use fantoccini::{Client, ClientBuilder, Locator};
use impersonation_testkit::scratch::{scratch_file, target_dir};

fn find_binary(env: &str, candidates: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{} not found (set {env}); `cargo xtask ci` installs Debian's chromium and chromium-driver, \
                 or run `apt-get install chromium chromium-driver`",
                candidates[0]
            )
        })
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let binary = find_binary(
            "CHROMEDRIVER",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
        );
        // The port is free when drawn, then released for chromedriver to
        // bind: should another test's server take it meanwhile,
        // chromedriver exits, and another port is drawn.
        for _ in 0..5 {
            let port = impersonation_testkit::scratch::released_port();
            let mut child = Command::new(&binary)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // it could not bind the port
                }
                if is_chromedriver(port) {
                    return Self {
                        child,
                        url: format!("http://127.0.0.1:{port}"),
                    };
                }
                assert!(Instant::now() < deadline, "chromedriver did not listen");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("chromedriver found its port taken five times");
    }
}

/// Whether chromedriver answers on `port` (not another test's server
/// that took the port): its `/status` names it.
fn is_chromedriver(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    // Read until it names itself, the answer ends, or 5 s pass.
    let mut answer = Vec::new();
    let mut chunk = [0_u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut chunk) {
        answer.extend_from_slice(&chunk[..n]);
        if String::from_utf8_lossy(&answer).contains("ChromeDriver") {
            return true;
        }
    }
    false
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = find_binary(
        "CHROMIUM",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-extensions", "--no-first-run",
                "--window-size=1280,900", "--lang=en-GB",
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session through chromedriver")
}

async fn shot(client: &Client, dir: &Path, name: &str) {
    let png = client.screenshot().await.unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

async fn text(client: &Client, css: &str) -> String {
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Clicks the element `css` finds.
async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// The DOM property `name` of the element `css` finds.
async fn prop(client: &Client, css: &str, name: &str) -> Option<String> {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .prop(name)
        .await
        .unwrap()
}

async fn banner_count(client: &Client) -> usize {
    client
        .find_all(Locator::Css("#impersonation-banner"))
        .await
        .unwrap()
        .len()
}

/// A free loopback port to serve on, and its base URL.
async fn loopback() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    (listener, base)
}

/// Runs `steps` with a fresh Chromium and the screenshots folder, in a
/// task so that a failed assertion still closes the browser; then passes
/// the failure on.
async fn in_chromium<F, Fut>(steps: F)
where
    F: FnOnce(Client, PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let screenshots = target_dir().join("screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    let driver = Driver::start();
    let client = browser(&driver).await;
    let outcome = tokio::spawn(steps(client.clone(), screenshots)).await;
    client.close().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The demo on SQLite (a scratch file) on a free loopback port; its base URL.
async fn serve_demo() -> String {
    let db = scratch_file("imptest_browser", "db");
    let demo = Demo::open(StoreKind::Sqlite, &format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let (listener, base) = loopback().await;
    let app = demo.router(&base).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_impersonates_a_customer_in_chromium() {
    let base = serve_demo().await;
    in_chromium(|client, screenshots| async move { walk(&client, &base, &screenshots).await })
        .await;
}

/// A start the SDK refuses (a reason long enough for the field, with too
/// few letters and digits among its spaces) comes back to the console
/// with the refusal, and the customer's form holds what the agent typed;
/// the next console page starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_keeps_what_the_agent_typed_in_chromium() {
    let base = serve_demo().await;
    in_chromium(|client, screenshots| async move {
        client.goto(&base).await.unwrap();
        click(&client, "#sign-in-sam").await;
        assert_eq!(text(&client, "#signed-in").await, "Sam Support");
        client
            .goto(&format!("{base}/support?q=olive"))
            .await
            .unwrap();
        let form = client.find(Locator::Css("#start-olive")).await.unwrap();
        let typed = [
            ("input[name=reason]", "Bug 1 2 3 4"),
            ("input[name=ticket]", "SUP-1042"),
        ];
        for (field, value) in typed {
            form.find(Locator::Css(field))
                .await
                .unwrap()
                .send_keys(value)
                .await
                .unwrap();
        }
        click(&client, "#start-olive input[name=read_only]").await;
        click(&client, "#start-olive button[type=submit]").await;
        assert!(
            text(&client, "#denied").await.contains("too short"),
            "the refusal is shown"
        );
        shot(&client, &screenshots, "refused-start.png").await;
        for (field, value) in typed {
            let kept = prop(&client, &format!("#start-olive {field}"), "value").await;
            assert_eq!(kept.as_deref(), Some(value), "{field}");
        }
        let read_only = prop(&client, "#start-olive input[name=read_only]", "checked").await;
        assert_eq!(read_only.as_deref(), Some("true"));
        // The next console page (no refusal) starts afresh.
        client.goto(&format!("{base}/support")).await.unwrap();
        for (field, _) in typed {
            let value = prop(&client, &format!("#start-olive {field}"), "value").await;
            assert_eq!(value.as_deref(), Some(""), "{field}");
        }
        let read_only = prop(&client, "#start-olive input[name=read_only]", "checked").await;
        assert_eq!(read_only.as_deref(), Some("false"));
    })
    .await;
}

async fn walk(client: &Client, base: &str, screenshots: &Path) {
    let (client, screenshots) = (client, screenshots);
    {
        // Sign in as the agent.
        client.goto(base).await.unwrap();
        shot(client, screenshots, "1-sign-in.png").await;
        click(client, "#sign-in-sam").await;
        assert_eq!(text(client, "#signed-in").await, "Sam Support");

        // Start impersonating Olive with a reason and a ticket.
        client
            .goto(&format!("{base}/support?q=olive"))
            .await
            .unwrap();
        let form = client.find(Locator::Css("#start-olive")).await.unwrap();
        form.find(Locator::Css("input[name=reason]"))
            .await
            .unwrap()
            .send_keys("Olive cannot see next week's bookings")
            .await
            .unwrap();
        form.find(Locator::Css("input[name=ticket]"))
            .await
            .unwrap()
            .send_keys("SUP-1042")
            .await
            .unwrap();
        shot(client, screenshots, "2-support-console.png").await;
        form.find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();

        // The banner, with the customer's name and the reason.
        let message = text(client, "#impersonation-banner .impersonation-message").await;
        // What the console kept of the form, for a refusal, is gone from
        // the tab once the start went through.
        let kept = client
            .execute(
                "return sessionStorage.getItem('impersonation-start');",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            kept,
            serde_json::Value::Null,
            "the typed reason left in the tab"
        );
        assert_eq!(
            message,
            "You are impersonating Olive Owner (Pinewood Campground)"
        );
        assert_eq!(
            text(client, "#impersonation-banner .impersonation-reason").await,
            "Olive cannot see next week's bookings"
        );
        let role = client
            .find(Locator::Css("#impersonation-banner"))
            .await
            .unwrap()
            .attr("role")
            .await
            .unwrap();
        assert_eq!(role.as_deref(), Some("alert"));
        // Styled, fixed at the top, though every page of the demo is
        // served under a policy that allows no inline style: the SDK let
        // the banner's own styles through it.
        let placed = client
            .execute(
                "const b = document.getElementById('impersonation-banner'); \
                 const s = getComputedStyle(b); \
                 return [s.position, b.getBoundingClientRect().top, s.backgroundColor];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            placed,
            serde_json::json!(["fixed", 0, "rgb(185, 28, 28)"]),
            "the banner's styles were blocked"
        );
        // The Stop button's text is readable on its face: not the
        // banner's white, which it would inherit.
        let button = client
            .execute(
                "const s = getComputedStyle(document.querySelector('#impersonation-banner button')); \
                 return [s.webkitTextFillColor, s.backgroundColor];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            button,
            serde_json::json!(["rgb(127, 29, 29)", "rgb(255, 255, 255)"]),
            "the Stop button's colours"
        );
        assert_eq!(text(client, "#effective-user").await, "Olive Owner");
        // The live line (server-sent events through the layer) fills in
        // with the count of Olive's bookings.
        let deadline = Instant::now() + Duration::from_secs(10);
        while text(client, "#live").await != "3" {
            assert!(Instant::now() < deadline, "the live line never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shot(client, screenshots, "3-banner.png").await;

        // Billing refused; the card masked on the profile.
        client.goto(&format!("{base}/billing")).await.unwrap();
        assert!(
            text(client, "#refused")
                .await
                .contains("not available while impersonating")
        );
        assert_eq!(
            banner_count(client).await,
            1,
            "the banner stays on the refusal page"
        );
        shot(client, screenshots, "4-billing-refused.png").await;
        client.goto(&format!("{base}/profile")).await.unwrap();
        let card = text(client, "#card").await;
        assert!(
            card.starts_with('•') && card.ends_with("4242 (masked)"),
            "{card}"
        );
        assert!(
            !client
                .source()
                .await
                .unwrap()
                .contains("4242 4242 4242 4242")
        );
        assert_eq!(text(client, "#email").await, "[redacted]");
        shot(client, screenshots, "5-profile-masked.png").await;

        // Stop from the banner: the banner is gone.
        click(client, "#impersonation-banner button").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while banner_count(client).await > 0 {
            assert!(Instant::now() < deadline, "the banner stays after stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Back as himself, on the support console (refused while
        // impersonating).
        assert_eq!(text(client, "#signed-in").await, "Sam Support");
        text(client, "#search").await;
        shot(client, screenshots, "6-stopped.png").await;

        // The audit page lists start, access, refusal and stop, and verifies.
        client.goto(&format!("{base}/audit")).await.unwrap();
        click(client, "#verify").await;
        assert!(
            text(client, "#verified")
                .await
                .starts_with("✓ Chain verified")
        );
        let mut actions = Vec::new();
        for row in client
            .find_all(Locator::Css("#audit tr[data-action]"))
            .await
            .unwrap()
        {
            actions.push(row.attr("data-action").await.unwrap().unwrap_or_default());
        }
        actions.reverse(); // the page shows newest first
        assert_eq!(
            actions.first().map(String::as_str),
            Some("session_started"),
            "{actions:?}"
        );
        assert_eq!(
            actions.last().map(String::as_str),
            Some("session_ended"),
            "{actions:?}"
        );
        for action in ["access", "denied"] {
            assert!(
                actions.iter().any(|a| a == action),
                "{action} missing: {actions:?}"
            );
        }
        let page = client.source().await.unwrap();
        assert!(
            page.contains("Refused GET /billing"),
            "the refusal names the route"
        );
        shot(client, screenshots, "7-audit.png").await;
    }
}

/// An app shell whose policy is in a `<meta>` tag and lets no form post
/// (`form-action 'none'`), and whose markup leaves a form open (with a
/// required field) where the banner goes: in Chromium the banner is still
/// styled and fixed at the top, and its Stop button still ends the
/// session, through the policy as the layer rewrote it, although the
/// parser put the button into the app's form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banner_styles_and_stops_under_a_strict_meta_policy_and_an_open_form_in_chromium() {
    use axum::extract::Request;
    use axum::middleware::{Next, from_fn};
    use axum::response::Html;
    use axum::routing::get;
    use impersonation_axum::{CsrfToken, ImpersonationLayer, routes};
    use impersonation_core::{
        AuditAction, AuditQuery, Impersonation, MemoryDirectory, MemoryStore,
    };
    use impersonation_testkit::World;

    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let directory = MemoryDirectory::new();
    directory.insert(agent.clone());
    directory.insert(customer.clone());
    let svc = Impersonation::new(MemoryStore::new(), directory);
    // The app's own support page: a form that starts the impersonation.
    let target = customer.id.to_string();
    let begin = move |token: CsrfToken| async move {
        Html(format!(
            "<!doctype html><html><body><form method=post action=/impersonation/start>\
             <input type=hidden name=target value=\"{target}\">\
             <input type=hidden name=reason value=\"Checking the app shell\">\
             <input type=hidden name=return_to value=/shell>\
             <input type=hidden name=csrf value=\"{}\">\
             <button id=start>Start</button></form></body></html>",
            token.as_str()
        ))
    };
    // The shell leaves its search form open; the form opens in another
    // window, and its script keeps every submission of it for itself.
    let shell = || async {
        Html(
            "<!doctype html><html><head><meta http-equiv=\"Content-Security-Policy\" \
             content=\"default-src 'self'; form-action 'none'\">\
             <script src=/shell.js></script></head>\
             <body><p id=app>the app</p>\
             <form id=search action=/search target=_blank>\
             <input type=hidden name=csrf value=the-apps-own><input name=q required></body></html>",
        )
    };
    let script = || async {
        (
            [(axum::http::header::CONTENT_TYPE, "text/javascript")],
            "document.addEventListener('submit', e => { if (e.target.id === 'search') { \
             e.preventDefault(); sessionStorage.setItem('app-submitted', '1'); } });",
        )
    };
    // The host's own sign-in, standing in: the agent is signed in.
    let signed_in = agent.clone();
    let app = axum::Router::new()
        .route("/", get(shell))
        .route("/shell", get(shell))
        .route("/shell.js", get(script))
        .route("/begin", get(begin))
        .nest("/impersonation", routes())
        .layer(ImpersonationLayer::new(svc.clone()).development_mode())
        .layer(from_fn(move |mut req: Request, next: Next| {
            req.extensions_mut().insert(signed_in.clone());
            next.run(req)
        }));
    let (listener, base) = loopback().await;
    tokio::spawn(async move { axum::serve(listener, app).await });
    in_chromium(|client, screenshots| async move {
        client.goto(&format!("{base}/shell")).await.unwrap();
        assert_eq!(banner_count(&client).await, 0);
        // The agent starts from the app's support page, and lands on
        // the shell.
        client.goto(&format!("{base}/begin")).await.unwrap();
        click(&client, "#start").await;
        client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css("#impersonation-banner"))
            .await
            .unwrap();
        assert_eq!(client.current_url().await.unwrap().path(), "/shell");
        assert_eq!(banner_count(&client).await, 1);
        let placed = client
            .execute(
                "const b = document.getElementById('impersonation-banner'); \
                     return [getComputedStyle(b).position, b.getBoundingClientRect().top];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            placed,
            serde_json::json!(["fixed", 0]),
            "the banner's styles were blocked"
        );
        shot(&client, &screenshots, "meta-policy-banner.png").await;
        // The banner's Stop is a form of its own, not the app's.
        let owner = client
            .execute(
                "return document.querySelector('#impersonation-banner button').form.id;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(owner, serde_json::json!(""));
        click(&client, "#impersonation-banner button").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while banner_count(&client).await != 0 {
            assert!(Instant::now() < deadline, "Stop was blocked");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(text(&client, "#app").await, "the app");
        let submitted = client
            .execute("return sessionStorage.getItem('app-submitted');", vec![])
            .await
            .unwrap();
        assert_eq!(
            submitted,
            serde_json::Value::Null,
            "Stop went to the app's form"
        );
    })
    .await;
    // Started and ended by the browser's own posts: the trail says so.
    let actions: Vec<AuditAction> = svc
        .audit(&AuditQuery::default())
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert!(
        actions.contains(&AuditAction::SessionStarted),
        "{actions:?}"
    );
    assert!(actions.contains(&AuditAction::SessionEnded), "{actions:?}");
}
