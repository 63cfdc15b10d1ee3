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
use impersonation_oidc::openidconnect::{ClientId, IdTokenVerifier, IssuerUrl, Nonce};
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
