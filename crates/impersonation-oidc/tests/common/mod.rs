//! What the OIDC tests share: a real OpenID provider (the npm package
//! `oidc-provider`, run by Node on loopback), the app's people and service,
//! this crate's issuer served over HTTP, and a forger of hostile tokens.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::Router;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use impersonation_core::{
    Impersonation, MemoryDirectory, MemoryStore, Principal, RelationKind, Relationship, Role,
    TenantId, UserId,
};
use impersonation_oidc::{
    ClientRegistration, Issuer, IssuerConfig, KeyRing, Provider, SigningKey, http_client,
};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use sha2_10::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The API the agents' tokens are for, and our tokens' audience.
pub const API: &str = "https://api.test/";
/// Our registered client.
pub const CLIENT: &str = "support-console";
pub const CLIENT_SECRET: &str = "console-secret";

pub type Service = Impersonation<MemoryStore, MemoryDirectory>;

/// `oidc-provider` on a free loopback port; killed when dropped.
pub struct TestProvider {
    _child: Child,
    pub issuer: String,
    /// Where it listens (its issuer, unless a proxy stands in front).
    pub direct: String,
}

fn provider_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/provider")
}

/// The Node.js that runs the provider: the build `cargo xtask services up`
/// put beside it when the machine's was missing or too old, else the
/// machine's own.
fn node_program() -> PathBuf {
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "x64",
    };
    let own = provider_dir().join(format!(
        ".node-runtime/node_modules/node-linux-{arch}/bin/node"
    ));
    if own.exists() {
        own
    } else {
        PathBuf::from("node")
    }
}

pub use impersonation_testkit::scratch::released_port as free_port;

/// How a provider that never said it was listening is reported.
const NO_READY: &str = "no READY within 60 s";

impl TestProvider {
    pub async fn start() -> Self {
        Self::start_as(None).await
    }

    /// As [`TestProvider::start`], naming itself `issuer` (a proxy's
    /// address) instead of its own.
    pub async fn start_as(issuer: Option<&str>) -> Self {
        let dir = provider_dir();
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "run `cargo xtask services up` to install the test provider (npm ci in {})",
            dir.display()
        );
        // The port is free when drawn, then released for the provider to
        // bind: should another test's server take it meanwhile, the
        // provider exits (EADDRINUSE), and another port is drawn. A
        // provider that says nothing for a minute (once, under a full CI
        // run, for no reason its output showed) is stopped and started
        // again, once, on another port.
        let (mut attempt, mut silent) = (0, 0);
        loop {
            attempt += 1;
            match Self::start_on(free_port(), issuer).await {
                Ok(provider) => return provider,
                Err(why) if attempt < 5 && why.contains("EADDRINUSE") => {}
                Err(why) if silent == 0 && why.contains(NO_READY) => {
                    silent += 1;
                    eprintln!("starting the provider again: {why}");
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    async fn start_on(port: u16, issuer: Option<&str>) -> Result<Self, String> {
        let dir = provider_dir();
        let mut child = Command::new(node_program())
            .arg("server.mjs")
            .arg(port.to_string())
            .arg(API)
            .args(issuer)
            .current_dir(&dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (Node.js) must be installed");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // What the provider says on stderr, kept (the last 64 lines) to
        // explain a provider that does not come up.
        let said = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = Arc::clone(&said);
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                let mut kept = kept.lock().unwrap();
                if kept.len() == 64 {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        let started = std::time::Instant::now();
        let ready = tokio::time::timeout(StdDuration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(issuer) = line.strip_prefix("READY ") {
                    return Some(issuer.to_owned());
                }
            }
            None
        })
        .await;
        let ready = match ready {
            Ok(Some(issuer)) => issuer,
            outcome => {
                let status = child.try_wait();
                // Where a live one waits (its state and kernel wait
                // channel), and who holds the port, to tell a stall from a
                // slow start next time.
                let waits = child.id().map(|pid| {
                    let read = |what: &str| {
                        std::fs::read_to_string(format!("/proc/{pid}/{what}")).unwrap_or_default()
                    };
                    let stat = read("stat");
                    let state = stat
                        .rsplit(')')
                        .next()
                        .unwrap_or("")
                        .split_whitespace()
                        .next();
                    format!("state {state:?}, wchan {:?}", read("wchan"))
                });
                let bound = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
                // What it said before its stderr closed.
                tokio::time::sleep(StdDuration::from_millis(100)).await;
                let said: Vec<String> = said.lock().unwrap().iter().cloned().collect();
                return Err(format!(
                    "the provider on port {port} did not come up ({}, after {:?}; process: {status:?}, {waits:?}; port accepts connections: {bound}); its stderr:\n{}",
                    if outcome.is_err() {
                        NO_READY
                    } else {
                        "its stdout closed"
                    },
                    started.elapsed(),
                    said.join("\n")
                ));
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            _child: child,
            issuer: ready,
            direct: format!("http://127.0.0.1:{port}"),
        })
    }

    /// A user's access token for the API, from the provider's test grant.
    pub async fn token_for(&self, user: &str) -> String {
        self.token_from(("agent-app", "agent-app-secret"), user, "api")
            .await
    }

    /// A user's access token for the API issued to `client` (id, secret),
    /// granting `scope`.
    pub async fn token_from(&self, client: (&str, &str), user: &str, scope: &str) -> String {
        let response = http_client()
            .unwrap()
            .post(format!("{}/token", self.direct))
            .basic_auth(client.0, Some(client.1))
            .form(&[
                ("grant_type", "urn:test:grant-type:login"),
                ("username", user),
                ("resource", API),
                ("token_scope", scope),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "login grant for {user}");
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }
}

pub fn agent(id: &str) -> Principal {
    Principal::new(
        UserId::new(id).unwrap(),
        format!("Agent {id}"),
        TenantId::new("vendor").unwrap(),
    )
    .with_permissions(["impersonation:start", "bookings:read"])
    .with_relationship(Relationship::all_tenants(
        RelationKind::Support,
        "s",
        "Support",
    ))
}

pub fn customer(id: &str) -> Principal {
    Principal::new(
        UserId::new(id).unwrap(),
        format!("Customer {id}"),
        TenantId::new("pinewood").unwrap(),
    )
    .with_permissions(["bookings:read"])
}

/// The app's people: agents sam and kim, customers olive and oscar, the
/// admin ada (protected), and mallory, who may not impersonate.
pub fn directory() -> MemoryDirectory {
    let directory = MemoryDirectory::new();
    for p in [
        agent("sam"),
        agent("kim"),
        customer("olive"),
        customer("oscar"),
        Principal::new(
            UserId::new("ada").unwrap(),
            "Ada Admin",
            TenantId::new("vendor").unwrap(),
        )
        .with_role(Role::new("admin")),
        customer("mallory"),
    ] {
        directory.insert(p);
    }
    directory
}

/// A test RSA key: its PEM for the issuer, the key itself for forging.
pub fn rsa_key() -> (rsa::RsaPrivateKey, SigningKey) {
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
    let pem = key.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
    let signing = SigningKey::from_pem(&pem).unwrap();
    (key, signing)
}

/// The PKCS#1 PEM of `key`'s public half, as a verifier is given it.
pub fn public_pem(key: &rsa::RsaPrivateKey) -> String {
    use rsa::pkcs1::EncodeRsaPublicKey;
    key.to_public_key()
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap()
}

/// POSTs `token` to our issuer's revocation endpoint (RFC 7009), with the
/// client's credentials when `authenticated`; answers the status.
pub async fn revoke(url: &str, token: &str, authenticated: bool) -> u16 {
    let request = http_client()
        .unwrap()
        .post(format!("{url}/revoke"))
        .form(&[("token", token)]);
    let request = if authenticated {
        request.basic_auth(CLIENT, Some(CLIENT_SECRET))
    } else {
        request
    };
    request.send().await.unwrap().status().as_u16()
}

/// This crate's issuer over HTTP on loopback, trusting `provider`.
pub struct Served {
    pub issuer: Issuer,
    pub url: String,
    pub service: Arc<Service>,
    pub directory: MemoryDirectory,
    pub key: rsa::RsaPrivateKey,
}

pub async fn serve_issuer(provider: Provider) -> Served {
    serve_issuer_with(provider, |config| config).await
}

/// [`serve_issuer`] with its settings changed by `configure`.
pub async fn serve_issuer_with(
    provider: Provider,
    configure: impl FnOnce(IssuerConfig) -> IssuerConfig,
) -> Served {
    let directory = directory();
    let service = Arc::new(Impersonation::new(MemoryStore::new(), directory.clone()));
    let (key, signing) = rsa_key();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let issuer = Issuer::new(
        configure(
            IssuerConfig::new(&url)
                .unwrap()
                .client(ClientRegistration::new(CLIENT, CLIENT_SECRET, [API]))
                .client(
                    ClientRegistration::new("reporting", "reporting-secret", [API])
                        .without_token_exchange(),
                ),
        ),
        KeyRing::new(signing),
        provider,
        service.clone(),
    );
    let app = issuer_routes(issuer.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Served {
        issuer,
        url,
        service,
        directory,
        key,
    }
}

/// The issuer's endpoints, as the Axum binding mounts them.
pub fn issuer_routes(issuer: Issuer) -> Router {
    impersonation_axum::oidc::routes(issuer)
}

/// POSTs a token exchange to our issuer.
pub async fn exchange(url: &str, params: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let response = http_client()
        .unwrap()
        .post(format!("{url}/token"))
        .basic_auth(CLIENT, Some(CLIENT_SECRET))
        .form(params)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
    )
}

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// An `Authorization: Basic` value for a client id and secret.
pub fn basic(id: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

/// Form fields as an `application/x-www-form-urlencoded` body.
pub fn encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .fold(
            form_urlencoded::Serializer::new(String::new()),
            |mut f, (k, v)| {
                f.append_pair(k, v);
                f
            },
        )
        .finish()
}

/// The standard form of an impersonation request for `subject` by the
/// holder of `actor_token`.
pub fn form<'a>(actor_token: &'a str, subject: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", TOKEN_EXCHANGE),
        ("actor_token", actor_token),
        ("actor_token_type", ACCESS_TOKEN),
        ("requested_subject", subject),
        ("audience", API),
        ("reason", "Customer cannot see next week's bookings"),
    ]
}

/// Builds JWTs by hand, signed (or not) as a test says.
pub struct Forger {
    pub key: rsa::RsaPrivateKey,
}

impl Forger {
    pub fn kid(&self) -> String {
        let n = URL_SAFE_NO_PAD.encode(self.key.n().to_bytes_be());
        let e = URL_SAFE_NO_PAD.encode(self.key.e().to_bytes_be());
        let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }

    pub fn unsigned(header: &serde_json::Value, payload: &serde_json::Value) -> String {
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        )
    }

    /// RS256 over header and payload as given.
    pub fn sign(&self, header: &serde_json::Value, payload: &serde_json::Value) -> String {
        let input = Self::unsigned(header, payload);
        let digest = Sha256::digest(input.as_bytes());
        let signature = self
            .key
            .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest)
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// HS256 with `secret` (for the algorithm-confusion test).
    pub fn hmac(header: &serde_json::Value, payload: &serde_json::Value, secret: &[u8]) -> String {
        use hmac::Mac;
        let input = Self::unsigned(header, payload);
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(input.as_bytes());
        format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }
}

/// The provider's issuer URL when its keys are the test's own.
pub const OP: &str = "https://login.test";

/// A provider whose keys the test holds (to forge its tokens at will).
pub fn forged_provider() -> (Forger, Provider) {
    let (key, signing) = rsa_key();
    let keys = impersonation_oidc::openidconnect::core::CoreJsonWebKeySet::new(vec![
        signing.public_jwk().clone(),
    ]);
    (Forger { key }, Provider::with_keys(OP, API, keys).unwrap())
}

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Forger {
    /// A provider access token for `sub`, as `oidc-provider` shapes them,
    /// after `tweak` has had its way with header and payload.
    pub fn op_token(
        &self,
        sub: &str,
        tweak: impl FnOnce(&mut serde_json::Value, &mut serde_json::Value),
    ) -> String {
        let mut header = serde_json::json!({"alg": "RS256", "typ": "at+jwt", "kid": self.kid()});
        let mut payload = serde_json::json!({
            "iss": OP, "sub": sub, "aud": API, "iat": now(), "exp": now() + 600,
            "client_id": "agent-app", "jti": uuid::Uuid::now_v7().to_string(), "scope": "api",
        });
        tweak(&mut header, &mut payload);
        self.sign(&header, &payload)
    }
}

/// A JWT's header and payload, decoded without any check.
pub fn decode(token: &str) -> (serde_json::Value, serde_json::Value) {
    let mut parts = token.split('.');
    let mut part = || {
        let bytes = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    (part(), part())
}
