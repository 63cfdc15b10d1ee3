//! Secrets never reach a log line. Alone in its own test binary: tracing
//! caches each callsite's interest process-wide, so a thread-scoped
//! subscriber racing other tests' threads could miss events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failed test

use std::io::Write;
use std::sync::{Arc, Mutex};

use impersonation_core::{
    AttributeRule, Impersonation, Mask, MemoryDirectory, MemoryStore, Principal, ProjectionRules,
    RelationKind, Relationship, Requester, StartRequest, TenantId, UserId,
};

fn agent(name: &str) -> Principal {
    Principal::new(
        UserId::new(name).unwrap(),
        name,
        TenantId::new("vendor").unwrap(),
    )
    .with_permissions(["impersonation:start", "bookings:read"])
    .with_relationship(Relationship::all_tenants(
        RelationKind::Support,
        "support",
        "Support",
    ))
}

fn customer(name: &str) -> Principal {
    Principal::new(
        UserId::new(name).unwrap(),
        format!("{name} owner"),
        TenantId::new("pinewood").unwrap(),
    )
    .with_permission("bookings:read")
    .with_attribute("card_number", "4242424242424242")
    .with_attribute("phone", "+47 5550 1234")
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn secrets_and_sensitive_values_never_reach_a_log_line() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let token = tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let directory = MemoryDirectory::new();
            for p in [agent("sam"), agent("kim"), customer("olive")] {
                directory.insert(p);
            }
            let service = Impersonation::new(MemoryStore::new(), directory).with_projection(
                ProjectionRules::new()
                    .rule("card_number", AttributeRule::Mask(Mask::default()))
                    .rule("phone", AttributeRule::Copy),
            );
            let request = StartRequest::new(
                UserId::new("olive").unwrap(),
                "Customer cannot see bookings",
            );
            let started = service
                .start(Requester::User(&agent("sam")), request)
                .await
                .unwrap();
            let ctx = service.resolve(&started.secret).await.unwrap();
            tracing::info!(?ctx, secret = ?started.secret, "context");
            let _ = service.stop(&started.secret, &agent("kim")).await;
            service.stop(&started.secret, &agent("sam")).await.unwrap();
            started.secret.expose().to_owned()
        })
    });
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("impersonation.agent=sam"),
        "spans carry impersonation.* fields:\n{logs}"
    );
    assert!(logs.contains("impersonation.session="));
    let random_part = token.rsplit('.').next().unwrap();
    assert!(
        !logs.contains(random_part),
        "the bearer secret reached the logs"
    );
    assert!(
        !logs.contains("4242424242424242"),
        "a card number reached the logs"
    );
    // The context's shadow user names its attributes and how it holds
    // them, never their values: not the masked card, not a copied phone.
    assert!(
        logs.contains("card_number") && logs.contains("masked"),
        "{logs}"
    );
    assert!(
        !logs.contains('\u{2022}'),
        "a masked value reached the logs"
    );
    assert!(
        !logs.contains("5550 1234"),
        "a customer's phone reached the logs"
    );
}
