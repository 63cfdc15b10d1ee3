//! Signing keys: RS256 keys with RFC 7638 thumbprints as `kid`, and a key
//! ring that signs with the current key while the previous one still
//! verifies (rotation without a gap).

use std::fmt;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openidconnect::core::{CoreJsonWebKey, CoreJsonWebKeySet, CoreRsaPrivateSigningKey};
use openidconnect::{JsonWebKeyId, PrivateSigningKey};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};

use crate::error::OidcError;

/// Bits of a generated RSA key.
const RSA_BITS: usize = 2048;

/// An RS256 signing key. Its `Debug` shows the key id only.
#[derive(Clone)]
pub struct SigningKey {
    signer: Arc<CoreRsaPrivateSigningKey>,
    public: CoreJsonWebKey,
    kid: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh 2048-bit RSA key from the operating system's random source.
    pub fn generate() -> Result<Self, OidcError> {
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, RSA_BITS)
            .map_err(|e| OidcError::Key(format!("generating an RSA key: {e}")))?;
        Self::from_rsa(&key)
    }

    /// A key from PEM text: PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8
    /// (`BEGIN PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> Result<Self, OidcError> {
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(pem)
            .or_else(|_| rsa::RsaPrivateKey::from_pkcs8_pem(pem))
            .map_err(|_| OidcError::Key("not an RSA private key in PEM form".into()))?;
        Self::from_rsa(&key)
    }

    fn from_rsa(key: &rsa::RsaPrivateKey) -> Result<Self, OidcError> {
        if key.size() * 8 < RSA_BITS {
            return Err(OidcError::Key(format!(
                "RSA keys need at least {RSA_BITS} bits"
            )));
        }
        let n = key.n().to_bytes_be();
        let e = key.e().to_bytes_be();
        let kid = thumbprint(&n, &e);
        let pem = key
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .map_err(|e| OidcError::Key(format!("encoding the key: {e}")))?;
        let signer = CoreRsaPrivateSigningKey::from_pem(&pem, Some(JsonWebKeyId::new(kid.clone())))
            .map_err(OidcError::Key)?;
        let public = signer.as_verification_key();
        Ok(Self {
            signer: Arc::new(signer),
            public,
            kid,
        })
    }

    /// The key id (`kid`): the key's RFC 7638 thumbprint.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, as a JWK.
    pub fn public_jwk(&self) -> &CoreJsonWebKey {
        &self.public
    }

    /// The key as the `openidconnect` crate signs with it, for an app that
    /// issues tokens of its own with it (`IdToken::new`, say).
    pub fn rsa_signer(&self) -> &CoreRsaPrivateSigningKey {
        &self.signer
    }
}

/// RFC 7638: SHA-256 over `{"e":…,"kty":"RSA","n":…}`, base64url.
fn thumbprint(n: &[u8], e: &[u8]) -> String {
    let canonical = format!(
        r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(e),
        URL_SAFE_NO_PAD.encode(n)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[derive(Debug, Clone)]
struct Keys {
    current: SigningKey,
    previous: Option<SigningKey>,
    /// Published ahead of signing ([`KeyRing::publish_next`]).
    next: Option<SigningKey>,
}

impl Keys {
    /// Whether a key of `kid` is published.
    fn publishes(&self, kid: &str) -> bool {
        [
            Some(&self.current),
            self.previous.as_ref(),
            self.next.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|k| k.kid == kid)
    }
}

/// The issuer's keys: tokens are signed with the current key; the JWKS
/// publishes it, the next key once [`publish_next`](Self::publish_next)
/// announces it, and after a rotation the previous one, so tokens signed
/// before the rotation keep verifying until they expire. Cheap to clone
/// (clones share the keys).
///
/// A rotation without notice is safe for this crate's own verifiers
/// (`TokenVerifier::fetch` fetches the key set again when a token names a
/// key it has not seen, at most every 30 s), but a verifier that keeps
/// the key set it fetched (for hours, say, or until restarted) refuses the
/// new key's tokens until it fetches again. So announce the next key at
/// least one such cache lifetime before rotating to it:
///
/// ```
/// # use impersonation_oidc::{KeyRing, SigningKey};
/// # fn main() -> Result<(), impersonation_oidc::OidcError> {
/// let ring = KeyRing::new(SigningKey::generate()?);
/// let next = SigningKey::generate()?;
/// ring.publish_next(next.clone()); // in the JWKS, signing nothing yet
/// // … a cache lifetime later:
/// ring.rotate(next); // signs from now on
/// // … once the last token of the previous key has expired:
/// ring.retire_previous();
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct KeyRing {
    keys: Arc<RwLock<Keys>>,
}

impl KeyRing {
    /// A ring with one key.
    pub fn new(current: SigningKey) -> Self {
        Self {
            keys: Arc::new(RwLock::new(Keys {
                current,
                previous: None,
                next: None,
            })),
        }
    }

    /// Makes `next` the signing key; the current one keeps verifying. The
    /// key signing now, given again (a reload of an unchanged key file),
    /// changes nothing: publishing one `kid` twice would make every token
    /// ambiguous to verify.
    pub fn rotate(&self, next: SigningKey) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if next.kid == keys.current.kid {
            return;
        }
        if keys.next.as_ref().is_some_and(|n| n.kid == next.kid) {
            keys.next = None;
        }
        let current = std::mem::replace(&mut keys.current, next);
        keys.previous = Some(current);
    }

    /// Publishes `next` in the JWKS ahead of signing with it, so that
    /// verifiers which keep the key set they fetched hold it before the
    /// first token it signs; [`rotate`](Self::rotate) with it later makes
    /// it sign. A key published already (the one signing, the previous,
    /// or the one waiting, given again) changes nothing; another key
    /// replaces the one waiting.
    pub fn publish_next(&self, next: SigningKey) {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if keys.publishes(&next.kid) {
            return;
        }
        keys.next = Some(next);
    }

    /// Stops publishing the previous key: once every token it signed has
    /// expired, and every session such a token was issued for has ended
    /// (at the latest, the policy's longest session after the rotation).
    /// A client ends its session by revoking its expired token, which only
    /// the key that signed it verifies: revoked after its key retired, the
    /// token is answered 200 as any invalid one, and its session lives on.
    pub fn retire_previous(&self) {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .previous = None;
    }

    /// The key that signs now.
    pub fn current(&self) -> SigningKey {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }

    /// The public keys: the current one first, then the next (if
    /// announced) and the previous (until retired).
    pub fn jwks(&self) -> CoreJsonWebKeySet {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let mut published = vec![keys.current.public.clone()];
        published.extend(keys.next.as_ref().map(|k| k.public.clone()));
        published.extend(keys.previous.as_ref().map(|k| k.public.clone()));
        CoreJsonWebKeySet::new(published)
    }
}
