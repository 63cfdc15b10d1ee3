//! Edge cases of the binding: the banner goes only into pages it fits, the
//! routes' redirects stay on the site, the origin check holds over HTTP/2
//! and for the scheme, the guard records route templates (not paths that
//! may carry tokens), the routes mounted at the root leave every other route
//! audited, and the bearer scheme's name is case-insensitive.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use http_body_util::BodyExt;
use impersonation_axum::{
    EffectiveUser, ImpersonationLayer, NotImpersonating, NotImpersonatingRejection, routes,
};
use impersonation_core::{
    AuditAction, AuditEvent, AuditQuery, Impersonation, MemoryDirectory, MemoryStore, Requester,
    StartRequest, Store, UserId,
};
use impersonation_testkit::conformance::all_events;
use impersonation_testkit::faults::{Calls, FaultyStore, SLOW_CALL, When};
use tower::ServiceExt;

use common::{agent, auth, customer};

type Svc = Impersonation<Arc<MemoryStore>, MemoryDirectory>;

struct Fx {
    app: Router,
    svc: Svc,
    store: Arc<MemoryStore>,
    directory: MemoryDirectory,
}

/// Pages of every kind the banner meets; the SDK's routes under
/// `/impersonation`, or merged at the root with `root`.
fn fixture(root: bool) -> Fx {
    let directory = MemoryDirectory::new();
    for p in [agent("sam"), agent("kim"), customer("olive", "Olive Owner")] {
        directory.insert(p);
    }
    let store = Arc::new(MemoryStore::new());
    let svc = Impersonation::new(Arc::clone(&store), directory.clone());
    let page = |headers: Vec<(header::HeaderName, &'static str)>, body: &'static [u8]| {
        move || async move {
            let mut res = Body::from(body).into_response();
            for (name, value) in headers {
                res.headers_mut()
                    .append(name, header::HeaderValue::from_static(value));
            }
            res
        }
    };
    let html = header::CONTENT_TYPE;
    // Pages that differ by their Content-Type (and body) alone.
    let mut app = Router::new();
    for (path, content_type, body) in [
        (
            "/plain",
            "text/html; charset=utf-8",
            &b"<html><body>plain</body></html>"[..],
        ),
        (
            "/upper",
            "Text/HTML; Charset=\"UTF-8\"",
            b"<html><body>upper</body></html>",
        ),
        (
            "/sjis",
            "text/html; charset=Shift_JIS",
            b"<html><body>\x82\xa0</body></html>",
        ),
        (
            "/utf16",
            "text/html; charset=UTF-16LE",
            b"<\0/\0b\0o\0d\0y\0>\0",
        ),
        (
            "/latin",
            "text/html; charset=windows-1252",
            b"<html><body>caf\xe9</body></html>",
        ),
        (
            "/iso-2022-jp",
            "text/html; charset=ISO-2022-JP",
            b"<html><body>\x1b$B$3\x1b(B</body></html>",
        ),
        ("/bom", "text/html", b"\xff\xfe<\0/\0b\0o\0d\0y\0>\0"),
        (
            "/bom-utf32be",
            "text/html",
            b"\0\0\xfe\xff\0\0\0<\0\0\0/\0\0\0b\0\0\0o\0\0\0d\0\0\0y\0\0\0>",
        ),
        (
            "/plain-text",
            "text/plain; charset=utf-8",
            b"</body> is only text here",
        ),
        (
            "/not-utf8",
            "text/html",
            b"<html><body>caf\xe9</body></html>",
        ),
        // No charset in the header: the page's `<meta>` names it.
        (
            "/meta-iso-2022-jp",
            "text/html",
            b"<html><head><meta charset=\"ISO-2022-JP\"></head><body>\x1b$B$3\x1b(B</body></html>",
        ),
        (
            "/meta-equiv-iso-2022-jp",
            "text/html",
            b"<html><head><meta http-equiv=\"Content-Type\" content=\"text/html; charset='iso-2022-jp'\"></head><body>\x1b$B$3\x1b(B</body></html>",
        ),
        (
            "/meta-utf8",
            "text/html",
            b"<html><head><meta charset=utf-8></head><body>caf\xc3\xa9</body></html>",
        ),
        // A UTF-16 label in a `<meta>` is read as UTF-8 (HTML's prescan),
        // and a header's label as browsers read it (`ks_c_5601-1987` is
        // EUC-KR).
        (
            "/meta-utf16",
            "text/html",
            b"<html><head><meta charset=\"utf-16\"></head><body>plain</body></html>",
        ),
        (
            "/korean",
            "text/html; charset=ks_c_5601-1987",
            b"<html><body>\xb0\xa1</body></html>",
        ),
        // A label browsers do not know, in the header or a `<meta>`, or
        // an empty one, is ignored as they ignore it: the page is read in
        // their default (or its `<meta>`'s charset, then).
        (
            "/unknown-label",
            "text/html; charset=utf8mb4",
            b"<html><body>unknown</body></html>",
        ),
        (
            "/empty-label",
            "text/html; charset=",
            b"<html><body>empty</body></html>",
        ),
        (
            "/meta-unknown",
            "text/html",
            b"<html><head><meta charset=\"x-no-such\"></head><body>plain</body></html>",
        ),
        (
            "/unknown-label-meta-iso-2022-jp",
            "text/html; charset=utf8mb4",
            b"<html><head><meta charset=\"ISO-2022-JP\"></head><body>\x1b$B$3\x1b(B</body></html>",
        ),
        // The header's charset is the page's, whatever a `<meta>` says.
        (
            "/header-over-meta",
            "text/html; charset=utf-8",
            b"<html><head><meta charset=\"iso-2022-jp\"></head><body>plain</body></html>",
        ),
        // A browser takes the last valid type of a list (Fetch), and a
        // comma in a quoted value separates nothing.
        (
            "/two-types",
            "text/plain, text/html",
            b"<html><body>two</body></html>",
        ),
        (
            "/quoted-comma-type",
            "text/html; x=\"a,text/plain;b\"",
            b"<html><body>two</body></html>",
        ),
        (
            "/quoted-comma-charset",
            "text/html; a=\"x,y\"; charset=utf-16",
            b"<\0/\0b\0o\0d\0y\0>\0",
        ),
    ] {
        app = app.route(path, get(page(vec![(html.clone(), content_type)], body)));
    }
    // And of every `Content-Type` header, passing over `*/*`; a charset
    // carries over to a later one of the same type that names none.
    for (path, types, body) in [
        (
            "/two-headers",
            ["text/plain", "text/html"],
            &b"<html><body>two</body></html>"[..],
        ),
        (
            "/star-after",
            ["text/html", "*/*"],
            b"<html><body>two</body></html>",
        ),
        (
            "/charset-carried",
            ["text/html; charset=utf-16", "text/html"],
            b"<\0/\0b\0o\0d\0y\0>\0",
        ),
    ] {
        let headers = types.iter().map(|t| (html.clone(), *t)).collect();
        app = app.route(path, get(page(headers, body)));
    }
    let mut app = app
        .route(
            "/gzip",
            get(page(
                vec![
                    (html.clone(), "text/html"),
                    (header::CONTENT_ENCODING, "gzip"),
                ],
                &[
                    0x1f, 0x8b, 0x08, 0x00, 0x3c, 0x2f, 0x62, 0x6f, 0x64, 0x79, 0x3e,
                ],
            )),
        )
        .route(
            "/download",
            get(page(
                vec![
                    (html.clone(), "text/html"),
                    (
                        header::CONTENT_DISPOSITION,
                        "Attachment; filename=\"a.html\"",
                    ),
                ],
                b"<html><body>download</body></html>",
            )),
        )
        .route(
            "/part",
            get(|| async {
                (
                    StatusCode::PARTIAL_CONTENT,
                    [
                        (header::CONTENT_TYPE, "text/html"),
                        (header::CONTENT_RANGE, "bytes 0-13/100"),
                    ],
                    "<html><body>",
                )
                    .into_response()
            }),
        )
        .route(
            "/whoami",
            get(|user: EffectiveUser| async move { user.id().to_string() }),
        )
        // A page with a form: it takes the CSRF token, and so gives a
        // browser without the cookie its cookie.
        .route(
            "/form",
            get(|token: impersonation_axum::CsrfToken| async move {
                Html(format!(
                    "<html><body><form method=post><input type=hidden name=csrf value={}></form></body></html>",
                    token.as_str()
                ))
            }),
        )
        .route(
            "/password/reset/{token}",
            get(|_: NotImpersonating| async { Html("<html><body>reset</body></html>") }),
        );
    let layer = ImpersonationLayer::new(svc.clone());
    let layer = if root {
        app = app.merge(routes());
        layer.mount_path("/")
    } else {
        app = app.nest("/impersonation", routes());
        layer
    };
    let app = app
        .layer(layer)
        .layer(from_fn_with_state(directory.clone(), auth));
    Fx {
        app,
        svc,
        store,
        directory,
    }
}

struct Reply {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    /// The value of a cookie this reply sets.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| c.strip_prefix(name)?.strip_prefix('='))
            .and_then(|c| c.split(';').next())
            .map(str::to_owned)
    }

    fn has_banner(&self) -> bool {
        String::from_utf8_lossy(&self.body).contains("role=\"alert\"")
    }

    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn send(app: &Router, req: axum::http::request::Builder, body: Body) -> Reply {
    let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes().to_vec(),
    }
}

/// Starts `who` impersonating Olive through the service; the secret.
async fn impersonate(f: &Fx, who: &str) -> String {
    let agent = f.directory.get(&UserId::new(who).unwrap()).unwrap();
    let started = f
        .svc
        .start(
            Requester::User(&agent),
            StartRequest::new(UserId::new("olive").unwrap(), "Olive cannot see bookings"),
        )
        .await
        .unwrap();
    started.secret.expose().to_owned()
}

/// A GET by `who`, with the session cookie (if any).
fn get_as(who: &str, uri: &str, secret: Option<&str>) -> axum::http::request::Builder {
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(header::HOST, "app.example")
        .header("x-test-user", who);
    match secret {
        Some(s) => req.header(header::COOKIE, format!("__Host-impersonation={s}")),
        None => req,
    }
}

/// The CSRF token a page's forms carry (the banner's Stop form, say).
fn form_token(body: &[u8]) -> String {
    let body = String::from_utf8_lossy(body);
    let marker = "name=\"csrf\" value=\"";
    let start = body.find(marker).expect("a form with a token") + marker.len();
    body[start..][..body[start..].find('"').unwrap()].to_owned()
}

async fn events(f: &Fx) -> Vec<AuditEvent> {
    all_events(&*f.store, AuditQuery::default()).await
}

#[tokio::test]
async fn the_banner_goes_into_whole_pages_in_any_ascii_compatible_charset() {
    let f = fixture(false);
    let secret = impersonate(&f, "sam").await;
    for uri in ["/plain", "/upper"] {
        let page = send(&f.app, get_as("sam", uri, Some(&secret)), Body::empty()).await;
        assert_eq!(page.status, StatusCode::OK, "{uri}");
        assert!(page.has_banner(), "{uri} gets the banner");
    }
    // A page in another ASCII-compatible charset, or not valid UTF-8
    // after all, gets the banner (pure ASCII) before its `</body>`, its
    // own bytes untouched.
    for (uri, head, tail) in [
        (
            "/sjis",
            &b"<html><body>\x82\xa0"[..],
            &b"</body></html>"[..],
        ),
        ("/latin", b"<html><body>caf\xe9", b"</body></html>"),
        ("/not-utf8", b"<html><body>caf\xe9", b"</body></html>"),
        (
            "/meta-utf8",
            b"<html><head><meta charset=utf-8></head><body>caf\xc3\xa9",
            b"</body></html>",
        ),
        (
            "/header-over-meta",
            b"<html><head><meta charset=\"iso-2022-jp\"></head><body>plain",
            b"</body></html>",
        ),
        (
            "/meta-utf16",
            b"<html><head><meta charset=\"utf-16\"></head><body>plain",
            b"</body></html>",
        ),
        ("/korean", b"<html><body>\xb0\xa1", b"</body></html>"),
        ("/two-types", b"<html><body>two", b"</body></html>"),
        ("/two-headers", b"<html><body>two", b"</body></html>"),
        ("/star-after", b"<html><body>two", b"</body></html>"),
        ("/quoted-comma-type", b"<html><body>two", b"</body></html>"),
        ("/unknown-label", b"<html><body>unknown", b"</body></html>"),
        ("/empty-label", b"<html><body>empty", b"</body></html>"),
        (
            "/meta-unknown",
            b"<html><head><meta charset=\"x-no-such\"></head><body>plain",
            b"</body></html>",
        ),
    ] {
        let page = send(&f.app, get_as("sam", uri, Some(&secret)), Body::empty()).await;
        assert_eq!(page.status, StatusCode::OK, "{uri}");
        assert!(page.has_banner(), "{uri} gets the banner");
        assert!(
            page.body.starts_with(head) && page.body.ends_with(tail),
            "{uri}: {}",
            String::from_utf8_lossy(&page.body)
        );
        let banner = &page.body[head.len()..page.body.len() - tail.len()];
        assert!(banner.is_ascii(), "{uri}: the banner is pure ASCII");
        // The app's length is gone; one set afterwards is the new body's.
        if let Some(length) = page.headers.get(header::CONTENT_LENGTH) {
            assert_eq!(
                length.to_str().unwrap(),
                page.body.len().to_string(),
                "{uri}"
            );
        }
    }
    // Served byte for byte as the app wrote them, without the banner: an
    // encoded body, a UTF-16 page (by its charset or its byte-order mark), a
    // UTF-32 one (by its mark)
    // and an ISO-2022 one, by its header or its `<meta>` (the banner
    // cannot go in; the log says so), a download, a part of a page.
    let cases: [(&str, &[u8]); 13] = [
        ("/charset-carried", b"<\0/\0b\0o\0d\0y\0>\0"),
        ("/quoted-comma-charset", b"<\0/\0b\0o\0d\0y\0>\0"),
        (
            "/unknown-label-meta-iso-2022-jp",
            b"<html><head><meta charset=\"ISO-2022-JP\"></head><body>\x1b$B$3\x1b(B</body></html>",
        ),
        (
            "/gzip",
            &[
                0x1f, 0x8b, 0x08, 0x00, 0x3c, 0x2f, 0x62, 0x6f, 0x64, 0x79, 0x3e,
            ],
        ),
        ("/utf16", b"<\0/\0b\0o\0d\0y\0>\0"),
        ("/iso-2022-jp", b"<html><body>\x1b$B$3\x1b(B</body></html>"),
        (
            "/meta-iso-2022-jp",
            b"<html><head><meta charset=\"ISO-2022-JP\"></head><body>\x1b$B$3\x1b(B</body></html>",
        ),
        (
            "/meta-equiv-iso-2022-jp",
            b"<html><head><meta http-equiv=\"Content-Type\" content=\"text/html; charset='iso-2022-jp'\"></head><body>\x1b$B$3\x1b(B</body></html>",
        ),
        ("/bom", b"\xff\xfe<\0/\0b\0o\0d\0y\0>\0"),
        (
            "/bom-utf32be",
            b"\0\0\xfe\xff\0\0\0<\0\0\0/\0\0\0b\0\0\0o\0\0\0d\0\0\0y\0\0\0>",
        ),
        ("/download", b"<html><body>download</body></html>"),
        ("/part", b"<html><body>"),
        ("/plain-text", b"</body> is only text here"),
    ];
    for (uri, body) in cases {
        let page = send(&f.app, get_as("sam", uri, Some(&secret)), Body::empty()).await;
        assert!(page.status.is_success(), "{uri}: {}", page.status);
        assert_eq!(page.body, body, "{uri} is served unchanged");
        assert_eq!(
            page.headers.get(header::CACHE_CONTROL).unwrap(),
            "no-store",
            "{uri}"
        );
    }
    // Each was still audited, once.
    let accesses = events(&f)
        .await
        .into_iter()
        .filter(|e| e.action == AuditAction::Access)
        .count();
    assert_eq!(accesses, 2 + 14 + 13);
}

#[tokio::test]
async fn the_routes_redirect_only_to_a_path_on_this_site() {
    let f = fixture(false);
    // The CSRF cookie comes with a first page that has a form.
    let first = send(&f.app, get_as("sam", "/form", None), Body::empty()).await;
    let csrf = first.cookie("__Host-impersonation-csrf").unwrap();
    let post = |uri: &str, form: String| {
        (
            Request::builder()
                .method(Method::POST)
                .uri(uri)
                .header(header::HOST, "app.example")
                .header(header::ORIGIN, "https://app.example")
                .header("x-test-user", "sam")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(header::COOKIE, format!("__Host-impersonation-csrf={csrf}")),
            Body::from(form),
        )
    };
    // A tab (which browsers drop: `//evil.example`) leads home instead.
    let (req, body) = post(
        "/impersonation/start",
        format!("target=olive&reason=Sync+fails&csrf={csrf}&return_to=%2F%09%2Fevil.example"),
    );
    let started = send(&f.app, req, body).await;
    assert_eq!(started.status, StatusCode::SEE_OTHER);
    assert_eq!(started.location(), "/");
    let secret = started.cookie("__Host-impersonation").unwrap();
    // The banner's Stop form carries the token of the session's pages.
    let page = send(
        &f.app,
        get_as("sam", "/plain", None).header(
            header::COOKIE,
            format!("__Host-impersonation={secret}; __Host-impersonation-csrf={csrf}"),
        ),
        Body::empty(),
    )
    .await;
    let token = form_token(&page.body);
    // A newline, which a `Location` header cannot carry, leads home too
    // (and the stop is made, not lost to an error).
    let (req, body) = post(
        "/impersonation/stop",
        format!("csrf={token}&return_to=%2Fdone%0A%2F%2Fevil.example"),
    );
    let req = req.header(header::COOKIE, format!("__Host-impersonation={secret}"));
    let stopped = send(&f.app, req, body).await;
    assert_eq!(stopped.status, StatusCode::SEE_OTHER);
    assert_eq!(stopped.location(), "/");
    let ended = events(&f)
        .await
        .iter()
        .filter(|e| e.action == AuditAction::SessionEnded)
        .count();
    assert_eq!(ended, 1, "the stop was made");
    // A plain local path is kept.
    let (req, body) = post(
        "/impersonation/start",
        format!("target=olive&reason=Sync+fails&csrf={csrf}&return_to=%2Fdashboard%3Ftab%3D2"),
    );
    assert_eq!(send(&f.app, req, body).await.location(), "/dashboard?tab=2");
}

#[tokio::test]
async fn the_origin_check_reads_http2_authority_and_the_scheme() {
    let f = fixture(false);
    let first = send(&f.app, get_as("sam", "/form", None), Body::empty()).await;
    let csrf = first.cookie("__Host-impersonation-csrf").unwrap();
    let start = |who: &str, uri: &str, host: Option<&str>, origin: &str| {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::ORIGIN, origin)
            .header("x-test-user", who)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("__Host-impersonation-csrf={csrf}"));
        if let Some(host) = host {
            req = req.header(header::HOST, host);
        }
        (
            req,
            Body::from(format!("target=olive&reason=Sync+fails&csrf={csrf}")),
        )
    };
    // Plain http is another origin than this https site.
    let (req, body) = start(
        "sam",
        "/impersonation/start",
        Some("app.example"),
        "http://app.example",
    );
    assert_eq!(send(&f.app, req, body).await.status, StatusCode::FORBIDDEN);
    // HTTP/2 carries the host in the URI's authority, with no `Host`.
    let (req, body) = start(
        "sam",
        "https://app.example/impersonation/start",
        None,
        "https://app.example",
    );
    assert_eq!(send(&f.app, req, body).await.status, StatusCode::SEE_OTHER);
    // Host names are case-insensitive; the default port may be written.
    let (req, body) = start(
        "kim",
        "/impersonation/start",
        Some("App.Example"),
        "https://app.example:443",
    );
    assert_eq!(send(&f.app, req, body).await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_guard_records_the_route_template_not_the_path() {
    let f = fixture(false);
    let secret = impersonate(&f, "sam").await;
    let refused = send(
        &f.app,
        get_as("sam", "/password/reset/tok-3f9a8c77e1", Some(&secret)),
        Body::empty(),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let trail = serde_json::to_string(&events(&f).await).unwrap();
    assert!(!trail.contains("tok-3f9a8c77e1"), "{trail}");
    assert!(trail.contains("GET /password/reset/{token}"), "{trail}");
}

#[tokio::test]
async fn with_the_routes_at_the_root_every_other_request_is_audited() {
    let f = fixture(true);
    let secret = impersonate(&f, "sam").await;
    for uri in ["/plain", "/status", "/whoami"] {
        let page = send(&f.app, get_as("sam", uri, Some(&secret)), Body::empty()).await;
        assert_eq!(page.status, StatusCode::OK, "{uri}");
    }
    let routes: Vec<String> = events(&f)
        .await
        .into_iter()
        .filter(|e| e.action == AuditAction::Access)
        .filter_map(|e| e.details.get("route").map(str::to_owned))
        .collect();
    assert_eq!(routes, ["/plain", "/status", "/whoami"]);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let f = fixture(false);
    let secret = impersonate(&f, "sam").await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let req = Request::builder()
            .uri("/whoami")
            .header(header::HOST, "app.example")
            .header("x-test-user", "sam")
            .header(header::AUTHORIZATION, format!("{scheme} {secret}"));
        let reply = send(&f.app, req, Body::empty()).await;
        assert_eq!(reply.body, b"olive", "{scheme}");
    }
}

#[test]
fn debug_output_leaves_the_csrf_token_out() {
    let form: impersonation_axum::StartForm =
        serde_urlencoded::from_str("target=olive&reason=r&csrf=tok-5e2b9d").unwrap();
    assert!(!format!("{form:?}").contains("tok-5e2b9d"));
    let form: impersonation_axum::StopForm = serde_urlencoded::from_str("csrf=tok-5e2b9d").unwrap();
    assert!(!format!("{form:?}").contains("tok-5e2b9d"));
}

/// `route` as `POST /bookings` behind the layer and the host's auth, on
/// `store`, with Sam impersonating Olive: the app, and Sam's request to the
/// route under the session (by bearer secret).
async fn one_route(
    store: &Arc<FaultyStore<MemoryStore>>,
    route: axum::routing::MethodRouter,
) -> (Router, Request) {
    let start = StartRequest::new(UserId::new("olive").unwrap(), "Olive cannot save");
    one_route_in(store, route, start).await
}

/// [`one_route`], in a session started with `start`.
async fn one_route_in(
    store: &Arc<FaultyStore<MemoryStore>>,
    route: axum::routing::MethodRouter,
    start: StartRequest,
) -> (Router, Request) {
    let directory = MemoryDirectory::new();
    for p in [agent("sam"), customer("olive", "Olive Owner")] {
        directory.insert(p);
    }
    let svc = Impersonation::new(Arc::clone(store), directory.clone());
    let app = Router::new()
        .route("/bookings", route)
        .layer(ImpersonationLayer::new(svc.clone()))
        .layer(from_fn_with_state(directory.clone(), auth));
    let sam = directory.get(&UserId::new("sam").unwrap()).unwrap();
    let secret = svc
        .start(Requester::User(&sam), start)
        .await
        .unwrap()
        .secret;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/bookings")
        .header(header::HOST, "app.example")
        .header("x-test-user", "sam")
        .header(header::AUTHORIZATION, format!("Bearer {}", secret.expose()))
        .body(Body::empty())
        .unwrap();
    (app, req)
}

/// A client that goes away while its change is being audited (hyper then
/// drops the request's future) does not take the audit write with it: the
/// change is made, so it is on the trail. On tokio's paused clock, so the
/// order of the client's wait and the slow write is fixed however loaded
/// the machine is: the clock moves only when every task is waiting.
#[tokio::test(start_paused = true)]
async fn a_change_stays_on_record_when_the_client_goes_away_mid_audit() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let slowed = Arc::clone(&store);
    let made = Arc::new(tokio::sync::Notify::new());
    let told = Arc::clone(&made);
    let (app, req) = one_route(
        &store,
        axum::routing::post(move || async move {
            // The change is made; the write that audits it is slow.
            slowed.fail_next_write(When::Slow);
            told.notify_one();
            "saved"
        }),
    )
    .await;
    let mut request = Box::pin(app.oneshot(req));
    tokio::select! {
        _ = &mut request => panic!("answered before the change was made"),
        () = made.notified() => {}
    }
    // The change is made; the client waits a little longer, then goes
    // away while its audit write is under way (the future is dropped).
    let gone = tokio::time::timeout(SLOW_CALL / 2, &mut request).await;
    assert!(gone.is_err(), "the client gave up before the answer");
    drop(request);
    tokio::time::sleep(SLOW_CALL * 2).await;
    let modifications: Vec<String> = all_events(store.inner(), AuditQuery::default())
        .await
        .into_iter()
        .filter(|e| e.action == AuditAction::Modification)
        .filter_map(|e| e.details.get("route").map(str::to_owned))
        .collect();
    assert_eq!(modifications, ["/bookings"]);
}

/// A change refused in a read-only session is on the trail even if the
/// client goes away while the refusal is being written: the write runs to
/// its end, as a completed request's does. (A write may carry other
/// requests' records in the same store call, which a dropped write would
/// leave unsure of having landed.)
#[tokio::test(start_paused = true)]
async fn a_read_only_refusal_stays_on_record_when_the_client_goes_away() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let mut start = StartRequest::new(UserId::new("olive").unwrap(), "Olive cannot save");
    start.read_only = true;
    let (app, req) = one_route_in(&store, axum::routing::post(|| async { "saved" }), start).await;
    // The second write: the first is the lookup's idle touch.
    store.fail_nth(2, When::Slow, Calls::Writes);
    let gone = tokio::time::timeout(SLOW_CALL / 2, app.oneshot(req)).await;
    assert!(gone.is_err(), "the client gave up before the answer");
    tokio::time::sleep(SLOW_CALL * 2).await;
    let refusals: Vec<String> = all_events(store.inner(), AuditQuery::default())
        .await
        .into_iter()
        .filter(|e| e.action == AuditAction::Denied)
        .filter_map(|e| e.details.get("denial").map(str::to_owned))
        .collect();
    assert_eq!(refusals, ["read_only_session"]);
}

/// A request the guard refuses, whose client goes away while the refusal
/// is being written: the refusal is its one record, not the refusal and
/// an access given up besides.
#[tokio::test(start_paused = true)]
async fn a_guard_refusal_is_the_one_record_when_the_client_goes_away_meanwhile() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = one_route(
        &store,
        axum::routing::post(|_: NotImpersonating| async { "saved" }),
    )
    .await;
    // The second write: the first is the lookup's idle touch.
    store.fail_nth(2, When::Slow, Calls::Writes);
    let gone = tokio::time::timeout(SLOW_CALL / 2, app.oneshot(req)).await;
    assert!(gone.is_err(), "the client gave up before the answer");
    tokio::time::sleep(SLOW_CALL * 2).await;
    let actions: Vec<AuditAction> = all_events(store.inner(), AuditQuery::default())
        .await
        .into_iter()
        .map(|e| e.action)
        .filter(|a| *a != AuditAction::SessionStarted)
        .collect();
    assert_eq!(actions, [AuditAction::Denied]);
}

/// A store that panics while it writes a request's record (a bug in the
/// store) is a store that failed: the answer is a 503, as for any store
/// error, and the panic stops there. (Since the write's first poll runs
/// in the request, not on a task of its own.)
#[tokio::test]
async fn a_store_that_panics_while_auditing_is_a_503() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let faulty = Arc::clone(&store);
    let (app, req) = one_route(
        &store,
        axum::routing::post(move || async move {
            faulty.fail_next_write(When::Panic);
            "saved"
        }),
    )
    .await;
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(store.injected(), 1, "the panic was injected");
}

/// Start and stop are audited by the service once they reach it; a request
/// to them that is turned away before (a forged token, a GET) is still a
/// request under impersonation, and audited once like any other.
#[tokio::test]
async fn turned_away_stops_are_audited_and_a_stop_is_audited_once() {
    let f = fixture(false);
    let secret = impersonate(&f, "sam").await;
    let first = send(
        &f.app,
        get_as("sam", "/plain", Some(&secret)),
        Body::empty(),
    )
    .await;
    let csrf = first.cookie("__Host-impersonation-csrf").unwrap();
    let stop = |method: Method, token: &str| {
        (
            Request::builder()
                .method(method)
                .uri("/impersonation/stop")
                .header(header::HOST, "app.example")
                .header(header::ORIGIN, "https://app.example")
                .header("x-test-user", "sam")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(
                    header::COOKIE,
                    format!("__Host-impersonation={secret}; __Host-impersonation-csrf={csrf}"),
                ),
            Body::from(format!("csrf={token}")),
        )
    };
    let token = form_token(&first.body);
    let (req, body) = stop(Method::POST, "forged");
    assert_eq!(send(&f.app, req, body).await.status, StatusCode::FORBIDDEN);
    // The stored token is not the session's pages' token.
    let (req, body) = stop(Method::POST, &csrf);
    assert_eq!(send(&f.app, req, body).await.status, StatusCode::FORBIDDEN);
    let (req, body) = stop(Method::GET, &token);
    assert_eq!(
        send(&f.app, req, body).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let (req, body) = stop(Method::POST, &token);
    assert_eq!(send(&f.app, req, body).await.status, StatusCode::SEE_OTHER);
    let after_page: Vec<(AuditAction, Option<String>)> = events(&f)
        .await
        .into_iter()
        .skip_while(|e| e.details.get("route") != Some("/plain"))
        .skip(1)
        .map(|e| (e.action, e.details.get("status").map(str::to_owned)))
        .collect();
    assert_eq!(
        after_page,
        [
            (AuditAction::Modification, Some("403".to_owned())),
            (AuditAction::Modification, Some("403".to_owned())),
            (AuditAction::Access, Some("405".to_owned())),
            (AuditAction::SessionEnded, None),
        ]
    );
}

/// A browser's session cookie needs its agent signed in to the app: after
/// the agent signs out, the cookie alone impersonates no one. An API
/// client's bearer secret is its own credential.
#[tokio::test]
async fn a_cookie_without_its_signed_in_agent_impersonates_no_one() {
    let f = fixture(false);
    let secret = impersonate(&f, "sam").await;
    let signed_out = Request::builder()
        .uri("/whoami")
        .header(header::HOST, "app.example")
        .header(header::COOKIE, format!("__Host-impersonation={secret}"));
    let reply = send(&f.app, signed_out, Body::empty()).await;
    assert_ne!(reply.body, b"olive");
    assert!(reply.status.is_client_error(), "{}", reply.status);
    let api = Request::builder()
        .uri("/whoami")
        .header(header::HOST, "app.example")
        .header(header::AUTHORIZATION, format!("Bearer {secret}"));
    assert_eq!(send(&f.app, api, Body::empty()).await.body, b"olive");
    let signed_in = get_as("sam", "/whoami", Some(&secret));
    assert_eq!(send(&f.app, signed_in, Body::empty()).await.body, b"olive");
}

/// Requests with the cookie from no one signed in (the agent signed out
/// of the app and left a tab polling), or from a colleague signed in on
/// the same browser, do not keep the session from idling out: they do not
/// touch it. The agent's own next request does.
#[tokio::test]
async fn a_cookie_without_its_signed_in_agent_does_not_touch_the_session() {
    let f = fixture(false);
    let secret = impersonate(&f, "sam").await;
    let session = |f: &Fx| {
        let store = Arc::clone(&f.store);
        async move {
            let live = store
                .live_sessions(&impersonation_core::LiveFilter::default())
                .await
                .unwrap();
            live[0].last_seen_at
        }
    };
    let started = session(&f).await;
    // Past the touch's coalescing (1 s by default).
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    for _ in 0..3 {
        let signed_out = Request::builder()
            .uri("/whoami")
            .header(header::HOST, "app.example")
            .header(header::COOKIE, format!("__Host-impersonation={secret}"));
        send(&f.app, signed_out, Body::empty()).await;
        let colleague = get_as("kim", "/whoami", Some(&secret));
        assert_eq!(send(&f.app, colleague, Body::empty()).await.body, b"kim");
    }
    assert_eq!(session(&f).await, started);
    let signed_in = get_as("sam", "/whoami", Some(&secret));
    assert_eq!(send(&f.app, signed_in, Body::empty()).await.body, b"olive");
    assert!(session(&f).await > started);
}

/// `POST /bookings`, whose handler panics.
fn panicking() -> axum::routing::MethodRouter {
    axum::routing::post(|| async {
        if true {
            panic!("the handler failed midway");
        }
        "saved"
    })
}

/// The attempt at `POST /bookings` is on the trail once, with status 500.
async fn assert_audited_as_a_500(store: &FaultyStore<MemoryStore>) {
    assert_eq!(
        attempts_at_bookings(store).await,
        [(AuditAction::Modification, Some("500".to_owned()))]
    );
}

/// The attempts at `POST /bookings` on the trail: action and status.
async fn attempts_at_bookings(
    store: &FaultyStore<MemoryStore>,
) -> Vec<(AuditAction, Option<String>)> {
    all_events(store.inner(), AuditQuery::default())
        .await
        .into_iter()
        .filter(|e| e.details.get("route") == Some("/bookings"))
        .map(|e| (e.action, e.details.get("status").map(str::to_owned)))
        .collect()
}

/// Serves `POST /bookings` by `route` under impersonation, gives the
/// request up (drops its future, as hyper does when the client goes away)
/// once `reached` fires, and asserts the attempt reaches the trail with
/// status 499. Its record is written by a task of its own once the
/// request's future is gone, so this waits for it (up to 5 s).
async fn give_up_once_reached(
    route: axum::routing::MethodRouter,
    reached: tokio::sync::oneshot::Receiver<()>,
) {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = one_route(&store, route).await;
    tokio::select! {
        _ = app.oneshot(req) => panic!("the request never ends"),
        _ = reached => {}
    }
    let store = &*store;
    let mut attempts = Vec::new();
    for _ in 0..500 {
        attempts = attempts_at_bookings(store).await;
        if !attempts.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        attempts,
        [(AuditAction::Modification, Some("499".to_owned()))]
    );
}

/// A handler that panics served nothing, but may have changed something
/// first: the attempt is on the trail (status 500), and the panic goes on
/// to whatever catches it outside the layer.
#[tokio::test]
async fn a_panicking_handler_is_audited_and_the_panic_goes_on() {
    assert_panic_is_audited_and_passed_on(panicking()).await;
}

/// Serves `POST /bookings` by `route` (which panics) under impersonation:
/// the panic comes out of the layer, and the attempt is on the trail once,
/// with status 500.
async fn assert_panic_is_audited_and_passed_on(route: axum::routing::MethodRouter) {
    use futures_util::FutureExt;

    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = one_route(&store, route).await;
    let outcome = std::panic::AssertUnwindSafe(app.oneshot(req))
        .catch_unwind()
        .await;
    assert!(outcome.is_err(), "the panic is passed on");
    assert_audited_as_a_500(&store).await;
}

/// A client that goes away while the handler runs (hyper then drops the
/// request's future, and the handler's with it) leaves the attempt on the
/// trail: the handler may have changed something already. It is audited
/// with status 499 (client closed request).
#[tokio::test]
async fn a_request_given_up_while_its_handler_runs_is_audited_as_a_499() {
    let (started, handler_started) = tokio::sync::oneshot::channel::<()>();
    let started = Arc::new(std::sync::Mutex::new(Some(started)));
    let saves_then_waits = axum::routing::post(move || async move {
        // The handler has begun (it could have changed something), then
        // waits on something slow.
        if let Some(started) = started.lock().unwrap().take() {
            let _ = started.send(());
        }
        std::future::pending::<()>().await;
        "saved"
    });
    give_up_once_reached(saves_then_waits, handler_started).await;
}

/// A page the banner cannot be shown on (larger than `MAX_BANNER_BODY`,
/// or whose body fails midway) is answered 500, and the trail shows the
/// 500 that was sent, not the handler's 200.
#[tokio::test]
async fn a_page_that_cannot_carry_the_banner_is_a_500_on_the_trail_too() {
    let too_large =
        axum::routing::post(|| async { Html("a".repeat(impersonation_axum::MAX_BANNER_BODY + 1)) });
    let failing = axum::routing::post(|| async {
        let chunks: Vec<Result<&'static str, std::io::Error>> = vec![
            Ok("<html><body>"),
            Err(std::io::Error::other("the database went away")),
        ];
        (
            [(header::CONTENT_TYPE, "text/html")],
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
    });
    for route in [too_large, failing] {
        let store = Arc::new(FaultyStore::new(MemoryStore::new()));
        let (app, req) = one_route(&store, route).await;
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
        assert_audited_as_a_500(&store).await;
    }
}

/// A page read whole for its banner keeps its trailers: they follow the
/// page, with the banner in (but for a digest of the bytes the app wrote,
/// which the page no longer is) and where the banner cannot go (UTF-16,
/// the bytes unchanged, the digest kept).
#[tokio::test]
async fn a_page_read_for_its_banner_keeps_its_trailers() {
    use axum::http::HeaderValue;
    for (page, banner) in [
        (&b"<html><body>Bookings</body></html>"[..], true),
        (&b"\xFF\xFE<\0h\0t\0m\0l\0>\0"[..], false),
    ] {
        let route = axum::routing::post(move || async move {
            let mut trailers = axum::http::HeaderMap::new();
            trailers.insert("server-timing", HeaderValue::from_static("db;dur=53"));
            trailers.insert("content-digest", HeaderValue::from_static("sha-256=:abc=:"));
            let body = http_body_util::Full::new(axum::body::Bytes::from_static(page))
                .with_trailers(std::future::ready(Some(Ok::<_, std::convert::Infallible>(
                    trailers,
                ))));
            (
                [
                    (header::CONTENT_TYPE, "text/html"),
                    (header::ETAG, "\"v1\""),
                    (
                        header::HeaderName::from_static("repr-digest"),
                        "sha-256=:abc=:",
                    ),
                ],
                Body::new(body),
            )
        });
        let store = Arc::new(FaultyStore::new(MemoryStore::new()));
        let (app, req) = one_route(&store, route).await;
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // So do its headers that describe the app's bytes.
        for name in [header::ETAG.as_str(), "repr-digest"] {
            assert_eq!(res.headers().contains_key(name), !banner, "{name}");
        }
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        assert_eq!(
            trailers.get("server-timing"),
            Some(&HeaderValue::from_static("db;dur=53")),
            "banner: {banner}"
        );
        assert_eq!(
            trailers.contains_key("content-digest"),
            !banner,
            "a digest of the app's bytes goes only with those bytes"
        );
        let bytes = collected.to_bytes();
        let shown = bytes
            .windows(b"impersonation-banner".len())
            .any(|w| w == b"impersonation-banner");
        assert_eq!(shown, banner);
    }
}

/// A 205 (Reset Content) carries no body, whatever its type says: it
/// gets no banner.
#[tokio::test]
async fn a_reset_content_answer_stays_empty() {
    let route = axum::routing::post(|| async {
        (
            StatusCode::RESET_CONTENT,
            [(header::CONTENT_TYPE, "text/html")],
        )
    });
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = one_route(&store, route).await;
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::RESET_CONTENT);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty(), "{body:?}");
}

/// A page the app renders with `banner_html` itself and marks
/// `BannerRendered` keeps its one banner, however large, and streams as
/// written; the request is audited once and the page is `no-store`, as
/// any impersonated page is.
#[tokio::test]
async fn a_page_that_renders_its_own_banner_gets_no_second_one_and_any_size() {
    use impersonation_axum::{BannerRendered, CsrfToken, Impersonating, banner_html};
    let filler = "a".repeat(impersonation_axum::MAX_BANNER_BODY + 1);
    let expected_tail = format!("{filler}</body></html>");
    let own_banner =
        axum::routing::post(move |Impersonating(ctx): Impersonating, csrf: CsrfToken| {
            let filler = filler.clone();
            async move {
                let banner = banner_html(
                    &ctx,
                    time::OffsetDateTime::now_utc(),
                    "/impersonation/stop",
                    csrf.as_str(),
                );
                let chunks: Vec<Result<String, std::io::Error>> = vec![
                    Ok(format!("<html><body>{banner}")),
                    Ok(format!("{filler}</body></html>")),
                ];
                (
                    BannerRendered,
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    Body::from_stream(futures_util::stream::iter(chunks)),
                )
            }
        });
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = one_route(&store, own_banner).await;
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    let page = res.into_body().collect().await.unwrap().to_bytes();
    let page = std::str::from_utf8(&page).unwrap();
    assert_eq!(page.matches("id=\"impersonation-banner\"").count(), 1);
    assert!(
        page.contains("Olive Owner"),
        "the app's banner names the customer"
    );
    assert!(
        page.ends_with(&expected_tail),
        "the page as the app wrote it"
    );
    assert_eq!(
        attempts_at_bookings(&store).await,
        [(AuditAction::Modification, Some("200".to_owned()))]
    );
}

/// A page served under impersonation is `no-store`, and cache headers
/// that CDNs read before `Cache-Control` are taken off it.
#[tokio::test]
async fn cdn_cache_headers_are_taken_off_an_impersonated_page() {
    let cached = axum::routing::post(|| async {
        (
            [
                (header::CACHE_CONTROL, "public, max-age=600"),
                (
                    header::HeaderName::from_static("surrogate-control"),
                    "max-age=600",
                ),
                (
                    header::HeaderName::from_static("edge-control"),
                    "cache-maxage=600s",
                ),
                (
                    header::HeaderName::from_static("cdn-cache-control"),
                    "max-age=600",
                ),
                (
                    header::HeaderName::from_static("cloudflare-cdn-cache-control"),
                    "max-age=600",
                ),
                (header::HeaderName::from_static("x-accel-expires"), "600"),
                (header::VARY, "Accept"),
            ],
            "saved",
        )
    });
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = one_route(&store, cached).await;
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let headers = res.headers();
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    for cdn in [
        "surrogate-control",
        "edge-control",
        "cdn-cache-control",
        "cloudflare-cdn-cache-control",
        "x-accel-expires",
    ] {
        assert!(!headers.contains_key(cdn), "{cdn}");
    }
    assert_eq!(headers[header::VARY], "Accept", "other headers stay");
}

/// An app's own framing rules stay on an impersonated page, stricter
/// ones too, and the layer's `frame-ancestors 'self'` policy comes beside
/// its own policy rather than replacing it.
#[tokio::test]
async fn an_apps_own_framing_rules_stay_beside_the_layers() {
    let framed = axum::routing::post(|| async {
        (
            [
                (header::X_FRAME_OPTIONS, "DENY"),
                (header::CONTENT_SECURITY_POLICY, "default-src 'self'"),
            ],
            "saved",
        )
    });
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = one_route(&store, framed).await;
    let res = app.oneshot(req).await.unwrap();
    let headers = res.headers();
    assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
    let policies: Vec<&str> = headers
        .get_all(header::CONTENT_SECURITY_POLICY)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(policies, ["default-src 'self'", "frame-ancestors 'self'"]);
}

/// A page's body that panics while the layer reads it (for the banner) is
/// audited as a panicking handler is, with status 500, and the panic goes
/// on.
#[tokio::test]
async fn a_body_that_panics_while_read_is_audited_and_the_panic_goes_on() {
    let panicking_body = axum::routing::post(|| async {
        let chunks = futures_util::stream::poll_fn(
            |_| -> std::task::Poll<Option<Result<&'static str, std::io::Error>>> {
                panic!("the page failed while it was written")
            },
        );
        (
            [(header::CONTENT_TYPE, "text/html")],
            Body::from_stream(chunks),
        )
    });
    assert_panic_is_audited_and_passed_on(panicking_body).await;
}

/// A client that goes away while the layer reads the page for the banner
/// was sent nothing: the request is audited with status 499.
#[tokio::test]
async fn a_request_given_up_while_its_page_is_read_is_audited_as_a_499() {
    let (started, body_started) = tokio::sync::oneshot::channel::<()>();
    let started = Arc::new(std::sync::Mutex::new(Some(started)));
    let slow_page = axum::routing::post(move || async move {
        let chunks = futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok::<_, std::io::Error>("<html><body>")]),
            futures_util::stream::poll_fn(move |_| {
                // Reached only once the layer reads past the first chunk.
                if let Some(started) = started.lock().unwrap().take() {
                    let _ = started.send(());
                }
                std::task::Poll::<Option<Result<&'static str, std::io::Error>>>::Pending
            }),
        );
        (
            [(header::CONTENT_TYPE, "text/html")],
            Body::from_stream(chunks),
        )
    });
    give_up_once_reached(slow_page, body_started).await;
}

/// A catch-panic layer inside the impersonation layer turns the panic into
/// a 500 that then passes through the layer like any answer: audited once,
/// with `Cache-Control: no-store`, which a 500 made outside cannot carry.
#[tokio::test]
async fn a_panic_caught_inside_the_layer_is_an_answer_like_any_other() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = one_route(
        &store,
        panicking().layer(tower_http::catch_panic::CatchPanicLayer::new()),
    )
    .await;
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    assert_audited_as_a_500(&store).await;
}

/// The SDK's routes read a form up to `MAX_FORM`, in an app that lifts
/// the body limit for its own routes too; and a stop from no one signed
/// in is refused before its body is read (a body that fails when read
/// would make it a 400).
#[tokio::test]
async fn the_routes_read_forms_up_to_their_own_limit_and_only_from_someone() {
    use axum::extract::DefaultBodyLimit;
    use impersonation_axum::MAX_FORM;

    let f = fixture(false);
    let app = f.app.clone().layer(DefaultBodyLimit::disable());
    let post = |path: &str, who: Option<&str>| {
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, "app.example")
            .header(header::ORIGIN, "http://app.example")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        match who {
            Some(who) => req.header("x-test-user", who),
            None => req,
        }
    };
    let big = format!("csrf=x&target=olive&reason=r&pad={}", "a".repeat(MAX_FORM));
    for path in ["/impersonation/start", "/impersonation/stop"] {
        let reply = send(&app, post(path, Some("sam")), Body::from(big.clone())).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
    }
    let failing = || {
        Body::from_stream(futures_util::stream::iter([Err::<&str, _>(
            std::io::Error::other("the client's body broke"),
        )]))
    };
    let reply = send(&app, post("/impersonation/stop", None), failing()).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = send(&app, post("/impersonation/stop", Some("sam")), failing()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "read once signed in");
}

/// Sam's `GET /bookings` with `req`'s credential, asking to upgrade to
/// `protocol`.
fn upgrade_of(req: &Request, protocol: &'static str) -> axum::http::request::Builder {
    Request::builder()
        .method(Method::GET)
        .uri("/bookings")
        .header(header::HOST, "app.example")
        .header("x-test-user", "sam")
        .header(
            header::AUTHORIZATION,
            req.headers()[header::AUTHORIZATION].clone(),
        )
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, protocol)
}

/// A WebSocket's handshake is a `GET`, but what its messages do the layer
/// never sees: by default it is a change, refused in a read-only session
/// and audited as a modification in another.
#[tokio::test]
async fn an_upgrade_is_a_change() {
    for read_only in [true, false] {
        let store = Arc::new(FaultyStore::new(MemoryStore::new()));
        let mut start = StartRequest::new(UserId::new("olive").unwrap(), "Olive's live feed");
        start.read_only = read_only;
        let (app, req) =
            one_route_in(&store, axum::routing::get(|| async { "upgraded" }), start).await;
        let before = all_events(store.inner(), AuditQuery::default()).await.len();
        let reply = send(&app, upgrade_of(&req, "websocket"), Body::empty()).await;
        let events = all_events(store.inner(), AuditQuery::default()).await;
        assert_eq!(events.len(), before + 1, "one record of the request");
        let last = events.last().unwrap();
        if read_only {
            assert_eq!(reply.status, StatusCode::FORBIDDEN);
            assert_eq!(last.action, AuditAction::Denied);
            assert_eq!(last.details.get("denial"), Some("read_only_session"));
        } else {
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(last.action, AuditAction::Modification);
            assert_eq!(last.details.get("method"), Some("GET"));
        }
    }
}

/// A handler that takes the guard as a `Result` and answers with the
/// refusal (as is, or dressed as its own page or a redirect by
/// `answer_with`) leaves the denial as the request's one record. One that
/// answers anything of its own carried on past the refusal, maybe to a
/// change: whatever its status (a success, its own 403), the request is
/// audited as well.
#[tokio::test]
async fn a_handler_carrying_on_past_the_guard_is_audited_too() {
    #[derive(Clone, Copy, Debug)]
    enum Answers {
        TheRefusal,
        ItsOwnPageForTheRefusal,
        ItsPageTooLargeForTheBanner,
        ARedirectForTheRefusal,
        SuccessOfItsOwn,
        ErrorOfItsOwn,
    }
    use Answers::*;
    for (answers, expected) in [
        (TheRefusal, vec![AuditAction::Denied]),
        (ItsOwnPageForTheRefusal, vec![AuditAction::Denied]),
        // Replaced by the layer's 500 (no room for the banner): still the
        // refusal.
        (ItsPageTooLargeForTheBanner, vec![AuditAction::Denied]),
        (ARedirectForTheRefusal, vec![AuditAction::Denied]),
        (
            SuccessOfItsOwn,
            vec![AuditAction::Denied, AuditAction::Modification],
        ),
        (
            ErrorOfItsOwn,
            vec![AuditAction::Denied, AuditAction::Modification],
        ),
    ] {
        let store = Arc::new(FaultyStore::new(MemoryStore::new()));
        let route = axum::routing::post(
            move |guard: Result<NotImpersonating, NotImpersonatingRejection>| async move {
                let refusal = match guard {
                    Ok(_) => return (StatusCode::OK, "saved everything").into_response(),
                    Err(refusal) => refusal,
                };
                assert_eq!(refusal.status(), StatusCode::FORBIDDEN);
                match answers {
                    TheRefusal => refusal.into_response(),
                    ItsOwnPageForTheRefusal => refusal.answer_with((
                        StatusCode::FORBIDDEN,
                        Html("<html><body>not while impersonating</body></html>"),
                    )),
                    ItsPageTooLargeForTheBanner => refusal.answer_with(Html(format!(
                        "<html><body>{}</body></html>",
                        "x".repeat(impersonation_axum::MAX_BANNER_BODY)
                    ))),
                    ARedirectForTheRefusal => {
                        refusal.answer_with(axum::response::Redirect::to("/?refused"))
                    }
                    SuccessOfItsOwn => (StatusCode::OK, "saved the rest").into_response(),
                    ErrorOfItsOwn => {
                        (StatusCode::FORBIDDEN, "saved the rest, refused the card").into_response()
                    }
                }
            },
        );
        let (app, req) = one_route(&store, route).await;
        let res = app.oneshot(req).await.unwrap();
        let status = res.status();
        if matches!(answers, ItsPageTooLargeForTheBanner) {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        }
        let events: Vec<AuditEvent> = all_events(store.inner(), AuditQuery::default())
            .await
            .into_iter()
            .skip(1) // the start
            .collect();
        let actions: Vec<AuditAction> = events.iter().map(|e| e.action).collect();
        assert_eq!(actions, expected, "answers: {answers:?}");
        if let Some(served) = events.get(1) {
            assert_eq!(
                served.details.get("status"),
                Some(status.as_str()),
                "answers: {answers:?}"
            );
        }
    }
}

/// A host may drive the service on an executor of its own, outside any
/// tokio runtime. An audit write that has to wait (here it yields once,
/// with no timer) cannot go to a task of its own there; it is awaited in
/// place: the request is answered and on the trail, and nothing panics.
#[test]
fn outside_a_tokio_runtime_an_audit_write_that_waits_is_awaited_in_place() {
    use futures_executor::block_on;
    // The request's writes: the resolve's touch, then its audit event. (A
    // failure there is the audit's: the change is withheld, 503.)
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let route = axum::routing::post(|| async { "saved" });
    let (app, req) = block_on(one_route(&store, route.clone()));
    store.fail_nth(2, When::Before, Calls::Writes);
    let res = block_on(app.oneshot(req)).unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = block_on(res.into_body().collect()).unwrap().to_bytes();
    assert_eq!(&body[..], b"audit unavailable");
    assert_eq!(store.injected(), 1);
    // The same write waits once.
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let (app, req) = block_on(one_route(&store, route));
    store.fail_nth(2, When::Yield, Calls::Writes);
    let res = block_on(app.oneshot(req)).unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(store.injected(), 1);
    let events = block_on(all_events(store.inner(), AuditQuery::default()));
    let last = events.last().unwrap();
    assert_eq!(
        (last.action, last.details.get("route")),
        (AuditAction::Modification, Some("/bookings"))
    );
}

/// `Upgrade: h2c`, which some clients offer on every plain-HTTP request,
/// is no change: a read-only session still reads.
#[tokio::test]
async fn an_h2c_upgrade_offer_is_no_change() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let mut start = StartRequest::new(UserId::new("olive").unwrap(), "Olive's bookings");
    start.read_only = true;
    let (app, req) = one_route_in(&store, axum::routing::get(|| async { "read" }), start).await;
    let before = all_events(store.inner(), AuditQuery::default()).await.len();
    let reply = send(&app, upgrade_of(&req, "h2c"), Body::empty()).await;
    assert_eq!(reply.status, StatusCode::OK);
    let events = all_events(store.inner(), AuditQuery::default()).await;
    assert_eq!(events.len(), before + 1, "one record of the request");
    assert_eq!(events.last().unwrap().action, AuditAction::Access);
}
