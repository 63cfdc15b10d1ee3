//! Redis over TLS (`rediss://`, feature `tls`) against a real server of
//! the test's own, started with TLS only and a certificate for `localhost`
//! issued by a test authority: with that authority as the root the store
//! works; without it, or under another name, it does not connect.
#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::unique;
use impersonation_core::{ChainKey, Impersonation, MemoryDirectory, Requester, StartRequest};
use impersonation_redis::{RedisConfig, RedisStore, RedisStoreError};
use impersonation_testkit::world::World;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A `redis-server` that speaks only TLS, and the authority behind its
/// certificate (PEM).
struct TlsServer {
    port: u16,
    ca_pem: String,
    dir: PathBuf,
    child: Child,
}

impl TlsServer {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// With more `redis-server` options (`--tls-protocols TLSv1.2`).
    fn start_with(options: &[&str]) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        let dir = std::env::temp_dir().join(unique("imptest_redis_tls"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        // The port is free when drawn, then released for the server to
        // bind: should another test's server take it meanwhile, ours says
        // so in its log and exits, and another port is drawn. Its log
        // says when it is ready, so no other server passes for it.
        for _ in 0..5 {
            let port = impersonation_testkit::scratch::released_port();
            if let Some(child) = Self::spawn(&dir, port, options) {
                return Self {
                    port,
                    ca_pem: ca.pem(),
                    dir,
                    child,
                };
            }
        }
        panic!("redis-server found its port taken five times");
    }

    /// A TLS redis-server on `port`, once its log says it listens there;
    /// `None` if it exited instead (the port was taken).
    fn spawn(dir: &std::path::Path, port: u16, options: &[&str]) -> Option<Child> {
        let log = dir.join(format!("redis-{port}.log"));
        let mut child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-auth-clients", "no"])
            .args(options)
            .arg("--tls-cert-file")
            .arg(dir.join("server.pem"))
            .arg("--tls-key-file")
            .arg(dir.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(dir.join("ca.pem"))
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (installed by cargo xtask services up)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            if said.contains("Ready to accept connections") {
                return Some(child);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server did not start; its log:\n{said}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn rediss_connects_to_a_server_verified_by_the_given_root() {
    let server = TlsServer::start();
    let url = format!("rediss://localhost:{}", server.port);
    let config = RedisConfig::new(&url)
        .unwrap()
        .namespace(&unique("imptest"))
        .unwrap()
        .tls_root_certificates_pem(server.ca_pem.clone());
    let store = RedisStore::connect(config).await.unwrap();
    // The store works over it: a session starts, resolves and stops, each
    // with its audit event, through the scripts.
    let world = World::new();
    let (agent, customer) = (world.agent(1), world.customer(1, "pinewood"));
    let directory = MemoryDirectory::new();
    directory.insert(agent.clone());
    directory.insert(customer.clone());
    let service = Impersonation::new(store, directory);
    let started = service
        .start(
            Requester::User(&agent),
            StartRequest::new(customer.id.clone(), "Customer cannot log in"),
        )
        .await
        .unwrap();
    service.resolve(&started.secret).await.unwrap();
    service.stop(&started.secret, &agent).await.unwrap();
    let report = service
        .verify_chain(&ChainKey::for_agent(&agent.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.events, 2, "the start and the stop");
}

/// Some managed services speak TLS 1.2 only (so did this crate's client,
/// built alone, until rustls' `tls12` was asked for).
#[tokio::test]
async fn a_server_that_speaks_only_tls_1_2_is_reached() {
    let server = TlsServer::start_with(&["--tls-protocols", "TLSv1.2"]);
    let url = format!("rediss://localhost:{}", server.port);
    RedisStore::connect(
        RedisConfig::new(&url)
            .unwrap()
            .namespace(&unique("imptest"))
            .unwrap()
            .tls_root_certificates_pem(server.ca_pem.clone()),
    )
    .await
    .unwrap();
}

// (Each refusal is a test of its own: the client tries a connection
// seven times over about six seconds before it gives up.)

#[tokio::test]
async fn a_server_the_system_roots_do_not_vouch_for_is_not_connected_to() {
    let server = TlsServer::start();
    let url = format!("rediss://localhost:{}", server.port);
    let refused = RedisStore::connect(RedisConfig::new(&url).unwrap()).await;
    assert!(
        matches!(&refused, Err(RedisStoreError::Connect(e)) if e.contains("UnknownIssuer")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_server_under_another_name_than_its_certificates_is_not_connected_to() {
    let server = TlsServer::start();
    // The right root, the wrong name: the certificate is for `localhost`.
    let by_address = format!("rediss://127.0.0.1:{}", server.port);
    let refused = RedisStore::connect(
        RedisConfig::new(&by_address)
            .unwrap()
            .tls_root_certificates_pem(server.ca_pem.clone()),
    )
    .await;
    assert!(
        matches!(&refused, Err(RedisStoreError::Connect(e)) if e.contains("not valid for name")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn plain_text_does_not_get_through_to_a_tls_server() {
    let server = TlsServer::start();
    // Refused, or still waiting for an answer that never comes.
    let plain = format!("redis://localhost:{}", server.port);
    let outcome = tokio::time::timeout(
        Duration::from_secs(3),
        RedisStore::connect(RedisConfig::new(&plain).unwrap()),
    )
    .await;
    assert!(!matches!(outcome, Ok(Ok(_))));
}

#[tokio::test]
async fn roots_for_a_plain_text_url_and_an_insecure_fragment_are_refused() {
    let ca = TlsServer::start().ca_pem.clone();
    for url in ["redis://localhost:6379", "redis+cluster://127.0.0.1:7001"] {
        let refused = RedisStore::connect(
            RedisConfig::new(url)
                .unwrap()
                .tls_root_certificates_pem(ca.clone()),
        )
        .await;
        assert!(
            matches!(&refused, Err(RedisStoreError::Config(e)) if e.contains("rediss://")),
            "{url}: {refused:?}"
        );
    }
    assert!(RedisConfig::new("rediss://localhost:6380/#insecure").is_err());
}
