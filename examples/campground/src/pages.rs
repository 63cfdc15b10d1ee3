//! The demo's pages. Plain server-rendered HTML; the SDK's layer adds the
//! banner to every page served under impersonation.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use futures_util::StreamExt as _;
use impersonation_axum::{
    CsrfCheck, EffectiveUser, NotImpersonating, NotImpersonatingRejection, RenewCsrfToken,
};
use impersonation_core::{
    AuditCursor, AuditEvent, AuditQuery, Context, Denial, LiveFilter, Order, Principal,
    RelationKind, Session, SessionId, ShadowValue, TABLE_HEAD, TenantId, UserId, display_text,
    table_rows, table_timestamp,
};
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::seed::{self, Booking, CAMPGROUNDS};
use crate::{Demo, SIGN_IN_COOKIE};

type AppState = State<Arc<Demo>>;

/// A form, as axum's `Form`, whose rejection is an HTML page rather than
/// axum's text: 400 for a field missing or a body that does not parse,
/// 413 for one too large, 415 for one that is not a form.
pub struct AppForm<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for AppForm<T> {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match Form::<T>::from_request(req, state).await {
            Ok(Form(value)) => Ok(Self(value)),
            // Too large and not a form keep their own status.
            Err(rejection) => Err(bad_request(
                match rejection.status() {
                    s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
                    _ => StatusCode::BAD_REQUEST,
                },
                &rejection.body_text(),
            )),
        }
    }
}

/// A query string, as axum's `Query`, whose rejection (a field repeated,
/// a value of the wrong kind) is a 400 HTML page rather than axum's text.
pub struct AppQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for AppQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(bad_request(StatusCode::BAD_REQUEST, &rejection.body_text())),
        }
    }
}

/// A short HTML page for a request the app cannot read (under
/// impersonation the layer adds the banner to it, as to any page).
fn bad_request(status: StatusCode, why: &str) -> Response {
    (
        status,
        axum::response::Html(format!(
            "<!doctype html><html><head><title>Bad request</title></head><body>\
             <h1>Bad request</h1><p>{}</p><p><a href=\"/\">Back</a></p></body></html>",
            esc(why)
        )),
    )
        .into_response()
}

/// What a page says of an SDK error: a refusal's own words and its code;
/// for a failure of the store or the directory (5xx) only the code, as
/// the SDK's routes answer, with the whole text (a driver's message) in
/// the log.
fn shown_error(e: &impersonation_core::Error) -> String {
    if e.http_status() >= 500 {
        tracing::warn!(error = %e, "a page's call to the SDK failed");
        format!(
            "the service is unavailable, try again shortly ({})",
            e.code()
        )
    } else {
        format!("{e} ({})", e.code())
    }
}

/// A page refusing what an SDK call refused or failed: its status, and
/// `what` followed by [`shown_error`].
fn refused_for(
    v: &Viewer,
    demo: &Demo,
    title: &str,
    what: &str,
    e: &impersonation_core::Error,
) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    refused(
        v,
        demo,
        status,
        title,
        &format!("{what}: {}.", shown_error(e)),
    )
}

fn esc(text: &str) -> String {
    html_escape::encode_text(text).into_owned()
}

fn attr(text: &str) -> String {
    html_escape::encode_double_quoted_attribute(text).into_owned()
}

/// Who is looking: the signed-in person, the impersonation (if any) and the
/// request's CSRF token.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The signed-in person (the agent, while impersonating).
    pub real: Option<Principal>,
    /// The impersonation, when the request is made under one.
    pub ctx: Option<Context>,
    /// Who the request acts as: the shadow user while impersonating, the
    /// signed-in person otherwise (the SDK's extractor).
    pub effective: Option<EffectiveUser>,
    /// The cross-site check of the SDK, whose token every form carries
    /// (none without the impersonation layer in front).
    pub csrf: Option<CsrfCheck>,
}

impl<S: Send + Sync> FromRequestParts<S> for Viewer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Infallible> {
        Ok(Self {
            real: parts.extensions.get::<Principal>().cloned(),
            ctx: parts.extensions.get::<Context>().cloned(),
            effective: EffectiveUser::from_request_parts(parts, state).await.ok(),
            csrf: CsrfCheck::from_request_parts(parts, state).await.ok(),
        })
    }
}

impl Viewer {
    /// Whether the effective user (the shadow user while impersonating)
    /// holds a permission.
    pub(crate) fn can(&self, permission: &str) -> bool {
        self.effective
            .as_ref()
            .is_some_and(|user| user.has_permission(permission))
    }

    pub(crate) fn effective_id(&self) -> Option<&UserId> {
        self.effective.as_ref().map(EffectiveUser::id)
    }

    pub(crate) fn effective_name(&self) -> &str {
        self.effective
            .as_ref()
            .map_or("", EffectiveUser::display_name)
    }

    /// Campgrounds the effective user works with: their own and those their
    /// company or partner relationships cover.
    pub(crate) fn campgrounds(&self) -> Vec<&'static seed::Campground> {
        let Some(user) = &self.effective else {
            return Vec::new();
        };
        CAMPGROUNDS
            .iter()
            .filter(|c| {
                let Ok(tenant) = TenantId::new(c.tenant) else {
                    return false;
                };
                user.tenant() == &tenant
                    || user.relationships().iter().any(|r| {
                        matches!(r.kind, RelationKind::Company | RelationKind::Partner)
                            && r.scope.covers(&tenant)
                    })
            })
            .collect()
    }

    /// An attribute as the effective user sees it: the real value when not
    /// impersonating, the projection (copied, masked, redacted or absent)
    /// when impersonating.
    fn attribute(&self, demo: &Demo, name: &str) -> String {
        match (&self.ctx, &self.real) {
            (Some(ctx), _) => match ctx.shadow().attribute(name) {
                Some(ShadowValue::Copied(v)) => {
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                }
                Some(ShadowValue::Masked(m)) => format!("{m} (masked)"),
                Some(ShadowValue::Redacted) => "[redacted]".into(),
                // Absent from the shadow user: dropped by the rules, or
                // one the customer does not have (a rule that keeps it
                // in some form would have kept it).
                None if demo.service().projection().rule_for(name)
                    == impersonation_core::AttributeRule::Drop =>
                {
                    "(not shared with support)".into()
                }
                None => "-".into(),
            },
            (None, Some(real)) => real
                .attributes
                .get(name)
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                .unwrap_or_else(|| "-".into()),
            (None, None) => String::new(),
        }
    }

    fn is_agent(&self, demo: &Demo) -> bool {
        self.real.as_ref().is_some_and(|r| {
            r.has_permission(demo.service().policy().impersonate_permission_name())
                || demo.service().policy().is_admin(r)
        })
    }

    fn is_admin(&self, demo: &Demo) -> bool {
        self.real
            .as_ref()
            .is_some_and(|r| demo.service().policy().is_admin(r))
    }

    /// The SDK's cross-site check: the form's token, the cookie, and the
    /// browser's `Origin` and `Sec-Fetch-Site`.
    pub(crate) fn csrf_ok(&self, sent: &str) -> bool {
        self.csrf.as_ref().is_some_and(|check| check.verify(sent))
    }

    /// The token for a form's hidden `csrf` field.
    pub(crate) fn csrf(&self) -> &str {
        self.csrf
            .as_ref()
            .map_or("", |check| check.token().as_str())
    }
}

/// The dashboard's live line, as its `<script>` holds it: listening to the
/// bookings' events, and under impersonation closing for good on an error.
/// Under impersonation (where a start that succeeded lands) it also drops
/// what the console kept of the start form ([`CONSOLE_SCRIPT`]): the
/// reason stays on the trail, not in the tab.
fn live_script(impersonating: bool) -> String {
    let (forget, on_error) = if impersonating {
        (
            "sessionStorage.removeItem('impersonation-start');",
            "s.onerror=()=>{s.close();live.textContent='(ended: reload the page)'};",
        )
    } else {
        ("", "")
    };
    format!(
        "(()=>{{{forget}const live=document.getElementById('live'),\
         s=new EventSource('/dashboard/live');\
         s.addEventListener('bookings',e=>{{live.textContent=e.data}});{on_error}}})()"
    )
}

/// The support console's script: a start the SDK refuses sends the browser
/// back to the console (`error_to`), which would lose what the agent typed.
/// The form's reason, ticket and read-only box are kept in the tab's
/// `sessionStorage` on submit, and taken out on the next console page:
/// put back into that customer's form if the page comes with a refusal,
/// dropped otherwise. (A start that succeeds lands on the dashboard,
/// whose script drops them; a value that does not parse is dropped.)
const CONSOLE_SCRIPT: &str = "(()=>{const k='impersonation-start',\
stored=sessionStorage.getItem(k);sessionStorage.removeItem(k);let saved=null;\
try{saved=JSON.parse(stored)}catch(e){}\
for(const f of document.querySelectorAll('form[id^=\"start-\"]')){\
f.addEventListener('submit',()=>sessionStorage.setItem(k,JSON.stringify(\
{form:f.id,reason:f.reason.value,ticket:f.ticket.value,readOnly:f.read_only.checked})))}\
const f=saved&&new URLSearchParams(location.search).has('denied')&&document.getElementById(saved.form);\
if(f){f.reason.value=saved.reason;f.ticket.value=saved.ticket;f.read_only.checked=saved.readOnly;f.reason.focus()}})()";

/// The policy every page is served under: nothing inline but the pages'
/// own stylesheet, the live line's two scripts and the console's, by their
/// hashes. (The SDK lets its banner's styles through it when it injects
/// the banner.)
pub(crate) fn content_security_policy() -> &'static str {
    static POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use base64::Engine;
        use sha2::Digest;
        let hash = |text: &str| {
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text))
            )
        };
        format!(
            "default-src 'self'; script-src {} {} {}; style-src {}; object-src 'none'; \
             base-uri 'none'; form-action 'self'; frame-ancestors 'self'",
            hash(&live_script(false)),
            hash(&live_script(true)),
            hash(CONSOLE_SCRIPT),
            hash(STYLE)
        )
    });
    &POLICY
}

const STYLE: &str = "\
body{margin:0;font:15px/1.5 system-ui,sans-serif;color:#1f2937;background:#f6f7f4}\
body.impersonating{padding-top:4.4em}\
header{display:flex;gap:1.2em;align-items:center;padding:.7em 1.5em;background:#14532d;color:#fff}\
header a{color:#dcfce7;text-decoration:none}header a:hover{text-decoration:underline}\
header .brand{font-weight:700;color:#fff;margin-right:1em}header .who{margin-left:auto;font-size:.9em}\
header form{display:inline;margin:0}header button{font:inherit;font-size:.85em}\
main{max-width:68em;margin:1.5em auto;padding:0 1.5em}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{border:1px solid #d6d3d1;padding:.35em .6em;text-align:left;vertical-align:top}\
th{background:#ecfccb}.card{background:#fff;border:1px solid #d6d3d1;border-radius:6px;padding:1em 1.2em;margin:1em 0}\
.note{color:#57534e;font-size:.9em}.refused{border-color:#b91c1c;background:#fef2f2}.ok{border-color:#15803d;background:#f0fdf4}\
label{display:block;margin:.4em 0}input[type=text],textarea{font:inherit;width:100%;max-width:32em}\
button{font:inherit;padding:.25em .9em;cursor:pointer}.people{display:grid;grid-template-columns:repeat(auto-fill,minmax(18em,1fr));gap:.8em}\
code{background:#f5f5f4;padding:0 .2em}";

fn layout(v: &Viewer, demo: &Demo, title: &str, body: &str) -> String {
    let mut nav = String::new();
    if let Some(real) = &v.real {
        nav.push_str("<a href=\"/dashboard\">Dashboard</a><a href=\"/settings\">Settings</a><a href=\"/billing\">Billing</a><a href=\"/profile\">Profile</a>");
        // Both are refused while impersonating (the banner's Stop comes first).
        if v.is_agent(demo) && v.ctx.is_none() {
            nav.push_str(
                "<a href=\"/support\">Support console</a><a href=\"/audit\">Audit trail</a>",
            );
        }
        let acting = match &v.ctx {
            Some(ctx) => format!(
                ", acting as <strong>{}</strong>",
                esc(ctx.shadow().display_name())
            ),
            None => String::new(),
        };
        let _ = write!(
            nav,
            "<span class=\"who\">Signed in as <strong id=\"signed-in\">{}</strong>{acting} \
             <form method=\"post\" action=\"/signout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Sign out</button></form></span>",
            esc(&real.display_name),
            attr(v.csrf())
        );
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Campground Cloud</title><style>{STYLE}</style></head>\
         <body class=\"{class}\"><header><a class=\"brand\" href=\"/\">Campground Cloud</a>{nav}</header>\
         <main><h1>{title}</h1>{body}</main></body></html>",
        title = esc(title),
        class = if v.ctx.is_some() { "impersonating" } else { "" },
    )
}

/// Every page of the demo is someone's own (bookings, a card number, the
/// support console, the audit trail): none is kept by a browser or proxy
/// cache, so Back after signing out on a shared machine shows nothing.
fn html(status: StatusCode, page: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

fn page(v: &Viewer, demo: &Demo, title: &str, body: &str) -> Response {
    html(StatusCode::OK, layout(v, demo, title, body))
}

fn refused(v: &Viewer, demo: &Demo, status: StatusCode, title: &str, message: &str) -> Response {
    html(
        status,
        layout(
            v,
            demo,
            title,
            &format!(
                "<div class=\"card refused\" id=\"refused\">{}</div>",
                esc(message)
            ),
        ),
    )
}

/// A 403 for a user who lacks one of the app's permissions. Under
/// impersonation the trail records it as the refusal it is (the customer
/// would be refused too), a denied attempt, not as an access or a change.
fn not_permitted(v: &Viewer, demo: &Demo, title: &str, message: &str) -> Response {
    (
        impersonation_axum::Denied(Denial::NotPermitted),
        refused(v, demo, StatusCode::FORBIDDEN, title, message),
    )
        .into_response()
}

fn sign_in_first() -> Response {
    Redirect::to("/").into_response()
}

fn bad_csrf(v: &Viewer, demo: &Demo) -> Response {
    refused(
        v,
        demo,
        StatusCode::FORBIDDEN,
        "Form expired",
        "This form is out of date: it was shown before an impersonation started or ended (in this tab or another). Reload the page and try again.",
    )
}

/// `GET /`: the sign-in picker (a demo), or on to the dashboard (an
/// agent, not impersonating: the support console).
pub async fn home(State(demo): AppState, v: Viewer) -> Response {
    if v.real.is_some() {
        // An agent's work is the console (an agent holds read permissions
        // too, to impersonate customers who hold them, but has no
        // campground of their own).
        let to = if v.is_agent(&demo) && v.ctx.is_none() {
            "/support"
        } else {
            "/dashboard"
        };
        return Redirect::to(to).into_response();
    }
    let mut cards = String::new();
    let directory = demo.service().directory();
    for id in seed::people()
        .map(|ps| ps.into_iter().map(|p| p.id))
        .into_iter()
        .flatten()
    {
        let Some(p) = directory.get(&id) else {
            continue;
        };
        let _ = write!(
            cards,
            "<form class=\"card\" method=\"post\" action=\"/signin\">\
             <strong>{name}</strong><div class=\"note\">{what}</div>\
             <input type=\"hidden\" name=\"user\" value=\"{id}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\" id=\"sign-in-{id}\">Sign in as {name}</button></form>",
            name = esc(&p.display_name),
            what = esc(&seed::describe(&p)),
            id = attr(p.id.as_str()),
            csrf = attr(v.csrf()),
        );
    }
    page(
        &v,
        &demo,
        "Sign in",
        &format!(
            "<p>This is a demo: pick anyone. Support agents find the <em>Support console</em> in the menu; \
             sessions and the audit trail are kept in the <code>{}</code> store.</p><div class=\"people\">{cards}</div>",
            demo.store_kind()
        ),
    )
}

/// The sign-in form.
/// No `Debug`: it holds the CSRF token.
#[derive(Deserialize)]
pub struct SignInForm {
    user: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /signin`.
pub async fn sign_in(
    State(demo): AppState,
    v: Viewer,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    AppForm(form): AppForm<SignInForm>,
) -> Response {
    // Signing in as someone else would leave the impersonation running,
    // with no one signed in to stop it (the attempt is on the trail as
    // denied, not as a change to the customer's data).
    if let Some(refusal) = refused_while_impersonating(
        guard,
        &v,
        &demo,
        StatusCode::CONFLICT,
        "Sign in",
        "Stop impersonating before you sign in as someone else.",
    ) {
        return refusal;
    }
    if !v.csrf_ok(&form.csrf) {
        return bad_csrf(&v, &demo);
    }
    let Some(person) = UserId::new(form.user.trim())
        .ok()
        .and_then(|id| demo.service().directory().get(&id))
    else {
        return refused(
            &v,
            &demo,
            StatusCode::BAD_REQUEST,
            "Sign in",
            "No such person.",
        );
    };
    // Forms rendered for whoever was signed in before (another tab's)
    // must not post as this person: the browser gets a new CSRF token.
    let mut res = (RenewCsrfToken, Redirect::to("/")).into_response();
    let cookie = format!(
        "{SIGN_IN_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax",
        person.id.as_str()
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, value);
    }
    res
}

/// `POST /signout`: ends a running impersonation first (revoked by its own agent).
///
/// It reads no form: its check is the post's origin alone (below), and a
/// body no form extractor takes (another site's `text/plain` post) is
/// refused by that check, on the trail, not by the extractor, unseen.
pub async fn sign_out(State(demo): AppState, v: Viewer) -> Response {
    // A sign-out form may be older than its token: rendered under an
    // impersonation that has ended since (revoked, expired), whose pages'
    // token the SDK then replaced. Posted as whoever the browser is now,
    // it can only sign them out, so it needs only to come from this site
    // (its token is not compared).
    if !v.csrf.as_ref().is_some_and(CsrfCheck::same_site) {
        // The route is left out of the layer's audit (a sign-out's record
        // is the session's end); refused, it ends nothing, and is on the
        // trail as the request it was, as the layer would put it.
        if let Some(ctx) = &v.ctx {
            let refused = impersonation_core::Activity::access("POST /signout (403)")
                .detail("method", "POST")
                .detail("route", crate::SIGN_OUT)
                .detail("status", 403);
            // Run to its end, as the layer runs its writes: a client that
            // goes away does not cut short a batched write others share.
            let service = Arc::clone(demo.service());
            let ctx = ctx.clone();
            let write = tokio::spawn(async move { service.record_completed(&ctx, refused).await });
            match write.await {
                // Or the session ended meanwhile: nothing to record in it.
                Ok(Ok(_) | Err(impersonation_core::Error::Unauthenticated)) => {}
                // Nothing is answered that the trail does not show.
                Ok(Err(_)) | Err(_) => {
                    return (StatusCode::SERVICE_UNAVAILABLE, "audit unavailable").into_response();
                }
            }
        }
        return bad_csrf(&v, &demo);
    }
    // A session that ended meanwhile (elsewhere, or by expiry) needs no
    // ending: the sign-out goes on.
    if let (Some(ctx), Some(real)) = (&v.ctx, &v.real)
        && let Err(e) = demo
            .service()
            .revoke(ctx.session(), real, "agent signed out")
            .await
        && !matches!(
            e,
            impersonation_core::Error::Ended(_) | impersonation_core::Error::UnknownSession
        )
    {
        return refused_for(
            &v,
            &demo,
            "Sign out",
            "The impersonation could not be ended",
            &e,
        );
    }
    let mut res = (RenewCsrfToken, Redirect::to("/")).into_response();
    let cookie = format!("{SIGN_IN_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        res.headers_mut().append(header::SET_COOKIE, value);
    }
    res
}

/// The most bookings a campground's table shows (the latest): a page
/// without a bound would one day pass what the layer reads to put its
/// banner in (`MAX_BANNER_BODY`), and the agent could no longer see the
/// busiest customers' dashboards.
/// `GET /api/bookings` lists as many of each campground's.
pub const BOOKINGS_SHOWN: usize = 100;

/// The latest [`BOOKINGS_SHOWN`] of a campground's bookings (all, if fewer).
pub fn latest_bookings(rows: &[Booking]) -> &[Booking] {
    &rows[rows.len().saturating_sub(BOOKINGS_SHOWN)..]
}

fn bookings_table(rows: &[Booking]) -> String {
    if rows.is_empty() {
        return "<p class=\"note\">No bookings yet.</p>".into();
    }
    let shown = latest_bookings(rows);
    let mut out = String::new();
    if shown.len() < rows.len() {
        let _ = write!(
            out,
            "<p class=\"note\">The latest {} of {} bookings.</p>",
            shown.len(),
            rows.len()
        );
    }
    out.push_str("<table><tr><th>Guest</th><th>Site</th><th>Arrival</th><th>Nights</th></tr>");
    for b in shown {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&b.guest),
            esc(&b.site),
            esc(&b.arrival),
            b.nights
        );
    }
    out.push_str("</table>");
    out
}

/// How often the dashboard's live line is sent.
pub const LIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /dashboard/live`, the dashboard's live line: how many bookings the viewer's campgrounds
/// hold, as a server-sent event now and every [`LIVE_EVERY`]. A stream
/// of no known length: under impersonation the SDK's layer cuts it once
/// the session ends, and the page's script then stops listening, so a
/// tab left open stops updating the customer's count (what the page
/// showed before stays on screen until it is reloaded).
pub async fn live(State(demo): AppState, v: Viewer) -> Response {
    if v.real.is_none() {
        return (StatusCode::UNAUTHORIZED, "sign in first").into_response();
    }
    if !v.can("bookings:read") {
        return (
            StatusCode::FORBIDDEN,
            impersonation_axum::Denied(Denial::NotPermitted),
            "you may not read bookings",
        )
            .into_response();
    }
    let tenants: Vec<&'static str> = v.campgrounds().iter().map(|c| c.tenant).collect();
    let events = futures_util::stream::unfold(true, move |first| {
        let (demo, tenants) = (Arc::clone(&demo), tenants.clone());
        async move {
            if !first {
                tokio::time::sleep(LIVE_EVERY).await;
            }
            let count: usize = {
                let data = demo.data();
                tenants
                    .iter()
                    .map(|t| data.bookings.get(*t).map_or(0, Vec::len))
                    .sum()
            };
            let event = Event::default().event("bookings").data(count.to_string());
            Some((Ok::<_, Infallible>(event), false))
        }
    });
    Sse::new(events).into_response()
}

/// `GET /dashboard`: the bookings of the effective user's campgrounds.
pub async fn dashboard(State(demo): AppState, v: Viewer) -> Response {
    if v.real.is_none() {
        return sign_in_first();
    }
    let campgrounds = v.campgrounds();
    let mut body = format!(
        "<p>Welcome, <strong id=\"effective-user\">{}</strong>.</p>",
        esc(v.effective_name())
    );
    if v.can("bookings:read") && !campgrounds.is_empty() {
        // The live line: server-sent events, which the SDK's layer cuts
        // when the impersonation ends. Under one, the page then stops
        // listening and says so, rather than reconnect as whoever the
        // browser is by then (the agent, or the next customer) under this
        // page's banner; outside one, it reconnects after a blip as
        // `EventSource` does.
        let _ = write!(
            body,
            "<p class=\"note\" id=\"live-line\">Live: <span id=\"live\">&#8230;</span> bookings</p>\
             <script>{}</script>",
            live_script(v.ctx.is_some())
        );
    }
    if campgrounds.is_empty() {
        body.push_str("<p class=\"note\">You work for the platform, not a campground. Use the <a href=\"/support\">Support console</a> to help a customer.</p>");
    }
    if !v.can("bookings:read") && !campgrounds.is_empty() {
        body.push_str("<p class=\"note\">You may not read bookings.</p>");
    } else {
        let data = demo.data();
        for c in &campgrounds {
            let rows = data.bookings.get(c.tenant).cloned().unwrap_or_default();
            let _ = write!(
                body,
                "<div class=\"card\"><h2>{}</h2>{}</div>",
                esc(c.name),
                bookings_table(&rows)
            );
        }
    }
    if v.can("bookings:write") && !campgrounds.is_empty() {
        // A partner managing several campgrounds says which one.
        let campground = match campgrounds.as_slice() {
            [one] => format!(
                "<input type=\"hidden\" name=\"campground\" value=\"{}\">",
                attr(one.tenant)
            ),
            several => {
                several.iter().fold(
                    String::from("<label>Campground <select name=\"campground\">"),
                    |mut out, c| {
                        let _ = write!(
                            out,
                            "<option value=\"{}\">{}</option>",
                            attr(c.tenant),
                            esc(c.name)
                        );
                        out
                    },
                ) + "</select></label>"
            }
        };
        let _ = write!(
            body,
            "<form class=\"card\" method=\"post\" action=\"/bookings\"><h2>Add a booking</h2>\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">{campground}\
             <label>Guest <input type=\"text\" name=\"guest\" required maxlength=\"80\"></label>\
             <label>Site <input type=\"text\" name=\"site\" required maxlength=\"40\"></label>\
             <label>Arrival <input type=\"date\" name=\"arrival\" required></label>\
             <label>Nights <input type=\"number\" name=\"nights\" min=\"1\" max=\"60\" value=\"1\"></label>\
             <button type=\"submit\">Add booking</button></form>",
            attr(v.csrf())
        );
    }
    page(&v, &demo, "Dashboard", &body)
}

/// The add-booking form.
/// No `Debug`: it holds the CSRF token.
#[derive(Deserialize)]
pub struct BookingForm {
    guest: String,
    site: String,
    arrival: String,
    nights: String,
    /// The campground's tenant; may be left out by someone who sees one.
    #[serde(default)]
    campground: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /bookings`: adds a booking to one of the effective user's
/// campgrounds (the one they see, or the one they chose).
pub async fn add_booking(
    State(demo): AppState,
    v: Viewer,
    AppForm(form): AppForm<BookingForm>,
) -> Response {
    if v.real.is_none() {
        return sign_in_first();
    }
    if !v.csrf_ok(&form.csrf) {
        return bad_csrf(&v, &demo);
    }
    if !v.can("bookings:write") {
        return not_permitted(&v, &demo, "Add a booking", "You may not change bookings.");
    }
    let date = time::macros::format_description!("[year]-[month]-[day]");
    let nights = form
        .nights
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=60).contains(n));
    let (guest, site) = (form.guest.trim(), form.site.trim());
    let valid = !guest.is_empty()
        && guest.chars().count() <= 80
        && !site.is_empty()
        && site.chars().count() <= 40
        && time::Date::parse(form.arrival.trim(), &date).is_ok();
    let (Some(nights), true) = (nights, valid) else {
        return refused(
            &v,
            &demo,
            StatusCode::BAD_REQUEST,
            "Add a booking",
            "A booking needs a guest, a site, an arrival date (YYYY-MM-DD) and 1 to 60 nights.",
        );
    };
    let campgrounds = v.campgrounds();
    let chosen = match (form.campground.trim(), campgrounds.as_slice()) {
        ("", [one]) => Some(*one),
        (tenant, all) => all.iter().find(|c| c.tenant == tenant).copied(),
    };
    let Some(campground) = chosen else {
        // Under impersonation the trail records it as the refusal it is
        // (a campground outside the customer's tenants), not as a change.
        return (
            impersonation_axum::Denied(Denial::TenantBoundary),
            refused(
                &v,
                &demo,
                StatusCode::FORBIDDEN,
                "Add a booking",
                "You may only add bookings to the campgrounds you manage.",
            ),
        )
            .into_response();
    };
    demo.data()
        .bookings
        .entry(campground.tenant.to_owned())
        .or_default()
        .push(Booking {
            guest: guest.into(),
            site: site.into(),
            arrival: form.arrival.trim().into(),
            nights,
        });
    Redirect::to("/dashboard").into_response()
}

/// `GET /settings`: the effective user's settings (copied into the shadow
/// user), for a user with `settings:read`.
pub async fn settings(State(demo): AppState, v: Viewer) -> Response {
    let Some(id) = v.effective_id().cloned() else {
        return sign_in_first();
    };
    if !v.can("settings:read") {
        return not_permitted(&v, &demo, "Settings", "You may not read settings.");
    }
    let (tz, lang) = demo.data().settings.get(&id).cloned().unwrap_or_default();
    let editable = v.can("settings:write");
    let body = format!(
        "<form class=\"card\" method=\"post\" action=\"/settings\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Time zone <input type=\"text\" name=\"timezone\" value=\"{tz}\" maxlength=\"64\" {ro}></label>\
         <label>Language <input type=\"text\" name=\"language\" value=\"{lang}\" maxlength=\"16\" {ro}></label>\
         {button}</form>",
        csrf = attr(v.csrf()),
        tz = attr(&tz),
        lang = attr(&lang),
        ro = if editable { "" } else { "readonly" },
        button = if editable {
            "<button type=\"submit\">Save settings</button>"
        } else {
            "<p class=\"note\">You may read these settings, not change them.</p>"
        },
    );
    page(&v, &demo, "Settings", &body)
}

/// The settings form.
/// No `Debug`: it holds the CSRF token.
#[derive(Deserialize)]
pub struct SettingsForm {
    timezone: String,
    language: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /settings`.
pub async fn save_settings(
    State(demo): AppState,
    v: Viewer,
    AppForm(form): AppForm<SettingsForm>,
) -> Response {
    let Some(id) = v.effective_id().cloned() else {
        return sign_in_first();
    };
    if !v.csrf_ok(&form.csrf) {
        return bad_csrf(&v, &demo);
    }
    if !v.can("settings:write") {
        return not_permitted(&v, &demo, "Settings", "You may not change settings.");
    }
    let (tz, lang) = (form.timezone.trim(), form.language.trim());
    // Counted in characters, as the fields' `maxlength` counts them.
    let fits = |text: &str, most: usize| !text.is_empty() && text.chars().count() <= most;
    if !fits(tz, 64) || !fits(lang, 16) {
        return refused(
            &v,
            &demo,
            StatusCode::BAD_REQUEST,
            "Settings",
            "Time zone (at most 64 characters) and language (at most 16) must be filled in.",
        );
    }
    demo.data().settings.insert(id, (tz.into(), lang.into()));
    Redirect::to("/settings").into_response()
}

fn guarded(
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    v: &Viewer,
    demo: &Demo,
    title: &str,
    what: &str,
) -> Option<Response> {
    refused_while_impersonating(
        guard,
        v,
        demo,
        StatusCode::FORBIDDEN,
        title,
        &format!(
            "{what} is not available while impersonating a customer. This attempt was recorded in the audit trail."
        ),
    )
}

/// The SDK's guard refused the route during an impersonation (and put
/// the attempt on the trail as denied): this app's page for it, with
/// `status` and `message`.
fn refused_while_impersonating(
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    v: &Viewer,
    demo: &Demo,
    status: StatusCode,
    title: &str,
    message: &str,
) -> Option<Response> {
    match guard {
        Ok(NotImpersonating) => None,
        // The app's own page answers the refusal, which stays the
        // request's one record on the trail.
        Err(rejection) if rejection.status() == StatusCode::FORBIDDEN => {
            Some(rejection.answer_with(refused(v, demo, status, title, message)))
        }
        Err(rejection) => Some(rejection.into_response()),
    }
}

/// `GET /billing`: the card on file. Refused (and audited) while impersonating.
pub async fn billing(
    State(demo): AppState,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    v: Viewer,
) -> Response {
    // The guard first: under an API client's impersonation token nobody is
    // signed in, and its refusal (already on the trail) is the answer.
    if let Some(refusal) = guarded(guard, &v, &demo, "Billing", "Billing") {
        return refusal;
    }
    if v.real.is_none() {
        return sign_in_first();
    }
    if !v.can("billing:manage") {
        return not_permitted(
            &v,
            &demo,
            "Billing",
            "Only a campground's owner manages its billing.",
        );
    }
    let body = format!(
        "<div class=\"card\"><h2>Plan</h2><p>Campground Cloud Pro · €49 a month</p></div>\
         <div class=\"card\"><h2>Card on file</h2><p id=\"card\">{}</p></div>",
        esc(&v.attribute(&demo, "card_number"))
    );
    page(&v, &demo, "Billing", &body)
}

/// `GET /profile`: personal data as the effective user sees it (redacted and
/// masked in the shadow user) and the password form.
pub async fn profile(State(demo): AppState, v: Viewer) -> Response {
    let Some(id) = v.effective_id().cloned() else {
        return sign_in_first();
    };
    // Account data outside the shadow user: not the support agent's to see.
    let changed = if v.ctx.is_some() {
        "(not shared with support)".to_owned()
    } else {
        demo.data()
            .password_changed
            .get(&id)
            .map_or_else(|| "never".to_owned(), |at| table_timestamp(*at))
    };
    let body = format!(
        "<div class=\"card\"><table>\
         <tr><th>Name</th><td>{name}</td></tr>\
         <tr><th>Email</th><td id=\"email\">{email}</td></tr>\
         <tr><th>Phone</th><td id=\"phone\">{phone}</td></tr>\
         <tr><th>Card on file</th><td id=\"card\">{card}</td></tr>\
         <tr><th>Password last changed</th><td>{changed}</td></tr></table></div>{form}",
        // Under impersonation the form stays, to show its refusal (a
        // read-only session is refused every change, by the layer).
        form = if v.ctx.as_ref().is_some_and(|c| c.shadow().read_only()) {
            "<p class=\"note\" id=\"read-only\">This impersonation is read-only: \
             the password is not changed here.</p>"
                .to_owned()
        } else if v.ctx.is_some() || v.can("password:change") {
            format!(
                "<form class=\"card\" method=\"post\" action=\"/profile/password\"><h2>Change password</h2>\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <label>New password <input type=\"password\" name=\"password\" minlength=\"12\" required></label>\
                 <button type=\"submit\">Change password</button></form>",
                attr(v.csrf())
            )
        } else {
            "<p class=\"note\">This account's password is not changed here.</p>".to_owned()
        },
        name = esc(v.effective_name()),
        email = esc(&v.attribute(&demo, "email")),
        phone = esc(&v.attribute(&demo, "phone")),
        card = esc(&v.attribute(&demo, "card_number")),
        changed = esc(&changed),
    );
    page(&v, &demo, "Profile", &body)
}

/// The password form.
/// No `Debug`: it holds the CSRF token and a password.
#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /profile/password`: refused (and audited) while impersonating.
pub async fn change_password(
    State(demo): AppState,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    v: Viewer,
    AppForm(form): AppForm<PasswordForm>,
) -> Response {
    if let Some(refusal) = guarded(guard, &v, &demo, "Change password", "Changing the password") {
        return refusal;
    }
    let Some(real) = v.real.clone() else {
        return sign_in_first();
    };
    if !v.csrf_ok(&form.csrf) {
        return bad_csrf(&v, &demo);
    }
    if !v.can("password:change") {
        return not_permitted(
            &v,
            &demo,
            "Change password",
            "This account's password is not changed here.",
        );
    }
    if form.password.chars().count() < 12 {
        return refused(
            &v,
            &demo,
            StatusCode::BAD_REQUEST,
            "Change password",
            "Use at least 12 characters.",
        );
    }
    // A demo: the new password is not kept, only when it changed.
    demo.data()
        .password_changed
        .insert(real.id.clone(), OffsetDateTime::now_utc());
    // Access to the account was granted under the old password: every
    // impersonation of this customer ends (its agent's next page has no
    // banner), with the revocation on the trail. An agent's own password
    // change ends nobody's impersonation of them: agents are not
    // impersonated.
    if let Err(e) = demo
        .service()
        .revoke_all_for_subject(
            &real.id,
            impersonation_core::Initiator::User(&real),
            "password changed",
        )
        .await
    {
        return refused_for(
            &v,
            &demo,
            "Change password",
            "The password changed, but support's access to your account may not have ended",
            &e,
        );
    }
    Redirect::to("/profile").into_response()
}

/// The support console's query string.
#[derive(Debug, Deserialize)]
pub struct SupportQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    denied: Option<String>,
}

/// The codes of the SDK's refusals of a start that are not denials (those
/// below 500; a start that fails with 503 is no redirect).
const OTHER_REFUSALS: &[&str] = &[
    "unauthenticated",
    "session_ended",
    "pending_consent",
    "unknown_session",
    "illegal_transition",
    "revoked_while_starting",
];

/// The text of a refusal's code from the query string: a denial's
/// description, or another refusal's code. Nothing else is echoed: a link
/// could make the page say anything.
fn denial_text(code: &str) -> String {
    match Denial::ALL.iter().find(|d| d.code() == code) {
        Some(d) => format!("{d} ({code})"),
        None if OTHER_REFUSALS.contains(&code) => code.to_owned(),
        None => "the start was refused".to_owned(),
    }
}

fn live_table(sessions: &[Session], v: &Viewer, now: OffsetDateTime) -> String {
    if sessions.is_empty() {
        return "<p class=\"note\">No live sessions.</p>".into();
    }
    let mut out = String::from(
        "<table id=\"live-sessions\"><tr><th>Agent</th><th>Customer</th><th>Reason</th><th>Ticket</th><th>Started</th><th>Ends in</th><th></th></tr>",
    );
    for s in sessions {
        // The earlier of its end and its idle deadline (the console lists
        // a session that lapsed until someone ends it).
        let ends = s.expires_at.min(s.idle_deadline());
        let left = if ends > now {
            format!("{} min", (ends - now).whole_minutes())
        } else {
            "lapsed".to_owned()
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{left}</td><td>\
             <form method=\"post\" action=\"/support/revoke\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <input type=\"hidden\" name=\"session\" value=\"{}\"><button type=\"submit\">Revoke</button></form></td></tr>",
            esc(&s.agent.name),
            esc(&s.subject.name),
            esc(s.grant.reason.as_str()),
            esc(s.grant.ticket.as_ref().map_or("", |t| t.as_str())),
            esc(&table_timestamp(s.activated_at.unwrap_or(s.created_at))),
            attr(v.csrf()),
            attr(&s.id.to_string()),
        );
    }
    out.push_str("</table>");
    out
}

/// `GET /support`: search customers, start impersonating with a reason and
/// a ticket, see (and revoke) live sessions.
pub async fn support(
    State(demo): AppState,
    v: Viewer,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    query: Result<AppQuery<SupportQuery>, Response>,
) -> Response {
    // The guard first, as for billing (then a query string that does not
    // parse).
    if let Some(ctx) = &v.ctx
        && let Some(refusal) = refused_while_impersonating(
            guard,
            &v,
            &demo,
            StatusCode::FORBIDDEN,
            "Support console",
            &format!(
                "You are impersonating {}. Stop first to use the console.",
                ctx.shadow().display_name()
            ),
        )
    {
        return refusal;
    }
    let AppQuery(query) = match query {
        Ok(query) => query,
        Err(bad) => return bad,
    };
    let Some(real) = v.real.clone() else {
        return sign_in_first();
    };
    if !v.is_agent(&demo) {
        return refused(
            &v,
            &demo,
            StatusCode::FORBIDDEN,
            "Support console",
            "The support console is for support agents.",
        );
    }
    let service = demo.service();
    let mut body = String::new();
    if let Some(code) = &query.denied {
        let _ = write!(
            body,
            "<div class=\"card refused\" id=\"denied\">Impersonation refused: {}.{}</div>",
            esc(&denial_text(code)),
            // A denial is recorded; the other refusals (a session that
            // ended meanwhile, say) are not attempts the policy refused.
            if Denial::ALL.iter().any(|d| d.code() == code) {
                " The attempt is in the audit trail."
            } else {
                ""
            }
        );
    }
    let q = query.q.trim().to_lowercase();
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/support\" class=\"card\"><label>Find a customer \
         <input type=\"text\" name=\"q\" value=\"{}\" placeholder=\"name, campground or company\" id=\"search\"></label>\
         <button type=\"submit\">Search</button></form>",
        attr(&query.q)
    );
    let mut people = service.directory().all();
    people.sort_by(|a, b| a.display_name.cmp(&b.display_name));
    body.push_str("<div class=\"people\">");
    for p in people.iter().filter(|p| p.id != real.id) {
        let haystack = format!(
            "{} {} {} {}",
            p.display_name,
            p.id,
            p.tenant,
            p.relationships
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )
        .to_lowercase();
        if !q.is_empty() && !haystack.contains(&q) {
            continue;
        }
        let head = format!(
            "<strong>{}</strong><div class=\"note\">{}</div>",
            esc(&p.display_name),
            esc(&seed::describe(p))
        );
        match service.policy().permits_pair(&real, p) {
            Ok(()) => {
                let _ = write!(
                    body,
                    "<form class=\"card\" method=\"post\" action=\"/impersonation/start\" id=\"start-{id}\">{head}\
                     <input type=\"hidden\" name=\"target\" value=\"{id}\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <input type=\"hidden\" name=\"return_to\" value=\"/dashboard\">\
                     <input type=\"hidden\" name=\"error_to\" value=\"/support?q={q}\">\
                     <label>Reason <input type=\"text\" name=\"reason\" minlength=\"8\" maxlength=\"500\" required \
                     title=\"At least 8 letters or digits: why you need to see the account\"></label>\
                     <label>Ticket <input type=\"text\" name=\"ticket\" maxlength=\"64\" placeholder=\"SUP-1234\" \
                     pattern=\"[A-Za-z0-9_#.\\/:\\-]+\" title=\"Letters, digits and - _ # . / : only, as SUP-1234\"></label>\
                     <label><input type=\"checkbox\" name=\"read_only\"> read only</label>\
                     <button type=\"submit\">Impersonate {name}</button></form>",
                    id = attr(p.id.as_str()),
                    csrf = attr(v.csrf()),
                    // Percent-encoded: the SDK follows `error_to` only
                    // if it is a plain local path (no spaces, no `#`).
                    q = attr(
                        &form_urlencoded::byte_serialize(query.q.as_bytes()).collect::<String>()
                    ),
                    name = esc(&p.display_name),
                );
            }
            Err(denial) => {
                let _ = write!(
                    body,
                    "<div class=\"card\">{head}<p class=\"note\">Not available to you: {}.</p></div>",
                    esc(&denial.to_string())
                );
            }
        }
    }
    body.push_str("</div>");
    let _ = write!(body, "<script>{CONSOLE_SCRIPT}</script>");
    let filter = if v.is_admin(&demo) {
        LiveFilter::default()
    } else {
        LiveFilter {
            agent: Some(real.id.clone()),
            ..LiveFilter::default()
        }
    };
    match service.store().live_sessions(&filter).await {
        Ok(sessions) => {
            let _ = write!(
                body,
                "<h2>{}</h2>{}",
                if v.is_admin(&demo) {
                    "All live sessions"
                } else {
                    "Your live sessions"
                },
                live_table(&sessions, &v, service.now())
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not list live sessions");
            body.push_str("<p class=\"card refused\">Live sessions are unavailable right now.</p>");
        }
    }
    // The API way in is for those who may impersonate (an administrator
    // who may not sees the console, not the card).
    if let Some(api) = demo.api()
        && real.has_permission(demo.service().policy().impersonate_permission_name())
    {
        body.push_str(&api_card(api, &v));
    }
    page(&v, &demo, "Support console", &body)
}

/// The console's way into the API side (RFC 8693): a button for the
/// agent's own access token from the stand-in provider, and the two
/// requests that exchange it and use the impersonation token.
fn api_card(api: &crate::api::ApiState, v: &Viewer) -> String {
    let base = api.audience.strip_suffix("/api").unwrap_or(&api.audience);
    let commands = format!(
        "TOKEN=…  # the access_token the button gives\n\
         curl -u {id}:{secret} {base}/oidc/token \\\n  \
         -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\\n  \
         -d actor_token=$TOKEN -d actor_token_type=urn:ietf:params:oauth:token-type:access_token \\\n  \
         -d requested_subject=olive -d audience={base}/api \\\n  \
         -d reason='Booking sync fails through the API' -d ticket=SUP-1044\n\
         curl -H \"Authorization: Bearer <the access_token it gives>\" {base}/api/bookings",
        id = crate::api::CLIENT_ID,
        secret = crate::api::CLIENT_SECRET,
    );
    format!(
        "<div class=\"card\" id=\"api-access\"><h2>API access (RFC 8693 token exchange)</h2>\
         <p>An API client impersonates by token: it exchanges the agent's own access token for \
         an impersonation token, which names the customer as subject and the agent as actor.</p>\
         <form method=\"post\" action=\"/idp/token\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\">Get my API access token</button></form>\
         <pre>{}</pre></div>",
        attr(v.csrf()),
        esc(&commands)
    )
}

/// The revoke form.
/// No `Debug`: it holds the CSRF token.
#[derive(Deserialize)]
pub struct RevokeForm {
    session: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /support/revoke`: its own agent or a lead/admin ends a session.
/// Anyone else is refused by the SDK, which puts the attempt on the
/// session's trail (a customer who holds a session's id is worth seeing
/// there), so the form is not refused here first.
pub async fn revoke(
    State(demo): AppState,
    v: Viewer,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    AppForm(form): AppForm<RevokeForm>,
) -> Response {
    // The console's work, like the console itself, is not done as the
    // customer. The guard first: under an API client's impersonation token
    // nobody is signed in, and its refusal (on the trail) is the answer.
    if let Some(refusal) = refused_while_impersonating(
        guard,
        &v,
        &demo,
        StatusCode::FORBIDDEN,
        "Revoke",
        "You are impersonating a customer. Stop first to use the console.",
    ) {
        return refusal;
    }
    let Some(real) = v.real.clone() else {
        return sign_in_first();
    };
    if !v.csrf_ok(&form.csrf) {
        return bad_csrf(&v, &demo);
    }
    let Ok(session) = form.session.trim().parse::<SessionId>() else {
        return refused(
            &v,
            &demo,
            StatusCode::BAD_REQUEST,
            "Revoke",
            "That is not a session id.",
        );
    };
    match demo
        .service()
        .revoke(session, &real, "revoked from the support console")
        .await
    {
        // Revoked, or it had ended already (its time was up: the console
        // lists a lapsed session nobody ended, and revoking ends it as
        // expired or idle): either way it is over.
        Ok(_) | Err(impersonation_core::Error::Ended(_)) => {
            Redirect::to("/support").into_response()
        }
        Err(e) => refused_for(&v, &demo, "Revoke", "Not revoked", &e),
    }
}

/// The audit page's query string: a page, and the filters.
#[derive(Debug, Deserialize)]
pub struct AuditParams {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    since: Option<String>,
    /// The impersonated customer's user id: their events alone.
    #[serde(default)]
    customer: Option<String>,
}

impl AuditParams {
    /// Narrows `query` to the filters given: `since`, `customer`.
    fn filter(&self, query: &mut AuditQuery) -> Result<(), &'static str> {
        query.since = self.since()?;
        query.subject = match self.customer.as_deref().filter(|c| !c.is_empty()) {
            None => None,
            Some(id) => Some(UserId::new(id).map_err(|_| "customer: expected a user id")?),
        };
        Ok(())
    }

    /// The filters as a query string's tail (`&since=…&customer=…`), for
    /// the link to the next page.
    fn filter_tail(&self) -> String {
        let mut tail = String::new();
        for (name, value) in [("since", &self.since), ("customer", &self.customer)] {
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                let _ = write!(
                    tail,
                    "&{name}={}",
                    form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>()
                );
            }
        }
        tail
    }

    /// Whether any filter is given.
    fn filtered(&self) -> bool {
        !self.filter_tail().is_empty()
    }

    /// `since` as a time: `None` if not given (or empty), an error if it is
    /// no RFC 3339 time.
    fn since(&self) -> Result<Option<OffsetDateTime>, &'static str> {
        match self.since.as_deref().filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(since) => OffsetDateTime::parse(since, &Rfc3339)
                .map(Some)
                .map_err(|_| "since: expected an RFC 3339 time"),
        }
    }
}

fn audit_scope(v: &Viewer, demo: &Demo) -> Result<AuditQuery, (StatusCode, &'static str)> {
    let Some(real) = &v.real else {
        return Err((StatusCode::UNAUTHORIZED, "Sign in first."));
    };
    if v.ctx.is_some() {
        return Err((
            StatusCode::FORBIDDEN,
            "The audit trail is not available while impersonating a customer.",
        ));
    }
    if !v.is_agent(demo) {
        return Err((
            StatusCode::FORBIDDEN,
            "The audit trail is for support agents.",
        ));
    }
    let mut query = AuditQuery::new();
    if !v.is_admin(demo) {
        query.agent = Some(real.id.clone());
    }
    Ok(query)
}

fn audit_rows(events: &[AuditEvent]) -> String {
    let mut out = String::from(
        "<table id=\"audit\"><tr><th>Timestamp</th><th>Action</th><th>User Performing Action</th><th>Impersonated User</th><th>Details</th></tr>",
    );
    for e in events {
        let _ = write!(
            out,
            "<tr data-action=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.action.code(),
            esc(&table_timestamp(e.at)),
            esc(e.action.label()),
            // Names as the trail shows them: a direction control in one
            // would reverse what the row says.
            esc(&display_text(e.actor.name())),
            esc(&display_text(e.subject.as_ref().map_or("", |s| &*s.name))),
            esc(&e.describe()),
        );
    }
    out.push_str("</table>");
    out
}

async fn audit_page(
    demo: &Demo,
    v: &Viewer,
    params: &AuditParams,
    verified: Option<String>,
) -> Response {
    let mut query = match audit_scope(v, demo) {
        Ok(q) => q,
        Err((status, message)) => return refused(v, demo, status, "Audit trail", message),
    };
    query.order = Order::Newest;
    query.limit = 50;
    if let Err(message) = params.filter(&mut query) {
        return refused(v, demo, StatusCode::BAD_REQUEST, "Audit trail", message);
    }
    query.cursor = match params.cursor.as_deref().map(AuditCursor::decode) {
        None => None,
        Some(Ok(cursor)) => Some(cursor),
        Some(Err(_)) => {
            return refused(
                v,
                demo,
                StatusCode::BAD_REQUEST,
                "Audit trail",
                "That is not a page of the audit trail.",
            );
        }
    };
    let page_of = match demo.service().audit(&query).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "audit query failed");
            // A verification's outcome still shows: the trail may fail to
            // list for the very record it found unreadable.
            let message = "The audit trail is unavailable right now.";
            if let Some(result) = verified {
                let body = format!("{result}<p class=\"note\">{message}</p>");
                return html(
                    StatusCode::SERVICE_UNAVAILABLE,
                    layout(v, demo, "Audit trail", &body),
                );
            }
            return refused(
                v,
                demo,
                StatusCode::SERVICE_UNAVAILABLE,
                "Audit trail",
                message,
            );
        }
    };
    let mut body = String::new();
    if let Some(result) = verified {
        body.push_str(&result);
    }
    body.push_str(&customer_filter(demo, params));
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/audit/verify\" class=\"card\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"since\" value=\"{}\"><input type=\"hidden\" name=\"customer\" value=\"{}\">\
         <p class=\"note\">Newest first. Every agent's events form a hash chain: an edited, removed or reordered event breaks it. Verify reads the chains themselves, then checks that this listing, an index kept beside them, shows each of their events {}once, as the chain holds it.</p>\
         <button type=\"submit\" id=\"verify\">Verify chain</button> <a href=\"/audit.txt{}\">plain text</a></form>",
        attr(v.csrf()),
        attr(params.since.as_deref().unwrap_or_default()),
        attr(params.customer.as_deref().unwrap_or_default()),
        if params.filtered() {
            "that its filters select "
        } else {
            ""
        },
        attr(&params.filter_tail().replacen('&', "?", 1)),
    );
    body.push_str(&audit_rows(&page_of.events));
    if let Some(next) = &page_of.next {
        let _ = write!(
            body,
            "<p><a href=\"/audit?cursor={}{}\">Older events →</a></p>",
            attr(&next.encode()),
            attr(&params.filter_tail())
        );
    }
    page(v, demo, "Audit trail", &body)
}

/// The audit page's choice of customer: everyone, or one customer's
/// events (the people nobody could mistake for staff: neither agents nor
/// admins).
fn customer_filter(demo: &Demo, params: &AuditParams) -> String {
    let service = demo.service();
    let policy = service.policy();
    let mut customers: Vec<Principal> = service
        .directory()
        .all()
        .into_iter()
        .filter(|p| policy.permits_agent(p).is_err() && !policy.is_admin(p))
        .collect();
    customers.sort_by(|a, b| a.display_name.cmp(&b.display_name));
    let chosen = params.customer.as_deref().unwrap_or_default();
    let mut out = String::from(
        "<form method=\"get\" action=\"/audit\" class=\"card\" id=\"filter\"><label>Impersonated user \
         <select name=\"customer\"><option value=\"\">everyone</option>",
    );
    for c in &customers {
        let _ = write!(
            out,
            "<option value=\"{}\"{}>{}</option>",
            attr(c.id.as_str()),
            if c.id.as_str() == chosen {
                " selected"
            } else {
                ""
            },
            esc(&display_text(&c.display_name))
        );
    }
    // An id given in the address that is no customer's still shows as
    // the filter in force.
    if !chosen.is_empty() && !customers.iter().any(|c| c.id.as_str() == chosen) {
        let _ = write!(
            out,
            "<option value=\"{}\" selected>{}</option>",
            attr(chosen),
            esc(&display_text(chosen))
        );
    }
    let _ = write!(
        out,
        "</select></label><input type=\"hidden\" name=\"since\" value=\"{}\"> <button type=\"submit\">Show</button></form>",
        attr(params.since.as_deref().unwrap_or_default())
    );
    out
}

/// `GET /audit`: the trail as the SDK's table (an agent sees their own
/// chain, a lead or admin everyone's).
pub async fn audit(
    State(demo): AppState,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    v: Viewer,
    params: Result<AppQuery<AuditParams>, Response>,
) -> Response {
    if let Some(refusal) = guarded(guard, &v, &demo, "Audit trail", "The audit trail") {
        return refusal;
    }
    let AppQuery(params) = match params {
        Ok(params) => params,
        Err(bad) => return bad,
    };
    audit_page(&demo, &v, &params, None).await
}

/// `POST /audit/verify`: verifies the hash chains in view, and the
/// listing against them.
pub async fn verify(
    State(demo): AppState,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    v: Viewer,
    AppForm(form): AppForm<VerifyForm>,
) -> Response {
    if let Some(refusal) = guarded(guard, &v, &demo, "Audit trail", "The audit trail") {
        return refusal;
    }
    if !v.csrf_ok(&form.csrf) {
        return bad_csrf(&v, &demo);
    }
    if v.real.is_none() {
        return sign_in_first();
    }
    // Who may read the trail may verify it, and what they may read: every
    // chain, or their own. Nobody else makes the server read the chains.
    let mut scope = match audit_scope(&v, &demo) {
        Ok(scope) => scope,
        Err((status, message)) => return refused(&v, &demo, status, "Audit trail", message),
    };
    // The listing the page showed, with its filters.
    let params = AuditParams {
        cursor: None,
        since: form.since,
        customer: form.customer,
    };
    if let Err(message) = params.filter(&mut scope) {
        return refused(&v, &demo, StatusCode::BAD_REQUEST, "Audit trail", message);
    }
    let verified = demo.service().verify_listing(&scope).await;
    let outcome = verified.map(|report| {
        let chains = if scope.agent.is_some() {
            format!("your chain, {} events", report.events())
        } else {
            format!(
                "{} chains, {} events",
                report.verified.len(),
                report.events()
            )
        };
        if report.is_ok() && params.filtered() {
            Ok(format!(
                "{chains}; the {} events of this listing, each listed once",
                report.selected
            ))
        } else if report.is_ok() {
            Ok(format!("{chains}, each listed once"))
        } else {
            Err(report
                .broken
                .iter()
                .map(|b| b.to_string())
                .chain(report.listing.iter().map(|m| m.to_string()))
                .collect::<Vec<_>>()
                .join("; "))
        }
    });
    let result = match outcome {
        Ok(Ok(text)) => format!(
            "<div class=\"card ok\" id=\"verified\">✓ Chain verified: {}.</div>",
            esc(&text)
        ),
        Ok(Err(text)) => format!(
            "<div class=\"card refused\" id=\"verified\">✗ Verification failed: {}.</div>",
            esc(&text)
        ),
        Err(e) => {
            tracing::warn!(error = %e, "verification failed to run");
            "<div class=\"card refused\" id=\"verified\">The store could not be read; nothing was verified.</div>".into()
        }
    };
    audit_page(&demo, &v, &params, Some(result)).await
}

/// The Verify button's form: the token, and the filters of the listing it
/// verifies. No `Debug`: it holds the CSRF token.
#[derive(Deserialize)]
pub struct VerifyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    customer: Option<String>,
}

/// `GET /audit.txt?since=RFC3339`: the trail as the SDK's Markdown table, oldest first.
pub async fn audit_text(
    State(demo): AppState,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    v: Viewer,
    params: Result<AppQuery<AuditParams>, Response>,
) -> Response {
    // An export: refused while impersonating, the refusal audited.
    if let Err(refusal) = guard {
        return refusal.into_response();
    }
    let AppQuery(params) = match params {
        Ok(params) => params,
        Err(bad) => return bad,
    };
    let mut query = match audit_scope(&v, &demo) {
        Ok(q) => q,
        Err((status, message)) => return (status, message).into_response(),
    };
    if let Err(message) = params.filter(&mut query) {
        return (StatusCode::BAD_REQUEST, message).into_response();
    }
    query.limit = impersonation_core::MAX_PAGE;
    // The first page before the answer, so that a store that is down is a
    // 503; then page by page, so a long trail is never held whole. A store
    // that fails after the first page ends the response with an error, so
    // that no client takes what it got for the whole trail: hyper closes
    // the connection without finishing the chunked body (`curl` exits with
    // 18), and what it had not yet sent of the rows before is lost with it.
    let first = match demo.service().audit(&query).await {
        Ok(page) => page,
        Err(e) => {
            tracing::warn!(error = %e, "audit query failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "audit trail unavailable").into_response();
        }
    };
    let head = format!("{TABLE_HEAD}{}", table_rows(&first.events));
    let service = Arc::clone(demo.service());
    let rest = futures_util::stream::try_unfold(
        first.next.map(|cursor| (service, query, cursor)),
        |state| async move {
            let Some((service, mut query, cursor)) = state else {
                return Ok(None);
            };
            query.cursor = Some(cursor);
            let page = service.audit(&query).await.inspect_err(|e| {
                tracing::warn!(error = %e, "audit query failed midway through an export");
            })?;
            let rows = table_rows(&page.events);
            Ok::<_, impersonation_core::Error>(Some((
                rows,
                page.next.map(|cursor| (service, query, cursor)),
            )))
        },
    );
    let body = futures_util::stream::once(async { Ok(head) }).chain(rest);
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            // Like every page of the demo: someone's own, kept by no cache.
            (header::CACHE_CONTROL, "no-store"),
            // Text people typed (reasons, names) is never sniffed as markup.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::{BOOKINGS_SHOWN, Booking, bookings_table, latest_bookings};

    fn booking(n: usize) -> Booking {
        Booking {
            guest: format!("Guest {n}"),
            site: "A1".into(),
            arrival: "2026-12-24".into(),
            nights: 1,
        }
    }

    #[test]
    fn a_campground_table_shows_the_latest_bookings_and_says_how_many_there_are() {
        let few: Vec<Booking> = (0..3).map(booking).collect();
        let table = bookings_table(&few);
        assert!(table.contains("Guest 0") && table.contains("Guest 2"));
        assert!(!table.contains("The latest"));

        let many: Vec<Booking> = (0..BOOKINGS_SHOWN + 50).map(booking).collect();
        let table = bookings_table(&many);
        assert!(table.contains(&format!(
            "The latest {BOOKINGS_SHOWN} of {} bookings.",
            BOOKINGS_SHOWN + 50
        )));
        assert_eq!(table.matches("<tr><td>").count(), BOOKINGS_SHOWN);
        assert!(!table.contains("<td>Guest 49</td>"));
        assert!(table.contains("<td>Guest 50</td>"));
        assert!(table.contains(&format!("<td>Guest {}</td>", BOOKINGS_SHOWN + 49)));
        // The API's listing takes the same ones.
        let latest = latest_bookings(&many);
        assert_eq!(latest.len(), BOOKINGS_SHOWN);
        assert_eq!(latest[0].guest, "Guest 50");
        assert_eq!(latest_bookings(&few).len(), 3);
    }
}
