//! Structure-aware fuzzing on the stable toolchain (proptest): hostile form
//! bodies for the token-exchange parser and the token endpoint, and hostile
//! tokens for the verifier, each judged against an oracle. Zero panics,
//! zero tokens accepted that should not be, and no good token refused.
//!
//! `cargo xtask ci` runs a bounded number of cases; `cargo xtask fuzz` a long
//! run (`IMP_FUZZ_CASES`). Any input that ever failed is kept by proptest in
//! `tests/fuzz.proptest-regressions` and replayed first on every run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::OnceLock;

use common::*;
use impersonation_oidc::{ClientCredentials, ExchangeRequest, MAX_TARGETS, MAX_VALUE, Subject};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{Value, json};

fn cases() -> u32 {
    std::env::var("IMP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

// ---- Form bodies ----

const NAMES: [&str; 18] = [
    "grant_type",
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "requested_subject",
    "audience",
    "resource",
    "scope",
    "requested_token_type",
    "reason",
    "ticket",
    "client_id",
    "client_secret",
    "client_assertion",
    "token",
    "x",
    "",
];

const VALUES: [&str; 12] = [
    "urn:ietf:params:oauth:grant-type:token-exchange",
    "urn:ietf:params:oauth:token-type:access_token",
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:saml2",
    "client_credentials",
    "olive",
    "https://api.test/",
    "a.b.c",
    "",
    "%",
    "é∆😀\u{202e}",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(&VALUES[..]).prop_map(str::to_owned),
        "[ -~]{0,40}",
        (0usize..3).prop_map(|i| "A".repeat([MAX_VALUE, MAX_VALUE + 1, 20_000][i])),
    ]
}

fn pair() -> impl Strategy<Value = (String, String)> {
    (
        prop_oneof![
            proptest::sample::select(&NAMES[..]).prop_map(str::to_owned),
            "[a-z_%&=]{0,12}"
        ],
        value(),
    )
}

/// A body: encoded pairs, sometimes raw bytes or broken encoding.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => proptest::collection::vec(pair(), 0..16).prop_map(|pairs| {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &pairs {
                form.append_pair(k, v);
            }
            form.finish().into_bytes()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
        1 => "[a-z_=&%0-9A-F]{0,300}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// The parser never panics, and what it accepts is well formed.
    #[test]
    fn the_exchange_parser_accepts_only_well_formed_requests(body in body(), auth in proptest::option::of("[ -~]{0,60}")) {
        if let Ok(request) = ExchangeRequest::parse(&body) {
            let text = std::str::from_utf8(&body).unwrap();
            prop_assert!(text.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"));
            prop_assert!(!request.actor_token.is_empty() && request.actor_token.len() <= MAX_VALUE);
            prop_assert!(request.audiences.len() + request.resources.len() <= MAX_TARGETS);
            match &request.subject {
                Subject::Token { token, token_type } => {
                    prop_assert!(!token.is_empty());
                    prop_assert!(token_type.starts_with("urn:ietf:params:oauth:token-type:"));
                }
                Subject::Requested(id) => prop_assert!(!id.is_empty()),
            }
            // Client authentication never panics either, and never yields
            // credentials without an id.
            if let Ok(creds) = ClientCredentials::from_request(auth.as_deref(), &request) {
                prop_assert!(auth.is_some() || !creds.basic);
            }
        }
        let _ = impersonation_oidc::RevocationRequest::parse(&body);
    }
}

// ---- Tokens ----

/// How a test token departs from a good one.
#[derive(Debug, Clone)]
enum Alg {
    Rs256,
    None,
    Hs256,
    Other(&'static str),
}

#[derive(Debug, Clone)]
struct Mutation {
    alg: Alg,
    /// 0: ours, 1: another key's, 2: missing, 3: not a string.
    kid: u8,
    /// 0: `at+jwt`, 1: `application/at+jwt`, 2: missing, 3: `JWT`, 4: not a string.
    typ: u8,
    /// Signed by our key (else by a stranger's).
    our_key: bool,
    iss_ok: bool,
    /// 0: our audience, 1: a list with it, 2: another, 3: a number.
    aud: u8,
    /// Seconds from now; `None`: missing.
    exp: Option<i64>,
    iat: Option<i64>,
    nbf: Option<i64>,
    /// 0: the session's, 1: another id, 2: not an id, 3: missing.
    sid: u8,
    sub_ok: bool,
    /// 0: the agent, 1: another agent, 2: missing sub, 3: nested `depth` deep, 4: not an object.
    act: u8,
    depth: usize,
    /// 0: as signed, 1: flip a signature byte, 2: extra segment, 3: drop a segment, 4: truncate.
    shape: u8,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let alg = prop_oneof![
        6 => Just(Alg::Rs256),
        1 => Just(Alg::None),
        1 => Just(Alg::Hs256),
        1 => proptest::sample::select(&["RS512", "ES256", "PS256", "EdDSA", "rs256", ""][..]).prop_map(Alg::Other),
    ];
    let offset = prop_oneof![
        Just(None),
        (-100_000i64..100_000).prop_map(Some),
        Just(Some(i64::MAX / 2)),
        Just(Some(-i64::MAX / 2))
    ];
    let base = (
        alg,
        prop_oneof![6 => Just(0u8), 1 => 1u8..4],
        prop_oneof![6 => Just(0u8), 1 => 1u8..5],
        prop_oneof![6 => Just(true), 1 => Just(false)],
        prop_oneof![6 => Just(true), 1 => Just(false)],
        prop_oneof![6 => Just(0u8), 1 => 1u8..4],
    );
    let times = (
        prop_oneof![4 => Just(Some(120i64)), 1 => offset.clone()],
        prop_oneof![4 => Just(Some(0i64)), 1 => offset.clone()],
        prop_oneof![4 => Just(Some(0i64)), 1 => offset],
    );
    let body = (
        prop_oneof![6 => Just(0u8), 1 => 1u8..4],
        prop_oneof![6 => Just(true), 1 => Just(false)],
        prop_oneof![6 => Just(0u8), 1 => 1u8..5],
        1usize..300,
        prop_oneof![6 => Just(0u8), 1 => 1u8..5],
    );
    (base, times, body).prop_map(
        |(
            (alg, kid, typ, our_key, iss_ok, aud),
            (exp, iat, nbf),
            (sid, sub_ok, act, depth, shape),
        )| {
            Mutation {
                alg,
                kid,
                typ,
                our_key,
                iss_ok,
                aud,
                exp,
                iat,
                nbf,
                sid,
                sub_ok,
                act,
                depth,
                shape,
            }
        },
    )
}

impl Mutation {
    /// Whether a time sits so close to a bound that a second passing
    /// between building and checking the token could flip the verdict.
    fn near_a_bound(&self) -> bool {
        let near = |v: Option<i64>, bound: i64| v.is_some_and(|v| (v - bound).abs() <= 2);
        near(self.exp, 0) || near(self.iat, 30) || near(self.nbf, 30)
    }

    /// The oracle: the verifier must accept exactly these.
    fn acceptable(&self) -> bool {
        let times_ok = match (self.exp, self.iat) {
            (Some(exp), Some(iat)) => {
                exp > 0 && iat <= 30 && exp - iat <= 300 && self.nbf.is_none_or(|n| n <= 30)
            }
            _ => false,
        };
        matches!(self.alg, Alg::Rs256)
            && self.kid == 0
            && self.typ <= 1
            && self.our_key
            && self.iss_ok
            && self.aud <= 1
            && times_ok
            && self.sid == 0
            && self.sub_ok
            && (self.act == 0
                || (self.act == 3 && self.depth <= impersonation_oidc::MAX_PRIOR_ACTORS))
            && self.shape == 0
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    served: Served,
    ours: Forger,
    stranger: Forger,
    good: Value,
    issuer: String,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (served, good, ours) = rt.block_on(async {
            let (op, provider) = forged_provider();
            let served = serve_issuer(provider).await;
            let actor = op.op_token("sam", |_, _| {});
            let (status, body) = exchange(&served.url, &form(&actor, "olive")).await;
            assert_eq!(status, 200, "{body}");
            let (_, good) = decode(body["access_token"].as_str().unwrap());
            let ours = Forger {
                key: served.key.clone(),
            };
            (served, good, ours)
        });
        let issuer = served.url.clone();
        World {
            rt,
            served,
            ours,
            stranger: Forger { key: rsa_key().0 },
            good,
            issuer,
        }
    })
}

fn build(w: &World, m: &Mutation) -> String {
    let now = now();
    let signer = if m.our_key { &w.ours } else { &w.stranger };
    let mut header = json!({"alg": match m.alg {
        Alg::Rs256 => "RS256",
        Alg::None => "none",
        Alg::Hs256 => "HS256",
        Alg::Other(a) => a,
    }});
    match m.kid {
        0 => header["kid"] = json!(w.ours.kid()),
        1 => header["kid"] = json!(w.stranger.kid()),
        3 => header["kid"] = json!(7),
        _ => {}
    }
    match m.typ {
        0 => header["typ"] = json!("at+jwt"),
        1 => header["typ"] = json!("application/at+jwt"),
        2 => {}
        3 => header["typ"] = json!("JWT"),
        _ => header["typ"] = json!(7),
    }
    let mut p = w.good.clone();
    p["iss"] = json!(if m.iss_ok {
        w.issuer.clone()
    } else {
        OP.to_owned()
    });
    p["aud"] = match m.aud {
        0 => json!(API),
        1 => json!([API, "https://other.test/"]),
        2 => json!("https://other.test/"),
        _ => json!(42),
    };
    let mut set_time = |name: &str, offset: Option<i64>| match offset {
        Some(o) => p[name] = json!(now.saturating_add(o)),
        None => {
            p.as_object_mut().unwrap().remove(name);
        }
    };
    set_time("exp", m.exp);
    set_time("iat", m.iat);
    set_time("nbf", m.nbf);
    match m.sid {
        0 => {}
        1 => p["sid"] = json!(impersonation_core::SessionId::new().to_string()),
        2 => p["sid"] = json!("../../etc"),
        _ => {
            p.as_object_mut().unwrap().remove("sid");
        }
    }
    if !m.sub_ok {
        p["sub"] = json!("oscar");
    }
    match m.act {
        0 => {}
        1 => p["act"] = json!({"sub": "kim"}),
        2 => p["act"] = json!({"name": "sam"}),
        3 => {
            p["act"] = (0..m.depth).fold(
                json!({"sub": "prior"}),
                |inner, _| json!({"sub": "sam", "act": inner}),
            );
            p["act"]["sub"] = json!("sam");
        }
        _ => p["act"] = json!(["sam"]),
    }
    let token = match m.alg {
        Alg::Hs256 => {
            use rsa::pkcs1::EncodeRsaPublicKey;
            let pem = w
                .ours
                .key
                .to_public_key()
                .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap();
            Forger::hmac(&header, &p, pem.as_bytes())
        }
        Alg::None => format!("{}.", Forger::unsigned(&header, &p)),
        _ => signer.sign(&header, &p),
    };
    match m.shape {
        0 => token,
        1 => {
            let mut bytes = token.into_bytes();
            let last = bytes.len() - 2;
            bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
            String::from_utf8(bytes).unwrap()
        }
        2 => format!("{token}.e30"),
        3 => token.rsplit_once('.').unwrap().0.to_owned(),
        _ => token[..token.len() / 2].to_owned(),
    }
}

proptest! {
    #![proptest_config(config())]

    /// The verifier accepts exactly the tokens the oracle accepts.
    #[test]
    fn the_verifier_accepts_exactly_the_good_tokens(m in mutation()) {
        prop_assume!(!m.near_a_bound());
        let w = world();
        let token = build(w, &m);
        let verdict = w.rt.block_on(w.served.issuer.verifier(API).authorize(&token));
        prop_assert_eq!(verdict.is_ok(), m.acceptable(), "{:?} gave {:?}", m, verdict.err());
    }

    /// Arbitrary bytes as a token: refused, never a panic.
    #[test]
    fn the_verifier_refuses_garbage(token in prop_oneof!["[ -~]{0,200}", "[A-Za-z0-9_-]{1,60}\\.[A-Za-z0-9_-]{1,200}\\.[A-Za-z0-9_-]{0,60}"]) {
        let w = world();
        prop_assert!(w.rt.block_on(w.served.issuer.verifier(API).authorize(&token)).is_err());
    }

    /// The whole token endpoint on hostile bodies: an RFC error or a token,
    /// a token only for a well-formed request with a good actor token.
    #[test]
    fn the_token_endpoint_answers_hostile_bodies_with_rfc_errors(body in body()) {
        let w = world();
        let answer = w.rt.block_on(w.served.issuer.exchange(None, &body));
        let json: Value = serde_json::from_str(&answer.body).unwrap();
        prop_assert!(
            [400u16, 401].contains(&answer.status),
            "status {} for {:?}", answer.status, String::from_utf8_lossy(&body)
        );
        prop_assert!(json["error"].is_string());
    }
}
