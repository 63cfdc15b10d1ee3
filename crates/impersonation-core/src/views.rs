//! Audit views by runs: how a store can index its audit trail for
//! [`AuditQuery`] with a few entries per appended batch instead of one per
//! event and per filter.
//!
//! A batch's events mostly share their agent, customer, tenant and
//! session, so per view (every event, by agent, customer, tenant, actor,
//! session) the batch's events form one or a few *runs*: consecutive
//! events of one chain that share the view's key, listed as one entry
//! (the chain, the first and last seq, the earliest time). A reader takes
//! the entries of its view in time order, reads each run's events from the
//! chain by position, and filters them with [`AuditQuery::matches`]. An
//! entry is placed by its earliest event, and its latest is at most
//! [`RUN_SPAN_US`] later, which bounds how far back a reader must look.
//!
//! ```
//! use impersonation_core::views::{View, view_runs};
//! use impersonation_core::*;
//!
//! let agent = UserId::new("sam").unwrap();
//! let chain = ChainKey::for_agent(&agent);
//! let at = time::OffsetDateTime::UNIX_EPOCH;
//! let mut head = None;
//! let events: Vec<AuditEvent> = (0..3)
//!     .map(|_| {
//!         let draft = AuditDraft::new(at, AuditAction::Access, Actor::user(agent.clone(), "Sam"), chain.clone());
//!         let event = draft.seal(head);
//!         head = Some(event.head());
//!         event
//!     })
//!     .collect();
//! let runs = view_runs(&events.iter().collect::<Vec<_>>());
//! // Every event, by agent, by actor: one run each, covering seqs 0 to 2.
//! assert_eq!(runs.len(), 3);
//! assert!(runs.iter().all(|r| (r.first_seq, r.last_seq) == (0, 2)));
//! assert_eq!(runs[0].view, View::All);
//! ```

use std::collections::HashSet;

use crate::{
    AuditCursor, AuditEvent, AuditPage, AuditQuery, ChainKey, EventId, Order, unix_micros,
};

/// The widest time span of one run's events, in microseconds: a run's
/// entry is placed at its earliest event, so a reader that wants events
/// from `t` on starts at entries placed from `t - RUN_SPAN_US`, and one
/// going back in time from `t` may stop at an entry placed before
/// `t - RUN_SPAN_US`.
pub const RUN_SPAN_US: i64 = 1_000_000;

/// The most events one run lists, so that reading a run stays one small
/// range read.
pub const RUN_LEN: usize = 256;

/// One way of looking up the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum View {
    /// Every event.
    All,
    /// By agent (the chain).
    Agent,
    /// By customer.
    Subject,
    /// By tenant.
    Tenant,
    /// By the person acting.
    Actor,
    /// By session.
    Session,
}

impl View {
    /// A stable lower-case name (`all`, `agent`, `subject`, `tenant`,
    /// `actor`, `session`), for keys and columns.
    pub fn code(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Agent => "agent",
            Self::Subject => "subject",
            Self::Tenant => "tenant",
            Self::Actor => "actor",
            Self::Session => "session",
        }
    }

    /// The narrowest view that holds every event `query` can match, and
    /// its key (empty for [`View::All`]).
    pub fn for_query(query: &AuditQuery) -> (Self, String) {
        if let Some(s) = query.session {
            (Self::Session, s.to_string())
        } else if let Some(s) = &query.subject {
            (Self::Subject, s.as_str().to_owned())
        } else if let Some(a) = &query.agent {
            (Self::Agent, ChainKey::for_agent(a).as_str().to_owned())
        } else if let Some(t) = &query.tenant {
            (Self::Tenant, t.as_str().to_owned())
        } else if let Some(a) = &query.actor {
            (Self::Actor, a.as_str().to_owned())
        } else {
            (Self::All, String::new())
        }
    }
}

/// One entry of a view: consecutive events of one chain that share the
/// view's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewRun {
    /// The view.
    pub view: View,
    /// Its key (the agent's chain, the customer's id...; empty for
    /// [`View::All`]).
    pub key: String,
    /// The earliest time of the run's events, in microseconds since the
    /// Unix epoch: where the entry is placed.
    pub first_at_us: i64,
    /// The chain the events are on.
    pub chain: ChainKey,
    /// The first event's seq.
    pub first_seq: u64,
    /// The last event's seq.
    pub last_seq: u64,
    /// The first event's id.
    pub first_id: EventId,
}

/// The view entries of `events` (consecutive events of one chain, in
/// chain order, as one append writes them): per view key, its runs, at
/// most [`RUN_LEN`] events and [`RUN_SPAN_US`] apart each. Runs of one key
/// come out together, keys in the order they first appear.
pub fn view_runs(events: &[&AuditEvent]) -> Vec<ViewRun> {
    struct Open {
        run: ViewRun,
        len: usize,
        max_at: i64,
    }
    let mut by_key: Vec<((View, String), Vec<Open>)> = Vec::new();
    for event in events {
        let at = unix_micros(event.at);
        // The session's key, formatted on the stack (a `String` per event
        // was most of this function's allocations).
        let mut session_buf = uuid::Uuid::encode_buffer();
        let session = event
            .session
            .map(|s| &*s.as_uuid().hyphenated().encode_lower(&mut session_buf));
        let keys = [
            Some((View::All, "")),
            Some((View::Agent, event.chain.as_str())),
            event
                .subject
                .as_ref()
                .map(|s| (View::Subject, s.id.as_str())),
            event.tenant.as_ref().map(|t| (View::Tenant, t.as_str())),
            event.actor.id().map(|a| (View::Actor, a.as_str())),
            session.map(|s| (View::Session, s)),
        ];
        for (view, key) in keys.into_iter().flatten() {
            let runs = match by_key.iter().position(|(k, _)| k.0 == view && k.1 == key) {
                Some(k) => &mut by_key[k].1,
                None => {
                    by_key.push(((view, key.to_owned()), Vec::new()));
                    let last = by_key.len() - 1;
                    &mut by_key[last].1
                }
            };
            match runs.last_mut() {
                Some(open)
                    if open.run.last_seq.checked_add(1) == Some(event.seq)
                        && open.run.chain == event.chain
                        && open.len < RUN_LEN
                        && open.max_at.max(at) - open.run.first_at_us.min(at) <= RUN_SPAN_US =>
                {
                    open.run.last_seq = event.seq;
                    open.run.first_at_us = open.run.first_at_us.min(at);
                    open.max_at = open.max_at.max(at);
                    open.len += 1;
                }
                _ => runs.push(Open {
                    run: ViewRun {
                        view,
                        key: key.to_owned(),
                        first_at_us: at,
                        chain: event.chain.clone(),
                        first_seq: event.seq,
                        last_seq: event.seq,
                        first_id: event.id,
                    },
                    len: 1,
                    max_at: at,
                }),
            }
        }
    }
    by_key
        .into_iter()
        .flat_map(|(_, runs)| runs.into_iter().map(|o| o.run))
        .collect()
}

/// The placements (µs, inclusive) between which a view's entries can hold
/// events of `query`'s page: its window, narrowed by its cursor; `None`
/// leaves that side open.
pub fn entry_bounds(query: &AuditQuery) -> (Option<i64>, Option<i64>) {
    // Events are placed at whole microseconds; a bound between two of them
    // is rounded outward (an event at X µs lies before an `until` of X µs
    // and 500 ns), and the page's own filter keeps to the exact bound.
    let mut low = query.since.map(|s| micros_rounded(s, false) - RUN_SPAN_US);
    let mut high = query.until.map(|u| micros_rounded(u, true) - 1);
    if let Some(c) = query.cursor {
        let at = unix_micros(c.at);
        match query.order {
            Order::Oldest => low = Some(low.map_or(at - RUN_SPAN_US, |l| l.max(at - RUN_SPAN_US))),
            Order::Newest => high = Some(high.map_or(at, |h| h.min(at))),
        }
    }
    (low, high)
}

/// Microseconds since the Unix epoch, rounded down, or up with `up`.
fn micros_rounded(at: time::OffsetDateTime, up: bool) -> i64 {
    let nanos = at.unix_timestamp_nanos();
    let mut micros = nanos.div_euclid(1_000);
    if up && nanos.rem_euclid(1_000) != 0 {
        micros += 1;
    }
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

/// The fewest events a page call reads, matched or not, before it may
/// answer with what it has ([`PageReader::scan_bound`]).
pub const MIN_SCAN: usize = 1_024;

/// Events a page call may read per event of its page size, past
/// [`MIN_SCAN`] ([`PageReader::scan_bound`]).
pub const SCAN_PER_EVENT: usize = 16;

/// [`PageReader::scan_bound`] for a page of `limit` events (the memory
/// store keeps it too).
pub(crate) fn scan_bound_for(limit: usize) -> usize {
    limit.saturating_mul(SCAN_PER_EVENT).max(MIN_SCAN)
}

/// Gathers one page of `query` from its view's entries, read a batch at a
/// time in the query's order (by placement) within [`entry_bounds`]: hand
/// it each batch's events with [`PageReader::push`] until it says the page
/// is complete, then take the page with [`PageReader::finish`].
///
/// A query whose filters its view does not narrow (an action alone, say,
/// read from every event) may read many events for each it matches. Past
/// [`PageReader::scan_bound`] events read, at the first batch that has
/// also moved at least [`RUN_SPAN_US`] past where the query starts, a call
/// answers with the events it has found so far that no unread entry can
/// precede, possibly fewer than the page size or none, and a cursor to go
/// on from there. A call's work is bounded by that and by the events
/// placed in one span; paging through reads each entry at most twice; and
/// following `next` still yields every matching event once, in order.
#[derive(Debug)]
pub struct PageReader<'q> {
    query: &'q AuditQuery,
    limit: usize,
    events: Vec<AuditEvent>,
    // An entry left by an attempt that lost a race may list an event again.
    seen: HashSet<EventId>,
    scanned: usize,
    /// When the scan bound stopped the call short of a full page: the
    /// placement of the last entry read, and where the next call resumes.
    stopped: Option<(i64, AuditCursor)>,
}

impl<'q> PageReader<'q> {
    /// A reader for one page of `query`.
    pub fn new(query: &'q AuditQuery) -> Self {
        let limit = query.page_size();
        Self {
            query,
            limit,
            events: Vec::with_capacity(limit + 1),
            seen: HashSet::new(),
            scanned: 0,
            stopped: None,
        }
    }

    /// How many entries to read at a time.
    pub fn batch(&self) -> usize {
        (self.limit / 2).clamp(16, 128)
    }

    /// How many events, matched or not, a call reads before it answers
    /// short of a full page: [`SCAN_PER_EVENT`] per event of the page
    /// size, at least [`MIN_SCAN`].
    pub fn scan_bound(&self) -> usize {
        scan_bound_for(self.limit)
    }

    /// Where a page stopped by the scan bound at placement `last` goes on
    /// from: past every event no unread entry can precede (the oldest
    /// first: those before `last`; the newest first: those after `last +
    /// RUN_SPAN_US`), whatever their ids. `None` unless that is at least
    /// one span past where the query starts: each call re-reads the span
    /// before its start (entries placed there may reach into it), so
    /// moving on by less would read a crowded span again at every call;
    /// short of it, the call reads on.
    fn resume_at(&self, last: i64) -> Option<AuditCursor> {
        let at = |us: i64, nanos: i128| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000 + nanos).ok()
        };
        let span = time::Duration::microseconds(RUN_SPAN_US);
        match self.query.order {
            Order::Oldest => {
                let cursor = AuditCursor {
                    at: at(last, -1)?,
                    id: EventId::from_uuid(uuid::Uuid::max()),
                };
                let start = self.query.cursor.map(|c| c.at).max(self.query.since);
                let far_enough =
                    start.is_none_or(|s| s.checked_add(span).is_some_and(|s| cursor.at >= s));
                far_enough.then_some(cursor)
            }
            Order::Newest => {
                let cursor = AuditCursor {
                    at: at(last.checked_add(RUN_SPAN_US)?, 1)?,
                    id: EventId::from_uuid(uuid::Uuid::nil()),
                };
                let start = match (self.query.cursor.map(|c| c.at), self.query.until) {
                    (Some(c), Some(u)) => Some(c.min(u)),
                    (c, u) => c.or(u),
                };
                let far_enough =
                    start.is_none_or(|s| s.checked_sub(span).is_some_and(|s| cursor.at <= s));
                far_enough.then_some(cursor)
            }
        }
    }

    /// Takes the events of the entries just read (in any order; those the
    /// query does not match are dropped). `last_placed` is the placement of
    /// the last entry read when the batch was full (more may follow), or
    /// `None` when the view has no more entries. Returns whether the page
    /// is complete: no entry still unread can hold an event that sorts
    /// before the first one the page leaves out.
    pub fn push(
        &mut self,
        events: impl IntoIterator<Item = AuditEvent>,
        last_placed: Option<i64>,
    ) -> bool {
        for event in events {
            self.scanned = self.scanned.saturating_add(1);
            if self.query.matches(&event)
                && self.query.after_cursor(&event)
                && self.seen.insert(event.id)
            {
                self.events.push(event);
            }
        }
        let Some(last) = last_placed else {
            return true;
        };
        if self.events.len() > self.limit {
            self.sort();
            self.events.truncate(self.limit + 1);
            let cut = self.events.last().map_or(0, |e| unix_micros(e.at));
            let complete = match self.query.order {
                Order::Oldest => last > cut,
                Order::Newest => last.saturating_add(RUN_SPAN_US) < cut,
            };
            if complete {
                return true;
            }
        }
        if self.scanned >= self.scan_bound()
            && let Some(resume) = self.resume_at(last)
        {
            self.stopped = Some((last, resume));
            return true;
        }
        false
    }

    /// The page, in the query's exact `(at, id)` order, with its cursor.
    pub fn finish(mut self) -> AuditPage {
        // Stopped by the scan bound: only the events no unread entry can
        // precede, and on from past them.
        let mut resume = None;
        if let Some((last, cursor)) = self.stopped {
            resume = Some(cursor);
            let horizon = last.saturating_add(RUN_SPAN_US);
            self.events.retain(|e| match self.query.order {
                Order::Oldest => unix_micros(e.at) < last,
                Order::Newest => unix_micros(e.at) > horizon,
            });
        }
        self.sort();
        let next = if self.events.len() > self.limit {
            self.events.truncate(self.limit);
            self.events.last().map(AuditCursor::after)
        } else {
            resume
        };
        AuditPage {
            events: self.events,
            next,
        }
    }

    fn sort(&mut self) {
        match self.query.order {
            Order::Oldest => self.events.sort_by_key(|e| (e.at, e.id)),
            Order::Newest => self.events.sort_by_key(|e| std::cmp::Reverse((e.at, e.id))),
        }
    }
}
