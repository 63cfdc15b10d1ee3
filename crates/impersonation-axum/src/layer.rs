//! The tower layer: reads the session secret, resolves it, makes the shadow
//! user the request's user, audits the request once, marks the response
//! `no-store` and injects the banner.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};

use axum::body::{Body, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cookie::{Cookie, SameSite};
use futures_like::BoxFuture;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use impersonation_core::{
    Activity, ActivityKind, ChainKey, Context, Principal, SecretHash, SessionSecret,
};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::banner::{banner_html, inject};
use crate::watch::{EndsWithSession, Over, ended, watch_session};
use impersonation_core::{ImpersonationApi, TokenResolver};

mod futures_like {
    pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
}

/// Largest HTML body the layer buffers to inject the banner; a larger one is
/// refused (500) rather than served without it.
pub const MAX_BANNER_BODY: usize = 8 * 1024 * 1024;

/// Longest the layer reads an impersonated HTML page's body to inject the
/// banner: a page still coming after that (a forever-frame, a page that
/// streams a live log) is refused (500) rather than held open or served
/// without it. Read for longer than the layer's stream check
/// ([`ImpersonationLayer::check_streams_every`](crate::ImpersonationLayer::check_streams_every)),
/// a page is watched as a stream is: its session's end stops the read.
pub const MAX_BANNER_READ_TIME: std::time::Duration = std::time::Duration::from_secs(60);

/// A choice made per request, by method and route template: which
/// requests under impersonation are audited, which are changes.
pub(crate) type RouteFilter = Arc<dyn Fn(&Method, &str) -> bool + Send + Sync>;

/// Settings of the layer and routes.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) mount: String,
    pub(crate) secure_cookies: bool,
    pub(crate) audit: RouteFilter,
    /// Which requests are changes; `None`: all but the safe methods.
    pub(crate) changes: Option<RouteFilter>,
    pub(crate) tokens: Option<Arc<dyn TokenResolver>>,
    /// How often a streamed response (and [`crate::SessionEnd`]) checks
    /// that its session is still live.
    pub(crate) stream_check: std::time::Duration,
    /// The origins `Origin` may name; empty: the request's own, by `Host`.
    pub(crate) origins: Vec<crate::SiteOrigin>,
}

impl Settings {
    pub(crate) fn secret_cookie(&self) -> &'static str {
        if self.secure_cookies {
            "__Host-impersonation"
        } else {
            "impersonation"
        }
    }

    pub(crate) fn csrf_cookie(&self) -> &'static str {
        if self.secure_cookies {
            "__Host-impersonation-csrf"
        } else {
            "impersonation-csrf"
        }
    }

    /// A cookie with the SDK's attributes: HttpOnly, Secure (unless in
    /// development mode), SameSite=Strict, Path=/ (what `__Host-` requires).
    pub(crate) fn cookie(
        &self,
        name: &'static str,
        value: String,
        http_only: bool,
    ) -> Cookie<'static> {
        let mut c = Cookie::new(name, value);
        c.set_path("/");
        c.set_http_only(http_only);
        c.set_secure(self.secure_cookies);
        c.set_same_site(SameSite::Strict);
        c
    }

    pub(crate) fn removal(&self, name: &'static str) -> Cookie<'static> {
        let mut c = self.cookie(name, String::new(), true);
        c.make_removal();
        c
    }

    /// Whether `route` is the SDK's start or stop route (under the mount
    /// point), which a read-only session may still post to (stop ends it).
    /// Exactly those two: with the routes mounted at the root, every other
    /// route still is checked.
    pub(crate) fn own_route(&self, route: &str) -> bool {
        matches!(self.under_mount(route), Some("/start" | "/stop"))
    }

    /// Whether `route` is the SDK's stop route (under the mount point).
    pub(crate) fn stop_route(&self, route: &str) -> bool {
        self.under_mount(route) == Some("/stop")
    }

    /// `route`'s part under the mount point, if it is under it.
    fn under_mount<'a>(&self, route: &'a str) -> Option<&'a str> {
        route.strip_prefix(self.mount.as_str())
    }

    pub(crate) fn stop_path(&self) -> String {
        format!("{}/stop", self.mount.trim_end_matches('/'))
    }
}

pub(crate) struct Shared {
    pub(crate) api: Arc<dyn ImpersonationApi>,
    pub(crate) settings: Settings,
}

/// Request extension: what the layer hands its routes and extractors, in
/// one allocation (each extension is one more, and the request's map grows).
#[derive(Clone)]
pub(crate) struct Handle(pub(crate) Arc<RequestState>);

pub(crate) struct RequestState {
    /// The layer's shared state.
    pub(crate) shared: Arc<Shared>,
    /// The session secret the request presented (even when it did not
    /// resolve for this user), for the stop route.
    pub(crate) secret: Option<SessionSecret>,
    /// The secret came in `Authorization: Bearer` (an API client's own
    /// credential, which a browser never sends on its own), not a cookie.
    pub(crate) bearer: bool,
    /// A signed token in `Authorization` named the session (no secret).
    pub(crate) from_token: bool,
    /// Set once the request has been handed to the service, which audits
    /// it (start, stop), so the layer does not audit it twice.
    pub(crate) audited: AtomicBool,
    /// Set once [`crate::NotImpersonating`] has refused the request and
    /// audited the refusal: that is its record, if the answer is the
    /// refusal (it carries [`RefusalAnswer`]). A handler that took the
    /// guard as a `Result` and answered anything else carried on, maybe
    /// to a change: then its request is audited too.
    pub(crate) guard_refused: AtomicBool,
    /// Set while the guard's refusal is being written.
    pub(crate) refusal_in_flight: AtomicBool,
    /// Set when the guard found the session over instead (ended by
    /// another process, or its time up): nothing was recorded, and an
    /// answer that is the guard's refusal is the session's end.
    pub(crate) refused_over: AtomicBool,
    /// Set to true once the layer finds the session ended while the
    /// request was served; made only when a [`crate::SessionEnd`] asks.
    pub(crate) over: std::sync::OnceLock<tokio::sync::watch::Sender<bool>>,
}

impl RequestState {
    /// What a [`crate::SessionEnd`] of this request watches, to end at
    /// once when the layer finds the session over.
    pub(crate) fn ended_while_served(&self) -> tokio::sync::watch::Receiver<bool> {
        self.over
            .get_or_init(|| tokio::sync::watch::channel(false).0)
            .subscribe()
    }

    /// The layer found the session ended while the request was served.
    fn found_over(&self) {
        if let Some(over) = self.over.get() {
            over.send_replace(true);
        }
    }
}

/// Request extension: the CSRF token this request's page puts into its
/// forms. It is the browser's CSRF cookie, or, under the browser's
/// impersonation session (or one waiting for consent), a token derived
/// from the cookie and bound to that session, so a form posts as the
/// identity its page was rendered under or not at all. Cloning is cheap:
/// the text is shared. Its `Debug` does not show it.
///
/// A browser that has no CSRF cookie yet gets one with a page (`text/html`
/// or XHTML, an app shell whose script reads the cookie included), or with
/// any response whose handler took the token ([`CsrfToken::as_str`], read
/// before the response is returned or held in its body): a stylesheet, an
/// image or a JSON answer gives out none.
#[derive(Clone)]
pub struct CsrfToken {
    text: Arc<str>,
    /// Set once the token is read: its page needs the cookie. Only a first
    /// token has one (a browser that holds the cookie, or an API client,
    /// has no cookie to be given).
    taken: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for CsrfToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CsrfToken(<redacted>)")
    }
}

/// The credentials of `Authorization: Bearer <token>`; the scheme's name is
/// case-insensitive (RFC 9110, section 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl CsrfToken {
    pub(crate) fn new(text: &Arc<str>, taken: Option<&Arc<AtomicBool>>) -> Self {
        Self {
            text: Arc::clone(text),
            taken: taken.cloned(),
        }
    }

    /// The token, for a hidden `csrf` field in forms that post to the SDK's
    /// routes (and the host's own, checked with [`crate::CsrfCheck`]).
    /// Taking it gives a browser without the cookie its cookie, whatever
    /// the response's type.
    pub fn as_str(&self) -> &str {
        mark_taken(self.taken.as_ref());
        &self.text
    }

    /// The token, read to compare with a form's, not to put in a page.
    pub(crate) fn compared(&self) -> &str {
        &self.text
    }

    /// Whether the token was taken for the response, or may still be (a
    /// clone of it lives on, in a body that streams, say).
    fn was_taken(taken: Option<&Arc<AtomicBool>>) -> bool {
        taken.is_some_and(|t| t.load(Ordering::Relaxed) || Arc::strong_count(t) > 1)
    }
}

pub(crate) fn new_token() -> Option<String> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(URL_SAFE_NO_PAD.encode(bytes))
}

/// The CSRF token that replaces `old` once the browser's impersonation
/// cookie names a session that has ended (or cannot be read): forms
/// rendered under that session then fail the check instead of posting as
/// the agent. Derived, not drawn, so that a page's requests sent side by
/// side with the same dead cookie all arrive at the same new token (the
/// last cookie set wins); no one without the old token can compute it.
///
/// The same derivation, for another `purpose`, gives the token of pages
/// served while a session waits for consent.
fn derived_token(purpose: &[u8], old: &str, secret: Option<SecretHash>) -> String {
    let mut digest = Sha256::new();
    digest.update(b"impersonation-axum csrf ");
    digest.update(purpose);
    digest.update(b"\0");
    digest.update(old.as_bytes());
    if let Some(hash) = secret {
        digest.update(hash.as_bytes());
    }
    URL_SAFE_NO_PAD.encode(digest.finalize())
}

/// The token pages carry under the browser's session of `secret`, whose
/// stored token is `stored`.
pub(crate) fn session_token(stored: &str, secret: SecretHash) -> String {
    derived_token(SESSION_PURPOSE, stored, Some(secret))
}

/// What a token bound to a live session is derived for.
const SESSION_PURPOSE: &[u8] = b"session";

/// The token that replaces `old` once the session of `secret` is found
/// ended: one derivation for every place that finds it, so they agree.
fn ended_session_token(old: &str, secret: Option<&SessionSecret>) -> String {
    derived_token(b"rotation", old, secret.map(SessionSecret::hash))
}

/// The layer. Build it with [`crate::ImpersonationLayer::new`].
#[derive(Clone)]
pub struct ImpersonationLayer {
    pub(crate) shared: Arc<Shared>,
}

impl<S> Layer<S> for ImpersonationLayer {
    type Service = ImpersonationService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ImpersonationService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service the layer wraps around the app.
#[derive(Clone)]
pub struct ImpersonationService<S> {
    inner: S,
    shared: Arc<Shared>,
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], text).into_response()
}

/// A refused bearer credential (RFC 6750 §3: the scheme and why, so a
/// client knows to get a new one rather than to sign in anew).
fn bearer_refused(text: &'static str) -> Response {
    let mut res = plain(StatusCode::UNAUTHORIZED, text);
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    res
}

/// The answer to a request whose session has ended: for a credential
/// sent in a header, a refused bearer credential (with its
/// `WWW-Authenticate`), as any other refused one.
fn session_ended(bearer: bool) -> Response {
    if bearer {
        bearer_refused("impersonation session ended")
    } else {
        plain(StatusCode::UNAUTHORIZED, "impersonation session ended")
    }
}

/// The value of the first cookie called `name`, borrowed from the header
/// (the `cookie` crate parses in place: nothing is copied).
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let [value] = cookies(headers, [name]);
    value
}

/// The values of the first cookies called `names`, in one pass over the
/// header.
fn cookies<'a, const N: usize>(headers: &'a HeaderMap, names: [&str; N]) -> [Option<&'a str>; N] {
    let mut found: [Option<Option<&'a str>>; N] = [None; N];
    // A header of visible ASCII is parsed in place, as a whole; one that
    // is not is read pair by pair: a pair that is not (another site on
    // this host, another port, can set one) is passed over alone, not the
    // whole header with the session's and the token's cookies in it.
    let parsed = headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| {
            let whole = v.to_str().ok();
            let pairs = whole
                .is_none()
                .then(|| v.as_bytes().split(|&b| b == b';'))
                .into_iter()
                .flatten()
                .filter_map(|pair| std::str::from_utf8(pair).ok())
                .filter(|pair| {
                    pair.bytes()
                        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
                })
                .map(|pair| Cookie::parse(pair.trim()));
            whole.into_iter().flat_map(Cookie::split_parse).chain(pairs)
        })
        .filter_map(Result::ok);
    for c in parsed {
        if let Some(i) = names.iter().position(|n| *n == c.name())
            && found[i].is_none()
        {
            found[i] = Some(c.value_raw().map(|value| value.trim_matches('"')));
        }
    }
    found.map(Option::flatten)
}

/// Whether the SDK's stop answers `req` itself (and records what it
/// refuses): a `POST` to the stop route with a session secret. Any other
/// method there gets the router's 405, which records nothing.
fn stop_answers(req: &Request, settings: &Settings, has_secret: bool) -> bool {
    *req.method() == Method::POST
        && has_secret
        && settings.stop_route(route_of(req.extensions(), req.uri()))
}

/// The route a request is for, as the audit names it: its template
/// (`/bookings/{id}`) when a router matched it, its path otherwise.
pub(crate) fn route_of<'a>(
    extensions: &'a axum::http::Extensions,
    uri: &'a axum::http::Uri,
) -> &'a str {
    extensions
        .get::<MatchedPath>()
        .map_or_else(|| uri.path(), MatchedPath::as_str)
}

enum RouteName {
    Matched(MatchedPath),
    Path(String),
}

impl RouteName {
    fn as_str(&self) -> &str {
        match self {
            Self::Matched(m) => m.as_str(),
            Self::Path(p) => p,
        }
    }
}

/// Whether `res` already sets the cookie `name`.
fn sets_cookie(res: &Response, name: &str) -> bool {
    res.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split_once('='))
        .any(|(set, _)| set.trim() == name)
}

pub(crate) fn set_cookie(res: &mut Response, cookie: &Cookie<'static>) {
    if let Ok(value) = HeaderValue::from_str(&cookie.to_string()) {
        res.headers_mut().append(header::SET_COOKIE, value);
    }
}

impl<S> Service<Request> for ImpersonationService<S>
where
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        // The clone that was polled ready serves this call; a fresh clone
        // stays behind for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let settings = &shared.settings;
            // A change is refused in a read-only session, always reads the
            // session from the store, and is audited as a modification. An
            // upgrade (a WebSocket's handshake, a `GET`) is one, whatever
            // `changes_when` says of its method and route: what its
            // messages do later, the layer never sees.
            let upgrade = upgrades(req.method(), req.headers());
            let is_change = upgrade
                || match &settings.changes {
                    None => !req.method().is_safe(),
                    Some(changes) => changes(req.method(), route_of(req.extensions(), req.uri())),
                };

            // The secret: the cookie for browsers, `Authorization: Bearer` for
            // APIs; or, with a token resolver, a signed token naming a session.
            let authorization = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token);
            let bearer = authorization.filter(|t| SessionSecret::is_marked(t));
            let signed_token = match (&settings.tokens, authorization) {
                // As for a secret: a read may reuse a session resolved a
                // moment ago, a change reads the store.
                (Some(tokens), Some(token)) if bearer.is_none() => {
                    if !is_change {
                        tokens.resolve_token_for_read(token).await
                    } else {
                        tokens.resolve_token(token).await
                    }
                }
                _ => None,
            };
            // Both cookies in one pass over the header.
            let [csrf_cookie, secret_cookie] = cookies(
                req.headers(),
                [settings.csrf_cookie(), settings.secret_cookie()],
            );

            // API clients (bearer) are not browsers: no CSRF cookie is
            // issued to them, and their forms carry no token.
            // Only a value this layer could have drawn (43 base64url
            // characters): a page on another port of the same host can
            // set the cookie, and handlers put the token into their forms.
            let drawn = |v: &&str| {
                v.len() == 43
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            let (csrf, fresh_csrf): (Arc<str>, bool) = match csrf_cookie.filter(drawn) {
                Some(token) => (token.into(), false),
                None if bearer.is_some() || signed_token.is_some() => ("".into(), false),
                None => match new_token() {
                    Some(token) => (token.into(), true),
                    None => {
                        return Ok(plain(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "random source unavailable",
                        ));
                    }
                },
            };

            let from_cookie = bearer.is_none();
            // Parsed while the headers are borrowed; only the result is kept.
            let presented = bearer.or(secret_cookie).map(SessionSecret::parse);
            // For a first token: whether anything took it for the page
            // (see `CsrfToken`).
            let taken = fresh_csrf.then(|| Arc::new(AtomicBool::new(false)));
            req.extensions_mut()
                .insert(CsrfToken::new(&csrf, taken.as_ref()));
            // The secret presented, for the stop route.
            let mut kept_secret = None;

            let mut clear_secret = false;
            // What was presented, resolved, and whether a refusal only
            // clears the browser's cookie (rather than answering 401).
            // Whether a signed token named the session (it carries no secret).
            let from_token = signed_token.is_some();
            let resolved = if let Some(result) = signed_token {
                Some((result, false))
            } else if let Some(parsed) = presented {
                match parsed {
                    Err(_) if from_cookie => {
                        clear_secret = true;
                        None
                    }
                    Err(_) => {
                        return Ok(bearer_refused("invalid impersonation token"));
                    }
                    // No one signed in, or someone other than the agent
                    // whose chain the secret names (its route): the cookie
                    // impersonates no one (below), so it is not looked up
                    // either. A lookup touches the session, and requests
                    // not served under it (the agent signed out and a
                    // colleague signed in, a tab left polling) must not
                    // keep it from idling out.
                    Ok(secret)
                        if from_cookie
                            && req.extensions().get::<Principal>().is_none_or(|p| {
                                ChainKey::for_agent(&p.id).route() != secret.route()
                            }) =>
                    {
                        kept_secret = Some(secret);
                        None
                    }
                    Ok(secret) => {
                        // A read may be served from a session resolved a
                        // moment ago (its audit write checks the store
                        // again); a change always reads the store first.
                        let result = if !is_change {
                            shared.api.resolve(&secret).await
                        } else {
                            shared.api.resolve_fresh(&secret).await
                        };
                        kept_secret = Some(secret);
                        Some((result, from_cookie))
                    }
                }
            } else {
                None
            };
            let mut ctx: Option<Context> = None;
            // Whether the session came from the browser's cookie.
            let mut cookie_session = false;
            // Whether the cookie's session waits for the customer's consent.
            let mut pending = false;
            if let Some((result, from_cookie)) = resolved {
                cookie_session = from_cookie;
                match result {
                    Ok(c) => {
                        // The session is the signed-in agent's own, or it is
                        // not used. A browser's cookie also needs its agent
                        // signed in: once the agent signs out of the app, the
                        // cookie alone impersonates no one. (An API client's
                        // bearer secret or token is its credential.)
                        let signed_in = req.extensions().get::<Principal>().map(|p| p.id.clone());
                        match signed_in {
                            // A bearer credential names its agent: someone
                            // else signed in beside it (the host's auth
                            // taking the token's customer for the user, say)
                            // is refused, never served as that person, and
                            // the attempt goes on the session's trail; the
                            // SDK's stop, given a bearer secret, records it
                            // itself (and answers 403).
                            Some(id) if id != c.agent().id => {
                                let route = route_of(req.extensions(), req.uri());
                                if !(from_cookie
                                    || stop_answers(&req, settings, kept_secret.is_some()))
                                    && let Some(by) = req.extensions().get::<Principal>().cloned()
                                {
                                    let attempt = format!("{} {route}", req.method());
                                    let api = Arc::clone(&shared.api);
                                    let write = run_to_end(async move {
                                        api.record_used_by_other(&c, &by, &attempt).await
                                    });
                                    return Ok(match write.await {
                                        Ok(_) => bearer_refused("impersonation token refused"),
                                        Err(e) => {
                                            tracing::error!(error = %e, "an impersonation credential sent by someone other than its agent could not be audited; refusing the request");
                                            plain(
                                                StatusCode::SERVICE_UNAVAILABLE,
                                                "impersonation check unavailable",
                                            )
                                        }
                                    });
                                }
                            }
                            None if from_cookie => {}
                            _ => ctx = Some(c),
                        }
                    }
                    // Waiting for the customer's consent: the cookie stays
                    // (it is the only copy of the secret), and the agent is
                    // served as themself until the customer agrees.
                    Err(impersonation_core::Error::PendingConsent) if from_cookie => pending = true,
                    // A bearer credential whose session waits for the
                    // customer's consent is valid still: not refused as
                    // one that is not (a client would throw it away), and
                    // the SDK's stop, as the host's signed-in agent, may
                    // withdraw it (a bearer secret: the stop reads a
                    // signed token only from a live session's context).
                    Err(impersonation_core::Error::PendingConsent) => {
                        if !stop_answers(&req, settings, kept_secret.is_some()) {
                            return Ok(plain(
                                StatusCode::FORBIDDEN,
                                "impersonation session waits for the customer's consent",
                            ));
                        }
                    }
                    Err(e) if e.http_status() == 503 => {
                        tracing::error!(error = %e, "impersonation check failed; refusing the request");
                        return Ok(plain(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "impersonation check unavailable",
                        ));
                    }
                    Err(_) if from_cookie => clear_secret = true,
                    Err(_) => {
                        return Ok(bearer_refused("impersonation token refused"));
                    }
                }
            }

            // The browser's cookie names a session that has ended: the
            // pages it rendered are the customer's, and their forms must not
            // post as the agent. Their CSRF token is replaced (before the
            // handler reads it), and a change posted with the dead cookie
            // is refused here, whatever CSRF check the app makes itself.
            // (Not the SDK's start and stop: a start begins anew, and a
            // stop of an ended session is done.)
            let mut csrf = csrf;
            let mut fresh_csrf = fresh_csrf;
            // A fresh token that must reach the browser whether or not the
            // page takes it: it retires the forms of an identity that ended.
            let mut renewed_csrf = false;
            // What a fresh cookie holds: the token, unless the page's is
            // derived from it (below, under a session).
            let mut stored_csrf = Arc::clone(&csrf);
            // The browser's token as it came, which a token for the
            // session's end derives from.
            let cookie_csrf = Arc::clone(&csrf);
            // Under the browser's session, pages carry a token bound to it,
            // derived and not stored: a form rendered as anyone else (the
            // agent, on a page opened from another site, whose
            // `SameSite=Strict` cookies stayed behind) fails the check when
            // it arrives with this session's cookie, and a form rendered
            // under the session fails without it. Waiting for consent, the
            // agent's pages get one of their own: a form rendered then, as
            // the agent, fails once the customer has agreed and the same
            // browser is the customer.
            let bound_to: Option<&[u8]> = if pending {
                Some(b"pending")
            } else if cookie_session && ctx.is_some() {
                Some(SESSION_PURPOSE)
            } else {
                None
            };
            if let Some(purpose) = bound_to.filter(|_| !csrf.is_empty()) {
                csrf = derived_token(
                    purpose,
                    &stored_csrf,
                    kept_secret.as_ref().map(SessionSecret::hash),
                )
                .into();
                req.extensions_mut()
                    .insert(CsrfToken::new(&csrf, taken.as_ref()));
            }
            if clear_secret
                && !csrf.is_empty()
                && !settings.own_route(route_of(req.extensions(), req.uri()))
            {
                csrf = ended_session_token(&cookie_csrf, kept_secret.as_ref()).into();
                fresh_csrf = true;
                renewed_csrf = true;
                stored_csrf = Arc::clone(&csrf);
                req.extensions_mut()
                    .insert(CsrfToken::new(&csrf, taken.as_ref()));
                if is_change {
                    // The template, not the path: a path may carry a
                    // token (a password reset link's, say). (Outside a
                    // router, a fallback or `nest_service`, axum gives no
                    // template, and this is the path: see docs/axum.md.)
                    tracing::info!(
                        route = route_of(req.extensions(), req.uri()),
                        "a change posted under an impersonation session that has ended is refused"
                    );
                    let mut res = plain(
                        StatusCode::CONFLICT,
                        "the impersonation session this page belongs to has ended; nothing was changed (reload the page)",
                    );
                    set_cookie(&mut res, &settings.removal(settings.secret_cookie()));
                    set_cookie(
                        &mut res,
                        &settings.cookie(settings.csrf_cookie(), csrf.to_string(), false),
                    );
                    return Ok(res);
                }
            }

            let state = Arc::new(RequestState {
                shared: Arc::clone(&shared),
                bearer: !from_cookie && kept_secret.is_some(),
                from_token,
                secret: kept_secret,
                audited: AtomicBool::new(false),
                guard_refused: AtomicBool::new(false),
                refusal_in_flight: AtomicBool::new(false),
                refused_over: AtomicBool::new(false),
                over: std::sync::OnceLock::new(),
            });
            req.extensions_mut().insert(Handle(Arc::clone(&state)));

            // What the audit needs of the request, only under impersonation.
            let mut audit = None;
            // The host the request named, for the banner's Stop form's
            // place in a page's policy (see `crate::csp`).
            let mut page_host = None;
            let span = match &ctx {
                Some(c) => {
                    let method = req.method().clone();
                    // The route template (a shared string), or the path outside a router.
                    let route = match req.extensions().get::<MatchedPath>() {
                        Some(m) => RouteName::Matched(m.clone()),
                        None => RouteName::Path(req.uri().path().to_owned()),
                    };
                    req.extensions_mut().insert(c.clone());
                    page_host = crate::csrf::request_host(req.headers(), req.uri());
                    // The page must come back as the app renders it now,
                    // for the banner to go in: not encoded (a precompressed
                    // file; a compression layer outside this one still
                    // compresses the answer), and not "unchanged" (a 304
                    // shows the browser's copy from before the
                    // impersonation, without the banner; on a `GET` or
                    // `HEAD` these two can mean nothing else, even on a
                    // route the app counts as a change). A change keeps
                    // its preconditions (`If-Match`, and `If-None-Match: *`
                    // on a `PUT`); a range request keeps its range (a
                    // video, a resumed download: no page).
                    let reads = matches!(method, Method::GET | Method::HEAD);
                    let headers = req.headers_mut();
                    headers.remove(header::ACCEPT_ENCODING);
                    if reads || !is_change {
                        headers.remove(header::IF_NONE_MATCH);
                        headers.remove(header::IF_MODIFIED_SINCE);
                    }
                    audit = Some((method, route));
                    tracing::info_span!(
                        "impersonation.request",
                        impersonation.agent = %c.agent().id,
                        impersonation.subject = %c.subject(),
                        impersonation.session = %c.session(),
                    )
                }
                None => tracing::Span::none(),
            };

            // A browser's WebSocket to the customer's session opened by a
            // page of another origin (a sibling subdomain's, whose requests
            // carry the `SameSite=Strict` cookies): that page would read
            // and send the socket's messages as the customer. A handshake
            // carries no form to hold a CSRF token, so its `Origin` (which
            // browsers always send on one) and `Sec-Fetch-Site` decide.
            // Refused before the handler runs, and on the trail as the
            // request's one record (403).
            if let (Some(c), Some((method, route))) = (&ctx, &audit)
                && upgrade
                && cookie_session
                && !crate::csrf::from_this_site(req.headers(), req.uri(), settings)
            {
                tracing::warn!(
                    route = route.as_str(),
                    "an upgrade from another origin under an impersonation session is refused"
                );
                // Recorded whatever `audit_when` says of the route: a
                // refusal is never left out.
                let status = StatusCode::FORBIDDEN;
                let activity = request_activity(method, route.as_str(), true, status.as_u16())
                    .detail("refused", "cross_origin_upgrade");
                if let Err(e) = write_record(&shared, c, activity).await {
                    log_unaudited(
                        &e,
                        c,
                        method,
                        route.as_str(),
                        true,
                        status.as_u16(),
                        "refusing it",
                    );
                    return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "audit unavailable"));
                }
                return Ok(plain(
                    status,
                    "refused during impersonation: a WebSocket opened from another origin",
                ));
            }

            // A change is asked for before it is made (a read-only session
            // may make none); the SDK's own routes (stop) are always let in.
            if let (Some(c), Some((method, route))) = (&ctx, &audit)
                && is_change
                && !settings.own_route(route.as_str())
            {
                let attempt = format!("{method} {}", route.as_str());
                // A refusal is written to its end, as the request's own
                // record is (`run_to_end`): a client gone meanwhile takes
                // neither it nor the other records its store call carries.
                let (api, admitted) = (Arc::clone(&shared.api), c.clone());
                let admission = run_to_end(async move {
                    api.admit(&admitted, ActivityKind::Modification, &attempt)
                        .await
                });
                match admission.await {
                    Ok(()) => {}
                    Err(e) if e.http_status() == 503 => {
                        tracing::error!(error = %e, "could not audit a refused impersonated change");
                        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "audit unavailable"));
                    }
                    // A read-only session (the refusal is audited), or
                    // one that ended while the refusal was written.
                    Err(e) => {
                        // `plain` answers are `no-store`.
                        return Ok(match e {
                            impersonation_core::Error::Denied(_) => plain(
                                StatusCode::FORBIDDEN,
                                "refused during impersonation: the session is read-only",
                            ),
                            _ => session_ended(!cookie_session),
                        });
                    }
                }
            }

            // Until its own audit below, a request given up midway (the
            // client went away, hyper dropped this future and the
            // handler's with it) is audited on the way out.
            let mut given_up = match (&ctx, &audit) {
                (Some(c), Some((method, route))) => Some(AuditIfGivenUp {
                    shared: &shared,
                    state: &state,
                    ctx: c,
                    method,
                    route: route.as_str(),
                    is_change,
                    status: CLIENT_CLOSED,
                    answered_refusal: false,
                }),
                _ => None,
            };
            // A panic is caught to be audited, then passed on. (In two
            // steps: the inner service's error need not be `Send`, so it is
            // not held across the audit write's await.)
            // The request's span goes on past the handler: the banner step
            // and the audit write log inside it too.
            let request_span = span.clone();
            let served = {
                let caught = AssertUnwindSafe(inner.call(req).instrument(span))
                    .catch_unwind()
                    .await;
                match caught {
                    Ok(Ok(res)) => Ok(res),
                    // The service failed without an answer (never under a
                    // `Router`, whose services are infallible): audited as a
                    // 500 on the way out.
                    Ok(Err(e)) => {
                        if let Some(g) = &mut given_up {
                            g.status = 500;
                        }
                        return Err(e);
                    }
                    Err(panic) => Err(panic),
                }
            };
            let mut res = match served {
                Ok(res) => res,
                Err(panic) => {
                    AuditIfGivenUp::disarm(given_up);
                    if let (Some(c), Some((method, route))) = (&ctx, &audit) {
                        audit_panic_and_resume(
                            &shared,
                            &state,
                            c,
                            method,
                            route.as_str(),
                            is_change,
                            panic,
                        )
                        .await;
                    }
                    std::panic::resume_unwind(panic);
                }
            };

            if let (Some(c), Some((method, route))) = (&ctx, &audit) {
                let route = route.as_str();
                // Whether the handler answered with the guard's refusal,
                // seen before the banner step may replace the answer (a
                // page too large for it: 500).
                let as_refused = Answer::refusal_in(&state, &res);
                // The app's own refusal, which the trail records as one.
                let denied = res.extensions().get::<Denied>().map(|d| d.0.clone());
                if let Some(g) = &mut given_up {
                    g.answered_refusal = as_refused;
                }
                // Whether the body is held whole now: a page with its
                // banner, sent as one piece, which a watch could only cut
                // before its first byte.
                let mut held_whole = false;
                // An HTML page is read whole and given its banner before it
                // is audited, so that the trail shows the status sent. A
                // client that goes away meanwhile was sent nothing (499).
                match page_kind(&res) {
                    // An explicit HEAD handler's answer: no body to put the
                    // banner in, but the length it announces is the page's
                    // with the banner, as a GET's would be.
                    Page::Injectable(markup)
                        if *method == Method::HEAD
                            && HttpBody::size_hint(res.body()).exact() == Some(0) =>
                    {
                        let announced = res
                            .headers()
                            .get(header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok());
                        // (The GET's page may differ: an XHTML one's
                        // empty `<body/>` adds its end tag, one that
                        // leaves a form open gets its `</form>` before the
                        // banner, one with no body gets no banner, and a
                        // `<meta>` policy the banner rewrites grows. A
                        // missing length would read as 0 to the router,
                        // which fills it in.)
                        // The GET's headers, as the banner leaves them.
                        forget_the_apps_bytes(res.headers_mut());
                        if let Some(n) = announced {
                            mark_taken(taken.as_ref());
                            let banner = banner_for(
                                markup,
                                banner_html(c, shared.api.now(), &settings.stop_path(), &csrf),
                            );
                            let with =
                                n.saturating_add(u64::try_from(banner.len()).unwrap_or(u64::MAX));
                            res.headers_mut()
                                .insert(header::CONTENT_LENGTH, HeaderValue::from(with));
                        }
                    }
                    Page::Injectable(markup) => {
                        mark_taken(taken.as_ref());
                        let banner = banner_for(
                            markup,
                            banner_html(c, shared.api.now(), &settings.stop_path(), &csrf),
                        );
                        // A body that panics while it is read is audited as
                        // the handler's panic is, then passed on.
                        let stop = crate::csrf::stop_sources(
                            settings,
                            page_host.as_ref().and_then(|h| h.to_str().ok()),
                        );
                        let watch = || {
                            watch_session(Arc::clone(&shared.api), c, settings.stream_check, None)
                        };
                        let read = Reading {
                            watch,
                            quiet: settings.stream_check,
                        };
                        match AssertUnwindSafe(
                            with_banner(res, &banner, &stop, markup, (route, c.session()), read)
                                .instrument(request_span.clone()),
                        )
                        .catch_unwind()
                        .await
                        {
                            Ok(page) => {
                                res = page;
                                held_whole = true;
                            }
                            Err(panic) => {
                                AuditIfGivenUp::disarm(given_up);
                                audit_panic_and_resume(
                                    &shared, &state, c, method, route, is_change, panic,
                                )
                                .await;
                            }
                        }
                    }
                    Page::BannerCannotGoIn(why) => {
                        let _in_request = request_span.enter();
                        tracing::warn!(
                            route,
                            session = %c.session(),
                            why,
                            "an impersonated HTML page is served without the banner"
                        );
                    }
                    Page::Other => {}
                }
                // From here the request is audited below, whatever happens.
                AuditIfGivenUp::disarm(given_up);
                let status = res.status().as_u16();
                let answer = Answer {
                    status,
                    as_refused,
                    denied,
                };
                // Whether the audit found the session ended meanwhile.
                let mut session_over = false;
                // The guard's refusal, of a session it found over: the
                // request did nothing, needs no record, and is answered as
                // a read in an ended session is.
                let refused_over = as_refused && state.refused_over.load(Ordering::SeqCst);
                let audited = if refused_over {
                    Some(Err(impersonation_core::Error::Unauthenticated))
                } else {
                    audit_request(&shared, &state, c, method, route, is_change, answer)
                        .instrument(request_span)
                        .await
                };
                match audited {
                    None | Some(Ok(())) => {}
                    // Nothing is served that the audit trail does not show.
                    // A change has been made by then: the log line is
                    // its only record, so it names all the trail would.
                    Some(Err(e)) if e.http_status() == 503 => {
                        log_unaudited(
                            &e,
                            c,
                            method,
                            route,
                            is_change,
                            status,
                            "withholding the response",
                        );
                        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "audit unavailable"));
                    }
                    // The session has ended (revoked elsewhere, say): the
                    // audit write refused this read (or the guard its
                    // refusal), so its answer, from a session that is
                    // over, is withheld.
                    Some(Err(e)) if !is_change || refused_over => {
                        tracing::warn!(error = %e, route, session = %c.session(), "session ended; withholding an impersonated answer");
                        state.found_over();
                        let mut res = session_ended(!cookie_session);
                        if cookie_session {
                            set_cookie(&mut res, &settings.removal(settings.secret_cookie()));
                            // The browser acts as the agent from here: the
                            // customer's open forms lose their token, as
                            // when a request brings the dead cookie (the
                            // same derivation, so both arrive at one token).
                            if !csrf.is_empty() {
                                let next = ended_session_token(&cookie_csrf, state.secret.as_ref());
                                set_cookie(
                                    &mut res,
                                    &settings.cookie(settings.csrf_cookie(), next, false),
                                );
                            }
                        }
                        return Ok(res);
                    }
                    // A change that began in an active session and saw it
                    // end meanwhile: the change is made and on the trail
                    // (after the end); its answer goes out as it began.
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, route, session = %c.session(), "session ended during an impersonated change");
                        session_over = true;
                        state.found_over();
                    }
                }
                let headers = res.headers_mut();
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                // Framed unseen by a page of another origin (a sibling
                // subdomain's, which gets the `SameSite=Strict` cookies),
                // the customer's page could have the agent click its
                // Stop or a form of the customer's. Only this site may
                // frame it: an app's own `X-Frame-Options` stays, and the
                // policy adds to any it sets (browsers enforce each one).
                if !headers.contains_key(header::X_FRAME_OPTIONS) {
                    headers.insert(
                        header::X_FRAME_OPTIONS,
                        HeaderValue::from_static("SAMEORIGIN"),
                    );
                }
                headers.append(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static("frame-ancestors 'self'"),
                );
                // CDNs let these override Cache-Control at their edge.
                remove_cdn_cache_headers(headers);
                // A body of no known length may stream on (server-sent
                // events, a long export) after the session has ended, and
                // so may a large one of known length (a file sent in
                // chunks): it is cut then. (A page with the banner is one
                // piece: not watched.) When the session ended while the
                // handler ran, a stream is cut at once; an answer of known
                // length to that change begins, as the change was made,
                // and is cut at the watch's first check.
                let length = HttpBody::size_hint(res.body()).exact();
                let watched = match length {
                    None => true,
                    Some(len) => len >= WATCHED_FROM && !held_whole,
                };
                if watched {
                    let end = if session_over && length.is_none() {
                        ended(Over::Ended)
                    } else {
                        watch_session(Arc::clone(&shared.api), c, settings.stream_check, None)
                    };
                    res = res.map(|body| Body::new(EndsWithSession::new(body, end)));
                }
            }
            // A new token the response asks for (a browser's only): the
            // host app's own sign-in or sign-out changed whom the browser
            // acts as, and gets a random one; the SDK's stop gets the token
            // for the session's end, which every answer to its dead cookie
            // gives too (one derivation), so that a request the page sent
            // before the stop, answered after it, agrees with it.
            let renew = res
                .extensions_mut()
                .remove::<crate::csrf::RenewCsrfToken>()
                .is_some();
            let ended = res
                .extensions_mut()
                .remove::<crate::csrf::EndedSessionToken>()
                .is_some();
            if (renew || ended) && !csrf.is_empty() {
                let next = if renew {
                    new_token()
                } else {
                    Some(ended_session_token(&cookie_csrf, state.secret.as_ref()))
                };
                match next {
                    Some(token) => {
                        stored_csrf = token.into();
                        fresh_csrf = true;
                        renewed_csrf = true;
                    }
                    None => {
                        tracing::warn!("random source unavailable; the CSRF token is not replaced");
                    }
                }
            }
            // A first token goes out with a page, or with a response that
            // took it (see `CsrfToken`); a renewed one always. (Unless the
            // response sets its own: a start or stop replaces it.)
            if fresh_csrf
                && (renewed_csrf || is_page(&res) || CsrfToken::was_taken(taken.as_ref()))
                && !sets_cookie(&res, settings.csrf_cookie())
            {
                set_cookie(
                    &mut res,
                    &settings.cookie(settings.csrf_cookie(), stored_csrf.to_string(), false),
                );
                keep_out_of_shared_caches(res.headers_mut());
            }
            // A dead secret cookie is cleared, unless the response sets a
            // new one (a start posted over it): cookies apply in order, and
            // a removal after the new secret would wipe it.
            if clear_secret && !sets_cookie(&res, settings.secret_cookie()) {
                set_cookie(&mut res, &settings.removal(settings.secret_cookie()));
                keep_out_of_shared_caches(res.headers_mut());
            }
            Ok(res)
        })
    }
}

/// Notes that a first token was taken for the page (by `as_str`, or the
/// banner's Stop form).
fn mark_taken(taken: Option<&Arc<AtomicBool>>) {
    if let Some(taken) = taken {
        taken.store(true, Ordering::Relaxed);
    }
}

/// Whether a response is a page (`text/html` or XHTML), by its type alone.
fn is_page(res: &Response) -> bool {
    crate::media_type::of(res.headers()).is_some_and(|t| markup_of(t.kind).is_some())
}

/// How a page of the media type `kind` is parsed, or `None` if it is no
/// page.
fn markup_of(kind: crate::media_type::Kind) -> Option<Markup> {
    match kind {
        crate::media_type::Kind::Html => Some(Markup::Html),
        crate::media_type::Kind::Xhtml => Some(Markup::Xhtml),
        _ => None,
    }
}

/// Whether the response's `Content-Type` names a charset a browser knows.
fn has_charset(headers: &HeaderMap) -> bool {
    crate::media_type::of(headers).is_some_and(|t| t.encoding.is_some())
}

/// The banner's markup for a page of `markup` (in HTML, a form the page
/// left open is closed before it: `crate::banner::inject`).
fn banner_for(markup: Markup, html: String) -> String {
    match markup {
        Markup::Html => html,
        Markup::Xhtml => crate::xhtml::banner(&html),
    }
}

/// How a page is parsed, and so how the banner goes in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Markup {
    /// `text/html`.
    Html,
    /// `application/xhtml+xml`: XML (see [`crate::xhtml`]).
    Xhtml,
}

/// What a response is to the banner.
enum Page {
    /// An HTML or XHTML page the banner goes into.
    Injectable(Markup),
    /// An HTML page the banner cannot go into, and why: it is served as it
    /// is, with a warning in the log.
    BannerCannotGoIn(&'static str),
    /// Not a page: not HTML, a part of one (`206`, `Content-Range`), a
    /// download (`Content-Disposition: attachment`), or no body at all.
    Other,
}

/// Whether the banner can go into `res`: a whole HTML page as the app wrote
/// it, in any charset that keeps ASCII as ASCII (UTF-8, the ISO 8859 and
/// Windows code pages; the banner itself is pure ASCII). Not into an
/// encoded body (`Content-Encoding`: put a compression layer outside this
/// one, so that it compresses the page with the banner) or a UTF-16 or
/// UTF-32 one. Nor into a page the app marked [`BannerRendered`]: it
/// holds the banner already.
fn page_kind(res: &Response) -> Page {
    if res.extensions().get::<crate::BannerRendered>().is_some() {
        return Page::Other;
    }
    let headers = res.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let status = res.status();
    // A status that carries no body (205: RFC 9110, 15.3.6).
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::RESET_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let no_body = bodiless || HttpBody::size_hint(res.body()).exact() == Some(0);
    let Some(media) = crate::media_type::of(headers) else {
        // A browser sniffs a body of no stated type, and may show it as
        // a page: one without the banner. (Its type is the app's to set.)
        return if no_body {
            Page::Other
        } else {
            Page::BannerCannotGoIn(
                "the response has no Content-Type (a browser may take it for a page)",
            )
        };
    };
    if media.kind == crate::media_type::Kind::Sniffed {
        return if no_body {
            Page::Other
        } else {
            Page::BannerCannotGoIn(
                "the response's Content-Type leaves its type to the browser (it may take it for a page)",
            )
        };
    }
    let Some(markup) = markup_of(media.kind) else {
        return Page::Other;
    };
    let attachment = text(header::CONTENT_DISPOSITION).is_some_and(|d| {
        d.split(';')
            .next()
            .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("attachment"))
    });
    if attachment || status == StatusCode::PARTIAL_CONTENT || bodiless {
        return Page::Other;
    }
    // A browser shows the whole body of any other status, whatever its
    // `Content-Range` says; the banner would make the two disagree.
    if headers.contains_key(header::CONTENT_RANGE) {
        return Page::BannerCannotGoIn("the page carries a Content-Range");
    }
    let wide = media.encoding.is_some_and(|e| !e.is_ascii_compatible());
    let encoded = headers.get(header::CONTENT_ENCODING).is_some_and(|v| {
        !v.to_str()
            .is_ok_and(|e| e.trim().eq_ignore_ascii_case("identity"))
    });
    if encoded {
        Page::BannerCannotGoIn("the page's body is encoded (Content-Encoding)")
    } else if wide {
        Page::BannerCannotGoIn("the page's charset is not one known to keep ASCII as ASCII")
    } else {
        Page::Injectable(markup)
    }
}

/// Whether a charset label names an encoding that keeps ASCII bytes as
/// ASCII characters everywhere in a page, so that `</body>` found byte for
/// byte is the tag and ASCII inserted before it reads as written: the
/// label read as browsers read it (the WHATWG Encoding Standard's table,
/// through `encoding_rs`), and its encoding ASCII-compatible there (UTF-8,
/// the ISO 8859 and Windows code pages, KOI8, the Mac ones, and the CJK
/// encodings, whose trailing bytes never fall on `<`). Not UTF-16, not
/// ISO-2022-JP, which switches modes inside the page, and not the
/// "replacement" encoding; an unknown label counts as not (an XML
/// declaration's: a `Content-Type`'s or a `<meta>`'s unknown label is
/// ignored, as browsers ignore it).
pub(crate) fn keeps_ascii(label: &str) -> bool {
    encoding_rs::Encoding::for_label(label.as_bytes()).is_some_and(|e| e.is_ascii_compatible())
}

/// How an impersonated page's body is read for its banner.
pub(crate) struct Reading<W> {
    /// Starts a watch of the session, answering once it has ended.
    pub(crate) watch: W,
    /// How long a read goes unwatched (most pages are read by then).
    pub(crate) quiet: std::time::Duration,
}

/// Why a page's body was not read whole.
enum Unread {
    /// Larger than [`MAX_BANNER_BODY`], or its body failed.
    Failed(axum::BoxError),
    /// Its session ended while it was read.
    SessionOver,
    /// Its session could not be confirmed while it was read (the store
    /// or the directory out of reach, or too slow).
    Unconfirmed,
    /// Still coming after [`MAX_BANNER_READ_TIME`].
    TooSlow,
}

/// `body` read whole (up to [`MAX_BANNER_BODY`]): unwatched for
/// `read.quiet`, then while the session's watch runs, for
/// [`MAX_BANNER_READ_TIME`] in all.
async fn read_page<W>(
    body: Body,
    read: Reading<W>,
) -> Result<http_body_util::Collected<axum::body::Bytes>, Unread>
where
    W: FnOnce() -> tokio::sync::oneshot::Receiver<Over>,
{
    let collect = http_body_util::Limited::new(body, MAX_BANNER_BODY).collect();
    // Outside a tokio runtime (an executor of the app's own) there is no
    // timer to bound the read and no task to watch it: it is read as it
    // comes. (A tokio runtime built without its timer cannot serve an
    // impersonated page.)
    if tokio::runtime::Handle::try_current().is_err() {
        return collect.await.map_err(Unread::Failed);
    }
    tokio::pin!(collect);
    let quiet = read.quiet.min(MAX_BANNER_READ_TIME);
    if let Ok(done) = tokio::time::timeout(quiet, &mut collect).await {
        return done.map_err(Unread::Failed);
    }
    // (A watch that cannot confirm the session ends the read too: it fails
    // closed, as a stream's does, with 503 where an end gets 401.)
    let end = (read.watch)();
    tokio::select! {
        done = &mut collect => done.map_err(Unread::Failed),
        over = end => Err(match over {
            Ok(Over::Ended) => Unread::SessionOver,
            // (A watch that stopped without an answer confirmed nothing.)
            Ok(Over::Unconfirmed) | Err(_) => Unread::Unconfirmed,
        }),
        () = tokio::time::sleep(MAX_BANNER_READ_TIME.saturating_sub(quiet)) => Err(Unread::TooSlow),
    }
}

/// Fields that digest a body's bytes (RFC 9530's `Content-Digest` and
/// `Repr-Digest`, the older `Digest` and `Content-MD5`): dropped from a
/// page the banner went into, as headers and as trailers.
const DIGEST_TRAILERS: [&str; 4] = ["content-digest", "repr-digest", "digest", "content-md5"];

/// What described the app's bytes and not the page with the banner in it:
/// its length, its digests and its `ETag` (a validator of those bytes,
/// which a cache or a client would match against the app's own copy).
fn forget_the_apps_bytes(headers: &mut HeaderMap) {
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ETAG);
    for digest in DIGEST_TRAILERS {
        headers.remove(digest);
    }
}

/// A page read whole, as a body again: its bytes, then its trailers if it
/// had any; with the banner in (`changed`), not a digest of the bytes the
/// app wrote, which they no longer are.
fn with_trailers(bytes: axum::body::Bytes, mut trailers: Option<HeaderMap>, changed: bool) -> Body {
    if let (true, Some(t)) = (changed, trailers.as_mut()) {
        for digest in DIGEST_TRAILERS {
            t.remove(digest);
        }
    }
    match trailers.filter(|t| !t.is_empty()) {
        None => Body::from(bytes),
        Some(trailers) => Body::new(http_body_util::BodyExt::with_trailers(
            http_body_util::Full::new(bytes),
            std::future::ready(Some(Ok::<_, std::convert::Infallible>(trailers))),
        )),
    }
}

/// The page with the banner in; a 500 when it cannot be read whole
/// (larger than [`MAX_BANNER_BODY`], still coming after
/// [`MAX_BANNER_READ_TIME`], or its body failed), a 401 when its session
/// ended while it was read, a 503 when it could not be confirmed then: a
/// page under impersonation is not served without its banner. Its log
/// lines name the route and the session (`at`), as the request's own do.
async fn with_banner<W>(
    res: Response,
    banner: &str,
    stop: &[String],
    markup: Markup,
    at: (&str, impersonation_core::SessionId),
    read: Reading<W>,
) -> Response
where
    W: FnOnce() -> tokio::sync::oneshot::Receiver<Over>,
{
    let (route, session) = at;
    let (mut parts, body) = res.into_parts();
    match read_page(body, read).await {
        Ok(collected) => {
            // Trailers (a server timing, a checksum) go out after the page.
            let trailers = collected.trailers().cloned();
            let bytes = collected.to_bytes();
            // A UTF-16 or UTF-32 byte-order mark overrides the header's
            // charset (`FF FE` also begins UTF-32LE's).
            if bytes.starts_with(&[0xFE, 0xFF])
                || bytes.starts_with(&[0xFF, 0xFE])
                || bytes.starts_with(&[0x00, 0x00, 0xFE, 0xFF])
            {
                tracing::warn!(
                    route,
                    session = %session,
                    "an impersonated HTML page in UTF-16 or UTF-32 (byte-order mark) is served without the banner"
                );
                return Response::from_parts(parts, with_trailers(bytes, trailers, false));
            }
            let charset_known = has_charset(&parts.headers);
            let placed = match markup {
                // Without a charset in the header, a `<meta>` one is the
                // page's.
                Markup::Html => inject(&bytes, banner, stop, charset_known),
                Markup::Xhtml => match crate::xhtml::declared_encoding(&bytes) {
                    // Without a charset in the header, the XML
                    // declaration's encoding is the page's.
                    Some(e) if !charset_known && !keeps_ascii(&e) => Err(
                        "the XHTML page's declared encoding is not one known to keep ASCII as ASCII",
                    ),
                    _ => crate::xhtml::inject(&bytes, banner)
                        // Nothing may follow an XML page's root
                        // element: the banner appended would break it.
                        .ok_or("the XHTML page has no body element the banner can go into"),
                },
            };
            let page = match placed {
                Ok(page) => page,
                Err(why) => {
                    tracing::warn!(
                        route,
                        session = %session,
                        why,
                        "an impersonated HTML page is served without the banner"
                    );
                    return Response::from_parts(parts, with_trailers(bytes, trailers, false));
                }
            };
            forget_the_apps_bytes(&mut parts.headers);
            // A policy that blocks inline styles would leave the banner
            // unstyled, at the foot of the page: its own styles go through
            // (and its Stop form's post, past a `form-action` that allows
            // not even this site).
            crate::csp::allow_banner(&mut parts.headers, stop);
            Response::from_parts(parts, with_trailers(page.into(), trailers, true))
        }
        Err(Unread::SessionOver) => {
            tracing::warn!(
                route,
                session = %session,
                "the impersonation session ended while its HTML page was read; withholding the page"
            );
            plain(StatusCode::UNAUTHORIZED, "impersonation session ended")
        }
        Err(Unread::Unconfirmed) => {
            tracing::warn!(
                route,
                session = %session,
                "the impersonation session could not be confirmed while its HTML page was read; withholding the page"
            );
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "impersonation session could not be confirmed",
            )
        }
        Err(Unread::TooSlow) => {
            tracing::error!(
                route,
                session = %session,
                limit_secs = MAX_BANNER_READ_TIME.as_secs(),
                "an impersonated HTML page took too long to read for the banner; answering 500"
            );
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "page too slow to show the impersonation banner",
            )
        }
        Err(Unread::Failed(e)) if e.is::<http_body_util::LengthLimitError>() => {
            tracing::error!(
                route,
                session = %session,
                limit = MAX_BANNER_BODY,
                "an impersonated HTML page is too large for the banner; answering 500"
            );
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "page too large to show the impersonation banner",
            )
        }
        Err(Unread::Failed(e)) => {
            tracing::error!(error = %e, route, session = %session, "an impersonated HTML page's body failed; answering 500");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed before the impersonation banner could be shown",
            )
        }
    }
}

/// Audits a request served under impersonation, as [`request_activity`]:
/// `None` when it needs no record here (audited already, by the
/// `NotImpersonating` extractor or by the service for start and stop, or
/// left out by `audit_when`).
///
/// The write runs to its end ([`run_to_end`]) even if the client goes
/// away meanwhile (hyper then drops the request's future): a
/// change already made is never left off the trail, and a batched write
/// this request carries is not cut short for the requests that share it.
async fn audit_request(
    shared: &Shared,
    state: &RequestState,
    ctx: &Context,
    method: &Method,
    route: &str,
    is_change: bool,
    answer: Answer,
) -> Option<Result<(), impersonation_core::Error>> {
    // An app's refusal is recorded as the denial it names (whatever
    // `audit_when` says of its route, as the guard's is), in a session
    // still live: only a 4xx answer counts as one, so that no marker
    // turns a request served into a refusal on the trail. A session that
    // ended while the handler ran refuses the record (guarded, as any
    // request's), and the answer goes as for any request of an ended
    // session: a read withheld.
    if let Some(denial) = answer
        .denied
        .filter(|_| (400..500).contains(&answer.status))
        && !state.audited.load(Ordering::SeqCst)
        && !answer.as_refused
    {
        let api = Arc::clone(&shared.api);
        let ctx = ctx.clone();
        let attempt = format!("{method} {route}");
        return Some(
            run_to_end(async move { api.record_refused(&ctx, denial, &attempt).await }).await,
        );
    }
    if !needs_record(shared, state, method, route, answer.as_refused) {
        return None;
    }
    let activity = request_activity(method, route, is_change, answer.status);
    Some(write_record(shared, ctx, activity).await)
}

/// Writes `activity` on the trail of `ctx`'s session, to its end
/// ([`run_to_end`]).
async fn write_record(
    shared: &Shared,
    ctx: &Context,
    activity: Activity,
) -> Result<(), impersonation_core::Error> {
    let api = Arc::clone(&shared.api);
    let ctx = ctx.clone();
    run_to_end(async move { api.record_completed(&ctx, activity).await.map(drop) }).await
}

/// How a request under impersonation was answered, for its record.
#[derive(Clone)]
struct Answer {
    /// The answer's status.
    status: u16,
    /// The answer is the [`crate::NotImpersonating`] guard's refusal, as
    /// the guard gave it or as the handler dressed it
    /// ([`crate::NotImpersonatingRejection::answer_with`]): the denial
    /// the guard wrote is the request's record.
    as_refused: bool,
    /// The denial the app marked its answer with ([`Denied`]).
    denied: Option<impersonation_core::Denial>,
}

impl Answer {
    /// Whether `res`, the answer the inner service gave, is the guard's
    /// refusal.
    fn refusal_in(state: &RequestState, res: &Response) -> bool {
        state.guard_refused.load(Ordering::SeqCst)
            && res.extensions().get::<RefusalAnswer>().is_some()
    }

    /// No answer came (a panic, a failed service, a client gone): the
    /// handler may have done anything, so the request is recorded.
    fn none(status: u16) -> Self {
        Self {
            status,
            as_refused: false,
            denied: None,
        }
    }
}

/// Marks a response as the app's own refusal of a request: under
/// impersonation the layer records it on the trail as a denied attempt
/// with this denial (the request's one record), not as an access or a
/// change. For the refusals the app makes itself, past the
/// [`crate::NotImpersonating`] guard: a customer's form naming another
/// tenant's campground ([`Denial::TenantBoundary`](impersonation_core::Denial::TenantBoundary)),
/// a permission the shadow user lacks, as the customer would
/// ([`Denial::NotPermitted`](impersonation_core::Denial::NotPermitted)).
///
/// The marker is the app's word that the request changed nothing, and
/// counts only on a `4xx` answer: on any other the request is recorded
/// as it would be without it. Outside impersonation it does nothing.
///
/// ```
/// use axum::http::StatusCode;
/// use axum::response::IntoResponse;
/// use impersonation_axum::Denied;
/// use impersonation_core::Denial;
///
/// async fn add_booking() -> impl IntoResponse {
///     // ... the campground named is not one of the customer's:
///     (StatusCode::FORBIDDEN, Denied(Denial::TenantBoundary), "not your campground")
/// }
/// # let _ = axum::Router::<()>::new().route("/bookings", axum::routing::post(add_booking));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied(pub impersonation_core::Denial);

impl axum::response::IntoResponseParts for Denied {
    type Error = std::convert::Infallible;

    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

/// Marks an answer as the [`crate::NotImpersonating`] guard's refusal
/// (a response extension; only the guard's rejection sets it).
#[derive(Clone, Copy)]
pub(crate) struct RefusalAnswer;

/// Whether a request under impersonation needs a record from the layer:
/// not if the service audited it (start, stop), not if `audit_when`
/// leaves it out, and not if it was answered with the guard's refusal,
/// whose denial is its record. A handler that took the guard as a
/// `Result` and answered anything else of its own (a page, a redirect, an
/// error, a WebSocket's 101) carried on past the refusal, maybe to a
/// change: its request is audited as well.
fn needs_record(
    shared: &Shared,
    state: &RequestState,
    method: &Method,
    route: &str,
    answered_as_refused: bool,
) -> bool {
    !state.audited.load(Ordering::SeqCst)
        && !answered_as_refused
        && (shared.settings.audit)(method, route)
}

/// Runs an audit write to its end even if the request's future is dropped
/// meanwhile (hyper drops it when the client goes away). The write is
/// polled once here: one that finishes at once (the memory store's) is
/// done, and no drop can come between. One that has to wait goes on to a
/// task of its own, which this awaits; a task that fails is the store's
/// failure to record. (Spawning every write cost an in-memory audited
/// request a task, a wake and a second pass through hyper's futures.)
/// Outside a tokio runtime it is awaited in place: a drop then cuts it
/// short, as any future.
pub(crate) async fn run_to_end<T: Send + 'static>(
    write: impl Future<Output = Result<T, impersonation_core::Error>> + Send + 'static,
) -> Result<T, impersonation_core::Error> {
    // On a task of its own the write logs in the caller's span still.
    let mut write = Box::pin(write.in_current_span());
    // A store that panics here answers as one that failed on its task
    // (a 503), as before the first poll moved out of the task.
    let first = std::future::poll_fn(|cx| {
        Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| {
            write.as_mut().poll(cx)
        })))
    })
    .await;
    let failed = |why: String| {
        Err(impersonation_core::Error::Store(
            impersonation_core::StoreError::unavailable_because(why),
        ))
    };
    match first {
        Ok(Poll::Ready(recorded)) => return recorded,
        Ok(Poll::Pending) => {}
        Err(_) => return failed("the audit write panicked".into()),
    }
    // Outside a tokio runtime (a host driving the service on an executor
    // of its own) no task can carry the write past a drop: it is awaited
    // here, and a panic in it is still the store's failure.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return match AssertUnwindSafe(write).catch_unwind().await {
            Ok(recorded) => recorded,
            Err(_) => failed("the audit write panicked".into()),
        };
    };
    match runtime.spawn(write).await {
        Ok(recorded) => recorded,
        Err(e) => failed(format!("the audit write failed: {e}")),
    }
}

/// A request under impersonation whose handler, or whose body while the
/// layer read it, panicked: it served nothing, but may have changed
/// something first, so the attempt goes on the trail (status 500); then
/// the panic goes on to whatever catches it.
async fn audit_panic_and_resume(
    shared: &Shared,
    state: &RequestState,
    ctx: &Context,
    method: &Method,
    route: &str,
    is_change: bool,
    panic: Box<dyn std::any::Any + Send>,
) -> ! {
    if let Some(Err(e)) = audit_request(
        shared,
        state,
        ctx,
        method,
        route,
        is_change,
        Answer::none(500),
    )
    .await
    {
        log_unaudited(
            &e,
            ctx,
            method,
            route,
            is_change,
            500,
            "its handler panicked",
        );
    }
    std::panic::resume_unwind(panic)
}

/// A request served under impersonation that could not be put on the
/// trail (a change has been made by then): the log line is its only
/// record, so it names all the trail would have.
fn log_unaudited(
    e: &impersonation_core::Error,
    ctx: &Context,
    method: &Method,
    route: &str,
    is_change: bool,
    status: u16,
    then: &'static str,
) {
    tracing::error!(
        error = %e,
        change = is_change,
        session = %ctx.session(),
        agent = %ctx.agent().id,
        subject = %ctx.subject(),
        method = %method,
        route,
        status,
        then,
        "could not audit an impersonated request"
    );
}

/// Whether a header is one that a CDN or proxy reads before
/// `Cache-Control` (Fastly's and Akamai's `Surrogate-Control`, Akamai's
/// `Edge-Control` and `Akamai-Cache-Control`, RFC 9213's
/// `CDN-Cache-Control` and every vendor's `…-CDN-Cache-Control`
/// (Cloudflare's, Vercel's, Netlify's), nginx's `X-Accel-Expires` for its
/// `proxy_cache`): an app's, left on a page served under impersonation or
/// one that sets a cookie, could have the edge or the proxy keep it.
fn is_cdn_cache_header(name: &str) -> bool {
    matches!(
        name,
        "surrogate-control" | "edge-control" | "akamai-cache-control" | "x-accel-expires"
    ) || name.ends_with("cdn-cache-control")
}

/// Removes every header [`is_cdn_cache_header`] names (the names are lower
/// case in a `HeaderMap`).
fn remove_cdn_cache_headers(headers: &mut HeaderMap) {
    let found: Vec<header::HeaderName> = headers
        .keys()
        .filter(|k| is_cdn_cache_header(k.as_str()))
        .cloned()
        .collect();
    for name in found {
        headers.remove(name);
    }
}

/// A response the layer sets a cookie on is one browser's: a shared cache
/// that kept it would hand the same CSRF token (or the same removal) to
/// everyone after. Its `Cache-Control` becomes `private`, keeping the
/// app's other directives but `public` and `s-maxage`; one that is
/// `private` or `no-store` already stays as it is, and one this cannot
/// read (not ASCII) becomes `no-store`. The CDN headers that override
/// `Cache-Control` at an edge go either way.
fn keep_out_of_shared_caches(headers: &mut HeaderMap) {
    remove_cdn_cache_headers(headers);
    let mut directives: Vec<String> = Vec::new();
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return;
        };
        directives.extend(cache_directives(text).into_iter().map(str::to_owned));
    }
    let name = |d: &str| {
        d.split('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    };
    if directives
        .iter()
        .any(|d| name(d) == "no-store" || d.eq_ignore_ascii_case("private"))
    {
        return;
    }
    let mut kept = vec!["private".to_owned()];
    kept.extend(
        directives
            .into_iter()
            .filter(|d| !matches!(name(d).as_str(), "public" | "s-maxage" | "private")),
    );
    let value = HeaderValue::from_str(&kept.join(", "))
        .unwrap_or_else(|_| HeaderValue::from_static("no-store"));
    headers.insert(header::CACHE_CONTROL, value);
}

/// The directives of a `Cache-Control` value, trimmed: split at the commas
/// outside quoted strings (`no-cache="Set-Cookie, X"` is one).
fn cache_directives(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect()
}

/// Whether a request asks to switch protocols to something that outlives
/// it (a WebSocket, say): an `Upgrade` header naming anything but `h2c`
/// (which some clients offer on every plain-HTTP request, and which ends
/// in ordinary requests), or a `CONNECT` (over HTTP/2, a WebSocket opens
/// with an extended `CONNECT`, RFC 8441, and no `Upgrade` header).
fn upgrades(method: &Method, headers: &HeaderMap) -> bool {
    if method == Method::CONNECT {
        return true;
    }
    headers.get_all(header::UPGRADE).iter().any(|value| {
        value.to_str().map_or(true, |protocols| {
            protocols
                .split(',')
                .map(str::trim)
                .any(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"))
        })
    })
}

/// The status a request given up by its client is audited with (nginx's
/// "client closed request": no status was ever sent).
const CLIENT_CLOSED: u16 = 499;

/// The least length of a response body of known length that is watched,
/// and cut when its session ends, like a body of no known length: a
/// download may take minutes. Below it (the pages, the JSON answers) a
/// body is sent in moments, and spared a watch.
pub(crate) const WATCHED_FROM: u64 = 64 * 1024;

/// Audits a request under impersonation that is dropped before its own
/// audit: hyper drops the request's future when the client goes away while
/// the handler runs, and the handler may already have read or changed
/// something. The record goes out from a task of its own, with
/// [`CLIENT_CLOSED`] (or 500 for a service that failed without an answer).
/// Nothing is cloned unless that happens.
struct AuditIfGivenUp<'a> {
    shared: &'a Shared,
    state: &'a RequestState,
    ctx: &'a Context,
    method: &'a Method,
    route: &'a str,
    is_change: bool,
    status: u16,
    /// The handler answered with the guard's refusal (set once an answer
    /// exists).
    answered_refusal: bool,
}

impl AuditIfGivenUp<'_> {
    /// The request reached its own audit: nothing to do on drop.
    fn disarm(guard: Option<Self>) {
        if let Some(guard) = guard {
            std::mem::forget(guard);
        }
    }
}

impl Drop for AuditIfGivenUp<'_> {
    fn drop(&mut self) {
        // The guard's refusal is the request's record (its write runs to
        // its end on its own) while it is being written, and once it is
        // the answer; a handler that carried on past it may have done
        // anything, and is recorded.
        let refused = self.state.refusal_in_flight.load(Ordering::SeqCst) || self.answered_refusal;
        if !needs_record(self.shared, self.state, self.method, self.route, refused) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                route = self.route,
                "an impersonated request was given up outside a runtime; it could not be audited"
            );
            return;
        };
        tracing::warn!(
            route = self.route,
            status = self.status,
            "an impersonated request was given up before its answer; auditing it"
        );
        let activity = request_activity(self.method, self.route, self.is_change, self.status);
        let api = Arc::clone(&self.shared.api);
        let ctx = self.ctx.clone();
        let (method, route) = (self.method.clone(), self.route.to_owned());
        let (is_change, status) = (self.is_change, self.status);
        runtime.spawn(async move {
            if let Err(e) = api.record_completed(&ctx, activity).await {
                log_unaudited(
                    &e,
                    &ctx,
                    &method,
                    &route,
                    is_change,
                    status,
                    "the client had gone away",
                );
            }
        });
    }
}

/// What a request served under impersonation did: a modification (a
/// change) or an access, with its method, route template and status.
fn request_activity(method: &Method, route: &str, is_change: bool, status: u16) -> Activity {
    let description = format!("{method} {route} ({status})");
    let activity = if is_change {
        Activity::modification(description)
    } else {
        Activity::access(description)
    };
    activity
        .detail("method", method)
        .detail("route", route)
        .detail("status", status)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn kept(cache_control: &[&str]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for value in cache_control {
            headers.append(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
        }
        headers.insert("surrogate-control", HeaderValue::from_static("max-age=60"));
        keep_out_of_shared_caches(&mut headers);
        assert!(headers.get("surrogate-control").is_none());
        let values: Vec<&str> = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        (!values.is_empty()).then(|| values.join(" | "))
    }

    #[test]
    fn a_response_with_a_cookie_of_the_layers_is_private() {
        assert_eq!(kept(&[]).as_deref(), Some("private"));
        assert_eq!(
            kept(&["Public, max-age=60", "S-MaxAge=120, must-revalidate"]).as_deref(),
            Some("private, max-age=60, must-revalidate")
        );
        // A field-named `private` keeps the rest shareable: made whole.
        assert_eq!(
            kept(&["private=\"x-user\", max-age=5"]).as_deref(),
            Some("private, max-age=5")
        );
        // Already out of shared caches: as the app set it.
        assert_eq!(kept(&["no-store"]).as_deref(), Some("no-store"));
        assert_eq!(
            kept(&["PRIVATE, max-age=5"]).as_deref(),
            Some("PRIVATE, max-age=5")
        );
        // Commas inside a quoted value split nothing, and a directive
        // named inside one is no directive.
        assert_eq!(
            kept(&["public, no-cache=\"Set-Cookie, private\", private=\"a, b\""]).as_deref(),
            Some("private, no-cache=\"Set-Cookie, private\"")
        );
        // A value it cannot read (not ASCII) is not kept: no-store.
        let mut headers = HeaderMap::new();
        headers.append(header::CACHE_CONTROL, HeaderValue::from_static("public"));
        headers.append(
            header::CACHE_CONTROL,
            HeaderValue::from_bytes(b"no-store, x=\"\xe9\"").unwrap(),
        );
        keep_out_of_shared_caches(&mut headers);
        let values: Vec<_> = headers.get_all(header::CACHE_CONTROL).iter().collect();
        assert_eq!(values, [HeaderValue::from_static("no-store")]);
    }

    #[test]
    fn every_vendors_cdn_cache_header_goes() {
        let mut headers = HeaderMap::new();
        for name in [
            "cdn-cache-control",
            "cloudflare-cdn-cache-control",
            "vercel-cdn-cache-control",
            "netlify-cdn-cache-control",
            "akamai-cache-control",
            "surrogate-control",
            "edge-control",
            "x-accel-expires",
        ] {
            headers.insert(
                header::HeaderName::from_static(name),
                HeaderValue::from_static("max-age=60"),
            );
        }
        headers.insert(header::ETAG, HeaderValue::from_static("\"x\""));
        remove_cdn_cache_headers(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [header::ETAG]);
    }
}
