//! Contexts this process resolved a moment ago, reused for
//! [`Config::reuse_interval`](crate::Config::reuse_interval) so that a busy
//! session costs one store read a second, not one a request.
//!
//! What keeps reuse safe:
//! - only active sessions are kept, and each entry is used only while its
//!   session can neither have expired nor gone idle by the clock;
//! - every end this process makes forgets the session at once, and bumps an
//!   epoch so that a lookup which read the store before that end cannot put
//!   its stale answer back;
//! - an audited request is checked by the store again when its event is
//!   written (the append's guard), so a session ended by another process is
//!   refused there, however fresh the entry.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use time::{Duration, OffsetDateTime};

use crate::id::SessionId;
use crate::secret::SecretHash;
use crate::service::Context;

/// Entries are purged of stale ones when the map reaches this size, and
/// then whenever it doubles: the map holds at most the sessions resolved
/// within one interval, plus stale ones up to the next purge.
const PURGE_FLOOR: usize = 1024;

#[derive(Debug)]
struct Entry {
    context: Context,
    fetched_at: OffsetDateTime,
    /// How long this entry may be reused (its session's own bound).
    interval: Duration,
}

/// What a context was resolved from: a session secret, or a session id
/// named by a verified token; each under the settings of the service that
/// resolved it ([`Settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReuseKey {
    /// Resolved from this secret (its hash).
    Secret(Settings, SecretHash),
    /// Resolved by id, for a signed token that names the session.
    Session(Settings, SessionId),
}

/// Which settings (policy, projection, config, clock) a service resolves
/// under. Clones of a service share its reuse map, so that an end made
/// through any of them is seen by all; a clone given other settings
/// (`with_projection`, say) gets a new value, so that it never reuses a
/// context judged and projected under the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Settings(u64);

impl Settings {
    /// A value no service in this process has had.
    pub(crate) fn fresh() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<ReuseKey, Entry>,
    /// Bumped by every `forget`: a lookup that began before it does not
    /// put its answer back.
    epoch: u64,
    purge_at: usize,
}

impl Inner {
    /// Drops every entry of `session`; whether there was one.
    fn drop_session(&mut self, session: SessionId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.context.session() != session);
        self.entries.len() != before
    }
}

/// The reuse map. Shared by clones of a service.
#[derive(Debug, Default)]
pub(crate) struct Reuse {
    inner: Mutex<Inner>,
}

impl Reuse {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held; recover anyway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The context resolved for `key` less than `interval` ago, if its
    /// session is still within its deadlines at `now`.
    pub(crate) fn get(
        &self,
        key: &ReuseKey,
        now: OffsetDateTime,
        interval: Duration,
    ) -> Option<Context> {
        let inner = self.lock();
        let entry = inner.entries.get(key)?;
        let interval = interval.min(entry.interval);
        let fresh = entry.fetched_at <= now && now - entry.fetched_at < interval;
        (fresh && entry.context.in_time(now)).then(|| entry.context.clone())
    }

    /// The epoch to hand back to [`Reuse::put`]: read it before the store.
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Keeps `context`, resolved at `now` from a store read that began in
    /// `epoch`, unless a session has been forgotten since; for at most
    /// `interval`.
    pub(crate) fn put(
        &self,
        key: ReuseKey,
        context: &Context,
        now: OffsetDateTime,
        epoch: u64,
        interval: Duration,
    ) {
        if interval <= Duration::ZERO {
            return;
        }
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        if inner.entries.len() >= inner.purge_at.max(PURGE_FLOOR) {
            inner
                .entries
                .retain(|_, e| e.fetched_at <= now && now - e.fetched_at < interval);
            inner.purge_at = inner.entries.len().saturating_mul(2);
        }
        inner.entries.insert(
            key,
            Entry {
                context: context.clone(),
                fetched_at: now,
                interval,
            },
        );
    }

    /// Drops every entry of `session`, and keeps lookups that were under
    /// way from putting theirs back.
    pub(crate) fn forget(&self, session: SessionId) {
        let mut inner = self.lock();
        inner.drop_session(session);
        inner.epoch = inner.epoch.wrapping_add(1);
    }

    /// Drops the entries of `session`, if any, as [`Reuse::forget`] does;
    /// with none kept, nothing changes (a session found ended is read
    /// often, by a client still sending its secret, and would otherwise
    /// keep every lookup under way from putting its answer back).
    pub(crate) fn forget_if_kept(&self, session: SessionId) {
        let mut inner = self.lock();
        if inner.drop_session(session) {
            inner.epoch = inner.epoch.wrapping_add(1);
        }
    }

    /// Forgets `session` when the guard is dropped: after a store call that
    /// may end it, whether the call answers or its caller is dropped while
    /// it is in flight (the store may have ended the session all the same).
    pub(crate) fn forget_on_drop(&self, session: SessionId) -> ForgetOnDrop<'_> {
        ForgetOnDrop {
            reuse: self,
            session,
        }
    }

    /// How many entries are kept (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

/// See [`Reuse::forget_on_drop`].
pub(crate) struct ForgetOnDrop<'a> {
    reuse: &'a Reuse,
    session: SessionId,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.reuse.forget(self.session);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::{
        Impersonation, MemoryDirectory, MemoryStore, Principal, Requester, StartRequest, TenantId,
        UserId,
    };

    async fn context() -> (Context, ReuseKey) {
        let tenant = TenantId::from(1_u64);
        let agent = Principal::new(UserId::from(1_u64), "Sam", tenant.clone())
            .with_permissions(["impersonation:start"]);
        let customer = Principal::new(UserId::from(2_u64), "Jo", tenant);
        let directory = MemoryDirectory::new();
        directory.insert(agent.clone());
        directory.insert(customer.clone());
        let service = Impersonation::new(MemoryStore::new(), directory);
        let started = service
            .start(
                Requester::User(&agent),
                StartRequest::new(customer.id.clone(), "Ticket 1: bookings"),
            )
            .await
            .unwrap();
        let ctx = service.resolve(&started.secret).await.unwrap();
        (
            ctx,
            ReuseKey::Secret(Settings::fresh(), started.secret.hash()),
        )
    }

    fn second() -> Duration {
        Duration::seconds(1)
    }

    #[tokio::test]
    async fn an_entry_is_reused_only_within_its_interval() {
        let (ctx, hash) = context().await;
        let reuse = Reuse::default();
        let at = ctx.started_at();
        reuse.put(hash, &ctx, at, reuse.epoch(), second());
        assert_eq!(reuse.get(&hash, at, second()), Some(ctx.clone()));
        let later = at + Duration::milliseconds(999);
        assert_eq!(reuse.get(&hash, later, second()), Some(ctx.clone()));
        assert_eq!(reuse.get(&hash, at + second(), second()), None);
        // A clock that went back is not trusted either.
        assert_eq!(
            reuse.get(&hash, at - Duration::milliseconds(1), second()),
            None
        );
    }

    #[tokio::test]
    async fn an_entry_is_not_used_past_its_sessions_deadlines() {
        let (ctx, hash) = context().await;
        let reuse = Reuse::default();
        let interval = Duration::days(365);
        let at = ctx.started_at();
        reuse.put(hash, &ctx, at, reuse.epoch(), interval);
        assert!(
            reuse
                .get(&hash, ctx.idle_deadline() - Duration::SECOND, interval)
                .is_some()
        );
        assert_eq!(reuse.get(&hash, ctx.idle_deadline(), interval), None);
        assert_eq!(reuse.get(&hash, ctx.expires_at(), interval), None);
    }

    /// A session found ended that this process does not keep changes
    /// nothing: lookups of other sessions under way still put theirs.
    /// One it keeps is dropped as `forget` drops it.
    #[tokio::test]
    async fn forgetting_a_session_not_kept_refuses_no_lookup() {
        let (ctx, hash) = context().await;
        let reuse = Reuse::default();
        let at = ctx.started_at();
        let before = reuse.epoch();
        reuse.forget_if_kept(ctx.session());
        reuse.put(hash, &ctx, at, before, second());
        assert_eq!(reuse.len(), 1);
        reuse.forget_if_kept(ctx.session());
        assert_eq!(reuse.len(), 0);
        reuse.put(hash, &ctx, at, before, second());
        assert_eq!(reuse.len(), 0, "begun before the session was dropped");
    }

    /// An entry is reused no longer than the interval it was kept for,
    /// whatever a later reader asks.
    #[tokio::test]
    async fn an_entry_is_reused_no_longer_than_it_was_kept_for() {
        let (ctx, hash) = context().await;
        let reuse = Reuse::default();
        let at = ctx.started_at();
        reuse.put(hash, &ctx, at, reuse.epoch(), second());
        let later = at + second();
        assert_eq!(reuse.get(&hash, later, Duration::minutes(5)), None);
    }

    #[tokio::test]
    async fn forgetting_a_session_drops_it_and_refuses_lookups_begun_before() {
        let (ctx, hash) = context().await;
        let reuse = Reuse::default();
        let at = ctx.started_at();
        let before = reuse.epoch();
        reuse.put(hash, &ctx, at, before, second());
        reuse.forget(ctx.session());
        assert_eq!(reuse.get(&hash, at, second()), None);
        // A lookup that read the store before the end cannot put it back.
        reuse.put(hash, &ctx, at, before, second());
        assert_eq!(reuse.len(), 0);
        // One that began after it can.
        reuse.put(hash, &ctx, at, reuse.epoch(), second());
        assert_eq!(reuse.len(), 1);
    }

    #[tokio::test]
    async fn a_zero_interval_keeps_nothing() {
        let (ctx, hash) = context().await;
        let reuse = Reuse::default();
        reuse.put(hash, &ctx, ctx.started_at(), reuse.epoch(), Duration::ZERO);
        assert_eq!(reuse.len(), 0);
    }

    #[tokio::test]
    async fn stale_entries_are_purged_as_the_map_grows() {
        let (ctx, _) = context().await;
        let reuse = Reuse::default();
        let at = ctx.started_at();
        for i in 0..PURGE_FLOOR {
            let mut bytes = [0_u8; 32];
            bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
            reuse.put(
                ReuseKey::Secret(Settings::fresh(), SecretHash::from_bytes(bytes)),
                &ctx,
                at,
                reuse.epoch(),
                second(),
            );
        }
        assert_eq!(reuse.len(), PURGE_FLOOR);
        // One interval on, the next insert finds them all stale.
        reuse.put(
            ReuseKey::Session(Settings::fresh(), ctx.session()),
            &ctx,
            at + second(),
            reuse.epoch(),
            second(),
        );
        assert_eq!(reuse.len(), 1);
    }
}
