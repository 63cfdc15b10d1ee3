//! The HTTP walkthrough against the demo on every store it offers: the
//! same story, the same audit trail, verified chains.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use campground_demo::{Demo, StoreKind, walkthrough};
use impersonation_testkit::scratch::{scratch_file, unique_name};

async fn serve(demo: &Arc<Demo>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = demo.router(&base).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// The walkthrough's output, played against `demo`.
async fn played(demo: &Arc<Demo>) -> String {
    let base = serve(demo).await;
    let mut out = Vec::new();
    walkthrough::run(&base, &mut out, false).await.unwrap();
    String::from_utf8(out).unwrap()
}

/// The actions of the audit table, in order.
fn actions(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(2)
        .filter_map(|l| l.split(" | ").nth(1).map(str::to_owned))
        .collect()
}

async fn story(kind: StoreKind, url: &str) {
    let demo = Demo::open_in(kind, url, &unique_name("imptest"))
        .await
        .unwrap();
    let out = played(&demo).await;

    for expected in [
        "Impersonation refused: the target holds a protected role (protected_role)",
        "Impersonation refused: the target holds a permission the agent lacks (escalation)",
        "banner: \"You are impersonating Olive Owner (Pinewood Campground)\" · reason: Olive cannot see next week's bookings",
        "dashboard as Olive Owner: 3 bookings",
        "dashboard now lists 4 bookings",
        "email: [redacted]",
        "phone: [redacted]",
        "card on file: •••••••••••••••4242 (masked)",
        "GET /billing → 403 Forbidden",
        "POST /profile/password → 403 Forbidden",
        "impersonating: true, subject: \"Olive Owner\"",
        "after stop: 200 OK at /support, banner shown: false",
        "banner: \"You are impersonating Paula Partner (ParkCo Management)\"; dashboard shows 2 campgrounds",
        "Lee's next page: 200 OK, banner shown: false",
        "Sam's next page: 200 OK, banner shown: false",
        "a JWT for sub \"sam\"",
        "200 OK: Bearer token, expires in 300 s, no refresh token",
        "claims: sub \"olive\", act {sub: \"sam\"}",
        "200 OK: as Olive Owner (impersonated by sam), 4 bookings",
        "with Sam's own token instead: 200 OK, as Sam Support, 0 bookings",
        "revocation: 200 OK; the same token next: 401 Unauthorized",
        "✓ Chain verified: 3 chains, 21 events, each listed once.",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    assert!(
        !out.contains("4242 4242 4242 4242"),
        "the card never shows whole"
    );
    let table = &out[out.find("| Timestamp |").expect("the audit table")..];
    assert_eq!(
        actions(table),
        [
            "Denied Attempt",
            "Denied Attempt",
            "User Impersonation",
            "Data Access",
            "Data Modification",
            "Data Access",
            "Data Access",
            "Denied Attempt",
            "Denied Attempt",
            "Data Access",
            "User Impersonation End",
            "User Impersonation",
            "Data Access",
            "User Impersonation End",
            "User Impersonation",
            "Data Access",
            "Impersonation Revoked",
            "User Impersonation End",
            "User Impersonation",
            "Data Access",
            "User Impersonation End",
        ],
        "{table}"
    );
    assert!(table.contains("| Sam Support | Olive Owner | GET /api/bookings (200)"));
    assert!(table.contains(
        "Reason: \u{201C}Olive's booking sync fails through the API\u{201D}. Ticket: SUP-1044."
    ));
    assert!(table.contains("| Sam Support | Olive Owner | Refused GET /billing"));
    // The status endpoint is a read under impersonation like any other.
    assert!(table.contains("| Sam Support | Olive Owner | GET /impersonation/status (200)"));
    assert!(table.contains("| Ada Admin | Paula Partner | Ended impersonation session (revoked)"));
    assert!(table.contains(
        "| Olive Owner | Olive Owner | Revoked every impersonation of the customer. Note: \u{201C}password changed\u{201D}."
    ));
    assert!(table.contains(
        "| Olive Owner | Olive Owner | Ended impersonation session (revoked). Agent: \u{201C}Sam Support\u{201D}."
    ));
}

/// Sessions of Sam's and Lee's left running (the demo tried by hand
/// before the walkthrough, on a store that keeps them) are ended first,
/// whoever they impersonate, rather than refusing the story's starts.
#[tokio::test]
async fn the_walkthrough_ends_sessions_its_agents_left_running() {
    use impersonation_core::{Requester, StartRequest, UserId};
    let demo = Demo::open(StoreKind::Memory, "memory").await.unwrap();
    let service = demo.service();
    for (agent, customer) in [("sam", "stan"), ("lee", "olive")] {
        let agent = service
            .directory()
            .get(&UserId::new(agent).unwrap())
            .unwrap();
        service
            .start(
                Requester::User(&agent),
                StartRequest::new(UserId::new(customer).unwrap(), "Trying the demo"),
            )
            .await
            .unwrap();
    }
    let out = played(&demo).await;
    for expected in [
        "(ended a session of Sam Support's left running before)",
        "(ended a session of Lee Lead's left running before)",
        "banner: \"You are impersonating Paula Partner (ParkCo Management)\"; dashboard shows 2 campgrounds",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}

#[tokio::test]
async fn walkthrough_on_memory() {
    story(StoreKind::Memory, "memory").await;
}

#[tokio::test]
async fn walkthrough_on_sqlite_the_default() {
    let url = format!("sqlite://{}", scratch_file("imptest", "db").display());
    story(StoreKind::Sqlite, &url).await;
}

#[tokio::test]
async fn walkthrough_on_postgres() {
    story(
        StoreKind::Postgres,
        "postgres://postgres@127.0.0.1:5432/test",
    )
    .await;
}

#[tokio::test]
async fn walkthrough_on_mariadb() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let db = unique_name("imptest");
    let mut admin =
        diesel_async::AsyncMysqlConnection::establish("mysql://root@127.0.0.1:3306/test")
            .await
            .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {db} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .await
        .unwrap();
    story(
        StoreKind::Mariadb,
        &format!("mysql://root@127.0.0.1:3306/{db}"),
    )
    .await;
}

#[tokio::test]
async fn walkthrough_on_redis() {
    story(StoreKind::Redis, "redis://127.0.0.1:6379").await;
}

#[test]
fn store_names_parse_and_unknown_ones_are_refused() {
    for kind in StoreKind::ALL {
        assert_eq!(kind.name().parse::<StoreKind>().unwrap(), kind);
    }
    assert_eq!("pg".parse::<StoreKind>().unwrap(), StoreKind::Postgres);
    assert_eq!("MySQL".parse::<StoreKind>().unwrap(), StoreKind::Mariadb);
    let err = "oracle".parse::<StoreKind>().unwrap_err();
    assert!(
        err.contains("sqlite, postgres, mariadb, redis, memory"),
        "{err}"
    );
}
