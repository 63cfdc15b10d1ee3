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
use crate::jwt::{Expect, unverified_payload, verify};
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

    /// A verifier for a resource server of its own: the issuer's JWKS (as
    /// published at `{issuer}/jwks.json`), the audience this server is,
    /// and the service whose store holds the sessions.
    pub fn new(
        issuer: IssuerUrl,
        audience: impl Into<String>,
        jwks: openidconnect::core::CoreJsonWebKeySet,
        max_lifetime: Duration,
        api: Arc<dyn ImpersonationApi>,
    ) -> Self {
        Self {
            issuer,
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

    /// Checks signature, algorithm, key id, `iss`, `aud`, `exp`, `nbf`,
    /// `iat` and the lifetime bound, and reads `sub`, the current actor and
    /// `sid`. Does not ask the store: see [`TokenVerifier::authorize`].
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        self.verify_at(token, self.api.now())
    }

    /// [`TokenVerifier::verify`] as of `now`.
    pub(crate) fn verify_at(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<VerifiedToken, TokenError> {
        let keys = match &self.keys {
            Keys::Ring(ring) => ring.jwks(),
            Keys::Fixed(keys) => keys.clone(),
        };
        let claims = verify::<ImpersonationClaims>(
            token,
            Expect {
                issuer: &self.issuer,
                audience: &self.audience,
                keys,
                now,
                max_lifetime: self.max_lifetime,
                access_token_type: false,
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
        let verified = self.verify(token)?;
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
    /// without verifying: it only decides who should verify it).
    pub fn is_from_issuer(&self, token: &str) -> bool {
        unverified_payload(token)
            .ok()
            .and_then(|p| p.iss)
            .is_some_and(|iss| iss == self.issuer.as_str())
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
