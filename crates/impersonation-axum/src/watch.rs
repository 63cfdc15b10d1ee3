//! What outlives one request ends with its session: a streamed response is
//! cut, and a WebSocket handler is told through [`SessionEnd`].

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

use impersonation_core::{Context, Error, ImpersonationApi};

use crate::layer::{BoxFuture, Handle};

/// The least a watcher sleeps between two checks, so that a deadline the
/// clock has not quite reached (a check a moment early) costs a few more
/// checks, not a busy loop.
const LEAST_WAIT: Duration = Duration::from_millis(5);

/// Resolves once the session of `ctx` has ended: checked on the store
/// every `every`, and at its expiry and idle deadline (so it ends on time
/// even with a long `every`), without touching its idle time
/// ([`ImpersonationApi::check_session`]). A check that fails (the store is
/// out of reach) ends it too: a stream fails closed, as a request does.
pub(crate) fn session_end(
    api: Arc<dyn ImpersonationApi>,
    ctx: &Context,
    every: Duration,
) -> BoxFuture<Error> {
    let id = ctx.session();
    let mut deadline = ctx.expires_at().min(ctx.idle_deadline());
    Box::pin(async move {
        loop {
            let left = deadline - api.now();
            // Past the deadline by a hair, so the check sees it lapsed.
            let to_deadline = Duration::try_from(left).unwrap_or(Duration::ZERO) + LEAST_WAIT;
            tokio::time::sleep(every.min(to_deadline).max(LEAST_WAIT)).await;
            match api.check_session(id).await {
                Ok(now) => deadline = now.expires_at().min(now.idle_deadline()),
                Err(e) => {
                    tracing::info!(session = %id, error = %e, "impersonation session over: ending what outlived its request");
                    return e;
                }
            }
        }
    })
}

/// A response body that ends when its session does: cut with an error,
/// so that the client sees a stream broken off rather than one that
/// finished (hyper closes the connection without the last chunk; an
/// `EventSource` reconnects, and is then served as whoever it is).
pub(crate) struct EndsWithSession {
    inner: Body,
    end: Option<BoxFuture<Error>>,
}

impl EndsWithSession {
    pub(crate) fn new(inner: Body, end: BoxFuture<Error>) -> Self {
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
            if end.poll_unpin(cx).is_ready() {
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
pub struct SessionEnd(Option<BoxFuture<Error>>);

impl std::fmt::Debug for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEnd")
            .field("impersonating", &self.0.is_some())
            .finish()
    }
}

impl SessionEnd {
    /// Whether the request was served under impersonation (otherwise the
    /// future never completes).
    pub fn is_impersonating(&self) -> bool {
        self.0.is_some()
    }
}

impl Future for SessionEnd {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(end) => end.poll_unpin(cx).map(drop),
            None => Poll::Pending,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SessionEnd {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let handle = parts.extensions.get::<Handle>();
        let ctx = parts.extensions.get::<Context>();
        Ok(Self(match (handle, ctx) {
            (Some(Handle(state)), Some(ctx)) => Some(session_end(
                Arc::clone(&state.shared.api),
                ctx,
                state.shared.settings.stream_check,
            )),
            _ => None,
        }))
    }
}
