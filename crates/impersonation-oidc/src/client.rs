//! The client part: asks an external provider that supports token exchange
//! (Keycloak, Zitadel and the like) for an impersonation token, over the
//! `openidconnect` crate's HTTP client abstraction, and reads the `act`
//! claim of what comes back.

use openidconnect::http::{HeaderValue, Method, Request, header};
use openidconnect::{AsyncHttpClient, TokenUrl, reqwest};
use serde::Deserialize;

use crate::claims::{ActorClaim, ExternalClaims};
use crate::error::{OidcError, TokenError};
use crate::provider::Provider;
use crate::request::{ACCESS_TOKEN_TYPE, Subject, TOKEN_EXCHANGE};

/// A token-exchange request to an external provider.
#[derive(Clone, Default)]
pub struct ExternalExchange {
    /// The agent's access token, from that provider.
    pub actor_token: String,
    /// The customer: a token about them, or their id (`requested_subject`).
    pub subject: Option<Subject>,
    /// `audience` values.
    pub audiences: Vec<String>,
    /// `scope`.
    pub scope: Option<String>,
    /// Further parameters the provider understands (a reason, say).
    pub extra: Vec<(String, String)>,
}

impl std::fmt::Debug for ExternalExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalExchange")
            .field("audiences", &self.audiences)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// What the provider issued.
#[derive(Clone, Deserialize)]
pub struct ExchangedToken {
    /// The issued token. Never log it.
    pub access_token: String,
    /// Its type (RFC 8693 §2.2.1).
    #[serde(default)]
    pub issued_token_type: Option<String>,
    /// `Bearer`, usually.
    pub token_type: String,
    /// Seconds until it expires.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// Granted scope.
    #[serde(default)]
    pub scope: Option<String>,
}

impl std::fmt::Debug for ExchangedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangedToken")
            .field("issued_token_type", &self.issued_token_type)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

impl ExchangedToken {
    /// Verifies the issued token with the provider's keys (discovered into
    /// `provider`, whose audience is the one asked for) and returns its
    /// subject and current actor (`None`: the provider recorded no actor,
    /// so the token is not an impersonation token).
    pub async fn subject_and_actor(
        &self,
        provider: &Provider,
    ) -> Result<(String, Option<ActorClaim>), TokenError> {
        let claims = provider
            .claims_of::<ExternalClaims>(&self.access_token, time::OffsetDateTime::now_utc())
            .await?;
        Ok((
            claims.subject().as_str().to_owned(),
            claims.additional_claims().act.clone(),
        ))
    }
}

#[derive(Deserialize)]
struct ProviderError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// A confidential client of an external provider's token endpoint.
#[derive(Clone)]
pub struct ExchangeClient {
    token_url: TokenUrl,
    client_id: String,
    client_secret: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for ExchangeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeClient")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

fn form_escape(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl ExchangeClient {
    /// A client of the token endpoint at `token_url`, authenticating with
    /// `client_secret_basic`.
    pub fn new(
        token_url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        http: reqwest::Client,
    ) -> Result<Self, OidcError> {
        Ok(Self {
            token_url: TokenUrl::new(token_url.to_owned())
                .map_err(|e| OidcError::Config(format!("token URL: {e}")))?,
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            http,
        })
    }

    /// Sends the exchange and returns the issued token (or the provider's
    /// refusal as [`OidcError::Refused`]).
    pub async fn exchange(&self, request: &ExternalExchange) -> Result<ExchangedToken, OidcError> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", TOKEN_EXCHANGE)
            .append_pair("actor_token", &request.actor_token)
            .append_pair("actor_token_type", ACCESS_TOKEN_TYPE);
        match &request.subject {
            Some(Subject::Token { token, token_type }) => {
                form.append_pair("subject_token", token)
                    .append_pair("subject_token_type", token_type);
            }
            Some(Subject::Requested(id)) => {
                form.append_pair("requested_subject", id);
            }
            None => {}
        }
        for audience in &request.audiences {
            form.append_pair("audience", audience);
        }
        if let Some(scope) = &request.scope {
            form.append_pair("scope", scope);
        }
        for (name, value) in &request.extra {
            form.append_pair(name, value);
        }
        let basic = {
            use base64::Engine;
            let pair = format!(
                "{}:{}",
                form_escape(&self.client_id),
                form_escape(&self.client_secret)
            );
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        let http_request = Request::builder()
            .method(Method::POST)
            .uri(self.token_url.as_str())
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .header(header::ACCEPT, HeaderValue::from_static("application/json"))
            .header(header::AUTHORIZATION, basic)
            .body(form.finish().into_bytes())
            .map_err(|e| OidcError::Config(format!("building the request: {e}")))?;
        let response = self
            .http
            .call(http_request)
            .await
            .map_err(|e| OidcError::Provider(format!("token endpoint: {e}")))?;
        if response.status().is_success() {
            return serde_json::from_slice(response.body())
                .map_err(|e| OidcError::Provider(format!("token response: {e}")));
        }
        match serde_json::from_slice::<ProviderError>(response.body()) {
            // The provider's words reach the host's logs: printable ASCII
            // only (as this crate's own refusals), and bounded.
            Ok(refusal) => Err(OidcError::Refused {
                error: bounded(refusal.error),
                description: bounded(refusal.error_description.unwrap_or_default()),
            }),
            Err(_) => Err(OidcError::Provider(format!(
                "token endpoint answered {}",
                response.status()
            ))),
        }
    }
}

/// How much of a provider's `error` or `error_description` is kept.
const MAX_PROVIDER_TEXT: usize = 512;

/// A provider's refusal text, as this crate's own refusals are: printable
/// ASCII only (no line break reaches a log line) and at most
/// [`MAX_PROVIDER_TEXT`] characters.
fn bounded(text: String) -> String {
    let text = crate::error::printable(text);
    match text.char_indices().nth(MAX_PROVIDER_TEXT) {
        Some((end, _)) => text[..end].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    /// A hostile provider's refusal can neither break a log line nor fill it.
    #[test]
    fn a_providers_refusal_text_is_printable_and_bounded() {
        let forged = "invalid_grant\nlevel=INFO msg=\"all fine\"\u{1b}[2J".to_owned();
        let kept = super::bounded(forged);
        assert_eq!(kept, "invalid_grant?level=INFO msg=?all fine??[2J");
        let long = super::bounded("é".repeat(2000));
        assert_eq!(long, "?".repeat(super::MAX_PROVIDER_TEXT));
        assert_eq!(super::bounded("ok".into()), "ok");
    }
}
