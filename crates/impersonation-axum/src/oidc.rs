//! The routes of an `impersonation-oidc` [`Issuer`]: the binding only
//! translates HTTP to the issuer's calls and back.

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
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

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
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
            post(move |headers: HeaderMap, body: Bytes| {
                let issuer = token.clone();
                async move { answer(issuer.exchange(authorization(&headers), &body).await) }
            }),
        )
        .route(
            &format!("/{}", paths::REVOKE),
            post(move |headers: HeaderMap, body: Bytes| {
                let issuer = revoke.clone();
                async move { answer(issuer.revoke(authorization(&headers), &body).await) }
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
