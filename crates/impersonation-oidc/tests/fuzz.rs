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
    /// The provider's key: agents' and customers' tokens.
    op: Forger,
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
        let (served, good, ours, op) = rt.block_on(async {
            let (op, provider) = forged_provider();
            let served = serve_issuer(provider).await;
            let actor = op.op_token("sam", |_, _| {});
            let (status, body) = exchange(&served.url, &form(&actor, "olive")).await;
            assert_eq!(status, 200, "{body}");
            let (_, good) = decode(body["access_token"].as_str().unwrap());
            let ours = Forger {
                key: served.key.clone(),
            };
            (served, good, ours, op)
        });
        let issuer = served.url.clone();
        World {
            rt,
            served,
            op,
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
    fn the_token_endpoint_answers_hostile_bodies_with_rfc_errors(body in body(), authenticated in any::<bool>()) {
        let w = world();
        // With the client authenticated or not: a body that parses then
        // reaches the actor token's check.
        let authorization = authenticated.then(|| basic(CLIENT, CLIENT_SECRET));
        let answer = w.rt.block_on(w.served.issuer.exchange(authorization.as_deref(), &body));
        let json: Value = serde_json::from_str(&answer.body).unwrap();
        prop_assert!(
            [400u16, 401].contains(&answer.status),
            "status {} for {:?}", answer.status, String::from_utf8_lossy(&body)
        );
        prop_assert!(json["error"].is_string());
    }
}

// ---- The token endpoint, from a good request ----

/// The agent and customer of the endpoint's fuzzing from a good request:
/// not the verifier's (sam and olive, whose session must live on), so the
/// two run side by side. An agent has one live session at most: each
/// token issued here has its session revoked at once.
const AGENT: &str = "kim";
const CUSTOMER: &str = "oscar";
const REASON: &str = "Customer cannot see next week's bookings";

/// `*_token_type` values: the first three are the types the endpoint
/// takes; 4 leaves the parameter out, 5 puts a token in it.
const TOKEN_TYPES: [&str; 4] = [
    ACCESS_TOKEN,
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:saml2",
];

/// Bytes a changed token byte may become.
const TOKEN_BYTES: [u8; 11] = *b"AB-_.zaQ09+";

/// How a token request departs from a good one. In each field the low
/// values are good (see [`Exchange::acceptable`]), the others each break
/// the request in one way.
#[derive(Debug, Clone)]
struct Exchange {
    /// 0: Basic, 1: in the body (`client_secret_post`), 2: Basic and the
    /// same `client_id` in the body; 3: a wrong secret, 4: none, 5: a
    /// client registered without token exchange, 6: Basic and another
    /// `client_id` in the body, 7: Basic and a secret in the body.
    client: u8,
    /// 0: token exchange; 1: `client_credentials`, 2: missing, 3: twice.
    grant: u8,
    /// 0: the agent's; 1: signed by a stranger under the provider's `kid`,
    /// 2: expired, 3: delegated (names an actor), 4: of an agent without
    /// the impersonate permission, 5: for another audience, 6: one byte
    /// changed, 7: not a JWT, 8: missing.
    actor: u8,
    /// An index into [`TOKEN_TYPES`] (0-1 good; 2, an ID token, contradicts
    /// the tokens' own `typ: at+jwt`), 4: missing, 5: the token.
    actor_type: u8,
    /// 0: `requested_subject`, 1: a subject token (good with a good type);
    /// 2: a protected user, 3: an unknown user, 4: the agent, 5: both
    /// forms, 6: neither, 7: a subject token with one byte changed, 8: one
    /// signed by a stranger under the provider's `kid`.
    subject: u8,
    /// As `actor_type`, for `subject_token_type` (sent with any subject).
    subject_type: u8,
    /// 0: none, 1: the API, 2: the API twice, 3: the API as `resource`,
    /// 4: an empty value; 5: another, 6: the API and another, 7: more
    /// than `MAX_TARGETS`.
    audience: u8,
    /// 0: none, 1: a permission agent and customer hold, 2: an empty
    /// value; 3: one the agent lacks, 4: one the customer lacks,
    /// 5: malformed.
    scope: u8,
    /// 0: none, 1: access token, 2: JWT; 3: ID token, 4: garbage.
    requested: u8,
    /// 0: good; 1: missing, 2: too short, 3: too long, 4: a control
    /// character.
    reason: u8,
    /// 0: none, 1: good; 2: malformed.
    ticket: u8,
    /// 0: none, 1: an unknown parameter, 2: an empty `scope`; 3: `ticket`
    /// twice, 4: `requested_token_type` twice, 5: a client assertion.
    extra: u8,
    /// Where a changed byte is, and what it becomes.
    at: proptest::sample::Index,
    byte: u8,
    /// The order the parameters are sent in.
    order: Vec<usize>,
}

/// Mostly one of `good`, sometimes one of `bad`.
fn choice(good: std::ops::Range<u8>, bad: std::ops::Range<u8>) -> impl Strategy<Value = u8> {
    prop_oneof![12 => good, 1 => bad]
}

fn exchange_request() -> impl Strategy<Value = Exchange> {
    let who = (
        choice(0..3, 3..8),
        choice(0..1, 1..4),
        choice(0..1, 1..9),
        choice(0..2, 2..6),
        choice(0..2, 2..9),
        choice(0..2, 2..6),
    );
    let what = (
        choice(0..5, 5..8),
        choice(0..3, 3..6),
        choice(0..3, 3..5),
        choice(0..1, 1..5),
        choice(0..2, 2..3),
        choice(0..3, 3..6),
    );
    let how = (
        any::<proptest::sample::Index>(),
        proptest::sample::select(&TOKEN_BYTES[..]),
        Just((0..32).collect::<Vec<usize>>()).prop_shuffle(),
    );
    (who, what, how).prop_map(
        |(
            (client, grant, actor, actor_type, subject, subject_type),
            (audience, scope, requested, reason, ticket, extra),
            (at, byte, order),
        )| Exchange {
            client,
            grant,
            actor,
            actor_type,
            subject,
            subject_type,
            audience,
            scope,
            requested,
            reason,
            ticket,
            extra,
            at,
            byte,
            order,
        },
    )
}

impl Exchange {
    /// The oracle: the endpoint must issue a token for exactly these.
    fn acceptable(&self) -> bool {
        let subject = match self.subject {
            0 => true,
            1 => self.subject_type <= 1,
            _ => false,
        };
        self.client <= 2
            && self.grant == 0
            && self.actor == 0
            && self.actor_type <= 1
            && subject
            && self.audience <= 4
            && self.scope <= 2
            && self.requested <= 2
            && self.reason == 0
            && self.ticket <= 1
            && self.extra <= 2
    }

    /// `token` with the byte at `at` changed.
    fn altered(&self, token: &str) -> String {
        let mut bytes = token.as_bytes().to_vec();
        let i = self.at.index(bytes.len());
        bytes[i] = if bytes[i] == self.byte {
            if self.byte == b'A' { b'B' } else { b'A' }
        } else {
            self.byte
        };
        String::from_utf8(bytes).unwrap()
    }

    /// The request: its `Authorization` header, its body, and the tokens
    /// and secrets it holds (which no answer may repeat).
    fn build(&self, w: &World) -> (Option<String>, Vec<u8>, Vec<String>) {
        let op = &w.op;
        // A stranger's signature under the provider's key id.
        let forged = |sub: &str| w.stranger.op_token(sub, |h, _| h["kid"] = json!(op.kid()));
        let actor = match self.actor {
            0 | 8 => op.op_token(AGENT, |_, _| {}),
            1 => forged(AGENT),
            2 => op.op_token(AGENT, |_, p| {
                p["iat"] = json!(now() - 7200);
                p["exp"] = json!(now() - 60);
            }),
            3 => op.op_token(AGENT, |_, p| p["act"] = json!({"sub": "lee"})),
            4 => op.op_token("mallory", |_, _| {}),
            5 => op.op_token(AGENT, |_, p| p["aud"] = json!("https://other.test/")),
            6 => self.altered(&op.op_token(AGENT, |_, _| {})),
            _ => AGENT.to_owned(),
        };
        let subject_token = match self.subject {
            1 | 5 => Some(op.op_token(CUSTOMER, |_, _| {})),
            7 => Some(self.altered(&op.op_token(CUSTOMER, |_, _| {}))),
            8 => Some(forged(CUSTOMER)),
            _ => None,
        };
        let mut params: Vec<(&str, String)> = Vec::new();
        let mut add = |name: &'static str, value: &str| params.push((name, value.to_owned()));
        match self.grant {
            0 => add("grant_type", TOKEN_EXCHANGE),
            1 => add("grant_type", "client_credentials"),
            2 => {}
            _ => {
                add("grant_type", TOKEN_EXCHANGE);
                add("grant_type", TOKEN_EXCHANGE);
            }
        }
        if self.actor != 8 {
            add("actor_token", &actor);
        }
        let token_type = |mode: u8, token: &str| match mode {
            0..=3 => Some(TOKEN_TYPES[usize::from(mode)].to_owned()),
            4 => None,
            _ => Some(token.to_owned()),
        };
        if let Some(t) = token_type(self.actor_type, &actor) {
            add("actor_token_type", &t);
        }
        match self.subject {
            0 | 5 => add("requested_subject", CUSTOMER),
            2 => add("requested_subject", "ada"),
            3 => add("requested_subject", "nobody"),
            4 => add("requested_subject", AGENT),
            _ => {}
        }
        if let Some(token) = &subject_token {
            add("subject_token", token);
        }
        let typed = subject_token.as_deref().unwrap_or(&actor);
        if let Some(t) = token_type(self.subject_type, typed) {
            add("subject_token_type", &t);
        }
        match self.audience {
            0 => {}
            1 => add("audience", API),
            2 => {
                add("audience", API);
                add("audience", API);
            }
            3 => add("resource", API),
            4 => add("audience", ""),
            5 => add("audience", "https://other.test/"),
            6 => {
                add("audience", API);
                add("resource", "https://other.test/");
            }
            _ => {
                for _ in 0..=MAX_TARGETS {
                    add("audience", API);
                }
            }
        }
        match self.scope {
            0 => {}
            1 => add("scope", "bookings:read"),
            2 => add("scope", ""),
            3 => add("scope", "bookings:write"),
            4 => add("scope", "impersonation:start"),
            _ => add("scope", "bookings:read  bookings:read"),
        }
        match self.requested {
            0 => {}
            1 => add("requested_token_type", ACCESS_TOKEN),
            2 => add("requested_token_type", TOKEN_TYPES[1]),
            3 => add("requested_token_type", TOKEN_TYPES[2]),
            _ => add("requested_token_type", "Bearer"),
        }
        match self.reason {
            0 => add("reason", REASON),
            1 => {}
            2 => add("reason", "short"),
            3 => add("reason", &"x".repeat(501)),
            _ => add("reason", "Customer \u{1b}[2J cannot log in"),
        }
        match self.ticket {
            0 => {}
            1 => add("ticket", "SUP-1234"),
            _ => add("ticket", "SUP 1234!"),
        }
        match self.extra {
            0 => {}
            1 => add("x-trace", "7"),
            2 => add("scope", ""),
            3 => {
                add("ticket", "SUP-1234");
                add("ticket", "SUP-1234");
            }
            4 => {
                add("requested_token_type", ACCESS_TOKEN);
                add("requested_token_type", ACCESS_TOKEN);
            }
            _ => add("client_assertion", "a.b.c"),
        }
        let header = |id: &str, secret: &str| Some(basic(id, secret));
        let authorization = match self.client {
            0 => header(CLIENT, CLIENT_SECRET),
            1 => {
                add("client_id", CLIENT);
                add("client_secret", CLIENT_SECRET);
                None
            }
            2 => {
                add("client_id", CLIENT);
                header(CLIENT, CLIENT_SECRET)
            }
            3 => header(CLIENT, "not-the-secret-9f2"),
            4 => None,
            5 => header("reporting", "reporting-secret"),
            6 => {
                add("client_id", "reporting");
                header(CLIENT, CLIENT_SECRET)
            }
            _ => {
                add("client_id", CLIENT);
                add("client_secret", CLIENT_SECRET);
                header(CLIENT, CLIENT_SECRET)
            }
        };
        // Sent in a shuffled order: no parameter's place matters.
        let mut ordered: Vec<(usize, (&str, String))> = params
            .into_iter()
            .enumerate()
            .map(|(i, p)| (self.order.get(i).copied().unwrap_or(i), p))
            .collect();
        ordered.sort_by_key(|(key, _)| *key);
        let pairs: Vec<(&str, &str)> = ordered.iter().map(|(_, (k, v))| (*k, v.as_str())).collect();
        let mut kept = vec![
            actor,
            CLIENT_SECRET.to_owned(),
            "not-the-secret-9f2".to_owned(),
            "reporting-secret".to_owned(),
        ];
        kept.extend(subject_token);
        (authorization, encode(&pairs).into_bytes(), kept)
    }
}

/// The RFC 6749 §5.2 and RFC 8693 codes the token endpoint may refuse a
/// request with (`temporarily_unavailable` would be an outage: none here).
const REFUSALS: [&str; 6] = [
    "invalid_request",
    "invalid_client",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_target",
    "invalid_scope",
];

proptest! {
    #![proptest_config(config())]

    /// The whole token endpoint from a good request (an authenticated
    /// client, the agent's and the customer's good tokens), one parameter
    /// at a time made hostile: client authentication, the actor and
    /// subject tokens (their bytes included), their types, audience,
    /// scope, requested token type, reason, ticket, extra and repeated
    /// parameters. An RFC error or a token that verifies, a token exactly
    /// for the good requests, and no token or secret in any answer.
    #[test]
    fn the_token_endpoint_issues_exactly_for_good_requests(r in exchange_request()) {
        let w = world();
        let (authorization, body, kept) = r.build(w);
        let answer = w.rt.block_on(w.served.issuer.exchange(authorization.as_deref(), &body));
        let json: Value = serde_json::from_str(&answer.body).unwrap();
        let header = |name: &str| {
            answer.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        };
        prop_assert_eq!(header("Cache-Control"), Some("no-store"));
        for secret in &kept {
            prop_assert!(!answer.body.contains(secret.as_str()), "{:?} repeats what it was sent", answer);
        }
        prop_assert_eq!(answer.status == 200, r.acceptable(), "{:?}: {}", r, answer.body);
        if answer.status == 200 {
            let token = json["access_token"].as_str().unwrap();
            let context = w.rt.block_on(w.served.issuer.verifier(API).authorize(token));
            prop_assert!(context.is_ok(), "{:?}", context.err());
            let verified = w.served.issuer.verifier(API).verify(token).unwrap();
            prop_assert_eq!(
                (verified.subject.as_str(), verified.actor.as_str(), verified.client_id.as_deref()),
                (CUSTOMER, AGENT, Some(CLIENT))
            );
            prop_assert_eq!(&json["token_type"], "Bearer");
            let issued = if r.requested == 2 { TOKEN_TYPES[1] } else { ACCESS_TOKEN };
            prop_assert_eq!(&json["issued_token_type"], issued);
            prop_assert!(json["expires_in"].as_i64().is_some_and(|s| (1..=300).contains(&s)), "{}", json);
            let scope = (r.scope == 1).then(|| json!("bookings:read"));
            prop_assert_eq!(json.get("scope"), scope.as_ref());
            // One live session per agent: this one ends before the next case.
            w.rt.block_on(w.served.service.revoke_all_for_agent(
                &impersonation_core::UserId::new(AGENT).unwrap(),
                impersonation_core::Initiator::System,
                "fuzz case done",
            )).unwrap();
        } else {
            let error = json["error"].as_str().unwrap_or_default();
            prop_assert!(REFUSALS.contains(&error), "{:?}: {}", r, answer.body);
            prop_assert!(json["error_description"].is_string());
            let client_failed = error == "invalid_client";
            prop_assert_eq!(answer.status, if client_failed { 401 } else { 400 });
            prop_assert_eq!(header("WWW-Authenticate").is_some(), client_failed);
        }
    }
}
