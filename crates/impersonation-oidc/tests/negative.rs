//! Every hostile or unlucky case, refused with the right RFC 6749 error at
//! the token endpoint or with a refusal (401 at a binding) at the verifier.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use impersonation_core::{AuditAction, AuditQuery, ImpersonationApi, Initiator, Principal, UserId};
use impersonation_oidc::TokenError;
use serde_json::{Value, json};

struct Fixture {
    served: Served,
    op: Forger,
}

async fn fixture() -> Fixture {
    let (op, provider) = forged_provider();
    Fixture {
        served: serve_issuer(provider).await,
        op,
    }
}

impl Fixture {
    async fn exchange(&self, params: &[(&str, &str)]) -> (u16, Value) {
        exchange(&self.served.url, params).await
    }

    /// Exchanges the provider token `actor` for the customer a provider
    /// token of Olive's names (`subject_token`), after `tweak` has had its
    /// way with that token's payload.
    async fn exchange_for_olive(
        &self,
        actor: &str,
        tweak: impl FnOnce(&mut Value),
    ) -> (u16, Value) {
        let olive = self.op.op_token("olive", |_, p| tweak(p));
        let mut params = form(actor, "");
        params.retain(|(k, _)| *k != "requested_subject");
        params.push(("subject_token", &olive));
        params.push(("subject_token_type", ACCESS_TOKEN));
        self.exchange(&params).await
    }

    /// Exchanges a good provider token of `agent` for `subject`.
    async fn issue(&self, agent: &str, subject: &str) -> String {
        let actor = self.op.op_token(agent, |_, _| {});
        let (status, body) = self.exchange(&form(&actor, subject)).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    fn ours(&self) -> Forger {
        Forger {
            key: self.served.key.clone(),
        }
    }
}

fn assert_refused(answer: &(u16, Value), status: u16, error: &str) {
    assert_eq!(
        (answer.0, answer.1["error"].as_str()),
        (status, Some(error)),
        "{}",
        answer.1
    );
}

// ---- The agent's token, at the token endpoint: invalid_request (RFC 8693 §2.2.2). ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_actor_tokens_are_invalid_requests() {
    let f = fixture().await;
    let now = now();
    let signed = |tweak: &dyn Fn(&mut Value, &mut Value)| f.op.op_token("sam", |h, p| tweak(h, p));
    let (good_header, good_payload) = decode(&signed(&|_, _| {}));
    let public_pem = public_pem(&f.op.key);
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none, no signature",
            format!(
                "{}.",
                Forger::unsigned(&json!({"alg": "none", "typ": "at+jwt"}), &good_payload)
            ),
        ),
        (
            "alg none, a signature anyway",
            format!(
                "{}.c2ln",
                Forger::unsigned(&json!({"alg": "none", "kid": f.op.kid()}), &good_payload)
            ),
        ),
        (
            "the RSA public key as an HMAC secret",
            Forger::hmac(
                &json!({"alg": "HS256", "kid": f.op.kid()}),
                &good_payload,
                public_pem.as_bytes(),
            ),
        ),
        (
            "a key id nobody published",
            signed(&|h, _| h["kid"] = json!("not-a-key")),
        ),
        (
            "expired",
            signed(&|_, p| {
                p["iat"] = json!(now - 7200);
                p["exp"] = json!(now - 60);
            }),
        ),
        (
            "a lifetime of ten years",
            signed(&|_, p| p["exp"] = json!(now + 315_360_000)),
        ),
        (
            "an exp past any date",
            signed(&|_, p| p["exp"] = json!(1e20)),
        ),
        (
            "issued in the future",
            signed(&|_, p| {
                p["iat"] = json!(now + 3600);
                p["exp"] = json!(now + 4200);
            }),
        ),
        (
            "not valid for another ten minutes (nbf)",
            signed(&|_, p| p["nbf"] = json!(now + 600)),
        ),
        (
            "for another audience",
            signed(&|_, p| p["aud"] = json!("https://other.test/")),
        ),
        (
            "from another issuer",
            signed(&|_, p| p["iss"] = json!("https://evil.test")),
        ),
        ("four segments", format!("{}.eA", signed(&|_, _| {}))),
        ("a tampered payload", {
            let token = signed(&|_, _| {});
            let mut parts: Vec<&str> = token.split('.').collect();
            let mut payload = good_payload.clone();
            payload["sub"] = json!("kim");
            let forged = base64_json(&payload);
            parts[1] = &forged;
            parts.join(".")
        }),
        ("not a JWT", "sam".into()),
        (
            "a delegated token: lee acting as sam",
            signed(&|_, p| p["act"] = json!({"sub": "lee"})),
        ),
        (
            "an actor slot left null",
            signed(&|_, p| p["act"] = json!(null)),
        ),
        (
            "an nbf sent as null",
            signed(&|_, p| p["nbf"] = json!(null)),
        ),
        (
            "a typ that is not a token",
            signed(&|h, _| h["typ"] = json!("application/pdf")),
        ),
    ];
    let _ = good_header;
    for (what, token) in cases {
        let answer = f.exchange(&form(&token, "olive")).await;
        assert_eq!(
            (answer.0, answer.1["error"].as_str()),
            (400, Some("invalid_request")),
            "{what}: {}",
            answer.1
        );
        // The answer names no configured value (the provider's address,
        // the audiences): what was expected stays in the log.
        let told = answer.1["error_description"].as_str().unwrap_or_default();
        assert!(!told.contains(OP) && !told.contains(API), "{what}: {told}");
    }
    // None of them started a session.
    assert_nothing_audited(&f).await;
}

/// Beyond the standard claims of an agent's token, the issuer reads `act`,
/// and the scope and client claims only when it requires them: claims it
/// has no use for pass whatever their shape (a provider's numeric `sid`,
/// say; a `scope` array, a numeric `client_id` to an issuer that requires
/// neither).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_token_with_claims_of_other_shapes_is_accepted() {
    let f = fixture().await;
    let actor = f.op.op_token("sam", |_, p| {
        p["sid"] = json!(42);
        p["roles"] = json!({"values": [1, 2]});
        p["scope"] = json!(["api"]);
        p["scp"] = json!({"api": true});
        p["client_id"] = json!(7);
        p["cid"] = json!(null);
    });
    let (status, body) = f.exchange(&form(&actor, "olive")).await;
    assert_eq!(status, 200, "{body}");
}

/// An issuer requiring a scope and a client reads them as providers send
/// them: RFC 9068's `scope` and `client_id`, else `azp`, Okta's `scp`
/// array and `cid`; the first claim present decides, and every scope
/// required must be granted. A scope that is not one value is refused
/// when configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_tokens_scope_and_client_are_read_as_providers_send_them() {
    let (op, provider) = forged_provider();
    let served = serve_issuer_with(provider, |config| {
        config
            .require_actor_client("console-ui")
            .require_actor_scope("impersonate")
            .and_then(|c| c.require_actor_scope("support"))
            .unwrap()
    })
    .await;
    let f = Fixture { served, op };
    let token = |claims: Value| {
        f.op.op_token("sam", |_, p| {
            let p = p.as_object_mut().unwrap();
            p.remove("client_id");
            p.remove("scope");
            p.extend(claims.as_object().unwrap().clone());
        })
    };
    let taken = [
        json!({"client_id": "console-ui", "scope": "api support impersonate"}),
        json!({"azp": "console-ui", "scope": "impersonate support"}),
        json!({"cid": "console-ui", "scp": ["impersonate", "support"]}),
        json!({"appid": "console-ui", "scp": "support impersonate"}),
    ];
    for claims in &taken {
        let (status, body) = f.exchange(&form(&token(claims.clone()), "olive")).await;
        assert_eq!(status, 200, "{claims}: {body}");
        f.served
            .service
            .revoke_all_for_agent(&UserId::new("sam").unwrap(), Initiator::System, "next")
            .await
            .unwrap();
    }
    let refused = [
        // `client_id` decides, whatever `azp` says.
        (
            json!({"client_id": "agent-app", "azp": "console-ui", "scope": "impersonate support"}),
            "not issued to a client",
        ),
        (
            json!({"client_id": ["console-ui"], "scope": "impersonate support"}),
            "not issued to a client",
        ),
        (
            json!({"scope": "impersonate support"}),
            "not issued to a client",
        ),
        // `scope` decides, whatever `scp` says.
        (
            json!({"client_id": "console-ui", "scope": "api", "scp": ["impersonate", "support"]}),
            "scope `impersonate`",
        ),
        (
            json!({"client_id": "console-ui", "scope": "impersonate"}),
            "scope `support`",
        ),
        (
            json!({"client_id": "console-ui", "scope": "impersonate\tsupport"}),
            "scope `impersonate`",
        ),
    ];
    let before = impersonation_testkit::conformance::all_events(
        f.served.service.store(),
        AuditQuery::default(),
    )
    .await
    .len();
    for (claims, says) in &refused {
        let answer = f.exchange(&form(&token(claims.clone()), "olive")).await;
        assert_refused(&answer, 400, "invalid_request");
        let description = answer.1["error_description"].as_str().unwrap();
        assert!(description.contains(says), "{claims}: {description}");
    }
    let after = impersonation_testkit::conformance::all_events(
        f.served.service.store(),
        AuditQuery::default(),
    )
    .await
    .len();
    assert_eq!(before, after, "a refused actor token reaches no policy");

    for scope in [
        "",
        "impersonate support",
        "say\"what",
        "back\\slash",
        "tab\t",
    ] {
        let refused = impersonation_oidc::IssuerConfig::new("https://issuer.test")
            .unwrap()
            .require_actor_scope(scope);
        assert!(refused.is_err(), "{scope:?}");
    }
}

/// A signature's last base64url character carries bits its bytes do not
/// use: the other spellings of the same signature are refused, for the
/// provider's tokens at the token endpoint and for ours at the verifier,
/// so that no token changed in one character verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_stray_bits_in_its_last_character_is_refused() {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let respelled = |token: &str| -> Vec<String> {
        let (rest, last) = token.split_at(token.len() - 1);
        let value = ALPHABET
            .iter()
            .position(|&c| c == last.as_bytes()[0])
            .unwrap();
        let unused = match token.rsplit('.').next().unwrap().len() % 4 {
            2 => 4,
            3 => 2,
            _ => 0,
        };
        assert_eq!(unused, 4, "a 256-byte signature ends one byte into a group");
        (1..1 << unused)
            .map(|stray| format!("{rest}{}", char::from(ALPHABET[value ^ stray])))
            .collect()
    };
    let f = fixture().await;
    let actor = f.op.op_token("sam", |_, _| {});
    for token in respelled(&actor) {
        let answer = f.exchange(&form(&token, "olive")).await;
        assert_refused(&answer, 400, "invalid_request");
    }
    assert_nothing_audited(&f).await;
    let ours = f.issue("sam", "olive").await;
    let verifier = f.served.issuer.verifier(API);
    for token in respelled(&ours) {
        assert!(verifier.verify(&token).is_err(), "{token}");
    }
    assert!(verifier.verify(&ours).is_ok());
}

/// OpenID Connect lets a provider that publishes one key leave `kid` out
/// of its tokens; that one key must then verify them. (This crate's own
/// tokens always name their key: the verifier refuses one that does not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_key_providers_token_may_name_no_key() {
    let f = fixture().await;
    let unnamed = f.op.op_token("sam", |h, _| {
        h.as_object_mut().unwrap().remove("kid");
    });
    let (status, body) = f.exchange(&form(&unnamed, "olive")).await;
    assert_eq!(status, 200, "{body}");
    // Signed by another key, it is refused all the same.
    let other = Forger { key: rsa_key().0 };
    let forged = other.op_token("sam", |h, _| {
        h.as_object_mut().unwrap().remove("kid");
    });
    let (status, body) = f.exchange(&form(&forged, "oscar")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
}

/// A body over `MAX_BODY` is refused before it is read, with RFC 6749's
/// JSON error (413), like every other answer of the endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_is_a_json_error() {
    let f = fixture().await;
    let padding = "a".repeat(impersonation_oidc::MAX_BODY + 1);
    for endpoint in ["token", "revoke"] {
        let answer = impersonation_oidc::http_client()
            .unwrap()
            .post(format!("{}/{endpoint}", f.served.url))
            .basic_auth(CLIENT, Some(CLIENT_SECRET))
            .form(&[("reason", padding.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 413, "{endpoint}");
        assert_eq!(answer.headers()["content-type"], "application/json");
        let error: Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
        assert_eq!(error["error"], "invalid_request", "{endpoint}: {error}");
    }
    assert_nothing_audited(&f).await;
}

/// Asserts the trail is empty: no request reached the policy.
async fn assert_nothing_audited(f: &Fixture) {
    assert!(
        impersonation_testkit::conformance::all_events(
            f.served.service.store(),
            AuditQuery::default()
        )
        .await
        .is_empty()
    );
}

fn base64_json(value: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

// ---- The policy, at the token endpoint. ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refusals_are_invalid_requests_with_the_denial_code_and_are_audited() {
    let f = fixture().await;
    // A target outside the policy: an administrator.
    let sam = f.op.op_token("sam", |_, _| {});
    let answer = f.exchange(&form(&sam, "ada")).await;
    assert_refused(&answer, 400, "invalid_request");
    assert!(
        answer.1["error_description"]
            .as_str()
            .unwrap()
            .contains("protected_role"),
        "{}",
        answer.1
    );
    // An agent without the impersonate permission.
    let mallory = f.op.op_token("mallory", |_, _| {});
    let answer = f.exchange(&form(&mallory, "olive")).await;
    assert_refused(&answer, 400, "invalid_request");
    assert!(
        answer.1["error_description"]
            .as_str()
            .unwrap()
            .contains("missing_permission")
    );
    // A user the provider knows but the app does not.
    let stranger = f.op.op_token("stranger", |_, _| {});
    assert_refused(
        &f.exchange(&form(&stranger, "olive")).await,
        400,
        "invalid_request",
    );
    // No reason: the request's fault.
    let mut no_reason = form(&sam, "olive");
    no_reason.retain(|(k, _)| *k != "reason");
    let answer = f.exchange(&no_reason).await;
    assert_refused(&answer, 400, "invalid_request");
    assert!(
        answer.1["error_description"]
            .as_str()
            .unwrap()
            .contains("reason")
    );
    // The policy's refusals are in the audit trail.
    let denied = impersonation_testkit::conformance::all_events(
        f.served.service.store(),
        AuditQuery {
            action: Some(AuditAction::Denied),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(denied.len(), 3, "{denied:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_who_lost_the_permission_gets_no_token_and_loses_the_one_held() {
    let f = fixture().await;
    let token = f.issue("sam", "olive").await;
    let verifier = f.served.issuer.verifier(API);
    verifier.authorize(&token).await.unwrap();
    // Sam is demoted.
    f.served.directory.insert(
        Principal::new(
            UserId::new("sam").unwrap(),
            "Agent sam",
            impersonation_core::TenantId::new("vendor").unwrap(),
        )
        .with_permission("bookings:read"),
    );
    assert!(matches!(
        verifier.authorize(&token).await,
        Err(TokenError::Session(_))
    ));
    let sam = f.op.op_token("sam", |_, _| {});
    let answer = f.exchange(&form(&sam, "oscar")).await;
    assert_refused(&answer, 400, "invalid_request");
    assert!(
        answer.1["error_description"]
            .as_str()
            .unwrap()
            .contains("missing_permission")
    );
}

// ---- The client and the request, at the token endpoint. ----

/// An `Authorization` header that cannot be read, or that came twice, is a
/// client authentication tried and failed: `invalid_client` with
/// `WWW-Authenticate` (RFC 6749 §5.2), not a request with none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_repeated_authorization_header_is_a_failed_client_authentication() {
    let f = fixture().await;
    let sam = f.op.op_token("sam", |_, _| {});
    let http = impersonation_oidc::http_client().unwrap();
    let good = basic(CLIENT, CLIENT_SECRET);
    let unreadable =
        openidconnect::reqwest::header::HeaderValue::from_bytes(b"Basic \xffbm90LWFzY2lp").unwrap();
    for values in [
        vec![unreadable],
        vec![
            openidconnect::reqwest::header::HeaderValue::from_str(&good).unwrap(),
            openidconnect::reqwest::header::HeaderValue::from_str(&good).unwrap(),
        ],
    ] {
        let mut request = http
            .post(format!("{}/token", f.served.url))
            .form(&form(&sam, "olive"));
        for value in values {
            request = request.header(openidconnect::reqwest::header::AUTHORIZATION, value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let www = response.headers().get("www-authenticate").is_some();
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(
            (status, body["error"].as_str(), www),
            (401, Some("invalid_client"), true)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_requests_are_refused_with_their_rfc_errors() {
    let f = fixture().await;
    let sam = f.op.op_token("sam", |_, _| {});
    let http = impersonation_oidc::http_client().unwrap();
    let post = |user: &'static str, secret: &'static str, params: Vec<(&'static str, String)>| {
        let http = http.clone();
        let url = format!("{}/token", f.served.url);
        async move {
            let response = http
                .post(url)
                .basic_auth(user, Some(secret))
                .form(&params)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let www = response.headers().get("www-authenticate").is_some();
            let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            (status, body, www)
        }
    };
    let good: Vec<(&'static str, String)> = form(&sam, "olive")
        .into_iter()
        .map(|(k, v)| {
            let k: &'static str = match k {
                "grant_type" => "grant_type",
                "actor_token" => "actor_token",
                "actor_token_type" => "actor_token_type",
                "requested_subject" => "requested_subject",
                "audience" => "audience",
                _ => "reason",
            };
            (k, v.to_owned())
        })
        .collect();

    let (status, body, www) = post(CLIENT, "not-the-secret-9f2", good.clone()).await;
    assert_eq!(
        (status, body["error"].as_str(), www),
        (401, Some("invalid_client"), true)
    );
    let (status, body, _) = post("nobody", "x", good.clone()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let (status, body, _) = post("reporting", "reporting-secret", good.clone()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unauthorized_client"))
    );

    let mut other_audience = good.clone();
    other_audience.push(("audience", "https://elsewhere.test/".into()));
    let (status, body, _) = post(CLIENT, CLIENT_SECRET, other_audience).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_target"))
    );
    // What was asked for is not echoed: it may be a token put in the
    // wrong field.
    let misplaced = "eyJhbGciOiJSUzI1NiJ9.a-token-in-the-wrong-field.sig";
    let mut token_as_audience = good.clone();
    token_as_audience.push(("audience", misplaced.into()));
    let (status, body, _) = post(CLIENT, CLIENT_SECRET, token_as_audience).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_target"))
    );
    assert!(!body.to_string().contains(misplaced), "{body}");

    let mut twice = good.clone();
    twice.push((
        "grant_type",
        "urn:ietf:params:oauth:grant-type:token-exchange".into(),
    ));
    let (status, body, _) = post(CLIENT, CLIENT_SECRET, twice).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    let mut wrong_grant = good.clone();
    wrong_grant.retain(|(k, _)| *k != "grant_type");
    wrong_grant.push(("grant_type", "client_credentials".into()));
    let (status, body, _) = post(CLIENT, CLIENT_SECRET, wrong_grant).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );

    let mut no_actor = good.clone();
    no_actor.retain(|(k, _)| *k != "actor_token");
    let (status, body, _) = post(CLIENT, CLIENT_SECRET, no_actor).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    let mut both_subjects = good.clone();
    both_subjects.push(("subject_token", sam.clone()));
    both_subjects.push(("subject_token_type", ACCESS_TOKEN.into()));
    let (status, body, _) = post(CLIENT, CLIENT_SECRET, both_subjects).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // Nothing leaked a token or a secret into a description.
    let (_, body, _) = post(CLIENT, "not-the-secret-9f2", good.clone()).await;
    let text = body.to_string();
    assert!(
        !text.contains(&sam) && !text.contains("not-the-secret-9f2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_token_names_the_customer() {
    let f = fixture().await;
    let sam = f.op.op_token("sam", |_, _| {});
    let olive = f.op.op_token("olive", |_, _| {});
    let mut params = form(&sam, "");
    params.retain(|(k, _)| *k != "requested_subject");
    params.push(("subject_token", &olive));
    params.push(("subject_token_type", ACCESS_TOKEN));
    let (status, body) = f.exchange(&params).await;
    assert_eq!(status, 200, "{body}");
    let (_, claims) = decode(body["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], "olive");
    assert_eq!(claims["act"]["sub"], "sam");
    // A forged subject token is refused like a forged actor token.
    let forged = olive.replace('.', ".x");
    params.retain(|(k, _)| *k != "subject_token");
    params.push(("subject_token", &forged));
    assert_refused(&f.exchange(&params).await, 400, "invalid_request");
}

/// A token typed as an access token (`typ: at+jwt`) declared an ID token,
/// as actor or as subject, contradicts its declaration: `invalid_request`,
/// nothing started or audited. Declared as what it is, it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_declared_an_id_token_but_typed_as_an_access_token_is_refused() {
    const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
    let f = fixture().await;
    let sam = f.op.op_token("sam", |_, _| {});
    let mut as_actor = form(&sam, "olive");
    for (k, v) in &mut as_actor {
        if *k == "actor_token_type" {
            *v = ID_TOKEN;
        }
    }
    let refused = f.exchange(&as_actor).await;
    assert_refused(&refused, 400, "invalid_request");
    assert!(
        refused.1["error_description"]
            .as_str()
            .unwrap()
            .starts_with("actor_token: declared an ID token"),
        "{}",
        refused.1
    );
    let olive = f.op.op_token("olive", |_, _| {});
    let subject = |token_type| {
        let mut params = form(&sam, "");
        params.retain(|(k, _)| *k != "requested_subject");
        params.push(("subject_token", &olive));
        params.push(("subject_token_type", token_type));
        params
    };
    assert_refused(
        &f.exchange(&subject(ID_TOKEN)).await,
        400,
        "invalid_request",
    );
    assert_nothing_audited(&f).await;
    // Untyped, it may be either.
    let untyped = f.op.op_token("olive", |h, _| {
        h.as_object_mut().unwrap().remove("typ");
    });
    let mut params = form(&sam, "");
    params.retain(|(k, _)| *k != "requested_subject");
    params.push(("subject_token", &untyped));
    params.push(("subject_token_type", ID_TOKEN));
    let (status, body) = f.exchange(&params).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_tokens_may_act_names_the_only_actor_it_allows() {
    let f = fixture().await;
    let sam = f.op.op_token("sam", |_, _| {});
    let exchange_for =
        async |may_act: Value| f.exchange_for_olive(&sam, |p| p["may_act"] = may_act).await;
    for refused in [
        json!({"sub": "kim"}),
        json!({"sub": "sam", "iss": "https://elsewhere.test"}),
        json!({"sub": "Sam"}),
        json!("sam"),
        json!({"sub": ""}),
        json!({"sub": "sam", "iss": 7}),
        // Sent, but null: not a token without `may_act`.
        json!(null),
    ] {
        let answer = exchange_for(refused.clone()).await;
        assert_refused(&answer, 400, "invalid_request");
        assert!(
            answer.1["error_description"]
                .as_str()
                .is_some_and(|d| d.starts_with("subject_token: ")),
            "{refused}: {}",
            answer.1
        );
    }
    // None of them reached the policy: nothing started, nothing audited.
    assert_nothing_audited(&f).await;
    // Naming sam, with or without the provider as issuer, lets sam act.
    let (status, body) = exchange_for(json!({"sub": "sam", "iss": OP})).await;
    assert_eq!(status, 200, "{body}");
    let (_, claims) = decode(body["access_token"].as_str().unwrap());
    assert_eq!(
        (&claims["sub"], &claims["act"]["sub"]),
        (&json!("olive"), &json!("sam"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_tokens_delegation_chain_becomes_the_issued_tokens_prior_actors() {
    let f = fixture().await;
    let sam = f.op.op_token("sam", |_, _| {});
    let exchange_for = async |act: Value| f.exchange_for_olive(&sam, |p| p["act"] = act).await;
    // Olive's token was itself delegated: to a scheduling app, which a
    // partner's integration acts through (that one names its own issuer).
    let (status, body) = exchange_for(json!({
        "sub": "scheduler-app",
        "act": {"sub": "partner-sync", "iss": "https://partner.test/", "client": "sync-7"}
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let (_, claims) = decode(token);
    // Sam is the current actor; the chain follows, each actor under the
    // issuer whose subject it is.
    assert_eq!(
        claims["act"],
        json!({
            "sub": "sam",
            "act": {
                "sub": "scheduler-app",
                "iss": OP,
                "act": {"sub": "partner-sync", "iss": "https://partner.test/", "client": "sync-7"}
            }
        })
    );
    // The verifier reads Sam, not a prior actor, as the agent.
    let verified = f.served.issuer.verifier(API).verify(token).unwrap();
    assert_eq!(verified.actor.as_str(), "sam");
    f.served
        .service
        .revoke_all_for_agent(&UserId::new("sam").unwrap(), Initiator::System, "next case")
        .await
        .unwrap();

    // The first actor's own members are kept too (its `iss` above all),
    // and a chain of 16 actors, the most an issued token carries, passes.
    let sixteen = (1..impersonation_oidc::MAX_PRIOR_ACTORS).fold(
        json!({"sub": "first"}),
        |inner, i| json!({"sub": format!("a{i}"), "act": inner}),
    );
    let mut chain = sixteen.clone();
    chain["iss"] = json!("https://partner.test/");
    let (status, body) = exchange_for(chain).await;
    assert_eq!(status, 200, "{body}");
    let (_, claims) = decode(body["access_token"].as_str().unwrap());
    assert_eq!(claims["act"]["act"]["iss"], "https://partner.test/");
    assert_eq!(claims["act"]["act"]["act"]["iss"], OP);
    f.served
        .issuer
        .verifier(API)
        .verify(body["access_token"].as_str().unwrap())
        .unwrap();
    f.served
        .service
        .revoke_all_for_agent(&UserId::new("sam").unwrap(), Initiator::System, "next case")
        .await
        .unwrap();

    // A chain that would make a token longer than any verifier reads is
    // refused, and the session started for it ended: Sam may exchange
    // again at once.
    let bulky = (0..6_000usize)
        .rev()
        .step_by(10)
        .map(|n| json!({"sub": "scheduler-app", "note": "x".repeat(n)}))
        .find(|act| {
            let act = act.clone();
            f.op.op_token("olive", move |_, p| p["act"] = act).len()
                <= impersonation_oidc::MAX_TOKEN_LEN
        })
        .unwrap();
    let answer = exchange_for(bulky).await;
    assert_refused(&answer, 400, "invalid_request");
    let (status, body) = exchange_for(json!({"sub": "scheduler-app"})).await;
    assert_eq!(status, 200, "{body}");

    // A malformed chain, or one longer than an issued token may carry, is
    // refused before the policy runs.
    let deep = (0..impersonation_oidc::MAX_PRIOR_ACTORS).fold(
        json!({"sub": "first"}),
        |inner, i| json!({"sub": format!("a{i}"), "act": inner}),
    );
    for refused in [
        json!("scheduler-app"),
        json!({"sub": ""}),
        json!({"sub": "scheduler-app", "act": [1]}),
        // Sent, but null: not a token without `act`.
        json!(null),
        deep,
    ] {
        let answer = exchange_for(refused.clone()).await;
        assert_refused(&answer, 400, "invalid_request");
        assert!(
            answer.1["error_description"]
                .as_str()
                .is_some_and(|d| d.starts_with("subject_token: ")),
            "{refused}: {}",
            answer.1
        );
    }
}

// ---- Our own tokens, at the verifier (a binding answers 401). ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_impersonation_tokens_are_refused_by_the_verifier() {
    let f = fixture().await;
    let token = f.issue("sam", "olive").await;
    let verifier = f.served.issuer.verifier(API);
    verifier.authorize(&token).await.unwrap();
    let ours = f.ours();
    let (header, payload) = decode(&token);
    // Typed as an access token (RFC 9068 §2.1).
    assert_eq!(header["typ"], "at+jwt", "{header}");
    let resign = |tweak: &dyn Fn(&mut Value, &mut Value)| {
        let (mut h, mut p) = (header.clone(), payload.clone());
        tweak(&mut h, &mut p);
        ours.sign(&h, &p)
    };
    let now = now();
    let nested_past_the_parser = (0..200).fold(
        json!({"sub": "prior"}),
        |inner, _| json!({"sub": "x", "act": inner}),
    );
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none without a signature part (refused by its shape)",
            format!("{}.", Forger::unsigned(&json!({"alg": "none"}), &payload)),
        ),
        (
            "a wrong key id",
            resign(&|h, _| h["kid"] = json!("rotated-away")),
        ),
        (
            "no key id (this issuer's tokens always name theirs)",
            resign(&|h, _| {
                h.as_object_mut().unwrap().remove("kid");
            }),
        ),
        (
            "no typ (an untyped JWT, such as an ID token, signed with our keys)",
            resign(&|h, _| {
                h.as_object_mut().unwrap().remove("typ");
            }),
        ),
        (
            "typ JWT (not an access token)",
            resign(&|h, _| h["typ"] = json!("JWT")),
        ),
        (
            "expired",
            resign(&|_, p| {
                p["iat"] = json!(now - 600);
                p["exp"] = json!(now - 10);
            }),
        ),
        (
            "a huge exp",
            resign(&|_, p| p["exp"] = json!(now + 31_536_000)),
        ),
        (
            "an exp past any date",
            resign(&|_, p| p["exp"] = json!(1e20)),
        ),
        (
            "not valid yet",
            resign(&|_, p| p["nbf"] = json!(now + 3600)),
        ),
        (
            "for another audience",
            resign(&|_, p| p["aud"] = json!(["https://other.test/"])),
        ),
        ("from another issuer", resign(&|_, p| p["iss"] = json!(OP))),
        ("four segments", format!("{token}.eA")),
        ("a tampered act", {
            let mut p = payload.clone();
            p["act"]["sub"] = json!("kim");
            let parts: Vec<&str> = token.split('.').collect();
            format!("{}.{}.{}", parts[0], base64_json(&p), parts[2])
        }),
        (
            "an act nested past the JSON parser's depth limit",
            resign(&|_, p| p["act"] = nested_past_the_parser.clone()),
        ),
        (
            "a prior actor two down that is not an object",
            resign(&|_, p| p["act"]["act"] = json!({"sub": "lee", "act": "x"})),
        ),
        (
            "a prior actor two down that is an array",
            resign(&|_, p| p["act"]["act"] = json!({"sub": "lee", "act": [1]})),
        ),
        (
            "a prior actor without a sub",
            resign(&|_, p| p["act"]["act"] = json!({"iss": "https://elsewhere.test/"})),
        ),
        (
            "a prior actor with an empty sub",
            resign(&|_, p| p["act"]["act"] = json!({"sub": ""})),
        ),
        (
            "no sid",
            resign(&|_, p| {
                p.as_object_mut().unwrap().remove("sid");
            }),
        ),
        (
            "a session id of another session",
            resign(&|_, p| {
                p["sid"] = json!(impersonation_core::SessionId::new().to_string());
            }),
        ),
        (
            "another customer for the same session",
            resign(&|_, p| p["sub"] = json!("oscar")),
        ),
        (
            "too long",
            format!("{token}{}", "A".repeat(impersonation_oidc::MAX_TOKEN_LEN)),
        ),
    ];
    for (what, hostile) in cases {
        let refused = verifier.authorize(&hostile).await;
        assert!(refused.is_err(), "{what} was accepted");
        assert!(
            !matches!(refused, Err(TokenError::Unavailable(_))),
            "{what}: {refused:?}"
        );
    }

    // Algorithm confusion. Each token is the genuine one in every respect
    // but its algorithm: typed `at+jwt`, naming the issuer's key, the
    // genuine claims, a signature part; so only the algorithm check can
    // refuse it: `none` is refused as unsigned (by the `openidconnect`
    // verifier, whatever the allow-list), HS256 by the allow-list. The same
    // header with RS256, signed by the issuer's key, passes.
    let with_alg = |alg: &str| json!({"alg": alg, "typ": "at+jwt", "kid": header["kid"]});
    verifier
        .authorize(&ours.sign(&with_alg("RS256"), &payload))
        .await
        .unwrap();
    let genuine_signature = token.rsplit('.').next().unwrap();
    let alg_none = format!(
        "{}.{genuine_signature}",
        Forger::unsigned(&with_alg("none"), &payload)
    );
    let refused = verifier.authorize(&alg_none).await;
    assert!(
        matches!(&refused, Err(TokenError::Signature(why)) if why.contains("No signature")),
        "alg none: {refused:?}"
    );
    let public_pem = public_pem(&ours.key);
    let hs256 = Forger::hmac(&with_alg("HS256"), &payload, public_pem.as_bytes());
    let refused = verifier.authorize(&hs256).await;
    assert!(
        matches!(&refused, Err(TokenError::Signature(why))
            if why.contains("Disallowed signature algorithm") && why.contains("`HS256` is not one of")),
        "the RSA public key as an HMAC secret: {refused:?}"
    );

    // Prior actors: the most a token may record passes; one more, or a
    // chain deep enough to tire a reader (but well within what the JSON
    // parser reads), is refused by that bound, and by nothing else.
    let with_priors = |n: usize| {
        let priors = (1..n).fold(
            json!({"sub": "prior"}),
            |inner, _| json!({"sub": "prior", "act": inner}),
        );
        resign(&|_, p| p["act"]["act"] = priors.clone())
    };
    let most = impersonation_oidc::MAX_PRIOR_ACTORS;
    verifier.authorize(&with_priors(most)).await.unwrap();
    for n in [most + 1, 40] {
        let refused = verifier.authorize(&with_priors(n)).await;
        let bound = format!("more than {most} prior actors");
        assert!(
            matches!(&refused, Err(TokenError::Malformed(why)) if *why == bound),
            "{n} prior actors: {refused:?}"
        );
    }

    // The genuine token still works: nothing above touched the session.
    verifier.authorize(&token).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_a_stopped_or_revoked_session_is_refused_at_once() {
    let f = fixture().await;
    let verifier = f.served.issuer.verifier(API);
    let sam = f
        .served
        .service
        .directory()
        .get(&UserId::new("sam").unwrap())
        .unwrap();

    // Stopped through the revocation endpoint (the agent's client).
    let token = f.issue("sam", "olive").await;
    verifier.authorize(&token).await.unwrap();
    assert_eq!(revoke(&f.served.url, &token, true).await, 200);
    assert!(matches!(
        verifier.authorize(&token).await,
        Err(TokenError::Session(_))
    ));

    // Revoked by the agent through the service (any other path: same).
    let token = f.issue("sam", "olive").await;
    let ctx = verifier.authorize(&token).await.unwrap();
    f.served
        .service
        .revoke(ctx.session(), &sam, "done")
        .await
        .unwrap();
    assert!(matches!(
        verifier.authorize(&token).await,
        Err(TokenError::Session(_))
    ));

    // A token of this issuer's from before its tokens were typed (no
    // `typ`): the verifier refuses it, and the revocation endpoint still
    // ends its session with it (else it would block the next exchange).
    let token = f.issue("sam", "olive").await;
    let (mut header, payload) = decode(&token);
    header.as_object_mut().unwrap().remove("typ");
    let untyped = f.ours().sign(&header, &payload);
    assert!(verifier.authorize(&untyped).await.is_err());
    assert_eq!(revoke(&f.served.url, &untyped, true).await, 200);
    assert!(matches!(
        verifier.authorize(&token).await,
        Err(TokenError::Session(_))
    ));
    // ...but not one typed as something else.
    let token = f.issue("sam", "olive").await;
    let (mut header, payload) = decode(&token);
    header["typ"] = json!("JWT");
    assert_eq!(
        revoke(&f.served.url, &f.ours().sign(&header, &payload), true).await,
        200
    );
    verifier.authorize(&token).await.unwrap();

    // A revocation request with a garbage token is still 200 (RFC 7009).
    assert_eq!(revoke(&f.served.url, "garbage", true).await, 200);
    // So is one whose unsigned `exp` is the earliest date `time` holds
    // (the endpoint reads it before verifying, and steps a second back).
    let earliest = format!(
        "{}.{}.{}",
        base64_json(&json!({"alg": "RS256"})),
        base64_json(&json!({"exp": -377_705_116_800_i64})),
        base64_json(&json!("sig"))
    );
    assert_eq!(revoke(&f.served.url, &earliest, true).await, 200);
    verifier
        .authorize(&f.issue("kim", "olive").await)
        .await
        .unwrap();
    // ...but not without client authentication.
    assert_eq!(revoke(&f.served.url, "garbage", false).await, 401);
    let _ = f.served.service.now();
}

/// A provider that types its access tokens can be held to it: its ID
/// tokens (`typ: JWT`) and untyped tokens, even addressed to this
/// issuer's audience, then fail as an agent's token. By default all
/// three are taken, as many providers do not type access tokens.
#[tokio::test]
async fn a_provider_held_to_typed_access_tokens_refuses_its_id_tokens() {
    let (forger, provider) = forged_provider();
    let at = time::OffsetDateTime::now_utc();
    let typed = forger.op_token("sam", |_, _| {});
    let id_token = forger.op_token("sam", |h, _| h["typ"] = json!("JWT"));
    let untyped = forger.op_token("sam", |h, _| {
        h.as_object_mut().unwrap().remove("typ");
    });
    for token in [&typed, &id_token, &untyped] {
        assert_eq!(
            provider.user_of(token, at).await.unwrap(),
            UserId::new("sam").unwrap()
        );
    }
    let strict = provider.require_typed_access_tokens();
    assert_eq!(
        strict.user_of(&typed, at).await.unwrap(),
        UserId::new("sam").unwrap()
    );
    for token in [&id_token, &untyped] {
        let refused = strict.user_of(token, at).await.unwrap_err().to_string();
        assert!(
            refused.contains("typed as an access token") || refused.contains("JWT type `JWT`"),
            "{refused}"
        );
    }
}
