//! The token-exchange request (RFC 8693 §2.1) and client authentication
//! (RFC 6749 §2.3.1), parsed strictly: bounded sizes, no repeated
//! parameter, every refusal an RFC 6749 §5.2 error.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::error::{ErrorCode, OAuthError};

/// `grant_type` of a token exchange.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Token type of an OAuth access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Token type of a JWT.
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Token type of an OpenID Connect ID token.
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";

/// Largest request body read, in bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest parameter value (tokens included), in bytes.
pub const MAX_VALUE: usize = 8 * 1024;
/// Most `audience` plus `resource` values in one request.
pub const MAX_TARGETS: usize = 8;

/// Who the token is to be about: the customer. Its `Debug` leaves the
/// token out.
#[derive(Clone, PartialEq, Eq)]
pub enum Subject {
    /// A token the provider issued about the customer (`subject_token`).
    Token {
        /// The token.
        token: String,
        /// Its type (`subject_token_type`).
        token_type: String,
    },
    /// The customer's id (`requested_subject`, Keycloak's legacy form).
    Requested(String),
}

/// A parsed token-exchange request.
#[derive(Clone, PartialEq, Eq)]
pub struct ExchangeRequest {
    /// The customer.
    pub subject: Subject,
    /// The agent's own access token (`actor_token`).
    pub actor_token: String,
    /// Its type (`actor_token_type`).
    pub actor_token_type: String,
    /// `audience` values, in order.
    pub audiences: Vec<String>,
    /// `resource` values, in order.
    pub resources: Vec<String>,
    /// `scope`, if given.
    pub scope: Option<String>,
    /// `requested_token_type`, if given.
    pub requested_token_type: Option<String>,
    /// Why the agent impersonates (this SDK's extension; the policy needs it).
    pub reason: Option<String>,
    /// The support ticket (extension).
    pub ticket: Option<String>,
    /// `client_id` and `client_secret` sent in the body (`client_secret_post`).
    pub form_client: Option<(String, Option<String>)>,
}

impl std::fmt::Debug for Subject {
    // A subject token is a bearer credential: it never reaches a Debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Token { token_type, .. } => f
                .debug_struct("Token")
                .field("token", &"<redacted>")
                .field("token_type", token_type)
                .finish(),
            Subject::Requested(id) => f.debug_tuple("Requested").field(id).finish(),
        }
    }
}

impl std::fmt::Debug for ExchangeRequest {
    // Tokens and secrets never reach a Debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let subject = match &self.subject {
            Subject::Token { token_type, .. } => format!("subject_token of type {token_type}"),
            Subject::Requested(id) => format!("requested_subject {id:?}"),
        };
        f.debug_struct("ExchangeRequest")
            .field("subject", &subject)
            .field("actor_token_type", &self.actor_token_type)
            .field("audiences", &self.audiences)
            .field("resources", &self.resources)
            .field("scope", &self.scope)
            .field("requested_token_type", &self.requested_token_type)
            .field("reason", &self.reason)
            .field("ticket", &self.ticket)
            .field("form_client", &self.form_client.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

fn invalid(description: impl Into<String>) -> OAuthError {
    OAuthError::new(ErrorCode::InvalidRequest, description)
}

const TOKEN_TYPES: [&str; 3] = [ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, ID_TOKEN_TYPE];

/// Parameters that may appear once at most (RFC 6749 §3.2); `audience` and
/// `resource` may repeat (RFC 8693 §2.1).
const SINGLE: [&str; 13] = [
    "grant_type",
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "requested_subject",
    "scope",
    "requested_token_type",
    "reason",
    "ticket",
    "client_id",
    "client_secret",
    "client_assertion",
];

/// A form body read strictly, the same way for every endpoint: bounded
/// body and values, UTF-8, each parameter of `single` once at most, those
/// of `repeatable` at most `max_repeated` times together; unknown
/// parameters ignored (RFC 6749 §3.2).
struct Form {
    single: Vec<(&'static str, String)>,
    repeated: Vec<(&'static str, String)>,
}

impl Form {
    fn parse(
        body: &[u8],
        single: &[&'static str],
        repeatable: &[&'static str],
        max_repeated: usize,
    ) -> Result<Self, OAuthError> {
        if body.len() > MAX_BODY {
            return Err(invalid(format!("the body exceeds {MAX_BODY} bytes")));
        }
        if std::str::from_utf8(body).is_err() {
            return Err(invalid("the body is not UTF-8"));
        }
        // Nor may an escape in one of ours decode to something that is
        // not: the form decoder would make it U+FFFD, and two different
        // values (a secret among them) the same. An unknown parameter's
        // value is ignored, whatever it holds.
        for pair in body.split(|&b| b == b'&') {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &[][..]),
            };
            let name = percent_encoding::percent_decode(name).decode_utf8_lossy();
            if let Some(known) = single.iter().chain(repeatable).find(|k| **k == name)
                && percent_encoding::percent_decode(value)
                    .decode_utf8()
                    .is_err()
            {
                return Err(invalid(format!(
                    "`{known}` is not UTF-8 once percent-decoded"
                )));
            }
        }
        let mut form = Self {
            single: Vec::new(),
            repeated: Vec::new(),
        };
        for (name, value) in form_urlencoded::parse(body) {
            // "Parameters sent without a value MUST be treated as if they
            // were omitted from the request" (RFC 6749 §3.1, §3.2): an
            // empty `audience=` asks for no audience, and an empty `scope=`
            // beside a real one is no second scope.
            if value.is_empty() {
                continue;
            }
            if value.len() > MAX_VALUE {
                // A parameter of ours is named; any other name is the
                // client's text, which no answer repeats.
                return Err(invalid(
                    match single.iter().chain(repeatable).find(|k| **k == name) {
                        Some(known) => format!("`{known}` exceeds {MAX_VALUE} bytes"),
                        None => format!("a parameter's value exceeds {MAX_VALUE} bytes"),
                    },
                ));
            }
            if let Some(known) = repeatable.iter().find(|k| **k == name) {
                form.repeated.push((known, value.into_owned()));
                if form.repeated.len() > max_repeated {
                    return Err(invalid(format!(
                        "at most {max_repeated} {} values",
                        repeatable.join(" and ")
                    )));
                }
            } else if let Some(known) = single.iter().find(|k| **k == name) {
                if form.single.iter().any(|(k, _)| k == known) {
                    return Err(invalid(format!("`{known}` appears more than once")));
                }
                form.single.push((known, value.into_owned()));
            }
        }
        Ok(form)
    }

    /// A single parameter's value; an empty one counts as absent.
    fn take(&self, name: &str) -> Option<String> {
        self.single
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }

    /// A repeatable parameter's values, in order.
    fn all(&self, name: &str) -> Vec<String> {
        self.repeated
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl ExchangeRequest {
    /// Parses an `application/x-www-form-urlencoded` body.
    pub fn parse(body: &[u8]) -> Result<Self, OAuthError> {
        let form = Form::parse(body, &SINGLE, &["audience", "resource"], MAX_TARGETS)?;
        let take = |name: &str| form.take(name);
        match take("grant_type").as_deref() {
            None => return Err(invalid("`grant_type` is required")),
            Some(TOKEN_EXCHANGE) => {}
            Some(_) => {
                return Err(OAuthError::new(
                    ErrorCode::UnsupportedGrantType,
                    "only token exchange is supported here",
                ));
            }
        }
        if take("client_assertion").is_some() {
            return Err(assertion_refused());
        }
        let token_type = |name: &str| -> Result<String, OAuthError> {
            let value = take(name).ok_or_else(|| invalid(format!("`{name}` is required")))?;
            if TOKEN_TYPES.contains(&value.as_str()) {
                Ok(value)
            } else {
                // The value is not echoed: a client that put a token in
                // the wrong field would see it in logs and answers.
                Err(invalid(format!(
                    "`{name}` names a token type that is not supported (supported: {})",
                    TOKEN_TYPES.join(", ")
                )))
            }
        };
        let subject = match (take("subject_token"), take("requested_subject")) {
            (Some(token), None) => Subject::Token {
                token,
                token_type: token_type("subject_token_type")?,
            },
            (None, Some(id)) => Subject::Requested(id),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give either `subject_token` or `requested_subject`, not both",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "`subject_token` or `requested_subject` names the customer",
                ));
            }
        };
        let actor_token = take("actor_token")
            .ok_or_else(|| invalid("`actor_token` (the agent's access token) is required"))?;
        let actor_token_type = token_type("actor_token_type")?;
        let requested_token_type = take("requested_token_type");
        if let Some(t) = &requested_token_type
            && t != ACCESS_TOKEN_TYPE
            && t != JWT_TOKEN_TYPE
        {
            // Not echoed: a client that put a token in the wrong field
            // would find it in the answer and the log.
            return Err(invalid(format!(
                "`requested_token_type`: only `{ACCESS_TOKEN_TYPE}` and `{JWT_TOKEN_TYPE}` are issued here"
            )));
        }
        let form_client = take("client_id").map(|id| (id, take("client_secret")));
        if form_client.is_none() && take("client_secret").is_some() {
            return Err(invalid("`client_secret` without `client_id`"));
        }
        Ok(Self {
            subject,
            actor_token,
            actor_token_type,
            audiences: form.all("audience"),
            resources: form.all("resource"),
            scope: take("scope"),
            requested_token_type,
            reason: take("reason"),
            ticket: take("ticket"),
            form_client,
        })
    }
}

/// The client's credentials, from the `Authorization` header or the body.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    /// The client id.
    pub id: String,
    /// The secret.
    pub secret: String,
    /// Whether they came in an `Authorization: Basic` header.
    pub basic: bool,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("id", &self.id)
            .field("basic", &self.basic)
            .finish_non_exhaustive()
    }
}

fn invalid_client(description: &str) -> OAuthError {
    OAuthError::new(ErrorCode::InvalidClient, description)
}

/// A client assertion (RFC 7523) is an authentication method this issuer
/// does not support: `invalid_client` (RFC 6749 §5.2), whether or not the
/// client also authenticated another way, at every endpoint.
fn assertion_refused() -> OAuthError {
    invalid_client(
        "client assertions are not supported; use client_secret_basic or client_secret_post",
    )
}

impl ClientCredentials {
    /// Reads `client_secret_basic` (RFC 6749 §2.3.1: the id and secret are
    /// form-urlencoded, then joined by `:` and base64-encoded) or
    /// `client_secret_post`; using both is refused.
    pub fn from_request(
        authorization: Option<&str>,
        request: &ExchangeRequest,
    ) -> Result<Self, OAuthError> {
        Self::from_parts(authorization, request.form_client.as_ref())
    }

    /// As [`ClientCredentials::from_request`], from the `Authorization`
    /// header and the body's `client_id` and `client_secret`, if any.
    pub fn from_parts(
        authorization: Option<&str>,
        form_client: Option<&(String, Option<String>)>,
    ) -> Result<Self, OAuthError> {
        match (authorization, form_client) {
            // A bare `client_id` beside the header is no second method
            // (many client libraries always send it): it must name the
            // header's client.
            (Some(header), Some((id, None))) => {
                let basic = Self::from_basic(header)?;
                if basic.id != *id {
                    return Err(invalid_client(
                        "the body's client_id is not the client the header authenticates",
                    ));
                }
                Ok(basic)
            }
            (Some(_), Some((_, Some(_)))) => Err(invalid(
                "authenticate the client one way only (header or body)",
            )),
            (Some(header), None) => Self::from_basic(header),
            (None, Some((id, Some(secret)))) => Ok(Self {
                id: id.clone(),
                secret: secret.clone(),
                basic: false,
            }),
            (None, Some((_, None))) | (None, None) => {
                Err(invalid_client("client authentication is required"))
            }
        }
    }

    fn from_basic(header: &str) -> Result<Self, OAuthError> {
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        let encoded = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Basic"))
            .map(|(_, credentials)| credentials)
            .ok_or_else(|| invalid_client("only HTTP Basic client authentication is accepted"))?;
        let decoded = STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| invalid_client("malformed Basic credentials"))?;
        let (id, secret) = decoded
            .split_once(':')
            .ok_or_else(|| invalid_client("malformed Basic credentials"))?;
        // Each half form-urlencoded (RFC 6749 §2.3.1): `+` a space, `%XX`
        // a byte, and every other character as it is, `&` and `=` too (a
        // client that did not encode its secret still sends all of it).
        let unescape = |s: &str| -> Result<String, OAuthError> {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(std::borrow::Cow::into_owned)
                .map_err(|_| invalid_client("malformed Basic credentials"))
        };
        Ok(Self {
            id: unescape(id)?,
            secret: unescape(secret)?,
            basic: true,
        })
    }
}

/// A token revocation request (RFC 7009 §2.1).
#[derive(Clone, PartialEq, Eq)]
pub struct RevocationRequest {
    /// The token to revoke.
    pub token: String,
    /// `client_id` and `client_secret` sent in the body.
    pub form_client: Option<(String, Option<String>)>,
}

impl std::fmt::Debug for RevocationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationRequest")
            .field("form_client", &self.form_client.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

impl RevocationRequest {
    /// Parses an `application/x-www-form-urlencoded` body.
    pub fn parse(body: &[u8]) -> Result<Self, OAuthError> {
        let form = Form::parse(
            body,
            &[
                "token",
                "token_type_hint",
                "client_id",
                "client_secret",
                "client_assertion",
            ],
            &[],
            0,
        )?;
        let take = |name: &str| form.take(name);
        if take("client_assertion").is_some() {
            return Err(assertion_refused());
        }
        let token = take("token").ok_or_else(|| invalid("`token` is required"))?;
        let form_client = take("client_id").map(|id| (id, take("client_secret")));
        // As at the token endpoint: a secret in the body without its id is
        // a second way to authenticate beside the header (RFC 6749 §2.3).
        if form_client.is_none() && take("client_secret").is_some() {
            return Err(invalid("`client_secret` without `client_id`"));
        }
        Ok(Self { token, form_client })
    }
}

#[cfg(test)]
mod tests {
    use super::{ACCESS_TOKEN_TYPE, ClientCredentials, ExchangeRequest, MAX_VALUE, Subject};

    /// A value too long is refused naming its parameter when it is one of
    /// the endpoint's; an unknown parameter's name (the client's text, up
    /// to the body's bound) is not repeated.
    #[test]
    fn a_value_too_long_names_only_a_known_parameter() {
        let long = "A".repeat(MAX_VALUE + 1);
        let refused =
            ExchangeRequest::parse(format!("subject_token={long}").as_bytes()).unwrap_err();
        assert_eq!(
            refused.error_description,
            format!("`subject_token` exceeds {MAX_VALUE} bytes")
        );
        let name = "N".repeat(4_000);
        let refused = ExchangeRequest::parse(format!("{name}={long}").as_bytes()).unwrap_err();
        assert_eq!(refused.error.as_str(), "invalid_request");
        assert_eq!(
            refused.error_description,
            format!("a parameter's value exceeds {MAX_VALUE} bytes")
        );
    }

    /// An authentication scheme's name is case-insensitive (RFC 9110
    /// §11.1): `basic` and `BASIC` are Basic; another scheme is not.
    #[test]
    fn basic_credentials_are_read_whatever_the_schemes_case() {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode("app:s%3Acret");
        for scheme in ["Basic", "basic", "BASIC"] {
            let read = ClientCredentials::from_basic(&format!("{scheme} {encoded}")).unwrap();
            assert_eq!((read.id.as_str(), read.secret.as_str()), ("app", "s:cret"));
        }
        assert!(ClientCredentials::from_basic(&format!("Bearer {encoded}")).is_err());
        assert!(ClientCredentials::from_basic("Basic").is_err());
    }

    /// Each half of Basic credentials is form-urlencoded (RFC 6749
    /// §2.3.1) and decoded whole: a `&` or `=` the client left as it is
    /// stays in the secret (it was once cut there), `+` is a space, and an
    /// escape that is not UTF-8 is malformed, not a lossy secret.
    #[test]
    fn basic_credentials_are_decoded_whole() {
        use base64::Engine;
        let basic = |pair: &[u8]| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            ClientCredentials::from_basic(&format!("Basic {encoded}"))
        };
        let read = basic(b"my+app:a&b=c%2B+d").unwrap();
        assert_eq!(
            (read.id.as_str(), read.secret.as_str()),
            ("my app", "a&b=c+ d")
        );
        let refused = basic(b"app:%FF%FE").unwrap_err();
        assert_eq!(refused.error.as_str(), "invalid_client");
    }

    /// A bare `client_id` in the body beside the Basic header is no second
    /// method (RFC 6749 §2.3.1 forbids two): accepted when it names the
    /// header's client; a body secret beside the header is refused.
    #[test]
    fn a_bare_client_id_beside_the_basic_header_must_name_its_client() {
        use base64::Engine;
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("app:secret")
        );
        let same = ("app".to_owned(), None);
        let read = ClientCredentials::from_parts(Some(&header), Some(&same)).unwrap();
        assert_eq!((read.id.as_str(), read.secret.as_str()), ("app", "secret"));
        let other = ("other".to_owned(), None);
        let refused = ClientCredentials::from_parts(Some(&header), Some(&other)).unwrap_err();
        assert_eq!(refused.error.as_str(), "invalid_client");
        let both = ("app".to_owned(), Some("secret".to_owned()));
        let refused = ClientCredentials::from_parts(Some(&header), Some(&both)).unwrap_err();
        assert_eq!(refused.error.as_str(), "invalid_request");
    }

    /// A parameter sent without a value counts as omitted (RFC 6749
    /// §3.1): an empty `audience` asks for none (the client's default
    /// then), an empty `scope` beside a real one is no repetition.
    #[test]
    fn an_empty_parameter_counts_as_omitted() {
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange\
             &requested_subject=olive&actor_token=a.b.c&actor_token_type={}\
             &audience=&resource=&scope=&scope=bookings%3Aread&reason=",
            ACCESS_TOKEN_TYPE.replace(':', "%3A"),
        );
        let parsed = super::ExchangeRequest::parse(body.as_bytes()).unwrap();
        assert!(parsed.audiences.is_empty(), "{:?}", parsed.audiences);
        assert!(parsed.resources.is_empty(), "{:?}", parsed.resources);
        assert_eq!(parsed.scope.as_deref(), Some("bookings:read"));
        assert_eq!(parsed.reason, None);
        // Two real values are still one too many.
        let twice = body.replace("&scope=&", "&scope=bookings%3Awrite&");
        let refused = super::ExchangeRequest::parse(twice.as_bytes()).unwrap_err();
        assert!(
            refused.error_description.contains("more than once"),
            "{refused:?}"
        );
    }

    /// A token put in `requested_token_type` by mistake stays out of the
    /// refusal (which reaches the client and the log).
    #[test]
    fn an_unknown_requested_token_type_is_not_echoed() {
        let token = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0.c2ln";
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange\
             &requested_subject=olive&actor_token=a.b.c\
             &actor_token_type={}&requested_token_type={token}",
            ACCESS_TOKEN_TYPE.replace(':', "%3A"),
        );
        let refused = super::ExchangeRequest::parse(body.as_bytes()).unwrap_err();
        assert_eq!(refused.error, crate::ErrorCode::InvalidRequest);
        assert!(refused.error_description.contains("requested_token_type"));
        assert!(
            !refused.error_description.contains("c2VjcmV0"),
            "{refused:?}"
        );
    }

    #[test]
    fn a_subjects_debug_output_leaves_its_token_out() {
        let subject = Subject::Token {
            token: "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0.c2ln".into(),
            token_type: ACCESS_TOKEN_TYPE.into(),
        };
        let shown = format!("{subject:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains(ACCESS_TOKEN_TYPE), "{shown}");
        let by_id = Subject::Requested("olive".into());
        assert_eq!(format!("{by_id:?}"), "Requested(\"olive\")");
    }
}
