//! What the binding offers the host app's own routes: the SDK's cross-site
//! check for its forms (`CsrfCheck`), and the choice of which of its
//! requests are changes (`changes_when`), so that a read-only session can
//! still sign out.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Form, Router};
use impersonation_axum::{CsrfCheck, CsrfToken, EffectiveUser, ImpersonationLayer, RenewCsrfToken};
use impersonation_core::{
    AuditAction, AuditQuery, Impersonation, MemoryDirectory, MemoryStore, Requester, StartRequest,
    UserId,
};
use impersonation_testkit::conformance::all_events;
use serde::Deserialize;
use tower::ServiceExt;

use common::{agent, auth, customer};

const TOKEN: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";

#[derive(Deserialize)]
struct Settings {
    #[serde(default)]
    csrf: String,
}

/// The host's sign-out, a change to nothing of the customer's, and its
/// bookings, a change; both check the form with the SDK's `CsrfCheck`.
fn app(store: &Arc<MemoryStore>, directory: &MemoryDirectory) -> Router {
    app_with(store, directory, |layer| layer)
}

/// [`app`], its layer set up further by `configure`.
fn app_with(
    store: &Arc<MemoryStore>,
    directory: &MemoryDirectory,
    configure: impl FnOnce(ImpersonationLayer) -> ImpersonationLayer,
) -> Router {
    async fn checked(check: CsrfCheck, Form(form): Form<Settings>) -> StatusCode {
        if check.verify(&form.csrf) {
            StatusCode::OK
        } else {
            StatusCode::FORBIDDEN
        }
    }
    let svc = Impersonation::new(Arc::clone(store), directory.clone());
    Router::new()
        .route("/signout/{device}", post(checked))
        .route("/bookings", post(checked))
        // The host's own sign-in: whom the browser acts as changes.
        .route(
            "/signin",
            post(|| async { (RenewCsrfToken, StatusCode::SEE_OTHER) }),
        )
        // A form that may post with a stale token: only where it comes from.
        .route(
            "/leave",
            post(|check: CsrfCheck| async move {
                if check.same_site() {
                    StatusCode::OK
                } else {
                    StatusCode::FORBIDDEN
                }
            }),
        )
        // The token the app puts into its forms.
        .route(
            "/token",
            get(|token: CsrfToken| async move { token.as_str().to_owned() }),
        )
        // A WebSocket's handshake (the test sends its headers only).
        .route("/live", axum::routing::any(|| async { "switching" }))
        // A report the app caches by ETag (a 304 for the copy the browser
        // has), which a host may count as a change (`changes_when`: kept
        // out of read-only sessions).
        .route(
            "/report",
            get(|headers: axum::http::HeaderMap| async move {
                if headers.contains_key(header::IF_NONE_MATCH) {
                    return StatusCode::NOT_MODIFIED.into_response();
                }
                axum::response::Html("<html><body>the report</body></html>").into_response()
            }),
        )
        .route(
            "/read-only",
            get(|user: EffectiveUser| async move {
                let companies: Vec<&str> = user
                    .relationships()
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect();
                format!("{} {}", user.read_only(), companies.join(","))
            }),
        )
        .layer(configure(ImpersonationLayer::new(svc).changes_when(
            |method, route| !method.is_safe() && route != "/signout/{device}",
        )))
        .layer(from_fn_with_state(directory.clone(), auth))
}

fn people() -> MemoryDirectory {
    let directory = MemoryDirectory::new();
    for p in [agent("sam"), customer("olive", "Olive Owner")] {
        directory.insert(p);
    }
    directory
}

/// A form POST by Sam from `origin`, with the CSRF cookie if `cookie`, the
/// field `csrf`, and the session's secret if any.
fn form(uri: &str, origin: &str, cookie: bool, csrf: &str, secret: Option<&str>) -> Request {
    let mut cookies = Vec::new();
    if cookie {
        cookies.push(format!("__Host-impersonation-csrf={TOKEN}"));
    }
    if let Some(secret) = secret {
        cookies.push(format!("__Host-impersonation={secret}"));
    }
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::HOST, "app.example")
        .header(header::ORIGIN, origin)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("x-test-user", "sam");
    if !cookies.is_empty() {
        req = req.header(header::COOKIE, cookies.join("; "));
    }
    req.body(Body::from(format!("csrf={csrf}"))).unwrap()
}

async fn status(app: &Router, req: Request) -> StatusCode {
    app.clone().oneshot(req).await.unwrap().status()
}

#[tokio::test]
async fn a_host_form_passes_the_csrf_check_only_from_this_site() {
    let store = Arc::new(MemoryStore::new());
    let app = app(&store, &people());
    let here = "https://app.example";
    assert_eq!(
        status(&app, form("/bookings", here, true, TOKEN, None)).await,
        StatusCode::OK
    );
    // A browser that sends no `Origin` (an older one) and says it is this
    // site, or says nothing: the token and cookie decide.
    let mut quiet = form("/bookings", here, true, TOKEN, None);
    quiet.headers_mut().remove(header::ORIGIN);
    assert_eq!(status(&app, quiet).await, StatusCode::OK);
    let mut same = form("/bookings", here, true, TOKEN, None);
    same.headers_mut().insert(
        "sec-fetch-site",
        header::HeaderValue::from_static("same-origin"),
    );
    assert_eq!(status(&app, same).await, StatusCode::OK);
    // No `Origin`: the `Referer`'s origin stands in for it.
    let referred = |from: &'static str| {
        let mut req = form("/bookings", here, true, TOKEN, None);
        req.headers_mut().remove(header::ORIGIN);
        req.headers_mut()
            .insert(header::REFERER, header::HeaderValue::from_static(from));
        req
    };
    assert_eq!(
        status(&app, referred("https://app.example/bookings?x=1")).await,
        StatusCode::OK
    );
    for from in [
        "https://app.example:8443/x",
        "https://evil.example/",
        "not a url",
    ] {
        assert_eq!(
            status(&app, referred(from)).await,
            StatusCode::FORBIDDEN,
            "{from}"
        );
    }
    // A cookie pair that is not ASCII (set by a page on another port)
    // hides none of the others.
    let mut foreign = form("/bookings", here, true, TOKEN, None);
    let cookies = foreign.headers().get(header::COOKIE).cloned();
    if let Some(cookies) = cookies {
        let mut with = b"x=\xc3\xa9; ".to_vec();
        with.extend_from_slice(cookies.as_bytes());
        foreign.headers_mut().insert(
            header::COOKIE,
            header::HeaderValue::from_bytes(&with).unwrap(),
        );
    }
    assert_eq!(status(&app, foreign).await, StatusCode::OK);
    // A browser that says the request came from another site.
    let mut cross = form("/bookings", here, true, TOKEN, None);
    cross.headers_mut().insert(
        "sec-fetch-site",
        header::HeaderValue::from_static("same-site"),
    );
    let refused = [
        cross,
        // The cookie set by a page on another port of this host, which
        // cannot send this site's origin.
        form("/bookings", "https://app.example:8443", true, TOKEN, None),
        form("/bookings", "http://app.example", true, TOKEN, None),
        form("/bookings", "https://evil.example", true, TOKEN, None),
        // No cookie, an empty field, another token.
        form("/bookings", here, false, TOKEN, None),
        form("/bookings", here, true, "", None),
        form("/bookings", here, true, &TOKEN.replace('0', "1"), None),
    ];
    for req in refused {
        let what = format!("{:?} {:?}", req.headers().get(header::ORIGIN), req.body());
        assert_eq!(status(&app, req).await, StatusCode::FORBIDDEN, "{what}");
    }
    // Without the layer in front the check cannot be made, and says so.
    let bare = Router::new().route("/bookings", post(|_: CsrfCheck| async { StatusCode::OK }));
    assert_eq!(
        status(&bare, form("/bookings", here, true, TOKEN, None)).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

/// Behind a proxy that rewrites `Host`, the app sees its internal name
/// (`app.example` here) where the browser asked for the public one: given
/// the site's origins, a form passes from those and no other, whatever
/// `Host` says, and so does a WebSocket's handshake.
#[tokio::test]
async fn given_its_origins_the_site_is_those_whatever_the_host() {
    let store = Arc::new(MemoryStore::new());
    let directory = people();
    let app = app_with(&store, &directory, |layer| {
        layer
            .site_origin("https://app.example.com".parse().unwrap())
            .site_origin("http://localhost:3000/".parse().unwrap())
    });
    for origin in ["https://app.example.com", "http://localhost:3000"] {
        assert_eq!(
            status(&app, form("/bookings", origin, true, TOKEN, None)).await,
            StatusCode::OK,
            "{origin}"
        );
    }
    // No `Origin` (an older browser): the token and cookie decide, as before.
    let mut quiet = form("/bookings", "https://app.example.com", true, TOKEN, None);
    quiet.headers_mut().remove(header::ORIGIN);
    assert_eq!(status(&app, quiet).await, StatusCode::OK);
    for origin in [
        // The `Host` the request carries is no longer this site.
        "https://app.example",
        "https://app.example.com:8443",
        "http://app.example.com",
        "http://localhost:3001",
        "https://evil.example",
        "null",
        "https://app.example.com/bookings",
        // Spellings a URL parser would take for the origin, which no
        // browser sends: the header is compared as browsers write it.
        "https://APP.example.com:443",
        "HTTPS://app.example.com",
        "https:app.example.com",
        "https://app.example.com/",
        "https://app.example.com.",
        "\thttps://app.example.com",
    ] {
        assert_eq!(
            status(&app, form("/bookings", origin, true, TOKEN, None)).await,
            StatusCode::FORBIDDEN,
            "{origin}"
        );
    }
    // A listed origin still needs the token, and a same-site fetch is
    // still another site's.
    assert_eq!(
        status(
            &app,
            form("/bookings", "https://app.example.com", true, "", None)
        )
        .await,
        StatusCode::FORBIDDEN
    );
    let mut sibling = form("/bookings", "https://app.example.com", true, TOKEN, None);
    sibling.headers_mut().insert(
        "sec-fetch-site",
        header::HeaderValue::from_static("same-site"),
    );
    assert_eq!(status(&app, sibling).await, StatusCode::FORBIDDEN);
    // A WebSocket under the customer's session: from a listed origin only.
    let secret = sams_session(&store, &directory, false).await;
    assert_eq!(
        status(&app, handshake("https://app.example", None, &secret)).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(
            &app,
            handshake("https://app.example.com", Some("same-origin"), &secret)
        )
        .await,
        StatusCode::OK
    );
}

#[test]
fn a_site_origin_is_scheme_host_and_port_only() {
    use impersonation_axum::{InvalidOrigin, SiteOrigin};
    let parsed = |text: &str| text.parse::<SiteOrigin>().map(|o| o.to_string());
    assert_eq!(
        parsed("https://App.Example.com:443/"),
        Ok("https://app.example.com".to_owned())
    );
    assert_eq!(
        parsed("http://[::1]:3000"),
        Ok("http://[::1]:3000".to_owned())
    );
    assert_eq!(
        parsed("https://bücher.example"),
        Ok("https://xn--bcher-kva.example".to_owned())
    );
    assert_eq!(
        SiteOrigin::of_url("https://App.example.com/campground/?x#y").map(|o| o.to_string()),
        Ok("https://app.example.com".to_owned())
    );
    assert_eq!(
        SiteOrigin::of_url("mailto:ops@app.example.com"),
        Err(InvalidOrigin::Scheme("mailto:ops@app.example.com".into()))
    );
    for (text, error) in [
        (
            "app.example.com",
            InvalidOrigin::NotAUrl("app.example.com".into()),
        ),
        ("null", InvalidOrigin::NotAUrl("null".into())),
        (
            "ftp://app.example.com",
            InvalidOrigin::Scheme("ftp://app.example.com".into()),
        ),
        ("file:///etc", InvalidOrigin::Scheme("file:///etc".into())),
        (
            "https://app.example.com/x",
            InvalidOrigin::NotJustOrigin("https://app.example.com/x".into()),
        ),
        (
            "https://app.example.com/?a",
            InvalidOrigin::NotJustOrigin("https://app.example.com/?a".into()),
        ),
        (
            "https://app.example.com#a",
            InvalidOrigin::NotJustOrigin("https://app.example.com#a".into()),
        ),
        (
            "https://me@app.example.com",
            InvalidOrigin::NotJustOrigin("https://me@app.example.com".into()),
        ),
        (
            "https://:pw@app.example.com",
            InvalidOrigin::NotJustOrigin("https://:pw@app.example.com".into()),
        ),
        (
            "blob:https://app.example.com/x",
            InvalidOrigin::Scheme("blob:https://app.example.com/x".into()),
        ),
    ] {
        assert_eq!(text.parse::<SiteOrigin>(), Err(error), "{text}");
    }
}

/// The CSRF cookie a response sets, if any.
fn csrf_cookie_set(res: &axum::response::Response) -> Option<String> {
    res.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("__Host-impersonation-csrf="))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn the_hosts_sign_in_renews_the_csrf_token_and_a_stale_form_may_still_leave() {
    let store = Arc::new(MemoryStore::new());
    let app = app(&store, &people());
    let here = "https://app.example";
    // The host's sign-in answers with a new token for the browser...
    let res = app
        .clone()
        .oneshot(form("/signin", here, true, TOKEN, None))
        .await
        .unwrap();
    let renewed = csrf_cookie_set(&res).expect("a new CSRF cookie");
    assert_eq!(renewed.len(), 43, "{renewed}");
    assert_ne!(renewed, TOKEN);
    // ...so a form rendered before it, with the old one, no longer passes.
    let mut stale = form("/bookings", here, false, TOKEN, None);
    stale.headers_mut().insert(
        header::COOKIE,
        format!("__Host-impersonation-csrf={renewed}")
            .parse()
            .unwrap(),
    );
    assert_eq!(status(&app, stale).await, StatusCode::FORBIDDEN);
    // A route that asks only where the request came from lets a stale
    // form through from this site, and no other.
    assert_eq!(
        status(&app, form("/leave", here, true, "stale", None)).await,
        StatusCode::OK
    );
    for refused in [
        form("/leave", "https://evil.example", true, TOKEN, None),
        form("/leave", "https://app.example:8443", true, TOKEN, None),
        form("/leave", here, false, TOKEN, None),
    ] {
        assert_eq!(status(&app, refused).await, StatusCode::FORBIDDEN);
    }
    // An API client (its session's secret as a bearer token) has no CSRF
    // cookie to renew.
    let directory = people();
    let svc = Impersonation::new(Arc::clone(&store), directory.clone());
    let sam = directory.get(&UserId::new("sam").unwrap()).unwrap();
    let started = svc
        .start(
            Requester::User(&sam),
            StartRequest::new(UserId::new("olive").unwrap(), "Olive cannot sign in"),
        )
        .await
        .unwrap();
    let api = Request::builder()
        .method(Method::POST)
        .uri("/signin")
        .header(header::HOST, "app.example")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", started.secret.expose()),
        )
        .header("x-test-user", "sam")
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(api).await.unwrap();
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(csrf_cookie_set(&res), None);
}

#[tokio::test]
async fn a_read_only_session_may_use_a_route_marked_as_no_change() {
    let store = Arc::new(MemoryStore::new());
    let directory = people();
    let app = app(&store, &directory);
    let svc = Impersonation::new(Arc::clone(&store), directory.clone());
    let sam = directory.get(&UserId::new("sam").unwrap()).unwrap();
    let mut request = StartRequest::new(UserId::new("olive").unwrap(), "Olive cannot see a thing");
    request.read_only = true;
    let secret = svc
        .start(Requester::User(&sam), request)
        .await
        .unwrap()
        .secret;
    let exposed = secret.expose();
    let secret = Some(exposed);
    let here = "https://app.example";
    // A page can tell, and leave out the forms it would refuse.
    let read_only = |secret: Option<&str>| {
        let mut req = Request::builder()
            .uri("/read-only")
            .header(header::HOST, "app.example")
            .header("x-test-user", "sam");
        if let Some(secret) = secret {
            req = req.header(header::COOKIE, format!("__Host-impersonation={secret}"));
        }
        let app = app.clone();
        async move {
            let res = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            axum::body::to_bytes(res.into_body(), 64).await.unwrap()
        }
    };
    // And works with the customer's companies, not the agent's.
    assert_eq!(read_only(secret).await, "true Pinewood Campground");
    assert_eq!(read_only(None).await, "false Support");
    // The session's pages carry a token bound to it.
    let page = {
        let req = Request::builder()
            .uri("/token")
            .header(header::HOST, "app.example")
            .header("x-test-user", "sam")
            .header(
                header::COOKIE,
                format!("__Host-impersonation={exposed}; __Host-impersonation-csrf={TOKEN}"),
            );
        let res = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        String::from_utf8(
            axum::body::to_bytes(res.into_body(), 256)
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap()
    };
    assert_ne!(page, TOKEN);
    // A change is refused in a read-only session; the host's sign-out,
    // marked as no change, is served, and audited as an access.
    assert_eq!(
        status(&app, form("/bookings", here, true, &page, secret)).await,
        StatusCode::FORBIDDEN
    );
    // (The stored token is not the session pages' token.)
    assert_eq!(
        status(&app, form("/signout/phone", here, true, TOKEN, secret)).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&app, form("/signout/phone", here, true, &page, secret)).await,
        StatusCode::OK
    );
    let trail: Vec<(AuditAction, String)> = all_events(&*store, AuditQuery::default())
        .await
        .into_iter()
        .filter(|e| e.action != AuditAction::SessionStarted)
        .filter(|e| !matches!(e.details.get("route"), Some("/read-only" | "/token")))
        .map(|e| {
            let what = e
                .details
                .get("route")
                .or_else(|| e.details.get("description"))
                .unwrap_or_default()
                .to_owned();
            (e.action, what)
        })
        .collect();
    assert_eq!(
        trail,
        [
            (AuditAction::Denied, "POST /bookings".to_owned()),
            (AuditAction::Access, "/signout/{device}".to_owned()),
            (AuditAction::Access, "/signout/{device}".to_owned()),
        ]
    );
}

/// A WebSocket handshake (its headers; the handler answers 200) by Sam
/// from `origin`, with the session's cookie.
fn handshake(origin: &str, sec_fetch_site: Option<&str>, secret: &str) -> Request {
    let mut req = Request::builder()
        .uri("/live")
        .header(header::HOST, "app.example")
        .header(header::ORIGIN, origin)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::COOKIE, format!("__Host-impersonation={secret}"))
        .header("x-test-user", "sam");
    if let Some(site) = sec_fetch_site {
        req = req.header("sec-fetch-site", site);
    }
    req.body(Body::empty()).unwrap()
}

/// Sam's session on Olive, read-only if asked: its secret.
async fn sams_session(
    store: &Arc<MemoryStore>,
    directory: &MemoryDirectory,
    read_only: bool,
) -> String {
    let svc = Impersonation::new(Arc::clone(store), directory.clone());
    let sam = directory.get(&UserId::new("sam").unwrap()).unwrap();
    let mut request = StartRequest::new(UserId::new("olive").unwrap(), "Olive's live bookings");
    request.read_only = read_only;
    let started = svc.start(Requester::User(&sam), request).await.unwrap();
    started.secret.expose().to_owned()
}

/// The modifications and denials on the trail, by route or description.
async fn changes_on_trail(store: &Arc<MemoryStore>) -> Vec<(AuditAction, String)> {
    all_events(&**store, AuditQuery::default())
        .await
        .into_iter()
        .filter(|e| matches!(e.action, AuditAction::Modification | AuditAction::Denied))
        .map(|e| {
            let what = e
                .details
                .get("description")
                .or_else(|| e.details.get("route"))
                .unwrap_or_default()
                .to_owned();
            (e.action, what)
        })
        .collect()
}

/// A `GET` the host counts as a change still comes back as rendered now,
/// with the banner: its `If-None-Match` can only ask for a 304 (the
/// browser's copy from before the impersonation, without the banner), not
/// guard a change, so it goes as for any page.
#[tokio::test]
async fn a_get_counted_as_a_change_is_never_a_304_under_impersonation() {
    let store = Arc::new(MemoryStore::new());
    let directory = people();
    let app = app_with(&store, &directory, |layer| {
        layer.changes_when(|method, route| !method.is_safe() || route == "/report")
    });
    let secret = sams_session(&store, &directory, false).await;
    let res = app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/report")
                .header(header::HOST, "app.example")
                .header(header::IF_NONE_MATCH, "\"v1\"")
                .header(header::IF_MODIFIED_SINCE, "Mon, 07 Dec 2026 01:00:00 GMT")
                .header(header::COOKIE, format!("__Host-impersonation={secret}"))
                .header("x-test-user", "sam")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = axum::body::to_bytes(res.into_body(), 1 << 16)
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("impersonation-banner"), "{body}");
    let trail = changes_on_trail(&store).await;
    assert_eq!(trail.len(), 1, "{trail:?}");
    assert_eq!(
        trail[0],
        (AuditAction::Modification, "GET /report (200)".to_owned())
    );
}

/// An upgrade is a change whatever `changes_when` says of its method: the
/// app's filter here (`!method.is_safe()`, as the docs show) would take
/// the handshake's `GET` for a read, yet a read-only session is refused it.
#[tokio::test]
async fn an_upgrade_is_a_change_whatever_the_hosts_filter_says() {
    let store = Arc::new(MemoryStore::new());
    let directory = people();
    let app = app(&store, &directory);
    let secret = sams_session(&store, &directory, true).await;
    let here = "https://app.example";
    assert_eq!(
        status(&app, handshake(here, Some("same-origin"), &secret)).await,
        StatusCode::FORBIDDEN
    );
    let trail = changes_on_trail(&store).await;
    assert_eq!(trail.len(), 1, "{trail:?}");
    assert_eq!(trail[0].0, AuditAction::Denied);
}

/// A page of another origin (a sibling subdomain's, whose requests carry
/// the `SameSite=Strict` cookies) cannot open a WebSocket to the
/// customer's session: refused before the handler, with one record. The
/// app's own page can.
#[tokio::test]
async fn a_websocket_from_another_origin_is_refused_under_impersonation() {
    let store = Arc::new(MemoryStore::new());
    let directory = people();
    let app = app(&store, &directory);
    let secret = sams_session(&store, &directory, false).await;
    let sibling = "https://blog.app.example";
    for (origin, site) in [
        (sibling, Some("same-site")),
        (sibling, None),
        ("https://app.example", Some("same-site")),
        ("http://app.example", None),
    ] {
        assert_eq!(
            status(&app, handshake(origin, site, &secret)).await,
            StatusCode::FORBIDDEN,
            "{origin} {site:?}"
        );
    }
    let here = "https://app.example";
    assert_eq!(
        status(&app, handshake(here, Some("same-origin"), &secret)).await,
        StatusCode::OK
    );
    assert_eq!(
        changes_on_trail(&store).await,
        [
            (AuditAction::Modification, "GET /live (403)".to_owned()),
            (AuditAction::Modification, "GET /live (403)".to_owned()),
            (AuditAction::Modification, "GET /live (403)".to_owned()),
            (AuditAction::Modification, "GET /live (403)".to_owned()),
            (AuditAction::Modification, "GET /live (200)".to_owned()),
        ]
    );
    // Outside impersonation the app's own rules apply: the layer lets it be.
    let mut own = handshake(sibling, Some("same-site"), "none");
    own.headers_mut().remove(header::COOKIE);
    assert_eq!(status(&app, own).await, StatusCode::OK);
}

/// Over HTTP/2 a WebSocket opens with an extended `CONNECT` (RFC 8441): no
/// `Upgrade` header, no `Host` (the authority is the URI's). It is an
/// upgrade all the same: from another origin it is refused, from the
/// app's own page served.
#[tokio::test]
async fn an_http2_websocket_from_another_origin_is_refused_too() {
    let store = Arc::new(MemoryStore::new());
    let directory = people();
    let app = app(&store, &directory);
    let secret = sams_session(&store, &directory, false).await;
    let connect = |origin: &str, site: &str| {
        Request::builder()
            .method(Method::CONNECT)
            .version(axum::http::Version::HTTP_2)
            .uri("https://app.example/live")
            .header(header::ORIGIN, origin)
            .header("sec-fetch-site", site)
            .header(header::COOKIE, format!("__Host-impersonation={secret}"))
            .header("x-test-user", "sam")
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        status(&app, connect("https://blog.app.example", "same-site")).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(&app, connect("https://app.example", "same-origin")).await,
        StatusCode::OK
    );
    assert_eq!(
        changes_on_trail(&store).await,
        [
            (AuditAction::Modification, "CONNECT /live (403)".to_owned()),
            (AuditAction::Modification, "CONNECT /live (200)".to_owned()),
        ]
    );
}

/// A route the host leaves out of the per-request audit (`audit_when`: a
/// chatty socket, say) still has its cross-origin refusals on the trail: a
/// refusal is never left out.
#[tokio::test]
async fn a_cross_origin_upgrade_is_recorded_even_on_a_route_left_out_of_the_audit() {
    let store = Arc::new(MemoryStore::new());
    let directory = people();
    let svc = Impersonation::new(Arc::clone(&store), directory.clone());
    let app = Router::new()
        .route("/live", get(|| async { "switching" }))
        .layer(ImpersonationLayer::new(svc).audit_when(|_, route| route != "/live"))
        .layer(from_fn_with_state(directory.clone(), auth));
    let secret = sams_session(&store, &directory, false).await;
    assert_eq!(
        status(
            &app,
            handshake("https://blog.app.example", Some("same-site"), &secret)
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(
            &app,
            handshake("https://app.example", Some("same-origin"), &secret)
        )
        .await,
        StatusCode::OK
    );
    let events: Vec<_> = all_events(&*store, AuditQuery::default())
        .await
        .into_iter()
        .filter(|e| e.action == AuditAction::Modification)
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].details.get("refused"),
        Some("cross_origin_upgrade")
    );
}
