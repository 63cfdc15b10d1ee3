//! The verifier for resource servers: checks an impersonation token, then
//! asks the store whether its session is still active, so stop and
//! revocation take effect on the next request.

use std::sync::Arc;

use async_trait::async_trait;
use impersonation_core::{
    Context, Error, ImpersonationApi, SessionId, StoreError, TokenResolver, UserId,
};
use openidconnect::IssuerUrl;
use time::{Duration, OffsetDateTime};

use crate::claims::ImpersonationClaims;
use crate::error::TokenError;
use crate::jwt::{Expect, Typ, verify};
use crate::keys::KeyRing;

/// The most prior actors (a nested `act` chain, RFC 8693 §4.1) a token may
/// record. They are never read for a decision; the bound only refuses
/// tokens built to exhaust a parser.
pub const MAX_PRIOR_ACTORS: usize = 16;

fn prior_actors(act: &crate::claims::ActorClaim) -> usize {
    let mut count = 0;
    let mut prior = act.act.as_ref();
    while let Some(actor) = prior {
        count += 1;
        prior = actor.get("act");
    }
    count
}

/// A token that verified: who acts for whom, in which session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The customer (`sub`).
    pub subject: UserId,
    /// The agent (`act.sub`, the current actor only).
    pub actor: UserId,
    /// The impersonation session (`sid`).
    pub session: SessionId,
    /// When the token expires (`exp`).
    pub expires_at: OffsetDateTime,
    /// The client it was issued to, if it says.
    pub client_id: Option<String>,
}

/// Where the verifier gets the issuer's public keys.
#[derive(Debug, Clone)]
enum Keys {
    /// The issuer's own ring (same process): rotation is seen at once.
    Ring(KeyRing),
    /// A fixed set (fetched from the issuer's JWKS).
    Fixed(openidconnect::core::CoreJsonWebKeySet),
    /// The issuer's JWKS, fetched again as it rotates.
    Fetched(crate::jwks::Jwks),
}

/// The issuer as its tokens name it (`iss`): without the trailing `/`
/// [`crate::IssuerConfig::new`] drops, so that a verifier given the
/// issuer's address with one still knows its tokens.
fn as_issued(issuer: IssuerUrl) -> IssuerUrl {
    let trimmed = issuer.as_str().trim_end_matches('/');
    if trimmed.len() == issuer.as_str().len() {
        return issuer;
    }
    IssuerUrl::new(trimmed.to_owned()).unwrap_or(issuer)
}

/// Verifies impersonation tokens for one audience. As a
/// [`TokenResolver`], bindings accept its tokens as bearer credentials.
#[derive(Clone)]
pub struct TokenVerifier {
    issuer: IssuerUrl,
    audience: String,
    keys: Keys,
    max_lifetime: Duration,
    api: Arc<dyn ImpersonationApi>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("issuer", &self.issuer.as_str())
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier that reads the issuer's keys from its ring (the issuer
    /// runs in this process; see [`crate::Issuer::verifier`]).
    pub(crate) fn with_ring(
        issuer: IssuerUrl,
        audience: String,
        ring: KeyRing,
        max_lifetime: Duration,
        api: Arc<dyn ImpersonationApi>,
    ) -> Self {
        Self {
            issuer,
            audience,
            keys: Keys::Ring(ring),
            max_lifetime,
            api,
        }
    }

    /// A verifier for a resource server in another process that fetches
    /// the issuer's JWKS (`{issuer}/jwks.json`) now, and again as
    /// [`crate::Provider`] does for its provider: when a token names a key
    /// it lacks (a [`KeyRing::rotate`] on the issuer; at most every 30 s),
    /// and once the keys are older than [`crate::JWKS_MAX_AGE`] (a key the
    /// issuer retired is refused within that; see
    /// [`TokenVerifier::jwks_max_age`]). `http` as from
    /// [`crate::http_client`].
    pub async fn fetch(
        issuer: IssuerUrl,
        audience: impl Into<String>,
        http: openidconnect::reqwest::Client,
        max_lifetime: Duration,
        api: Arc<dyn ImpersonationApi>,
    ) -> Result<Self, crate::OidcError> {
        let issuer = as_issued(issuer);
        let url = format!("{}/{}", issuer.as_str(), crate::paths::JWKS);
        let uri = openidconnect::JsonWebKeySetUrl::new(url)
            .map_err(|e| crate::OidcError::Config(format!("issuer JWKS address: {e}")))?;
        let keys = crate::jwks::Jwks::fetch("issuer", uri, http)
            .await
            .map_err(|e| crate::OidcError::Provider(e.to_string()))?;
        Ok(Self {
            issuer,
            audience: audience.into(),
            keys: Keys::Fetched(keys),
            max_lifetime,
            api,
        })
    }

    /// How long a fetched JWKS ([`TokenVerifier::fetch`]) is trusted
    /// before it is fetched again (default [`crate::JWKS_MAX_AGE`], ten
    /// minutes). Other verifiers have nothing to fetch.
    #[must_use]
    pub fn jwks_max_age(mut self, max_age: std::time::Duration) -> Self {
        if let Keys::Fetched(keys) = self.keys {
            self.keys = Keys::Fetched(keys.max_age(max_age));
        }
        self
    }

    /// A verifier for a resource server of its own, with a fixed key set:
    /// the issuer's JWKS (as published at `{issuer}/jwks.json`), the
    /// audience this server is, and the service whose store holds the
    /// sessions. The keys are never fetched again: after the issuer
    /// rotates, its new tokens are refused here until this verifier is
    /// built again; [`TokenVerifier::fetch`] follows rotations itself.
    pub fn new(
        issuer: IssuerUrl,
        audience: impl Into<String>,
        jwks: openidconnect::core::CoreJsonWebKeySet,
        max_lifetime: Duration,
        api: Arc<dyn ImpersonationApi>,
    ) -> Self {
        Self {
            issuer: as_issued(issuer),
            audience: audience.into(),
            keys: Keys::Fixed(jwks),
            max_lifetime,
            api,
        }
    }

    /// The audience this verifier accepts.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Checks the type (`typ: at+jwt`), signature, algorithm, key id,
    /// `iss`, `aud`, `exp`, `nbf`, `iat` and the lifetime bound, and reads
    /// `sub`, the current actor and `sid`. Does not ask the store: see [`TokenVerifier::authorize`].
    ///
    /// A verifier built by [`TokenVerifier::fetch`] checks against the
    /// keys it holds; [`TokenVerifier::authorize`] also fetches them again
    /// when they are old or the token names a key they lack.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        self.verify_typed(token, self.api.now(), Typ::AccessToken)
    }

    /// For revocation only: also an untyped token, as this issuer signed
    /// them before 2026-12-05, so that a client holding one can still end
    /// its session (which would otherwise block its next exchange until
    /// the session lapsed). Ending a session is all such a token can do.
    pub(crate) fn verify_for_revocation(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<VerifiedToken, TokenError> {
        self.verify_typed(token, now, Typ::UntypedOrAccessToken)
    }

    fn verify_typed(
        &self,
        token: &str,
        now: OffsetDateTime,
        typ: Typ,
    ) -> Result<VerifiedToken, TokenError> {
        let keys = match &self.keys {
            Keys::Ring(ring) => ring.jwks(),
            Keys::Fixed(keys) => keys.clone(),
            Keys::Fetched(keys) => keys.cached().0,
        };
        self.verify_with(token, now, keys, typ)
    }

    /// [`TokenVerifier::verify`], fetching a rotated or aged JWKS first
    /// for a verifier built by [`TokenVerifier::fetch`].
    async fn verify_fresh(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let Keys::Fetched(jwks) = &self.keys else {
            return self.verify(token);
        };
        let now = self.api.now();
        jwks.verify(token, |keys| {
            self.verify_with(token, now, keys, Typ::AccessToken)
        })
        .await
    }

    fn verify_with(
        &self,
        token: &str,
        now: OffsetDateTime,
        keys: openidconnect::core::CoreJsonWebKeySet,
        typ: Typ,
    ) -> Result<VerifiedToken, TokenError> {
        let claims = verify::<ImpersonationClaims>(
            token,
            Expect {
                issuer: &self.issuer,
                audience: &self.audience,
                keys,
                now,
                max_lifetime: self.max_lifetime,
                typ,
                kid_required: true,
            },
        )?;
        let extra = claims.additional_claims();
        if prior_actors(&extra.act) > MAX_PRIOR_ACTORS {
            return Err(TokenError::Malformed(format!(
                "more than {MAX_PRIOR_ACTORS} prior actors"
            )));
        }
        let subject = UserId::new(claims.subject().as_str())
            .map_err(|e| TokenError::Malformed(format!("sub: {e}")))?;
        let actor = UserId::new(extra.act.sub.as_str())
            .map_err(|e| TokenError::Malformed(format!("act.sub: {e}")))?;
        let session: SessionId = extra
            .sid
            .parse()
            .map_err(|_| TokenError::Malformed("sid is not a session id".into()))?;
        let expires_at = OffsetDateTime::from_unix_timestamp(claims.expiration().timestamp())
            .map_err(|e| TokenError::Malformed(format!("exp: {e}")))?;
        Ok(VerifiedToken {
            subject,
            actor,
            session,
            expires_at,
            client_id: extra.client_id.clone(),
        })
    }

    /// [`TokenVerifier::verify`], then the session: it must still be active
    /// (the same checks as a cookie's session: stop, expiry, idleness,
    /// revocation, the policy re-check) and belong to the token's agent and
    /// customer. Returns the same context the cookie path gives.
    pub async fn authorize(&self, token: &str) -> Result<Context, TokenError> {
        self.authorize_with(token, false).await
    }

    /// [`TokenVerifier::authorize`] for a request that only reads: the
    /// session may come from this process's reuse map
    /// ([`impersonation_core::Impersonation::resolve_session_reusing`]);
    /// the token itself is verified every time.
    pub async fn authorize_for_read(&self, token: &str) -> Result<Context, TokenError> {
        self.authorize_with(token, true).await
    }

    async fn authorize_with(&self, token: &str, reuse: bool) -> Result<Context, TokenError> {
        let verified = self.verify_fresh(token).await?;
        let resolved = if reuse {
            self.api.resolve_session_reusing(verified.session).await
        } else {
            self.api.resolve_session(verified.session).await
        };
        let ctx = resolved.map_err(|e| match e.http_status() {
            503 => TokenError::Unavailable(e.to_string()),
            _ => TokenError::Session(e.code().to_owned()),
        })?;
        if ctx.agent().id != verified.actor || *ctx.subject() != verified.subject {
            return Err(TokenError::Session(
                "the session belongs to another agent or customer".into(),
            ));
        }
        Ok(ctx)
    }

    /// Whether the token claims to come from this verifier's issuer (read
    /// without verifying: it only decides who should verify it). Only its
    /// `iss` is read: a token of this issuer whose other claims are
    /// malformed, or that is too long to verify, still claims to be one
    /// (and is refused by verification).
    pub fn is_from_issuer(&self, token: &str) -> bool {
        crate::jwt::names_issuer(token, self.issuer.as_str())
    }
}

#[async_trait]
impl TokenResolver for TokenVerifier {
    async fn resolve_token(&self, token: &str) -> Option<Result<Context, Error>> {
        self.resolve(token, false).await
    }

    async fn resolve_token_for_read(&self, token: &str) -> Option<Result<Context, Error>> {
        self.resolve(token, true).await
    }
}

impl TokenVerifier {
    /// [`TokenResolver`]'s answer: `None` for another issuer's token, a
    /// refusal as the core's error.
    async fn resolve(&self, token: &str, reuse: bool) -> Option<Result<Context, Error>> {
        // Another issuer's token (the agent's own access token, say) is
        // not an impersonation credential: the binding ignores it.
        if !self.is_from_issuer(token) {
            return None;
        }
        Some(self.authorize_with(token, reuse).await.map_err(|e| {
            // Debug, not Display: the error may quote the token's own
            // claims, and Debug escapes any line break in them.
            tracing::info!(error = ?e, "impersonation token refused");
            match e {
                TokenError::Unavailable(cause) => {
                    Error::Store(StoreError::unavailable_because(cause))
                }
                _ => Error::Unauthenticated,
            }
        }))
    }
}
