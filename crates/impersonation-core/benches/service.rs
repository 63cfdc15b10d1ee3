#![allow(missing_docs, clippy::panic)] // criterion_main! generates an undocumented main
//! Criterion benches of the service on `MemoryStore`: `start`, `resolve`
//! (reading the store and re-checking the policy on every read, or every
//! 60 s; and reusing a session resolved a moment ago, as by default), and
//! `record`. Run with `cargo xtask bench`.

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use impersonation_core::{
    Activity, AttributeRule, Config, Impersonation, Mask, MemoryDirectory, MemoryStore, Principal,
    ProjectionRules, RelationKind, Relationship, Requester, StartRequest, TenantId, UserId,
};
use time::Duration;

fn customer() -> Principal {
    let t = TenantId::from(1_u64);
    Principal::new(UserId::from(1_000_000_u64), "Olive Owner", t.clone())
        .with_permissions(["bookings:read", "bookings:write", "billing:manage"])
        .with_attribute("timezone", "Europe/Lisbon")
        .with_attribute("card_number", "4242424242424242")
        .with_attribute("password_hash", "$argon2id$…")
        .with_relationship(Relationship::new(
            RelationKind::Company,
            "pw",
            "Pinewood",
            [t],
        ))
}

fn agent(n: u64) -> Principal {
    Principal::new(UserId::from(n), format!("Agent {n}"), TenantId::from(2_u64))
        .with_permissions(["impersonation:start", "bookings:read", "bookings:write"])
        .with_relationship(Relationship::all_tenants(
            RelationKind::Support,
            "s",
            "Support",
        ))
}

fn service(config: Config) -> Impersonation<MemoryStore, MemoryDirectory> {
    let directory = MemoryDirectory::new();
    directory.insert(customer());
    Impersonation::new(MemoryStore::new(), directory)
        .with_config(config)
        .with_projection(
            ProjectionRules::new()
                .rule("timezone", AttributeRule::Copy)
                .rule("card_number", AttributeRule::Mask(Mask::default())),
        )
}

fn benches(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let request = || StartRequest::new(UserId::from(1_000_000_u64), "Customer cannot see bookings");

    let svc = service(Config::default());
    let next = AtomicU64::new(1);
    c.bench_function("start", |b| {
        b.iter_batched(
            || {
                let a = agent(next.fetch_add(1, Ordering::Relaxed));
                svc.directory().insert(a.clone());
                a
            },
            |a| rt.block_on(svc.start(Requester::User(&a), request())),
            BatchSize::SmallInput,
        )
    });

    for (name, reuse, recheck) in [
        (
            "resolve (store read, re-check every read)",
            Duration::ZERO,
            Duration::ZERO,
        ),
        (
            "resolve (store read, re-check every 60 s)",
            Duration::ZERO,
            Duration::seconds(60),
        ),
        (
            "resolve (reused, the default)",
            Duration::seconds(60),
            Duration::ZERO,
        ),
    ] {
        let svc = service(Config {
            reuse_interval: reuse,
            recheck_interval: recheck,
            touch_interval: Duration::ZERO,
        });
        let a = agent(0);
        svc.directory().insert(a.clone());
        let started = match rt.block_on(svc.start(Requester::User(&a), request())) {
            Ok(s) => s,
            Err(e) => panic!("start: {e}"),
        };
        c.bench_function(name, |b| {
            b.iter(|| rt.block_on(svc.resolve(&started.secret)))
        });
        if reuse == Duration::ZERO && recheck == Duration::ZERO {
            let ctx = match rt.block_on(svc.resolve(&started.secret)) {
                Ok(ctx) => ctx,
                Err(e) => panic!("resolve: {e}"),
            };
            c.bench_function("record", |b| {
                b.iter(|| {
                    rt.block_on(svc.record(
                        &ctx,
                        Activity::access("Viewed bookings.").detail("status", 200),
                    ))
                })
            });
        }
    }
}

criterion_group!(service_benches, benches);
criterion_main!(service_benches);
