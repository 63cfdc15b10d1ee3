//! # campground-demo
//!
//! A small campground-management SaaS with the impersonation SDK wired in,
//! behind `cargo xtask demo`. The app keeps its own (demo) sign-in: a picker
//! that sets a cookie naming a seeded person; its auth middleware puts that
//! [`Principal`] into the request, and [`ImpersonationLayer`] does the rest.
//!
//! It also offers an API for impersonation by token (RFC 8693, see [`api`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use campground_demo::{Demo, StoreKind};
//! let demo = Demo::open(StoreKind::Memory, "memory").await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let base = format!("http://{}", listener.local_addr()?);
//! axum::serve(listener, demo.router(&base)?).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod pages;
pub mod seed;
pub mod stores;
pub mod walkthrough;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use anyhow::Result;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use impersonation_axum::{ImpersonationLayer, SiteOrigin};
use impersonation_core::{Impersonation, MemoryDirectory, Principal, Store, UserId};
use time::OffsetDateTime;

pub use seed::Booking;
pub use stores::StoreKind;

/// The SDK service as the demo holds it.
pub type Service = Impersonation<Arc<dyn Store>, MemoryDirectory>;

/// The demo's sign-in cookie (a demo: it just names a seeded person).
pub const SIGN_IN_COOKIE: &str = "campground_user";

/// The sign-out route: no change for a read-only session, and audited by
/// the service as the session's end rather than by the layer.
pub(crate) const SIGN_OUT: &str = "/signout";
const VERIFY: &str = "/audit/verify";

/// The app's own data, kept in memory (the SDK's sessions and audit trail
/// live in the chosen store).
#[derive(Debug, Default)]
pub struct AppData {
    /// Bookings per tenant.
    pub bookings: BTreeMap<String, Vec<Booking>>,
    /// Settings per user: (timezone, language).
    pub settings: BTreeMap<UserId, (String, String)>,
    /// When each user last changed their password.
    pub password_changed: BTreeMap<UserId, OffsetDateTime>,
}

/// The running demo: the SDK service, the directory and the app's data.
pub struct Demo {
    service: Arc<Service>,
    data: Mutex<AppData>,
    store: StoreKind,
    api: OnceLock<api::ApiState>,
}

impl Demo {
    /// Opens the store (PostgreSQL schema / Redis namespace
    /// `campground_demo`) and seeds the world.
    pub async fn open(store: StoreKind, url: &str) -> Result<Arc<Self>> {
        Self::open_in(store, url, "campground_demo").await
    }

    /// As [`Demo::open`], in a namespace of its own (tests use one each).
    pub async fn open_in(store: StoreKind, url: &str, namespace: &str) -> Result<Arc<Self>> {
        let directory = seed::directory()?;
        let backing = store.connect(url, namespace).await?;
        let service = Impersonation::new(backing, directory.clone())
            .with_policy(seed::policy())
            .with_projection(seed::projection());
        Ok(Self::with_service(service, store))
    }

    /// Wraps a service built elsewhere (tests give it a manual clock).
    pub fn with_service(service: Service, store: StoreKind) -> Arc<Self> {
        let mut data = AppData::default();
        for c in seed::CAMPGROUNDS {
            data.bookings
                .insert(c.tenant.into(), seed::bookings(c.tenant));
        }
        for p in service.directory().all() {
            let text = |name: &str| {
                p.attributes
                    .get(name)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_owned()
            };
            data.settings
                .insert(p.id.clone(), (text("timezone"), text("language")));
        }
        Arc::new(Self {
            service: Arc::new(service),
            data: Mutex::new(data),
            store,
            api: OnceLock::new(),
        })
    }

    /// The SDK service.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// The store kind in use.
    pub fn store_kind(&self) -> StoreKind {
        self.store
    }

    /// The app's data (a poisoned lock still yields the data: every write is
    /// a single insert, so it is never half-done).
    pub fn data(&self) -> MutexGuard<'_, AppData> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The API side (token exchange), once [`Demo::router`] has built it.
    pub fn api(&self) -> Option<&api::ApiState> {
        self.api.get()
    }

    /// The app at `base` (its public URL, which the token issuer names in
    /// its tokens): pages, the SDK's routes under `/impersonation`, the API
    /// side under `/idp`, `/oidc` and `/api`, the layer (which also accepts
    /// impersonation tokens), and the demo sign-in outermost.
    pub fn router(self: &Arc<Self>, base: &str) -> Result<Router> {
        let base = base.trim_end_matches('/');
        if self.api.get().is_none() {
            let _ = self.api.set(api::ApiState::new(self, base)?);
        }
        let api = self
            .api
            .get()
            .ok_or_else(|| anyhow::anyhow!("the API side did not start"))?;
        let layer = ImpersonationLayer::new(Arc::clone(&self.service))
            .mount_path("/impersonation")
            // The dashboard's live line ends within 2 s of a stop.
            .check_streams_every(std::time::Duration::from_secs(2))
            .accept_tokens(api.issuer().verifier(api.audience.clone()))
            // Signing out changes nothing of the customer's: a read-only
            // session may do it. It ends the session, which the service
            // audits (as for the SDK's stop), so the layer does not audit
            // it again: it could not, the session being over.
            // Verifying the chains reads them: an access, not a change.
            .changes_when(|method, route| !method.is_safe() && route != SIGN_OUT && route != VERIFY)
            .audit_when(|_, route| route != SIGN_OUT)
            // Plain http://127.0.0.1: no `__Host-` prefix, no `Secure`.
            .development_mode();
        // Forms post from the address the demo prints (or its `localhost`
        // twin) and no other, whatever `Host` a request carries: a page
        // served under another name that resolves to 127.0.0.1 (DNS
        // rebinding) cannot use the demo's password-free sign-in to post
        // as a seeded person.
        let mut layer = layer.site_origin(SiteOrigin::of_url(base)?);
        let mut hosts: Vec<String> = vec![authority(base).to_ascii_lowercase()];
        if base.contains("//127.0.0.1:") {
            let twin = base.replacen("//127.0.0.1:", "//localhost:", 1);
            layer = layer.site_origin(SiteOrigin::of_url(&twin)?);
            hosts.push(authority(&twin).to_ascii_lowercase());
        }
        // On http's own port, browsers send the host alone.
        let bare: Vec<String> = hosts
            .iter()
            .filter_map(|h| h.strip_suffix(":80").map(str::to_owned))
            .collect();
        hosts.extend(bare);
        Ok(Router::new()
            .route("/", get(pages::home))
            .route("/signin", post(pages::sign_in))
            .route(SIGN_OUT, post(pages::sign_out))
            .route("/dashboard", get(pages::dashboard))
            .route("/dashboard/live", get(pages::live))
            .route("/bookings", post(pages::add_booking))
            .route("/settings", get(pages::settings).post(pages::save_settings))
            .route("/billing", get(pages::billing))
            .route("/profile", get(pages::profile))
            .route("/profile/password", post(pages::change_password))
            .route("/support", get(pages::support))
            .route("/support/revoke", post(pages::revoke))
            .route("/audit", get(pages::audit))
            .route(VERIFY, post(pages::verify))
            .route("/audit.txt", get(pages::audit_text))
            .route("/idp/token", post(api::idp_token))
            .route("/idp/jwks.json", get(api::idp_jwks))
            .route("/api/bookings", get(api::bookings))
            .nest("/impersonation", impersonation_axum::routes())
            .nest(
                "/oidc",
                impersonation_axum::oidc::routes(api.issuer().clone()),
            )
            .with_state(Arc::clone(self))
            // Inside the SDK's layer, so that the banner it injects finds
            // the policy (and lets its own styles through it).
            .layer(axum::middleware::map_response(with_policy))
            .layer(layer)
            .layer(from_fn_with_state(Arc::clone(self), sign_in))
            // Reads too answer only at the demo's own address: a page
            // under another name that resolves to 127.0.0.1 (DNS
            // rebinding) can set the sign-in cookie itself, and would
            // read a customer's pages otherwise.
            .layer(from_fn_with_state(Arc::new(hosts), only_at_home)))
    }
}

/// The `host[:port]` of a URL (`http://127.0.0.1:3000/` → `127.0.0.1:3000`).
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// Answers 421 to a request for any host but the demo's (`Host`, or the
/// URI's authority for HTTP/2), before anything reads it.
async fn only_at_home(State(hosts): State<Arc<Vec<String>>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(str::to_ascii_lowercase);
    match host {
        Some(host) if hosts.contains(&host) => next.run(req).await,
        _ => (
            axum::http::StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this demo answers only at http://{}/",
                hosts.first().map_or("", String::as_str)
            ),
        )
            .into_response(),
    }
}

/// The host app's own authentication, in one line of substance: find the
/// signed-in person and put their `Principal` into the request.
async fn sign_in(State(demo): State<Arc<Demo>>, mut req: Request, next: Next) -> Response {
    let user = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{SIGN_IN_COOKIE}="))
                .map(str::to_owned)
        });
    let mut user = user.and_then(|id| UserId::new(id).ok());
    // API clients: the (stand-in) identity provider's access token signs
    // its person in, on the API alone (its audience): elsewhere it would be
    // a sign-in that outlives signing out. An impersonation token is the
    // layer's business.
    let on_api = req.uri().path().starts_with("/api/");
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    if let (None, true, Some(token), Some(api)) = (&user, on_api, bearer, demo.api())
        && let Ok(id) = api.provider().user_of(token, demo.service.now()).await
    {
        user = Some(id);
    }
    if let Some(principal) = user.and_then(|id| demo.service.directory().get(&id)) {
        req.extensions_mut().insert::<Principal>(principal);
    }
    next.run(req).await
}

/// Serves every page under the demo's Content-Security-Policy.
async fn with_policy(mut res: Response) -> Response {
    let is_page = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if is_page && !res.headers().contains_key(header::CONTENT_SECURITY_POLICY) {
        res.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            axum::http::HeaderValue::from_static(pages::content_security_policy()),
        );
    }
    res
}
