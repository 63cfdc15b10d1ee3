//! The issuer's own promises: key rotation with two keys live and `kid`
//! chosen, the JWKS and discovery it publishes, and a token that never
//! outlives its session.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use impersonation_core::{Impersonation, MemoryStore};
use impersonation_oidc::{
    ClientRegistration, Issuer, IssuerConfig, KeyRing, SigningKey, TokenError,
};

/// An exchange of Sam's provider token for an impersonation token on Olive.
async fn sams_token_for_olive(op: &Forger, served: &Served) -> String {
    let actor = op.op_token("sam", |_, _| {});
    let (status, body) = exchange(&served.url, &form(&actor, "olive")).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// Sam stops the session of `ctx` (one agent, one live session: before a
/// second exchange).
async fn sam_stops(served: &Served, ctx: &impersonation_core::Context) {
    let sam = served
        .directory
        .get(&impersonation_core::UserId::new("sam").unwrap())
        .unwrap();
    served
        .service
        .stop_session(ctx.session(), &sam)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_with_two_live_and_the_kid_naming_the_signer() {
    let (op, provider) = forged_provider();
    let served = serve_issuer(provider).await;
    let verifier = served.issuer.verifier(API);
    let issue = || sams_token_for_olive(&op, &served);
    let before = issue().await;
    let first_kid = served.issuer.keys().current().kid().to_owned();
    assert_eq!(decode(&before).0["kid"], first_kid.as_str());

    // Rotate: new tokens name the new key, the old token still verifies,
    // and the JWKS publishes both.
    served.issuer.keys().rotate(SigningKey::generate().unwrap());
    let second_kid = served.issuer.keys().current().kid().to_owned();
    assert_ne!(first_kid, second_kid);
    let jwks: serde_json::Value = serde_json::from_str(&served.issuer.jwks_json()).unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [second_kid.as_str(), first_kid.as_str()]);
    // The key signing now, given again (a reloaded key file), changes
    // nothing: the same kid published twice would make tokens ambiguous.
    served.issuer.keys().rotate(served.issuer.keys().current());
    let again: serde_json::Value = serde_json::from_str(&served.issuer.jwks_json()).unwrap();
    assert_eq!(again, jwks, "the same two keys");
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("d").is_none()),
        "public keys only"
    );
    verifier.verify(&before).unwrap();
    // One agent, one live session: end the first before a second exchange.
    let ctx = verifier.authorize(&before).await.unwrap();
    sam_stops(&served, &ctx).await;
    let after = issue().await;
    assert_eq!(decode(&after).0["kid"], second_kid.as_str());
    verifier.verify(&after).unwrap();

    // Retire the old key: tokens it signed are refused, the new ones not.
    served.issuer.keys().retire_previous();
    assert!(matches!(
        verifier.verify(&before),
        Err(TokenError::Signature(_))
    ));
    verifier.verify(&after).unwrap();
}

/// A resource server in another process follows the issuer's key
/// rotation: `TokenVerifier::fetch` takes the published JWKS, fetches it
/// again when a token names a key it has not seen, and drops a retired key
/// once its copy is older than its maximum age. A verifier built with
/// `new` keeps the keys it was given and refuses the new key's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_in_another_process_follows_the_issuers_rotation() {
    use impersonation_oidc::TokenVerifier;
    use impersonation_oidc::openidconnect::IssuerUrl;
    let (op, provider) = forged_provider();
    let served = serve_issuer(provider).await;
    let api = served.service.clone() as Arc<dyn impersonation_core::ImpersonationApi>;
    let issuer_url = IssuerUrl::new(served.url.clone()).unwrap();
    let lifetime = time::Duration::minutes(5);
    let fetching = || {
        TokenVerifier::fetch(
            issuer_url.clone(),
            API,
            impersonation_oidc::http_client().unwrap(),
            lifetime,
            api.clone(),
        )
    };
    // One that keeps its keys ten minutes (only a new key id makes it
    // fetch again during this test), one that keeps them a second.
    let rotating = fetching().await.unwrap();
    let aging = fetching()
        .await
        .unwrap()
        .jwks_max_age(std::time::Duration::from_secs(1));
    // Given the issuer's address with a trailing `/`, which its tokens'
    // `iss` leaves out.
    let fixed = TokenVerifier::new(
        IssuerUrl::new(format!("{}/", served.url)).unwrap(),
        API,
        serde_json::from_str(&served.issuer.jwks_json()).unwrap(),
        lifetime,
        api.clone(),
    );
    let issue = || sams_token_for_olive(&op, &served);

    let before = issue().await;
    let ctx = rotating.authorize(&before).await.unwrap();
    fixed.authorize(&before).await.unwrap();
    sam_stops(&served, &ctx).await;

    served.issuer.keys().rotate(SigningKey::generate().unwrap());
    let after = issue().await;
    assert!(matches!(
        fixed.verify(&after),
        Err(TokenError::Signature(_))
    ));
    let ctx = rotating.authorize(&after).await.unwrap();
    rotating.verify(&before).unwrap();
    sam_stops(&served, &ctx).await;

    // Retired on the issuer: refused once the copy is older than its age
    // (a known key id never asks for a fetch).
    served.issuer.keys().retire_previous();
    aging.verify(&before).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(matches!(
        aging.authorize(&before).await,
        Err(TokenError::Signature(_))
    ));
    aging.verify(&after).unwrap();
    rotating.verify(&before).unwrap();
}

/// An issuer of tokens lasting `lifetime`, over `service`, with one client.
fn issuer_lasting(
    lifetime: time::Duration,
    provider: impersonation_oidc::Provider,
    service: Arc<Impersonation<MemoryStore, impersonation_core::MemoryDirectory>>,
) -> Issuer {
    let url = format!("http://127.0.0.1:{}", free_port());
    Issuer::new(
        IssuerConfig::new(&url)
            .unwrap()
            .token_lifetime(lifetime)
            .client(ClientRegistration::new(CLIENT, CLIENT_SECRET, [API])),
        KeyRing::new(SigningKey::generate().unwrap()),
        provider,
        service,
    )
}

/// Exchanges Sam's provider token for a token on Olive at `issuer`: the
/// token and its claims.
async fn exchange_sam_for_olive(issuer: &Issuer, op: &Forger) -> (String, serde_json::Value) {
    let actor = op.op_token("sam", |_, _| {});
    let body = encode(&form(&actor, "olive"));
    let answer = issuer
        .exchange(Some(&basic(CLIENT, CLIENT_SECRET)), body.as_bytes())
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let issued: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    let token = issued["access_token"].as_str().unwrap().to_owned();
    let (_, claims) = decode(&token);
    (token, claims)
}

/// A JWT's times are whole seconds, so a lifetime with a fraction of one
/// is rounded up: a token issued late in a second (here at .6 s, with
/// 90.5 s to live) verifies. Before, its `exp` fell 91 s after its `iat`,
/// past the 90 s the verifier allowed, and it was refused on every
/// request, and by the revocation endpoint too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifetime_with_a_fraction_of_a_second_issues_tokens_that_verify() {
    let (op, provider) = forged_provider();
    let second = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let clock = impersonation_core::ManualClock::new(second + time::Duration::milliseconds(600));
    let service = Arc::new(Impersonation::new(MemoryStore::new(), directory()).with_clock(clock));
    let issuer = issuer_lasting(time::Duration::milliseconds(90_500), provider, service);
    let (token, claims) = exchange_sam_for_olive(&issuer, &op).await;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        91
    );
    issuer.verifier(API).authorize(&token).await.unwrap();

    // "As long as the session" (`Duration::MAX`): not an overflow, and not
    // a one-second token.
    let (op, provider) = forged_provider();
    let service = Arc::new(Impersonation::new(MemoryStore::new(), directory()));
    let issuer = issuer_lasting(time::Duration::MAX, provider, service);
    let (_, claims) = exchange_sam_for_olive(&issuer, &op).await;
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!(lifetime > 60, "{lifetime} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_never_outlives_its_session() {
    let (op, provider) = forged_provider();
    let directory = directory();
    let service = Arc::new(
        Impersonation::new(MemoryStore::new(), directory).with_policy(
            impersonation_core::Policy::default().max_duration(time::Duration::minutes(20)),
        ),
    );
    let url = format!("http://127.0.0.1:{}", free_port());
    let issuer = Issuer::new(
        IssuerConfig::new(&url)
            .unwrap()
            .token_lifetime(time::Duration::hours(2))
            .client(ClientRegistration::new(CLIENT, CLIENT_SECRET, [API])),
        KeyRing::new(SigningKey::generate().unwrap()),
        provider,
        service.clone(),
    );
    let actor = op.op_token("sam", |_, _| {});
    let body = encode(&form(&actor, "olive"));
    let answer = issuer
        .exchange(Some(&basic(CLIENT, CLIENT_SECRET)), body.as_bytes())
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let issued: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    // A logged answer (`?response`) does not carry the token.
    let shown = format!("{answer:?}");
    assert!(
        !shown.contains(issued["access_token"].as_str().unwrap()),
        "{shown}"
    );
    let (_, claims) = decode(issued["access_token"].as_str().unwrap());
    let ctx = issuer
        .verifier(API)
        .authorize(issued["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap(),
        ctx.expires_at().unix_timestamp(),
        "exp is the session's end, not the two hours asked for"
    );
    assert!(issued["expires_in"].as_i64().unwrap() <= 20 * 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_names_the_endpoints_and_the_one_algorithm() {
    let (_, provider) = forged_provider();
    let served = serve_issuer(provider).await;
    let doc: serde_json::Value =
        serde_json::from_str(&served.issuer.discovery_json().unwrap()).unwrap();
    assert_eq!(doc["issuer"], served.url.as_str());
    assert_eq!(doc["token_endpoint"], format!("{}/token", served.url));
    assert_eq!(doc["revocation_endpoint"], format!("{}/revoke", served.url));
    assert_eq!(doc["jwks_uri"], format!("{}/jwks.json", served.url));
    assert_eq!(
        doc["grant_types_supported"],
        serde_json::json!(["urn:ietf:params:oauth:grant-type:token-exchange"])
    );
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256"])
    );
    // The authorize route OpenID discovery requires refuses politely, and
    // no response type is advertised for it.
    assert_eq!(doc["response_types_supported"], serde_json::json!([]));
    let answer = impersonation_oidc::http_client()
        .unwrap()
        .get(format!("{}/authorize", served.url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
}

/// A `scope` narrows the session to those permissions, and the token and
/// the response say what was granted. A scope beyond the agent's
/// permissions, or not a scope at all, is `invalid_scope`, and starts
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_narrows_the_session_and_is_checked() {
    let (op, provider) = forged_provider();
    let directory = directory();
    directory.insert(
        agent("sam")
            .with_permission("bookings:write")
            .with_permission("reports:export"),
    );
    directory.insert(customer("olive").with_permission("bookings:write"));
    let service = Arc::new(Impersonation::new(MemoryStore::new(), directory));
    let url = format!("http://127.0.0.1:{}", free_port());
    let issuer = Issuer::new(
        IssuerConfig::new(&url)
            .unwrap()
            .client(ClientRegistration::new(CLIENT, CLIENT_SECRET, [API])),
        KeyRing::new(SigningKey::generate().unwrap()),
        provider,
        service.clone(),
    );
    let basic = basic(CLIENT, CLIENT_SECRET);
    let actor = op.op_token("sam", |_, _| {});
    let with_scope = |scope: &'static str| {
        let mut params = form(&actor, "olive");
        params.push(("scope", scope));
        encode(&params)
    };

    for refused in ["billing:manage", "bookings:read  bookings:write", "a\"b"] {
        let answer = issuer
            .exchange(Some(&basic), with_scope(refused).as_bytes())
            .await;
        assert_eq!(answer.status, 400, "{refused:?}: {}", answer.body);
        let error: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(error["error"], "invalid_scope", "{refused:?}: {error}");
    }

    // Nothing asked for is the customer's: no token (a scope is never
    // empty), and the session started for it is ended at once, by the
    // system, so the agent's next exchange is not refused.
    let answer = issuer
        .exchange(Some(&basic), with_scope("reports:export").as_bytes())
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let error: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(error["error"], "invalid_scope", "{error}");
    let sam = impersonation_core::UserId::new("sam").unwrap();
    let ended = impersonation_testkit::conformance::all_events(
        service.store(),
        impersonation_core::AuditQuery {
            agent: Some(sam),
            action: Some(impersonation_core::AuditAction::SessionEnded),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].actor, impersonation_core::Actor::System);

    // The agent may export reports, the customer may not: the session
    // grants what both hold, and the token and the answer say so.
    let answer = issuer
        .exchange(
            Some(&basic),
            with_scope("bookings:read reports:export").as_bytes(),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let issued: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(issued["scope"], "bookings:read");
    let token = issued["access_token"].as_str().unwrap();
    let (_, claims) = decode(token);
    assert_eq!(claims["scope"], "bookings:read");
    let ctx = issuer.verifier(API).authorize(token).await.unwrap();
    let granted: Vec<&str> = ctx
        .shadow()
        .permissions()
        .iter()
        .map(|p| p.as_str())
        .collect();
    assert_eq!(
        granted,
        ["bookings:read"],
        "without the scope: bookings:write too"
    );
}

/// A client registered twice, with its old secret and its new one, is how
/// a secret is rotated: either authenticates until the old registration
/// goes; a third secret does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_registered_with_two_secrets_authenticates_with_either() {
    let (op, provider) = forged_provider();
    let people = directory();
    let sam = people
        .get(&impersonation_core::UserId::new("sam").unwrap())
        .unwrap();
    let service = Arc::new(Impersonation::new(MemoryStore::new(), people));
    let url = format!("http://127.0.0.1:{}", free_port());
    let issuer = Issuer::new(
        IssuerConfig::new(&url)
            .unwrap()
            .client(ClientRegistration::new(CLIENT, "the old secret", [API]))
            .client(ClientRegistration::new(CLIENT, "the new secret", [API])),
        KeyRing::new(SigningKey::generate().unwrap()),
        provider,
        service.clone(),
    );
    let body = |subject: &str| encode(&form(&op.op_token("sam", |_, _| {}), subject));
    let wrong = issuer
        .exchange(
            Some(&basic(CLIENT, "a third secret")),
            body("olive").as_bytes(),
        )
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    for secret in ["the new secret", "the old secret"] {
        let answer = issuer
            .exchange(Some(&basic(CLIENT, secret)), body("olive").as_bytes())
            .await;
        assert_eq!(answer.status, 200, "{secret}: {}", answer.body);
        // One live session per agent: end it before the next exchange.
        let token: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        let ctx = issuer
            .verifier(API)
            .authorize(token["access_token"].as_str().unwrap())
            .await
            .unwrap();
        service.stop_session(ctx.session(), &sam).await.unwrap();
    }
}

/// A token lasts minutes, its session up to an hour, and no second token
/// is issued while the session lives (one live session per agent). So a
/// client may revoke an expired token of its own: the session it names
/// ends, and the agent can exchange again. Another client's revocation of
/// it is refused (`unauthorized_client`) and ends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_revoked_by_its_client_ends_its_session() {
    let (op, provider) = forged_provider();
    let service = Arc::new(Impersonation::new(MemoryStore::new(), directory()));
    let url = format!("http://127.0.0.1:{}", free_port());
    let issuer = Issuer::new(
        IssuerConfig::new(&url)
            .unwrap()
            .token_lifetime(time::Duration::seconds(1))
            .client(ClientRegistration::new(CLIENT, CLIENT_SECRET, [API]))
            .client(ClientRegistration::new("other", "other-secret", [API])),
        KeyRing::new(SigningKey::generate().unwrap()),
        provider,
        service.clone(),
    );
    let exchange = || {
        let actor = op.op_token("sam", |_, _| {});
        let body = encode(&form(&actor, "olive"));
        let issuer = issuer.clone();
        let auth = basic(CLIENT, CLIENT_SECRET);
        async move { issuer.exchange(Some(&auth), body.as_bytes()).await }
    };
    let first = exchange().await;
    assert_eq!(first.status, 200, "{}", first.body);
    let issued: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    let token = issued["access_token"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert!(issuer.verifier(API).verify(&token).is_err(), "expired");
    let refused = exchange().await;
    assert_eq!(
        refused.status, 400,
        "the session lives on: {}",
        refused.body
    );

    // Another client's revocation of it is refused and ends nothing
    // (RFC 7009 §2.1).
    let body = encode(&[("token", token.as_str())]);
    let answer = issuer
        .revoke(Some(&basic("other", "other-secret")), body.as_bytes())
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(
        answer.body.contains("unauthorized_client"),
        "{}",
        answer.body
    );
    assert_eq!(exchange().await.status, 400, "still live");

    // Its own client's ends the session: the agent may exchange again.
    let answer = issuer
        .revoke(Some(&basic(CLIENT, CLIENT_SECRET)), body.as_bytes())
        .await;
    assert_eq!(answer.status, 200);
    let again = exchange().await;
    assert_eq!(again.status, 200, "{}", again.body);
}

/// A token revoked by its client after its agent left the directory (an
/// agent offboarded) still ends its session, by the system: the answer
/// says revoked, and it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_after_its_agent_left_the_directory_ends_its_session() {
    let (op, provider) = forged_provider();
    let people = directory();
    let service = Arc::new(Impersonation::new(MemoryStore::new(), people.clone()));
    let issuer = issuer_lasting(time::Duration::minutes(5), provider, service.clone());
    let (token, _) = exchange_sam_for_olive(&issuer, &op).await;
    let token = token.as_str();
    let session = issuer
        .verifier(API)
        .authorize(token)
        .await
        .unwrap()
        .session();
    people.remove(&impersonation_core::UserId::new("sam").unwrap());

    let revoked = issuer
        .revoke(
            Some(&basic(CLIENT, CLIENT_SECRET)),
            encode(&[("token", token)]).as_bytes(),
        )
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    // As the store has it, with no request to re-check the policy.
    let stored = impersonation_core::Store::session(service.store(), session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.state,
        impersonation_core::SessionState::Ended(impersonation_core::EndReason::Revoked)
    );
}

/// Client authentication, as RFC 6749 §2.3 and RFC 9110 ask: an empty
/// secret is none (a client registered with one, by mistake, does not
/// turn public through `Basic client:`), every `invalid_client` 401 names
/// the scheme it asks for, and a revocation with the header and a
/// `client_secret` in the body (two ways at once) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authentication_refuses_an_empty_secret_and_two_ways_at_once() {
    let (op, provider) = forged_provider();
    let service = Arc::new(Impersonation::new(MemoryStore::new(), directory()));
    let url = format!("http://127.0.0.1:{}", free_port());
    let issuer = Issuer::new(
        IssuerConfig::new(&url)
            .unwrap()
            .client(ClientRegistration::new(CLIENT, CLIENT_SECRET, [API]))
            .client(ClientRegistration::new("unset", "", [API])),
        KeyRing::new(SigningKey::generate().unwrap()),
        provider,
        service,
    );
    let actor = op.op_token("sam", |_, _| {});
    let body = encode(&form(&actor, "olive"));
    let challenged = |answer: &impersonation_oidc::TokenEndpointResponse| {
        answer.headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("www-authenticate") && value.starts_with("Basic")
        })
    };

    let answer = issuer
        .exchange(Some(&basic("unset", "")), body.as_bytes())
        .await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert!(answer.body.contains("invalid_client"), "{}", answer.body);
    assert!(challenged(&answer));

    // A wrong secret in the body: 401, and the header says which scheme.
    let in_body = format!("{body}&client_id={CLIENT}&client_secret=wrong-secret");
    let answer = issuer.exchange(None, in_body.as_bytes()).await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert!(challenged(&answer), "{:?}", answer.headers);

    let revoke = encode(&[("token", "a.b.c"), ("client_secret", CLIENT_SECRET)]);
    let answer = issuer
        .revoke(Some(&basic(CLIENT, CLIENT_SECRET)), revoke.as_bytes())
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("invalid_request"), "{}", answer.body);

    // A client assertion is a method this issuer does not support
    // (`invalid_client`, RFC 6749 §5.2) at both endpoints, alone or beside
    // a method it does: a revocation does not pass on the header while
    // the assertion is ignored.
    let exchanged = issuer
        .exchange(Some(&basic(CLIENT, CLIENT_SECRET)), body.as_bytes())
        .await;
    assert_eq!(exchanged.status, 200, "{}", exchanged.body);
    let token = serde_json::from_str::<serde_json::Value>(&exchanged.body).unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let assertion = [
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", "a.b.c"),
    ];
    let mut revoke = vec![("token", token.as_str())];
    revoke.extend(assertion);
    let answer = issuer
        .revoke(
            Some(&basic(CLIENT, CLIENT_SECRET)),
            encode(&revoke).as_bytes(),
        )
        .await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert!(answer.body.contains("invalid_client"), "{}", answer.body);
    assert!(
        issuer.verifier(API).authorize(&token).await.is_ok(),
        "the session lives on"
    );
    let alone = format!("{body}&client_id={CLIENT}&{}", encode(&assertion));
    let answer = issuer.exchange(None, alone.as_bytes()).await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert!(answer.body.contains("invalid_client"), "{}", answer.body);

    // An escape that does not decode to UTF-8 is malformed, in the body as
    // in the header: not a lossy secret that two values share.
    let lossy = format!("{body}&client_id={CLIENT}&client_secret=%FE");
    let answer = issuer.exchange(None, lossy.as_bytes()).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("invalid_request"), "{}", answer.body);
    // An unknown parameter's value is ignored, whatever it holds (RFC 6749
    // §3.2): the request goes on to the policy (which finds Sam's session
    // from the exchange above still live).
    let unknown = format!("{body}&x_trace=%FF");
    let answer = issuer
        .exchange(Some(&basic(CLIENT, CLIENT_SECRET)), unknown.as_bytes())
        .await;
    assert!(
        answer.body.contains("active_session_exists"),
        "{}",
        answer.body
    );
}

/// A key announced ahead (`publish_next`) is in the JWKS before it signs:
/// a verifier that keeps the key set it was given, and never fetches
/// again, verifies the first token the new key signs. One given the key
/// set from before the announcement refuses it. Announcing a published
/// key again, or the one signing, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_announced_ahead_verifies_its_first_token_without_a_fetch() {
    use impersonation_oidc::TokenVerifier;
    use impersonation_oidc::openidconnect::IssuerUrl;
    let (op, provider) = forged_provider();
    let served = serve_issuer(provider).await;
    let api = served.service.clone() as Arc<dyn impersonation_core::ImpersonationApi>;
    let keeping = |jwks: &str| {
        TokenVerifier::new(
            IssuerUrl::new(served.url.clone()).unwrap(),
            API,
            serde_json::from_str(jwks).unwrap(),
            time::Duration::minutes(5),
            api.clone(),
        )
    };
    let kids = |jwks: &str| -> Vec<String> {
        let jwks: serde_json::Value = serde_json::from_str(jwks).unwrap();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = served.issuer.keys().current();
    let unannounced = keeping(&served.issuer.jwks_json());

    let next = SigningKey::generate().unwrap();
    served.issuer.keys().publish_next(next.clone());
    let announced_jwks = served.issuer.jwks_json();
    assert_eq!(kids(&announced_jwks), [first.kid(), next.kid()]);
    for again in [next.clone(), first.clone()] {
        served.issuer.keys().publish_next(again);
        assert_eq!(served.issuer.jwks_json(), announced_jwks, "nothing changed");
    }
    // Announced, it signs nothing yet.
    let before = sams_token_for_olive(&op, &served).await;
    assert_eq!(decode(&before).0["kid"], first.kid());
    let announced = keeping(&announced_jwks);
    let ctx = announced.authorize(&before).await.unwrap();
    sam_stops(&served, &ctx).await;

    served.issuer.keys().rotate(next.clone());
    assert_eq!(
        kids(&served.issuer.jwks_json()),
        [next.kid(), first.kid()],
        "the announced key signs; the first stays published until retired"
    );
    let after = sams_token_for_olive(&op, &served).await;
    assert_eq!(decode(&after).0["kid"], next.kid());
    announced.authorize(&after).await.unwrap();
    assert!(matches!(
        unannounced.verify(&after),
        Err(TokenError::Signature(_))
    ));
}
