//! Interop with a real OpenID provider no one here wrote (`oidc-provider`):
//! the agent's access token comes from it, our issuer accepts it, and our
//! tokens are verified by the `openidconnect` crate as an ordinary relying
//! party, by discovery on our issuer. The client part exchanges against the
//! provider's own token-exchange grant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::str::FromStr;

use common::*;
use impersonation_core::{AuditAction, AuditQuery};
use impersonation_oidc::openidconnect::core::CoreProviderMetadata;
use impersonation_oidc::openidconnect::{
    ClientId, IdTokenVerifier, IssuerUrl, JsonWebTokenType, Nonce,
};
use impersonation_oidc::{
    ExchangeClient, ExternalExchange, ImpersonationToken, Provider, Subject, http_client,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_token_from_a_real_provider_becomes_an_impersonation_token_a_relying_party_verifies()
 {
    let op = TestProvider::start().await;
    let provider = Provider::discover(&op.issuer, API, http_client().unwrap())
        .await
        .unwrap();
    let served = serve_issuer(provider).await;
    let sam = op.token_for("sam").await;

    let (status, body) = exchange(&served.url, &form(&sam, "olive")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert!(body.get("refresh_token").is_none(), "no refresh token");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((1..=300).contains(&expires_in), "{expires_in}");
    let token = body["access_token"].as_str().unwrap();

    // An ordinary relying party: discovery on our issuer, then its JWKS.
    let http = http_client().unwrap();
    let metadata =
        CoreProviderMetadata::discover_async(IssuerUrl::new(served.url.clone()).unwrap(), &http)
            .await
            .unwrap();
    let verifier = IdTokenVerifier::new_public_client(
        ClientId::new(API.into()),
        metadata.issuer().clone(),
        metadata.jwks().clone(),
    );
    let parsed = ImpersonationToken::from_str(token).unwrap();
    // Typed as an access token (RFC 9068), it is not taken for an ID
    // token, which is what the crate's verifier checks by default...
    assert!(
        parsed
            .claims(&verifier, |_: Option<&Nonce>| Ok(()))
            .is_err()
    );
    // ...and verifies once the relying party accepts access tokens.
    let verifier =
        verifier.set_allowed_jose_types(JsonWebTokenType::new("at+jwt".into()).normalize().ok());
    let claims = parsed
        .claims(&verifier, |_: Option<&Nonce>| Ok(()))
        .unwrap();
    assert_eq!(claims.subject().as_str(), "olive");
    assert_eq!(claims.additional_claims().act.sub, "sam");
    assert_eq!(claims.issuer().as_str(), served.url);
    let sid = &claims.additional_claims().sid;

    // The session started, with its audit event naming both.
    let started = impersonation_testkit::conformance::all_events(
        served.service.store(),
        AuditQuery {
            action: Some(AuditAction::SessionStarted),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(started.len(), 1);
    assert_eq!(
        started[0].session.map(|s| s.to_string()).as_ref(),
        Some(sid)
    );
    assert_eq!(started[0].actor.id().map(|a| a.as_str()), Some("sam"));

    // Our own verifier agrees, and sees the session end on stop.
    let ctx = served.issuer.verifier(API).authorize(token).await.unwrap();
    assert_eq!(ctx.subject().as_str(), "olive");
    assert_eq!(ctx.agent().id.as_str(), "sam");
}

/// An issuer that takes actor tokens only from the support console's own
/// front end, granting `impersonate`: the agent's token without that
/// scope, or from another app of the same API, starts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_requiring_a_scope_and_a_client_takes_only_such_actor_tokens() {
    let op = TestProvider::start().await;
    let provider = Provider::discover(&op.issuer, API, http_client().unwrap())
        .await
        .unwrap();
    let served = serve_issuer_with(provider, |config| {
        config
            .require_actor_client("console-ui")
            .require_actor_scope("impersonate")
            .unwrap()
    })
    .await;
    let console = ("console-ui", "console-ui-secret");
    let other_app = ("agent-app", "agent-app-secret");

    let refused = [
        (
            op.token_from(console, "sam", "api").await,
            "scope `impersonate`",
        ),
        // A scope value that only begins with the one required.
        (
            op.token_from(console, "sam", "api impersonate:read").await,
            "scope `impersonate`",
        ),
        (
            op.token_from(other_app, "sam", "api impersonate").await,
            "not issued to a client",
        ),
    ];
    for (token, says) in &refused {
        let (status, body) = exchange(&served.url, &form(token, "olive")).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "invalid_request", "{body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(description.starts_with("actor_token: "), "{description}");
        assert!(description.contains(says), "{description}");
    }
    let trail = impersonation_testkit::conformance::all_events(
        served.service.store(),
        AuditQuery::default(),
    )
    .await;
    assert!(
        trail.is_empty(),
        "a refused actor token started nothing: {trail:?}"
    );

    let token = op.token_from(console, "sam", "api impersonate").await;
    let (status, body) = exchange(&served.url, &form(&token, "olive")).await;
    assert_eq!(status, 200, "{body}");
    let ctx = served
        .issuer
        .verifier(API)
        .authorize(body["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(ctx.agent().id.as_str(), "sam");
    assert_eq!(ctx.subject().as_str(), "olive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_part_exchanges_at_a_real_provider_and_reads_its_act_claim() {
    let op = TestProvider::start().await;
    let sam = op.token_for("sam").await;
    let client = ExchangeClient::new(
        &format!("{}/token", op.issuer),
        "agent-app",
        "agent-app-secret",
        http_client().unwrap(),
    )
    .unwrap();
    let issued = client
        .exchange(&ExternalExchange {
            actor_token: sam,
            subject: Some(Subject::Requested("olive".into())),
            audiences: vec![API.into()],
            extra: vec![("reason".into(), "Bookings page is empty".into())],
            ..ExternalExchange::default()
        })
        .await
        .unwrap();
    assert_eq!(issued.token_type, "Bearer");
    let provider = Provider::discover(&op.issuer, API, http_client().unwrap())
        .await
        .unwrap();
    let (subject, actor) = issued.subject_and_actor(&provider).await.unwrap();
    assert_eq!(subject, "olive");
    assert_eq!(actor.unwrap().sub, "sam");

    // The provider's refusal comes back as its RFC 6749 error.
    let refused = client
        .exchange(&ExternalExchange {
            actor_token: "not-a-token".into(),
            subject: Some(Subject::Requested("olive".into())),
            ..ExternalExchange::default()
        })
        .await
        .unwrap_err();
    match refused {
        impersonation_oidc::OidcError::Refused { error, .. } => assert_eq!(error, "invalid_grant"),
        other => panic!("{other:?}"),
    }
}

/// Between us and the real provider: passes its discovery document and
/// JWKS through, counts the JWKS fetches, and on cue answers the JWKS with
/// no key at all (the provider stopped publishing its key: rotated out,
/// or compromised).
struct KeysProxy {
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    withdrawn: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl KeysProxy {
    fn serve(listener: tokio::net::TcpListener, upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        let proxy = Self {
            fetches: Default::default(),
            withdrawn: Default::default(),
        };
        let (fetches, withdrawn) = (proxy.fetches.clone(), proxy.withdrawn.clone());
        let http = http_client().unwrap();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
                let (fetches, withdrawn, http, upstream) = (
                    fetches.clone(),
                    withdrawn.clone(),
                    http.clone(),
                    upstream.clone(),
                );
                async move {
                    if uri.path().ends_with("/jwks") {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        if withdrawn.load(Ordering::SeqCst) {
                            return (
                                [("content-type", "application/json".to_owned())],
                                br#"{"keys":[]}"#.to_vec(),
                            );
                        }
                    }
                    // The provider names its endpoints by the Host it is
                    // asked at: the proxy's, so that they lead back here.
                    let mut ask = http.get(format!("{upstream}{uri}"));
                    if let Some(host) = headers.get("host") {
                        ask = ask.header("host", host.clone());
                    }
                    let answer = ask.send().await.unwrap();
                    let kind = answer
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("application/json")
                        .to_owned();
                    (
                        [("content-type", kind)],
                        answer.bytes().await.unwrap().to_vec(),
                    )
                }
            },
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        proxy
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn withdraw(&self) {
        self.withdrawn
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The provider's keys are fetched again once older than their maximum age
/// (`Provider::jwks_max_age`, ten minutes by default), so a key the
/// provider stopped publishing is refused from then on, not trusted until
/// the process restarts (a known key id never asks for a fetch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_provider_stopped_publishing_is_refused_once_the_keys_are_old() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let op = TestProvider::start_as(Some(&url)).await;
    let proxy = KeysProxy::serve(listener, op.direct.clone());
    // The token first, so that the steps timed against the keys' age are
    // only verifications.
    let sam = op.token_for("sam").await;
    let max_age = std::time::Duration::from_secs(5);
    let provider = Provider::discover(&url, API, http_client().unwrap())
        .await
        .unwrap()
        .jwks_max_age(max_age);
    let now = time::OffsetDateTime::now_utc();
    assert_eq!(provider.user_of(&sam, now).await.unwrap().as_str(), "sam");
    let fetched = proxy.fetches();
    assert!(fetched >= 1, "discovery fetched the keys through the proxy");

    proxy.withdraw();
    // Within their age, the keys held serve, and nothing is fetched.
    assert!(provider.user_of(&sam, now).await.is_ok());
    assert_eq!(proxy.fetches(), fetched);
    // Older: fetched again, and the key is gone.
    tokio::time::sleep(max_age + std::time::Duration::from_millis(200)).await;
    let refused = provider.user_of(&sam, now).await;
    assert!(
        matches!(refused, Err(impersonation_oidc::TokenError::Signature(_))),
        "{refused:?}"
    );
    assert_eq!(proxy.fetches(), fetched + 1);
}
