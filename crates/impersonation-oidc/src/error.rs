//! Errors: the token endpoint's RFC 6749 §5.2 error responses, and the
//! refusals of the verifier and the client.

use std::fmt;

use serde::Serialize;

/// The `error` codes of RFC 6749 §5.2 (and RFC 8693 §2.2.2) the token
/// endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A parameter is missing, repeated, malformed or not supported; or,
    /// as RFC 8693 §2.2.2 has it, the actor or subject token is invalid,
    /// expired or not trusted, or the impersonation policy refused the
    /// pair ("unacceptable based on policy").
    InvalidRequest,
    /// Client authentication failed (HTTP 401).
    InvalidClient,
    /// RFC 6749's code for a grant that is invalid. The token-exchange
    /// endpoint does not answer with it (RFC 8693 §2.2.2 asks for
    /// `invalid_request`); other grants' servers do.
    InvalidGrant,
    /// The client may not use this grant type; or (revocation, RFC 7009
    /// §2.1) the token it asks to revoke was issued to another client.
    UnauthorizedClient,
    /// The grant type is not token exchange.
    UnsupportedGrantType,
    /// The requested audience or resource is not one the client may ask for.
    InvalidTarget,
    /// The requested `scope` is malformed, or exceeds what the agent may
    /// grant.
    InvalidScope,
    /// The server cannot serve the request now (store or provider outage).
    TemporarilyUnavailable,
}

impl ErrorCode {
    /// The wire form (`invalid_grant`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidTarget => "invalid_target",
            Self::InvalidScope => "invalid_scope",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
        }
    }

    /// The HTTP status the token endpoint answers with.
    pub const fn http_status(self) -> u16 {
        match self {
            Self::InvalidClient => 401,
            Self::TemporarilyUnavailable => 503,
            _ => 400,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused token request, as RFC 6749 §5.2 describes it. The description
/// never carries a token or a secret; a policy refusal carries the core's
/// denial code (`denied: protected_role`, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{error}: {error_description}")]
pub struct OAuthError {
    /// The error code.
    pub error: ErrorCode,
    /// What went wrong, for the client's developer.
    pub error_description: String,
}

/// RFC 6749's `NQCHAR` (appendix A): printable ASCII but space, `"` and
/// `\\`, the characters of a scope token; an error description may hold
/// these and spaces.
pub(crate) fn is_nqchar(c: char) -> bool {
    matches!(c, '!'..='~') && c != '"' && c != '\\'
}

/// `text` with every character RFC 6749 §5.2 does not allow in an error
/// description (outside printable ASCII, `"` and `\\`) turned into `?`.
pub(crate) fn printable(text: String) -> String {
    let allowed = |c: char| c == ' ' || is_nqchar(c);
    if text.chars().all(allowed) {
        text
    } else {
        text.chars()
            .map(|c| if allowed(c) { c } else { '?' })
            .collect()
    }
}

impl OAuthError {
    /// An error with a description. A description may quote what the
    /// client sent, so any character RFC 6749 §5.2 does not allow in one
    /// (outside printable ASCII, `"` and `\\`) becomes `?`: no line break
    /// or control character reaches the response or a log line.
    pub fn new(error: ErrorCode, description: impl Into<String>) -> Self {
        Self {
            error,
            error_description: printable(description.into()),
        }
    }

    /// The HTTP status to answer with.
    pub fn http_status(&self) -> u16 {
        self.error.http_status()
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        // Two plain strings: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// Why a presented impersonation token was refused (the binding answers 401,
/// or 503 for [`TokenError::Unavailable`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a compact JWS with three parts, or its header or claims are
    /// malformed (including an `act` nested too deeply to read).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature, algorithm or key id did not verify.
    #[error("signature rejected: {0}")]
    Signature(String),
    /// `iss`, `aud`, `exp`, `nbf` or the lifetime bound did not hold.
    #[error("claims rejected: {0}")]
    Claims(String),
    /// The session the token names is not active any more, or no longer
    /// matches the token (stopped, expired, revoked, another agent).
    #[error("session ended or unknown: {0}")]
    Session(String),
    /// The store or the provider could not be reached: fail closed.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Why building or using an issuer, verifier or client failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OidcError {
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A key could not be generated, read or used.
    #[error("key: {0}")]
    Key(String),
    /// An OpenID provider could not be reached or answered nonsense.
    #[error("provider: {0}")]
    Provider(String),
    /// The provider refused a token exchange (the client part), with its
    /// RFC 6749 §5.2 `error` and description.
    #[error("the provider refused the exchange: {error}: {description}")]
    Refused {
        /// The provider's `error` code.
        error: String,
        /// Its `error_description`, if any.
        description: String,
    },
    /// The provider's token could not be verified (the client part).
    #[error("the provider's token did not verify: {0}")]
    Token(TokenError),
}

#[cfg(test)]
mod tests {
    use super::{ErrorCode, OAuthError};

    #[test]
    fn a_description_carries_no_line_break_quote_or_control_character() {
        let e = OAuthError::new(
            ErrorCode::InvalidRequest,
            "subject_token_type: x\n2025-01-01T00:00:00Z INFO token issued\r\u{7}\"q\" \\ é",
        );
        assert_eq!(
            e.error_description,
            "subject_token_type: x?2025-01-01T00:00:00Z INFO token issued???q? ? ?"
        );
        let plain = OAuthError::new(
            ErrorCode::InvalidGrant,
            "denied: protected_role (the target is protected)",
        );
        assert_eq!(
            plain.error_description,
            "denied: protected_role (the target is protected)"
        );
    }
}
