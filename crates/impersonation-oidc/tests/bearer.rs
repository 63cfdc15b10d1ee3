//! The Axum binding with impersonation tokens as bearer credentials: the
//! same context as the cookie path, each request audited once, and the
//! bearer-outlives-stop class of bug: after stop or revoke, the very next
//! request with the token gets 401. The agent's own token never carries
//! the customer's rights.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::Response;
use axum::routing::get;
use common::*;
use impersonation_axum::{EffectiveUser, ImpersonationLayer};
use impersonation_core::{AuditAction, AuditQuery, MemoryDirectory, UserId};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;

/// The host app's own authentication, as a test stands in for it: a
/// provider token (issuer `OP`) signs its subject in. Impersonation tokens
/// are not the host's business.
async fn host_auth(
    State(directory): State<MemoryDirectory>,
    mut req: Request,
    next: Next,
) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    if let Some(token) = bearer
        && token.split('.').count() == 3
    {
        let (_, claims) = decode(&token);
        if claims["iss"] == OP
            && let Some(user) = claims["sub"].as_str().and_then(|s| UserId::new(s).ok())
            && let Some(p) = directory.get(&user)
        {
            req.extensions_mut().insert(p);
        }
    }
    next.run(req).await
}

struct Fixture {
    served: Served,
    op: Forger,
    app: Router,
    /// How many changes the app's handler has made.
    changes: Arc<AtomicUsize>,
}

async fn fixture() -> Fixture {
    let (op, provider) = forged_provider();
    let served = serve_issuer(provider).await;
    let changes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&changes);
    let app = Router::new()
        .route(
            "/bookings",
            get(|user: EffectiveUser| async move {
                format!(
                    "bookings of {} (shadow: {})",
                    user.display_name(),
                    user.is_shadow()
                )
            })
            .post(move || async move {
                counter.fetch_add(1, Ordering::SeqCst);
                "booked"
            }),
        )
        .nest("/impersonation", impersonation_axum::routes())
        .layer(
            ImpersonationLayer::new(served.service.clone())
                .accept_tokens(served.issuer.verifier(API)),
        )
        .layer(from_fn_with_state(served.directory.clone(), host_auth));
    Fixture {
        served,
        op,
        app,
        changes,
    }
}

impl Fixture {
    async fn token(&self) -> String {
        let actor = self.op.op_token("sam", |_, _| {});
        let (status, body) = exchange(&self.served.url, &form(&actor, "olive")).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn get(&self, bearer: &str) -> (StatusCode, String, Option<String>) {
        self.call(Request::get("/bookings"), bearer).await
    }

    async fn post(&self, bearer: &str) -> StatusCode {
        self.call(Request::post("/bookings"), bearer).await.0
    }

    async fn call(
        &self,
        request: axum::http::request::Builder,
        bearer: &str,
    ) -> (StatusCode, String, Option<String>) {
        let response = self
            .app
            .clone()
            .oneshot(
                request
                    .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let cache = response
            .headers()
            .get(header::CACHE_CONTROL)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap(), cache)
    }

    async fn accesses(&self) -> usize {
        impersonation_testkit::conformance::all_events(
            self.served.service.store(),
            AuditQuery {
                action: Some(AuditAction::Access),
                ..AuditQuery::default()
            },
        )
        .await
        .len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impersonation_token_is_served_as_the_customer_and_audited_once_a_request() {
    let f = fixture().await;
    let token = f.token().await;
    for n in 1..=3 {
        let (status, body, cache) = f.get(&token).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "bookings of Customer olive (shadow: true)");
        assert_eq!(cache.as_deref(), Some("no-store"));
        assert_eq!(f.accesses().await, n);
    }
    let events = impersonation_testkit::conformance::all_events(
        f.served.service.store(),
        AuditQuery {
            action: Some(AuditAction::Access),
            ..AuditQuery::default()
        },
    )
    .await;
    assert!(events.iter().all(|e| {
        e.actor.id().map(|a| a.as_str()) == Some("sam")
            && e.subject.as_ref().map(|s| s.id.as_str()) == Some("olive")
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_stop_the_token_gets_401_on_the_next_request() {
    let f = fixture().await;
    let token = f.token().await;
    assert_eq!(f.get(&token).await.0, StatusCode::OK);
    assert_eq!(revoke(&f.served.url, &token, true).await, 200);
    let (status, body, _) = f.get(&token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(!body.contains("olive"));
}

/// The SDK's stop route, given the token: the session it names ends (by
/// its agent, on the trail), and the token gets 401 after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_route_ends_the_session_a_token_names() {
    let f = fixture().await;
    let token = f.token().await;
    assert_eq!(f.get(&token).await.0, StatusCode::OK);
    let (status, body, cache) = f.call(Request::post("/impersonation/stop"), &token).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(cache.as_deref(), Some("no-store"));
    assert_eq!(f.get(&token).await.0, StatusCode::UNAUTHORIZED);
    let ended = impersonation_testkit::conformance::all_events(
        f.served.service.store(),
        AuditQuery {
            action: Some(AuditAction::SessionEnded),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].actor.id().map(|a| a.as_str()), Some("sam"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_revocation_the_token_gets_401_on_the_next_request() {
    let f = fixture().await;
    let token = f.token().await;
    assert_eq!(f.get(&token).await.0, StatusCode::OK);
    // An administrator (here: host code) revokes every session of the agent.
    f.served
        .service
        .revoke_all_for_agent(
            &UserId::new("sam").unwrap(),
            impersonation_core::Initiator::System,
            "agent left the team",
        )
        .await
        .unwrap();
    assert_eq!(f.get(&token).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_token_never_carries_the_customers_rights() {
    let f = fixture().await;
    let impersonating = f.token().await;
    // The agent's provider token, even while a session runs: the agent.
    let own = f.op.op_token("sam", |_, _| {});
    let (status, body, _) = f.get(&own).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "bookings of Agent sam (shadow: false)");
    // A provider token of the customer herself is hers, not an impersonation.
    let olive = f.op.op_token("olive", |_, _| {});
    assert_eq!(
        f.get(&olive).await.1,
        "bookings of Customer olive (shadow: false)"
    );
    // And a forged impersonation token is refused outright: one right in
    // every respect but its signature (the genuine token's header, with
    // `typ` and the issuer's `kid`, and its claims, naming the live
    // session), signed by another key, or with its signature altered.
    assert_eq!(f.get(&impersonating).await.0, StatusCode::OK);
    let (header, claims) = decode(&impersonating);
    assert_eq!(
        (&header["typ"], &header["kid"]),
        (
            &serde_json::json!("at+jwt"),
            &serde_json::json!(f.served.issuer.keys().current().kid())
        )
    );
    let another_key = Forger { key: rsa_key().0 };
    let (signed, signature) = impersonating.rsplit_once('.').unwrap();
    let altered = if signature.starts_with('A') { "B" } else { "A" };
    for forged in [
        another_key.sign(&header, &claims),
        format!("{signed}.{altered}{}", &signature[1..]),
    ] {
        let refused = f.served.issuer.verifier(API).verify(&forged);
        assert!(
            matches!(&refused, Err(impersonation_oidc::TokenError::Signature(why)) if why.starts_with("Crypto error")),
            "{refused:?}"
        );
        let (status, body, _) = f.get(&forged).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(!body.contains("olive"), "{body}");
    }
    assert_eq!(f.get(&impersonating).await.0, StatusCode::OK);
}

/// A token that names this issuer is this issuer's to judge, however
/// malformed its other claims or however long it is: refused (401), not
/// handed on to the host's own authentication as another issuer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_token_of_this_issuer_is_refused_not_handed_on() {
    use impersonation_core::{Error, TokenResolver};
    let f = fixture().await;
    let genuine = f.token().await;
    let (header, claims) = decode(&genuine);
    let ours = Forger { key: rsa_key().0 };
    let with = |name: &str, value: serde_json::Value| {
        let mut claims = claims.clone();
        claims[name] = value;
        ours.sign(&header, &claims)
    };
    let verifier = f.served.issuer.verifier(API);
    for (case, token) in [
        ("exp a string", with("exp", serde_json::json!("x"))),
        ("exp a fraction", with("exp", serde_json::json!(1.7e9))),
        (
            "too long to verify",
            with("pad", serde_json::json!("p".repeat(9_000))),
        ),
    ] {
        assert!(verifier.is_from_issuer(&token), "{case}");
        assert!(
            matches!(
                verifier.resolve_token(&token).await,
                Some(Err(Error::Unauthenticated))
            ),
            "{case}"
        );
        let (status, body, _) = f.get(&token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {body}");
    }
    // Another issuer's token, or a bearer value that is no token, is not
    // this issuer's.
    assert!(!verifier.is_from_issuer(&f.op.op_token("sam", |_, _| {})));
    assert!(!verifier.is_from_issuer("not.a.token"));
    assert!(!verifier.is_from_issuer(&format!("{genuine}{}", "A".repeat(70_000))));
}

/// As with a cookie: a read by token may be answered from a session this
/// process resolved a moment ago, but its audit write checks the store, so
/// a session another process ended is not served; a change by token reads
/// the store first and is never made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_another_process_stops_the_session_no_read_is_served_and_no_change_is_made() {
    let f = fixture().await;
    let token = f.token().await;
    assert_eq!(f.get(&token).await.0, StatusCode::OK);
    assert_eq!(f.post(&token).await, StatusCode::OK);
    assert_eq!(f.changes.load(Ordering::SeqCst), 1);
    // A second process of the app, on the same store, stops the session.
    let other = impersonation_core::Impersonation::new(
        f.served.service.store().clone(),
        f.served.directory.clone(),
    );
    let (_, claims) = decode(&token);
    let session = claims["sid"].as_str().unwrap().parse().unwrap();
    let sam = f
        .served
        .directory
        .get(&UserId::new("sam").unwrap())
        .unwrap();
    other.stop_session(session, &sam).await.unwrap();
    // The change is refused before the handler runs.
    assert_eq!(f.post(&token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(f.changes.load(Ordering::SeqCst), 1);
    let (status, body, _) = f.get(&token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(!body.contains("olive"));
}
