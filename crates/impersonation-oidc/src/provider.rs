//! The app's own OpenID provider, as the issuer sees it: where agents' (and
//! subjects') tokens come from. Its keys come from discovery and its JWKS,
//! fetched again when a token names a key not seen yet, and once they are
//! older than their maximum age.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use impersonation_core::UserId;
use openidconnect::core::{CoreGenderClaim, CoreJsonWebKeySet, CoreProviderMetadata};
use openidconnect::reqwest;
use openidconnect::{
    AdditionalClaims, EmptyAdditionalClaims, IdTokenClaims, IssuerUrl, JsonWebKey,
};
use time::{Duration, OffsetDateTime};

use crate::error::{OidcError, TokenError};
use crate::jwt::{Expect, unverified_header, verify};

/// The longest lifetime accepted for a provider's token.
const PROVIDER_MAX_LIFETIME: Duration = Duration::hours(24);

/// How soon the JWKS may be fetched again after any attempt (so a flood of
/// bogus key ids cannot turn into a flood of requests to the provider).
const REFRESH_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// How long fetched keys are trusted before they are fetched again, by
/// default: a key the provider stopped publishing (rotated out, or
/// compromised) stops being accepted within this.
pub const JWKS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Past their maximum age, while the provider cannot be reached, the keys
/// it last published serve this much longer; then its tokens fail closed.
const JWKS_STALE_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

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

#[derive(Debug)]
struct KeyCache {
    keys: CoreJsonWebKeySet,
    /// When `keys` were fetched (`None`: given, never fetched).
    fetched: Option<Instant>,
    /// When a fetch was last tried, whatever came of it.
    tried: Option<Instant>,
}

/// The provider whose access tokens identify agents (and whose tokens may
/// name the subject). Verifies them as RFC 9068 JWT access tokens: RS256
/// signature by `kid` from the provider's JWKS, `iss`, an `aud` that
/// includes this issuer's expected audience, `exp`, `iat`.
#[derive(Clone)]
pub struct Provider {
    issuer: IssuerUrl,
    audience: String,
    jwks_uri: Option<openidconnect::JsonWebKeySetUrl>,
    keys: Arc<RwLock<KeyCache>>,
    max_age: std::time::Duration,
    http: Option<reqwest::Client>,
    subject: SubjectMap,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.issuer.as_str())
            .field("audience", &self.audience)
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
            jwks_uri: Some(metadata.jwks_uri().clone()),
            keys: Arc::new(RwLock::new(KeyCache {
                keys: metadata.jwks().clone(),
                fetched: Some(Instant::now()),
                tried: Some(Instant::now()),
            })),
            max_age: JWKS_MAX_AGE,
            http: Some(http),
            subject: Arc::new(|sub| UserId::new(sub).ok()),
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
            jwks_uri: None,
            keys: Arc::new(RwLock::new(KeyCache {
                keys,
                fetched: None,
                tried: None,
            })),
            max_age: JWKS_MAX_AGE,
            http: None,
            subject: Arc::new(|sub| UserId::new(sub).ok()),
        })
    }

    /// How long the provider's keys are trusted before they are fetched
    /// again (default [`JWKS_MAX_AGE`], ten minutes): a key it stopped
    /// publishing is refused within this. A provider known by its keys
    /// alone ([`Provider::with_keys`]) has nothing to fetch them from.
    #[must_use]
    pub fn jwks_max_age(mut self, max_age: std::time::Duration) -> Self {
        self.max_age = max_age;
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
        let keys = self.current_keys().await?;
        match self.verify_with::<AC>(token, now, keys) {
            // A key id the cached JWKS lacks: the provider may have rotated.
            // If a fetch was tried just now, by another request perhaps,
            // what it brought is in the cache.
            Err(TokenError::Signature(_)) if self.names_unknown_key(token) => {
                let keys = match self.refresh().await? {
                    Some(keys) => keys,
                    None => self.cached().0,
                };
                self.verify_with(token, now, keys)
            }
            other => other,
        }
    }

    /// The keys to verify with: fetched again once older than the maximum
    /// age; while that fails, the last ones serve until the stale limit.
    async fn current_keys(&self) -> Result<CoreJsonWebKeySet, TokenError> {
        let (keys, age) = self.cached();
        let Some(age) = age.filter(|age| *age >= self.max_age) else {
            return Ok(keys);
        };
        let usable = |age: std::time::Duration| age < self.max_age.saturating_add(JWKS_STALE_LIMIT);
        match self.refresh().await {
            Ok(Some(fresh)) => Ok(fresh),
            // Another request is fetching, or just tried: what the cache
            // holds now, if not too old.
            Ok(None) => match self.cached() {
                (_, Some(age)) if !usable(age) => Err(TokenError::Unavailable(
                    "provider JWKS: not fetched again for over an hour past its age".into(),
                )),
                (keys, _) => Ok(keys),
            },
            Err(e) if usable(age) => {
                tracing::warn!(error = %e, "the provider's JWKS could not be fetched again; using the last one");
                Ok(keys)
            }
            Err(e) => Err(e),
        }
    }

    /// The cached keys and how long ago they were fetched (`None`: given).
    fn cached(&self) -> (CoreJsonWebKeySet, Option<std::time::Duration>) {
        let cache = self.keys.read().unwrap_or_else(|e| e.into_inner());
        (cache.keys.clone(), cache.fetched.map(|at| at.elapsed()))
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
                access_token_type: true,
                kid_required: false,
            },
        )
    }

    /// Whether a refetch could help: the token names a key we do not hold.
    fn names_unknown_key(&self, token: &str) -> bool {
        if self.jwks_uri.is_none() {
            return false;
        }
        let Ok(header) = unverified_header(token) else {
            return false;
        };
        // No key named: nothing a fetch could find.
        let Some(kid) = header.kid.as_deref() else {
            return false;
        };
        let cache = self.keys.read().unwrap_or_else(|e| e.into_inner());
        !cache
            .keys
            .keys()
            .iter()
            .any(|k| k.key_id().is_some_and(|id| id.as_str() == kid))
    }

    /// Fetches the JWKS, unless a fetch was tried less than `REFRESH_AFTER`
    /// (or the maximum age, if shorter) ago: `None`. The attempt is claimed
    /// under the lock, so requests that arrive together fetch once.
    async fn refresh(&self) -> Result<Option<CoreJsonWebKeySet>, TokenError> {
        let (Some(uri), Some(http)) = (&self.jwks_uri, &self.http) else {
            return Ok(None);
        };
        {
            let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
            // Never more than one attempt a second, whatever the age set.
            let pause = REFRESH_AFTER
                .min(self.max_age)
                .max(std::time::Duration::from_secs(1));
            if cache.tried.is_some_and(|at| at.elapsed() < pause) {
                return Ok(None);
            }
            // Failures count against the rate limit too.
            cache.tried = Some(Instant::now());
        }
        let keys = CoreJsonWebKeySet::fetch_async(uri, http)
            .await
            .map_err(|e| TokenError::Unavailable(format!("provider JWKS: {e}")))?;
        let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
        cache.keys = keys.clone();
        cache.fetched = Some(Instant::now());
        Ok(Some(keys))
    }
}
