//! The issuer: a framework-agnostic token-exchange endpoint that turns an
//! agent's access token into a short-lived impersonation token, after the
//! impersonation policy has allowed it and the session (with its audit
//! event) has started. It also publishes its discovery document and JWKS.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use impersonation_core::{
    Denial, Error, ImpersonationApi, Initiator, Requester, StartRequest, UserId,
};
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClientAuthMethod, CoreGenderClaim,
    CoreGrantType, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm, CoreResponseMode, CoreResponseType,
    CoreSubjectIdentifierType,
};
use openidconnect::{
    AdditionalProviderMetadata, Audience, AuthUrl, IdTokenClaims, IssuerUrl, JsonWebKey,
    JsonWebKeySetUrl, PrivateSigningKey, StandardClaims, SubjectIdentifier, TokenUrl,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::{Duration, OffsetDateTime};

use crate::claims::{
    ActorChain, ActorClaim, ActorTokenClaims, ImpersonationClaims, MayActClaim, SubjectClaims,
};
use crate::error::{ErrorCode, OAuthError, OidcError};
use crate::jwt::{ACCESS_TOKEN_JWT_TYPE, MAX_TOKEN_LEN, to_chrono};
use crate::keys::KeyRing;
use crate::provider::Provider;
use crate::request::{
    ACCESS_TOKEN_TYPE, ClientCredentials, ExchangeRequest, ID_TOKEN_TYPE, JWT_TOKEN_TYPE,
    RevocationRequest, Subject, TOKEN_EXCHANGE,
};
use crate::verifier::{MAX_PRIOR_ACTORS, TokenVerifier};

/// Default lifetime of an impersonation token (never past its session's end).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::minutes(5);

/// Where the issuer's endpoints live, relative to its issuer URL.
pub mod paths {
    /// The token-exchange endpoint.
    pub const TOKEN: &str = "token";
    /// The revocation endpoint (RFC 7009): ends the token's session.
    pub const REVOKE: &str = "revoke";
    /// The JWKS.
    pub const JWKS: &str = "jwks.json";
    /// The discovery document (`/.well-known/openid-configuration`).
    pub const DISCOVERY: &str = ".well-known/openid-configuration";
    /// Listed because OpenID discovery requires one; this issuer has no
    /// authorization flow, so it answers `unsupported_response_type`.
    pub const AUTHORIZE: &str = "authorize";
}

/// A client allowed to call the token endpoint.
#[derive(Clone)]
pub struct ClientRegistration {
    id: String,
    secret_hash: [u8; 32],
    audiences: Vec<String>,
    may_exchange: bool,
}

impl std::fmt::Debug for ClientRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRegistration")
            .field("id", &self.id)
            .field("audiences", &self.audiences)
            .field("may_exchange", &self.may_exchange)
            .finish_non_exhaustive()
    }
}

impl ClientRegistration {
    /// A confidential client with its secret (kept only as a SHA-256 hash)
    /// and the audiences it may ask tokens for (the first is the default).
    pub fn new(
        id: impl Into<String>,
        secret: &str,
        audiences: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            id: id.into(),
            secret_hash: Sha256::digest(secret.as_bytes()).into(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            may_exchange: true,
        }
    }

    /// Registered, but not for token exchange (its requests get
    /// `unauthorized_client`).
    #[must_use]
    pub fn without_token_exchange(mut self) -> Self {
        self.may_exchange = false;
        self
    }

    fn secret_matches(&self, secret: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        bool::from(presented.ct_eq(&self.secret_hash))
    }
}

/// The issuer's settings.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    issuer: IssuerUrl,
    token_lifetime: Duration,
    clients: Vec<ClientRegistration>,
    /// The scopes every actor token must grant.
    actor_scopes: Vec<String>,
    /// The clients an actor token may have been issued to (none: any).
    actor_clients: Vec<String>,
}

impl IssuerConfig {
    /// An issuer at `issuer` (an `https` URL in production; its endpoints
    /// hang below it, see [`paths`]).
    pub fn new(issuer: &str) -> Result<Self, OidcError> {
        let issuer = IssuerUrl::new(issuer.trim_end_matches('/').to_owned())
            .map_err(|e| OidcError::Config(format!("issuer URL: {e}")))?;
        Ok(Self {
            issuer,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            clients: Vec::new(),
            actor_scopes: Vec::new(),
            actor_clients: Vec::new(),
        })
    }

    /// Registers a client.
    #[must_use]
    pub fn client(mut self, client: ClientRegistration) -> Self {
        self.clients.push(client);
        self
    }

    /// How long an issued token lives (at most; never past its session's
    /// end), in whole seconds as a JWT's times are: a fraction is rounded
    /// up, and anything under a second is one.
    #[must_use]
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        let whole = lifetime
            .whole_seconds()
            .saturating_add(i64::from(lifetime.subsec_nanoseconds() > 0));
        self.token_lifetime = Duration::seconds(whole.max(1));
        self
    }

    /// Takes as an actor token only an access token that grants `scope`
    /// (its `scope` claim, RFC 9068 §2.2.3, as one of its space-separated
    /// values; without one, a provider's `scp`, string or array): a scope
    /// the provider gives only to the support console, say `impersonate`.
    /// By default any of the agent's access tokens for the provider's
    /// audience serves, so any app the agent signed in to with that
    /// audience could start an impersonation as them. Called again, every
    /// scope named is required. A token without one gets `invalid_request`
    /// naming it. A scope that is not one scope value (empty, or with a
    /// space, a quote or a backslash: RFC 6749 §3.3) is a configuration
    /// error.
    pub fn require_actor_scope(mut self, scope: impl Into<String>) -> Result<Self, OidcError> {
        let scope = scope.into();
        if scope.is_empty()
            || !scope
                .bytes()
                .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
        {
            return Err(OidcError::Config(format!(
                "actor scope {scope:?}: not one scope value (RFC 6749 §3.3)"
            )));
        }
        self.actor_scopes.push(scope);
        Ok(self)
    }

    /// Takes as an actor token only one issued to `client`: the first of
    /// its `client_id` (RFC 9068 §2.2), `azp`, `cid` (Okta) and `appid`
    /// (Microsoft Entra ID v1) that it has names the client. Called again,
    /// each client named is taken. By default a token issued to any client
    /// serves.
    #[must_use]
    pub fn require_actor_client(mut self, client: impl Into<String>) -> Self {
        self.actor_clients.push(client.into());
        self
    }

    /// Whether an actor token is one this issuer takes: it grants the
    /// required scope and was issued to a required client.
    fn actor_token_allowed(
        &self,
        actor: &IdTokenClaims<ActorTokenClaims, CoreGenderClaim>,
    ) -> Result<(), OAuthError> {
        let claims = actor.additional_claims();
        if let Some(scope) = self.actor_scopes.iter().find(|s| !claims.grants_scope(s)) {
            return Err(oauth(
                ErrorCode::InvalidRequest,
                format!("actor_token: it does not grant the scope `{scope}` this issuer requires"),
            ));
        }
        if !self.actor_clients.is_empty() {
            let azp = actor.authorized_party().map(|azp| azp.as_str());
            if !claims
                .client(azp)
                .is_some_and(|id| self.actor_clients.iter().any(|c| c == id))
            {
                return Err(oauth(
                    ErrorCode::InvalidRequest,
                    "actor_token: it was not issued to a client this issuer takes actor tokens from",
                ));
            }
        }
        Ok(())
    }
}

/// Discovery metadata beyond OpenID's: where to revoke (RFC 8414).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct RevocationMetadata {
    revocation_endpoint: String,
}

impl AdditionalProviderMetadata for RevocationMetadata {}

type ProviderMetadata = openidconnect::ProviderMetadata<
    RevocationMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// An HTTP answer of the token endpoint, for the binding to send as it is.
/// Its `Debug` leaves out the body of a success, which holds the token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEndpointResponse {
    /// The status code.
    pub status: u16,
    /// Headers to set (`Content-Type`, `Cache-Control: no-store`, and on a
    /// failed client authentication, `invalid_client`, `WWW-Authenticate`).
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: String,
}

impl std::fmt::Debug for TokenEndpointResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = if self.status == 200 {
            "<redacted: holds the token>"
        } else {
            self.body.as_str()
        };
        f.debug_struct("TokenEndpointResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &body)
            .finish()
    }
}

/// The success body of RFC 8693 §2.2.1. No `Debug`: it holds the token.
#[derive(Serialize)]
struct Issued<'a> {
    access_token: String,
    issued_token_type: &'a str,
    token_type: &'a str,
    expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

/// The token-exchange issuer.
#[derive(Clone)]
pub struct Issuer {
    config: Arc<IssuerConfig>,
    keys: KeyRing,
    provider: Provider,
    api: Arc<dyn ImpersonationApi>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.config.issuer.as_str())
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Refuses a token whose own header contradicts the type its request
/// declares for it (`actor_token_type`, `subject_token_type`): one declared
/// an ID token that types itself an access token (`typ: at+jwt`, RFC 9068
/// §2.1) is invalid (RFC 8693 §2.2.2), whatever its signature, so that one
/// token does not serve as either kind as the client says. (An ID token
/// declared an access token carries no such mark; a provider held to
/// [`Provider::require_typed_access_tokens`] refuses it.)
fn declared_type_holds(field: &str, declared: &str, token: &str) -> Result<(), OAuthError> {
    if declared == ID_TOKEN_TYPE && crate::jwt::typed_as_access_token(token) {
        return Err(oauth(
            ErrorCode::InvalidRequest,
            format!(
                "{field}: declared an ID token, but the token is typed as an access token \
                 (typ {ACCESS_TOKEN_JWT_TYPE}); declare `{ACCESS_TOKEN_TYPE}`"
            ),
        ));
    }
    Ok(())
}

fn oauth(error: ErrorCode, description: impl Into<String>) -> OAuthError {
    OAuthError::new(error, description)
}

/// Which RFC error a policy refusal is: `invalid_scope` for a scope beyond
/// the agent's permissions, `invalid_request` for the rest (a malformed
/// reason or ticket, and, per RFC 8693 §2.2.2, a pair the policy refuses).
fn denial_error(denial: &Denial) -> OAuthError {
    let code = match denial {
        Denial::ReasonRequired
        | Denial::ReasonTooShort
        | Denial::ReasonTooLong
        | Denial::ReasonInvalidCharacters
        | Denial::TicketRequired
        | Denial::TicketInvalid => ErrorCode::InvalidRequest,
        Denial::ScopeExceedsAgent => ErrorCode::InvalidScope,
        // RFC 8693 §2.2.2: tokens "unacceptable based on policy" are
        // `invalid_request`, as the request's own faults are.
        _ => ErrorCode::InvalidRequest,
    };
    oauth(code, format!("denied: {} ({denial})", denial.code()))
}

impl Issuer {
    /// An issuer signing with `keys`, trusting `provider` for agents'
    /// tokens, and starting sessions through `api`.
    pub fn new(
        config: IssuerConfig,
        keys: KeyRing,
        provider: Provider,
        api: impl ImpersonationApi,
    ) -> Self {
        Self {
            config: Arc::new(config),
            keys,
            provider,
            api: Arc::new(api),
        }
    }

    /// The issuer URL (`iss` of its tokens).
    pub fn issuer(&self) -> &IssuerUrl {
        &self.config.issuer
    }

    /// The key ring (rotate it to roll keys).
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.config.issuer.as_str())
    }

    /// A verifier for tokens addressed to `audience`, reading this issuer's
    /// keys (so it sees rotations at once).
    pub fn verifier(&self, audience: impl Into<String>) -> TokenVerifier {
        TokenVerifier::with_ring(
            self.config.issuer.clone(),
            audience.into(),
            self.keys.clone(),
            self.config.token_lifetime,
            Arc::clone(&self.api),
        )
    }

    /// The JWKS document (public keys only).
    pub fn jwks_json(&self) -> String {
        serde_json::to_string(&self.keys.jwks()).unwrap_or_else(|_| r#"{"keys":[]}"#.into())
    }

    /// The OpenID discovery document.
    pub fn discovery_json(&self) -> Result<String, OidcError> {
        let url = |path: &str| self.url(path);
        let metadata = ProviderMetadata::new(
            self.config.issuer.clone(),
            AuthUrl::new(url(paths::AUTHORIZE)).map_err(|e| OidcError::Config(e.to_string()))?,
            JsonWebKeySetUrl::new(url(paths::JWKS))
                .map_err(|e| OidcError::Config(e.to_string()))?,
            // None: the `authorize` endpoint is listed because OpenID
            // discovery requires one, and refuses every response type
            // (`["token"]` would advertise the implicit flow).
            Vec::new(),
            vec![CoreSubjectIdentifierType::Public],
            vec![CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256],
            RevocationMetadata {
                revocation_endpoint: url(paths::REVOKE),
            },
        )
        .set_token_endpoint(Some(
            TokenUrl::new(url(paths::TOKEN)).map_err(|e| OidcError::Config(e.to_string()))?,
        ))
        .set_grant_types_supported(Some(vec![CoreGrantType::Extension(
            TOKEN_EXCHANGE.to_owned(),
        )]))
        .set_token_endpoint_auth_methods_supported(Some(vec![
            CoreClientAuthMethod::ClientSecretBasic,
            CoreClientAuthMethod::ClientSecretPost,
        ]));
        serde_json::to_string(&metadata).map_err(|e| OidcError::Config(e.to_string()))
    }

    /// Answers a token request: `authorization` is the request's
    /// `Authorization` header, `body` its form body.
    pub async fn exchange(
        &self,
        authorization: Option<&str>,
        body: &[u8],
    ) -> TokenEndpointResponse {
        match self.issue(authorization, body).await {
            Ok(body) => TokenEndpointResponse {
                status: 200,
                headers: json_headers(),
                body,
            },
            Err(e) => Self::refusal(&e),
        }
    }

    fn authenticate(
        &self,
        credentials: &ClientCredentials,
    ) -> Result<&ClientRegistration, OAuthError> {
        // An empty secret is none (as one left out of a form is): a client
        // registered with one, its secret unset by mistake, does not turn
        // public through `Basic Y2xpZW50Og==` (`client:`).
        if credentials.secret.is_empty() {
            return Err(oauth(
                ErrorCode::InvalidClient,
                "client authentication is required",
            ));
        }
        // Every registration of the id is tried: one client registered twice,
        // with the old secret and the new, is how a secret is rotated.
        self.config
            .clients
            .iter()
            .filter(|c| c.id == credentials.id)
            .find(|c| c.secret_matches(&credentials.secret))
            .ok_or_else(|| oauth(ErrorCode::InvalidClient, "unknown client or wrong secret"))
    }

    /// Answers a revocation request (RFC 7009): the client authenticates and
    /// names one of its impersonation tokens; the token's session stops, on
    /// its agent's behalf (audited as stopped by the agent), so every token
    /// of that session stops working. An invalid token gets 200, as the
    /// RFC asks (§2.2); a valid one issued to another client is refused
    /// with `unauthorized_client` (§2.1), and ends nothing.
    pub async fn revoke(&self, authorization: Option<&str>, body: &[u8]) -> TokenEndpointResponse {
        let outcome = async {
            let request = RevocationRequest::parse(body)?;
            let credentials =
                ClientCredentials::from_parts(authorization, request.form_client.as_ref())?;
            let client = self.authenticate(&credentials)?;
            // An expired token still names its session, which may live on
            // (a token lasts minutes, a session an hour), and no second
            // token is issued while it does: its client may end it. Such a
            // token is verified as of a second before it expired, so its
            // signature and every other claim are checked as ever.
            let now = self.api.now();
            let expired_at = crate::jwt::unverified_payload(&request.token)
                .ok()
                .and_then(|p| p.exp)
                .and_then(|exp| OffsetDateTime::from_unix_timestamp(exp).ok())
                .filter(|exp| *exp <= now);
            // Checked: the `exp` read so far is unverified, and may be the
            // earliest instant `time` holds.
            let at = expired_at
                .and_then(|exp| exp.checked_sub(Duration::seconds(1)))
                .unwrap_or(now);
            let verified = client.audiences.iter().find_map(|aud| {
                let verifier = self.verifier(aud.as_str());
                verifier.verify_for_revocation(&request.token, at).ok()
            });
            // An invalid token is answered 200 (RFC 7009 §2.2: the client
            // could do nothing with an error); a valid one issued to
            // another client is refused, and the client told (§2.1).
            let Some(verified) = verified else {
                return Ok(());
            };
            if verified.client_id.as_deref() != Some(client.id.as_str()) {
                return Err(oauth(
                    ErrorCode::UnauthorizedClient,
                    "the token was not issued to this client",
                ));
            }
            let Some(agent) = self
                .api
                .principal(&verified.actor)
                .await
                .map_err(|e| core_error(&e))?
            else {
                // The agent has left the directory (offboarded): the
                // session is revoked by the system, rather than answered
                // as revoked and left to its next policy re-check. One
                // agent has one live session at most.
                return self
                    .api
                    .revoke_all_for_agent(
                        &verified.actor,
                        Initiator::System,
                        "token revoked; its agent is not in the directory",
                    )
                    .await
                    .map(drop)
                    .map_err(|e| core_error(&e));
            };
            match self.api.stop_session(verified.session, &agent).await {
                Ok(_) | Err(Error::Ended(_) | Error::Unauthenticated) => Ok(()),
                Err(e) => Err(core_error(&e)),
            }
        }
        .await;
        match outcome {
            Ok(()) => TokenEndpointResponse {
                status: 200,
                headers: json_headers(),
                body: "{}".into(),
            },
            Err(e) => Self::refusal(&e),
        }
    }

    fn refusal(e: &OAuthError) -> TokenEndpointResponse {
        let mut headers = json_headers();
        // A 401 names the scheme it asks for (RFC 9110 §15.5.2), whichever
        // way the client tried: HTTP Basic is the one accepted here.
        if e.error == ErrorCode::InvalidClient {
            headers.push(("WWW-Authenticate", r#"Basic realm="token""#.into()));
        }
        tracing::info!(error = %e.error, description = %e.error_description, "token request refused");
        TokenEndpointResponse {
            status: e.http_status(),
            headers,
            body: e.to_json(),
        }
    }

    async fn issue(&self, authorization: Option<&str>, body: &[u8]) -> Result<String, OAuthError> {
        let request = ExchangeRequest::parse(body)?;
        let credentials = ClientCredentials::from_request(authorization, &request)?;
        let client = self.authenticate(&credentials)?;
        if !client.may_exchange {
            return Err(oauth(
                ErrorCode::UnauthorizedClient,
                "this client may not use token exchange",
            ));
        }
        let audiences = self.audiences(client, &request)?;
        declared_type_holds(
            "actor_token",
            &request.actor_token_type,
            &request.actor_token,
        )?;
        if let Subject::Token { token, token_type } = &request.subject {
            declared_type_holds("subject_token", token_type, token)?;
        }
        let now = self.api.now();
        let (agent_id, actor) = self
            .provider
            .user_and_claims::<ActorTokenClaims>(&request.actor_token, now)
            .await
            .map_err(|e| token_error("actor_token", &e))?;
        // A token that itself names an actor stands for someone acting as
        // its `sub`: taking that `sub` for the agent would run the policy
        // with another person's rights and put them on the trail.
        if actor.additional_claims().act.is_some() {
            return Err(oauth(
                ErrorCode::InvalidRequest,
                "actor_token: a delegated token (it names an actor); present the agent's own",
            ));
        }
        self.config.actor_token_allowed(&actor)?;
        let (target, prior) = match &request.subject {
            Subject::Requested(id) => (
                UserId::new(id.as_str()).map_err(|e| {
                    oauth(ErrorCode::InvalidRequest, format!("requested_subject: {e}"))
                })?,
                None,
            ),
            Subject::Token { token, .. } => {
                let (target, subject) = self
                    .provider
                    .user_and_claims::<SubjectClaims>(token, now)
                    .await
                    .map_err(|e| token_error("subject_token", &e))?;
                if let Some(may_act) = &subject.additional_claims().may_act {
                    may_act_allows(may_act, &actor)?;
                }
                let prior = subject
                    .additional_claims()
                    .act
                    .as_ref()
                    .map(|act| prior_actors(act, subject.issuer()))
                    .transpose()?;
                (target, prior)
            }
        };
        let agent = self
            .api
            .principal(&agent_id)
            .await
            .map_err(|e| core_error(&e))?
            .ok_or_else(|| {
                oauth(
                    ErrorCode::InvalidRequest,
                    "the agent is not a user of this app",
                )
            })?;
        let mut start =
            StartRequest::new(target.clone(), request.reason.clone().unwrap_or_default());
        start.ticket = request.ticket.clone();
        // A scope narrows the session to those permissions (with
        // `no_escalation`, the policy refuses one beyond the agent's).
        if let Some(scope) = request.scope.as_deref() {
            start = start.scope(scope_tokens(scope)?);
        }
        let started = self
            .api
            .start(Requester::User(&agent), start)
            .await
            .map_err(|e| core_error(&e))?;
        let expires_at = now
            .checked_add(self.config.token_lifetime)
            .map_or(started.session.expires_at, |end| {
                end.min(started.session.expires_at)
            });
        // The `scope` the token and the answer carry is what the session
        // grants: the asked-for permissions the shadow user holds (the
        // customer's, cut by the policy), never only what the client asked.
        let scope = request.scope.as_ref().map(|_| {
            let granted: Vec<&str> = started
                .session
                .shadow
                .permissions()
                .iter()
                .map(|p| p.as_str())
                .collect();
            granted.join(" ")
        });
        let signed = self.sign(
            &target,
            &agent_id,
            &audiences,
            now,
            expires_at,
            started.session.id,
            &client.id,
            scope.as_deref(),
            prior,
        );
        let refused = match (&signed, scope.as_deref()) {
            (Err(e), _) => Some((e.clone(), "no token could be issued for it")),
            // RFC 6749 §3.3: a scope holds at least one token; none of the
            // asked-for permissions is the customer's (or all are withheld).
            (Ok(_), Some("")) => Some((
                oauth(
                    ErrorCode::InvalidScope,
                    "the session would grant none of the permissions asked for",
                ),
                "it granted none of the permissions asked for",
            )),
            _ => None,
        };
        if let Some((e, why)) = refused {
            // No client will ever hold this session: ended now, by the
            // system, rather than leave the agent refused new ones until
            // it lapses.
            if let Err(end) = self
                .api
                .revoke_all_for_agent(&agent.id, Initiator::System, why)
                .await
            {
                tracing::warn!(
                    impersonation.session = %started.session.id,
                    error = %end,
                    "a session no token was issued for could not be ended"
                );
            }
            return Err(e);
        }
        let token = signed?;
        tracing::info!(
            impersonation.agent = %agent_id,
            impersonation.subject = %target,
            impersonation.session = %started.session.id,
            client = %client.id,
            "impersonation token issued"
        );
        let issued_token_type = match request.requested_token_type.as_deref() {
            Some(JWT_TOKEN_TYPE) => JWT_TOKEN_TYPE,
            _ => ACCESS_TOKEN_TYPE,
        };
        serde_json::to_string(&Issued {
            access_token: token,
            issued_token_type,
            token_type: "Bearer",
            expires_in: (expires_at - now).whole_seconds().max(0),
            scope: scope.as_deref(),
        })
        .map_err(|e| oauth(ErrorCode::TemporarilyUnavailable, e.to_string()))
    }

    /// The audiences asked for (`audience` and `resource` alike), each one
    /// the client may ask for; none asked: the client's default.
    fn audiences(
        &self,
        client: &ClientRegistration,
        request: &ExchangeRequest,
    ) -> Result<Vec<String>, OAuthError> {
        let asked: Vec<&String> = request.audiences.iter().chain(&request.resources).collect();
        if asked.is_empty() {
            return client
                .audiences
                .first()
                .map(|a| vec![a.clone()])
                .ok_or_else(|| oauth(ErrorCode::InvalidTarget, "the client has no audience"));
        }
        let mut out: Vec<String> = Vec::new();
        for a in asked {
            if !client.audiences.contains(a) {
                // Not echoed: a client that put a token in the wrong
                // field would find it in the answer and the log.
                return Err(oauth(
                    ErrorCode::InvalidTarget,
                    "an `audience` or `resource` asked for is not one this client may ask for",
                ));
            }
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn sign(
        &self,
        subject: &UserId,
        agent: &UserId,
        audiences: &[String],
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
        session: impersonation_core::SessionId,
        client: &str,
        scope: Option<&str>,
        prior: Option<serde_json::Value>,
    ) -> Result<String, OAuthError> {
        let claims = openidconnect::IdTokenClaims::new(
            self.config.issuer.clone(),
            audiences.iter().cloned().map(Audience::new).collect(),
            to_chrono(expires_at),
            to_chrono(now),
            StandardClaims::<CoreGenderClaim>::new(SubjectIdentifier::new(
                subject.as_str().to_owned(),
            )),
            ImpersonationClaims {
                sid: session.to_string(),
                act: ActorClaim {
                    sub: agent.as_str().to_owned(),
                    iss: None,
                    act: prior,
                },
                jti: uuid::Uuid::now_v7().to_string(),
                nbf: Some(now.unix_timestamp()),
                client_id: Some(client.to_owned()),
                scope: scope.map(str::to_owned),
            },
        );
        let key = self.keys.current();
        let signing = |e: String| oauth(ErrorCode::TemporarilyUnavailable, format!("signing: {e}"));
        // Typed as an access token (RFC 9068 §2.1, `at+jwt`), which the
        // `openidconnect` crate's signer cannot say (it writes no `typ`):
        // so that no other JWT signed with these keys passes for one
        // (RFC 8725 §3.11). The signature is that crate's RS256.
        let signer = key.rsa_signer();
        let alg = CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256;
        let header = serde_json::json!({
            "alg": alg,
            "kid": signer.as_verification_key().key_id(),
            "typ": ACCESS_TOKEN_JWT_TYPE,
        });
        let payload = serde_json::to_vec(&claims).map_err(|e| signing(e.to_string()))?;
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = signer
            .sign(&alg, input.as_bytes())
            .map_err(|e| signing(e.to_string()))?;
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature));
        // A token no verifier of this crate would read (nor the revocation
        // endpoint) must not be handed out: refused, and its session ended.
        if token.len() > MAX_TOKEN_LEN {
            return Err(oauth(
                ErrorCode::InvalidRequest,
                format!(
                    "the token would be longer than {MAX_TOKEN_LEN} bytes (the subject token's delegation chain is too large)"
                ),
            ));
        }
        Ok(token)
    }
}

/// A subject token's own delegation chain (RFC 8693 §4.1), as the issued
/// token's prior actors. Each actor that names no issuer is given the
/// subject token's: their `sub` is that provider's identifier, not one of
/// this issuer's. A chain the issued token could not carry (more than
/// [`MAX_PRIOR_ACTORS`] in all) is refused.
fn prior_actors(act: &ActorChain, issuer: &IssuerUrl) -> Result<serde_json::Value, OAuthError> {
    let mut chain = act.0.clone();
    let mut depth = 0;
    let mut actor = Some(&mut chain);
    while let Some(serde_json::Value::Object(object)) = actor {
        depth += 1;
        if depth > MAX_PRIOR_ACTORS {
            return Err(oauth(
                ErrorCode::InvalidRequest,
                format!("subject_token: more than {MAX_PRIOR_ACTORS} actors in its act chain"),
            ));
        }
        object
            .entry("iss")
            .or_insert_with(|| serde_json::Value::String(issuer.as_str().to_owned()));
        actor = object.get_mut("act");
    }
    Ok(chain)
}

/// The permissions a `scope` names (RFC 6749 §3.3: scope tokens of
/// printable ASCII other than `"` and `\`, separated by single spaces).
fn scope_tokens(scope: &str) -> Result<Vec<&str>, OAuthError> {
    let tokens: Vec<&str> = scope.split(' ').collect();
    let well_formed = tokens
        .iter()
        .all(|t| !t.is_empty() && t.chars().all(crate::error::is_nqchar));
    if well_formed {
        Ok(tokens)
    } else {
        Err(oauth(
            ErrorCode::InvalidScope,
            "scope: expected permissions separated by single spaces",
        ))
    }
}

/// A subject token's `may_act` (RFC 8693 §4.4) narrows who may act for
/// the subject to one party: the actor token must name it (its `sub`, and
/// its issuer when `may_act` names one). The policy still decides after.
fn may_act_allows(
    may_act: &MayActClaim,
    actor: &IdTokenClaims<ActorTokenClaims, CoreGenderClaim>,
) -> Result<(), OAuthError> {
    let issuer = may_act.iss.as_deref().unwrap_or(actor.issuer().as_str());
    if may_act.sub == actor.subject().as_str() && issuer == actor.issuer().as_str() {
        Ok(())
    } else {
        Err(oauth(
            ErrorCode::InvalidRequest,
            "subject_token: may_act names another actor",
        ))
    }
}

fn json_headers() -> Vec<(&'static str, String)> {
    vec![
        ("Content-Type", "application/json".into()),
        ("Cache-Control", "no-store".into()),
        ("Pragma", "no-cache".into()),
    ]
}

/// A token refused, as the client hears it. Why the provider could not be
/// asked (its JWKS address, a network error naming hosts inside ours) is
/// the operator's business: it goes to the log, the client learns only
/// that it may try again.
fn token_error(which: &str, e: &crate::error::TokenError) -> OAuthError {
    match e {
        crate::error::TokenError::Unavailable(cause) => {
            tracing::warn!(token = which, cause = ?cause, "the identity provider could not be asked");
            oauth(
                ErrorCode::TemporarilyUnavailable,
                format!("{which}: the identity provider could not be reached; try again"),
            )
        }
        // RFC 8693 §2.2.2: a subject or actor token "invalid for any
        // reason" is `invalid_request`.
        other => oauth(ErrorCode::InvalidRequest, format!("{which}: {other}")),
    }
}

fn core_error(e: &Error) -> OAuthError {
    match e {
        Error::Denied(denial) => denial_error(denial),
        other if other.http_status() == 503 => {
            oauth(ErrorCode::TemporarilyUnavailable, other.code().to_owned())
        }
        other => oauth(ErrorCode::InvalidRequest, other.code().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TokenError;

    #[test]
    fn an_unreachable_provider_is_named_to_the_log_not_the_client() {
        let cause = "provider JWKS: error sending request for url (http://10.1.2.3:8080/jwks)";
        let answer = token_error("subject_token", &TokenError::Unavailable(cause.into()));
        assert_eq!(answer.error, ErrorCode::TemporarilyUnavailable);
        assert_eq!(
            answer.error_description,
            "subject_token: the identity provider could not be reached; try again"
        );
        let refused = token_error("actor_token", &TokenError::Claims("expired".into()));
        assert_eq!(refused.error, ErrorCode::InvalidRequest);
        assert_eq!(
            refused.error_description,
            "actor_token: claims rejected: expired"
        );
    }
}
