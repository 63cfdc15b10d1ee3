//! The demo's own rules around the SDK: its forms are CSRF-checked, bad
//! input gets a 4xx page, signing out ends an impersonation, and the audit
//! page shows an agent only their own chain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use campground_demo::{Demo, StoreKind};
use reqwest::StatusCode;

struct User {
    client: reqwest::Client,
    base: String,
    csrf: String,
}

impl User {
    async fn sign_in(base: &str, id: &str) -> Self {
        let mut u = Self {
            client: reqwest::Client::builder()
                .cookie_store(true)
                .build()
                .unwrap(),
            base: base.into(),
            csrf: String::new(),
        };
        u.get("/").await;
        let (status, _) = u.post("/signin", &[("user", id)]).await;
        assert_eq!(status, StatusCode::OK);
        u
    }

    fn remember(&mut self, body: &str) {
        let marker = "name=\"csrf\" value=\"";
        if let Some(at) = body.find(marker) {
            let rest = &body[at + marker.len()..];
            self.csrf = rest[..rest.find('"').unwrap()].to_owned();
        }
    }

    async fn get(&mut self, path: &str) -> (StatusCode, String) {
        let res = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = res.status();
        let body = res.text().await.unwrap();
        self.remember(&body);
        (status, body)
    }

    /// `GET path`, its body left unread (a stream to read as it comes).
    async fn open(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    /// The id of the first session the support console lists.
    async fn first_live_session(&mut self) -> String {
        let (_, console) = self.get("/support").await;
        let marker = "name=\"session\" value=\"";
        let at = console.find(marker).expect("a live session") + marker.len();
        console[at..].split('"').next().unwrap().to_owned()
    }

    /// From the support console: revokes the first session it lists.
    async fn revoke_the_first_live_session(&mut self) {
        let session = self.first_live_session().await;
        let (status, body) = self.post("/support/revoke", &[("session", &session)]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> (StatusCode, String) {
        let mut fields = form.to_vec();
        let csrf = self.csrf.clone();
        fields.push(("csrf", &csrf));
        self.post_raw(path, &fields).await
    }

    async fn post_raw(&mut self, path: &str, form: &[(&str, &str)]) -> (StatusCode, String) {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let body = res.text().await.unwrap();
        self.remember(&body);
        (status, body)
    }
}

async fn demo() -> String {
    serve(&Demo::open(StoreKind::Memory, "memory").await.unwrap()).await
}

/// Serves `demo` on a free port of 127.0.0.1; its base URL.
async fn serve(demo: &std::sync::Arc<Demo>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = demo.router(&base).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

async fn impersonate(sam: &mut User, target: &str) {
    impersonate_with(sam, target, &[]).await;
}

/// Starts an impersonation from the support console, with `extra` fields
/// in the start form (`read_only`).
async fn impersonate_with(sam: &mut User, target: &str, extra: &[(&str, &str)]) {
    sam.get("/support").await;
    let mut form = vec![
        ("target", target),
        ("reason", "Customer cannot see bookings"),
        ("return_to", "/dashboard"),
    ];
    form.extend_from_slice(extra);
    let (status, body) = sam.post("/impersonation/start", &form).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("impersonation-banner"));
}

#[tokio::test]
async fn app_forms_need_the_csrf_token_and_bad_input_gets_a_400() {
    let base = demo().await;
    let mut olive = User::sign_in(&base, "olive").await;
    olive.get("/dashboard").await;
    let booking = [
        ("guest", "A. Guest"),
        ("site", "Pitch 1"),
        ("arrival", "2026-12-01"),
        ("nights", "2"),
    ];
    let (status, _) = olive.post_raw("/bookings", &booking).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no token");
    let mut forged = booking.to_vec();
    forged.push(("csrf", "forged"));
    let (status, _) = olive.post_raw("/bookings", &forged).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "wrong token");
    // The right token, from a page on another port of this host (which
    // could have set the cookie: browsers do not keep cookies apart by
    // port), is refused by the SDK's origin check.
    olive.get("/dashboard").await;
    let mut right = booking.to_vec();
    let csrf = olive.csrf.clone();
    right.push(("csrf", &csrf));
    let res = olive
        .client
        .post(format!("{base}/bookings"))
        .header("origin", "http://127.0.0.1:1")
        .form(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN, "another origin");
    // A page of another name that resolves to 127.0.0.1 (DNS rebinding):
    // its `Host` and `Origin` agree with each other, not with the demo's
    // address, and the post is refused before anything reads it (421).
    let port = base.rsplit(':').next().unwrap();
    let res = olive
        .client
        .post(format!("{base}/bookings"))
        .header("host", format!("rebound.example:{port}"))
        .header("origin", format!("http://rebound.example:{port}"))
        .form(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::MISDIRECTED_REQUEST,
        "a rebound name"
    );
    // The demo's own address under its other name passes.
    let res = olive
        .client
        .post(format!("{base}/bookings"))
        .header("origin", format!("http://localhost:{port}"))
        .form(&right)
        .send()
        .await
        .unwrap();
    assert!(
        res.status().is_success() || res.status().is_redirection(),
        "{}",
        res.status()
    );
    for bad in [
        [
            ("guest", ""),
            ("site", "Pitch 1"),
            ("arrival", "2026-12-01"),
            ("nights", "2"),
        ],
        [
            ("guest", "A"),
            ("site", "Pitch 1"),
            ("arrival", "next week"),
            ("nights", "2"),
        ],
        [
            ("guest", "A"),
            ("site", "Pitch 1"),
            ("arrival", "2026-12-01"),
            ("nights", "-1"),
        ],
        [
            ("guest", "A"),
            ("site", "Pitch 1"),
            ("arrival", "2026-12-01"),
            ("nights", "99999999999"),
        ],
    ] {
        olive.get("/dashboard").await;
        let (status, body) = olive.post("/bookings", &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
    }
    // A body that is not a form is a 415, one too large a 413.
    olive.get("/dashboard").await;
    let res = olive
        .client
        .post(format!("{base}/bookings"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let res = olive
        .client
        .post(format!("{base}/bookings"))
        .form(&[("guest", "x".repeat(3 << 20))])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A field missing is bad input too: a 400 page, not axum's 422.
    olive.get("/dashboard").await;
    let (status, body) = olive.post("/bookings", &booking[..3]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("Bad request"), "{body}");
    olive.get("/dashboard").await;
    let (status, body) = olive.post("/bookings", &booking).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("A. Guest"));
    // Only into a campground the writer sees: not another's, and not the
    // support team's own tenant, which no page shows.
    let mut elsewhere = booking.to_vec();
    elsewhere.push(("campground", "redrock"));
    let (status, _) = olive.post("/bookings", &elsewhere).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "another's campground");
    let mut sam = User::sign_in(&base, "sam").await;
    sam.get("/dashboard").await;
    let (status, body) = sam.post("/bookings", &booking).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let mut lee = User::sign_in(&base, "lee").await;
    lee.get("/support").await;
    let (status, _) = lee
        .post("/support/revoke", &[("session", "not-a-uuid")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    lee.get("/support").await;
    let (status, _) = lee
        .post(
            "/support/revoke",
            &[("session", "0195d3c1-9c1e-7cc3-a2a4-2f7d1f8e4a10")],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an unknown session");
    let (status, _) = lee.get("/audit?cursor=not-a-cursor").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a cursor that is not one");
    // `since` filters the page as it does the plain text.
    impersonate(&mut sam, "olive").await;
    let (status, _) = lee.get("/audit?since=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a time that is not one");
    let (_, all) = lee.get("/audit").await;
    assert!(all.contains("<tr data-action="), "{all}");
    let (status, later) = lee.get("/audit?since=2999-01-01T00%3A00%3A00Z").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!later.contains("<tr data-action="), "{later}");
}

/// Sam's trail shows his session with Olive revoked by his sign-out.
async fn assert_sign_out_ended_the_session(base: &str) {
    let mut sam = User::sign_in(base, "sam").await;
    let (_, table) = sam.get("/audit.txt").await;
    assert!(
        table.contains("| Sam Support | Olive Owner | Ended impersonation session (revoked). Note: \u{201C}agent signed out\u{201D}. |"),
        "{table}"
    );
}

#[tokio::test]
async fn signing_out_ends_the_impersonation() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "olive").await;
    let (status, _) = sam.post("/signout", &[]).await;
    assert_eq!(status, StatusCode::OK);
    // The same browser (its cookies kept), signed in again as Sam: the
    // session's cookie, if it were still honoured, would bring the banner.
    sam.get("/").await;
    let (status, _) = sam.post("/signin", &[("user", "sam")]).await;
    assert_eq!(status, StatusCode::OK);
    let (_, page) = sam.get("/dashboard").await;
    assert!(page.contains("Sam Support"), "{page}");
    assert!(!page.contains("impersonation-banner"));
    assert_sign_out_ended_the_session(&base).await;
}

#[tokio::test]
async fn the_audit_page_is_for_agents_and_shows_an_agent_their_own_chain() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "stan").await;
    let (status, body) = sam.get("/audit").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "not while impersonating");
    assert!(
        body.contains("impersonation-banner"),
        "the refusal page keeps the banner"
    );
    // Nor is the trail verified: the refusal comes first, and the attempt
    // is an access (it reads), not a change of Stan's.
    let (status, body) = sam.post("/audit/verify", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!body.contains("Chain verified"), "{body}");
    sam.post("/impersonation/stop", &[]).await;

    let mut lee = User::sign_in(&base, "lee").await;
    impersonate(&mut lee, "paula").await;
    lee.post("/impersonation/stop", &[]).await;

    // Sam verifies his own chain, and its listing.
    let (status, body) = sam.post("/audit/verify", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("✓ Chain verified: your chain, ")
            && body.contains(" events, each listed once."),
        "{body}"
    );

    let (status, sams) = sam.get("/audit.txt").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        sams.contains("Stan Staff") && !sams.contains("Paula Partner"),
        "{sams}"
    );
    // Refused by the guard on exports and credentials: on the trail as
    // denied attempts.
    let verify = sams
        .lines()
        .find(|l| l.contains("POST /audit/verify"))
        .unwrap_or_else(|| panic!("{sams}"));
    assert!(verify.contains("Denied Attempt"), "{verify}");
    let (_, all) = lee.get("/audit.txt").await;
    assert!(
        all.contains("Stan Staff") && all.contains("Paula Partner"),
        "{all}"
    );

    let mut olive = User::sign_in(&base, "olive").await;
    let (status, body) = olive.post("/audit/verify", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "customers verify nothing");
    assert!(!body.contains("Chain verified"), "{body}");
    let (status, _) = olive.get("/audit").await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "customers do not read the trail"
    );
    let (status, _) = olive.get("/audit.txt?since=yesterday").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = lee.get("/audit.txt?since=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// While impersonating, the exports and the credential route are refused
/// by the guard (audited as denied attempts), the profile keeps the
/// customer's account data to itself, and no page is kept in a cache.
#[tokio::test]
async fn exports_credentials_and_account_data_stay_out_of_an_impersonation() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    let res = sam
        .client
        .get(format!("{base}/support"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["cache-control"], "no-store", "the console");
    impersonate(&mut sam, "olive").await;
    let (status, body) = sam.get("/audit.txt").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    sam.get("/dashboard").await;
    let (status, body) = sam.post("/idp/token", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(!body.contains("access_token"), "{body}");
    let (_, profile) = sam.get("/profile").await;
    assert!(profile.contains("(not shared with support)"), "{profile}");
    sam.get("/dashboard").await;
    sam.post("/impersonation/stop", &[]).await;

    let (_, trail) = sam.get("/audit.txt").await;
    for attempt in ["GET /audit.txt", "POST /idp/token"] {
        let line = trail
            .lines()
            .find(|l| l.contains(attempt))
            .unwrap_or_else(|| panic!("{attempt}: {trail}"));
        assert!(line.contains("Denied Attempt"), "{line}");
    }
    for page in ["/audit", "/audit.txt"] {
        let res = sam
            .client
            .get(format!("{base}{page}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.headers()["cache-control"], "no-store", "{page}");
    }
}

/// Settings are limited in characters, as their fields are: a language
/// written in six Chinese characters (18 bytes) is saved, and one past
/// the field's length is refused, saying what is wrong.
#[tokio::test]
async fn settings_take_what_their_fields_allow() {
    let base = demo().await;
    let mut olive = User::sign_in(&base, "olive").await;
    olive.get("/settings").await;
    let chinese = "中文（简体）";
    let (status, body) = olive
        .post(
            "/settings",
            &[("timezone", "Asia/Shanghai"), ("language", chinese)],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(chinese), "{body}");
    let long = "x".repeat(17);
    let (status, body) = olive
        .post("/settings", &[("timezone", "UTC"), ("language", &long)])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("at most 16"), "{body}");
}

/// Settings are shown only to a user who may read them, and to an agent
/// impersonating one: Stan, without `settings:read` (nor `bookings:read`)
/// in this directory, is refused the page, and so is Sam while
/// impersonating him, the live bookings line too (denied attempts on the
/// trail); Olive's page is still there.
#[tokio::test]
async fn settings_are_shown_only_with_settings_read() {
    use campground_demo::seed;
    use impersonation_core::{Impersonation, MemoryStore, Permission, Store, UserId};
    use std::sync::Arc;

    let directory = seed::directory().unwrap();
    let unread = [
        Permission::new("settings:read"),
        Permission::new("bookings:read"),
    ];
    assert!(directory.update(&UserId::new("stan").unwrap(), |stan| {
        for permission in &unread {
            stan.permissions.remove(permission);
        }
    }));
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let service = Impersonation::new(store, directory)
        .with_policy(seed::policy())
        .with_projection(seed::projection());
    let base = serve(&Demo::with_service(service, StoreKind::Memory)).await;

    let mut stan = User::sign_in(&base, "stan").await;
    let (status, body) = stan.get("/settings").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("You may not read settings."), "{body}");
    assert!(!body.contains("name=\"timezone\""), "{body}");

    let mut sam = User::sign_in(&base, "sam").await;
    let (status, body) = sam.get("/settings").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    impersonate(&mut sam, "stan").await;
    let (status, body) = sam.get("/settings").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("impersonation-banner"), "{body}");
    let (status, body) = sam.get("/dashboard/live").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // On the trail, the app's refusals are denied attempts, not accesses.
    sam.post("/impersonation/stop", &[]).await;
    let mut lee = User::sign_in(&base, "lee").await;
    let (_, trail) = lee.get("/audit.txt").await;
    for route in ["GET /settings", "GET /dashboard/live"] {
        let rows: Vec<&str> = trail.lines().filter(|l| l.contains(route)).collect();
        assert_eq!(rows.len(), 1, "{route}: {trail}");
        assert!(rows[0].contains("| Denied Attempt |"), "{route}: {trail}");
        assert!(rows[0].contains("lacks a permission"), "{route}: {trail}");
    }

    let mut olive = User::sign_in(&base, "olive").await;
    let (status, body) = olive.get("/settings").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("name=\"timezone\""), "{body}");
}

#[tokio::test]
async fn the_support_console_offers_only_what_the_policy_allows() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    let (_, console) = sam.get("/support").await;
    for allowed in ["start-olive", "start-stan", "start-lena", "start-rosa"] {
        assert!(console.contains(&format!("id=\"{allowed}\"")), "{allowed}");
    }
    for refused in ["start-ada", "start-lee", "start-paula"] {
        assert!(!console.contains(&format!("id=\"{refused}\"")), "{refused}");
    }
    let mut olive = User::sign_in(&base, "olive").await;
    let (status, _) = olive.get("/support").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// A read-only impersonation shows no form its shadow user may not use
/// (the policy keeps only read permissions), may still sign out of the app
/// (which ends it), and cannot sign in as someone else.
#[tokio::test]
async fn a_read_only_session_offers_no_changes_and_may_sign_out() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate_with(&mut sam, "olive", &[("read_only", "on")]).await;
    let (status, dashboard) = sam.get("/dashboard").await;
    assert_eq!(status, StatusCode::OK, "{dashboard}");
    assert!(dashboard.contains("impersonation-banner"));
    assert!(dashboard.contains("id=\"effective-user\""), "{dashboard}");
    assert!(!dashboard.contains("Add a booking"), "{dashboard}");
    let (status, settings) = sam.get("/settings").await;
    assert_eq!(status, StatusCode::OK, "{settings}");
    assert!(settings.contains("impersonation-banner"), "{settings}");
    assert!(!settings.contains("Save settings"), "{settings}");
    // The password form, which the layer would refuse with a bare 403,
    // gives way to a note.
    let (status, profile) = sam.get("/profile").await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert!(
        !profile.contains("action=\"/profile/password\""),
        "{profile}"
    );
    assert!(profile.contains("id=\"read-only\""), "{profile}");
    let (status, body) = sam.post("/signin", &[("user", "lee")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a change, read-only");
    assert!(body.contains("the session is read-only"), "{body}");
    sam.get("/dashboard").await;
    let (status, body) = sam.post("/signout", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_sign_out_ended_the_session(&base).await;
}

#[tokio::test]
async fn sign_in_and_the_console_are_refused_while_impersonating() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "olive").await;
    let (status, body) = sam.post("/signin", &[("user", "lee")]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    sam.get("/dashboard").await;
    let (status, body) = sam
        .post(
            "/support/revoke",
            &[("session", "0195d3c1-9c1e-7cc3-a2a4-2f7d1f8e4a10")],
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the console, as the customer: {body}"
    );
    assert!(body.contains("Stop first"), "{body}");
    let (_, page) = sam.get("/dashboard").await;
    assert!(page.contains("You are impersonating Olive Owner"), "{page}");
    // The menu offers neither while impersonating, and both again after.
    for link in ["href=\"/support\"", "href=\"/audit\""] {
        assert!(!page.contains(link), "{link}: {page}");
    }
    let (status, body) = sam.get("/support").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    sam.post("/impersonation/stop", &[]).await;
    let (_, page) = sam.get("/dashboard").await;
    for link in ["href=\"/support\"", "href=\"/audit\""] {
        assert!(page.contains(link), "{link}: {page}");
    }
    // On the trail, each is a denied attempt, not a change to Olive's data.
    let mut lee = User::sign_in(&base, "lee").await;
    let (_, trail) = lee.get("/audit.txt").await;
    for route in ["POST /signin", "POST /support/revoke", "GET /support"] {
        let rows: Vec<&str> = trail
            .lines()
            .filter(|l| l.contains(&format!("{route}:")) || l.contains(&format!("{route} (")))
            .collect();
        assert_eq!(rows.len(), 1, "{route}: {trail}");
        assert!(rows[0].contains("| Denied Attempt |"), "{route}: {trail}");
    }
}

/// The console shows a refusal's code as the SDK sent it, but echoes no
/// text a link could put in its place.
#[tokio::test]
async fn the_console_echoes_no_made_up_refusal() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    let (_, page) = sam
        .get("/support?denied=Your%20account%20is%20suspended")
        .await;
    assert!(!page.contains("suspended"), "{page}");
    assert!(page.contains("the start was refused"), "{page}");
    let (_, page) = sam.get("/support?denied=your_account_is_suspended").await;
    assert!(!page.contains("suspended"), "{page}");
    let (_, page) = sam.get("/support?denied=session_ended").await;
    assert!(page.contains("session_ended"), "{page}");
}

/// A console refusal that is not a denial (the session ended meanwhile)
/// does not claim to be in the audit trail; a denial does.
#[tokio::test]
async fn only_a_denial_is_said_to_be_in_the_trail() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    let (_, page) = sam.get("/support?denied=session_ended").await;
    assert!(page.contains("id=\"denied\""), "{page}");
    assert!(!page.contains("in the audit trail"), "{page}");
    let (_, page) = sam.get("/support?denied=protected_role").await;
    assert!(page.contains("in the audit trail"), "{page}");
}

/// A query string the pages cannot read is a 400 page, not axum's text;
/// under impersonation a guarded page's refusal comes first.
#[tokio::test]
async fn a_bad_query_string_gets_a_400_page() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    for path in [
        "/support?q=a&q=b",
        "/audit?since=x&since=y",
        "/audit.txt?since=a&since=b",
    ] {
        let res = sam.open(path).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{path}");
        let kind = res.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(kind.starts_with("text/html"), "{path}: {kind}");
        let body = res.text().await.unwrap();
        assert!(body.contains("<h1>Bad request</h1>"), "{path}: {body}");
        assert!(body.contains("duplicate field"), "{path}: {body}");
    }
    impersonate(&mut sam, "olive").await;
    let (status, body) = sam.get("/support?q=a&q=b").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("Stop first"), "{body}");
    assert!(body.contains("impersonation-banner"), "{body}");
}

/// An agent who signs in lands on the support console (the browser test
/// follows a stop there too); a customer on their dashboard.
#[tokio::test]
async fn an_agent_lands_on_the_console() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    let (status, page) = sam.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"search\""), "{page}");
    let mut olive = User::sign_in(&base, "olive").await;
    let (_, page) = olive.get("/").await;
    assert!(!page.contains("id=\"search\""), "{page}");
    assert!(page.contains("id=\"effective-user\""), "{page}");
}

/// A partner sees every campground its company manages, and an agent
/// impersonating the partner sees the same: the partner's relationships,
/// not the agent's.
#[tokio::test]
async fn a_partner_sees_the_campgrounds_it_manages_impersonated_or_not() {
    let base = demo().await;
    let mut paula = User::sign_in(&base, "paula").await;
    let (_, own) = paula.get("/dashboard").await;
    let mut lee = User::sign_in(&base, "lee").await;
    impersonate(&mut lee, "paula").await;
    let (_, seen) = lee.get("/dashboard").await;
    for page in [&own, &seen] {
        assert!(page.contains("<h2>Pinewood Campground</h2>"), "{page}");
        assert!(page.contains("<h2>Lakeside RV Park</h2>"), "{page}");
        assert!(!page.contains("<h2>Red Rock Camp</h2>"), "{page}");
    }
}

/// Sam impersonates Olive and reads `reads` pages, straight through the
/// service: a trail longer than one page of the store.
async fn long_trail(demo: &Demo, reads: usize) {
    use impersonation_core::{Activity, Requester, StartRequest, UserId};

    let service = demo.service();
    let directory = service.directory();
    let sam = directory.get(&UserId::new("sam").unwrap()).unwrap();
    let started = service
        .start(
            Requester::User(&sam),
            StartRequest::new(UserId::new("olive").unwrap(), "A long look at the bookings"),
        )
        .await
        .unwrap();
    let ctx = service.resolve(&started.secret).await.unwrap();
    for n in 0..reads {
        service
            .record_completed(&ctx, Activity::access(format!("GET /bookings/{n} (200)")))
            .await
            .unwrap();
    }
}

/// A trail longer than one page of the store is exported whole, page after
/// page, under one table head, oldest first.
#[tokio::test]
async fn the_text_export_runs_over_every_page_of_the_trail() {
    let demo = Demo::open(StoreKind::Memory, "memory").await.unwrap();
    let reads = impersonation_core::MAX_PAGE as usize + 20;
    long_trail(&demo, reads).await;
    let base = serve(&demo).await;

    let mut sam = User::sign_in(&base, "sam").await;
    let (status, table) = sam.get("/audit.txt").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(table.matches("| Timestamp |").count(), 1, "one head");
    let rows: Vec<&str> = table.lines().skip(2).collect();
    // The start, then every read in order.
    assert_eq!(rows.len(), 1 + reads, "{}", rows.len());
    assert!(
        rows[0].contains("Started impersonation session"),
        "{}",
        rows[0]
    );
    for (n, row) in rows[1..].iter().enumerate() {
        assert!(
            row.ends_with(&format!("| GET /bookings/{n} (200) |")),
            "{n}: {row}"
        );
    }
}

/// A start refused after a search with a space in it comes back to that
/// search with the refusal shown (the search is percent-encoded into
/// `error_to`, which the SDK follows only as a plain local path).
#[tokio::test]
async fn a_refused_start_returns_to_the_search_with_its_reason() {
    let base = demo().await;
    let mut first_tab = User::sign_in(&base, "sam").await;
    impersonate(&mut first_tab, "olive").await;
    // Another browser: Sam is not impersonating there, but he already is
    // elsewhere, and one live session per agent is the rule.
    let mut sam = User::sign_in(&base, "sam").await;
    let (_, console) = sam.get("/support?q=Pinewood%20Campground").await;
    assert!(
        console.contains("value=\"/support?q=Pinewood+Campground\""),
        "{console}"
    );
    let (_, page) = sam
        .post(
            "/impersonation/start",
            &[
                ("target", "olive"),
                ("reason", "Customer cannot see bookings"),
                ("return_to", "/dashboard"),
                ("error_to", "/support?q=Pinewood+Campground"),
            ],
        )
        .await;
    assert!(page.contains("id=\"denied\""), "{page}");
    assert!(
        page.contains("Olive Owner"),
        "still the search's results: {page}"
    );
}

/// A customer who changes their password ends every impersonation of
/// them: the agent's next page has no banner, and the trail holds the
/// revocation, by the customer, and the session's end.
#[tokio::test]
async fn changing_a_password_ends_the_impersonations_of_its_owner() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "olive").await;
    let mut olive = User::sign_in(&base, "olive").await;
    let (status, body) = olive
        .post(
            "/profile/password",
            &[("password", "correct horse battery")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!body.contains("Not revoked"), "{body}");
    let (status, page) = sam.get("/dashboard").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(!page.contains("impersonation-banner"), "{page}");
    let mut lee = User::sign_in(&base, "lee").await;
    let (_, trail) = lee.get("/audit").await;
    assert!(trail.contains("Impersonation Revoked"), "{trail}");
    assert!(trail.contains("password changed"), "{trail}");
    // A start after the change is the customer's new state's: it stands.
    impersonate(&mut sam, "olive").await;
    let (_, page) = sam.get("/dashboard").await;
    assert!(page.contains("impersonation-banner"), "{page}");
}

/// A sign-out whose session was revoked a moment before by another
/// process of the app (this one may still hold the session as it was a
/// moment ago) signs out all the same.
#[tokio::test]
async fn signing_out_of_a_session_revoked_elsewhere_a_moment_ago_still_signs_out() {
    // Two processes of the app on one SQLite database.
    let file = impersonation_testkit::scratch::scratch_file("imptest_campground", "sqlite3");
    let url = format!("sqlite://{}", file.display());
    let mut bases = Vec::new();
    for _ in 0..2 {
        bases.push(serve(&Demo::open(StoreKind::Sqlite, &url).await.unwrap()).await);
    }
    let mut sam = User::sign_in(&bases[0], "sam").await;
    impersonate(&mut sam, "olive").await;
    sam.get("/dashboard").await;
    // Lee, on the other process, revokes it.
    let mut lee = User::sign_in(&bases[1], "lee").await;
    lee.revoke_the_first_live_session().await;
    let (status, body) = sam.post("/signout", &[]).await;
    assert_eq!(status, StatusCode::OK, "signed out: {body}");
    let (_, page) = sam.get("/").await;
    assert!(page.contains("Sign in"), "{page}");
}

/// Sam's sign-out form, shown under the impersonation, still signs out
/// once the session has ended (revoked by the lead here; the SDK replaced
/// the token its pages carried), but not when another site posts it.
#[tokio::test]
async fn a_sign_out_form_from_an_ended_session_still_signs_out_from_this_site() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "olive").await;
    sam.get("/dashboard").await;
    let mut lee = User::sign_in(&base, "lee").await;
    lee.revoke_the_first_live_session().await;
    // Another site's post (its origin says so) is refused.
    let csrf = sam.csrf.clone();
    let res = sam
        .client
        .post(format!("{base}/signout"))
        .header("origin", "https://elsewhere.example")
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let (status, body) = sam.post("/signout", &[]).await;
    assert_eq!(status, StatusCode::OK, "signed out: {body}");
    let (_, page) = sam.get("/").await;
    assert!(page.contains("Sign in"), "{page}");
}

/// A sign-out refused on its form's origin under a live impersonation
/// ends nothing, and is on the trail as the request it was (the route is
/// left out of the layer's audit, whose record of a sign-out is the
/// session's end).
#[tokio::test]
async fn a_refused_sign_out_under_impersonation_is_on_the_trail() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "olive").await;
    sam.get("/dashboard").await;
    let res = sam
        .client
        .post(format!("{base}/signout"))
        .header("origin", "https://elsewhere.example")
        .form(&[("csrf", &sam.csrf.clone())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    // A body no form reader takes (a `text/plain` post, which another
    // site may send without asking) is refused the same way.
    let res = sam
        .client
        .post(format!("{base}/signout"))
        .header("origin", "https://elsewhere.example")
        .header("content-type", "text/plain")
        .body("csrf=whatever")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let (_, page) = sam.get("/dashboard").await;
    assert!(page.contains("impersonation-banner"), "still on: {page}");
    let mut lee = User::sign_in(&base, "lee").await;
    let (_, trail) = lee.get("/audit.txt").await;
    let lines: Vec<&str> = trail
        .lines()
        .filter(|l| l.contains("POST /signout (403)"))
        .collect();
    assert_eq!(lines.len(), 2, "{trail}");
    assert!(lines.iter().all(|l| l.contains("Olive")), "{lines:?}");
}

/// A form rendered for Sam, left open in one tab, does not post as Lee
/// once the browser has signed in as Lee in another.
#[tokio::test]
async fn signing_in_as_someone_else_retires_the_forms_of_the_one_before() {
    let base = demo().await;
    let mut browser = User::sign_in(&base, "sam").await;
    browser.get("/support").await;
    let sams_form_token = browser.csrf.clone();
    // Straight to Lee, with no sign-out between (which renews it too).
    let (status, _) = browser.post("/signin", &[("user", "lee")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(browser.csrf, sams_form_token);
    let start = [
        ("target", "olive"),
        ("reason", "Customer cannot see bookings"),
        ("return_to", "/dashboard"),
        ("csrf", sams_form_token.as_str()),
    ];
    let (status, body) = browser.post_raw("/impersonation/start", &start).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(!body.contains("impersonation-banner"), "{body}");
    // Lee's own page's form does start it.
    impersonate(&mut browser, "olive").await;
}

/// The console lists a session whose time is up but that nobody ended;
/// revoking it ends it (as expired) and the console shows it gone, not an
/// error.
#[tokio::test]
async fn revoking_a_session_whose_time_was_up_ends_it_without_an_error() {
    use campground_demo::seed;
    use impersonation_core::{Impersonation, ManualClock, MemoryStore, Store};
    use std::sync::Arc;

    let clock = ManualClock::new(time::OffsetDateTime::now_utc());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let service = Impersonation::new(store, seed::directory().unwrap())
        .with_policy(seed::policy())
        .with_projection(seed::projection())
        .with_clock(clock.clone());
    let base = serve(&Demo::with_service(service, StoreKind::Memory)).await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "olive").await;
    clock.advance(time::Duration::hours(2));

    let mut lee = User::sign_in(&base, "lee").await;
    let (_, console) = lee.get("/support").await;
    assert!(console.contains("<td>lapsed</td>"), "{console}");
    let marker = "name=\"session\" value=\"";
    let at = console.find(marker).expect("the lapsed session listed") + marker.len();
    let session = console[at..].split('"').next().unwrap().to_owned();
    let (status, body) = lee.post("/support/revoke", &[("session", &session)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!body.contains(&session), "{body}");
    let (_, trail) = lee.get("/audit.txt").await;
    assert!(
        trail
            .lines()
            .any(|l| l.contains("Olive Owner") && l.contains("maximum duration reached")),
        "{trail}"
    );
}

/// An event the listing's index has lost (its chain whole) fails the
/// Verify button, for the lead (every chain) and for the agent (their own),
/// naming the chain and how many of its events the listing shows.
#[tokio::test]
async fn verify_fails_on_an_event_the_listing_hides() {
    use campground_demo::seed;
    use impersonation_core::{ChainKey, Impersonation, MemoryStore, Store, UserId};
    use std::sync::Arc;

    let store = MemoryStore::new();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let service = Impersonation::new(shared, seed::directory().unwrap())
        .with_policy(seed::policy())
        .with_projection(seed::projection());
    let demo = Demo::with_service(service, StoreKind::Memory);
    long_trail(&demo, 2).await;
    let base = serve(&demo).await;
    let chain = ChainKey::for_agent(&UserId::new("sam").unwrap());
    assert!(store.tamper_unlist_event(&chain, 1));
    let mut lee = User::sign_in(&base, "lee").await;
    let mut sam = User::sign_in(&base, "sam").await;
    for (who, body) in [
        ("lee", lee.post("/audit/verify", &[]).await.1),
        ("sam", sam.post("/audit/verify", &[]).await.1),
    ] {
        assert!(
            body.contains(
                "✗ Verification failed: the listing shows 2 entries for the 3 events of chain sam."
            ),
            "{who}: {body}"
        );
    }
}

/// The trail narrowed to one customer: only the rows that name them, the
/// filter kept by the plain text and by Verify, which checks that listing
/// against the chains and says how many events it holds. A customer that
/// is no user id is a 400.
#[tokio::test]
async fn the_trail_of_one_customer_is_listed_and_verified_as_shown() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    for customer in ["olive", "stan"] {
        impersonate(&mut sam, customer).await;
        sam.get("/dashboard").await;
        sam.post("/impersonation/stop", &[]).await;
    }
    let mut lee = User::sign_in(&base, "lee").await;
    let (status, page) = lee.get("/audit?customer=olive").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("<option value=\"olive\" selected>Olive Owner</option>"),
        "{page}"
    );
    let rows = page.matches("<tr data-action=").count();
    assert!(rows >= 3, "start, access, end: {page}");
    assert_eq!(page.matches("<td>Olive Owner</td>").count(), rows, "{page}");
    assert!(!page.contains("<td>Stan Staff</td>"), "{page}");
    // The Verify button and the plain text keep the filter.
    assert!(
        page.contains("<input type=\"hidden\" name=\"customer\" value=\"olive\">"),
        "{page}"
    );
    assert!(
        page.contains("href=\"/audit.txt?customer=olive\""),
        "{page}"
    );

    let (status, body) = lee.post("/audit/verify", &[("customer", "olive")]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains(&format!(
            "; the {rows} events of this listing, each listed once."
        )),
        "{body}"
    );
    assert_eq!(body.matches("<tr data-action=").count(), rows, "{body}");
    let (_, body) = lee.post("/audit/verify", &[]).await;
    assert!(body.contains(" events, each listed once."), "{body}");
    // An agent: their own chain, and the listing of one customer in it.
    sam.get("/audit?customer=stan").await;
    let (_, body) = sam.post("/audit/verify", &[("customer", "stan")]).await;
    assert!(
        body.contains("✓ Chain verified: your chain, ")
            && body.contains(" events of this listing, each listed once."),
        "{body}"
    );

    let (_, table) = lee.get("/audit.txt?customer=olive").await;
    let lines: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(lines.len(), rows, "{table}");
    assert!(
        lines.iter().all(|l| l.contains("| Olive Owner |")),
        "{table}"
    );

    let long = "x".repeat(300);
    let (status, _) = lee.get(&format!("/audit?customer={long}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = lee.get(&format!("/audit.txt?customer={long}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // An id that is no customer's shows as the filter in force.
    let (_, page) = lee.get("/audit?customer=sam").await;
    assert!(
        page.contains("<option value=\"sam\" selected>sam</option>"),
        "{page}"
    );
    lee.get("/audit").await;
    let (status, _) = lee.post("/audit/verify", &[("customer", &long)]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A store that fails after the first page of an export: the response
/// ends in an error (hyper closes the connection before the chunked body
/// ends), never as if it were the whole trail, and the next export, with
/// the store back, is whole.
#[tokio::test]
async fn an_export_cut_short_by_the_store_ends_in_an_error() {
    use campground_demo::seed;
    use impersonation_core::{Impersonation, MAX_PAGE, MemoryStore, Store};
    use impersonation_testkit::faults::{Calls, FaultyStore, When};
    use std::sync::Arc;

    let faulty = Arc::new(FaultyStore::new(MemoryStore::new()));
    let store: Arc<dyn Store> = faulty.clone();
    let service = Impersonation::new(store, seed::directory().unwrap())
        .with_policy(seed::policy())
        .with_projection(seed::projection());
    let demo = Demo::with_service(service, StoreKind::Memory);
    let reads = MAX_PAGE as usize + 20;
    long_trail(&demo, reads).await;
    let base = serve(&demo).await;
    let mut sam = User::sign_in(&base, "sam").await;

    // The export's first store call reads the first page; its second fails.
    faulty.fail_nth(2, When::Before, Calls::All);
    let export = async {
        let mut res = sam.client.get(format!("{base}/audit.txt")).send().await?;
        let mut received = 0;
        while let Some(chunk) = res.chunk().await? {
            received += chunk.len();
        }
        Ok::<_, reqwest::Error>((res.status(), received))
    };
    let ended = export.await;
    assert!(ended.is_err(), "the export ended as if whole: {ended:?}");
    assert_eq!(faulty.injected(), 1);

    let (status, table) = sam.get("/audit.txt").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(table.lines().skip(2).count(), 1 + reads);
}

/// An API client under an impersonation token has nobody signed in: a
/// guarded page answers it with the guard's 403 (which is on the trail),
/// not with the sign-in redirect.
#[tokio::test]
async fn a_token_client_is_refused_a_guarded_page_with_a_403_and_asked_for_a_token_without_one() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    sam.get("/dashboard").await;
    let (status, own) = sam.post("/idp/token", &[]).await;
    assert_eq!(status, StatusCode::OK, "{own}");
    let own: serde_json::Value = serde_json::from_str(&own).unwrap();
    let api = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let exchanged = api
        .post(format!("{base}/oidc/token"))
        .basic_auth(
            campground_demo::api::CLIENT_ID,
            Some(campground_demo::api::CLIENT_SECRET),
        )
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("actor_token", own["access_token"].as_str().unwrap()),
            (
                "actor_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("requested_subject", "olive"),
            ("audience", &format!("{base}/api")),
            ("reason", "Olive's booking sync fails through the API"),
        ])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exchanged: serde_json::Value = serde_json::from_str(&exchanged).unwrap();
    let token = exchanged["access_token"].as_str().unwrap();
    // The provider's own token signs its person in, its scheme in any case
    // (RFC 7235: auth schemes are case-insensitive).
    let own_call = api
        .get(format!("{base}/api/bookings"))
        .header(
            "authorization",
            format!("bearer {}", own["access_token"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(own_call.status(), StatusCode::OK);
    // Olive's, under the impersonation token: each campground's latest
    // bookings (here all of them), and how many there are.
    let olives = api
        .get(format!("{base}/api/bookings"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(olives.status(), StatusCode::OK);
    let olives: serde_json::Value = serde_json::from_str(&olives.text().await.unwrap()).unwrap();
    let listed = olives["bookings"].as_array().unwrap().len();
    assert!(listed > 0, "{olives}");
    assert_eq!(olives["total"].as_u64(), Some(listed as u64));
    // It is for the API (its audience): on a page it signs nobody in.
    let own_page = api
        .get(format!("{base}/audit.txt"))
        .bearer_auth(own["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(own_page.status(), StatusCode::UNAUTHORIZED);
    // Without a token the API asks for one (RFC 6750 §3).
    let bare = api
        .get(format!("{base}/api/bookings"))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(bare.headers()["www-authenticate"], "Bearer");
    let billing = api
        .get(format!("{base}/billing"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(billing.status(), StatusCode::FORBIDDEN);
    // The console too, with nobody signed in: refused by the guard, not
    // sent to sign in.
    let console = api
        .get(format!("{base}/support"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(console.status(), StatusCode::FORBIDDEN);
    let revoke = api
        .post(format!("{base}/support/revoke"))
        .bearer_auth(token)
        .form(&[("session", "none"), ("csrf", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), StatusCode::FORBIDDEN);
    // Each refusal is its request's one record.
    let (_, trail) = sam.get("/audit.txt").await;
    for route in ["GET /billing", "GET /support", "POST /support/revoke"] {
        let rows: Vec<&str> = trail
            .lines()
            .filter(|l| l.contains(&format!("{route}:")) || l.contains(&format!("{route} (")))
            .collect();
        assert_eq!(rows.len(), 1, "{route}: {trail}");
        assert!(rows[0].contains("| Denied Attempt |"), "{route}: {trail}");
    }
}

/// Reads a response's body until it ends or fails: whether it failed (was
/// cut), what it carried. Gives up after 30 s (a stream that went on).
async fn read_to_end_or_cut(mut res: reqwest::Response) -> (bool, String) {
    let mut seen = String::new();
    let read = async {
        loop {
            match res.chunk().await {
                Ok(Some(chunk)) => seen.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    };
    let cut = tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("the live line went on after the impersonation ended");
    (cut, seen)
}

/// The dashboard's live line (server-sent events, over a real connection)
/// shows the customer's bookings under impersonation, and is cut, not
/// finished, once the impersonation is stopped: a tab left open stops
/// showing the customer's data. Outside an impersonation it goes on.
#[tokio::test]
async fn the_live_line_is_cut_when_the_impersonation_ends() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    // Sam, a support agent, has no campground of his own.
    let (status, page) = sam.get("/dashboard").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains("id=\"live-line\""));
    impersonate(&mut sam, "olive").await;
    let (_, page) = sam.get("/dashboard").await;
    assert!(page.contains("id=\"live-line\""), "{page}");
    // Under the impersonation the page stops listening once cut.
    assert!(page.contains("s.onerror"), "{page}");
    let mut res = sam.open("/dashboard/live").await;
    assert_eq!(res.status(), StatusCode::OK);
    let first = res.chunk().await.unwrap().unwrap();
    let first = String::from_utf8_lossy(&first);
    assert!(first.contains("event: bookings"), "{first}");
    let (status, _) = sam.post("/impersonation/stop", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (cut, _) = read_to_end_or_cut(res).await;
    assert!(cut, "the live line finished instead of being cut");

    // Olive's own live line, outside any impersonation, is not watched:
    // it goes on, two events at least, two seconds apart.
    let mut olive = User::sign_in(&base, "olive").await;
    // Her own page reconnects after a blip, as `EventSource` does.
    let (_, page) = olive.get("/dashboard").await;
    assert!(page.contains("id=\"live-line\"") && !page.contains("s.onerror"));
    let mut res = olive.open("/dashboard/live").await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut events = 0;
    while events < 2 {
        let chunk = res.chunk().await.unwrap().expect("the live line ended");
        events += String::from_utf8_lossy(&chunk)
            .matches("event: bookings")
            .count();
    }
}

/// A page under another name that resolves to 127.0.0.1 (DNS rebinding)
/// can set the demo's sign-in cookie itself: the demo answers it nothing
/// (421), a read no more than a post. Its own address and the `localhost`
/// twin are served.
#[tokio::test]
async fn the_demo_answers_only_at_its_own_address() {
    let base = demo().await;
    let port = base.rsplit(':').next().unwrap();
    let client = reqwest::Client::new();
    // Olive's billing page (her card, whole) asked for under `host`.
    let billing = async |host: &str| {
        let res = client
            .get(format!("{base}/billing"))
            .header(reqwest::header::HOST, host)
            .header(reqwest::header::COOKIE, "campground_user=olive")
            .send()
            .await
            .unwrap();
        (res.status(), res.text().await.unwrap())
    };
    for host in [format!("rebound.example:{port}"), "127.0.0.1".to_owned()] {
        let (status, body) = billing(&host).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{host}");
        assert!(!body.contains("4242"), "{body}");
    }
    for host in [format!("127.0.0.1:{port}"), format!("LOCALHOST:{port}")] {
        let (status, body) = billing(&host).await;
        assert_eq!(status, StatusCode::OK, "{host}");
        assert!(body.contains("4242"));
    }
    // On http's own port a browser sends the host alone.
    let demo = Demo::open(StoreKind::Memory, "memory").await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let real = format!("http://{}", listener.local_addr().unwrap());
    let app = demo.router("http://127.0.0.1:80").unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    for (host, status) in [
        ("127.0.0.1", StatusCode::OK),
        ("localhost", StatusCode::OK),
        ("127.0.0.1:80", StatusCode::OK),
        ("127.0.0.1:8080", StatusCode::MISDIRECTED_REQUEST),
    ] {
        let res = client
            .get(format!("{real}/"))
            .header(reqwest::header::HOST, host)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{host}");
    }
}

/// The password form is for people who hold `password:change`: Sam, an
/// agent, is refused (and not shown the form); the live line asks whoever
/// is not signed in to sign in (401), not for a permission.
#[tokio::test]
async fn the_password_form_needs_its_permission_and_the_live_line_a_sign_in() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    let (_, profile) = sam.get("/profile").await;
    assert!(
        !profile.contains("action=\"/profile/password\""),
        "{profile}"
    );
    let (status, body) = sam
        .post("/profile/password", &[("password", "a long enough one")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let mut olive = User::sign_in(&base, "olive").await;
    let (_, profile) = olive.get("/profile").await;
    assert!(
        profile.contains("action=\"/profile/password\""),
        "{profile}"
    );

    let nobody = reqwest::Client::new();
    let res = nobody
        .get(format!("{base}/dashboard/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

/// Under impersonation, a booking into another tenant's campground is
/// refused and goes on the trail as a denied attempt (tenant boundary),
/// not as a change.
#[tokio::test]
async fn a_booking_across_tenants_under_impersonation_is_a_denied_attempt() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "olive").await;
    sam.get("/dashboard").await;
    let (status, body) = sam
        .post(
            "/bookings",
            &[
                ("guest", "K. Lindqvist"),
                ("site", "Pitch 4"),
                ("arrival", "2026-12-08"),
                ("nights", "2"),
                ("campground", "redrock"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    sam.post("/impersonation/stop", &[]).await;
    let (_, table) = sam.get("/audit.txt").await;
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("POST /bookings"))
        .collect();
    assert_eq!(rows.len(), 1, "{table}");
    assert!(
        rows[0].contains("| Denied Attempt | Sam Support | Olive Owner |"),
        "{table}"
    );
    assert!(rows[0].contains("tenant"), "{table}");
}

/// The console offers the API side: a button for the agent's own access
/// token (a form the app accepts) and the requests that exchange it, at
/// the demo's own address.
#[tokio::test]
async fn the_console_offers_the_agents_own_api_token() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    let (_, console) = sam.get("/support").await;
    assert!(console.contains("id=\"api-access\""), "{console}");
    assert!(console.contains("action=\"/idp/token\""), "{console}");
    assert!(console.contains(&format!("{base}/oidc/token")), "{console}");
    let (status, body) = sam.post("/idp/token", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        token["access_token"]
            .as_str()
            .is_some_and(|t| t.split('.').count() == 3),
        "{body}"
    );
}

/// Under impersonation the profile tells a card the customer does not
/// have from data the rules keep from support: Stan has no card ("-"),
/// and his email is there but redacted.
#[tokio::test]
async fn a_card_the_customer_does_not_have_is_shown_as_none() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "stan").await;
    let (_, profile) = sam.get("/profile").await;
    assert!(profile.contains("<td id=\"card\">-</td>"), "{profile}");
    assert!(
        profile.contains("<td id=\"email\">[redacted]</td>"),
        "{profile}"
    );
}

/// A customer who posts the console's revoke with a live session's id is
/// refused by the SDK, and the attempt goes on that session's trail as a
/// denied one, naming the customer; the session goes on.
#[tokio::test]
async fn a_customers_revoke_is_refused_and_on_the_trail() {
    let base = demo().await;
    let mut sam = User::sign_in(&base, "sam").await;
    impersonate(&mut sam, "stan").await;
    let mut lee = User::sign_in(&base, "lee").await;
    let session = lee.first_live_session().await;

    let mut olive = User::sign_in(&base, "olive").await;
    olive.get("/dashboard").await;
    let (status, body) = olive
        .post("/support/revoke", &[("session", &session)])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("Not revoked"), "{body}");
    let (status, body) = sam.get("/dashboard").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("impersonation-banner"), "{body}");
    let (_, trail) = lee.get("/audit.txt").await;
    let refused: Vec<&str> = trail
        .lines()
        .filter(|l| l.contains("| Denied Attempt | Olive Owner | Stan Staff |"))
        .collect();
    assert_eq!(refused.len(), 1, "{trail}");
}

/// An administrator who may not impersonate sees the console (its live
/// sessions, to revoke) but not the API card, whose exchange would refuse
/// her.
#[tokio::test]
async fn the_api_card_is_for_those_who_may_impersonate() {
    let base = demo().await;
    let mut ada = User::sign_in(&base, "ada").await;
    let (status, console) = ada.get("/support").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!console.contains("id=\"api-access\""), "{console}");
}

/// No page of the demo may be framed by another site (a page on another
/// port of this host counts as the same site to the cookies), impersonated
/// or not: a framed console could have a lead click Revoke unseen.
#[tokio::test]
async fn no_page_may_be_framed_by_another_origin() {
    let base = demo().await;
    let lee = User::sign_in(&base, "lee").await;
    let res = lee.open("/support").await;
    let policy = res.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("frame-ancestors 'self'"), "{policy}");
}
