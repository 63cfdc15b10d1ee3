//! The page reader of `views`, driven as a store drives it (the Diesel
//! and Redis stores read their audit pages through it): entries of a view
//! read a batch at a time in placement order, within `entry_bounds`, after
//! a keyset. Paging through any query yields exactly its events, in
//! order, each once; and a query its view does not narrow stops each call
//! at its scan bound, answering short of a full page with a cursor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use impersonation_core::views::{PageReader, View, ViewRun, entry_bounds, view_runs};
use impersonation_core::{
    Actor, AuditAction, AuditDraft, AuditEvent, AuditPage, AuditQuery, ChainHead, ChainKey, Order,
    UserId,
};
use proptest::prelude::*;
use time::{Duration, OffsetDateTime};

/// A trail as a store keeps it: each chain's events by position, and the
/// view entries each appended batch made.
#[derive(Default)]
struct Trail {
    events: HashMap<(ChainKey, u64), AuditEvent>,
    runs: Vec<ViewRun>,
    heads: HashMap<ChainKey, ChainHead>,
}

impl Trail {
    /// Appends one batch of one agent's events: `(offset in ms, modification)`.
    fn append(&mut self, agent: &UserId, batch: &[(i64, bool)]) {
        let chain = ChainKey::for_agent(agent);
        let mut sealed = Vec::new();
        for &(ms, modification) in batch {
            let action = if modification {
                AuditAction::Modification
            } else {
                AuditAction::Access
            };
            let at =
                OffsetDateTime::UNIX_EPOCH + Duration::days(20_000) + Duration::milliseconds(ms);
            let actor = Actor::user(agent.clone(), "agent");
            let event = AuditDraft::new(at, action, actor, chain.clone())
                .seal(self.heads.get(&chain).copied());
            self.heads.insert(chain.clone(), event.head());
            sealed.push(event);
        }
        self.runs
            .extend(view_runs(&sealed.iter().collect::<Vec<_>>()));
        for event in sealed {
            self.events.insert((event.chain.clone(), event.seq), event);
        }
    }

    /// One page of `query`, read as the Diesel store reads it; with the
    /// number of events each batch read.
    fn page(&self, query: &AuditQuery) -> (AuditPage, Vec<usize>) {
        let (view, key) = View::for_query(query);
        let (low, high) = entry_bounds(query);
        let mut entries: Vec<&ViewRun> = self
            .runs
            .iter()
            .filter(|r| r.view == view && r.key == key)
            .filter(|r| low.is_none_or(|l| r.first_at_us >= l))
            .filter(|r| high.is_none_or(|h| r.first_at_us <= h))
            .collect();
        entries.sort_by(|a, b| {
            (a.first_at_us, a.chain.as_str(), a.first_seq).cmp(&(
                b.first_at_us,
                b.chain.as_str(),
                b.first_seq,
            ))
        });
        if query.order == Order::Newest {
            entries.reverse();
        }
        let mut reader = PageReader::new(query);
        let batch = reader.batch();
        let mut read = Vec::new();
        for runs in entries.chunks(batch).chain(std::iter::once(&[][..])) {
            let events: Vec<AuditEvent> = runs
                .iter()
                .flat_map(|r| {
                    (r.first_seq..=r.last_seq)
                        .map(|seq| self.events[&(r.chain.clone(), seq)].clone())
                })
                .collect();
            read.push(events.len());
            let last = runs
                .last()
                .filter(|_| runs.len() == batch)
                .map(|r| r.first_at_us);
            if reader.push(events, last) {
                return (reader.finish(), read);
            }
        }
        unreachable!("the last, empty batch always completes the page")
    }

    /// Every page of `query`, following `next`.
    fn all_pages(&self, query: &AuditQuery) -> Vec<(AuditPage, Vec<usize>)> {
        let mut q = query.clone();
        let mut pages = Vec::new();
        loop {
            let (page, read) = self.page(&q);
            let next = page.next;
            pages.push((page, read));
            match next {
                Some(c) => q.cursor = Some(c),
                None => return pages,
            }
            assert!(pages.len() < 100_000, "paging does not end: {query:?}");
        }
    }

    fn expected(&self, query: &AuditQuery) -> Vec<&AuditEvent> {
        let mut want: Vec<&AuditEvent> =
            self.events.values().filter(|e| query.matches(e)).collect();
        want.sort_by_key(|e| (e.at, e.id));
        if query.order == Order::Newest {
            want.reverse();
        }
        want
    }
}

/// Checks paging through `query` over `trail`: exactly the expected
/// events, in order, at most a page's size each; each call stops at the
/// first batch past its scan bound. Returns how many pages were short of
/// the page size while `next` went on.
fn check(trail: &Trail, query: &AuditQuery) -> usize {
    let pages = trail.all_pages(query);
    let limit = query.page_size();
    let bound = PageReader::new(query).scan_bound();
    let mut short = 0;
    let mut seen = Vec::new();
    for (page, read) in &pages {
        assert!(page.events.len() <= limit, "{query:?}");
        if page.next.is_some() && page.events.len() < limit {
            short += 1;
        }
        // Every batch but the last read before the bound was reached.
        let before_last: usize = read[..read.len() - 1].iter().sum();
        assert!(
            before_last < bound,
            "read {before_last} events past the bound {bound}: {query:?}"
        );
        seen.extend(page.events.iter().cloned());
    }
    let seen: Vec<&AuditEvent> = seen.iter().collect();
    assert_eq!(seen, trail.expected(query), "{query:?}");
    short
}

/// Events spread over minutes (ten a second, out of order within their
/// batch), one in `rare` a modification: a query for modifications, which
/// reads every event, answers short pages as it goes, and still finds each
/// one once, in both orders, with and without a window.
#[test]
fn a_sparse_query_stops_at_its_scan_bound_and_misses_nothing() {
    let mut trail = Trail::default();
    let agents = [UserId::new("sam").unwrap(), UserId::new("lee").unwrap()];
    let rare = 400;
    let mut n = 0_i64;
    for round in 0..300_i64 {
        let agent = &agents[usize::from(round % 3 == 0)];
        let batch: Vec<(i64, bool)> = (0..20_i64)
            .map(|i| {
                n += 1;
                // Out of order within a batch, ties between batches.
                (round * 1_000 + (i * 7) % 20 * 50, n % rare == 0)
            })
            .collect();
        trail.append(agent, &batch);
    }
    let at = |s: i64| OffsetDateTime::UNIX_EPOCH + Duration::days(20_000) + Duration::seconds(s);
    let mut short = 0;
    for order in [Order::Oldest, Order::Newest] {
        for (since, until) in [(None, None), (Some(at(40)), Some(at(250)))] {
            for (limit, agent) in [(1, None), (3, None), (100, None), (2, Some(&agents[1]))] {
                let query = AuditQuery {
                    action: Some(AuditAction::Modification),
                    agent: agent.cloned(),
                    since,
                    until,
                    order,
                    limit,
                    ..AuditQuery::default()
                };
                short += check(&trail, &query);
            }
            // A query its view narrows reads no more than it needs.
            let query = AuditQuery {
                agent: Some(agents[0].clone()),
                since,
                until,
                order,
                limit: 5,
                ..AuditQuery::default()
            };
            assert_eq!(check(&trail, &query), 0, "{query:?}");
        }
    }
    assert!(short > 0, "some calls stopped short of a full page");
}

/// A query its view does not narrow (changes alone, read from every
/// event), one event a page.
fn one_change_a_page(order: Order) -> AuditQuery {
    AuditQuery {
        action: Some(AuditAction::Modification),
        order,
        limit: 1,
        ..AuditQuery::default()
    }
}

/// More events placed within one run's span than a call may read: the
/// call cannot stop there without going back to where it began, so it
/// reads on to where it can; paging still ends and misses nothing.
#[test]
fn a_crowded_second_is_read_past_rather_than_paged_forever() {
    let mut trail = Trail::default();
    let sam = UserId::new("sam").unwrap();
    for round in 0..150_i64 {
        // 3,000 events within one second, then a few spread out.
        let batch: Vec<(i64, bool)> = (0..20_i64)
            .map(|i| (i * 37 % 900, (round + i) % 997 == 0))
            .collect();
        trail.append(&sam, &batch);
    }
    trail.append(&sam, &[(5_000, true), (9_000, false), (12_000, true)]);
    for order in [Order::Oldest, Order::Newest] {
        let query = one_change_a_page(order);
        let pages = trail.all_pages(&query);
        let seen: Vec<&AuditEvent> = pages.iter().flat_map(|(p, _)| &p.events).collect();
        assert_eq!(seen, trail.expected(&query), "{order:?}");
        // Each call re-reads the span before where it starts; a call that
        // moved on by less than a span would read the crowd again and
        // again. Paging through reads each event at most about twice.
        let read: usize = pages.iter().flat_map(|(_, r)| r).sum();
        assert!(
            read <= 3 * trail.events.len(),
            "{order:?}: {read} reads for {} events",
            trail.events.len()
        );
    }
}

/// An event placed where a call stopped short is left for the next page,
/// and the next page's cursor lets it in whatever its id (one that is
/// nil, as a draft may carry, included).
#[test]
fn an_event_at_the_stop_is_left_for_the_next_page_whatever_its_id() {
    let sam = UserId::new("sam").unwrap();
    let chain = ChainKey::for_agent(&sam);
    let base = OffsetDateTime::UNIX_EPOCH + Duration::days(20_000);
    let actor = Actor::user(sam.clone(), "Sam");
    let mut head = None;
    let mut seal = |at: OffsetDateTime, action: AuditAction, nil: bool| {
        let mut draft = AuditDraft::new(at, action, actor.clone(), chain.clone());
        if nil {
            draft.id = impersonation_core::EventId::from_uuid(uuid::Uuid::nil());
        }
        let event = draft.seal(head);
        head = Some(event.head());
        event
    };
    for order in [Order::Oldest, Order::Newest] {
        let query = one_change_a_page(order);
        let mut reader = PageReader::new(&query);
        // Filler the query does not match, then a match exactly at the
        // last placement read (oldest first) or just inside the span past
        // it (newest first): an unread entry could hold an event before it.
        let last = impersonation_core::unix_micros(base);
        let boundary = match order {
            Order::Oldest => base,
            Order::Newest => base + Duration::microseconds(impersonation_core::views::RUN_SPAN_US),
        };
        let mut events: Vec<AuditEvent> = (0..reader.scan_bound())
            .map(|_| seal(base, AuditAction::Access, false))
            .collect();
        events.push(seal(boundary, AuditAction::Modification, true));
        assert!(
            reader.push(events.clone(), Some(last)),
            "{order:?}: stopped"
        );
        let page = reader.finish();
        assert!(page.events.is_empty(), "{order:?}: {:?}", page.events);
        let next = AuditQuery {
            cursor: page.next,
            ..query.clone()
        };
        let matched = events.last().unwrap();
        assert!(
            next.after_cursor(matched),
            "{order:?}: the next page lets it in"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any trail and any query page to exactly the expected events.
    #[test]
    fn any_query_pages_to_exactly_its_events(
        batches in prop::collection::vec(
            (any::<bool>(), prop::collection::vec((0..600_000_i64, prop::bool::weighted(0.02)), 1..40)),
            1..80,
        ),
        newest in any::<bool>(),
        limit in 1..30_u32,
        by_agent in any::<bool>(),
        window in prop::option::of((0..600_i64, 0..600_i64)),
    ) {
        let mut trail = Trail::default();
        let agents = [UserId::new("sam").unwrap(), UserId::new("lee").unwrap()];
        for (second, batch) in &batches {
            trail.append(&agents[usize::from(*second)], batch);
        }
        let at = |s: i64| OffsetDateTime::UNIX_EPOCH + Duration::days(20_000) + Duration::seconds(s);
        let query = AuditQuery {
            action: Some(AuditAction::Modification),
            agent: by_agent.then(|| agents[1].clone()),
            since: window.map(|(a, _)| at(a)),
            until: window.map(|(_, b)| at(b)),
            order: if newest { Order::Newest } else { Order::Oldest },
            limit,
            ..AuditQuery::default()
        };
        check(&trail, &query);
    }
}
