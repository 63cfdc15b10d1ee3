//! A fault-injecting store wrapper: fails a chosen call before or after the
//! inner store runs it, to show that the service fails closed and leaves
//! no session without its record when a store call fails whole. (It wraps
//! whole calls: that a store's own write is atomic inside one call is for
//! a test against its database.)

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use impersonation_core::{
    AppendGuard, AuditDraft, AuditEvent, AuditPage, AuditQuery, Batching, ChainHead, ChainKey,
    LiveFilter, SecretLookup, Session, SessionId, ShadowUser, Start, StartOutcome, Store,
    StoreError, Touch, Transition,
};
use time::OffsetDateTime;

/// When the injected failure happens relative to the inner call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum When {
    /// The inner store never sees the call (a connection lost before sending).
    Before,
    /// The inner store completes the call, then the caller gets an error (a
    /// connection lost before the reply arrived).
    After,
    /// The inner store completes the call, and the caller never hears back
    /// (a reply lost on a connection with no timeout): the call stays
    /// pending, for a test to drop its caller after the store has acted.
    Hang,
    /// No error: the inner store gets the call after a pause of
    /// [`SLOW_CALL`] (a slow network), long enough for a test to give up on
    /// its caller meanwhile.
    Slow,
    /// The call panics before the inner store sees it (a bug in a store),
    /// for a test that its caller answers as for a failed store.
    Panic,
    /// No error: the call waits once (it answers `Pending`, having woken
    /// itself) before it reaches the inner store, as a store that has to
    /// wait for its server does. It needs no timer, so a caller outside a
    /// tokio runtime can be tested with it.
    Yield,
}

/// How long a [`When::Slow`] call waits before it reaches the inner store.
pub const SLOW_CALL: std::time::Duration = std::time::Duration::from_millis(200);

/// Which calls count toward the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    /// Every call.
    All,
    /// Only writes: `start`, `transition`, `append`, `record_check`, and `find_by_secret` with a touch.
    Writes,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    nth: usize,
    when: When,
    calls: Calls,
}

/// An edit of an `audit` page's events, given the query it answers
/// ([`FaultyStore::edit_listing`]).
#[derive(Clone)]
struct ListingEdit(std::sync::Arc<EditFn>);

/// What a [`ListingEdit`] calls.
type EditFn = dyn Fn(&AuditQuery, &mut Vec<AuditEvent>) + Send + Sync;

impl std::fmt::Debug for ListingEdit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ListingEdit")
    }
}

/// Wraps a store and fails the `nth` counted call.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    plan: Mutex<Option<Plan>>,
    counted: AtomicUsize,
    injected: AtomicUsize,
    /// Every call yields before and after the inner store's
    /// ([`FaultyStore::yield_on_every_call`]).
    yielding: AtomicBool,
    /// Calls made, to vary the yields.
    calls: AtomicUsize,
    /// The group commit the wrapper asks for, in place of the inner
    /// store's.
    batching: Option<Batching>,
    /// Applied to every `audit` page ([`FaultyStore::edit_listing`]).
    listing_edit: Mutex<Option<ListingEdit>>,
}

/// The error a faulty call returns.
#[derive(Debug)]
pub struct Fault;

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected fault")
    }
}

impl std::error::Error for Fault {}

impl<S: Store> FaultyStore<S> {
    /// A wrapper that injects nothing until told to.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            plan: Mutex::new(None),
            counted: AtomicUsize::new(0),
            injected: AtomicUsize::new(0),
            yielding: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            batching: None,
            listing_edit: Mutex::new(None),
        }
    }

    /// From now on the events of every `audit` page pass through `edit`
    /// (the chains, `chain_events`, are read as stored): the listing
    /// someone with the database changed where it is an index beside the
    /// chains, with copies of its own.
    pub fn edit_listing(
        &self,
        edit: impl Fn(&AuditQuery, &mut Vec<AuditEvent>) + Send + Sync + 'static,
    ) {
        *self.listing_edit.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(ListingEdit(std::sync::Arc::new(edit)));
    }

    /// Has the service batch appends and lookups as `batching` says, in
    /// place of the inner store's own choice (set before the service is
    /// made, which sizes its group commit by it). A store that answers at
    /// once (the memory store) turns group commit off; with it on, calls
    /// made side by side share batched store calls, as they would on a
    /// database.
    pub fn with_batching(mut self, batching: Batching) -> Self {
        self.batching = Some(batching);
        self
    }

    /// From now on every call, besides any fault planned, yields to the
    /// runtime zero to three times before the inner store sees it and zero
    /// to three times after it has answered (varied from call to call), as
    /// a call to a server waits on the network: calls made side by side
    /// interleave at every store call, even on a store that answers at
    /// once (the memory store), and so race as they would over a network.
    pub fn yield_on_every_call(&self) {
        self.yielding.store(true, Ordering::SeqCst);
    }

    /// The wrapped store (to inspect what was really written).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Fails the `nth` (1-based) counted call from now on, then stops injecting.
    pub fn fail_nth(&self, nth: usize, when: When, calls: Calls) {
        self.counted.store(0, Ordering::SeqCst);
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = Some(Plan { nth, when, calls });
    }

    /// Fails the next write.
    pub fn fail_next_write(&self, when: When) {
        self.fail_nth(1, when, Calls::Writes);
    }

    /// Stops injecting.
    pub fn heal(&self) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }

    /// Decides whether this call fails, and when.
    fn check(&self, is_write: bool) -> Option<When> {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        let p = (*plan)?;
        if p.calls == Calls::Writes && !is_write {
            return None;
        }
        let n = self.counted.fetch_add(1, Ordering::SeqCst) + 1;
        if n == p.nth {
            *plan = None;
            self.injected.fetch_add(1, Ordering::SeqCst);
            Some(p.when)
        } else {
            None
        }
    }

    async fn run<T, F>(&self, is_write: bool, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        if self.yielding.load(Ordering::SeqCst) {
            // Zero to three times each side, varied from call to call, so
            // that the calls of a step meet in different orders.
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let spread = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7;
            for _ in 0..spread % 4 {
                tokio::task::yield_now().await;
            }
            let answer = self.run_planned(is_write, call).await;
            for _ in 0..(spread >> 2) % 4 {
                tokio::task::yield_now().await;
            }
            return answer;
        }
        self.run_planned(is_write, call).await
    }

    /// [`FaultyStore::run`], as the plan has it.
    async fn run_planned<T, F>(&self, is_write: bool, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        match self.check(is_write) {
            None => call.await,
            Some(When::Before) => Err(StoreError::unavailable(Fault)),
            Some(When::After) => {
                let _ = call.await;
                Err(StoreError::unavailable(Fault))
            }
            Some(When::Hang) => {
                let _ = call.await;
                std::future::pending().await
            }
            Some(When::Slow) => {
                tokio::time::sleep(SLOW_CALL).await;
                call.await
            }
            Some(When::Panic) => panic!("injected panic in a store call"),
            Some(When::Yield) => {
                // Outside a runtime, tokio's yield wakes the task at once.
                tokio::task::yield_now().await;
                call.await
            }
        }
    }

    /// [`FaultyStore::run`] for a batched call of `n` items: one call, one
    /// fault, so every item in it fails together.
    async fn run_batch<T, F>(&self, is_write: bool, n: usize, call: F) -> Vec<Result<T, StoreError>>
    where
        F: std::future::Future<Output = Vec<Result<T, StoreError>>>,
    {
        match self.run(is_write, async { Ok(call.await) }).await {
            Ok(results) => results,
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }
}

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    async fn start(&self, start: Start) -> Result<StartOutcome, StoreError> {
        self.run(true, self.inner.start(start)).await
    }
    async fn transition(&self, t: Transition) -> Result<(Session, AuditEvent), StoreError> {
        self.run(true, self.inner.transition(t)).await
    }
    async fn append(&self, e: AuditDraft, g: AppendGuard) -> Result<AuditEvent, StoreError> {
        self.run(true, self.inner.append(e, g)).await
    }
    async fn append_batch(
        &self,
        b: Vec<(AuditDraft, AppendGuard)>,
    ) -> Vec<Result<AuditEvent, StoreError>> {
        let n = b.len();
        self.run_batch(true, n, self.inner.append_batch(b)).await
    }
    async fn find_by_secrets(
        &self,
        l: &[SecretLookup],
        t: Option<Touch>,
    ) -> Vec<Result<Option<Session>, StoreError>> {
        self.run_batch(t.is_some(), l.len(), self.inner.find_by_secrets(l, t))
            .await
    }
    fn batching(&self) -> Batching {
        self.batching.unwrap_or_else(|| self.inner.batching())
    }
    async fn find_by_secret(
        &self,
        h: &SecretLookup,
        t: Option<Touch>,
    ) -> Result<Option<Session>, StoreError> {
        self.run(t.is_some(), self.inner.find_by_secret(h, t)).await
    }
    async fn session(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        self.run(false, self.inner.session(id)).await
    }
    async fn live_sessions(&self, f: &LiveFilter) -> Result<Vec<Session>, StoreError> {
        self.run(false, self.inner.live_sessions(f)).await
    }
    async fn record_check(
        &self,
        id: SessionId,
        v: u64,
        at: OffsetDateTime,
        s: &ShadowUser,
    ) -> Result<(), StoreError> {
        self.run(true, self.inner.record_check(id, v, at, s)).await
    }
    async fn audit(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        let mut page = self.run(false, self.inner.audit(q)).await?;
        let edit = self
            .listing_edit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(ListingEdit(edit)) = edit {
            edit(q, &mut page.events);
        }
        Ok(page)
    }
    async fn chain_events(
        &self,
        c: &ChainKey,
        from: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        self.run(false, self.inner.chain_events(c, from, limit))
            .await
    }
    async fn chain_head(&self, c: &ChainKey) -> Result<Option<ChainHead>, StoreError> {
        self.run(false, self.inner.chain_head(c)).await
    }
    async fn chains(
        &self,
        after: Option<&ChainKey>,
        limit: u32,
    ) -> Result<Vec<ChainKey>, StoreError> {
        self.run(false, self.inner.chains(after, limit)).await
    }
}
