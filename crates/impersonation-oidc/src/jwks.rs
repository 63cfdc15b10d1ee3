//! A JWKS kept fresh: fetched from its URL again when a token names a key
//! not seen yet (at most every 30 s), and once the keys are older than
//! their maximum age. The provider's keys and a resource server's copy of
//! this issuer's keys are both kept so.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openidconnect::JsonWebKey;
use openidconnect::JsonWebKeySetUrl;
use openidconnect::core::CoreJsonWebKeySet;
use openidconnect::reqwest;

use crate::error::TokenError;
use crate::jwt::unverified_header;

/// How soon the JWKS may be fetched again after any attempt (so a flood of
/// bogus key ids cannot turn into a flood of requests to the provider).
const REFRESH_AFTER: Duration = Duration::from_secs(30);

/// How long fetched keys are trusted before they are fetched again, by
/// default: a key the provider stopped publishing (rotated out, or
/// compromised) stops being accepted within this.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(600);

/// Past their maximum age, while the JWKS cannot be fetched, the keys last
/// fetched serve this much longer; then tokens fail closed.
const JWKS_STALE_LIMIT: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct KeyCache {
    keys: CoreJsonWebKeySet,
    /// When `keys` were fetched (`None`: given, never fetched).
    fetched: Option<Instant>,
    /// When a fetch was last tried, whatever came of it.
    tried: Option<Instant>,
}

/// Keys from a JWKS URL (or given once, with nothing to fetch them from).
/// Clones share one cache.
#[derive(Clone)]
pub(crate) struct Jwks {
    /// Whose keys, for messages: "provider", "issuer".
    owner: &'static str,
    source: Option<(JsonWebKeySetUrl, reqwest::Client)>,
    cache: Arc<RwLock<KeyCache>>,
    max_age: Duration,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("owner", &self.owner)
            .field("uri", &self.source.as_ref().map(|(uri, _)| uri.as_str()))
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Keys just fetched from `uri`, to be fetched again from there.
    pub(crate) fn fetched(
        owner: &'static str,
        uri: JsonWebKeySetUrl,
        http: reqwest::Client,
        keys: CoreJsonWebKeySet,
    ) -> Self {
        Self {
            owner,
            source: Some((uri, http)),
            cache: Arc::new(RwLock::new(KeyCache {
                keys,
                fetched: Some(Instant::now()),
                // The first token naming an unknown key may fetch at once
                // (a rotation just after start-up is not held back for
                // the pause); the pause counts from that fetch on.
                tried: None,
            })),
            max_age: JWKS_MAX_AGE,
        }
    }

    /// Fetches the keys at `uri` now.
    pub(crate) async fn fetch(
        owner: &'static str,
        uri: JsonWebKeySetUrl,
        http: reqwest::Client,
    ) -> Result<Self, TokenError> {
        let keys = CoreJsonWebKeySet::fetch_async(&uri, &http)
            .await
            .map_err(|e| TokenError::Unavailable(format!("{owner} JWKS: {e}")))?;
        Ok(Self::fetched(owner, uri, http, keys))
    }

    /// Keys given once, never fetched.
    pub(crate) fn given(owner: &'static str, keys: CoreJsonWebKeySet) -> Self {
        Self {
            owner,
            source: None,
            cache: Arc::new(RwLock::new(KeyCache {
                keys,
                fetched: None,
                tried: None,
            })),
            max_age: JWKS_MAX_AGE,
        }
    }

    /// How long fetched keys are trusted before they are fetched again.
    pub(crate) fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The keys to verify with: fetched again once older than the maximum
    /// age; while that fails, the last ones serve until the stale limit.
    async fn current(&self) -> Result<CoreJsonWebKeySet, TokenError> {
        let (keys, age) = self.cached();
        let Some(age) = age.filter(|age| *age >= self.max_age) else {
            return Ok(keys);
        };
        let usable = |age: Duration| age < self.max_age.saturating_add(JWKS_STALE_LIMIT);
        match self.refresh().await {
            Ok(Some(fresh)) => Ok(fresh),
            // Another request is fetching, or just tried: what the cache
            // holds now, if not too old.
            Ok(None) => match self.cached() {
                (_, Some(age)) if !usable(age) => Err(TokenError::Unavailable(format!(
                    "{} JWKS: not fetched again for over an hour past its age",
                    self.owner
                ))),
                (keys, _) => Ok(keys),
            },
            Err(e) if usable(age) => {
                tracing::warn!(error = %e, owner = self.owner, "a JWKS could not be fetched again; using the last one");
                Ok(keys)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `check` on `token` with the current keys, and once more with
    /// keys fetched again if its signature failed because it names a key
    /// these lack (the keys were rotated since).
    pub(crate) async fn verify<T>(
        &self,
        token: &str,
        check: impl Fn(CoreJsonWebKeySet) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        match check(self.current().await?) {
            Err(e @ TokenError::Signature(_)) => match self.for_unknown_key(token).await? {
                Some(keys) => check(keys),
                None => Err(e),
            },
            other => other,
        }
    }

    /// The keys to try again with when `token` names a key these lack (the
    /// keys were rotated since): fetched now, or, if a fetch was tried just
    /// now (by another request, perhaps), what it brought. `None`: nothing
    /// a fetch could find (no key named, or nowhere to fetch from).
    async fn for_unknown_key(&self, token: &str) -> Result<Option<CoreJsonWebKeySet>, TokenError> {
        if !self.names_unknown_key(token) {
            return Ok(None);
        }
        Ok(Some(match self.refresh().await? {
            Some(keys) => keys,
            None => self.cached().0,
        }))
    }

    /// The cached keys and how long ago they were fetched (`None`: given).
    pub(crate) fn cached(&self) -> (CoreJsonWebKeySet, Option<Duration>) {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        (cache.keys.clone(), cache.fetched.map(|at| at.elapsed()))
    }

    /// Whether a refetch could help: the token names a key we do not hold.
    fn names_unknown_key(&self, token: &str) -> bool {
        if self.source.is_none() {
            return false;
        }
        let Ok(header) = unverified_header(token) else {
            return false;
        };
        // No key named: nothing a fetch could find.
        let Some(kid) = header.kid.as_deref() else {
            return false;
        };
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
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
        let Some((uri, http)) = &self.source else {
            return Ok(None);
        };
        {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            // Never more than one attempt a second, whatever the age set.
            let pause = REFRESH_AFTER.min(self.max_age).max(Duration::from_secs(1));
            if cache.tried.is_some_and(|at| at.elapsed() < pause) {
                return Ok(None);
            }
            // Failures count against the rate limit too.
            cache.tried = Some(Instant::now());
        }
        let keys = CoreJsonWebKeySet::fetch_async(uri, http)
            .await
            .map_err(|e| TokenError::Unavailable(format!("{} JWKS: {e}", self.owner)))?;
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        cache.keys = keys.clone();
        cache.fetched = Some(Instant::now());
        Ok(Some(keys))
    }
}
