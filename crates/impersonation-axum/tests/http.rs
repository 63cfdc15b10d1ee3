//! In-process HTTP tests of every rule of the Axum binding.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use impersonation_axum::{
    CsrfCheck, EffectiveUser, Impersonating, ImpersonationLayer, NotImpersonating, RealUser, routes,
};
use impersonation_core::{
    AuditAction, AuditEvent, AuditQuery, Impersonation, ManualClock, MemoryDirectory, MemoryStore,
    Store, UserId,
};
use impersonation_testkit::conformance::all_events;
use impersonation_testkit::epoch;
use impersonation_testkit::faults::{Calls, FaultyStore, When};
use time::Duration;
use tower::ServiceExt;

use common::{agent, auth, customer};

type Svc = Impersonation<Arc<FaultyStore<MemoryStore>>, MemoryDirectory>;

struct Fixture {
    app: Router,
    svc: Svc,
    clock: ManualClock,
    store: Arc<FaultyStore<MemoryStore>>,
    /// Changes the `/bookings/{id}` and `/racing-change` handlers made.
    changes: Arc<AtomicUsize>,
}

impl Fixture {
    /// A second process of the same app, on the same store and clock.
    fn other_process(&self) -> Svc {
        Impersonation::new(Arc::clone(&self.store), self.svc.directory().clone())
            .with_clock(self.clock.clone())
    }
}

/// `other` stops the session whose cookie `sam` holds, as another process
/// would; the secret as the cookie held it.
async fn stop_elsewhere(other: &Svc, sam: &Browser) -> String {
    let held = sam.secret().unwrap();
    let secret = impersonation_core::SessionSecret::parse(&held).unwrap();
    other.stop(&secret, &agent("sam")).await.unwrap();
    held
}

/// Headers that let shared caches keep a page.
fn public_caching() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "public, max-age=600, s-maxage=900"),
        (
            header::HeaderName::from_static("cdn-cache-control"),
            "max-age=600",
        ),
    ]
}

fn fixture() -> Fixture {
    fixture_with(impersonation_core::Policy::default())
}

fn fixture_with(policy: impersonation_core::Policy) -> Fixture {
    let directory = MemoryDirectory::new();
    for p in [
        agent("sam"),
        agent("kim"),
        customer("olive", "Olive Owner"),
        customer("mallory", "<script>alert(1)</script>"),
    ] {
        directory.insert(p);
    }
    let clock = ManualClock::new(epoch());
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let svc = Impersonation::new(Arc::clone(&store), directory.clone())
        .with_clock(clock.clone())
        .with_policy(policy);
    let changes = Arc::new(AtomicUsize::new(0));
    let (saved, raced) = (Arc::clone(&changes), Arc::clone(&changes));
    // Another process of the app, which ends the session while the
    // handler of `/racing-change` is making its change.
    let other = Arc::new(
        Impersonation::new(Arc::clone(&store), directory.clone()).with_clock(clock.clone()),
    );
    let other_denying = Arc::clone(&other);
    let app = Router::new()
        // A page with a form: it takes the CSRF token (and so gives a
        // browser without the cookie its cookie).
        .route(
            "/",
            get(
                |user: EffectiveUser, token: impersonation_axum::CsrfToken| async move {
                    Html(format!(
                        "<html><body><h1>Dashboard</h1><p>{}</p>\
                         <form method=post action=/bookings/1>\
                         <input type=hidden name=csrf value={}></form></body></html>",
                        user.has_permission("bookings:read"),
                        token.as_str()
                    ))
                },
            ),
        )
        .route(
            "/billing",
            get(|_: NotImpersonating| async { Html("<html><body>card on file</body></html>") }),
        )
        .route(
            "/bookings/{id}",
            post(move || async move {
                saved.fetch_add(1, Ordering::SeqCst);
                "saved"
            }),
        )
        // The app's own refusal (a campground of another tenant), and a
        // marker on an answer that is no refusal.
        .route(
            "/bookings/{id}/move",
            post(|| async {
                (
                    StatusCode::FORBIDDEN,
                    impersonation_axum::Denied(impersonation_core::Denial::TenantBoundary),
                    "not one of your campgrounds",
                )
            }),
        )
        // The app's refusal, in a session its agent's other tab stops
        // while the handler runs.
        .route(
            "/bookings/{id}/move-racing",
            post(move |Impersonating(ctx): Impersonating| async move {
                other_denying
                    .stop_session(ctx.session(), &agent("sam"))
                    .await
                    .unwrap();
                (
                    StatusCode::FORBIDDEN,
                    impersonation_axum::Denied(impersonation_core::Denial::TenantBoundary),
                    "not one of your campgrounds",
                )
            }),
        )
        .route(
            "/bookings/{id}/copy",
            post(|| async {
                (
                    impersonation_axum::Denied(impersonation_core::Denial::TenantBoundary),
                    "copied",
                )
            }),
        )
        .route(
            "/racing-change",
            post(move |Impersonating(ctx): Impersonating| async move {
                raced.fetch_add(1, Ordering::SeqCst);
                // The agent's other tab stops the session meanwhile.
                other
                    .stop_session(ctx.session(), &agent("sam"))
                    .await
                    .unwrap();
                "saved"
            }),
        )
        .route(
            "/me",
            get(|RealUser(p): RealUser| async move { p.id.to_string() }),
        )
        // Pages the app lets shared caches keep: one with a form (which
        // takes the CSRF token), one without.
        .route(
            "/public",
            get(|| async { (public_caching(), "the page") }),
        )
        .route(
            "/public-form",
            get(|token: impersonation_axum::CsrfToken| async move {
                (
                    public_caching(),
                    Html(format!(
                        "<form method=post><input type=hidden name=csrf value={}></form>",
                        token.as_str()
                    )),
                )
            }),
        )
        // The CSRF token a page would carry in its forms.
        .route(
            "/token",
            get(|axum::Extension(token): axum::Extension<impersonation_axum::CsrfToken>| async move {
                token.as_str().to_owned()
            }),
        )
        // A plain answer whose body streams the token: the handler holds
        // it without having read it yet when the response leaves.
        .route(
            "/token-stream",
            get(|token: impersonation_axum::CsrfToken| async move {
                axum::body::Body::from_stream(futures_util::stream::once(async move {
                    Ok::<_, std::convert::Infallible>(token.as_str().to_owned())
                }))
            }),
        )
        // A plain answer whose handler asked for the token and let it go.
        .route(
            "/token-unused",
            get(|token: impersonation_axum::CsrfToken| async move {
                drop(token);
                "no form here"
            }),
        )
        // An XHTML page, parsed by browsers as XML, its XHTML under a prefix.
        .route(
            "/xhtml",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/xhtml+xml; charset=utf-8")],
                    "<?xml version=\"1.0\"?>\n<h:html xmlns:h=\"http://www.w3.org/1999/xhtml\">\
                     <h:body><h:p>bookings</h:p><!-- </h:body> --></h:body></h:html>",
                )
            }),
        )
        // A page under a policy that allows no inline style.
        .route(
            "/strict",
            get(|| async {
                (
                    [(header::CONTENT_SECURITY_POLICY, "default-src 'self'")],
                    Html("<html><body>the page</body></html>"),
                )
            }),
        )
        // A page of an app that posts no forms, under a policy that
        // says so.
        .route(
            "/no-forms",
            get(|| async {
                (
                    [(
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'self'; style-src 'self' 'unsafe-inline'; form-action 'none'",
                    )],
                    Html("<html><body>the page</body></html>"),
                )
            }),
        )
        // An app shell whose policy is in a `<meta>`, not a header.
        .route(
            "/shell",
            get(|| async {
                Html(
                    "<!doctype html><html><head>\
                     <meta http-equiv='Content-Security-Policy' \
                     content='default-src &#39;self&#39;'>\
                     </head><body><div id=app></div></body></html>",
                )
            }),
        )
        // A page with a HEAD handler of its own, which announces the
        // page's length and sends no body.
        .route(
            "/sized",
            get(|| async { Html("<html><body>the page</body></html>") }).head(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                        (header::CONTENT_LENGTH, "34"),
                        (header::ETAG, "\"v1\""),
                    ],
                    "",
                )
            }),
        )
        // A page the way a static-file service answers one: unchanged for
        // a matching ETag, a part for a range, the precompressed file for
        // an encoding the client accepts.
        .route(
            "/conditional",
            get(|headers: HeaderMap| async move {
                let page = "<html><body>the page</body></html>";
                if headers.contains_key(header::IF_NONE_MATCH) {
                    return StatusCode::NOT_MODIFIED.into_response();
                }
                if headers.contains_key(header::RANGE) {
                    return (
                        StatusCode::PARTIAL_CONTENT,
                        [(header::CONTENT_RANGE, "bytes 0-9/34")],
                        Html(&page[..10]),
                    )
                        .into_response();
                }
                if headers.contains_key(header::ACCEPT_ENCODING) {
                    return (
                        [(header::CONTENT_ENCODING, "br")],
                        Html(vec![0x1b_u8, 0x21, 0x00]),
                    )
                        .into_response();
                }
                Html(page).into_response()
            }),
        )
        .route(
            "/settings",
            post(
                |check: CsrfCheck,
                 user: EffectiveUser,
                 axum::Form(form): axum::Form<BTreeMap<String, String>>| async move {
                    let sent = form.get("csrf").map_or("", String::as_str);
                    if check.verify(sent) {
                        (StatusCode::OK, format!("saved for {}", user.id()))
                    } else {
                        (StatusCode::FORBIDDEN, "cross-site request refused".into())
                    }
                },
            ),
        )
        .nest("/impersonation", routes())
        .layer(ImpersonationLayer::new(svc.clone()).accept_tokens(PendingTokens))
        .layer(from_fn_with_state(directory, auth));
    Fixture {
        app,
        svc,
        clock,
        store,
        changes,
    }
}

/// A browser: keeps cookies, signs in as one user.
struct Browser {
    app: Router,
    user: String,
    cookies: BTreeMap<String, String>,
}

/// Sam, signed in, impersonating Olive: where most tests here begin.
async fn sam_on_olive() -> (Fixture, Browser) {
    let f = fixture();
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    sam.start("olive").await;
    (f, sam)
}

/// The trail's latest end of a session.
async fn last_end(f: &Fixture) -> AuditEvent {
    events(f)
        .await
        .into_iter()
        .rev()
        .find(|e| e.action == AuditAction::SessionEnded)
        .expect("a session ended")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    /// The `Content-Security-Policy` headers, in order.
    fn policies(&self) -> Vec<&str> {
        self.headers
            .get_all(header::CONTENT_SECURITY_POLICY)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }
}

impl Browser {
    fn new(f: &Fixture, user: &str) -> Self {
        Self {
            app: f.app.clone(),
            user: user.into(),
            cookies: BTreeMap::new(),
        }
    }

    fn csrf(&self) -> String {
        self.cookies
            .get("__Host-impersonation-csrf")
            .cloned()
            .unwrap_or_default()
    }

    fn secret(&self) -> Option<String> {
        self.cookies.get("__Host-impersonation").cloned()
    }

    async fn send(
        &mut self,
        method: Method,
        uri: &str,
        form: Option<String>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "app.example")
            .header("x-test-user", &self.user);
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header(header::COOKIE, jar.join("; "));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let body = match form {
            Some(form) => {
                req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                Body::from(form)
            }
            None => Body::empty(),
        };
        let res = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        self.keep(res.headers());
        let (parts, body) = res.into_parts();
        let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// Takes the cookies a response sets (or clears).
    fn keep(&mut self, headers: &HeaderMap) {
        for value in headers.get_all(header::SET_COOKIE) {
            let c = cookie::Cookie::parse(value.to_str().unwrap().to_owned()).unwrap();
            if c.max_age() == Some(time::Duration::ZERO) || c.value().is_empty() {
                self.cookies.remove(c.name());
            } else {
                self.cookies
                    .insert(c.name().to_owned(), c.value().to_owned());
            }
        }
    }

    async fn get(&mut self, uri: &str) -> Reply {
        self.send(Method::GET, uri, None, &[]).await
    }

    async fn start(&mut self, target: &str) -> Reply {
        let form = format!(
            "target={target}&reason=Customer+cannot+see+bookings&ticket=SUP-1&csrf={}",
            self.csrf()
        );
        self.send(
            Method::POST,
            "/impersonation/start",
            Some(form),
            &[
                ("origin", "https://app.example"),
                ("sec-fetch-site", "same-origin"),
            ],
        )
        .await
    }

    /// The token the current page's forms carry (under a session, bound
    /// to it; else the stored one).
    async fn page_token(&mut self) -> String {
        self.get("/token").await.body
    }

    async fn stop(&mut self) -> Reply {
        // The banner's Stop form, rendered as the page is.
        let token = self.page_token().await;
        self.stop_with(&token).await
    }

    /// The Stop form of a page rendered earlier, carrying `token`.
    async fn stop_with(&mut self, token: &str) -> Reply {
        self.stop_form(format!("csrf={token}")).await
    }

    /// An API client's request with `bearer` as its `Authorization`.
    async fn bearer(&mut self, method: Method, uri: &str, bearer: &str) -> Reply {
        self.send(method, uri, None, &[("authorization", bearer)])
            .await
    }

    /// A stop posting `form` as it is.
    async fn stop_form(&mut self, form: String) -> Reply {
        self.send(
            Method::POST,
            "/impersonation/stop",
            Some(form),
            &[("origin", "https://app.example")],
        )
        .await
    }
}

/// A settings form posted with `token` (the one its page carried).
async fn post_settings(b: &mut Browser, token: &str) -> Reply {
    let form = format!("timezone=Europe%2FBerlin&csrf={token}");
    b.send(
        Method::POST,
        "/settings",
        Some(form),
        &[("origin", "https://app.example")],
    )
    .await
}

async fn events(f: &Fixture) -> Vec<AuditEvent> {
    all_events(f.store.inner(), AuditQuery::default()).await
}

#[tokio::test]
async fn start_and_stop_are_post_only() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    assert_eq!(
        b.get("/impersonation/start").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        b.get("/impersonation/stop").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn cross_site_starts_are_refused() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    b.get("/").await; // gets the CSRF cookie
    let form = |csrf: &str| {
        Some(format!(
            "target=olive&reason=Customer+cannot+see+bookings&csrf={csrf}"
        ))
    };
    let same = [("origin", "https://app.example")];
    assert_eq!(
        b.send(Method::POST, "/impersonation/start", form(""), &same)
            .await
            .status,
        StatusCode::FORBIDDEN,
        "missing token"
    );
    assert_eq!(
        b.send(Method::POST, "/impersonation/start", form("forged"), &same)
            .await
            .status,
        StatusCode::FORBIDDEN,
        "wrong token"
    );
    let token = b.csrf();
    let foreign = [("origin", "https://evil.example")];
    assert_eq!(
        b.send(Method::POST, "/impersonation/start", form(&token), &foreign)
            .await
            .status,
        StatusCode::FORBIDDEN,
        "foreign origin"
    );
    let cross = [("sec-fetch-site", "cross-site")];
    assert_eq!(
        b.send(Method::POST, "/impersonation/start", form(&token), &cross)
            .await
            .status,
        StatusCode::FORBIDDEN,
        "cross-site fetch"
    );
    assert!(b.secret().is_none());
    assert_eq!(
        b.start("olive").await.status,
        StatusCode::SEE_OTHER,
        "the same request, same-origin with the token"
    );
}

/// An XHTML page gets the banner as XHTML: still well-formed XML (a
/// browser shows nothing of a page that is not), the banner an XHTML
/// element in the page's body, its Stop form posting the bound token.
#[tokio::test]
async fn an_xhtml_page_gets_the_banner_and_stays_xml() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    let plain = b.get("/xhtml").await;
    assert!(!plain.body.contains("impersonation-banner"));
    b.start("olive").await;
    let page = b.get("/xhtml").await;
    assert_eq!(page.status, StatusCode::OK);
    let doc =
        roxmltree::Document::parse(&page.body).unwrap_or_else(|e| panic!("{e}: {}", page.body));
    let xhtml = "http://www.w3.org/1999/xhtml";
    let banner = doc
        .descendants()
        .find(|n| n.attribute("id") == Some("impersonation-banner"))
        .expect("the banner");
    assert_eq!(banner.tag_name().namespace(), Some(xhtml));
    assert!(
        banner
            .parent_element()
            .unwrap()
            .has_tag_name((xhtml, "body"))
    );
    assert_eq!(banner.attribute("role"), Some("alert"));
    let message = banner
        .descendants()
        .find(|n| n.attribute("class") == Some("impersonation-message"))
        .unwrap();
    assert_eq!(
        message.text(),
        Some("You are impersonating Olive Owner (Pinewood Campground)")
    );
    let csrf = banner
        .descendants()
        .find(|n| n.attribute("name") == Some("csrf"))
        .unwrap();
    // A HEAD (served by the GET handler) announces the length a GET sends.
    let head = b.send(Method::HEAD, "/xhtml", None, &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.headers[header::CONTENT_LENGTH],
        page.body.len().to_string().as_str()
    );
    // The same token an HTML page's banner carries (bound to the session).
    let html = b.get("/").await.body;
    let token = csrf.attribute("value").unwrap();
    assert!(
        html.contains(&format!("name=\"csrf\" value=\"{token}\"")),
        "{token} {html}"
    );
}

/// A customer named in markup still gets a well-formed XHTML page.
#[tokio::test]
async fn an_xhtml_page_stays_xml_whatever_the_customers_name() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    b.get("/").await;
    b.start("mallory").await;
    let page = b.get("/xhtml").await;
    let doc =
        roxmltree::Document::parse(&page.body).unwrap_or_else(|e| panic!("{e}: {}", page.body));
    let message = doc
        .descendants()
        .find(|n| n.attribute("class") == Some("impersonation-message"))
        .unwrap();
    assert_eq!(
        message.text(),
        Some("You are impersonating <script>alert(1)</script> (Pinewood Campground)")
    );
}

/// A page whose policy allows no inline style still shows the banner
/// styled (fixed at the top): its policy lets the banner's own `style`
/// attributes through by their hashes, and nothing more. Outside
/// impersonation the policy is the app's, untouched.
#[tokio::test]
async fn a_page_that_allows_no_inline_style_lets_the_banners_own_through() {
    use base64::Engine;
    use sha2::Digest;
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    let plain = b.get("/strict").await;
    assert_eq!(
        plain.headers[header::CONTENT_SECURITY_POLICY],
        "default-src 'self'"
    );
    b.start("olive").await;
    let page = b.get("/strict").await;
    let policies = page.policies();
    let sources = impersonation_axum::banner_style_sources();
    assert_eq!(
        policies,
        [
            format!("default-src 'self'; style-src-attr 'self' {sources}").as_str(),
            "frame-ancestors 'self'",
        ]
    );
    // The hashes are those of the styles the banner carries, as a parser
    // reads them out of the page.
    let html = scraper::Html::parse_document(&page.body);
    let styled =
        scraper::Selector::parse("#impersonation-banner, #impersonation-banner [style]").unwrap();
    let hashes: Vec<String> = html
        .select(&styled)
        .map(|e| {
            let style = e.value().attr("style").unwrap();
            let digest = sha2::Sha256::digest(style.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        })
        .collect();
    assert_eq!(hashes.len(), 5, "{}", page.body);
    assert_eq!(sources, format!("'unsafe-hashes' {}", hashes.join(" ")));
}

/// A policy that lets no form post (`form-action 'none'`) would block the
/// banner's Stop button: it lets that one form post to the stop route, at
/// the host the page was asked for, and nothing else.
#[tokio::test]
async fn a_policy_that_lets_no_form_post_lets_the_banners_stop_through() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    let policy = "default-src 'self'; style-src 'self' 'unsafe-inline'; form-action 'none'";
    assert_eq!(
        b.get("/no-forms").await.headers[header::CONTENT_SECURITY_POLICY],
        policy
    );
    b.start("olive").await;
    let page = b.get("/no-forms").await;
    let policies = page.policies();
    assert_eq!(
        policies,
        [
            "default-src 'self'; style-src 'self' 'unsafe-inline'; \
             form-action app.example/impersonation/stop",
            "frame-ancestors 'self'",
        ]
    );
    // The URL the banner's form posts to, as the browser resolves it.
    let html = scraper::Html::parse_document(&page.body);
    let form = scraper::Selector::parse("#impersonation-banner form").unwrap();
    let action = html
        .select(&form)
        .next()
        .and_then(|f| f.value().attr("action"))
        .unwrap();
    assert_eq!(
        url::Url::parse("https://app.example/no-forms")
            .unwrap()
            .join(action)
            .unwrap()
            .as_str(),
        "https://app.example/impersonation/stop"
    );
}

/// The same for a policy the page delivers in a `<meta>` (an app shell's):
/// the banner's styles are let through it, as a parser reads the tag's
/// `content`; outside impersonation the page is the app's, untouched.
#[tokio::test]
async fn a_policy_in_a_meta_tag_lets_the_banners_own_styles_through() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    let policy_of = |body: &str| {
        let html = scraper::Html::parse_document(body);
        let meta = scraper::Selector::parse("head meta[http-equiv]").unwrap();
        html.select(&meta)
            .map(|m| m.value().attr("content").unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let plain = b.get("/shell").await;
    assert_eq!(policy_of(&plain.body), ["default-src 'self'"]);
    b.start("olive").await;
    let page = b.get("/shell").await;
    assert!(
        page.body.contains("id=\"impersonation-banner\""),
        "{}",
        page.body
    );
    let sources = impersonation_axum::banner_style_sources();
    assert_eq!(
        policy_of(&page.body),
        [format!(
            "default-src 'self'; style-src-attr 'self' {sources}"
        )],
        "{}",
        page.body
    );
    // No header policy was made up for it.
    assert_eq!(page.policies(), ["frame-ancestors 'self'"]);
}

/// A browser without the CSRF cookie gets it with a page, or with an
/// answer whose handler took the token or holds it in a body that streams
/// (one that asked for it and let it go gives none): any other answer (a stylesheet, a
/// JSON answer; plain text here) gives out none, and stays as cacheable as
/// the app made it. The response that gives the cookie is that browser's:
/// kept out of shared caches (`private`, the CDN's own header gone), or
/// one would hand the same token to everyone after. Once the browser holds
/// the cookie, the app's caching stands.
#[tokio::test]
async fn a_first_csrf_cookie_comes_with_a_page_or_a_taken_token_and_stays_out_of_shared_caches() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    let untouched = |reply: &Reply| {
        assert!(
            reply.headers.get(header::SET_COOKIE).is_none(),
            "{:?}",
            reply.headers
        );
        assert_eq!(
            reply.headers[header::CACHE_CONTROL],
            "public, max-age=600, s-maxage=900"
        );
        assert_eq!(reply.headers["cdn-cache-control"], "max-age=600");
    };
    untouched(&b.get("/public").await);
    assert_eq!(b.csrf(), "");
    let first = b.get("/public-form").await;
    assert!(
        first.headers.get_all(header::SET_COOKIE).iter().any(|c| c
            .to_str()
            .unwrap()
            .starts_with("__Host-impersonation-csrf=")),
        "{:?}",
        first.headers
    );
    assert!(
        first.body.contains(&b.csrf()),
        "the cookie is the form's token"
    );
    assert_eq!(first.headers[header::CACHE_CONTROL], "private, max-age=600");
    assert!(first.headers.get("cdn-cache-control").is_none());
    untouched(&b.get("/public-form").await);
    untouched(&b.get("/public").await);
    // An answer of another type gives the cookie only if its handler took
    // the token.
    let mut other = Browser::new(&f, "kim");
    let plain = other.get("/me").await;
    assert!(plain.headers.get(header::SET_COOKIE).is_none());
    let token = other.get("/token").await;
    assert_eq!(token.body, other.csrf(), "{:?}", token.headers);
    // A token the handler asked for and dropped gives none; one held in a
    // body that streams gives the cookie, since the body may yet read it.
    let mut third = Browser::new(&f, "sam");
    let unused = third.get("/token-unused").await;
    assert_eq!(unused.body, "no form here");
    assert!(
        unused.headers.get(header::SET_COOKIE).is_none(),
        "{:?}",
        unused.headers
    );
    let streamed = third.get("/token-stream").await;
    assert!(!third.csrf().is_empty(), "{:?}", streamed.headers);
    assert_eq!(streamed.body, third.csrf());
    assert_eq!(streamed.headers[header::CACHE_CONTROL], "private");
}

/// A session that has ended elsewhere replaces the browser's token with
/// the next response, whatever it is (a plain answer that takes no token
/// here): the old identity's open forms are retired at once.
#[tokio::test]
async fn a_dead_sessions_token_is_replaced_on_any_answer() {
    let (f, mut b) = sam_on_olive().await;
    let before = b.csrf();
    stop_elsewhere(&f.svc, &b).await;
    let reply = b.get("/me").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!b.csrf().is_empty());
    assert_ne!(b.csrf(), before, "{:?}", reply.headers);
}

#[tokio::test]
async fn a_started_session_sets_a_host_cookie_and_shows_the_banner() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    b.get("/").await;
    let started = b.start("olive").await;
    let set = started
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("__Host-impersonation="))
        .unwrap();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set} lacks {attribute}");
    }
    let page = b.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
    // Only this site may frame it (a sibling's frame could have the agent
    // click the banner's Stop unseen).
    assert_eq!(page.headers[header::X_FRAME_OPTIONS], "SAMEORIGIN");
    assert_eq!(
        page.headers[header::CONTENT_SECURITY_POLICY],
        "frame-ancestors 'self'"
    );
    assert!(page.body.contains("role=\"alert\""));
    assert!(
        page.body
            .contains("You are impersonating Olive Owner (Pinewood Campground)"),
        "{}",
        page.body
    );
    assert!(
        !page.body.contains("impersonation-read-only"),
        "a full session"
    );
    assert!(page.body.contains("Customer cannot see bookings"));
    assert!(
        page.body.find("impersonation-banner").unwrap() < page.body.find("</body>").unwrap(),
        "banner before </body>"
    );
    assert!(
        page.body.contains("<p>true</p>"),
        "the page ran as the shadow user"
    );
    assert_eq!(
        b.get("/me").await.body,
        "sam",
        "the real agent stays reachable"
    );
    let status: serde_json::Value =
        serde_json::from_str(&b.get("/impersonation/status").await.body).unwrap();
    assert_eq!(status["impersonating"], true);
    assert_eq!(status["agent"]["id"], "sam");
    assert_eq!(status["subject"]["id"], "olive");
}

#[tokio::test]
async fn the_secret_rotates_on_start_and_stop() {
    let (_f, mut b) = sam_on_olive().await;
    let first = b.secret().unwrap();
    assert_eq!(b.stop().await.status, StatusCode::SEE_OTHER);
    assert!(b.secret().is_none(), "stop clears the cookie");
    let page = b.get("/").await;
    assert!(!page.body.contains("impersonation-banner"));
    b.start("olive").await;
    let second = b.secret().unwrap();
    assert_ne!(first, second);
    let bearer = |t: &str| format!("Bearer {t}");
    let old = b
        .send(
            Method::GET,
            "/impersonation/status",
            None,
            &[("authorization", &bearer(&first))],
        )
        .await;
    assert_eq!(
        old.status,
        StatusCode::UNAUTHORIZED,
        "the old secret gets 401"
    );
    let new = b
        .send(
            Method::GET,
            "/impersonation/status",
            None,
            &[("authorization", &bearer(&second))],
        )
        .await;
    assert_eq!(new.status, StatusCode::OK);
}

/// A page that leaves a form of its own open: the banner's token joins
/// that form after the app's fields, which may hold a `csrf` and a
/// `return_to` of the app's.
#[tokio::test]
async fn the_banners_stop_inside_an_open_app_form_is_accepted() {
    let (_f, mut b) = sam_on_olive().await;
    let token = b.page_token().await;
    let res = b
        .stop_form(format!(
            "csrf=the-apps-own&return_to=%2Fsettings&timezone=UTC&csrf={token}"
        ))
        .await;
    assert_eq!(res.status, StatusCode::SEE_OTHER, "{}", res.body);
    assert_eq!(res.headers[header::LOCATION], "/settings");
    assert!(b.secret().is_none(), "stop clears the cookie");
    // The app's token last is the app's form, not the banner's: refused.
    let (_f, mut b) = sam_on_olive().await;
    let token = b.page_token().await;
    let res = b.stop_form(format!("csrf={token}&csrf=the-apps-own")).await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    assert!(b.secret().is_some());
}

#[tokio::test]
async fn stop_is_accepted_only_from_the_sessions_own_agent() {
    let (f, mut sam) = sam_on_olive().await;
    let token = sam.secret().unwrap();
    let mut kim = Browser::new(&f, "kim");
    kim.get("/").await;
    let form = Some(format!("csrf={}", kim.csrf()));
    let bearer = format!("Bearer {token}");
    let reply = kim
        .send(
            Method::POST,
            "/impersonation/stop",
            form,
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        events(&f)
            .await
            .iter()
            .any(|e| e.details.get("denial") == Some("not_session_agent"))
    );
    assert!(
        sam.get("/").await.body.contains("impersonation-banner"),
        "the session goes on"
    );
}

/// Another person's use of an agent's bearer secret on the stop route is
/// the stop's own refusal only for a `POST`, the one method that reaches
/// it: with any other it is refused and recorded as on any route, not
/// left to the router's 405, which records nothing.
#[tokio::test]
async fn a_bearer_secret_used_by_another_on_the_stop_route_with_get_is_recorded() {
    let (f, mut sam) = sam_on_olive().await;
    let bearer = format!("Bearer {}", sam.secret().unwrap());
    let mut kim_api = Browser::new(&f, "kim");
    for method in [Method::GET, Method::PUT] {
        let before = events(&f).await.len();
        let refused = kim_api
            .bearer(method.clone(), "/impersonation/stop", &bearer)
            .await;
        assert_eq!(
            refused.status,
            StatusCode::UNAUTHORIZED,
            "{method}: {}",
            refused.body
        );
        let new = events(&f).await;
        let denials: Vec<_> = new[before..]
            .iter()
            .filter(|e| e.details.get("denial") == Some("not_session_agent"))
            .collect();
        assert_eq!(denials.len(), 1, "{method}: {new:?}");
        assert_eq!(
            denials[0].details.get("attempt"),
            Some(format!("{method} /impersonation/stop").as_str())
        );
    }
    assert!(
        sam.get("/").await.body.contains("impersonation-banner"),
        "the session goes on"
    );
}

/// An API client stops with its own bearer secret: no CSRF cookie, no
/// form, answered 204; another agent's attempt with it is refused (403)
/// and on the trail, as a browser's is.
#[tokio::test]
async fn an_api_client_stops_with_its_bearer_secret() {
    let (f, mut sam) = sam_on_olive().await;
    let bearer = format!("Bearer {}", sam.secret().unwrap());
    let mut kim_api = Browser::new(&f, "kim");
    let refused = kim_api
        .bearer(Method::POST, "/impersonation/stop", &bearer)
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert!(
        events(&f)
            .await
            .iter()
            .any(|e| e.details.get("denial") == Some("not_session_agent"))
    );
    let mut sam_api = Browser::new(&f, "sam");
    let stopped = sam_api
        .send(
            Method::POST,
            "/impersonation/stop",
            None,
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(stopped.status, StatusCode::NO_CONTENT, "{}", stopped.body);
    assert!(sam_api.cookies.is_empty(), "no cookie for an API client");
    let end = last_end(&f).await;
    assert_eq!(end.details.get("reason"), Some("stopped"));
    assert!(!sam.get("/").await.body.contains("impersonation-banner"));
}

/// An API client that holds only the bearer secret (the host's own
/// authentication signs no one in for it) is served the session on it
/// alone, and may stop it with it alone: the trail names the session's
/// agent as the one who stopped it.
#[tokio::test]
async fn an_api_client_with_only_its_bearer_secret_stops_as_the_sessions_agent() {
    let (f, sam) = sam_on_olive().await;
    let bearer = format!("Bearer {}", sam.secret().unwrap());
    let mut api = Browser::new(&f, "");
    let served = api
        .send(Method::GET, "/", None, &[("authorization", &bearer)])
        .await;
    assert_eq!(served.status, StatusCode::OK, "{}", served.body);
    let stopped = api
        .send(
            Method::POST,
            "/impersonation/stop",
            None,
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(stopped.status, StatusCode::NO_CONTENT, "{}", stopped.body);
    let end = last_end(&f).await;
    assert_eq!(end.details.get("reason"), Some("stopped"));
    assert_eq!(end.actor.id().map(|a| a.as_str()), Some("sam"));
    let after = api
        .send(Method::GET, "/", None, &[("authorization", &bearer)])
        .await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_expired_session_ends_with_an_expired_event_and_no_banner() {
    let (f, mut b) = sam_on_olive().await;
    f.clock.advance(Duration::hours(2));
    let page = b.get("/").await;
    assert_eq!(page.status, StatusCode::OK, "the agent goes on as themself");
    assert!(!page.body.contains("impersonation-banner"));
    assert!(b.secret().is_none(), "the dead cookie is cleared");
    let end = last_end(&f).await;
    assert_eq!(end.details.get("reason"), Some("expired"));
}

#[tokio::test]
async fn a_refused_billing_route_is_audited_as_the_requests_one_event() {
    let (f, mut b) = sam_on_olive().await;
    let before = events(&f).await.len();
    let refused = b.get("/billing").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let after = events(&f).await;
    assert_eq!(after.len(), before + 1, "exactly one event for the request");
    let last = after.last().unwrap();
    assert_eq!(last.action, AuditAction::Denied);
    assert_eq!(last.details.get("denial"), Some("sensitive_action"));
    assert_eq!(last.details.get("attempt"), Some("GET /billing"));
    stop_elsewhere(&f.svc, &b).await;
}

/// The guard's refusal in a session another process has ended (this one
/// still reuses it within the interval) is no denial after the end:
/// nothing is recorded, and the answer is the session's end, as a read's
/// would be: 401, the dead cookie cleared, the customer's forms' token
/// replaced.
#[tokio::test]
async fn a_refused_billing_route_in_a_session_ended_elsewhere_records_nothing() {
    let (f, mut b) = sam_on_olive().await;
    // Served here a moment ago: this process reuses the session.
    assert!(b.get("/").await.body.contains("impersonation-banner"));
    stop_elsewhere(&f.other_process(), &b).await;
    let before = events(&f).await.len();
    let olives_form = b.csrf();
    let refused = b.get("/billing").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);
    assert_eq!(refused.body, "impersonation session ended");
    assert_eq!(b.secret(), None, "the dead cookie is cleared");
    assert_ne!(b.csrf(), olives_form);
    assert_eq!(
        events(&f).await.len(),
        before,
        "nothing recorded after the end"
    );
    let page = b.get("/billing").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
}

/// An answer the app marks as its own refusal is the request's one event,
/// a denied attempt with the app's denial; the marker on an answer that
/// is no refusal (a 200) changes nothing: the change is recorded as one.
#[tokio::test]
async fn an_apps_own_refusal_is_audited_as_a_denied_attempt() {
    let (f, mut b) = sam_on_olive().await;
    let before = events(&f).await.len();
    let refused = b
        .send(Method::POST, "/bookings/7/move", Some(String::new()), &[])
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let copied = b
        .send(Method::POST, "/bookings/7/copy", Some(String::new()), &[])
        .await;
    assert_eq!(copied.status, StatusCode::OK, "{}", copied.body);
    let new: Vec<AuditEvent> = events(&f).await.into_iter().skip(before).collect();
    assert_eq!(new.len(), 2, "{new:?}");
    assert_eq!(new[0].action, AuditAction::Denied);
    assert_eq!(new[0].details.get("denial"), Some("tenant_boundary"));
    assert_eq!(
        new[0].details.get("attempt"),
        Some("POST /bookings/{id}/move")
    );
    assert_eq!(new[0].actor.id().map(UserId::as_str), Some("sam"));
    assert_eq!(
        new[0].subject.as_ref().map(|s| s.id.as_str()),
        Some("olive")
    );
    assert_eq!(new[1].action, AuditAction::Modification);
    assert_eq!(new[1].details.get("status"), Some("200"));
    stop_elsewhere(&f.svc, &b).await;
}

/// The app's refusal in a session that ended while its handler ran is no
/// denial inside a live session: the request goes the usual way (the
/// session's end answers it), and nothing follows the end as a denial.
#[tokio::test]
async fn an_apps_refusal_in_a_session_ended_meanwhile_is_not_a_denial_after_the_end() {
    let (f, mut b) = sam_on_olive().await;
    let reply = b
        .send(
            Method::POST,
            "/bookings/7/move-racing",
            Some(String::new()),
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    // Nothing follows the end: the refusal of a request whose session was
    // over by then is no denial inside it.
    let all = events(&f).await;
    assert_eq!(
        all.last().map(|e| e.action),
        Some(AuditAction::SessionEnded),
        "{all:?}"
    );
}

#[tokio::test]
async fn each_impersonated_request_gives_exactly_one_event_naming_agent_and_customer() {
    let (f, mut b) = sam_on_olive().await;
    let before = events(&f).await.len();
    b.get("/").await;
    b.send(Method::POST, "/bookings/42", Some(String::new()), &[])
        .await;
    let new: Vec<AuditEvent> = events(&f).await.into_iter().skip(before).collect();
    assert_eq!(new.len(), 2);
    assert_eq!(
        (new[0].action, new[1].action),
        (AuditAction::Access, AuditAction::Modification)
    );
    for e in &new {
        assert_eq!(e.actor.id().map(UserId::as_str), Some("sam"));
        assert_eq!(e.subject.as_ref().map(|s| s.id.as_str()), Some("olive"));
    }
    assert_eq!(
        new[1].details.get("route"),
        Some("/bookings/{id}"),
        "the route template, not the path"
    );
    assert_eq!(new[1].details.get("status"), Some("200"));
}

#[tokio::test]
async fn the_banner_escapes_the_customers_name() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    b.get("/").await;
    b.start("mallory").await;
    let page = b.get("/").await;
    assert!(
        page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script>alert(1)"));
}

/// A start the store cannot make answers 503 with its code only: the
/// store's own error text (which may name hosts and users) goes to the
/// log, not to the browser.
#[tokio::test]
async fn a_failed_start_tells_the_browser_its_code_only() {
    let f = fixture();
    let mut b = Browser::new(&f, "sam");
    b.get("/").await;
    f.store.fail_nth(1, When::Before, Calls::All);
    let reply = b.start("olive").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(f.store.injected(), 1);
    assert!(!reply.body.contains("injected fault"), "{}", reply.body);
    assert!(reply.body.contains("unavailable"), "{}", reply.body);
}

#[tokio::test]
async fn an_outage_fails_closed() {
    let (f, mut b) = sam_on_olive().await;
    f.store.fail_nth(1, When::Before, Calls::All);
    let page = b.get("/").await;
    assert_eq!(
        page.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no page served as a user the SDK could not check"
    );
    assert!(
        b.get("/").await.body.contains("impersonation-banner"),
        "healed"
    );
    f.store.fail_next_write(When::Before);
    // The audit append fails after the handler ran: the response is withheld.
    let page = b.get("/").await;
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    let _ = f
        .store
        .inner()
        .chain_head(&impersonation_core::ChainKey::for_agent(
            &UserId::new("sam").unwrap(),
        ))
        .await;
}

#[tokio::test]
async fn a_refused_start_can_go_back_to_the_form_with_the_denial_code() {
    let f = fixture();
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    // Kim is an agent: the start is refused, and goes back to `error_to`
    // (form-encoded here).
    let mut refused_start = async |error_to: &str| {
        let form = format!(
            "target=kim&reason=Customer+cannot+see+bookings&csrf={}&error_to={error_to}",
            sam.csrf()
        );
        let reply = sam
            .send(
                Method::POST,
                "/impersonation/start",
                Some(form),
                &[("sec-fetch-site", "same-origin")],
            )
            .await;
        assert_eq!(reply.status, StatusCode::SEE_OTHER);
        assert!(sam.secret().is_none(), "no session, no cookie");
        reply.headers[header::LOCATION].to_str().unwrap().to_owned()
    };
    assert_eq!(
        refused_start("/support%3Fq%3Dkim").await,
        "/support?q=kim&denied=target_is_agent"
    );
    // A fragment stays last, where the browser keeps it: the code goes
    // into the query the server reads.
    assert_eq!(
        refused_start("/support%23start").await,
        "/support?denied=target_is_agent#start"
    );
    // An outside address is never a redirect target: scheme-relative, with
    // a backslash browsers read as a slash, absolute, or no path at all.
    for outside in [
        "//evil.example/",
        "%2F%5Cevil.example",
        "%5C%5Cevil.example",
        "https%3A%2F%2Fevil.example",
        "evil.example",
    ] {
        assert_eq!(
            refused_start(outside).await,
            "/?denied=target_is_agent",
            "{outside}"
        );
    }
}

#[tokio::test]
async fn api_clients_with_a_bearer_token_get_no_csrf_cookie() {
    let (f, sam) = sam_on_olive().await;
    let bearer = format!("Bearer {}", sam.secret().unwrap());
    let mut api = Browser::new(&f, "sam");
    let reply = api
        .send(Method::GET, "/", None, &[("authorization", &bearer)])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers.get(header::SET_COOKIE).is_none());
    assert!(reply.body.contains("true"), "served as the shadow user");
    // A browser without the cookie still gets one.
    let mut fresh = Browser::new(&f, "kim");
    let reply = fresh.get("/").await;
    assert!(reply.headers.get(header::SET_COOKIE).is_some());
}

/// A start posted with the cookie of a session that has since ended (a
/// form left open in another tab) keeps the new secret: the dead cookie's
/// removal must not come after the new one and wipe it, leaving a live
/// session nobody holds. The redirect carries `no-store`.
#[tokio::test]
async fn a_start_over_a_dead_session_cookie_keeps_the_new_secret() {
    let f = fixture();
    let other = f.other_process();
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    sam.start("olive").await;
    let old = stop_elsewhere(&other, &sam).await;

    let started = sam.start("olive").await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    assert_eq!(started.headers[header::CACHE_CONTROL], "no-store");
    let new = sam.secret();
    assert!(new.is_some(), "the new secret was wiped");
    assert_ne!(new, Some(old));
    assert!(sam.get("/").await.body.contains("impersonation-banner"));
}

#[tokio::test]
async fn a_session_ended_by_another_process_is_not_served_on_the_next_request() {
    let f = fixture();
    let other = f.other_process();
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    sam.start("olive").await;
    assert!(sam.get("/").await.body.contains("impersonation-banner"));
    stop_elsewhere(&other, &sam).await;
    let before = events(&f).await.len();

    // Within the reuse interval this process still knows the session as
    // active, but the audit write checks the store: the page is withheld.
    let olives_form = sam.csrf();
    let page = sam.get("/").await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    assert_eq!(page.body, "impersonation session ended");
    assert_eq!(sam.secret(), None, "the cookie is cleared");
    // And the customer's forms lose their token with it: posted now, with
    // no cookie left to show the session ended, they would run as the
    // agent.
    assert_ne!(sam.csrf(), olives_form);
    let reply = post_settings(&mut sam, &olives_form).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert_eq!(
        events(&f).await.len(),
        before,
        "nothing recorded after the end"
    );
    let page = sam.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("impersonation-banner"));

    // A change always reads the store first: it never runs as the
    // customer. Nor as the agent: the form it comes from was the
    // customer's page, so it is refused and nothing is changed.
    sam.start("olive").await;
    assert!(sam.get("/").await.body.contains("impersonation-banner"));
    stop_elsewhere(&other, &sam).await;
    let before = events(&f).await.len();
    let saved = sam.send(Method::POST, "/bookings/7", None, &[]).await;
    assert_eq!(saved.status, StatusCode::CONFLICT, "{}", saved.body);
    assert!(saved.body.contains("nothing was changed"), "{}", saved.body);
    assert_eq!(saved.headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(sam.secret(), None);
    assert_eq!(
        events(&f).await.len(),
        before,
        "no modification in the ended session"
    );
}

/// A form posts as the identity its page was rendered under, or not at
/// all: the CSRF token is replaced when the browser's identity changes
/// (a start, a stop, a session found ended), so a form left open in
/// another tab cannot post the agent's own settings onto the customer, the
/// customer's onto the agent, or one customer's onto the next.
#[tokio::test]
async fn a_form_from_before_an_identity_change_does_not_post_as_the_new_identity() {
    let f = fixture();
    let other = f.other_process();
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    let own_form = sam.csrf();
    let reply = post_settings(&mut sam, &own_form).await;
    assert_eq!(reply.body, "saved for sam");

    // The agent's own settings form, posted after the start: refused.
    sam.start("olive").await;
    // The stored token itself is replaced, not only the page's (derived
    // from it under the session).
    let during = sam.csrf();
    assert_ne!(during, own_form);
    let olives_form = sam.page_token().await;
    assert_ne!(olives_form, own_form);
    let reply = post_settings(&mut sam, &own_form).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let reply = post_settings(&mut sam, &olives_form).await;
    assert_eq!(reply.body, "saved for olive");

    // Olive's form, posted after the stop: refused. (The SDK's own routes
    // say why in words a person can act on; a stale Stop has nothing left
    // to stop, and only sends the agent on.)
    sam.stop().await;
    assert_ne!(sam.csrf(), olives_form);
    assert_ne!(sam.csrf(), during);
    let stale_start = sam
        .send(
            Method::POST,
            "/impersonation/start",
            Some(format!(
                "target=olive&reason=Customer+cannot+see+bookings&csrf={olives_form}"
            )),
            &[("origin", "https://app.example")],
        )
        .await;
    assert_eq!(stale_start.status, StatusCode::FORBIDDEN);
    assert!(
        stale_start.body.contains("out of date"),
        "{}",
        stale_start.body
    );
    let stale_stop = sam
        .send(
            Method::POST,
            "/impersonation/stop",
            Some(format!("csrf={olives_form}")),
            &[("origin", "https://app.example")],
        )
        .await;
    assert_eq!(
        stale_stop.status,
        StatusCode::SEE_OTHER,
        "{}",
        stale_stop.body
    );
    let reply = post_settings(&mut sam, &olives_form).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);

    // Olive's form, after her session ended elsewhere (the cookie still
    // names it): refused, and nothing changed, whatever the app checks.
    sam.start("olive").await;
    let olives_form = sam.csrf();
    stop_elsewhere(&other, &sam).await;
    let dead_jar = sam.cookies.clone();
    let changes = f.changes.load(Ordering::SeqCst);
    let saved = sam.send(Method::POST, "/bookings/7", None, &[]).await;
    assert_eq!(saved.status, StatusCode::CONFLICT, "{}", saved.body);
    assert_eq!(f.changes.load(Ordering::SeqCst), changes, "nothing changed");
    assert_ne!(sam.csrf(), olives_form, "a new token came with the refusal");
    let reply = post_settings(&mut sam, &olives_form).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);

    // A page's requests sent side by side with the same dead cookie all
    // arrive at the same new token, and it works on the page rendered.
    let tokens: Vec<String> = {
        let mut out = Vec::new();
        for _ in 0..2 {
            let mut tab = Browser::new(&f, "sam");
            tab.cookies = dead_jar.clone();
            tab.get("/").await;
            out.push(tab.csrf());
        }
        out
    };
    assert_eq!(tokens[0], tokens[1]);
    assert_eq!(tokens[0], sam.csrf());
    let token = sam.csrf();
    let reply = post_settings(&mut sam, &token).await;
    assert_eq!(reply.body, "saved for sam");
}

/// A refused bearer credential names the scheme and why (RFC 6750 §3);
/// a start whose body is not a form is a 415, not a 400.
#[tokio::test]
async fn refusals_say_what_was_wrong() {
    let f = fixture();
    let mut api = Browser::new(&f, "sam");
    let refused = api
        .send(
            Method::GET,
            "/",
            None,
            &[("authorization", "Bearer imp1.not-a-secret")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.headers[header::WWW_AUTHENTICATE],
        "Bearer error=\"invalid_token\""
    );
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    let json = sam
        .send(
            Method::POST,
            "/impersonation/start",
            None,
            &[
                ("content-type", "application/json"),
                ("origin", "https://app.example"),
            ],
        )
        .await;
    assert_eq!(
        json.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        json.body
    );
}

/// The browser keeps the session's cookie past the session's end (it
/// would otherwise drop it at expiry, and a form of the customer's page
/// posted after it would find no cookie and run as the agent): the layer
/// sees it dead, refuses the change, and lets go of it.
#[tokio::test]
async fn a_form_posted_after_the_session_expired_is_refused_not_run_as_the_agent() {
    let f = fixture();
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    let started = sam.start("olive").await;
    let cookie = started
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| cookie::Cookie::parse(v.to_str().unwrap().to_owned()).unwrap())
        .find(|c| c.name() == "__Host-impersonation")
        .unwrap();
    let max_age = cookie.max_age().unwrap();
    assert!(
        max_age >= Duration::hours(1) + Duration::days(1),
        "kept past the session's hour: {max_age}"
    );
    f.clock.advance(Duration::minutes(61));
    let changes = f.changes.load(Ordering::SeqCst);
    let saved = sam.send(Method::POST, "/bookings/7", None, &[]).await;
    assert_eq!(saved.status, StatusCode::CONFLICT, "{}", saved.body);
    assert_eq!(f.changes.load(Ordering::SeqCst), changes);
    assert_eq!(sam.secret(), None);
    let end = events(&f).await.pop().unwrap();
    assert_eq!(end.details.get("reason"), Some("expired"));

    // And a Stop with no session cookie left sends the agent on.
    let stopped = sam.stop().await;
    assert_eq!(stopped.status, StatusCode::SEE_OTHER, "{}", stopped.body);
}

/// Sam has asked to impersonate Olive, under a policy that needs her
/// consent: the session waits for it.
async fn sam_waiting_for_olives_consent() -> (Fixture, Browser) {
    let f = fixture_with(impersonation_core::Policy::default().consent(
        impersonation_core::Consent::Required {
            timeout: Duration::minutes(10),
        },
    ));
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    let started = sam.start("olive").await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    (f, sam)
}

/// A session waiting for the customer's consent is not a dead one: its
/// cookie (the only copy of the secret) stays, the agent is served as
/// themself meanwhile, and once the customer agrees the next page is the
/// customer's, with the banner.
#[tokio::test]
async fn a_session_waiting_for_consent_keeps_its_cookie_until_the_customer_agrees() {
    let (f, mut sam) = sam_waiting_for_olives_consent().await;
    let secret = sam.secret().unwrap();
    let token = sam.csrf();

    let page = sam.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("impersonation-banner"), "not yet");
    assert_eq!(sam.secret(), Some(secret.clone()), "the cookie stays");
    assert_eq!(sam.csrf(), token, "nor is its token replaced");
    // The agent's pages meanwhile carry a token of their own.
    let pending_form = sam.get("/token").await.body;
    assert_ne!(pending_form, token);
    let reply = post_settings(&mut sam, &pending_form).await;
    assert_eq!(reply.body, "saved for sam", "a change runs as the agent");
    // A browser that lost its CSRF cookie (a restart; it has no
    // `Max-Age`) while waiting gets a new one, and the page a token
    // derived from it: the page's token is never the one stored.
    sam.cookies.remove("__Host-impersonation-csrf");
    let restarted_form = sam.get("/token").await.body;
    let stored = sam.csrf();
    assert!(!stored.is_empty(), "a new CSRF cookie");
    assert_ne!(restarted_form, stored);
    assert_eq!(
        sam.get("/token").await.body,
        restarted_form,
        "stable while waiting"
    );

    let pending = impersonation_core::SessionSecret::parse(&secret).unwrap();
    let session = f
        .store
        .inner()
        .find_by_secret(&pending.lookup(), None)
        .await
        .unwrap()
        .unwrap();
    f.svc
        .grant_consent(session.id, &customer("olive", "Olive Owner"))
        .await
        .unwrap();
    // The agent's own forms, rendered while waiting, cannot post as the
    // customer now.
    for form in [&pending_form, &restarted_form] {
        let reply = post_settings(&mut sam, form).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    }
    assert!(sam.get("/").await.body.contains("impersonation-banner"));
    let token = sam.page_token().await;
    let reply = post_settings(&mut sam, &token).await;
    assert_eq!(reply.body, "saved for olive");
}

/// An API client's bearer secret of a session waiting for consent is
/// valid still: a request with it is refused as waiting (403), not as an
/// invalid token, and the SDK's stop withdraws it.
#[tokio::test]
async fn a_bearer_secret_waiting_for_consent_is_refused_as_waiting_and_can_be_withdrawn() {
    let (f, sam) = sam_waiting_for_olives_consent().await;
    let bearer = format!("Bearer {}", sam.secret().unwrap());
    let mut api = Browser::new(&f, "sam");
    let waiting = api.bearer(Method::GET, "/", &bearer).await;
    assert_eq!(waiting.status, StatusCode::FORBIDDEN, "{}", waiting.body);
    assert!(waiting.headers.get(header::WWW_AUTHENTICATE).is_none());
    let stopped = api
        .bearer(Method::POST, "/impersonation/stop", &bearer)
        .await;
    assert_eq!(stopped.status, StatusCode::NO_CONTENT, "{}", stopped.body);
    let after = api.bearer(Method::GET, "/", &bearer).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED, "{}", after.body);
    let ended = events(&f).await.pop().unwrap();
    assert_eq!(ended.action, AuditAction::SessionEnded);
}

/// A host's token kind whose one token (`pending-token`) names a session
/// that waits for its customer's consent.
struct PendingTokens;

#[async_trait::async_trait]
impl impersonation_core::TokenResolver for PendingTokens {
    async fn resolve_token(
        &self,
        token: &str,
    ) -> Option<Result<impersonation_core::Context, impersonation_core::Error>> {
        (token == "pending-token").then_some(Err(impersonation_core::Error::PendingConsent))
    }
}

/// A signed token whose session waits for consent is refused as waiting,
/// on the stop route too: the stop reads a token only from a live
/// session's context, so it could not withdraw it (a bearer secret it can).
#[tokio::test]
async fn a_signed_token_waiting_for_consent_is_refused_as_waiting_at_stop_too() {
    let f = fixture();
    let mut api = Browser::new(&f, "sam");
    for (method, path) in [(Method::GET, "/"), (Method::POST, "/impersonation/stop")] {
        let reply = api.bearer(method, path, "Bearer pending-token").await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.body
        );
        assert!(
            reply.body.contains("waits for the customer"),
            "{path}: {}",
            reply.body
        );
    }
}

/// A page opened from another site while the browser impersonates comes
/// without the `SameSite=Strict` cookies: it renders as the agent and
/// draws a new CSRF token. A form on it, posted from the same site, comes
/// with the session cookie again, and does not run as the customer: the
/// session's pages carry a token bound to the session.
#[tokio::test]
async fn a_page_opened_from_another_site_does_not_post_as_the_customer() {
    let (_f, mut sam) = sam_on_olive().await;
    let secret = sam.secret().unwrap();
    // The cross-site navigation: neither Strict cookie is sent.
    sam.cookies.remove("__Host-impersonation");
    sam.cookies.remove("__Host-impersonation-csrf");
    let agents_form = sam.page_token().await;
    assert_eq!(sam.csrf(), agents_form, "a new token, stored");
    sam.cookies.insert("__Host-impersonation".into(), secret);
    let reply = post_settings(&mut sam, &agents_form).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    // Reloaded under the session, the page's form posts as the customer.
    let customers_form = sam.page_token().await;
    let reply = post_settings(&mut sam, &customers_form).await;
    assert_eq!(reply.body, "saved for olive");
}

/// A CSRF cookie this layer could not have drawn (set by a page on another
/// port of the same host, say) is not handed to the app's forms: a fresh
/// token replaces it.
#[tokio::test]
async fn a_csrf_cookie_of_foreign_characters_is_replaced() {
    let f = fixture();
    let mut sam = Browser::new(&f, "sam");
    let hostile = format!("<script>alert(1)</script>{}", "a".repeat(18));
    assert_eq!(hostile.len(), 43);
    sam.cookies
        .insert("__Host-impersonation-csrf".into(), hostile.clone());
    let form = sam.get("/token").await.body;
    assert_ne!(form, hostile);
    assert_eq!(
        sam.csrf(),
        form,
        "a fresh cookie, and the page's token is it"
    );
    assert!(
        form.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
}

/// A policy with no time limit (`Duration::MAX`) starts a session whose
/// cookie lasts as long as browsers keep one: no overflow, no panic after
/// the session was created.
#[tokio::test]
async fn a_session_without_a_time_limit_gets_its_cookie() {
    let f = fixture_with(
        impersonation_core::Policy::default()
            .max_duration(Duration::MAX)
            .idle_timeout(Duration::MAX),
    );
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    let started = sam.start("olive").await;
    assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
    assert!(sam.secret().is_some());
    assert!(sam.get("/").await.body.contains("impersonation-banner"));
}

/// A bearer credential names its agent; sent by someone else signed in
/// (the host's auth taking the token's customer for the user, say), it is
/// refused, not served as that person.
#[tokio::test]
async fn a_bearer_credential_sent_by_someone_other_than_its_agent_is_refused() {
    let (f, sam) = sam_on_olive().await;
    let bearer = format!("Bearer {}", sam.secret().unwrap());
    let mut olive = Browser::new(&f, "olive");
    let before = events(&f).await.len();
    let reply = olive
        .send(Method::GET, "/billing", None, &[("authorization", &bearer)])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.body);
    assert!(!reply.body.contains("card on file"));
    // On the session's trail, as the one who tried (as a stop by someone
    // else is), and nothing else.
    let after = events(&f).await;
    assert_eq!(after.len(), before + 1, "{after:#?}");
    let refused = after.last().unwrap();
    assert_eq!(refused.action, AuditAction::Denied);
    assert_eq!(refused.actor.id().map(|id| id.as_str()), Some("olive"));
    assert_eq!(refused.details.get("denial"), Some("not_session_agent"));
    assert_eq!(refused.details.get("attempt"), Some("GET /billing"));
    // Sent to the SDK's start route too: refused and on the trail.
    let form = format!("target=olive&reason=x&csrf={}", olive.csrf());
    let reply = olive
        .send(
            Method::POST,
            "/impersonation/start",
            Some(form),
            &[
                ("authorization", &bearer),
                ("origin", "https://app.example"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.body);
    let refused = events(&f).await.pop().unwrap();
    assert_eq!(refused.action, AuditAction::Denied);
    assert_eq!(refused.actor.id().map(|id| id.as_str()), Some("olive"));
    assert_eq!(
        refused.details.get("attempt"),
        Some("POST /impersonation/start")
    );
}

/// A bearer credential whose session another process ended, used within
/// this one's reuse interval: the read is withheld with a 401 that says,
/// as every refused bearer credential's does, to get a new token; so is a
/// guarded route's refusal, in the session found over. Nothing is
/// recorded after the end.
#[tokio::test]
async fn a_bearer_read_of_a_session_ended_elsewhere_says_the_token_is_invalid() {
    for path in ["/", "/billing"] {
        let (f, sam) = sam_on_olive().await;
        let bearer = format!("Bearer {}", sam.secret().unwrap());
        let mut api = Browser::new(&f, "sam");
        let served = api
            .send(Method::GET, "/", None, &[("authorization", &bearer)])
            .await;
        assert_eq!(served.status, StatusCode::OK, "{}", served.body);
        stop_elsewhere(&f.other_process(), &sam).await;
        let before = events(&f).await.len();
        let refused = api
            .send(Method::GET, path, None, &[("authorization", &bearer)])
            .await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);
        assert_eq!(refused.body, "impersonation session ended");
        assert_eq!(
            refused.headers[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(events(&f).await.len(), before, "{path}");
    }
}

/// A request the page sent before its Stop and answered after it (with
/// the cookies of before) leaves the browser the same CSRF token as the
/// stop did: the page loaded after the stop still posts its forms.
#[tokio::test]
async fn a_request_answered_after_the_stop_keeps_the_stops_token() {
    let (f, mut sam) = sam_on_olive().await;
    let mut in_flight = Browser::new(&f, "sam");
    in_flight.cookies = sam.cookies.clone();
    let stopped = sam.stop().await;
    assert_eq!(stopped.status, StatusCode::SEE_OTHER, "{}", stopped.body);
    let after_stop = sam.page_token().await;
    let late = in_flight.get("/").await;
    assert!(!late.body.contains("impersonation-banner"), "{}", late.body);
    sam.keep(&late.headers);
    let reply = post_settings(&mut sam, &after_stop).await;
    assert_eq!(reply.body, "saved for sam");
}

/// Under impersonation a page comes back as rendered now, for the banner
/// to go in: no 304 from the browser's copy of before, no precompressed
/// file. A range request keeps its range (a video, a download).
#[tokio::test]
async fn an_impersonated_page_is_never_a_304_or_encoded() {
    let (f, mut sam) = sam_on_olive().await;
    let seen = sam
        .send(
            Method::GET,
            "/conditional",
            None,
            &[("if-none-match", "\"v1\""), ("accept-encoding", "br")],
        )
        .await;
    assert_eq!(seen.status, StatusCode::OK, "{}", seen.body);
    assert!(seen.body.contains("impersonation-banner"), "{}", seen.body);
    let part = sam
        .send(Method::GET, "/conditional", None, &[("range", "bytes=0-9")])
        .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    // Without impersonation the app's answer stands.
    let mut kim = Browser::new(&f, "kim");
    let cached = kim
        .send(
            Method::GET,
            "/conditional",
            None,
            &[("if-none-match", "\"v1\"")],
        )
        .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
}

/// The banner's Stop, clicked after the session ended (it idled out while
/// the tab was open): the stop's aim holds, so the agent is sent on as
/// for a stop, with the cookie cleared, not shown an error. The form is
/// the one the page carried while the session lived (its token bound to
/// the session), and nothing was loaded since.
#[tokio::test]
async fn stopping_a_session_that_has_ended_lets_the_browser_go_of_it() {
    let (f, mut sam) = sam_on_olive().await;
    let banner = sam.page_token().await;
    f.clock.advance(Duration::minutes(20));
    let stopped = sam.stop_with(&banner).await;
    assert_eq!(stopped.status, StatusCode::SEE_OTHER, "{}", stopped.body);
    assert_eq!(stopped.headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(sam.secret(), None);
    let end = events(&f).await.pop().unwrap();
    assert_eq!(end.details.get("reason"), Some("idle_timeout"));
}

/// As above, but a request of the page's own (a poll, say) reached the
/// layer between the end and the click: its answer let go of the session
/// cookie and replaced the CSRF cookie, so the banner's token matches
/// neither. Nothing is left to stop, and the agent is sent on all the
/// same, not told the form is out of date. From another site, refused.
#[tokio::test]
async fn stopping_after_a_poll_let_go_of_the_ended_session_lets_the_browser_go() {
    let (f, mut sam) = sam_on_olive().await;
    let banner = sam.page_token().await;
    let csrf_before = sam.csrf();
    f.clock.advance(Duration::minutes(20));
    sam.get("/").await;
    assert_eq!(sam.secret(), None, "the poll's answer let go of it");
    assert_ne!(sam.csrf(), csrf_before, "and replaced the token");
    let from_elsewhere = sam
        .send(
            Method::POST,
            "/impersonation/stop",
            Some(format!("csrf={banner}")),
            &[
                ("origin", "https://evil.example"),
                ("sec-fetch-site", "cross-site"),
            ],
        )
        .await;
    assert_eq!(from_elsewhere.status, StatusCode::FORBIDDEN);
    let stopped = sam.stop_with(&banner).await;
    assert_eq!(stopped.status, StatusCode::SEE_OTHER, "{}", stopped.body);
    assert_eq!(stopped.headers[header::CACHE_CONTROL], "no-store");
    let ends = events(&f)
        .await
        .iter()
        .filter(|e| e.action == AuditAction::SessionEnded)
        .count();
    assert_eq!(ends, 1, "the idle end, once");
}

/// Another agent's browser holding Sam's session cookie (copied, say)
/// posts the banner's Stop with a token of its own pages: refused, on the
/// trail, and Sam's session goes on.
#[tokio::test]
async fn a_browser_stop_by_another_agent_with_the_sessions_cookie_is_refused() {
    let (f, mut sam) = sam_on_olive().await;
    let cookie = sam.secret().unwrap();
    let mut kim = Browser::new(&f, "kim");
    kim.get("/").await;
    kim.cookies.insert("__Host-impersonation".into(), cookie);
    let token = kim.page_token().await;
    let refused = kim.stop_with(&token).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert!(
        events(&f)
            .await
            .iter()
            .any(|e| e.details.get("denial") == Some("not_session_agent")),
        "the attempt is on the trail"
    );
    assert!(
        sam.get("/").await.body.contains("impersonation-banner"),
        "the session goes on"
    );
    assert!(
        !events(&f)
            .await
            .iter()
            .any(|e| e.action == AuditAction::SessionEnded),
        "no end"
    );
}

#[tokio::test]
async fn a_read_only_session_makes_no_change_and_its_attempt_is_audited() {
    let f = fixture();
    let mut sam = Browser::new(&f, "sam");
    sam.get("/").await;
    let form = format!(
        "target=olive&reason=Customer+cannot+see+bookings&read_only=on&csrf={}",
        sam.csrf()
    );
    let started = sam
        .send(
            Method::POST,
            "/impersonation/start",
            Some(form),
            &[("origin", "https://app.example")],
        )
        .await;
    assert!(started.status.is_redirection() || started.status.is_success());
    let page = sam.get("/").await.body;
    assert!(page.contains("impersonation-banner"));
    // The banner says why changes will be refused.
    assert!(
        page.contains("<span class=\"impersonation-read-only\">read only</span>"),
        "{page}"
    );
    let before = events(&f).await.len();

    let refused = sam.send(Method::POST, "/bookings/42", None, &[]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(f.changes.load(Ordering::SeqCst), 0, "the handler never ran");
    let new: Vec<AuditEvent> = events(&f).await.into_iter().skip(before).collect();
    assert_eq!(new.len(), 1, "{new:#?}");
    assert_eq!(new[0].action, AuditAction::Denied);
    assert_eq!(new[0].details.get("denial"), Some("read_only_session"));
    assert_eq!(
        new[0].details.get("description"),
        Some("POST /bookings/{id}")
    );
    assert_eq!(
        new[0].subject.as_ref().map(|s| s.id.as_str()),
        Some("olive")
    );

    // Reads go on, and the agent can still stop.
    assert_eq!(sam.get("/").await.status, StatusCode::OK);
    assert!(sam.stop().await.status.is_redirection());
    assert!(!sam.get("/").await.body.contains("impersonation-banner"));
    let saved = sam.send(Method::POST, "/bookings/42", None, &[]).await;
    assert_eq!(saved.status, StatusCode::OK);
    assert_eq!(f.changes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_change_whose_session_ends_while_it_runs_stays_on_the_trail() {
    let (f, mut sam) = sam_on_olive().await;
    let before = events(&f).await.len();

    let saved = sam.send(Method::POST, "/racing-change", None, &[]).await;
    assert_eq!(f.changes.load(Ordering::SeqCst), 1, "the change was made");
    assert_eq!(saved.status, StatusCode::OK, "its answer goes out");
    let new: Vec<AuditEvent> = events(&f).await.into_iter().skip(before).collect();
    let actions: Vec<AuditAction> = new.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [AuditAction::SessionEnded, AuditAction::Modification],
        "the revocation, then the change it could not stop"
    );
    let change = &new[1];
    assert_eq!(change.details.get("after_end"), Some("true"));
    assert_eq!(change.details.get("route"), Some("/racing-change"));
    assert_eq!(change.actor.id().map(UserId::as_str), Some("sam"));
    assert_eq!(
        change.subject.as_ref().map(|s| s.id.as_str()),
        Some("olive")
    );
    assert_eq!(change.session, new[0].session);
    let report = f.svc.verify_all().await.unwrap();
    assert!(report.broken.is_empty(), "{report:?}");

    // The session is over for the next request.
    assert!(!sam.get("/").await.body.contains("impersonation-banner"));
}

/// A HEAD handler of the app's own announces the length the GET sends:
/// the page's with the banner.
#[tokio::test]
async fn an_explicit_head_announces_the_length_with_the_banner() {
    let (_f, mut sam) = sam_on_olive().await;
    let page = sam.get("/sized").await;
    assert!(page.body.contains("impersonation-banner"));
    let head = sam.send(Method::HEAD, "/sized", None, &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.headers[header::CONTENT_LENGTH],
        page.body.len().to_string()
    );
    // Nor does it validate the app's bytes, as the GET's page would not.
    assert!(
        !head.headers.contains_key(header::ETAG),
        "{:?}",
        head.headers
    );
}

/// A guarded route wired outside the layer fails loudly instead of
/// passing the guard unchecked.
#[tokio::test]
async fn the_guard_without_the_layer_is_a_500_not_a_pass() {
    let app: Router = Router::new().route(
        "/billing",
        get(|_: NotImpersonating| async { "card on file" }),
    );
    let res = app
        .oneshot(Request::get("/billing").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

/// A stop (or a start from inside the session) whose CSRF check fails is
/// a request served under impersonation like any other: recorded once, a
/// change answered 403, naming the agent and the customer, and the
/// session goes on.
#[tokio::test]
async fn a_stop_refused_on_its_csrf_check_is_recorded_once() {
    let (f, mut sam) = sam_on_olive().await;
    for (path, form) in [
        ("/impersonation/stop", "csrf=forged"),
        (
            "/impersonation/start",
            "target=oscar&reason=Customer+cannot+see+bookings&csrf=forged",
        ),
    ] {
        let before = events(&f).await.len();
        let reply = sam
            .send(
                Method::POST,
                path,
                Some(form.to_owned()),
                &[("origin", "https://app.example")],
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        let all = events(&f).await;
        let new = &all[before..];
        assert_eq!(new.len(), 1, "{path}: {new:?}");
        let e = &new[0];
        assert_eq!(e.action, AuditAction::Modification, "{path}: {e:?}");
        assert_eq!(e.details.get("status"), Some("403"), "{path}: {e:?}");
        assert_eq!(e.details.get("route"), Some(path), "{path}: {e:?}");
        assert_eq!(e.actor.id(), Some(&UserId::new("sam").unwrap()));
        assert_eq!(
            e.subject.as_ref().map(|s| s.id.as_str()),
            Some("olive"),
            "{path}"
        );
    }
    assert!(
        sam.get("/").await.body.contains("impersonation-banner"),
        "the session goes on"
    );
}
