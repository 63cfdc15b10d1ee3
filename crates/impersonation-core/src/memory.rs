//! The in-memory store: for tests, demos and single-process apps that accept
//! losing sessions and audit on restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::audit::{AuditDraft, AuditEvent, ChainHead, ChainKey};
use crate::id::{SessionId, UserId};
use crate::projection::ShadowUser;
use crate::secret::{SecretHash, SecretLookup};
use crate::session::{Session, Start, Transition};
use crate::store::{
    AppendGuard, AuditCursor, AuditPage, AuditQuery, LiveFilter, Order, StartOutcome, Store,
    StoreError, Touch,
};

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<SessionId, Session>,
    by_hash: HashMap<SecretHash, SessionId>,
    live_by_agent: HashMap<UserId, SessionId>,
    // An event is cheap to clone (its text is shared), so each chain keeps
    // its events by value: one allocation less per event than behind an `Arc`.
    chains: BTreeMap<ChainKey, Vec<AuditEvent>>,
    // Kept apart from the events, as a database keeps a head row, so that
    // cutting events off the end of a chain is detectable.
    heads: HashMap<ChainKey, ChainHead>,
    // Every event by (time, id), ascending: events arrive nearly in time
    // order, so an append almost always lands at the end.
    by_time: Vec<TimeEntry>,
}

#[derive(Debug)]
struct TimeEntry {
    /// The event's (time, id), ordered as audit pages are.
    key: AuditCursor,
    chain: ChainKey,
    index: usize,
}

impl Inner {
    fn append(&mut self, draft: AuditDraft) -> AuditEvent {
        let head = self.heads.get(&draft.chain).copied();
        let event = draft.seal(head);
        self.heads.insert(event.chain.clone(), event.head());
        let chain = self.chains.entry(event.chain.clone()).or_default();
        let key = AuditCursor::after(&event);
        let at = match self.by_time.last() {
            Some(last) if last.key > key => self.by_time.partition_point(|e| e.key < key),
            _ => self.by_time.len(),
        };
        self.by_time.insert(
            at,
            TimeEntry {
                key,
                chain: event.chain.clone(),
                index: chain.len(),
            },
        );
        chain.push(event.clone());
        event
    }
}

/// Sessions and audit chains in a mutex-guarded map. Every operation is one
/// critical section, which makes each transition trivially atomic.
///
/// ```
/// use impersonation_core::{MemoryStore, Store, ChainKey, UserId};
/// # tokio_test_block_on(async {
/// let store = MemoryStore::new();
/// assert!(store.chain_head(&ChainKey::for_agent(&UserId::from(1_u64))).await.unwrap().is_none());
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave half a transition:
        // every method mutates only after all its checks pass.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Overwrites a stored event, bypassing the append-only contract. For
    /// tamper tests only: it is how an attacker with database access would edit a row.
    /// The time index keeps the event's old time, as a database index would.
    #[doc(hidden)]
    pub fn tamper_with_event(
        &self,
        chain: &ChainKey,
        seq: u64,
        edit: impl FnOnce(&mut AuditEvent),
    ) -> bool {
        let mut inner = self.lock();
        let event = inner
            .chains
            .get_mut(chain)
            .and_then(|events| events.get_mut(usize::try_from(seq).unwrap_or(usize::MAX)));
        match event {
            Some(e) => {
                edit(e);
                true
            }
            None => false,
        }
    }

    /// Takes an event out of the listing's time index, leaving its chain
    /// whole. For tamper tests only: it is how someone with database access
    /// would hide a row from the trail's readers where the listing is an
    /// index beside the chains. Whether it was listed.
    #[doc(hidden)]
    pub fn tamper_unlist_event(&self, chain: &ChainKey, seq: u64) -> bool {
        let mut inner = self.lock();
        let index = usize::try_from(seq).unwrap_or(usize::MAX);
        let before = inner.by_time.len();
        inner
            .by_time
            .retain(|entry| !(entry.chain == *chain && entry.index == index));
        inner.by_time.len() < before
    }

    /// Removes a stored event, bypassing the append-only contract. For tamper tests only:
    /// the time index keeps its old positions, so `audit` pages may skip or
    /// repeat events afterwards (chain reads and verification see the change).
    #[doc(hidden)]
    pub fn tamper_remove_event(&self, chain: &ChainKey, seq: u64) -> bool {
        let mut inner = self.lock();
        let Some(events) = inner.chains.get_mut(chain) else {
            return false;
        };
        let index = usize::try_from(seq).unwrap_or(usize::MAX);
        if index < events.len() {
            events.remove(index);
            true
        } else {
            false
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn start(&self, start: Start) -> Result<StartOutcome, StoreError> {
        let (session, event, refusal) = start.into_parts();
        let mut inner = self.lock();
        if let Some(live) = inner.live_by_agent.get(&session.agent.id).copied() {
            let event = inner.append(refusal);
            return Ok(StartOutcome::Refused { live, event });
        }
        inner.by_hash.insert(session.secret_hash, session.id);
        inner
            .live_by_agent
            .insert(session.agent.id.clone(), session.id);
        inner.sessions.insert(session.id, session.clone());
        let event = inner.append(event);
        Ok(StartOutcome::Started {
            session: Box::new(session),
            event,
        })
    }

    async fn transition(
        &self,
        transition: Transition,
    ) -> Result<(Session, AuditEvent), StoreError> {
        let (next, expected, event) = transition.into_parts();
        let mut inner = self.lock();
        let current = inner
            .sessions
            .get(&next.id)
            .ok_or(StoreError::SessionNotFound(next.id))?;
        if current.version != expected {
            return Err(StoreError::Conflict(next.id));
        }
        if next.state.is_live() {
            inner.live_by_agent.insert(next.agent.id.clone(), next.id);
        } else if inner.live_by_agent.get(&next.agent.id) == Some(&next.id) {
            inner.live_by_agent.remove(&next.agent.id);
        }
        inner.sessions.insert(next.id, next.clone());
        let event = inner.append(event);
        Ok((next, event))
    }

    async fn append(
        &self,
        event: AuditDraft,
        guard: AppendGuard,
    ) -> Result<AuditEvent, StoreError> {
        let mut inner = self.lock();
        if let AppendGuard::SessionActive(id) = guard {
            // Only a session of the event's chain can guard it.
            let session = inner
                .sessions
                .get(&id)
                .filter(|s| s.chain() == event.chain)
                .ok_or(StoreError::SessionNotFound(id))?;
            if session.state != crate::session::SessionState::Active {
                return Err(StoreError::SessionNotActive(id));
            }
        }
        Ok(inner.append(event))
    }

    async fn find_by_secret(
        &self,
        secret: &SecretLookup,
        touch: Option<Touch>,
    ) -> Result<Option<Session>, StoreError> {
        let mut inner = self.lock();
        let Some(id) = inner.by_hash.get(&secret.hash).copied() else {
            return Ok(None);
        };
        let Some(session) = inner.sessions.get_mut(&id) else {
            return Ok(None);
        };
        let before = session.clone();
        if let Some(touch) = touch
            && touch.applies_to(session)
        {
            session.last_seen_at = touch.now;
        }
        Ok(Some(before))
    }

    async fn session(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        Ok(self.lock().sessions.get(&id).cloned())
    }

    async fn live_sessions(&self, filter: &LiveFilter) -> Result<Vec<Session>, StoreError> {
        let inner = self.lock();
        // Every live session is in the per-agent index (one per agent), so
        // ended sessions, however many, are never scanned.
        let ids: Vec<SessionId> = match &filter.agent {
            Some(agent) => inner
                .live_by_agent
                .get(agent)
                .copied()
                .into_iter()
                .collect(),
            None => inner.live_by_agent.values().copied().collect(),
        };
        let mut found: Vec<Session> = ids
            .iter()
            .filter_map(|id| inner.sessions.get(id))
            .filter(|s| s.state.is_live() && filter.matches(s))
            .cloned()
            .collect();
        found.sort_by_key(|s| s.id);
        Ok(found)
    }

    async fn record_check(
        &self,
        id: SessionId,
        version: u64,
        checked_at: OffsetDateTime,
        shadow: &ShadowUser,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let session = inner
            .sessions
            .get_mut(&id)
            .ok_or(StoreError::SessionNotFound(id))?;
        if session.version != version {
            return Err(StoreError::Conflict(id));
        }
        session.last_checked_at = checked_at;
        session.shadow = shadow.clone();
        Ok(())
    }

    async fn audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        let inner = self.lock();
        let limit = query.page_size();
        let lookup = |entry: &TimeEntry| {
            inner
                .chains
                .get(&entry.chain)
                .and_then(|events| events.get(entry.index))
        };
        let mut events: Vec<AuditEvent> = Vec::with_capacity(limit + 1);
        // Only the part of the index inside the time window and past the
        // cursor is read: a page costs that window (scanned for the other
        // filters), not the whole trail.
        let index = &inner.by_time;
        let mut from = query
            .since
            .map_or(0, |t| index.partition_point(|e| e.key.at < t));
        let mut to = query
            .until
            .map_or(index.len(), |t| index.partition_point(|e| e.key.at < t));
        if let Some(c) = query.cursor {
            match query.order {
                Order::Oldest => from = from.max(index.partition_point(|e| e.key <= c)),
                Order::Newest => to = to.min(index.partition_point(|e| e.key < c)),
            }
        }
        let window = index.get(from..to).unwrap_or_default();
        let candidates: Box<dyn Iterator<Item = &TimeEntry>> = match query.order {
            Order::Oldest => Box::new(window.iter()),
            Order::Newest => Box::new(window.iter().rev()),
        };
        // The index narrows a query by time alone: any other filter (an
        // action, an agent, a session) may read many events for each it
        // matches, under the store's lock. Past as many as a view-backed
        // store reads (`views::PageReader`), the call answers with what it
        // has found, possibly fewer than a page or none, and a cursor after
        // the last event it read.
        let bound = crate::views::scan_bound_for(limit);
        let mut last_read = None;
        for (read, event) in candidates.filter_map(lookup).enumerate() {
            if read == bound {
                let next = last_read.map(AuditCursor::after);
                return Ok(AuditPage { events, next });
            }
            last_read = Some(event);
            if query.matches(event) && query.after_cursor(event) {
                events.push(event.clone());
                if events.len() > limit {
                    break;
                }
            }
        }
        let next = if events.len() > limit {
            events.truncate(limit);
            events.last().map(AuditCursor::after)
        } else {
            None
        };
        Ok(AuditPage { events, next })
    }

    async fn chain_events(
        &self,
        chain: &ChainKey,
        from_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let inner = self.lock();
        let from = usize::try_from(from_seq).unwrap_or(usize::MAX);
        Ok(inner
            .chains
            .get(chain)
            .map(|events| {
                events
                    .iter()
                    .skip(from)
                    .take(limit as usize)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn chain_head(&self, chain: &ChainKey) -> Result<Option<ChainHead>, StoreError> {
        let inner = self.lock();
        Ok(inner.heads.get(chain).copied())
    }

    async fn chains(
        &self,
        after: Option<&ChainKey>,
        limit: u32,
    ) -> Result<Vec<ChainKey>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .chains
            .keys()
            .filter(|k| after.is_none_or(|a| *k > a))
            .take(limit as usize)
            .cloned()
            .collect())
    }
}
