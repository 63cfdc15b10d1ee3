//! What outlives its request ends with its session: a response streamed
//! under impersonation is cut when the session is stopped, expires or
//! idles out (and the checks that find it so do not keep it alive), and
//! `SessionEnd`, a WebSocket handler's signal, completes then.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, Request, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt;
use impersonation_axum::{ImpersonationLayer, SessionEnd};
use impersonation_core::{
    AuditAction, AuditEvent, AuditQuery, Impersonation, ManualClock, MemoryDirectory, MemoryStore,
    Requester, StartRequest, Started,
};
use impersonation_testkit::conformance::all_events;
use impersonation_testkit::epoch;
use impersonation_testkit::faults::{Calls, FaultyStore, When};
use time::Duration;
use tokio::sync::oneshot;
use tower::ServiceExt;

use common::{agent, auth, customer};

type Svc = Arc<Impersonation<Arc<FaultyStore<MemoryStore>>, MemoryDirectory>>;

/// What `/socket` hands the test: whether its request was impersonated,
/// and a signal sent when its `SessionEnd` completes.
type Sockets = Arc<Mutex<Vec<(bool, oneshot::Receiver<()>)>>>;

struct Fx {
    app: Router,
    svc: Svc,
    store: Arc<FaultyStore<MemoryStore>>,
    sockets: Sockets,
}

/// An endless event stream, one event every 10 ms.
fn ticks() -> Response {
    let stream = futures_util::stream::unfold(0_u64, |n| async move {
        tokio::time::sleep(StdDuration::from_millis(10)).await;
        Some((
            Ok::<_, Infallible>(Bytes::from(format!("data: {n}\n\n"))),
            n + 1,
        ))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A download of known length (1 MiB, as a file server sends one): 16 KiB
/// every 10 ms, its length announced.
fn download() -> Response {
    download_paced(StdDuration::from_millis(10))
}

/// [`download`], a chunk every `pace`.
fn download_paced(pace: StdDuration) -> Response {
    const LEN: u64 = 1024 * 1024;
    let chunks = futures_util::stream::unfold(0_u64, move |sent| async move {
        if sent == LEN {
            return None;
        }
        tokio::time::sleep(pace).await;
        Some((
            Ok::<_, Infallible>(Bytes::from(vec![b'x'; 16 * 1024])),
            sent + 16 * 1024,
        ))
    });
    Body::new(KnownLength {
        inner: Body::from_stream(chunks),
        len: LEN,
    })
    .into_response()
}

/// A body that announces its length (`Body::from_stream` cannot).
struct KnownLength {
    inner: Body,
    len: u64,
}

impl axum::body::HttpBody for KnownLength {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len)
    }
}

/// A WebSocket handler's shape: the socket's task (here, one that only
/// waits) is spawned with the request's `SessionEnd`.
async fn socket(State(sockets): State<Sockets>, end: SessionEnd) -> &'static str {
    let (tx, rx) = oneshot::channel();
    sockets.lock().unwrap().push((end.is_impersonating(), rx));
    tokio::spawn(async move {
        end.await;
        let _ = tx.send(());
    });
    "switching"
}

fn fixture(check: StdDuration, clock: Option<ManualClock>) -> Fx {
    let directory = MemoryDirectory::new();
    for p in [agent("sam"), customer("olive", "Olive Owner")] {
        directory.insert(p);
    }
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let mut svc = Impersonation::new(Arc::clone(&store), directory.clone());
    if let Some(clock) = &clock {
        svc = svc.with_clock(clock.clone());
    }
    let svc = Arc::new(svc);
    let sockets = Sockets::default();
    let app = Router::new()
        .route("/events", get(|| async { ticks() }))
        .route("/sized", get(|| async { "a page of known length" }))
        .route("/download", get(|| async { download() }))
        .route("/socket", get(socket))
        .with_state(Arc::clone(&sockets))
        .layer(
            ImpersonationLayer::new(Arc::clone(&svc))
                .development_mode()
                .check_streams_every(check),
        )
        .layer(from_fn_with_state(directory, auth));
    Fx {
        app,
        svc,
        store,
        sockets,
    }
}

async fn start(fx: &Fx, request: StartRequest) -> Started {
    fx.svc
        .start(Requester::User(&agent("sam")), request)
        .await
        .unwrap()
}

fn olive() -> StartRequest {
    StartRequest::new(customer("olive", "").id, "Customer cannot see bookings")
}

/// Sam's request for `path`, under `started` if given.
async fn get_as_sam(fx: &Fx, path: &str, started: Option<&Started>) -> Response {
    let mut req = Request::get(path).header("x-test-user", "sam");
    if let Some(s) = started {
        req = req.header(
            header::AUTHORIZATION,
            format!("Bearer {}", s.secret.expose()),
        );
    }
    fx.app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

/// A test's own `routes` behind the layer (checking streams every
/// `every`) and the stand-in for the host's auth, over the fixture's
/// service.
fn behind_the_layer(fx: &Fx, routes: Router, every: StdDuration) -> Router {
    let directory = MemoryDirectory::new();
    directory.insert(agent("sam"));
    routes
        .layer(
            ImpersonationLayer::new(Arc::clone(&fx.svc))
                .development_mode()
                .check_streams_every(every),
        )
        .layer(from_fn_with_state(directory, auth))
}

/// Sam's `method path`, under `started`'s secret.
fn sams_request(method: Method, path: &str, started: &Started) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("x-test-user", "sam")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", started.secret.expose()),
        )
        .body(Body::empty())
        .unwrap()
}

/// The trail of `started`'s session, oldest first.
async fn trail(fx: &Fx, started: &Started) -> Vec<AuditEvent> {
    all_events(
        fx.store.inner(),
        AuditQuery {
            session: Some(started.session.id),
            ..AuditQuery::default()
        },
    )
    .await
}

/// The end event of `started`'s session once it is on the trail: a cut
/// goes out before the watch's check writes an expiry. Gives up after 300
/// looks 100 ms apart (with tokio's clock paused, the waits let the watch
/// take its next step and cost no time).
async fn end_on_trail(fx: &Fx, started: &Started) -> AuditEvent {
    for _ in 0..300 {
        let events = trail(fx, started).await;
        let last = events.last().unwrap();
        if last.action == AuditAction::SessionEnded {
            return last.clone();
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    panic!("the session's end never reached the trail");
}

/// Reads frames until the body ends or fails: how many arrived, and
/// whether it failed (was cut). Gives up after `most` frames (an endless
/// stream that was not cut) or 30 s (one that hangs).
async fn drain(res: Response, most: usize) -> (usize, bool) {
    let mut body = res.into_body();
    let mut frames = 0;
    let read = async {
        while frames < most {
            match body.frame().await {
                None => return false,
                Some(Err(_)) => return true,
                Some(Ok(_)) => frames += 1,
            }
        }
        false
    };
    let cut = tokio::time::timeout(StdDuration::from_secs(30), read)
        .await
        .expect("the stream neither ended nor went on");
    (frames, cut)
}

#[tokio::test]
async fn a_stream_is_cut_once_its_session_is_stopped() {
    let fx = fixture(StdDuration::from_millis(20), None);
    let started = start(&fx, olive()).await;
    let res = get_as_sam(&fx, "/events", Some(&started)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    fx.svc.stop(&started.secret, &agent("sam")).await.unwrap();
    let (_, cut) = drain(Response::new(body), 100_000).await;
    assert!(cut, "the stream went on after its session was stopped");
}

/// A large body of known length (a download) is watched as a stream is:
/// cut when its session is stopped, its length still announced.
#[tokio::test]
async fn a_download_of_known_length_is_cut_once_its_session_is_stopped() {
    let fx = fixture(StdDuration::from_millis(20), None);
    let started = start(&fx, olive()).await;
    let res = get_as_sam(&fx, "/download", Some(&started)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        axum::body::HttpBody::size_hint(res.body()).exact(),
        Some(1024 * 1024)
    );
    let mut body = res.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    fx.svc.stop(&started.secret, &agent("sam")).await.unwrap();
    let (frames, cut) = drain(Response::new(body), 100_000).await;
    assert!(cut, "the download went on after its session was stopped");
    assert!(
        frames < 61,
        "the download was sent whole: {frames} more frames"
    );
    // Sam's own download, outside impersonation, is sent whole.
    let (frames, cut) = drain(get_as_sam(&fx, "/download", None).await, 100_000).await;
    assert_eq!((frames, cut), (64, false));
}

#[tokio::test]
async fn a_stream_outside_impersonation_and_a_page_of_known_length_are_left_alone() {
    let fx = fixture(StdDuration::from_millis(20), None);
    // Sam's own stream, no session: a few checks' worth of events (one
    // every 100 ms, the least interval), uncut.
    let (frames, cut) = drain(get_as_sam(&fx, "/events", None).await, 30).await;
    assert_eq!((frames, cut), (30, false));
    // A page of known length under a session is sent as it is: not
    // wrapped, its length announced.
    let started = start(&fx, olive()).await;
    let res = get_as_sam(&fx, "/sized", Some(&started)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        axum::body::HttpBody::size_hint(res.body()).exact(),
        Some(22)
    );
    // A stream under the session is watched: no known length.
    let res = get_as_sam(&fx, "/events", Some(&started)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(axum::body::HttpBody::size_hint(res.body()).exact(), None);
}

/// The checks of an open stream are no use of its session: with the
/// service's clock moved past the idle timeout (and no request since), the
/// stream is cut, and the session ends idle, by the system, on the trail.
#[tokio::test]
async fn a_stream_does_not_keep_its_session_alive_and_ends_with_it_when_idle() {
    let clock = ManualClock::new(epoch());
    let fx = fixture(StdDuration::from_millis(20), Some(clock.clone()));
    let started = start(&fx, olive()).await;
    let res = get_as_sam(&fx, "/events", Some(&started)).await;
    let mut body = res.into_body();
    // Fourteen minutes of checks, none of which moves the idle deadline.
    for _ in 0..14 {
        clock.advance(Duration::minutes(1));
        for _ in 0..3 {
            body.frame().await.unwrap().unwrap();
        }
    }
    clock.advance(Duration::minutes(1));
    let (_, cut) = drain(Response::new(body), 100_000).await;
    assert!(cut, "the stream outlived its session's idle timeout");
    let events = trail(&fx, &started).await;
    let end = events.last().unwrap();
    assert_eq!(
        (end.action, end.details.get("reason")),
        (AuditAction::SessionEnded, Some("idle_timeout"))
    );
}

/// A session's expiry ends its stream on time even when the checks are an
/// hour apart: the watcher wakes at the deadline.
#[tokio::test]
async fn a_stream_ends_at_its_sessions_expiry_whatever_the_check_interval() {
    let fx = fixture(StdDuration::from_secs(3600), None);
    // Long enough to be served on a busy machine; the checks never come.
    let started = start(&fx, olive().duration(Duration::seconds(2))).await;
    let res = get_as_sam(&fx, "/events", Some(&started)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let (frames, cut) = drain(res, 100_000).await;
    assert!(cut, "the stream outlived its session's expiry");
    assert!(
        frames > 0,
        "the stream was served while its session was live"
    );
    // The cut goes first; the watch's check then writes the end.
    let end = end_on_trail(&fx, &started).await;
    assert_eq!(end.details.get("reason"), Some("expired"));
}

/// `SessionEnd`, which a WebSocket's task selects on, completes when the
/// session is stopped, and never outside impersonation.
#[tokio::test]
async fn session_end_completes_when_the_session_ends_and_never_outside_one() {
    let fx = fixture(StdDuration::from_millis(20), None);
    let started = start(&fx, olive()).await;
    assert_eq!(
        get_as_sam(&fx, "/socket", Some(&started)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        get_as_sam(&fx, "/socket", None).await.status(),
        StatusCode::OK
    );
    let (under, mut outside) = {
        let mut sockets = fx.sockets.lock().unwrap();
        let outside = sockets.pop().unwrap();
        (sockets.pop().unwrap(), outside)
    };
    assert_eq!((under.0, outside.0), (true, false));
    // Live: checks come and go, and the socket stays.
    let mut under = under.1;
    tokio::time::sleep(StdDuration::from_millis(100)).await;
    assert_eq!(under.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    fx.svc.stop(&started.secret, &agent("sam")).await.unwrap();
    tokio::time::timeout(StdDuration::from_secs(30), under)
        .await
        .expect("SessionEnd did not complete after the stop")
        .unwrap();
    tokio::time::sleep(StdDuration::from_millis(100)).await;
    assert_eq!(
        outside.1.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    );
}

/// Outside a tokio runtime nothing can watch a stream, so the layer cuts
/// an impersonated one at once (fail closed) rather than let it outlive
/// its session unwatched; one outside impersonation is served whole. (The
/// bodies here need no timer: no runtime drives them.)
#[test]
fn outside_a_tokio_runtime_an_impersonated_stream_is_cut_at_once() {
    use futures_executor::block_on;
    let fx = fixture(StdDuration::from_millis(20), None);
    let started = block_on(start(&fx, olive()));
    let app = behind_the_layer(
        &fx,
        Router::new()
            .route(
                "/page",
                get(|| async {
                    axum::response::Html(format!(
                        "<html><body>{}</body></html>",
                        "x".repeat(100 * 1024)
                    ))
                }),
            )
            .route(
                "/counted",
                get(|| async {
                    let events =
                        (0..3).map(|n| Ok::<_, Infallible>(Bytes::from(format!("data: {n}\n\n"))));
                    Body::from_stream(futures_util::stream::iter(events))
                }),
            ),
        StdDuration::from_millis(20),
    );
    let mut own = Request::get("/counted")
        .header("x-test-user", "sam")
        .body(Body::empty())
        .unwrap();
    let res = block_on(app.clone().oneshot(own)).unwrap();
    assert_eq!(block_on(drain_at_once(res)), (3, false));
    own = sams_request(Method::GET, "/counted", &started);
    let res = block_on(app.clone().oneshot(own)).unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(block_on(drain_at_once(res)), (0, true));
    // A large page is read whole for its banner and sent as one piece:
    // not watched, so not cut.
    let res = block_on(app.oneshot(sams_request(Method::GET, "/page", &started))).unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let page = block_on(res.into_body().collect()).unwrap().to_bytes();
    assert!(page.len() > 100 * 1024, "{}", page.len());
    assert!(String::from_utf8_lossy(&page).contains("You are impersonating"));
}

/// [`drain`] with no timer: how many frames a body gives, and whether it
/// failed.
async fn drain_at_once(res: Response) -> (usize, bool) {
    let mut body = res.into_body();
    let mut frames = 0;
    loop {
        match body.frame().await {
            None => return (frames, false),
            Some(Err(_)) => return (frames, true),
            Some(Ok(_)) => frames += 1,
        }
    }
}

/// A store that fails, or does not answer, cuts the stream: it cannot
/// confirm the session, and a stream fails closed as a request does.
#[tokio::test]
async fn a_stream_is_cut_when_its_session_cannot_be_checked() {
    for when in [When::Before, When::Hang] {
        let fx = fixture(StdDuration::from_millis(20), None);
        let started = start(&fx, olive()).await;
        let res = get_as_sam(&fx, "/events", Some(&started)).await;
        assert_eq!(res.status(), StatusCode::OK);
        let mut body = res.into_body();
        for _ in 0..3 {
            body.frame().await.unwrap().unwrap();
        }
        // The watch's next store call fails, or never answers.
        fx.store.fail_nth(1, when, Calls::All);
        let (_, cut) = drain(Response::new(body), 100_000).await;
        assert!(cut, "{when:?}: the stream went on unchecked");
        assert_eq!(fx.store.injected(), 1, "{when:?}");
    }
}

/// A completed `SessionEnd` polled again (a socket loop that goes on to
/// send its close frame) stays complete rather than panic.
#[tokio::test]
async fn a_completed_session_end_stays_ready() {
    let fx = fixture(StdDuration::from_millis(20), None);
    let started = start(&fx, olive()).await;
    let app = Router::new().route(
        "/twice",
        get(|end: SessionEnd| async move {
            let mut end = std::pin::pin!(end);
            (&mut end).await;
            (&mut end).await;
            "ended, twice"
        }),
    );
    let app = behind_the_layer(&fx, app, StdDuration::from_millis(20));
    let req = sams_request(Method::GET, "/twice", &started);
    let svc = Arc::clone(&fx.svc);
    let stop = tokio::spawn(async move {
        tokio::time::sleep(StdDuration::from_millis(50)).await;
        svc.stop(&started.secret, &agent("sam")).await.unwrap();
    });
    let res = tokio::time::timeout(StdDuration::from_secs(30), app.oneshot(req))
        .await
        .expect("SessionEnd never completed")
        .unwrap();
    stop.await.unwrap();
    // The request's own audit finds its session ended: withheld, 401.
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

/// A change whose session ends while its handler runs is made and on the
/// trail, and its answer goes out; but a stream it answers with is cut at
/// once, not at the next check (an hour away here). An answer of known
/// length begins, as the change was made, and is cut at the watch's first
/// check: whole with the checks an hour apart, part way with them 100 ms
/// apart (the least). (The export takes 3 s either way.)
#[tokio::test]
async fn a_stream_answering_a_change_whose_session_ended_meanwhile_is_cut_at_once() {
    let hour = StdDuration::from_secs(3600);
    let least = StdDuration::from_millis(100);
    for (stream, every) in [(true, hour), (false, hour), (false, least)] {
        let fx = fixture(every, None);
        let started = Arc::new(start(&fx, olive()).await);
        let (svc, secret) = (Arc::clone(&fx.svc), Arc::clone(&started));
        let app = Router::new().route(
            "/export",
            axum::routing::post(move || {
                let (svc, secret) = (Arc::clone(&svc), Arc::clone(&secret));
                async move {
                    // Stopped elsewhere while the export is being made.
                    svc.stop(&secret.secret, &agent("sam")).await.unwrap();
                    // Paced so that the whole takes 3 s: the first check,
                    // 100 ms in, comes well before its end.
                    if stream {
                        ticks()
                    } else {
                        download_paced(StdDuration::from_millis(50))
                    }
                }
            }),
        );
        let app = behind_the_layer(&fx, app, every);
        let req = sams_request(Method::POST, "/export", &started);
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let (frames, cut) = drain(res, 100_000).await;
        let case = format!("stream: {stream}, checks every {every:?}");
        match (stream, every == hour) {
            (true, _) => assert_eq!((frames, cut), (0, true), "{case}"),
            (false, true) => assert_eq!((frames, cut), (64, false), "{case}"),
            (false, false) => assert!(cut && frames > 0 && frames < 64, "{case}: {frames}"),
        }
    }
}

/// The watch runs on a task of its own, not in the body's poll: hyper
/// stops polling a body whose client does not read, and a check frozen
/// there would hold its store connection as long. Here the body is not
/// polled at all, and the watch still checks the store and finds it
/// failing; the reads that follow end in the cut.
#[tokio::test]
async fn the_watch_checks_the_session_while_the_client_reads_nothing() {
    let fx = fixture(StdDuration::from_millis(20), None);
    let started = start(&fx, olive()).await;
    let res = get_as_sam(&fx, "/events", Some(&started)).await;
    assert_eq!(res.status(), StatusCode::OK);
    fx.store.fail_nth(1, When::Before, Calls::All);
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(30);
    while fx.store.injected() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no check while the body was not read"
        );
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    let (_, cut) = drain(res, 100_000).await;
    assert!(cut, "the stream went on after its failed check");
}

/// Past the session's expiry on the service's clock the stream is cut
/// without waiting for the store: here the check hangs, and the cut comes
/// long before its time budget (a second) runs out. (Tokio's clock is
/// paused: the waits are counted, not slept.)
#[tokio::test(start_paused = true)]
async fn a_stream_is_cut_at_expiry_without_waiting_for_a_hung_check() {
    let clock = ManualClock::new(epoch());
    let fx = fixture(StdDuration::from_millis(20), Some(clock.clone()));
    let started = start(&fx, olive().duration(Duration::minutes(10))).await;
    let res = get_as_sam(&fx, "/events", Some(&started)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    // The next store call (the watch's check) hangs, and the session is
    // past expiry.
    fx.store.fail_nth(1, When::Hang, Calls::All);
    clock.advance(Duration::minutes(11));
    let read = drain(Response::new(body), 100_000);
    let (_, cut) = tokio::time::timeout(StdDuration::from_millis(500), read)
        .await
        .expect("the cut waited for the hung check");
    assert!(cut, "the stream finished instead of being cut");
}

/// `SessionEnd` completes at once when the layer finds the session ended
/// while the request was served (here a change whose handler stopped it,
/// as another tab would): the next check, an hour away, is not awaited.
#[tokio::test]
async fn session_end_completes_at_once_when_the_session_ended_while_served() {
    let fx = fixture(StdDuration::from_secs(3600), None);
    let started = Arc::new(start(&fx, olive()).await);
    let (svc, secret) = (Arc::clone(&fx.svc), Arc::clone(&started));
    let (tx, rx) = oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let app = Router::new().route(
        "/live",
        axum::routing::post(move |end: SessionEnd| {
            let (svc, secret, tx) = (Arc::clone(&svc), Arc::clone(&secret), Arc::clone(&tx));
            async move {
                let tx = tx.lock().unwrap().take().unwrap();
                tokio::spawn(async move {
                    end.await;
                    let _ = tx.send(());
                });
                svc.stop(&secret.secret, &agent("sam")).await.unwrap();
                "socket open"
            }
        }),
    );
    let app = behind_the_layer(&fx, app, StdDuration::from_secs(3600));
    let req = sams_request(Method::POST, "/live", &started);
    assert_eq!(app.oneshot(req).await.unwrap().status(), StatusCode::OK);
    tokio::time::timeout(StdDuration::from_secs(30), rx)
        .await
        .expect("SessionEnd waited for the next check")
        .unwrap();
}

/// A check that began just before the expiry and hangs does not hold the
/// cut back: the expiry is watched while the check runs. (Tokio's clock
/// is paused; the service's clock is set a moment before the expiry.)
#[tokio::test(start_paused = true)]
async fn a_check_under_way_at_expiry_does_not_hold_the_cut_back() {
    let clock = ManualClock::new(epoch());
    let fx = fixture(StdDuration::from_millis(20), Some(clock.clone()));
    let started = start(&fx, olive().duration(Duration::minutes(10))).await;
    let res = get_as_sam(&fx, "/events", Some(&started)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    // 100 ms before the expiry, the next check starts, and hangs.
    clock.advance(Duration::minutes(10) - Duration::milliseconds(100));
    fx.store.fail_nth(1, When::Hang, Calls::All);
    let read = drain(Response::new(body), 100_000);
    // Well inside the check's budget of a second.
    let (_, cut) = tokio::time::timeout(StdDuration::from_millis(500), read)
        .await
        .expect("the cut waited for the hung check");
    assert!(cut, "the stream finished instead of being cut");
    assert_eq!(fx.store.injected(), 1, "the check was under way");
    // That check, begun before the expiry, cannot write it; the one that
    // follows it does, once the clock has passed it.
    clock.advance(Duration::milliseconds(200));
    let end = end_on_trail(&fx, &started).await;
    assert_eq!(end.details.get("reason"), Some("expired"));
}

/// An HTML page that begins and never ends (a forever-frame, a live log).
fn endless_page() -> Response {
    use futures_util::StreamExt as _;
    let start = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(
        b"<html><body><p>live log</p>",
    ))]);
    let body = start.chain(futures_util::stream::pending());
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response()
}

/// Sam's GET of an endless page, under way for 100 ms (past the 20 ms
/// stream check, so its read is watched).
async fn endless_page_being_read() -> (
    Fx,
    Started,
    tokio::task::JoinHandle<Result<Response, Infallible>>,
) {
    let fx = fixture(StdDuration::from_millis(20), None);
    let started = start(&fx, olive()).await;
    let app = behind_the_layer(
        &fx,
        Router::new().route("/live", get(|| async { endless_page() })),
        StdDuration::from_millis(20),
    );
    let pending = tokio::spawn(app.oneshot(sams_request(Method::GET, "/live", &started)));
    tokio::time::sleep(StdDuration::from_millis(100)).await;
    (fx, started, pending)
}

/// The answer to a pending request, or `None` after 10 s.
async fn answer_within_10s(
    pending: tokio::task::JoinHandle<Result<Response, Infallible>>,
) -> Option<Response> {
    let answered = tokio::time::timeout(StdDuration::from_secs(10), pending)
        .await
        .ok()?;
    Some(answered.unwrap().unwrap())
}

/// A page read whole for its banner is watched once its read takes longer
/// than the stream check: stopping the session ends the read, and the
/// page is withheld (401), not held open until it ends.
#[tokio::test]
async fn an_endless_html_page_ends_with_its_session() {
    let (fx, started, pending) = endless_page_being_read().await;
    fx.svc.stop(&started.secret, &agent("sam")).await.unwrap();
    let res = answer_within_10s(pending)
        .await
        .expect("the page was held open after its session ended");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.windows(8).any(|w| w == b"live log"), "{body:?}");
    // The read the session's end withheld is not on the trail as served.
    let events = trail(&fx, &started).await;
    assert!(
        events.iter().all(|e| e.action != AuditAction::Access),
        "{events:?}"
    );
}

/// A page whose session cannot be confirmed while it is read (the store
/// fails the watch's check, or does not answer it) is withheld too, as
/// unavailable (503), not as ended: the session goes on, and the trail
/// says 503.
#[tokio::test]
async fn an_html_page_whose_session_cannot_be_confirmed_is_withheld_as_unavailable() {
    for when in [When::Before, When::Hang] {
        let (fx, started, pending) = endless_page_being_read().await;
        // The watch's next check fails, or never answers.
        fx.store.fail_nth(1, when, Calls::All);
        let res = answer_within_10s(pending)
            .await
            .expect("the page was held open unchecked");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{when:?}");
        assert_eq!(fx.store.injected(), 1, "{when:?}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"impersonation session could not be confirmed");
        assert!(
            fx.svc.resolve(&started.secret).await.is_ok(),
            "{when:?}: the session goes on"
        );
        let events = trail(&fx, &started).await;
        let read = events
            .iter()
            .find(|e| e.details.get("route") == Some("/live"))
            .unwrap_or_else(|| panic!("{when:?}: the request is not on the trail: {events:?}"));
        assert_eq!(read.details.get("status"), Some("503"), "{when:?}");
    }
}

/// A page still coming after the read's time limit, its session live, is
/// refused (500) rather than held open or served without the banner.
/// (Tokio's clock is paused: the minute is counted, not slept.)
#[tokio::test(start_paused = true)]
async fn an_html_page_still_coming_after_the_read_limit_is_refused() {
    let fx = fixture(StdDuration::from_secs(5), None);
    let started = start(&fx, olive()).await;
    let app = behind_the_layer(
        &fx,
        Router::new().route("/live", get(|| async { endless_page() })),
        StdDuration::from_secs(5),
    );
    let res = tokio::time::timeout(
        impersonation_axum::MAX_BANNER_READ_TIME + StdDuration::from_secs(5),
        app.oneshot(sams_request(Method::GET, "/live", &started)),
    )
    .await
    .expect("the page was held open past the read limit")
    .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    // Audited once, as the 500 it was answered with.
    let events = trail(&fx, &started).await;
    let access: Vec<_> = events
        .iter()
        .filter(|e| e.action == AuditAction::Access)
        .collect();
    assert_eq!(access.len(), 1, "{events:?}");
    assert_eq!(access[0].details.get("status"), Some("500"));
}
