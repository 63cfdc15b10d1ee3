//! The app's own OpenID provider, as the issuer sees it: where agents' (and
//! subjects') tokens come from. Its keys come from discovery and its JWKS,
//! fetched again when a token names a key not seen yet, and once they are
//! older than their maximum age.

use std::sync::Arc;

use impersonation_core::UserId;
use openidconnect::core::{CoreGenderClaim, CoreJsonWebKeySet, CoreProviderMetadata};
use openidconnect::reqwest;
use openidconnect::{AdditionalClaims, EmptyAdditionalClaims, IdTokenClaims, IssuerUrl};
use time::{Duration, OffsetDateTime};

use crate::error::{OidcError, TokenError};
use crate::jwks::Jwks;
use crate::jwt::{Expect, Typ, verify};

/// The longest lifetime accepted for a provider's token.
const PROVIDER_MAX_LIFETIME: Duration = Duration::hours(24);

pub use crate::jwks::JWKS_MAX_AGE;

type SubjectMap = Arc<dyn Fn(&str) -> Option<UserId> + Send + Sync>;

/// An HTTP client for providers: no redirects (a provider that redirects
/// discovery elsewhere is refused, which closes a server-side request
/// forgery path), short timeouts.
pub fn http_client() -> Result<reqwest::Client, OidcError> {
    reqwest::ClientBuilder::new()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| OidcError::Config(format!("HTTP client: {e}")))
}

/// The provider whose access tokens identify agents (and whose tokens may
/// name the subject). Verifies them as RFC 9068 JWT access tokens: RS256
/// signature by `kid` from the provider's JWKS, `iss`, an `aud` that
/// includes this issuer's expected audience, `exp`, `iat`.
#[derive(Clone)]
pub struct Provider {
    issuer: IssuerUrl,
    audience: String,
    keys: Jwks,
    subject: SubjectMap,
    /// The JOSE types its tokens may declare.
    typ: Typ,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.issuer.as_str())
            .field("audience", &self.audience)
            .field("typ", &self.typ)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// Discovers the provider at `issuer` (its `/.well-known/openid-configuration`
    /// and JWKS). `audience` is what its tokens must be addressed to for
    /// this issuer to accept them (a resource indicator, say).
    pub async fn discover(
        issuer: &str,
        audience: impl Into<String>,
        http: reqwest::Client,
    ) -> Result<Self, OidcError> {
        let issuer = IssuerUrl::new(issuer.to_owned())
            .map_err(|e| OidcError::Config(format!("provider issuer: {e}")))?;
        let metadata = CoreProviderMetadata::discover_async(issuer.clone(), &http)
            .await
            .map_err(|e| OidcError::Provider(format!("discovery at {}: {e}", issuer.as_str())))?;
        Ok(Self {
            issuer,
            audience: audience.into(),
            keys: Jwks::fetched(
                "provider",
                metadata.jwks_uri().clone(),
                http,
                metadata.jwks().clone(),
            ),
            subject: Arc::new(|sub| UserId::new(sub).ok()),
            typ: Typ::Any,
        })
    }

    /// A provider known by its keys alone (no discovery, no refresh).
    pub fn with_keys(
        issuer: &str,
        audience: impl Into<String>,
        keys: CoreJsonWebKeySet,
    ) -> Result<Self, OidcError> {
        Ok(Self {
            issuer: IssuerUrl::new(issuer.to_owned())
                .map_err(|e| OidcError::Config(format!("provider issuer: {e}")))?,
            audience: audience.into(),
            keys: Jwks::given("provider", keys),
            subject: Arc::new(|sub| UserId::new(sub).ok()),
            typ: Typ::Any,
        })
    }

    /// How long the provider's keys are trusted before they are fetched
    /// again (default [`JWKS_MAX_AGE`], ten minutes): a key it stopped
    /// publishing is refused within this. A provider known by its keys
    /// alone ([`Provider::with_keys`]) has nothing to fetch them from.
    #[must_use]
    pub fn jwks_max_age(mut self, max_age: std::time::Duration) -> Self {
        self.keys = self.keys.max_age(max_age);
        self
    }

    /// Takes only tokens typed as access tokens (`typ: at+jwt`, RFC 9068
    /// §2.1), refusing untyped ones and `typ: JWT`: then none of the
    /// provider's ID tokens passes for an agent's or a subject's access
    /// token, even one addressed to an audience this issuer also expects
    /// (RFC 8725 §3.11). For a provider that types its access tokens; by
    /// default `at+jwt`, `JWT` and none are all taken, as many providers
    /// do not type them.
    #[must_use]
    pub fn require_typed_access_tokens(mut self) -> Self {
        self.typ = Typ::AccessToken;
        self
    }

    /// How a token's `sub` becomes the app's user id (default: as it is).
    #[must_use]
    pub fn map_subject(
        mut self,
        map: impl Fn(&str) -> Option<UserId> + Send + Sync + 'static,
    ) -> Self {
        self.subject = Arc::new(map);
        self
    }

    /// The provider's issuer.
    pub fn issuer(&self) -> &IssuerUrl {
        &self.issuer
    }

    /// Verifies one of the provider's tokens and returns the user it names.
    pub async fn user_of(&self, token: &str, now: OffsetDateTime) -> Result<UserId, TokenError> {
        self.user_and_claims::<EmptyAdditionalClaims>(token, now)
            .await
            .map(|(user, _)| user)
    }

    /// Verifies one of the provider's tokens and returns the user it names
    /// with its claims.
    pub(crate) async fn user_and_claims<AC: AdditionalClaims>(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<(UserId, IdTokenClaims<AC, CoreGenderClaim>), TokenError> {
        let claims = self.claims_of::<AC>(token, now).await?;
        let user = (self.subject)(claims.subject().as_str()).ok_or_else(|| {
            TokenError::Claims("the token's subject is not a user of this app".into())
        })?;
        Ok((user, claims))
    }

    /// Verifies one of the provider's tokens and returns its claims.
    pub async fn claims_of<AC: AdditionalClaims>(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<IdTokenClaims<AC, CoreGenderClaim>, TokenError> {
        self.keys
            .verify(token, |keys| self.verify_with::<AC>(token, now, keys))
            .await
    }

    fn verify_with<AC: AdditionalClaims>(
        &self,
        token: &str,
        now: OffsetDateTime,
        keys: CoreJsonWebKeySet,
    ) -> Result<IdTokenClaims<AC, CoreGenderClaim>, TokenError> {
        verify::<AC>(
            token,
            Expect {
                issuer: &self.issuer,
                audience: &self.audience,
                keys,
                now,
                max_lifetime: PROVIDER_MAX_LIFETIME,
                typ: self.typ,
                kid_required: false,
            },
        )
    }
}
