//! Session bearer secrets: 256 random bits the client holds, of which stores keep only a hash.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::ChainKey;

const PREFIX: &str = "imp1";
const ROUTE_HEX: usize = 16;
const SECRET_B64: usize = 43; // 32 bytes, base64url without padding
/// Length of a session token in characters.
pub const TOKEN_LEN: usize = PREFIX.len() + 1 + ROUTE_HEX + 1 + SECRET_B64;

/// Why a presented token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The token is not of the form `imp1.<route>.<secret>`.
    #[error("malformed session token")]
    Malformed,
    /// The operating system's random source failed.
    #[error("the random source failed")]
    Random,
}

/// A session's bearer secret as the client holds it: `imp1.<route>.<secret>`.
///
/// `route` is a non-secret 64-bit digest of the session's audit chain (the
/// agent), so a sharded store (Redis Cluster) can find the session's slot from
/// the token alone; `secret` is 256 random bits. `Debug` and `Display` print
/// nothing of it; [`SessionSecret::expose`] is the one way to read it, for
/// setting a cookie or a header.
///
/// ```
/// use impersonation_core::{SessionSecret, ChainKey, UserId};
/// let secret = SessionSecret::generate(&ChainKey::for_agent(&UserId::from(1_u64))).unwrap();
/// assert_eq!(format!("{secret:?}"), "SessionSecret(<redacted>)");
/// let again = SessionSecret::parse(secret.expose()).unwrap();
/// assert_eq!(again.hash(), secret.hash());
/// ```
pub struct SessionSecret {
    token: SecretString,
    hash: SecretHash,
}

impl SessionSecret {
    /// A fresh secret routed to the given chain.
    pub fn generate(chain: &ChainKey) -> Result<Self, SecretError> {
        let mut bytes = [0_u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| SecretError::Random)?;
        let token = format!(
            "{PREFIX}.{}.{}",
            chain.route(),
            URL_SAFE_NO_PAD.encode(bytes)
        );
        let hash = SecretHash::of_bytes(&bytes);
        Ok(Self {
            token: SecretString::from(token),
            hash,
        })
    }

    /// Whether `text` is written as a session secret (it starts with
    /// `imp1.`), whether or not it parses: how a binding tells a session
    /// secret from another bearer credential (a signed token, say) before
    /// parsing it.
    pub fn is_marked(text: &str) -> bool {
        text.trim()
            .strip_prefix(PREFIX)
            .is_some_and(|rest| rest.starts_with('.'))
    }

    /// Parses a token presented by a client (cookie or header).
    pub fn parse(token: &str) -> Result<Self, SecretError> {
        let token = token.trim();
        if token.len() != TOKEN_LEN {
            return Err(SecretError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(prefix), Some(route), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SecretError::Malformed);
        };
        let route_ok = route.len() == ROUTE_HEX
            && route
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if prefix != PREFIX || !route_ok || secret.len() != SECRET_B64 {
            return Err(SecretError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(secret)
            .map_err(|_| SecretError::Malformed)?;
        if bytes.len() != 32 {
            return Err(SecretError::Malformed);
        }
        Ok(Self {
            token: SecretString::from(token.to_owned()),
            hash: SecretHash::of_bytes(&bytes),
        })
    }

    /// The token text, for a cookie or an `Authorization` header. Never log it.
    pub fn expose(&self) -> &str {
        self.token.expose_secret()
    }

    /// The non-secret routing part (hex digest of the chain key).
    pub fn route(&self) -> &str {
        self.token
            .expose_secret()
            .get(PREFIX.len() + 1..PREFIX.len() + 1 + ROUTE_HEX)
            .unwrap_or("")
    }

    /// The hash stores keep.
    pub fn hash(&self) -> SecretHash {
        self.hash
    }

    /// What a store looks a presented secret up by: its hash, and the
    /// non-secret route that lets a sharded store find the slot at once.
    pub fn lookup(&self) -> SecretLookup {
        SecretLookup {
            hash: self.hash,
            route: self.route().to_owned(),
        }
    }
}

/// How a store finds the session of a presented secret: the secret's hash
/// (what the store keeps) and the token's routing part (16 hex characters,
/// the digest of the session's chain key; see [`ChainKey::route`]). Neither
/// reveals the secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SecretLookup {
    /// SHA-256 of the secret.
    pub hash: SecretHash,
    /// The route the token carries.
    pub route: String,
}

impl fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

impl fmt::Display for SessionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// SHA-256 of a session secret's random bytes: what stores keep and look up by.
///
/// A plain hash suffices because the secret has 256 bits of entropy: nothing
/// can be guessed from its hash, and lookup by hash avoids comparing secrets
/// in variable time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    fn of_bytes(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        let mut out = [0_u8; 32];
        out.copy_from_slice(&digest);
        Self(out)
    }

    /// Wraps stored bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hash's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        base16ct::lower::encode_string(&self.0)
    }

    /// Parses lower- or upper-case hex.
    pub fn from_hex(text: &str) -> Result<Self, SecretError> {
        let mut out = [0_u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(|_| SecretError::Malformed)?;
        Ok(Self(out))
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell hashes apart in a test failure.
        write!(f, "SecretHash({}…)", &self.to_hex()[..8])
    }
}

impl From<SecretHash> for String {
    fn from(hash: SecretHash) -> String {
        hash.to_hex()
    }
}

impl TryFrom<String> for SecretHash {
    type Error = SecretError;
    fn try_from(text: String) -> Result<Self, SecretError> {
        Self::from_hex(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::UserId;

    fn chain() -> ChainKey {
        ChainKey::for_agent(&UserId::from(9_u64))
    }

    #[test]
    fn generated_secrets_are_unique_and_round_trip() {
        let a = SessionSecret::generate(&chain()).unwrap();
        let b = SessionSecret::generate(&chain()).unwrap();
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.expose().len(), TOKEN_LEN);
        assert_eq!(SessionSecret::parse(a.expose()).unwrap().hash(), a.hash());
        assert_eq!(a.route(), chain().route());
    }

    #[test]
    fn debug_and_display_print_nothing_of_the_secret() {
        let a = SessionSecret::generate(&chain()).unwrap();
        let secret_part = a.expose().rsplit('.').next().unwrap().to_owned();
        for shown in [format!("{a:?}"), format!("{a}"), format!("{:?}", a.hash())] {
            assert!(!shown.contains(&secret_part), "{shown}");
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = SessionSecret::generate(&chain())
            .unwrap()
            .expose()
            .to_owned();
        let cases = [
            String::new(),
            "imp1..".into(),
            good.replacen("imp1", "imp2", 1),
            good.replace('.', "!"),
            format!("{good}."),
            good[..good.len() - 1].to_owned() + "*",
            good.to_uppercase(),
        ];
        for case in cases {
            assert_eq!(
                SessionSecret::parse(&case).err(),
                Some(SecretError::Malformed),
                "{case}"
            );
        }
    }

    #[test]
    fn secrets_are_told_from_other_bearer_tokens_by_their_mark() {
        let good = SessionSecret::generate(&chain()).unwrap();
        assert!(SessionSecret::is_marked(good.expose()));
        // Marked but malformed: still a secret (refused by `parse`).
        assert!(SessionSecret::is_marked("imp1.."));
        for other in [
            "",
            "imp1",
            "imp2.x.y",
            "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
            "imp1x.a.b",
        ] {
            assert!(!SessionSecret::is_marked(other), "{other}");
        }
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let h = SessionSecret::generate(&chain()).unwrap().hash();
        assert_eq!(SecretHash::from_hex(&h.to_hex()), Ok(h));
        assert!(SecretHash::from_hex("zz").is_err());
    }
}
