//! What outlives one request ends with its session: a streamed response is
//! cut, and a WebSocket handler is told through [`SessionEnd`].

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use futures_util::FutureExt;
use http_body::{Frame, SizeHint};

use impersonation_core::{Context, ImpersonationApi};

use tokio::sync::{oneshot, watch};

use crate::layer::Handle;

/// The least a watcher sleeps between two checks, so that a deadline the
/// clock has not quite reached (a check a moment early) costs a few more
/// checks, not a busy loop.
const LEAST_WAIT: Duration = Duration::from_millis(5);

/// Watches the session of `ctx` on a task of its own, and answers on
/// the returned channel once it has ended: checked on the store every
/// `every`, and at its expiry and idle deadline (so it ends on time even
/// with a long `every`), without touching its idle time
/// ([`ImpersonationApi::check_session`]). A check that fails (the store
/// or the directory is out of reach) or takes longer than `every` (at
/// least [`LEAST_CHECK_TIME`], at most [`MOST_CHECK_TIME`]) ends it too: a
/// stream fails closed, as a request does. Once the session's expiry has
/// passed on the service's clock it ends without asking (no answer can
/// extend it), and a check then only writes the end on the trail. `over`
/// turning true (the layer found the session ended while the request was
/// served) ends it at once.
///
/// On a task, not in the body's poll: hyper stops polling a body whose
/// client does not read, and a check frozen there would hold its store
/// connection (a write transaction, at a lapse) for as long. While a
/// check runs, the expiry, the request's finding and the listener going
/// away are still watched; a check that has begun runs to its end or its
/// time budget, whichever comes first, so that an end it writes lands.
/// The task stops once no one listens (the body or the [`SessionEnd`] is
/// gone). Outside a tokio runtime nothing can watch: the end comes at
/// once (fail closed), with an error in the log.
pub(crate) fn watch_session(
    api: Arc<dyn ImpersonationApi>,
    ctx: &Context,
    every: Duration,
    over: Option<watch::Receiver<bool>>,
) -> oneshot::Receiver<Over> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!(
            session = %ctx.session(),
            "no tokio runtime to watch an impersonated stream on: it is ended at once"
        );
        return ended(Over::Unconfirmed);
    };
    let (mut tx, rx) = oneshot::channel();
    let id = ctx.session();
    let expires = ctx.expires_at();
    let mut deadline = expires.min(ctx.idle_deadline());
    let budget = every.clamp(LEAST_CHECK_TIME, MOST_CHECK_TIME);
    runtime.spawn(async move {
        let mut over = over;
        let ended_while_served = async {
            match &mut over {
                // The request served without finding it over (its state,
                // and the sender, gone): only the checks can end it now.
                Some(over) => {
                    if over.wait_for(|over| *over).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(ended_while_served);
        // How long until `at` on the service's clock, and a hair more, so
        // that a check made then sees it passed.
        let until = |at: time::OffsetDateTime| {
            Duration::try_from(at - api.now()).unwrap_or(Duration::ZERO) + LEAST_WAIT
        };
        let check = || tokio::time::timeout(budget, api.check_session(id));
        // Why it ends, whether by expiry (a check then writes that end on
        // the trail), and a check still running, to let finish.
        let (why, expired, running, end): (Cow<'static, str>, bool, _, Over) = loop {
            tokio::select! {
                () = tx.closed() => return,
                () = &mut ended_while_served => break (SERVED_OVER.into(), false, None, Over::Ended),
                () = tokio::time::sleep(every.min(until(deadline))) => {}
            }
            if api.now() >= expires {
                break (EXPIRED.into(), true, None, Over::Ended);
            }
            // While the check runs, what needs no answer still ends it:
            // the listener may go, the request's finding or the expiry
            // may come. The check then runs on, for the end it writes;
            // one begun before the expiry cannot write that, so another
            // check follows it then.
            let mut running = Box::pin(check());
            tokio::select! {
                checked = &mut running => match checked {
                    Ok(Ok(now)) => deadline = now.expires_at().min(now.idle_deadline()),
                    // An outage is no end: it could not be confirmed.
                    Ok(Err(e)) => {
                        let end = if e.http_status() >= 500 { Over::Unconfirmed } else { Over::Ended };
                        break (e.to_string().into(), false, None, end);
                    }
                    Err(_) => break ("the check of it did not answer in time".into(), false, None, Over::Unconfirmed),
                },
                () = tx.closed() => {
                    let _ = running.await;
                    return;
                }
                () = &mut ended_while_served => break (SERVED_OVER.into(), false, Some(running), Over::Ended),
                () = tokio::time::sleep(until(expires)) => break (EXPIRED.into(), true, Some(running), Over::Ended),
            }
        };
        match end {
            Over::Ended => tracing::info!(session = %id, why = %why, "impersonation session over: ending what outlived its request"),
            Over::Unconfirmed => tracing::warn!(session = %id, why = %why, "impersonation session could not be confirmed: ending what outlived its request"),
        }
        let _ = tx.send(end);
        if let Some(running) = running {
            let _ = running.await;
        }
        if expired {
            let _ = check().await;
        }
    });
    rx
}

/// A watch that stopped without an answer: its task panicked (a runtime
/// without its timer: `enable_time`) or the runtime is shutting down.
/// What it watched ends (fail closed), and the log says why.
fn watch_lost() {
    tracing::error!(
        "the watch of an impersonation session stopped without an answer (a tokio runtime without its timer, or one shutting down): ending what it watched"
    );
}

/// Why a watch ended what it watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// The session ended: stopped, revoked, expired, idle.
    Ended,
    /// The session could not be confirmed: a check failed or did not
    /// answer in time, or nothing could watch it. It fails closed, as a
    /// request does, but the session may well go on.
    Unconfirmed,
}

/// An end already known: the channel answers at once.
pub(crate) fn ended(over: Over) -> oneshot::Receiver<Over> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(over);
    rx
}

/// Why a watch ends what it watches, when the layer found the session
/// ended while the request was served.
const SERVED_OVER: &str = "it ended while its request was served";

/// Why a watch ends what it watches at the session's expiry.
const EXPIRED: &str = "it has expired";

/// The least time a check of a session is given before it counts as
/// failed (more, up to [`MOST_CHECK_TIME`], when the checks are further
/// apart).
const LEAST_CHECK_TIME: Duration = Duration::from_secs(1);

/// The most time a check is given: a store or directory that has not
/// answered by then is out of reach, and the session's expiry must not
/// wait on it.
const MOST_CHECK_TIME: Duration = Duration::from_secs(5);

/// A response body that ends when its session does: cut with an error,
/// so that the client sees a stream broken off rather than one that
/// finished (hyper closes the connection without the last chunk; an
/// `EventSource` reconnects, and is then served as whoever it is).
pub(crate) struct EndsWithSession {
    inner: Body,
    /// Answers (or is dropped) once the session has ended.
    end: Option<oneshot::Receiver<Over>>,
}

impl EndsWithSession {
    pub(crate) fn new(inner: Body, end: oneshot::Receiver<Over>) -> Self {
        Self {
            inner,
            end: Some(end),
        }
    }
}

/// Why a stream was cut, as the body's error.
#[derive(Debug, thiserror::Error)]
#[error("the impersonation session of this response has ended")]
struct SessionEnded;

impl HttpBody for EndsWithSession {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if let Some(end) = &mut this.end {
            // A body that has sent all it had is let finish, not cut. (A
            // watch gone without a word, its task stopped with the
            // runtime, counts as an end: fail closed.)
            if !this.inner.is_end_stream()
                && let Poll::Ready(answer) = end.poll_unpin(cx)
            {
                if answer.is_err() {
                    watch_lost();
                }
                this.end = None;
                this.inner = Body::empty();
                return Poll::Ready(Some(Err(axum::Error::new(SessionEnded))));
            }
        } else {
            // Cut already: nothing follows.
            return Poll::Ready(None);
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            // Finished on its own: the watch has nothing left to do.
            this.end = None;
            this.inner = Body::empty();
            return Poll::Ready(None);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.end.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Once cut, the empty body's: nothing more.
        self.inner.size_hint()
    }
}

/// A future that completes when the request's impersonation session ends
/// (stopped, expired, idled out, revoked, or no longer confirmed by the
/// store), and never outside impersonation: for what the layer cannot
/// see end, a WebSocket above all. The layer cuts a streamed response
/// body itself; a socket's messages it never sees, so a WebSocket handler
/// takes this extractor and stops serving when it completes:
///
/// ```
/// use impersonation_axum::SessionEnd;
///
/// // In `WebSocketUpgrade::on_upgrade(|socket| on_socket(socket, end))`:
/// async fn on_socket<S>(socket: S, end: SessionEnd) {
///     tokio::select! {
///         () = end => {} // over: the socket is dropped, which closes it
///         () = serve(socket) => {}
///     }
/// }
/// # async fn serve<S>(_: S) {}
/// ```
///
/// It checks the session on the store as often as
/// [`ImpersonationLayer::check_streams_every`](crate::ImpersonationLayer::check_streams_every)
/// says, and at its expiry and idle deadline; the checks do not count as
/// use of the session (only requests do), so an open socket does not keep
/// alive a session its agent has walked away from.
pub struct SessionEnd(Watch);

/// Where a [`SessionEnd`] stands.
enum Watch {
    /// Not impersonating: it never completes.
    Never,
    /// Watching the session.
    Watching(oneshot::Receiver<Over>),
    /// Completed: every later poll is ready too.
    Over,
}

impl std::fmt::Debug for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEnd")
            .field("impersonating", &self.is_impersonating())
            .finish()
    }
}

impl SessionEnd {
    /// Whether the request was served under impersonation (otherwise the
    /// future never completes).
    pub fn is_impersonating(&self) -> bool {
        !matches!(self.0, Watch::Never)
    }
}

impl Future for SessionEnd {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        match &mut self.0 {
            Watch::Watching(end) => {
                let ready = end.poll_unpin(cx).map(|answer| {
                    if answer.is_err() {
                        watch_lost();
                    }
                });
                if ready.is_ready() {
                    // Polled again (a select loop that goes on to close
                    // the socket), it stays ready.
                    self.0 = Watch::Over;
                }
                ready
            }
            Watch::Over => Poll::Ready(()),
            Watch::Never => Poll::Pending,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SessionEnd {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let handle = parts.extensions.get::<Handle>();
        let ctx = parts.extensions.get::<Context>();
        Ok(Self(match (handle, ctx) {
            (Some(Handle(state)), Some(ctx)) => Watch::Watching(watch_session(
                Arc::clone(&state.shared.api),
                ctx,
                state.shared.settings.stream_check,
                Some(state.ended_while_served()),
            )),
            _ => Watch::Never,
        }))
    }
}
