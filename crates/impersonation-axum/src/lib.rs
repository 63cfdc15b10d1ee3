//! # impersonation-axum
//!
//! The Axum binding of the impersonation SDK: a tower [`Layer`](tower::Layer)
//! that resolves the session on every request, extractors, the start/stop
//! routes and the banner.
//!
//! The host app keeps its own authentication: its auth middleware puts the
//! signed-in [`Principal`](impersonation_core::Principal) into the request's
//! extensions (`req.extensions_mut().insert(principal)`) before this layer
//! runs. Then:
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use impersonation_axum::{ImpersonationLayer, EffectiveUser, NotImpersonating};
//! use impersonation_core::{Impersonation, MemoryDirectory, MemoryStore};
//!
//! async fn dashboard(user: EffectiveUser) -> String { format!("Hello {}", user.display_name()) }
//! async fn billing(_: NotImpersonating) -> &'static str { "card on file" }
//!
//! let service = Impersonation::new(MemoryStore::new(), MemoryDirectory::new());
//! let app: Router = Router::new()
//!     .route("/", get(dashboard))
//!     .route("/billing", get(billing))
//!     .nest("/impersonation", impersonation_axum::routes())
//!     .layer(ImpersonationLayer::new(service));
//!     // .layer(your_auth_layer) — outermost, so the Principal is there first
//! ```
//!
//! Under impersonation every response is `Cache-Control: no-store`, every
//! request is audited once (access for safe methods, modification for the
//! others, with method, route template and status; a denied attempt for
//! an answer the app marks [`Denied`]), and `text/html`
//! responses get the banner before `</body>`. HTML bodies are buffered to
//! inject it (up to [`MAX_BANNER_BODY`], read for at most
//! [`MAX_BANNER_READ_TIME`], and cut short with a 401 if the session ends
//! meanwhile); a streamed HTML page is therefore sent whole. Cookies are `__Host-` prefixed, `Secure` and
//! `SameSite=Strict`, and the session cookie is `HttpOnly` (the CSRF cookie,
//! a double-submit token, is not); [`ImpersonationLayer::development_mode`]
//! drops the prefix and `Secure` for plain `http://localhost`.
//!
//! Signed impersonation tokens (RFC 8693, `impersonation-oidc`) are accepted
//! as bearer credentials with [`ImpersonationLayer::accept_tokens`].
//!
//! The host app's own forms get the cross-site check of start and stop with
//! the [`CsrfCheck`] extractor. Which requests count as changes (refused in
//! a read-only session, audited as modifications) is every method but the
//! safe ones, or what [`ImpersonationLayer::changes_when`] says: mark a
//! sign-out or a search `POST` so that a read-only session may use it.
//!
//! ## Feature flags
//!
//! - `oidc`: `oidc::routes`, the routes of an `impersonation-oidc` issuer.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod banner;
mod csp;
mod csrf;
mod extract;
mod layer;
mod media_type;
#[cfg(feature = "oidc")]
pub mod oidc;
mod routes;
mod watch;
mod xhtml;

use std::sync::Arc;

use axum::http::Method;

pub use banner::{BannerRendered, banner_html};
pub use csp::banner_style_sources;
pub use csrf::{CsrfCheck, InvalidOrigin, RenewCsrfToken, SiteOrigin};
pub use extract::{
    EffectiveUser, Impersonating, MaybeImpersonating, NotImpersonating, NotImpersonatingRejection,
    RealUser,
};
pub use impersonation_core::ImpersonationApi;
pub use layer::{
    CsrfToken, Denied, ImpersonationLayer, ImpersonationService, MAX_BANNER_BODY,
    MAX_BANNER_READ_TIME,
};
pub use routes::{MAX_FORM, StartForm, StopForm, routes};
pub use watch::SessionEnd;

use impersonation_core::TokenResolver;
use layer::{Settings, Shared};

/// How often, by default, a streamed response under impersonation (and a
/// [`SessionEnd`]) checks its session on the store:
/// [`ImpersonationLayer::check_streams_every`].
pub const DEFAULT_STREAM_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

impl ImpersonationLayer {
    /// A layer over a service, with the routes mounted at `/impersonation`,
    /// secure cookies, and every impersonated request audited.
    pub fn new(service: impl ImpersonationApi) -> Self {
        Self {
            shared: Arc::new(Shared {
                api: Arc::new(service),
                settings: Settings {
                    mount: "/impersonation".into(),
                    secure_cookies: true,
                    audit: Arc::new(|_, _| true),
                    changes: None,
                    tokens: None,
                    stream_check: DEFAULT_STREAM_CHECK,
                    origins: Vec::new(),
                },
            }),
        }
    }

    fn with(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.shared.settings.clone();
        change(&mut settings);
        Self {
            shared: Arc::new(Shared {
                api: Arc::clone(&self.shared.api),
                settings,
            }),
        }
    }

    /// Where [`routes`] are nested (the banner's Stop button posts there).
    #[must_use]
    pub fn mount_path(self, path: &str) -> Self {
        let path = path.trim_end_matches('/').to_owned();
        self.with(|s| s.mount = path)
    }

    /// Cookies without the `__Host-` prefix and `Secure`, for plain
    /// `http://localhost` during development. Never in production.
    #[must_use]
    pub fn development_mode(self) -> Self {
        self.with(|s| s.secure_cookies = false)
    }

    /// An origin this site is served on; call once for each. Once any is
    /// given, a request's `Origin` must be one of them to pass the
    /// cross-site check (start, stop, [`CsrfCheck`], a WebSocket's
    /// handshake under a cookie session), whatever its `Host` says.
    ///
    /// Without any, `Origin` must name the request's own host (`Host`, or
    /// over HTTP/2 the URI's authority) with `https` (or `http` too in
    /// [development mode](Self::development_mode)). Give the origins when a
    /// proxy in front rewrites `Host` (the app would see `app:8080` where
    /// the browser asked for `app.example.com`, and refuse every form),
    /// and to hold `Origin` to a fixed list: a page served under another
    /// name that resolves to the app (DNS rebinding) then cannot post to
    /// it, even through a form that needs no secret (a password-free
    /// sign-in, trust by network). Such a page holds none of this site's
    /// cookies, so it could never post as the app's signed-in users; and
    /// reads (`GET`) it can still make: only a `Host` allowlist in front of
    /// the app stops rebinding as a whole. The origins are compared with
    /// `Origin` as browsers write it (see [`SiteOrigin`]). A browser sends
    /// `Origin: null` for a form on a page with `Referrer-Policy:
    /// no-referrer`, which is refused with or without origins given.
    ///
    /// ```
    /// use impersonation_axum::ImpersonationLayer;
    /// use impersonation_core::{Impersonation, MemoryDirectory, MemoryStore};
    ///
    /// let service = Impersonation::new(MemoryStore::new(), MemoryDirectory::new());
    /// let layer = ImpersonationLayer::new(service)
    ///     .site_origin("https://app.example.com".parse()?)
    ///     .site_origin("https://eu.app.example.com".parse()?);
    /// # Ok::<(), impersonation_axum::InvalidOrigin>(())
    /// ```
    #[must_use]
    pub fn site_origin(self, origin: SiteOrigin) -> Self {
        self.with(|s| {
            if !s.origins.contains(&origin) {
                s.origins.push(origin);
            }
        })
    }

    /// Also accept signed impersonation tokens (`Authorization: Bearer`),
    /// such as those of `impersonation-oidc`'s issuer: a bearer value that
    /// is not a session secret goes to `tokens`; one it does not recognise
    /// (the agent's own access token, say) leaves the request
    /// unimpersonated, one it refuses gets 401.
    #[must_use]
    pub fn accept_tokens(self, tokens: impl TokenResolver) -> Self {
        let tokens: Arc<dyn TokenResolver> = Arc::new(tokens);
        self.with(|s| s.tokens = Some(tokens))
    }

    /// Which impersonated requests are audited, by method and route template
    /// (default: all). Refusals by [`NotImpersonating`], and answers the app
    /// marks [`Denied`], are always audited.
    #[must_use]
    pub fn audit_when(
        self,
        filter: impl Fn(&Method, &str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.with(|s| s.audit = Arc::new(filter))
    }

    /// How often what outlives its request under impersonation checks that
    /// the session is still live (default [`DEFAULT_STREAM_CHECK`], 5 s): a
    /// response body streamed without a known length (server-sent events,
    /// a long export) or with one of 64 KiB or more (a download; not a
    /// page the layer put the banner in, which is sent as one piece),
    /// which the layer cuts when the session has ended,
    /// and a [`SessionEnd`] (for a WebSocket, whose messages the layer
    /// never sees). Each check of each open stream is a store read (and,
    /// when a policy re-check falls due, the directory's reads and a
    /// write, as for a request), and none touches the session's idle
    /// time: an open stream does not keep a session alive. Expiry and the
    /// idle deadline end a stream on time whatever this is; a stop or
    /// revocation, within this long.
    ///
    /// A check that fails, or takes longer than this (but at least one
    /// and at most five seconds), ends the stream too: it fails closed,
    /// as a request does. The
    /// watch sleeps on tokio's timer, which `#[tokio::main]` enables (a
    /// runtime built by hand needs `enable_time`). Below 100 ms, 100 ms.
    #[must_use]
    pub fn check_streams_every(self, every: std::time::Duration) -> Self {
        let every = every.max(std::time::Duration::from_millis(100));
        self.with(|s| s.stream_check = every)
    }

    /// Which impersonated requests change something, by method and route
    /// template (default: every method but `GET`, `HEAD`, `OPTIONS` and
    /// `TRACE`). Whatever the filter says, a request with an `Upgrade`
    /// header naming anything but `h2c`, or a `CONNECT` (HTTP/2's
    /// WebSocket), is a change: a WebSocket's
    /// handshake is a `GET`, and the layer sees none of its messages (to
    /// close the socket when the session ends, its handler must select on
    /// [`SessionEnd`]); a browser's, under a cookie session, is refused
    /// (403, on the trail) when its `Origin` or `Sec-Fetch-Site` names
    /// another origin, since no form carries a CSRF token there. A change is
    /// refused in a read-only session, always reads
    /// the session from the store rather than a moment-old copy, and is
    /// audited as a modification; any other request is audited as an
    /// access. The SDK's start and stop are let into read-only sessions
    /// whatever this says.
    ///
    /// Use it for a `POST` that changes nothing of the customer's, so that
    /// read-only sessions can use it: the host's sign-out, a search form, a
    /// GraphQL endpoint that only queries. A route marked so that does
    /// change something is let through read-only sessions. A read whose
    /// session is over by the time it is audited is withheld (401); so a
    /// sign-out that ends the session should also be left out of the
    /// per-request audit with [`Self::audit_when`]: the service audits the
    /// end, as for the SDK's stop. (Left out, a sign-out the host refuses,
    /// for a bad CSRF token say, leaves no event either: it changed
    /// nothing.)
    ///
    /// ```
    /// # use impersonation_axum::ImpersonationLayer;
    /// # use impersonation_core::{Impersonation, MemoryDirectory, MemoryStore};
    /// # let service = Impersonation::new(MemoryStore::new(), MemoryDirectory::new());
    /// let layer = ImpersonationLayer::new(service)
    ///     .changes_when(|method, route| !method.is_safe() && route != "/signout")
    ///     .audit_when(|_, route| route != "/signout");
    /// ```
    #[must_use]
    pub fn changes_when(
        self,
        changes: impl Fn(&Method, &str) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.with(|s| s.changes = Some(Arc::new(changes)))
    }
}
