//! The demo's API side, for impersonation by token (RFC 8693):
//!
//! - `/idp`: a stand-in for the company's identity provider, as the sign-in
//!   picker stands in for real sign-in: `POST /idp/token` gives the
//!   signed-in person an access token for the API (their own, not an
//!   impersonation), `GET /idp/jwks.json` its keys;
//! - `/oidc`: the SDK's token-exchange issuer (`impersonation-oidc`), which
//!   trusts that provider for agents' tokens;
//! - `GET /api/bookings`: bookings of the effective user as JSON (the
//!   latest [`crate::pages::BOOKINGS_SHOWN`] of each campground, and how
//!   many there are in all, as the dashboard shows them); accepts
//!   the provider's tokens (the person themself) and the issuer's
//!   impersonation tokens (the customer, with the agent beside).

use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use impersonation_axum::{NotImpersonating, NotImpersonatingRejection};
use impersonation_oidc::openidconnect::core::{
    CoreGenderClaim, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
};
use impersonation_oidc::openidconnect::{
    Audience, EmptyAdditionalClaims, IdToken, IdTokenClaims, IssuerUrl, StandardClaims,
    SubjectIdentifier,
};
use impersonation_oidc::{ClientRegistration, Issuer, IssuerConfig, KeyRing, Provider, SigningKey};
use serde::{Deserialize, Serialize};

use crate::Demo;
use crate::pages::Viewer;

/// The demo API client's credentials (a demo: printed, never secret).
pub const CLIENT_ID: &str = "campground-api-console";
/// Its secret.
pub const CLIENT_SECRET: &str = "demo-console-secret";

/// How long the stand-in provider's access tokens live.
const IDP_TOKEN_MINUTES: i64 = 10;

type AccessToken = IdToken<
    EmptyAdditionalClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

/// The API side's keys and endpoints, built once the demo knows its URL.
pub struct ApiState {
    /// The stand-in provider's issuer URL (`{base}/idp`).
    pub idp_issuer: String,
    /// The API's audience (`{base}/api`).
    pub audience: String,
    idp_key: SigningKey,
    provider: Provider,
    issuer: Issuer,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("idp_issuer", &self.idp_issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// Keys for the stand-in provider and the issuer, generated at start-up.
    pub fn new(demo: &Demo, base: &str) -> Result<Self> {
        let idp_issuer = format!("{base}/idp");
        let audience = format!("{base}/api");
        let idp_key = SigningKey::generate().context("the provider's key")?;
        let provider = Provider::with_keys(
            &idp_issuer,
            audience.clone(),
            CoreJsonWebKeySet::new(vec![idp_key.public_jwk().clone()]),
        )?;
        let issuer = Issuer::new(
            IssuerConfig::new(&format!("{base}/oidc"))?.client(ClientRegistration::new(
                CLIENT_ID,
                CLIENT_SECRET,
                [audience.clone()],
            )),
            KeyRing::new(SigningKey::generate().context("the issuer's key")?),
            provider.clone(),
            Arc::clone(demo.service()),
        );
        Ok(Self {
            idp_issuer,
            audience,
            idp_key,
            provider,
            issuer,
        })
    }

    /// The token-exchange issuer.
    pub fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    /// The stand-in provider, as the issuer and the host's auth see it.
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// A token as of `now`: the service's clock, the one the issuer checks
    /// it by (tests set it by hand).
    fn mint(
        &self,
        user: &impersonation_core::UserId,
        now: time::OffsetDateTime,
    ) -> Result<(String, i64)> {
        let now = chrono::DateTime::from_timestamp(now.unix_timestamp(), 0)
            .ok_or_else(|| anyhow::anyhow!("the clock reads a time no token can carry"))?;
        let claims = IdTokenClaims::new(
            IssuerUrl::new(self.idp_issuer.clone())?,
            vec![Audience::new(self.audience.clone())],
            now + chrono::Duration::minutes(IDP_TOKEN_MINUTES),
            now,
            StandardClaims::new(SubjectIdentifier::new(user.as_str().to_owned())),
            EmptyAdditionalClaims {},
        );
        let token = AccessToken::new(
            claims,
            self.idp_key.rsa_signer(),
            CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
            None,
            None,
        )?;
        Ok((token.to_string(), IDP_TOKEN_MINUTES * 60))
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(value),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

/// The form of `POST /idp/token`.
/// No `Debug`: it holds the CSRF token.
#[derive(Deserialize)]
pub struct IdpTokenForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /idp/token`: the signed-in person's own API access token.
pub async fn idp_token(
    State(demo): State<Arc<Demo>>,
    guard: Result<NotImpersonating, NotImpersonatingRejection>,
    v: Viewer,
    crate::pages::AppForm(form): crate::pages::AppForm<IdpTokenForm>,
) -> Response {
    // A credential: refused while impersonating (the token would be the
    // agent's own), the refusal audited as a denied attempt.
    if let Err(refusal) = guard {
        return refusal.into_response();
    }
    let (Some(api), Some(real)) = (demo.api(), &v.real) else {
        return error(StatusCode::UNAUTHORIZED, "sign in first");
    };
    if !v.csrf_ok(&form.csrf) {
        return error(StatusCode::FORBIDDEN, "cross-site request refused");
    }
    match api.mint(&real.id, demo.service().now()) {
        Ok((access_token, expires_in)) => json(
            StatusCode::OK,
            &serde_json::json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": expires_in,
            }),
        ),
        Err(e) => {
            tracing::error!(error = %e, "minting a provider token");
            error(StatusCode::INTERNAL_SERVER_ERROR, "could not sign a token")
        }
    }
}

/// `GET /idp/jwks.json`: the stand-in provider's public keys.
pub async fn idp_jwks(State(demo): State<Arc<Demo>>) -> Response {
    match demo.api() {
        Some(api) => json(
            StatusCode::OK,
            &CoreJsonWebKeySet::new(vec![api.idp_key.public_jwk().clone()]),
        ),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
    }
}

#[derive(Serialize)]
struct BookingJson<'a> {
    campground: &'a str,
    guest: &'a str,
    site: &'a str,
    arrival: &'a str,
    nights: u32,
}

/// `GET /api/bookings`: the effective user's bookings.
pub async fn bookings(State(demo): State<Arc<Demo>>, v: Viewer) -> Response {
    let Some(user) = v.effective_id().cloned() else {
        let mut res = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
        // RFC 6750 §3: a 401 names the scheme it wants.
        res.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return res;
    };
    if !v.can("bookings:read") {
        // Under impersonation, a denied attempt on the trail.
        return (
            impersonation_axum::Denied(impersonation_core::Denial::NotPermitted),
            error(StatusCode::FORBIDDEN, "may not read bookings"),
        )
            .into_response();
    }
    let data = demo.data();
    let campgrounds = v.campgrounds();
    let mut total = 0;
    let rows: Vec<BookingJson<'_>> = campgrounds
        .iter()
        .flat_map(|c| {
            let all = data.bookings.get(c.tenant).map_or(&[][..], Vec::as_slice);
            total += all.len();
            crate::pages::latest_bookings(all)
                .iter()
                .map(|b| BookingJson {
                    campground: c.name,
                    guest: &b.guest,
                    site: &b.site,
                    arrival: &b.arrival,
                    nights: b.nights,
                })
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "user": user.as_str(),
            "name": v.effective_name(),
            "impersonated_by": v.ctx.as_ref().map(|c| c.agent().id.as_str()),
            "total": total,
            "bookings": rows,
        }),
    )
}
