#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Criterion benches of the token path, with the RSA floor beside them:
//! a whole token exchange (verify the agent's token, run the policy, start
//! the session on `MemoryStore`, sign), verifying a token's signature and
//! claims, and authorising it (verify, then resolve its session). Run with
//! `cargo xtask bench`.

use std::sync::Arc;

use base64::Engine;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use impersonation_core::{
    Impersonation, MemoryDirectory, MemoryStore, Principal, RelationKind, Relationship, TenantId,
    UserId,
};
use impersonation_oidc::openidconnect::core::{
    CoreGenderClaim, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
};
use impersonation_oidc::openidconnect::{
    Audience, EmptyAdditionalClaims, IdToken, IdTokenClaims, IssuerUrl, StandardClaims,
    SubjectIdentifier,
};
use impersonation_oidc::{ClientRegistration, Issuer, IssuerConfig, KeyRing, Provider, SigningKey};

const OP: &str = "https://login.bench";
const API: &str = "https://api.bench/";

type ProviderToken = IdToken<
    EmptyAdditionalClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

fn agent(n: u64) -> Principal {
    Principal::new(
        UserId::from(n),
        format!("Agent {n}"),
        TenantId::new("vendor").unwrap(),
    )
    .with_permissions(["impersonation:start", "bookings:read"])
    .with_relationship(Relationship::all_tenants(
        RelationKind::Support,
        "s",
        "Support",
    ))
}

/// A provider token for `sub`, signed with the provider's key.
fn provider_token(key: &SigningKey, sub: &str) -> String {
    let now = chrono::Utc::now();
    let claims = IdTokenClaims::new(
        IssuerUrl::new(OP.into()).unwrap(),
        vec![Audience::new(API.into())],
        now + chrono::Duration::minutes(10),
        now,
        StandardClaims::new(SubjectIdentifier::new(sub.into())),
        EmptyAdditionalClaims {},
    );
    ProviderToken::new(
        claims,
        key.rsa_signer(),
        CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
        None,
        None,
    )
    .unwrap()
    .to_string()
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let op_key = SigningKey::generate().unwrap();
    let provider = Provider::with_keys(
        OP,
        API,
        CoreJsonWebKeySet::new(vec![op_key.public_jwk().clone()]),
    )
    .unwrap();
    let directory = MemoryDirectory::new();
    directory.insert(
        Principal::new(
            UserId::from(1_u64),
            "Olive Owner",
            TenantId::new("pinewood").unwrap(),
        )
        .with_permission("bookings:read"),
    );
    let service = Arc::new(Impersonation::new(MemoryStore::new(), directory.clone()));
    let issuer = Issuer::new(
        IssuerConfig::new("https://api.bench/impersonation")
            .unwrap()
            .client(ClientRegistration::new("console", "secret", [API])),
        KeyRing::new(SigningKey::generate().unwrap()),
        provider,
        service,
    );
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("console:secret")
    );
    let body = |actor: &str| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair(
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            )
            .append_pair("actor_token", actor)
            .append_pair(
                "actor_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            )
            .append_pair("requested_subject", "1")
            .append_pair("reason", "Customer cannot see bookings")
            .finish()
    };

    // The floor: one RS256 signature and one verification of a token.
    let sample = provider_token(&op_key, "2");
    c.bench_function("baseline: RS256 sign (a provider token)", |b| {
        b.iter(|| provider_token(&op_key, "2"))
    });

    let mut next = 1_000_u64;
    c.bench_function("exchange (verify agent token, policy, start, sign)", |b| {
        b.iter_batched(
            || {
                next += 1;
                directory.insert(agent(next));
                body(&provider_token(&op_key, &next.to_string()))
            },
            |form| {
                let answer = rt.block_on(issuer.exchange(Some(&basic), form.as_bytes()));
                assert_eq!(answer.status, 200, "{}", answer.body);
                answer
            },
            BatchSize::SmallInput,
        )
    });

    next += 1;
    directory.insert(agent(next));
    let answer = rt.block_on(issuer.exchange(
        Some(&basic),
        body(&provider_token(&op_key, &next.to_string())).as_bytes(),
    ));
    let issued: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    let token = issued["access_token"].as_str().unwrap().to_owned();
    let verifier = issuer.verifier(API);
    let _ = sample;
    c.bench_function("verify (signature and claims)", |b| {
        b.iter(|| verifier.verify(&token).unwrap())
    });
    c.bench_function("authorize (verify, then resolve the session)", |b| {
        b.iter(|| rt.block_on(verifier.authorize(&token)).unwrap())
    });
}

criterion_group!(tokens, benches);
criterion_main!(tokens);
