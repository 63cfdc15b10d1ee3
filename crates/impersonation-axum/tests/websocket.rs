//! A real WebSocket (axum's server, tungstenite's client, over TCP) under
//! impersonation, its handler written as the docs show: selecting on
//! `SessionEnd`, it closes the socket when the session is stopped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::middleware::from_fn_with_state;
use axum::response::Response;
use axum::routing::get;
use futures_util::StreamExt as _;
use impersonation_axum::{ImpersonationLayer, SessionEnd};
use impersonation_core::{Impersonation, MemoryDirectory, MemoryStore, Requester, StartRequest};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use common::{agent, auth, customer};

/// The handler as docs/axum.md shows it.
async fn live(upgrade: WebSocketUpgrade, end: SessionEnd) -> Response {
    upgrade.on_upgrade(|socket| async move {
        tokio::select! {
            () = end => {} // the session is over: the socket is dropped, and closes
            () = serve(socket) => {}
        }
    })
}

/// A tick every 20 ms, until the client goes.
async fn serve(mut socket: WebSocket) {
    for n in 0_u64.. {
        if socket.send(Message::text(n.to_string())).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_websocket_selecting_on_session_end_closes_when_the_session_is_stopped() {
    let directory = MemoryDirectory::new();
    for p in [agent("sam"), customer("olive", "Olive Owner")] {
        directory.insert(p);
    }
    let svc = Arc::new(Impersonation::new(MemoryStore::new(), directory.clone()));
    let app = Router::new()
        .route("/live", get(live))
        .layer(
            ImpersonationLayer::new(Arc::clone(&svc))
                .development_mode()
                .check_streams_every(Duration::from_millis(100)),
        )
        .layer(from_fn_with_state(directory, auth));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let started = svc
        .start(
            Requester::User(&agent("sam")),
            StartRequest::new(customer("olive", "").id, "Customer cannot see bookings"),
        )
        .await
        .unwrap();
    let connect = |secret: Option<String>| async move {
        let mut req = format!("ws://{addr}/live").into_client_request().unwrap();
        req.headers_mut()
            .insert("x-test-user", "sam".parse().unwrap());
        if let Some(secret) = secret {
            req.headers_mut()
                .insert("authorization", format!("Bearer {secret}").parse().unwrap());
        }
        tokio_tungstenite::connect_async(req).await.unwrap().0
    };
    let mut under = connect(Some(started.secret.expose().to_owned())).await;
    let mut outside = connect(None).await;
    // Both live, past a check or two.
    for _ in 0..10 {
        assert!(matches!(under.next().await, Some(Ok(m)) if m.is_text()));
        assert!(matches!(outside.next().await, Some(Ok(m)) if m.is_text()));
    }
    svc.stop(&started.secret, &agent("sam")).await.unwrap();
    // The impersonated socket ends (closed, or cut off), within the next
    // check; the other goes on.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(message)) = under.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the socket outlived its session");
    for _ in 0..10 {
        assert!(matches!(outside.next().await, Some(Ok(m)) if m.is_text()));
    }
    outside.close(None).await.unwrap();
}
