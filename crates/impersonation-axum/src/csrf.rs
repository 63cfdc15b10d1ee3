//! The cross-site check of the SDK's start and stop, also offered to the
//! host app's own forms as [`CsrfCheck`].

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, IntoResponseParts, Response, ResponseParts};
use subtle::ConstantTimeEq;

use impersonation_core::SecretHash;

use crate::layer::{CsrfToken, Handle, Settings, cookie, session_token};

/// The cross-site check for a form this site's pages post: the double-submit
/// token, plus the browser's own word on where the request came from.
///
/// A request passes when the browser sent the CSRF cookie, the form's token
/// equals the request's [`CsrfToken`] (the cookie's, or under an
/// impersonation session one bound to it; compared in constant time),
/// `Sec-Fetch-Site` (if sent) is
/// `same-origin` or `none`, and `Origin` (if sent; else the `Referer`'s
/// origin, if that is sent) is this site: its host, and `https` outside
/// development mode. The origin check is what stops a
/// page on another port of the same host, which can set the cookie
/// (browsers do not keep cookies apart by port) but cannot send this site's
/// origin.
///
/// The SDK's start and stop routes use it; a host app uses it for its own
/// forms (settings, sign-out, anything that changes something), with
/// whatever body extractor it likes. It needs the [`crate::ImpersonationLayer`]
/// in front (without it the extractor answers 500).
///
/// ```
/// use axum::{Form, http::StatusCode};
/// use impersonation_axum::CsrfCheck;
///
/// #[derive(serde::Deserialize)]
/// struct Settings { timezone: String, csrf: String }
///
/// async fn save(check: CsrfCheck, Form(form): Form<Settings>) -> StatusCode {
///     if !check.verify(&form.csrf) {
///         return StatusCode::FORBIDDEN;
///     }
///     // … save form.timezone …
///     StatusCode::SEE_OTHER
/// }
/// # let _ = axum::Router::<()>::new().route("/settings", axum::routing::post(save));
/// ```
/// Its `Debug` does not show the token.
#[derive(Clone, Debug)]
pub struct CsrfCheck {
    token: CsrfToken,
    /// The browser sent the cookie, and no header says another site sent
    /// the request.
    same_site: bool,
}

impl CsrfCheck {
    pub(crate) fn of(parts: &Parts, settings: &Settings, token: CsrfToken) -> Self {
        let had_cookie = cookie(&parts.headers, settings.csrf_cookie()).is_some();
        Self {
            token,
            same_site: had_cookie && from_this_site(&parts.headers, &parts.uri, settings),
        }
    }

    /// The token to put in the form's hidden field (the same as the
    /// [`CsrfToken`] extension).
    pub fn token(&self) -> &CsrfToken {
        &self.token
    }

    /// Whether the request comes from this site's own pages: the browser
    /// sent the CSRF cookie (`SameSite=Strict`, so never with a request
    /// another site starts) and neither `Origin` (or, without one, the
    /// `Referer`) nor `Sec-Fetch-Site` names another origin. [`CsrfCheck::verify`] asks this and the token.
    ///
    /// This alone serves a form that may outlive its token and does no
    /// harm posted as whoever the browser is now: sign-out, whose form may
    /// have been rendered under an impersonation that has since ended
    /// (the layer then replaced the token).
    pub fn same_site(&self) -> bool {
        self.same_site
    }

    /// Whether a form that sent `sent` as its token passes the check.
    pub fn verify(&self, sent: &str) -> bool {
        // Compared in constant time: how long a refusal takes says nothing
        // of how much of a guess was right.
        let matches: bool = sent
            .as_bytes()
            .ct_eq(self.token.compared().as_bytes())
            .into();
        self.same_site && !sent.is_empty() && matches
    }

    /// Like [`CsrfCheck::verify`], for the token pages carried under the
    /// session of `secret` (bound to it, as the layer derives it), where
    /// this request's own token is the stored one.
    pub(crate) fn verify_bound(&self, sent: &str, secret: SecretHash) -> bool {
        let bound = session_token(self.token.compared(), secret);
        let matches: bool = sent.as_bytes().ct_eq(bound.as_bytes()).into();
        self.same_site && !sent.is_empty() && matches
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CsrfCheck {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let layer = parts.extensions.get::<Handle>().cloned();
        let token = parts.extensions.get::<CsrfToken>().cloned();
        let (Some(Handle(state)), Some(token)) = (layer, token) else {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CACHE_CONTROL, "no-store")],
                "impersonation layer missing",
            )
                .into_response());
        };
        Ok(Self::of(parts, &state.shared.settings, token))
    }
}

/// An origin this site is served on, as a browser names it in `Origin`
/// (`https://app.example.com`, `http://localhost:3000`): for
/// [`ImpersonationLayer::site_origin`](crate::ImpersonationLayer::site_origin),
/// when the `Host` the app sees is not the one the browser asked for (a
/// proxy that rewrites it), or to hold `Origin` to a fixed list rather than
/// whatever `Host` a request carries.
///
/// Parsed from `scheme://host[:port]` (a trailing `/` is allowed), or taken
/// from a whole URL with [`SiteOrigin::of_url`], and kept as a browser
/// serialises an origin: lower case, the host in its ASCII form, without a
/// default port. A request's `Origin` must be that text exactly, as
/// browsers send it.
///
/// A configured `http` origin is taken as given; outside
/// [development mode](crate::ImpersonationLayer::development_mode) the
/// cookies are `Secure` and `__Host-`, which a plain-http page never sends.
///
/// ```
/// use impersonation_axum::SiteOrigin;
///
/// let origin: SiteOrigin = "https://App.Example.com:443/".parse()?;
/// assert_eq!(origin.to_string(), "https://app.example.com");
/// assert!("https://app.example.com/billing".parse::<SiteOrigin>().is_err());
/// # Ok::<(), impersonation_axum::InvalidOrigin>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteOrigin(String);

/// Why a text is not a [`SiteOrigin`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidOrigin {
    /// Not a URL at all.
    #[error("{0:?} is not an origin (scheme://host[:port])")]
    NotAUrl(String),
    /// A scheme other than `http` or `https`.
    #[error("{0:?} is not an http or https origin")]
    Scheme(String),
    /// A path, query, fragment, user name or password beside the origin.
    #[error("{0:?} holds more than scheme, host and port")]
    NotJustOrigin(String),
}

impl SiteOrigin {
    /// The origin of a whole URL (its path, query and fragment dropped):
    /// an app's public address, `https://app.example.com/campground/`.
    pub fn of_url(text: &str) -> Result<Self, InvalidOrigin> {
        let url = url::Url::parse(text).map_err(|_| InvalidOrigin::NotAUrl(text.to_owned()))?;
        Self::of(&url, text)
    }

    fn of(url: &url::Url, text: &str) -> Result<Self, InvalidOrigin> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(InvalidOrigin::Scheme(text.to_owned()));
        }
        Ok(Self(url.origin().ascii_serialization()))
    }
}

impl std::str::FromStr for SiteOrigin {
    type Err = InvalidOrigin;

    fn from_str(text: &str) -> Result<Self, InvalidOrigin> {
        let url = url::Url::parse(text).map_err(|_| InvalidOrigin::NotAUrl(text.to_owned()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(InvalidOrigin::Scheme(text.to_owned()));
        }
        // The URL parser fills in `/` for an origin without a path.
        if url.path() != "/"
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(InvalidOrigin::NotJustOrigin(text.to_owned()));
        }
        Self::of(&url, text)
    }
}

impl std::fmt::Display for SiteOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The request's own origin: its scheme (`https`, or `http` too in
/// development mode) and its host, from `Host` or, over HTTP/2 (which has
/// no `Host` header), the URI's authority.
struct Site<'a> {
    host: &'a str,
    secure: bool,
}

impl Site<'_> {
    /// Whether `origin` (`scheme://host[:port]`) is this site.
    fn is(&self, origin: &str) -> bool {
        let Some((scheme, host)) = origin.split_once("://") else {
            return false;
        };
        let https = scheme.eq_ignore_ascii_case("https");
        let scheme_ok = https || (!self.secure && scheme.eq_ignore_ascii_case("http"));
        // A default port may be written or left out on either side.
        let default_port = if https { ":443" } else { ":80" };
        fn bare<'a>(host: &'a str, port: &str) -> &'a str {
            host.strip_suffix(port).unwrap_or(host)
        }
        scheme_ok
            && !self.host.is_empty()
            && bare(host, default_port).eq_ignore_ascii_case(bare(self.host, default_port))
    }
}

/// Whether neither `Origin` nor `Sec-Fetch-Site` says another origin sent
/// the request: the check [`CsrfCheck`] makes beside the token, and the
/// layer's for a WebSocket's handshake, which carries no form. A foreign
/// `Origin` or a cross-site `Sec-Fetch-Site` is refused even with a valid
/// token. This site is the origins the layer was given
/// ([`SiteOrigin`]), or else the request's own: `uri`'s host from `Host`
/// (over HTTP/2, from the URI's authority), and `https` outside
/// development mode.
pub(crate) fn from_this_site(headers: &HeaderMap, uri: &Uri, settings: &Settings) -> bool {
    if let Some(fetch_site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(fetch_site, "same-origin" | "none")
    {
        return false;
    }
    // With no `Origin` (a browser from before it sent one on every POST),
    // the `Referer`'s origin stands in for it; with neither, the token
    // and the `SameSite=Strict` cookie decide.
    let referer_origin;
    let origin = match headers.get(header::ORIGIN) {
        Some(origin) => origin,
        None => match headers
            .get(header::REFERER)
            .map(|r| origin_of_url(r.as_bytes()))
        {
            None => return true,
            Some(Some(origin)) => {
                referer_origin = origin;
                &referer_origin
            }
            // A `Referer` that names no origin this site could be.
            Some(None) => return false,
        },
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if !settings.origins.is_empty() {
        // Compared as sent: a browser sends the origin's serialisation,
        // which is how the configured ones are kept.
        return settings.origins.iter().any(|o| o.0 == origin);
    }
    let host = request_host(headers, uri);
    Site {
        host: host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
        secure: settings.secure_cookies,
    }
    .is(origin)
}

/// The origin (`scheme://host[:port]`) of an absolute URL, as a header
/// value: what a `Referer` says of the page that sent a request.
fn origin_of_url(url: &[u8]) -> Option<HeaderValue> {
    let url = std::str::from_utf8(url).ok()?;
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    HeaderValue::from_str(&format!("{}://{}", scheme.to_ascii_lowercase(), authority)).ok()
}

/// The host (and port) a request names: its `Host` or, over HTTP/2 (which
/// has no `Host` header), its URI's authority; readable as text
/// (`to_str`). A value, not a borrow, so that the layer can keep it past
/// the request: a parsed header's value is shared, not copied.
pub(crate) fn request_host(headers: &HeaderMap, uri: &Uri) -> Option<HeaderValue> {
    headers
        .get(header::HOST)
        .filter(|v| v.to_str().is_ok())
        .cloned()
        .or_else(|| {
            uri.authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
}

/// The sources a Content-Security-Policy `form-action` needs for the
/// banner's Stop form to post: the stop route at the origin the layer was
/// given ([`SiteOrigin`]) whose host and port the request's `host`
/// ([`request_host`]) names,
/// or at each one given if none does; or else at the request's own
/// `host`, without a scheme (so the page's own, as a browser reads such a
/// source: `https` or, in development mode, `http` too). Left out: an
/// origin no source can name (an IPv6 address, a `Host` that is no host
/// name); and all of them if the mount path holds what a source's path
/// cannot (`;`, `,`, a space, a quote, a `%`, which a browser decodes
/// before it compares): the policy is then left as it is.
pub(crate) fn stop_sources(settings: &Settings, host: Option<&str>) -> Vec<String> {
    let path = settings.stop_path();
    let path_ok = path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&()*+=:@/".contains(&b));
    if !path_ok {
        return Vec::new();
    }
    if settings.origins.is_empty() {
        return host
            .filter(|host| is_source_authority(host))
            .map(|host| vec![format!("{host}{path}")])
            .unwrap_or_default();
    }
    let named: Vec<&str> = settings
        .origins
        .iter()
        .map(|o| o.0.as_str())
        .filter(|o| host.is_some_and(|h| authority(o).eq_ignore_ascii_case(h)))
        .collect();
    let origins = if named.is_empty() {
        settings.origins.iter().map(|o| o.0.as_str()).collect()
    } else {
        named
    };
    origins
        .into_iter()
        .filter(|origin| {
            origin.split_once("://").is_some_and(|(scheme, a)| {
                matches!(scheme, "http" | "https") && is_source_authority(a)
            })
        })
        .map(|origin| format!("{origin}{path}"))
        .collect()
}

/// The `host[:port]` of an origin (`scheme://host[:port]`).
fn authority(origin: &str) -> &str {
    origin.split_once("://").map_or("", |(_, a)| a)
}

/// Whether `authority` (`host[:port]`) can be written in a CSP
/// host-source: a host name or IPv4 address of letters, digits, `-` and
/// `.`, and a port of digits.
fn is_source_authority(authority: &str) -> bool {
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Response part: the browser gets a new CSRF token with this response.
///
/// The SDK replaces the token when an impersonation starts or stops, so
/// that forms rendered for one identity cannot post as the next. When the
/// host app's own sign-in changes whom the browser acts as (a sign-in, a
/// sign-out, a switch of account), its response should carry this part:
/// then a form another tab rendered for the person before fails the check
/// instead of posting as the one signed in now. Requests without a
/// browser's cookie (API clients) get no CSRF cookie, renewed or not;
/// a response that sets the cookie itself keeps its own.
///
/// Put it on a redirect: the page that follows renders with the new
/// token. The forms of a page that carries it were rendered with the old
/// one (the banner's Stop button too), and fail.
///
/// ```
/// use axum::response::{IntoResponse, Redirect, Response};
/// use impersonation_axum::RenewCsrfToken;
///
/// async fn sign_in() -> Response {
///     // … check the credentials, set the app's own session cookie …
///     (RenewCsrfToken, Redirect::to("/")).into_response()
/// }
/// # let _ = axum::Router::<()>::new().route("/signin", axum::routing::post(sign_in));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenewCsrfToken;

impl IntoResponseParts for RenewCsrfToken {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

/// The stop route's answer (in place of [`RenewCsrfToken`]): the CSRF
/// token goes on as the one every answer to the ended session's cookie
/// derives, not a random one, so that a request the page sent before the
/// stop, answered after it with the dead cookie, leaves the browser the
/// token the page after the stop carries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EndedSessionToken;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;

    fn settings(mount: &str, secure: bool, origins: &[&str]) -> Settings {
        Settings {
            mount: mount.to_owned(),
            secure_cookies: secure,
            audit: Arc::new(|_, _| true),
            changes: None,
            tokens: None,
            stream_check: std::time::Duration::from_secs(5),
            origins: origins.iter().map(|o| o.parse().unwrap()).collect(),
        }
    }

    fn sources(settings: &Settings, host: Option<&'static str>) -> Vec<String> {
        stop_sources(settings, host)
    }

    #[test]
    fn the_stop_forms_sources_are_the_stop_route_at_the_sites_origins() {
        // The request's own host, with no scheme: the page's own, as a
        // browser reads it (`https`, or `http` in development mode, where
        // an `http://host:port` source would not match `https` at that
        // port).
        for secure in [true, false] {
            assert_eq!(
                sources(
                    &settings("/impersonation", secure, &[]),
                    Some("App.example.com:8443")
                ),
                ["App.example.com:8443/impersonation/stop"]
            );
        }
        // Origins given win over `Host`: the one it names, or else each
        // one that a source can name.
        let given = settings(
            "/support/",
            true,
            &[
                "https://app.example.com",
                "https://[::1]:8443",
                "http://10.0.0.7:8080",
            ],
        );
        assert_eq!(
            sources(&given, Some("APP.example.com")),
            ["https://app.example.com/support/stop"]
        );
        assert_eq!(
            sources(&given, Some("internal:8080")),
            [
                "https://app.example.com/support/stop",
                "http://10.0.0.7:8080/support/stop"
            ]
        );
        // Nothing a policy could be given: no host, or one no source can
        // name (that would end the directive, or the policy, early), or a
        // mount path that could not be a source's path.
        let plain = settings("/impersonation", true, &[]);
        for host in [
            None,
            Some("[::1]:3000"),
            Some("app.example.com; script-src *"),
            Some("app.example.com,evil"),
            Some("user@app.example.com"),
            Some("app.example.com:"),
            Some(""),
        ] {
            assert!(sources(&plain, host).is_empty(), "{host:?}");
        }
        for mount in ["/a;b", "/a,b", "/a b", "/a'b", "/a\"b", "/a%2Fb"] {
            assert!(
                sources(&settings(mount, true, &[]), Some("app.example.com")).is_empty(),
                "{mount}"
            );
        }
    }
}
