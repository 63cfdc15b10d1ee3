//! PostgreSQL over TLS (`sslmode=require`, feature `postgres-tls`) against
//! the real server, whose certificate is Debian's self-signed one
//! (`ssl = on` is Debian's default; the certificate names the machine as
//! it was when the package was installed, `localhost` on some images and
//! `hostname -f` on others): given as the root, the store connects
//! encrypted, by that name (at 127.0.0.1, `hostaddr`); without it, or
//! under another name, it does not connect at all.
#![cfg(feature = "postgres-tls")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::unique;
use impersonation_core::{Impersonation, MemoryDirectory, Requester, StartRequest};
use impersonation_diesel::{DieselConfig, DieselError, DieselStore};
use impersonation_testkit::world::World;

/// The server's certificate (Debian's `ssl-cert` package makes it).
const SERVER_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn server_cert() -> Vec<u8> {
    std::fs::read(SERVER_CERT).unwrap_or_else(|e| {
        panic!("{SERVER_CERT}: {e} (PostgreSQL from Debian's packages, with ssl = on, is expected)")
    })
}

/// The name the server's certificate is for: its first DNS name.
fn server_name() -> String {
    use x509_cert::der::oid::AssociatedOid as _;
    use x509_cert::der::{Decode as _, DecodePem as _};
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let cert = x509_cert::Certificate::from_pem(server_cert()).unwrap();
    cert.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id == SubjectAltName::OID)
        .filter_map(|e| SubjectAltName::from_der(e.extn_value.as_bytes()).ok())
        .flat_map(|san| san.0)
        .find_map(|name| match name {
            GeneralName::DnsName(dns) => Some(dns.to_string()),
            _ => None,
        })
        .expect("a DNS name in the server's certificate")
}

/// The server by the name its certificate is for, at 127.0.0.1, over TLS.
fn by_name(extra: &str) -> String {
    format!(
        "postgres://postgres@{}:5432/test?hostaddr=127.0.0.1&sslmode=require{extra}",
        server_name()
    )
}

/// Whether the server sees the connection named `app` as encrypted.
async fn encrypted(app: &str) -> Vec<bool> {
    let (client, connection) = tokio_postgres::connect(common::PG_URL, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<_, bool>(0))
        .collect()
}

#[tokio::test]
async fn sslmode_require_connects_encrypted_to_a_server_verified_by_the_given_root() {
    let app = unique("imptest_tls");
    let url = by_name(&format!("&application_name={app}"));
    let store = DieselStore::connect_and_migrate(
        DieselConfig::new(url)
            .schema(unique("imptest"))
            .max_connections(2)
            .tls_root_certificates_pem(server_cert()),
    )
    .await
    .unwrap();
    // The store works over it: a session starts, with its audit event.
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
    // Every connection the store holds is encrypted, and there is one.
    let seen = encrypted(&app).await;
    assert!(!seen.is_empty(), "the store's connections are listed");
    assert!(seen.iter().all(|ssl| *ssl), "{seen:?}");
}

#[tokio::test]
async fn a_server_the_roots_do_not_vouch_for_is_not_connected_to() {
    // Mozilla's roots (the default) do not include a self-signed certificate.
    let refused = DieselStore::connect(DieselConfig::new(by_name("")).max_connections(1)).await;
    assert!(
        matches!(&refused, Err(DieselError::Connect(e)) if e.contains("UnknownIssuer")),
        "{refused:?}"
    );
    // The right root, the wrong name: the certificate names the machine,
    // not its address.
    let by_address = "postgres://postgres@127.0.0.1:5432/test?sslmode=require";
    let refused = DieselStore::connect(
        DieselConfig::new(by_address)
            .max_connections(1)
            .tls_root_certificates_pem(server_cert()),
    )
    .await;
    assert!(
        matches!(&refused, Err(DieselError::Connect(e)) if e.contains("not valid for name")),
        "{refused:?}"
    );
}

/// A URL option the driver does not know is named in the error (it is in
/// the driver's error's source, not its message).
#[tokio::test]
async fn an_unknown_url_option_is_named() {
    let refused = DieselStore::connect(
        DieselConfig::new(by_name("&sslrootcert=/etc/ssl/ca.pem"))
            .max_connections(1)
            .tls_root_certificates_pem(server_cert()),
    )
    .await;
    assert!(
        matches!(&refused, Err(DieselError::Connect(e)) if e.contains("sslrootcert")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn roots_that_are_not_certificates_are_a_configuration_error() {
    let url = by_name("");
    for pem in [&b"not a certificate"[..], b""] {
        let refused = DieselStore::connect(
            DieselConfig::new(url.as_str())
                .max_connections(1)
                .tls_root_certificates_pem(pem),
        )
        .await;
        assert!(
            matches!(refused, Err(DieselError::Config(_))),
            "{refused:?}"
        );
    }
}
