//! The routes of an `impersonation-oidc` [`Issuer`]: the binding only
//! translates HTTP to the issuer's calls and back.

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use impersonation_oidc::{Issuer, MAX_BODY, TokenEndpointResponse, paths};

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

fn answer(endpoint: TokenEndpointResponse) -> Response {
    let status = StatusCode::from_u16(endpoint.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, endpoint.body).into_response();
    for (name, value) in endpoint.headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// The `Authorization` header as sent. One that cannot be read (not
/// visible ASCII) or that came twice is `Some("")`, which no client
/// authentication passes: the client tried the header and is answered
/// `invalid_client` with `WWW-Authenticate` (RFC 6749 §5.2), not as if it
/// had sent none.
fn authorization(headers: &HeaderMap) -> Option<&str> {
    let mut sent = headers.get_all(header::AUTHORIZATION).iter();
    let first = sent.next()?;
    if sent.next().is_some() {
        return Some("");
    }
    Some(first.to_str().unwrap_or(""))
}

/// The issuer's endpoints, to nest at the path of its issuer URL:
/// `app.nest("/oidc", impersonation_axum::oidc::routes(issuer))` for an
/// issuer at `https://app.example/oidc`. Token and revocation requests are
/// POST only, with bodies bounded by [`MAX_BODY`].
pub fn routes<S: Clone + Send + Sync + 'static>(issuer: Issuer) -> Router<S> {
    let discovery = issuer.clone();
    let jwks = issuer.clone();
    let token = issuer.clone();
    let revoke = issuer;
    Router::new()
        .route(
            &format!("/{}", paths::DISCOVERY),
            get(move || {
                let issuer = discovery.clone();
                async move {
                    match issuer.discovery_json() {
                        Ok(body) => json(StatusCode::OK, body),
                        Err(e) => {
                            tracing::error!(error = %e, "discovery document");
                            json(StatusCode::INTERNAL_SERVER_ERROR, "{}".into())
                        }
                    }
                }
            }),
        )
        .route(
            &format!("/{}", paths::JWKS),
            get(move || {
                let issuer = jwks.clone();
                async move { json(StatusCode::OK, issuer.jwks_json()) }
            }),
        )
        .route(
            &format!("/{}", paths::TOKEN),
            post(move |headers: HeaderMap, body: Result<Bytes, BytesRejection>| {
                let issuer = token.clone();
                async move {
                    match body {
                        Ok(body) => answer(issuer.exchange(authorization(&headers), &body).await),
                        Err(refused) => unreadable(&refused),
                    }
                }
            }),
        )
        .route(
            &format!("/{}", paths::REVOKE),
            post(move |headers: HeaderMap, body: Result<Bytes, BytesRejection>| {
                let issuer = revoke.clone();
                async move {
                    match body {
                        Ok(body) => answer(issuer.revoke(authorization(&headers), &body).await),
                        Err(refused) => unreadable(&refused),
                    }
                }
            }),
        )
        .route(
            &format!("/{}", paths::AUTHORIZE),
            get(|| async {
                json(
                    StatusCode::BAD_REQUEST,
                    r#"{"error":"unsupported_response_type","error_description":"this issuer only exchanges tokens"}"#
                        .into(),
                )
            }),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// A body the endpoint could not read (over [`MAX_BODY`], or cut off), as
/// an RFC 6749 §5.2 error: `invalid_request`, with the status axum gives it
/// (413 for a body too large).
fn unreadable(refused: &BytesRejection) -> Response {
    let description = if refused.status() == StatusCode::PAYLOAD_TOO_LARGE {
        "the request body is too large"
    } else {
        "the request body could not be read"
    };
    json(
        refused.status(),
        format!(r#"{{"error":"invalid_request","error_description":"{description}"}}"#),
    )
}
