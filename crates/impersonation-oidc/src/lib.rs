//! # impersonation-oidc
//!
//! RFC 8693 token exchange for the impersonation SDK, on the `openidconnect`
//! crate, for API-first products and for teams whose identity provider
//! already speaks OpenID Connect.
//!
//! * [`Issuer`]: a framework-agnostic token endpoint. A support agent's
//!   client sends the agent's own access token as `actor_token` and names
//!   the customer (`requested_subject`, or a `subject_token`), with a
//!   `reason`. The issuer authenticates the client, verifies the agent's
//!   token against the app's OpenID provider ([`Provider`]: discovery and
//!   JWKS), runs the impersonation policy and starts the session (with its
//!   audit event), and returns a short-lived RS256 JWT: `sub` the customer,
//!   `act: {sub: agent}` (RFC 8693 §4.1), `sid` the session, `aud`, `exp`
//!   no later than the session's end. No refresh token. Refusals are RFC
//!   6749 §5.2 errors, a policy refusal with the core's denial code. It
//!   publishes its discovery document and JWKS, and rotates keys
//!   ([`KeyRing`]: two keys live, three while the next is announced
//!   ahead of signing, `kid` chosen).
//! * [`TokenVerifier`]: for resource servers. Checks the signature (by
//!   `kid`, RS256 only), `iss`, `aud`, `exp`, `nbf`, `iat` and a lifetime
//!   bound, reads the top-level claims and the current actor, then resolves
//!   the session: a change asks the store whether it is still active, and a
//!   read may reuse the session as this process resolved it within
//!   `Config::reuse_interval` (its audit write checks the store again). So
//!   stop and revocation take effect on the next change, the next audited
//!   read, and every request once the reuse interval is over; an end made by
//!   this process, at once. It is a
//!   [`TokenResolver`](impersonation_core::TokenResolver): bindings accept
//!   its tokens as bearer credentials and yield the same context as the
//!   cookie path.
//!
//! ```no_run
//! use std::sync::Arc;
//! use impersonation_core::{Impersonation, MemoryDirectory, MemoryStore};
//! use impersonation_oidc::{ClientRegistration, Issuer, IssuerConfig, KeyRing, Provider, SigningKey};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let service = Arc::new(Impersonation::new(MemoryStore::new(), MemoryDirectory::new()));
//! let provider = Provider::discover(
//!     "https://login.example.com",        // the app's own OpenID provider
//!     "https://api.example.com",          // what agents' tokens must be addressed to
//!     impersonation_oidc::http_client()?,
//! )
//! .await?;
//! let issuer = Issuer::new(
//!     IssuerConfig::new("https://api.example.com/impersonation")?
//!         .client(ClientRegistration::new("support-console", "s3cret", ["https://api.example.com"]))
//!         // Only the console's own tokens, granting a scope only it gets,
//!         // may start an impersonation (not any app the agent uses).
//!         .require_actor_client("support-console-ui")
//!         .require_actor_scope("impersonate")?,
//!     KeyRing::new(SigningKey::generate()?),
//!     provider,
//!     service.clone(),
//! );
//! // Mount issuer.exchange(..) at POST {issuer}/token, issuer.jwks_json() and
//! // issuer.discovery_json() at their paths (see `paths`), and give the
//! // binding the verifier:
//! let verifier = issuer.verifier("https://api.example.com");
//! # let _ = verifier;
//! # Ok(()) }
//! ```
//!
//! ## Feature flags
//!
//! - `rustls-tls` (default): HTTPS to providers through rustls.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod claims;
mod client;
mod error;
mod issuer;
mod jwks;
mod jwt;
mod keys;
mod provider;
mod request;
mod verifier;

pub use claims::{ActorClaim, ExternalClaims, ImpersonationClaims, ImpersonationToken};
pub use client::{ExchangeClient, ExchangedToken, ExternalExchange};
pub use error::{ErrorCode, OAuthError, OidcError, TokenError};
pub use issuer::{
    ClientRegistration, DEFAULT_TOKEN_LIFETIME, Issuer, IssuerConfig, TokenEndpointResponse, paths,
};
pub use jwt::MAX_TOKEN_LEN;
pub use keys::{KeyRing, SigningKey};
pub use provider::{JWKS_MAX_AGE, Provider, http_client};
pub use request::{
    ACCESS_TOKEN_TYPE, ClientCredentials, ExchangeRequest, ID_TOKEN_TYPE, JWT_TOKEN_TYPE, MAX_BODY,
    MAX_TARGETS, MAX_VALUE, RevocationRequest, Subject, TOKEN_EXCHANGE,
};
pub use verifier::{MAX_PRIOR_ACTORS, TokenVerifier, VerifiedToken};

/// Re-exported so apps and tests name the same types.
pub use openidconnect;
