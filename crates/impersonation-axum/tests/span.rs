//! The request's tracing span names the agent, the customer and the
//! session. A binary of its own: it installs a subscriber, and tracing's
//! per-callsite interest cache must not have been filled by other tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{Next, from_fn};
use axum::routing::get;
use impersonation_axum::{EffectiveUser, ImpersonationLayer};
use impersonation_core::{
    Impersonation, MemoryDirectory, MemoryStore, Principal, Requester, StartRequest, Started,
    Store, TenantId, UserId,
};
use tower::ServiceExt;
use tracing_subscriber::layer::SubscriberExt;

/// A span's or event's fields, each as its `Debug` text.
#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// Sam, an agent, and Olive, a customer, both holding `permission`, in a
/// directory.
fn sam_and_olive(permission: &str) -> (Principal, Principal, MemoryDirectory) {
    let tenant = TenantId::new("t").unwrap();
    let sam = Principal::new(UserId::new("sam").unwrap(), "Sam", tenant.clone())
        .with_permissions(["impersonation:start", permission]);
    let olive = Principal::new(UserId::new("olive").unwrap(), "Olive", tenant)
        .with_permissions([permission]);
    let directory = MemoryDirectory::new();
    directory.insert(sam.clone());
    directory.insert(olive.clone());
    (sam, olive, directory)
}

/// Sam starts impersonating Olive.
async fn sam_on_olive<S: Store>(
    service: &Impersonation<S, MemoryDirectory>,
    sam: &Principal,
    olive: &Principal,
) -> Started {
    service
        .start(
            Requester::User(sam),
            StartRequest::new(olive.id.clone(), "Bookings page is empty"),
        )
        .await
        .unwrap()
}

/// Records the fields of every span named `impersonation.request`.
#[derive(Clone, Default)]
struct SpanFields(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanFields {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "impersonation.request" {
            let mut fields = Fields::default();
            attrs.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_request_span_names_agent_subject_and_session() {
    let spans = SpanFields::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let (sam, olive, directory) = sam_and_olive("bookings:read");
    let service = Impersonation::new(MemoryStore::new(), directory);
    let started = sam_on_olive(&service, &sam, &olive).await;
    let agent = sam.clone();
    let app = Router::new()
        .route(
            "/",
            get(|u: EffectiveUser| async move { u.display_name().to_owned() }),
        )
        .layer(ImpersonationLayer::new(service))
        .layer(from_fn(move |mut req: Request, next: Next| {
            req.extensions_mut().insert(agent.clone());
            next.run(req)
        }));
    let plain = Request::get("/").body(Body::empty()).unwrap();
    assert_eq!(
        app.clone().oneshot(plain).await.unwrap().status(),
        StatusCode::OK
    );
    assert!(
        spans.0.lock().unwrap().is_empty(),
        "no span outside impersonation"
    );

    let bearer = format!("Bearer {}", started.secret.expose());
    let req = Request::get("/")
        .header(header::AUTHORIZATION, bearer)
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.oneshot(req).await.unwrap().status(), StatusCode::OK);
    let recorded = spans.0.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["impersonation.agent"], "sam");
    assert_eq!(recorded[0]["impersonation.subject"], "olive");
    assert_eq!(
        recorded[0]["impersonation.session"],
        started.session.id.to_string()
    );
}

/// Records the fields of every event of one level.
#[derive(Clone)]
struct Events {
    level: tracing::Level,
    seen: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
}

impl Events {
    fn at(level: tracing::Level) -> Self {
        Self {
            level,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<BTreeMap<String, String>> {
        self.seen.lock().unwrap().clone()
    }
}

impl<S> tracing_subscriber::Layer<S> for Events
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == self.level {
            let mut fields = Fields::default();
            event.record(&mut fields);
            // The span it was logged in, under a name no field has.
            if let Some(span) = ctx.event_span(event) {
                fields.0.insert("(span)".into(), span.name().to_owned());
            }
            self.seen.lock().unwrap().push(fields.0);
        }
    }
}

/// A change made under impersonation whose audit write fails is on no
/// trail: the error logged names everything the trail would have shown.
#[tokio::test(flavor = "current_thread")]
async fn a_change_that_cannot_be_audited_is_logged_with_all_the_trail_would_show() {
    use impersonation_testkit::faults::{FaultyStore, When};

    let errors = Events::at(tracing::Level::ERROR);
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(errors.clone()));
    let (sam, olive, directory) = sam_and_olive("bookings:write");
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let service = Impersonation::new(Arc::clone(&store), directory);
    let started = sam_on_olive(&service, &sam, &olive).await;
    let app = Router::new()
        .route(
            "/bookings/{id}",
            axum::routing::post(move || async move {
                // The booking is saved; the store fails before the audit.
                store.fail_next_write(When::Before);
                "saved"
            }),
        )
        .layer(ImpersonationLayer::new(service));
    let req = Request::post("/bookings/7")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", started.secret.expose()),
        )
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.oneshot(req).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let logged = errors.seen();
    let line = logged
        .iter()
        .find(|e| e["message"] == "could not audit an impersonated request")
        .unwrap_or_else(|| panic!("{logged:?}"));
    for (field, value) in [
        ("change", "true".to_owned()),
        ("session", started.session.id.to_string()),
        ("agent", "sam".into()),
        ("subject", "olive".into()),
        ("method", "POST".into()),
        ("route", "\"/bookings/{id}\"".into()),
        ("status", "200".into()),
    ] {
        assert_eq!(line[field], value, "{field}: {line:?}");
    }
}

/// A response under impersonation that a browser may show as a page but
/// the banner cannot go into (no `Content-Type` or an "unknown" one, which
/// browsers sniff, XHTML with no body, an encoding that switches modes, a
/// `Content-Range` on a status a browser shows whole) is served as it is,
/// with a warning naming the route and why; an empty answer of no type is
/// no page and gets none.
#[tokio::test(flavor = "current_thread")]
async fn a_page_the_banner_cannot_go_into_is_served_with_a_warning() {
    let warnings = Events::at(tracing::Level::WARN);
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let (sam, olive, directory) = sam_and_olive("bookings:read");
    let service = Impersonation::new(MemoryStore::new(), directory);
    let started = sam_on_olive(&service, &sam, &olive).await;
    let app = Router::new()
        .route(
            "/untyped",
            get(|| async { axum::response::Response::new(Body::from("<p>bookings</p>")) }),
        )
        .route(
            "/xhtml",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/xhtml+xml")],
                    "<html xmlns=\"http://www.w3.org/1999/xhtml\"><p>no body</p></html>",
                )
            }),
        )
        .route(
            "/xhtml-jis",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/xhtml+xml")],
                    "<?xml version=\"1.0\" encoding=\"ISO-2022-JP\"?>\
                     <html xmlns=\"http://www.w3.org/1999/xhtml\"><body></body></html>",
                )
            }),
        )
        .route(
            "/sniffed",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/unknown")],
                    "<!doctype html><html><body>x</body></html>",
                )
            }),
        )
        .route(
            "/ranged",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/html"),
                        (header::CONTENT_RANGE, "bytes */100"),
                    ],
                    "<html><body>x</body></html>",
                )
            }),
        )
        .route("/empty", get(|| async {}))
        .layer(ImpersonationLayer::new(service));
    let bearer = format!("Bearer {}", started.secret.expose());
    for path in [
        "/untyped",
        "/xhtml",
        "/xhtml-jis",
        "/sniffed",
        "/ranged",
        "/empty",
    ] {
        let req = Request::get(path)
            .header(header::AUTHORIZATION, &bearer)
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("impersonation-banner"));
    }
    let logged = warnings.seen();
    let served_without: Vec<(&str, &str)> = logged
        .iter()
        .filter(|e| e["message"] == "an impersonated HTML page is served without the banner")
        .map(|e| (e["route"].as_str(), e["why"].as_str()))
        .collect();
    assert_eq!(
        served_without,
        [
            (
                "\"/untyped\"",
                "\"the response has no Content-Type (a browser may take it for a page)\""
            ),
            (
                "\"/xhtml\"",
                "\"the XHTML page has no body element the banner can go into\""
            ),
            (
                "\"/xhtml-jis\"",
                "\"the XHTML page's declared encoding is not one known to keep ASCII as ASCII\""
            ),
            (
                "\"/sniffed\"",
                "\"the response's Content-Type leaves its type to the browser (it may take it for a page)\""
            ),
            ("\"/ranged\"", "\"the page carries a Content-Range\""),
        ],
        "{logged:?}"
    );
    // Each names the session too, and is logged in the request's span,
    // which names the agent and the customer, though the handler has
    // answered by then.
    let session = started.session.id.to_string();
    assert!(
        logged
            .iter()
            .filter(|e| e["message"] == "an impersonated HTML page is served without the banner")
            .all(|e| e.get("session") == Some(&session)
                && e.get("(span)").map(String::as_str) == Some("impersonation.request")),
        "{logged:?}"
    );
}
