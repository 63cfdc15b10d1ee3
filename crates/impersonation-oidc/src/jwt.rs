//! One JWT check for every token this crate reads (its own impersonation
//! tokens, agents' access tokens, an external provider's tokens): shape and
//! size first, then the `openidconnect` crate's verifier (signature by
//! `kid`, algorithm allow-list, `iss`, `aud`, `exp`), then what that
//! verifier leaves out (`kid` required, `iat`, `nbf`, lifetime bound).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use openidconnect::core::{CoreGenderClaim, CoreJsonWebKeySet, CoreJwsSigningAlgorithm};
use openidconnect::{
    AdditionalClaims, ClaimsVerificationError, ClientId, IdToken, IdTokenClaims, IdTokenVerifier,
    IssuerUrl, JsonWebTokenType, Nonce,
};
use time::{Duration, OffsetDateTime};

use crate::error::TokenError;

/// Longest token accepted, in bytes: a bound on what a hostile client can
/// make the verifier parse.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// How far clocks may disagree when checking `iat` and `nbf`.
pub(crate) const LEEWAY: Duration = Duration::seconds(30);

/// The only signature algorithm accepted: no `none`, no HMAC (an RSA public
/// key can never be mistaken for a shared secret).
pub(crate) const ALLOWED_ALGS: [CoreJwsSigningAlgorithm; 1] =
    [CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256];

/// The JOSE type (`typ`) of an access token as a JWT (RFC 9068 §2.1).
pub(crate) const ACCESS_TOKEN_JWT_TYPE: &str = "at+jwt";

/// Which JOSE types (`typ`) a token may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Typ {
    /// A provider's ID and access tokens: `JWT`, `at+jwt`, or none.
    Any,
    /// This crate's impersonation tokens: `at+jwt` and nothing else
    /// (RFC 9068 §4), so that no other JWT signed with the same keys
    /// passes for one (RFC 8725 §3.11).
    AccessToken,
    /// At the revocation endpoint: `at+jwt`, or none (this issuer's tokens
    /// before they were typed).
    UntypedOrAccessToken,
}

/// What to check a token against.
pub(crate) struct Expect<'a> {
    pub(crate) issuer: &'a IssuerUrl,
    pub(crate) audience: &'a str,
    pub(crate) keys: CoreJsonWebKeySet,
    pub(crate) now: OffsetDateTime,
    /// The longest `exp - iat` accepted.
    pub(crate) max_lifetime: Duration,
    /// The `typ` the token may declare.
    pub(crate) typ: Typ,
    /// Refuse a token that names no key (`kid`). This crate's own tokens
    /// always name one; OpenID Connect lets a provider that publishes a
    /// single key leave it out (then that key must verify it).
    pub(crate) kid_required: bool,
}

pub(crate) fn to_chrono(at: OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(at.unix_timestamp(), 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Shape checks that need no parsing: size, three non-empty parts in
/// canonical base64url. Canonical: a last character with bits the bytes do
/// not use (the signature's last character can take four values that
/// decode to the same bytes) is refused, so that no token changed in one
/// character still verifies.
pub(crate) fn check_shape(token: &str) -> Result<(), TokenError> {
    use base64::Engine;
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("token too long".into()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(TokenError::Malformed(format!(
            "a signed JWT has 3 parts, this one {}",
            parts.len()
        )));
    }
    // The decoder refuses any byte outside the base64url alphabet, padding,
    // a length no encoding gives, and trailing bits.
    let base64url = |p: &&str| {
        !p.is_empty()
            && base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .is_ok()
    };
    if !parts.iter().all(base64url) {
        return Err(TokenError::Malformed("parts must be base64url".into()));
    }
    Ok(())
}

/// The refusal, in words that name no configured value: openidconnect's
/// messages for a wrong `iss` or `aud` quote the expected one ("expected
/// `https://idp.internal…`"), which would tell a client our provider's or
/// audiences' addresses. What was expected goes to the debug log.
fn claims_error(e: ClaimsVerificationError) -> TokenError {
    let plain = |what: &str, detail: &str| {
        tracing::debug!(detail, "{what}");
        TokenError::Claims(what.to_owned())
    };
    match e {
        ClaimsVerificationError::SignatureVerification(e) => TokenError::Signature(e.to_string()),
        ClaimsVerificationError::Unsupported(e) => TokenError::Malformed(e),
        ClaimsVerificationError::InvalidIssuer(detail) => {
            plain("not from the expected issuer", &detail)
        }
        ClaimsVerificationError::InvalidAudience(detail) => {
            plain("not addressed to the expected audience", &detail)
        }
        other => TokenError::Claims(other.to_string()),
    }
}

/// Verifies `token` and returns its claims.
pub(crate) fn verify<AC: AdditionalClaims>(
    token: &str,
    expect: Expect<'_>,
) -> Result<IdTokenClaims<AC, CoreGenderClaim>, TokenError> {
    check_shape(token)?;
    let parsed = IdToken::<
        AC,
        CoreGenderClaim,
        openidconnect::core::CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    >::from_str(token)
    .map_err(|e| TokenError::Malformed(e.to_string()))?;
    // The verifier picks the key by `kid`; with one published key it would
    // accept a token without one, which this crate never issues. With
    // several, a token without one is ambiguous: refused either way.
    let header = unverified_header(token)?;
    let names_key = header.kid.as_deref().is_some_and(|kid| !kid.is_empty());
    if !names_key && (expect.kid_required || expect.keys.keys().len() != 1) {
        return Err(TokenError::Signature("the token names no key (kid)".into()));
    }
    let access_token = JsonWebTokenType::new(ACCESS_TOKEN_JWT_TYPE.into());
    let types = match expect.typ {
        Typ::Any => vec![JsonWebTokenType::new("JWT".into()), access_token],
        Typ::AccessToken => {
            // openidconnect's verifier lets a token without `typ` through.
            if header.typ.is_none() {
                return Err(TokenError::Malformed(format!(
                    "not typed as an access token (typ {ACCESS_TOKEN_JWT_TYPE})"
                )));
            }
            vec![access_token]
        }
        Typ::UntypedOrAccessToken => vec![access_token],
    };
    let now = to_chrono(expect.now);
    let verifier = IdTokenVerifier::new_public_client(
        ClientId::new(expect.audience.to_owned()),
        expect.issuer.clone(),
        expect.keys,
    )
    .set_allowed_algs(ALLOWED_ALGS)
    .set_allowed_jose_types(types.iter().filter_map(|t| t.normalize().ok()))
    // Extra audiences are fine for access tokens (a resource list).
    .set_other_audience_verifier_fn(|_| true)
    .set_time_fn(move || now);
    let claims = parsed
        .into_claims(&verifier, |_: Option<&Nonce>| Ok(()))
        .map_err(claims_error)?;
    let iat = claims.issue_time().timestamp();
    let exp = claims.expiration().timestamp();
    let now_s = expect.now.unix_timestamp();
    if iat > now_s + LEEWAY.whole_seconds() {
        return Err(TokenError::Claims("issued in the future".into()));
    }
    // `nbf` (RFC 7519 §4.1.5), which the OpenID crate does not read, on
    // every token: the signature is verified, so the payload may be read.
    let not_before: NotBefore = payload(token)?;
    if not_before
        .nbf
        .is_some_and(|nbf| nbf > (now_s + LEEWAY.whole_seconds()) as f64)
    {
        return Err(TokenError::Claims("not valid yet (nbf)".into()));
    }
    if exp.saturating_sub(iat) > expect.max_lifetime.whole_seconds() {
        return Err(TokenError::Claims(format!(
            "lifetime of {} s exceeds the {} s allowed",
            exp.saturating_sub(iat),
            expect.max_lifetime.whole_seconds()
        )));
    }
    Ok(claims)
}

/// A verified payload's `nbf` (a NumericDate, which may have a fraction;
/// `null` is none, and refuses the token, not one without).
#[derive(Debug, serde::Deserialize)]
struct NotBefore {
    #[serde(default, deserialize_with = "crate::claims::present")]
    nbf: Option<f64>,
}

/// The parts of a JOSE header this crate reads before verification.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct RawHeader {
    #[serde(default)]
    pub(crate) kid: Option<String>,
    #[serde(default)]
    pub(crate) typ: Option<String>,
}

pub(crate) fn unverified_header(token: &str) -> Result<RawHeader, TokenError> {
    let part = token.split('.').next().unwrap_or_default();
    decode_part(part)
}

/// The unverified payload's `exp`, never for a decision (the revocation
/// endpoint reads it to tell an expired token from a live one before it
/// verifies the token).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct RawPayload {
    #[serde(default)]
    pub(crate) exp: Option<i64>,
}

/// Reads it from a token of the right shape only ([`check_shape`]), so
/// that no oversized token is decoded.
pub(crate) fn unverified_payload(token: &str) -> Result<RawPayload, TokenError> {
    check_shape(token)?;
    payload(token)
}

/// Whether `token`'s payload names `issuer` as its `iss`, read without
/// verifying, to decide who verifies it and nothing more. Only `iss` is
/// read, from any JSON object (an `exp` of the wrong type, a claim
/// [`RawPayload`] could not read, and tokens over [`MAX_TOKEN_LEN`] up to
/// [`MAX_ROUTED_LEN`] still name their issuer): a token of this issuer
/// that fails verification is refused (401), not handed on as someone
/// else's.
pub(crate) fn names_issuer(token: &str, issuer: &str) -> bool {
    if token.len() > MAX_ROUTED_LEN {
        return false;
    }
    let Some(part) = token.split('.').nth(1) else {
        return false;
    };
    // Every other claim is skipped unread (not built into a value): the
    // host's own tokens come this way on each request.
    #[derive(serde::Deserialize)]
    struct Iss {
        #[serde(default)]
        iss: Option<serde_json::Value>,
    }
    decode_part::<Iss>(part)
        .ok()
        .and_then(|payload| payload.iss)
        .is_some_and(|iss| iss.as_str() == Some(issuer))
}

/// Whether `token`'s header types it as an access token (`typ: at+jwt`,
/// RFC 9068 §2.1), read without verifying and normalised as the verifier
/// reads `typ` (case, the optional `application/` prefix).
pub(crate) fn typed_as_access_token(token: &str) -> bool {
    let access_token = JsonWebTokenType::new(ACCESS_TOKEN_JWT_TYPE.into()).normalize();
    unverified_header(token)
        .ok()
        .and_then(|header| header.typ)
        .and_then(|typ| JsonWebTokenType::new(typ).normalize().ok())
        .is_some_and(|typ| access_token.is_ok_and(|at| at == typ))
}

/// The longest bearer value [`names_issuer`] reads: far above any token
/// this crate verifies ([`MAX_TOKEN_LEN`]), so that an oversized one of
/// this issuer is refused as such; beyond it a value is not read at all.
pub(crate) const MAX_ROUTED_LEN: usize = 64 * 1024;

/// The payload of `token` (its second part), read as `T`: for a decision
/// only once the signature is verified.
fn payload<T: serde::de::DeserializeOwned>(token: &str) -> Result<T, TokenError> {
    decode_part(token.split('.').nth(1).unwrap_or_default())
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed("not base64url".into()))?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    fn with_typ(typ: &str) -> String {
        let header = serde_json::json!({"alg": "RS256", "typ": typ}).to_string();
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(&header), b64("{}"))
    }

    /// `typ` is read as the verifier reads it: case aside, and with or
    /// without its `application/` prefix.
    #[test]
    fn an_access_token_is_known_by_its_typ_however_written() {
        for typ in ["at+jwt", "AT+JWT", "application/at+jwt"] {
            assert!(super::typed_as_access_token(&with_typ(typ)), "{typ}");
        }
        for typ in ["JWT", "id+jwt", ""] {
            assert!(!super::typed_as_access_token(&with_typ(typ)), "{typ}");
        }
        assert!(!super::typed_as_access_token("not a token"));
    }
}
