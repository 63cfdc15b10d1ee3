//! Criterion benches of the Redis store, on one server and on the cluster:
//! `start`, `resolve` and `record` through the service, beside a bare GET
//! and SET on the same connection. Run with `cargo xtask bench`.
#![allow(missing_docs, clippy::panic, clippy::unwrap_used, clippy::expect_used)] // bench harness code

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use impersonation_core::{
    Activity, Impersonation, MemoryDirectory, Principal, RelationKind, Relationship, Requester,
    StartRequest, TenantId, UserId,
};
use impersonation_redis::{RedisConfig, RedisStore};

fn customer() -> Principal {
    let t = TenantId::from(1_u64);
    Principal::new(UserId::from(1_000_000_u64), "Olive Owner", t.clone())
        .with_permissions(["bookings:read", "bookings:write"])
        .with_attribute("timezone", "Europe/Lisbon")
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

fn bench_target(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, url: &str) {
    let ns = impersonation_testkit::scratch::unique_name("imptest_bench");
    let store = rt
        .block_on(RedisStore::connect(
            RedisConfig::new(url).unwrap().namespace(&ns).unwrap(),
        ))
        .unwrap();
    let directory = MemoryDirectory::new();
    directory.insert(customer());
    let svc = Impersonation::new(store.clone(), directory.clone());
    let request = || StartRequest::new(UserId::from(1_000_000_u64), "Customer cannot see bookings");
    let lead = agent(1);
    directory.insert(lead.clone());
    let started = rt
        .block_on(svc.start(Requester::User(&lead), request()))
        .unwrap();
    let ctx = rt.block_on(svc.resolve(&started.secret)).unwrap();
    rt.block_on(store.bench_set("k", "a value of about a session id's size"))
        .unwrap();

    let mut group = c.benchmark_group(name);
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("bare GET", |b| {
        b.iter(|| rt.block_on(store.bench_get("k")).unwrap())
    });
    group.bench_function("resolve", |b| {
        b.iter(|| rt.block_on(svc.resolve(&started.secret)).unwrap())
    });
    let n = AtomicU64::new(0);
    group.bench_function("bare SET", |b| {
        b.iter(|| {
            rt.block_on(store.bench_set(
                &format!("s{}", n.fetch_add(1, Ordering::Relaxed) % 1000),
                "v",
            ))
            .unwrap()
        })
    });
    group.bench_function("record", |b| {
        b.iter(|| {
            rt.block_on(svc.record(&ctx, Activity::access("Viewed bookings.")))
                .unwrap()
        })
    });
    let next = AtomicU64::new(100);
    group.bench_function("start", |b| {
        b.iter_batched(
            || {
                let a = agent(next.fetch_add(1, Ordering::Relaxed));
                directory.insert(a.clone());
                a
            },
            |a| {
                rt.block_on(svc.start(Requester::User(&a), request()))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    bench_target(c, &rt, "redis", "redis://127.0.0.1:6379");
    bench_target(
        c,
        &rt,
        "redis-cluster",
        "redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
    );
}

criterion_group!(store_benches, benches);
criterion_main!(store_benches);
