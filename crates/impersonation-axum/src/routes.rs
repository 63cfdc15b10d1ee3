//! The routes to mount: `POST start`, `POST stop`, `GET status`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Form;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use impersonation_core::{
    Context, EndReason, Error, Principal, Requester, SessionId, StartRequest, UserId,
};
use serde::Deserialize;

use crate::csrf::{CsrfCheck, EndedSessionToken, RenewCsrfToken};
use crate::layer::{CsrfToken, Handle, RequestState, run_to_end, set_cookie};

/// The SDK's routes; nest them under the layer's mount path, inside the layer:
/// `app.nest("/impersonation", impersonation_axum::routes()).layer(layer)`.
/// Start and stop are POST only (GET gets 405), CSRF-checked and rotate the secret.
/// Their forms are read up to [`MAX_FORM`] bytes, whatever body limit the
/// app sets for its own routes (one that lifts it for uploads included).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/start", post(start))
        .route("/stop", post(stop))
        .route("/status", get(status))
        .layer(DefaultBodyLimit::max(MAX_FORM))
}

/// The largest start or stop form the routes read, in bytes (a larger one
/// gets 413): room for a reason of 500 characters, each percent-encoded
/// from four bytes of UTF-8, many times over.
pub const MAX_FORM: usize = 64 * 1024;

/// The start form. Its `Debug` leaves the CSRF token out.
#[derive(Deserialize)]
pub struct StartForm {
    /// The customer's id.
    pub target: String,
    /// Why.
    pub reason: String,
    /// The support ticket.
    #[serde(default)]
    pub ticket: Option<String>,
    /// Present, with any value (a checked checkbox sends `on`), for a
    /// read-only session.
    #[serde(default)]
    pub read_only: Option<String>,
    /// The CSRF token.
    #[serde(default)]
    pub csrf: String,
    /// Where to go afterwards (a local path).
    #[serde(default)]
    pub return_to: Option<String>,
    /// Where to go when the start is refused (a local path); the refusal's
    /// code is appended as `denied=<code>`. Without it a refusal is a plain
    /// 4xx response.
    #[serde(default)]
    pub error_to: Option<String>,
}

/// The stop form. Its `Debug` leaves the CSRF token out.
#[derive(Deserialize)]
pub struct StopForm {
    /// The CSRF token.
    #[serde(default)]
    pub csrf: String,
    /// Where to go afterwards (a local path).
    #[serde(default)]
    pub return_to: Option<String>,
}

impl StopForm {
    /// The stop form in `fields`, as posted: each field's last value, any
    /// other field ignored. The banner is the last thing on its page, so
    /// when a page leaves a form of its own open, the banner's token joins
    /// that form after the app's fields, a field of the app's named `csrf`
    /// among them.
    fn from_fields(fields: Vec<(String, String)>) -> Self {
        let mut form = Self {
            csrf: String::new(),
            return_to: None,
        };
        for (name, value) in fields {
            match name.as_str() {
                "csrf" => form.csrf = value,
                "return_to" => form.return_to = Some(value),
                _ => {}
            }
        }
        form
    }
}

impl std::fmt::Debug for StartForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartForm")
            .field("target", &self.target)
            .field("reason", &self.reason)
            .field("ticket", &self.ticket)
            .field("read_only", &self.read_only)
            .field("csrf", &"<redacted>")
            .field("return_to", &self.return_to)
            .field("error_to", &self.error_to)
            .finish()
    }
}

impl std::fmt::Debug for StopForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopForm")
            .field("csrf", &"<redacted>")
            .field("return_to", &self.return_to)
            .finish()
    }
}

/// `res`, marked `Cache-Control: no-store` (as every answer of these
/// routes is; the layer marks only responses under impersonation).
fn no_store(mut res: Response) -> Response {
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    res
}

fn text(status: StatusCode, body: String) -> Response {
    no_store((status, body).into_response())
}

/// The answer to a start or stop the service refused or could not make:
/// a refusal says why (a policy's reason, for the agent); a failure (5xx)
/// says only its code, its text (a store's or a directory's error, which
/// may name hosts and users) going to the log.
fn error(e: &Error) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::error!(error = %e, code = e.code(), "an impersonation start or stop failed");
        return text(
            status,
            format!("impersonation is unavailable; try again ({})", e.code()),
        );
    }
    text(status, format!("{e} ({})", e.code()))
}

/// A local path to go to: one path on this site, or `/`. Refused: a
/// scheme-relative `//host` or `/\host` (browsers read `\` as `/`), and any
/// byte but visible ASCII: browsers drop tabs and newlines from a URL, so
/// `/<TAB>/evil.example` would lead to `//evil.example`, and a `Location`
/// header cannot carry them anyway.
fn local(return_to: Option<&str>) -> String {
    match return_to {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.contains('\\')
                && path.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            path.to_owned()
        }
        _ => "/".to_owned(),
    }
}

async fn start(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Some(Handle(state)) = parts.extensions.get::<Handle>().cloned() else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "impersonation layer missing".into(),
        );
    };
    let shared = &state.shared;
    let Some(principal) = parts.extensions.get::<Principal>().cloned() else {
        return text(StatusCode::UNAUTHORIZED, "sign in first".into());
    };
    let Some(token) = parts.extensions.get::<CsrfToken>().cloned() else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "impersonation layer missing".into(),
        );
    };
    // Started from inside a session: the core refuses it as nesting (audited).
    let ctx: Option<Context> = parts.extensions.get::<Context>().cloned();
    let settings = &shared.settings;
    let check = CsrfCheck::of(&parts, settings, token);
    let req = Request::from_parts(parts, body);
    let form =
        match <Form<StartForm> as axum::extract::FromRequest<()>>::from_request(req, &()).await {
            Ok(Form(form)) => form,
            Err(rejection) => {
                return form_refused(&rejection, "expected a form with target and reason");
            }
        };
    if !check.verify(&form.csrf) {
        return text(StatusCode::FORBIDDEN, FORM_REFUSED.into());
    }
    let Ok(target) = UserId::new(form.target.trim()) else {
        return text(StatusCode::BAD_REQUEST, "invalid target".into());
    };
    let mut request = StartRequest::new(target, form.reason);
    request.ticket = form.ticket.filter(|t| !t.trim().is_empty());
    request.read_only = form.read_only.is_some();
    // From here the service audits the outcome (a refusal, or the start),
    // so the layer does not audit this request again. It runs to its end
    // (`run_to_end`), as the layer's own writes do: a client gone
    // meanwhile takes neither the record nor others its store call carries.
    state.audited.store(true, Ordering::SeqCst);
    let api = Arc::clone(&shared.api);
    let outcome = run_to_end(async move {
        let requester = match &ctx {
            Some(ctx) => Requester::Impersonating(ctx),
            None => Requester::User(&principal),
        };
        api.start(requester, request).await
    });
    let started = match outcome.await {
        Ok(started) => started,
        Err(e) => {
            return match form.error_to.as_deref() {
                Some(path) if e.http_status() < 500 => {
                    let path = local(Some(path));
                    // The code goes into the query, before any fragment
                    // (which the server never sees).
                    let (path, fragment) = match path.split_once('#') {
                        Some((path, fragment)) => (path, format!("#{fragment}")),
                        None => (path.as_str(), String::new()),
                    };
                    let joiner = if path.contains('?') { '&' } else { '?' };
                    no_store(
                        Redirect::to(&format!("{path}{joiner}denied={}{fragment}", e.code()))
                            .into_response(),
                    )
                }
                _ => error(&e),
            };
        }
    };
    let mut cookie = settings.cookie(
        settings.secret_cookie(),
        started.secret.expose().to_owned(),
        true,
    );
    // The browser keeps the cookie past the session's end, so that the
    // layer sees it dead (and refuses the change a form of the customer's
    // page posts after the end, instead of running it as the agent): as
    // long as the session could last once consent comes (a pending
    // session's expiry is its consent deadline), and a day more.
    // (Saturating, and within what browsers keep: a policy may set no
    // limit, `Duration::MAX`.)
    let left = (started.session.expires_at - shared.api.now()).max(time::Duration::ZERO);
    let max_age = left
        .saturating_add(started.session.grant.duration)
        .saturating_add(DEAD_COOKIE_KEPT)
        .min(MOST_COOKIE_AGE);
    cookie.set_max_age(time::Duration::seconds(max_age.whole_seconds().max(1)));
    let mut res = no_store(Redirect::to(&local(form.return_to.as_deref())).into_response());
    set_cookie(&mut res, &cookie);
    replace_csrf_token(&mut res);
    res
}

/// A start or stop whose CSRF check failed: most often a form shown
/// before the browser's identity changed (a start, a stop, a session
/// that ended), seldom an attack.
const FORM_REFUSED: &str = "refused: this form is out of date (it was shown before an impersonation started or ended; reload the page and try again) or was sent from another site";

/// How long the browser keeps a session's cookie past the longest the
/// session could last.
const DEAD_COOKIE_KEPT: time::Duration = time::Duration::days(1);

/// The longest `Max-Age` browsers honour (RFC 6265bis caps it at 400 days).
const MOST_COOKIE_AGE: time::Duration = time::Duration::days(400);

/// The answer to a start or stop whose body is not the form: 413 for one
/// too large, 415 for one that is not a form, 400 otherwise.
fn form_refused(rejection: &axum::extract::rejection::FormRejection, expected: &str) -> Response {
    match rejection.status() {
        s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => {
            text(s, rejection.body_text())
        }
        _ => text(StatusCode::BAD_REQUEST, expected.into()),
    }
}

/// A start or stop changes whom the browser acts as: the forms of pages
/// rendered before it (another tab's settings form, say) are given a CSRF
/// token that no longer passes, so they cannot post as the new identity.
/// The layer draws it, as for a host's sign-in ([`RenewCsrfToken`]).
fn replace_csrf_token(res: &mut Response) {
    res.extensions_mut().insert(RenewCsrfToken);
}

async fn stop(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Some(Handle(state)) = parts.extensions.get::<Handle>().cloned() else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "impersonation layer missing".into(),
        );
    };
    let shared = &state.shared;
    let principal = parts.extensions.get::<Principal>().cloned();
    let settings = &shared.settings;
    // An API client stopping with its own bearer secret, or with a signed
    // token naming its session (a session resolved with no secret): no
    // browser sends that header on its own, so no cross-site check applies
    // and no form is needed. The outcome is audited by the service as for
    // a browser's stop (another agent's attempt is a refusal on the
    // trail); the answer is 204, with no redirect and no cookie.
    let ctx = parts.extensions.get::<Context>();
    let signed = state.from_token && ctx.is_some();
    if (state.bearer && state.secret.is_some()) || signed {
        let principal = match (principal, ctx) {
            (Some(principal), _) => principal,
            // No one signed in by the host: the secret is the agent's own
            // credential (the layer serves the session on it alone), and
            // its holder may end what it may act in. The session's agent
            // stops it, as the trail says.
            (None, Some(ctx)) => match shared.api.principal(&ctx.agent().id).await {
                Ok(Some(agent)) => agent,
                Ok(None) => {
                    return text(
                        StatusCode::UNAUTHORIZED,
                        "the session's agent is no longer a user".into(),
                    );
                }
                Err(e) => return error(&e),
            },
            (None, None) => return text(StatusCode::UNAUTHORIZED, "sign in first".into()),
        };
        state.audited.store(true, Ordering::SeqCst);
        let session = ctx.map(Context::session);
        return stop_failed(stop_to_end(&state, principal, session).await)
            .unwrap_or_else(|| no_store(StatusCode::NO_CONTENT.into_response()));
    }
    let check = parts
        .extensions
        .get::<CsrfToken>()
        .cloned()
        .map(|token| CsrfCheck::of(&parts, settings, token));
    let live = ctx.is_some();
    // Before the body is read: no one signed in gets nothing read.
    let (Some(principal), Some(check)) = (principal, check) else {
        return text(StatusCode::UNAUTHORIZED, "sign in first".into());
    };
    let req = Request::from_parts(parts, body);
    let form = match <Form<Vec<(String, String)>> as axum::extract::FromRequest<()>>::from_request(
        req,
        &(),
    )
    .await
    {
        Ok(Form(fields)) => StopForm::from_fields(fields),
        Err(rejection) => return form_refused(&rejection, "expected a form"),
    };
    // No session cookie: nothing to stop (the browser let go of it; or a
    // request of the page's own, a poll say, reached the layer after the
    // session ended, and its answer cleared the cookie and replaced the
    // token the banner's form carries). The agent is sent on as for a
    // stop; as for sign-out, the same-site check alone serves: nothing is
    // done.
    let Some(secret) = &state.secret else {
        if !check.same_site() {
            return text(StatusCode::FORBIDDEN, FORM_REFUSED.into());
        }
        return no_store(Redirect::to(&local(form.return_to.as_deref())).into_response());
    };
    // A banner left open on a session that has ended since: its form
    // carries the token pages had under that session (bound to it), which
    // the cookie's session, dead, no longer gives this request.
    let banner_of_ended = !live && check.verify_bound(&form.csrf, secret.hash());
    if !check.verify(&form.csrf) && !banner_of_ended {
        return text(StatusCode::FORBIDDEN, FORM_REFUSED.into());
    }
    // From here the service audits the outcome (the end, or a refusal).
    state.audited.store(true, Ordering::SeqCst);
    if let Some(res) = stop_failed(stop_to_end(&state, principal, None).await) {
        return res;
    }
    let mut res = no_store(Redirect::to(&local(form.return_to.as_deref())).into_response());
    set_cookie(&mut res, &settings.removal(settings.secret_cookie()));
    res.extensions_mut().insert(EndedSessionToken);
    res
}

/// Stops the request's session as `principal`, to its end (`run_to_end`)
/// even if the client goes away, as the layer's own writes are: the one
/// its secret names, or else `session`, the one its signed token names.
async fn stop_to_end(
    state: &Arc<RequestState>,
    principal: Principal,
    session: Option<SessionId>,
) -> Result<EndReason, Error> {
    let held = Arc::clone(state);
    run_to_end(async move {
        match (&held.secret, session) {
            (Some(secret), _) => held.shared.api.stop(secret, &principal).await,
            (None, Some(id)) => held.shared.api.stop_session(id, &principal).await,
            (None, None) => Err(Error::Unauthenticated),
        }
    })
    .await
}

/// The answer to a stop that failed, or `None` when it is done: the
/// session ended now, or had ended already (it expired, idled out or was
/// revoked; the trail says so), or is gone from the store. What the stop
/// asked for holds then, and the client is let go of it as for a stop.
fn stop_failed<T>(outcome: Result<T, Error>) -> Option<Response> {
    match outcome {
        // `UnknownSession`: its record went from the store between the
        // stop's lookup and its end (an operator's delete, say).
        Ok(_) | Err(Error::Ended(_) | Error::Unauthenticated | Error::UnknownSession) => None,
        Err(e) => Some(error(&e)),
    }
}

async fn status(req: Request) -> Response {
    let Some(Handle(state)) = req.extensions().get::<Handle>().cloned() else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "impersonation layer missing".into(),
        );
    };
    let shared = &state.shared;
    let body = match req.extensions().get::<Context>() {
        Some(ctx) => {
            let banner = ctx.banner(shared.api.now());
            serde_json::json!({
                "impersonating": true,
                "session": ctx.session().to_string(),
                "agent": { "id": ctx.agent().id.as_str(), "name": ctx.agent().name },
                "subject": { "id": ctx.subject().as_str(), "name": ctx.shadow().display_name() },
                "message": banner.message(),
                "reason": banner.reason,
                "ticket": banner.ticket,
                "expires_at": ctx.expires_at().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                "seconds_left": banner.seconds_left,
                "read_only": ctx.read_only(),
            })
        }
        None => serde_json::json!({ "impersonating": false }),
    };
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::{local, stop_failed};
    use axum::http::StatusCode;
    use impersonation_core::{Denial, EndReason, Error, StoreError};

    /// A stop is done when the session ended now or before, or is gone
    /// from the store (also between the stop's lookup and its end): the
    /// client is let go of it (no answer of its own here, so the route
    /// clears the cookie). A refusal or an outage is answered as such.
    #[test]
    fn a_stop_whose_session_is_over_or_gone_is_done() {
        for done in [
            Ok(()),
            Err(Error::Ended(EndReason::Revoked)),
            Err(Error::Unauthenticated),
            Err(Error::UnknownSession),
        ] {
            let shown = format!("{done:?}");
            assert!(stop_failed(done).is_none(), "{shown}");
        }
        let refused = stop_failed::<()>(Err(Error::Denied(Denial::NotSessionAgent)));
        assert_eq!(refused.map(|r| r.status()), Some(StatusCode::FORBIDDEN));
        let outage = stop_failed::<()>(Err(Error::Store(StoreError::unavailable(
            std::io::Error::other("down"),
        ))));
        assert_eq!(
            outage.map(|r| r.status()),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
    }

    /// Only one path on this site is a redirect target; anything a
    /// browser could read as another host, or that a `Location` header
    /// cannot carry, goes to `/`.
    #[test]
    fn only_a_local_path_is_a_redirect_target() {
        for path in [
            "/",
            "/support?q=kim",
            "/a/b#frag",
            "/%2F%2Fevil.example",
            "/..",
        ] {
            assert_eq!(local(Some(path)), path, "{path}");
        }
        for outside in [
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "/ok\\..\\evil",
            "https://evil.example",
            "evil.example",
            "",
            "/\t/evil.example",
            "/\n/evil.example",
            "/ space",
            "/caf\u{e9}",
        ] {
            assert_eq!(local(Some(outside)), "/", "{outside:?}");
        }
        assert_eq!(local(None), "/");
    }
}
