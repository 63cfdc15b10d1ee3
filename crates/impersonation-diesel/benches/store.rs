//! Criterion benches of the Diesel store on PostgreSQL and SQLite: `start`,
//! `resolve` and `record` through the service, each beside a bare
//! single-row SELECT / INSERT on the same pool, so overhead reads as a ratio;
//! and audit-query latency at 100k and 1M events. Run with `cargo xtask bench`.
//! `IMPERSONATION_BENCH_EVENTS` (default 1000000) sets the larger trail.
#![allow(missing_docs, clippy::panic, clippy::unwrap_used, clippy::expect_used)] // bench harness code

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration as StdDuration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use impersonation_core::{
    Activity, Actor, AuditAction, AuditDraft, AuditEvent, AuditQuery, ChainKey, Details,
    Impersonation, MemoryDirectory, Order, Principal, RelationKind, Relationship, Requester,
    SessionId, StartRequest, TenantId, UserId,
};
use impersonation_diesel::{DieselConfig, DieselStore};
use time::{Duration, OffsetDateTime};

use impersonation_testkit::scratch::{scratch_file, unique_name as unique};

async fn open(backend: &str) -> DieselStore {
    let config = match backend {
        "postgres" => DieselConfig::new("postgres://postgres@127.0.0.1:5432/test")
            .schema(unique("imptest_bench")),
        _ => DieselConfig::new(format!(
            "sqlite://{}",
            scratch_file("imptest_bench", "db").display()
        )),
    };
    let store = DieselStore::connect_and_migrate(config.max_connections(4))
        .await
        .unwrap();
    store.bench_prepare().await.unwrap();
    store
}

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

/// A trail of `n` events: 200 agents' chains, 1,000 customers in 50 tenants, over 30 days.
/// `heads` carries each agent chain's last event from one call to the next.
fn trail(n: u64, start_at: u64, heads: &mut [Option<AuditEvent>]) -> Vec<AuditEvent> {
    let t0 = time::macros::datetime!(2026-10-01 00:00 UTC);
    let agents = heads.len();
    let mut out = Vec::with_capacity(n as usize);
    for i in start_at..start_at + n {
        let a = (i % agents as u64) as usize;
        let subject = i % 1_000;
        let at = t0 + Duration::milliseconds((i * 2_592) as i64);
        let chain = ChainKey::for_agent(&UserId::from(10_000 + a as u64));
        let draft = AuditDraft::new(
            at,
            AuditAction::Access,
            Actor::user(UserId::from(10_000 + a as u64), format!("Agent {a}")),
            chain,
        )
        .subject(
            UserId::from(100_000 + subject),
            format!("Customer {subject}"),
            TenantId::from(subject % 50),
        )
        .session(SessionId::new())
        .details(
            Details::new()
                .with("description", "Viewed the bookings page.")
                .with("status", 200),
        );
        let event = draft.seal(heads[a].as_ref().map(AuditEvent::head));
        heads[a] = Some(event.clone());
        out.push(event);
    }
    out
}

fn bench_backend(c: &mut Criterion, rt: &tokio::runtime::Runtime, backend: &str) {
    let store = rt.block_on(open(backend));
    let directory = MemoryDirectory::new();
    directory.insert(customer());
    let svc = Impersonation::new(store.clone(), directory.clone());
    let request = || StartRequest::new(UserId::from(1_000_000_u64), "Customer cannot see bookings");

    let lead = agent(1);
    directory.insert(lead.clone());
    let started = rt
        .block_on(svc.start(Requester::User(&lead), request()))
        .unwrap();
    let hash = started.secret.hash().to_hex();
    let ctx = rt.block_on(svc.resolve(&started.secret)).unwrap();

    let mut group = c.benchmark_group(backend);
    group
        .sample_size(30)
        .measurement_time(StdDuration::from_secs(4))
        .warm_up_time(StdDuration::from_secs(1));
    group.bench_function("bare SELECT by unique key", |b| {
        b.iter(|| rt.block_on(store.bench_baseline_select(&hash)).unwrap())
    });
    group.bench_function("resolve", |b| {
        b.iter(|| rt.block_on(svc.resolve(&started.secret)).unwrap())
    });
    let row = AtomicU64::new(0);
    group.bench_function("bare INSERT", |b| {
        b.iter(|| {
            let id = format!("row-{}", row.fetch_add(1, Ordering::Relaxed));
            rt.block_on(store.bench_baseline_insert(&id)).unwrap()
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

    // Audit queries as the trail grows: the same queries at 100k and at 1M events.
    // `cargo test --all-targets` runs each bench once to check it works,
    // without `--bench`: then a tiny trail will do.
    let benching = std::env::args().any(|a| a == "--bench");
    let (small, large): (u64, u64) = if benching {
        let large = std::env::var("IMPERSONATION_BENCH_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        (100_000, large)
    } else {
        (1_000, 2_000)
    };
    let by_subject = AuditQuery {
        subject: Some(UserId::from(100_042_u64)),
        order: Order::Newest,
        limit: 100,
        ..AuditQuery::default()
    };
    let by_tenant_window = AuditQuery {
        tenant: Some(TenantId::from(7_u64)),
        since: Some(time::macros::datetime!(2026-10-02 00:00 UTC)),
        until: Some(time::macros::datetime!(2026-10-02 06:00 UTC)),
        limit: 100,
        ..AuditQuery::default()
    };
    let mut loaded = 0;
    let mut heads: Vec<Option<AuditEvent>> = vec![None; 200];
    for size in [small, large] {
        let events = trail(size - loaded, loaded, &mut heads);
        for chunk in events.chunks(50_000) {
            rt.block_on(store.bench_bulk_append(chunk)).unwrap();
        }
        loaded = size;
        group.bench_function(
            format!("audit by customer, newest 100, at {size} events"),
            |b| b.iter(|| rt.block_on(store_audit(&svc, &by_subject))),
        );
        group.bench_function(
            format!("audit by tenant + 6 h window, at {size} events"),
            |b| b.iter(|| rt.block_on(store_audit(&svc, &by_tenant_window))),
        );
    }
    group.finish();
    let _ = OffsetDateTime::now_utc();
}

async fn store_audit(svc: &Impersonation<DieselStore, MemoryDirectory>, q: &AuditQuery) -> usize {
    svc.audit(q).await.unwrap().events.len()
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for backend in ["postgres", "sqlite"] {
        bench_backend(c, &rt, backend);
    }
}

criterion_group!(store_benches, benches);
criterion_main!(store_benches);
