//! The store conformance suite: every promise of the `Store` trait, as one
//! async function each. Adapters run them all with one line:
//!
//! ```ignore
//! impersonation_testkit::store_conformance_tests!(async { my_adapter().await });
//! ```
//!
//! Each case builds its own [`World`] namespace, so a factory may hand every
//! case the same database; queries in the cases are always filtered to the
//! case's own people.

use std::collections::BTreeSet;
use std::sync::Arc;

use impersonation_core::{
    Actor, AppendGuard, AuditAction, AuditDraft, AuditEvent, AuditQuery, ChainKey, Details,
    EndReason, LiveFilter, MAX_PAGE, Order, Policy, Principal, Session, SessionId, SessionSecret,
    SessionState, StartOutcome, Store, StoreError, Touch, UserId, verify_chain,
};
use time::{Duration, OffsetDateTime};

use crate::world::{World, epoch};

/// Starts and expects success.
pub async fn must_start<S: Store + ?Sized>(
    store: &S,
    start: impersonation_core::Start,
) -> (Session, AuditEvent) {
    match store.start(start).await {
        Ok(StartOutcome::Started { session, event }) => (*session, event),
        Ok(StartOutcome::Refused { live, .. }) => panic!("start refused, live session {live}"),
        Err(e) => panic!("start failed: {e}"),
    }
}

/// Every event of a chain, in order of position.
pub async fn whole_chain<S: Store + ?Sized>(store: &S, chain: &ChainKey) -> Vec<AuditEvent> {
    let mut all = Vec::new();
    loop {
        let page = store
            .chain_events(chain, all.len() as u64, 100)
            .await
            .expect("chain_events");
        let done = page.len() < 100;
        all.extend(page);
        if done {
            return all;
        }
    }
}

/// The ids of the live sessions a filter lists, in the store's order.
pub async fn live_ids<S: Store + ?Sized>(store: &S, filter: &LiveFilter) -> Vec<SessionId> {
    store
        .live_sessions(filter)
        .await
        .expect("live_sessions")
        .into_iter()
        .map(|s| s.id)
        .collect()
}

/// Every event matching a query, following cursors.
pub async fn all_events<S: Store + ?Sized>(store: &S, query: AuditQuery) -> Vec<AuditEvent> {
    let mut query = query;
    let mut out = Vec::new();
    loop {
        let page = store.audit(&query).await.expect("audit query");
        out.extend(page.events);
        match page.next {
            Some(cursor) => query.cursor = Some(cursor),
            None => return out,
        }
    }
}

/// Asserts the chain verifies against the store's head, and that the
/// head is its last event's (`None` only for a chain with none): a store
/// that left the head behind on some path (a refusal, a batch) would
/// otherwise pass, since `verify_chain` takes `None` as "no head to
/// compare".
pub async fn assert_chain_verifies<S: Store + ?Sized>(store: &S, chain: &ChainKey) -> u64 {
    let events = whole_chain(store, chain).await;
    let head = store.chain_head(chain).await.expect("chain_head");
    assert_eq!(
        head,
        events.last().map(AuditEvent::head),
        "chain {chain}: the head is not its last event's"
    );
    match verify_chain(chain, &events, head) {
        Ok(report) => report.events,
        Err(b) => panic!("chain {chain} does not verify: {b}"),
    }
}

fn by_session(session: &Session) -> AuditQuery {
    AuditQuery {
        session: Some(session.id),
        ..AuditQuery::default()
    }
}

/// `start` writes the session and its start event together, and reads back exactly.
pub async fn start_writes_the_session_and_its_event<S: Store>(store: S) {
    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let (start, secret) = w.begin(&agent, &customer, epoch());
    let expected = start.session().clone();
    let (session, event) = must_start(&store, start).await;
    assert_eq!(session, expected);
    assert_eq!(
        store.session(session.id).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        store.find_by_secret(&secret.lookup(), None).await.unwrap(),
        Some(expected)
    );
    assert_eq!(event.action, AuditAction::SessionStarted);
    assert_eq!(event.session, Some(session.id));
    assert_eq!(event.seq, 0);
    let events = all_events(&store, by_session(&session)).await;
    assert_eq!(events, vec![event]);
    assert_chain_verifies(&store, &session.chain()).await;
}

/// Session times keep their microseconds (the core's precision) at the
/// start, a touch and a re-check: the cases above use whole seconds, so
/// a store that kept whole seconds, or rounded, would pass them.
pub async fn session_times_keep_their_microseconds<S: Store>(store: S) {
    let w = World::new();
    let at = epoch() + Duration::microseconds(123_457);
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), at);
    let expected = start.session().clone();
    let (session, _) = must_start(&store, start).await;
    assert_eq!(store.session(session.id).await.unwrap(), Some(expected));
    let touched_at = at + Duration::microseconds(2_500_001);
    let touch = Touch {
        now: touched_at,
        coalesce: Duration::ZERO,
    };
    store
        .find_by_secret(&secret.lookup(), Some(touch))
        .await
        .unwrap()
        .expect("found");
    let read = store.session(session.id).await.unwrap().expect("session");
    assert_eq!(read.last_seen_at, touched_at);
    let checked_at = at + Duration::microseconds(3_000_007);
    store
        .record_check(session.id, read.version, checked_at, &read.shadow)
        .await
        .unwrap();
    let read = store.session(session.id).await.unwrap().expect("session");
    assert_eq!(
        (read.last_seen_at, read.last_checked_at),
        (touched_at, checked_at)
    );
}

/// A second live session for one agent is refused, and the refusal is audited.
pub async fn start_refuses_a_second_live_session_and_audits_it<S: Store>(store: S) {
    let w = World::new();
    let agent = w.agent(1);
    let (first, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let (live, _) = must_start(&store, first).await;
    let (second, secret2) = w.begin(&agent, &w.customer(2, "t1"), epoch());
    let second_id = second.session().id;
    let refusal = match store.start(second).await.unwrap() {
        StartOutcome::Refused { live: id, event } => {
            assert_eq!(id, live.id);
            assert_eq!(event.action, AuditAction::Denied);
            assert_eq!(event.details.get("denial"), Some("active_session_exists"));
            assert_eq!(event.seq, 1);
            event
        }
        StartOutcome::Started { .. } => panic!("second live session for one agent was started"),
    };
    assert!(store.session(second_id).await.unwrap().is_none());
    assert!(
        store
            .find_by_secret(&secret2.lookup(), None)
            .await
            .unwrap()
            .is_none()
    );
    let live_now = store
        .live_sessions(&LiveFilter {
            agent: Some(agent.id.clone()),
            ..LiveFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(live_now.len(), 1);
    assert_eq!(assert_chain_verifies(&store, &live.chain()).await, 2);
    // The refusal is stored as answered, and found by the trail's queries
    // (a store that keeps views must write the refusal's too).
    let stored = whole_chain(&store, &live.chain()).await;
    assert_eq!(stored[1], refusal);
    let denied = AuditQuery {
        agent: Some(agent.id.clone()),
        action: Some(AuditAction::Denied),
        ..AuditQuery::default()
    };
    assert_eq!(all_events(&store, denied).await, vec![refusal]);
}

/// A pending session also holds the agent's one slot.
pub async fn a_pending_session_counts_as_live<S: Store>(store: S) {
    let w = World::new();
    let consent = Policy::default().consent(impersonation_core::Consent::Required {
        timeout: Duration::minutes(10),
    });
    let agent = w.agent(1);
    let (first, _) = w.begin_with(&consent, &agent, &w.customer(1, "t1"), epoch());
    let (pending, event) = must_start(&store, first).await;
    assert_eq!(pending.state, SessionState::Pending);
    assert_eq!(event.action, AuditAction::SessionRequested);
    let (second, _) = w.begin(&agent, &w.customer(2, "t1"), epoch());
    match store.start(second).await.unwrap() {
        StartOutcome::Refused { live, .. } => assert_eq!(live, pending.id),
        StartOutcome::Started { .. } => panic!("a second session beside a pending one"),
    }
    assert_eq!(assert_chain_verifies(&store, &pending.chain()).await, 2);
}

/// Different agents hold sessions independently, even on one customer.
pub async fn agents_hold_sessions_independently<S: Store>(store: S) {
    let w = World::new();
    let customer = w.customer(1, "t1");
    let (a, _) = w.begin(&w.agent(1), &customer, epoch());
    let (b, secret_b) = w.begin(&w.agent(2), &customer, epoch());
    let (sa, _) = must_start(&store, a).await;
    let (sb, _) = must_start(&store, b).await;
    assert_ne!(sa.id, sb.id);
    let found = store
        .find_by_secret(&secret_b.lookup(), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        found.agent.id,
        w.agent(2).id,
        "each agent gets themself back"
    );
    let on_customer = store
        .live_sessions(&LiveFilter {
            subject: Some(customer.id.clone()),
            ..LiveFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(on_customer.len(), 2);
}

/// A transition writes the new state and its event together; the agent's slot frees on end.
pub async fn transition_writes_state_and_event_together<S: Store>(store: S) {
    let w = World::new();
    let agent = w.agent(1);
    let (start, secret) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let t = session
        .end(
            EndReason::Stopped,
            Actor::user(agent.id.clone(), "Agent 1"),
            epoch() + Duration::minutes(5),
            Details::new(),
        )
        .unwrap();
    let (ended, event) = store.transition(t).await.unwrap();
    assert_eq!(ended.state, SessionState::Ended(EndReason::Stopped));
    assert_eq!(ended.version, 1);
    assert_eq!(event.action, AuditAction::SessionEnded);
    assert_eq!(event.details.get("reason"), Some("stopped"));
    assert_eq!(
        store.session(session.id).await.unwrap(),
        Some(ended.clone())
    );
    assert_eq!(
        store.find_by_secret(&secret.lookup(), None).await.unwrap(),
        Some(ended)
    );
    let live = store
        .live_sessions(&LiveFilter {
            agent: Some(agent.id.clone()),
            ..LiveFilter::default()
        })
        .await
        .unwrap();
    assert!(live.is_empty());
    let (again, _) = w.begin(&agent, &w.customer(2, "t1"), epoch() + Duration::minutes(6));
    must_start(&store, again).await;
    assert_eq!(assert_chain_verifies(&store, &session.chain()).await, 3);
}

/// A transition computed from a stale record conflicts and writes nothing.
pub async fn stale_transition_conflicts_and_writes_nothing<S: Store>(store: S) {
    let w = World::new();
    let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let first = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    let stale = session
        .end(EndReason::Revoked, Actor::System, epoch(), Details::new())
        .unwrap();
    store.transition(first).await.unwrap();
    match store.transition(stale).await {
        Err(StoreError::Conflict(id)) => assert_eq!(id, session.id),
        other => panic!("stale transition: expected Conflict, got {other:?}"),
    }
    let ended = store.session(session.id).await.unwrap().unwrap();
    assert_eq!(ended.state, SessionState::Ended(EndReason::Stopped));
    let ends = all_events(
        &store,
        AuditQuery {
            session: Some(session.id),
            action: Some(AuditAction::SessionEnded),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(ends.len(), 1, "exactly one end event");
    // Started and ended: the refused change left no event on the chain
    // (an event written before the version check was lost would).
    assert_eq!(assert_chain_verifies(&store, &session.chain()).await, 2);

    // The version decides, not the state: on a session still live, a
    // change made from a copy an activation has overtaken conflicts too
    // (a store that only refused changes to ended sessions would let a
    // decline undo a consent).
    let consent = Policy::default().consent(impersonation_core::Consent::Required {
        timeout: Duration::minutes(10),
    });
    let (pending_start, pending_secret) =
        w.begin_with(&consent, &w.agent(2), &w.customer(1, "t1"), epoch());
    let (pending, _) = must_start(&store, pending_start).await;
    let activate = pending
        .activate(Actor::System, epoch() + Duration::seconds(5))
        .unwrap();
    let (active, _) = store.transition(activate).await.unwrap();
    assert_eq!(active.state, SessionState::Active);
    for stale in [
        pending
            .activate(Actor::System, epoch() + Duration::seconds(6))
            .unwrap(),
        pending
            .end(
                EndReason::ConsentDenied,
                Actor::System,
                epoch(),
                Details::new(),
            )
            .unwrap(),
    ] {
        match store.transition(stale).await {
            Err(StoreError::Conflict(id)) => assert_eq!(id, pending.id),
            other => panic!("stale change of a live session: expected Conflict, got {other:?}"),
        }
    }
    let now = store.session(pending.id).await.unwrap().unwrap();
    assert_eq!(
        now, active,
        "the activated record, as the transition wrote it"
    );
    // Requested and started, no more: neither stale change wrote its
    // event (a second start, an end of a live session).
    assert_eq!(assert_chain_verifies(&store, &pending.chain()).await, 2);
    // The activation moved the expiry (from the consent window's end to
    // the session's hour): a touch past the window's end applies, as a
    // store that judged by the pending expiry would refuse it.
    assert!(active.expires_at > pending.expires_at);
    let past_window = pending.expires_at + Duration::minutes(1);
    let found = store
        .find_by_secret(
            &pending_secret.lookup(),
            Some(Touch {
                now: past_window,
                coalesce: Duration::ZERO,
            }),
        )
        .await
        .unwrap();
    assert_eq!(found, Some(active), "as it was before the touch");
    assert_eq!(
        store
            .session(pending.id)
            .await
            .unwrap()
            .unwrap()
            .last_seen_at,
        past_window,
        "touched past the consent window"
    );
}

/// A transition on a session the store never saw is `SessionNotFound`, and writes nothing.
pub async fn transition_of_an_unknown_session_is_not_found<S: Store>(store: S) {
    let w = World::new();
    let (start, _) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let ghost = start.session().clone();
    let t = ghost
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    assert!(matches!(
        store.transition(t).await,
        Err(StoreError::SessionNotFound(_))
    ));
    assert!(store.chain_head(&ghost.chain()).await.unwrap().is_none());
}

/// Lookup is by secret hash only; an unknown hash finds nothing.
pub async fn find_by_secret_finds_only_by_hash<S: Store>(store: S) {
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let stored = must_start(&store, start).await.0;
    // Unknown secrets: another agent's (another route), and one of the
    // same agent's, which shares the stored secret's route.
    let (_, other) = w.begin(&w.agent(2), &w.customer(1, "t1"), epoch());
    let (_, same_route) = w.begin(&w.agent(1), &w.customer(2, "t1"), epoch());
    for unknown in [other, same_route] {
        assert!(
            store
                .find_by_secret(&unknown.lookup(), None)
                .await
                .unwrap()
                .is_none()
        );
    }
    let found = store.find_by_secret(&secret.lookup(), None).await.unwrap();
    assert_eq!(found.map(|s| s.id), Some(stored.id));
}

/// `find_by_secret` with the idle touch at `now`: the record as before it.
async fn touch<S: Store>(
    store: &S,
    secret: &SessionSecret,
    now: OffsetDateTime,
    coalesce: Duration,
) -> Option<Session> {
    store
        .find_by_secret(&secret.lookup(), Some(Touch { now, coalesce }))
        .await
        .unwrap()
}

/// A touch never moves `last_seen_at` back: one sent with a time before
/// the stored one (another process's clock behind, a request that waited)
/// finds the session and leaves the time, whatever the coalescing.
pub async fn a_touch_never_moves_last_seen_back<S: Store>(store: S) {
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let later = epoch() + Duration::seconds(16);
    touch(&store, &secret, later, Duration::ZERO).await;
    assert_eq!(last_seen(&store, session.id).await, later);
    let found = touch(
        &store,
        &secret,
        epoch() + Duration::seconds(5),
        Duration::ZERO,
    )
    .await;
    assert_eq!(found.map(|s| s.id), Some(session.id));
    assert_eq!(last_seen(&store, session.id).await, later);
}

/// When the stored session was last seen.
async fn last_seen<S: Store>(store: &S, id: SessionId) -> OffsetDateTime {
    store.session(id).await.unwrap().unwrap().last_seen_at
}

/// A session that never idles (an idle timeout as long as a `Duration`
/// goes) is found and touched like any other: nothing in the store's
/// arithmetic on its times overflows.
pub async fn a_session_that_never_idles_is_found_and_touched<S: Store>(store: S) {
    let w = World::new();
    let policy = w.policy.clone().idle_timeout(Duration::MAX);
    let (start, secret) = w.begin_with(&policy, &w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let t1 = epoch() + Duration::seconds(30);
    let found = touch(&store, &secret, t1, Duration::seconds(10)).await;
    assert_eq!(found.map(|s| s.id), Some(session.id));
    assert_eq!(last_seen(&store, session.id).await, t1);
}

/// A touch of a window before its own time (negative, as far as a
/// `Duration` goes) is due whatever the session's last use, as
/// [`Touch::applies_to`] has it: nothing in the store's arithmetic on the
/// window overflows or turns its sign.
pub async fn a_touch_of_a_negative_window_is_always_due<S: Store>(store: S) {
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    for (seconds, coalesce) in [
        (1, Duration::MIN),
        (2, Duration::microseconds(-1)),
        (3, Duration::MIN),
    ] {
        let now = epoch() + Duration::seconds(seconds);
        let current = store.session(session.id).await.unwrap().unwrap();
        assert!(Touch { now, coalesce }.applies_to(&current), "{coalesce}");
        let found = touch(&store, &secret, now, coalesce).await;
        assert_eq!(found.map(|s| s.id), Some(session.id), "{coalesce}");
        assert_eq!(last_seen(&store, session.id).await, now, "{coalesce}");
    }
}

/// A window with a part of a microsecond is not cut to the microsecond
/// below: 1.5 µs after the last use is not yet due at 1 µs, and is at 2.
pub async fn a_touch_window_of_part_of_a_microsecond_is_not_cut_short<S: Store>(store: S) {
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let coalesce = Duration::nanoseconds(1_500);
    let seen = session.last_seen_at;
    let early = seen + Duration::microseconds(1);
    let current = store.session(session.id).await.unwrap().unwrap();
    assert!(
        !Touch {
            now: early,
            coalesce
        }
        .applies_to(&current)
    );
    touch(&store, &secret, early, coalesce).await;
    assert_eq!(
        last_seen(&store, session.id).await,
        seen,
        "1 µs of 1.5: not due"
    );
    let due = seen + Duration::microseconds(2);
    touch(&store, &secret, due, coalesce).await;
    assert_eq!(last_seen(&store, session.id).await, due, "2 µs of 1.5: due");
}

/// A touch is coalesced at most half the session's own idle timeout,
/// whatever the caller asks: a longer coalescing would let a session used
/// every few minutes idle out.
pub async fn a_touch_is_coalesced_at_most_half_the_idle_timeout<S: Store>(store: S) {
    let w = World::new();
    let policy = w.policy.clone().idle_timeout(Duration::minutes(10));
    let (start, secret) = w.begin_with(&policy, &w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let at = |minutes| epoch() + Duration::minutes(minutes);
    touch(&store, &secret, at(4), Duration::hours(1)).await;
    assert_eq!(
        last_seen(&store, session.id).await,
        epoch(),
        "4 minutes: within half of 10"
    );
    touch(&store, &secret, at(6), Duration::hours(1)).await;
    assert_eq!(
        last_seen(&store, session.id).await,
        epoch() + Duration::minutes(6),
        "6 minutes: past half of 10, touched although an hour was asked"
    );
}

/// The touch writes `last_seen_at`, returns the record as before it, and is coalesced.
pub async fn touch_updates_last_seen_and_is_coalesced<S: Store>(store: S) {
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let t1 = epoch() + Duration::seconds(30);
    let before = touch(&store, &secret, t1, Duration::seconds(10))
        .await
        .unwrap();
    assert_eq!(
        before.last_seen_at, session.last_seen_at,
        "returns the record before the touch"
    );
    let after = store.session(session.id).await.unwrap().unwrap();
    assert_eq!(after.last_seen_at, t1);
    assert_eq!(
        after.version, session.version,
        "a touch is not a transition"
    );
    // Within the coalescing window: no write.
    let t2 = t1 + Duration::seconds(5);
    touch(&store, &secret, t2, Duration::seconds(10)).await;
    assert_eq!(last_seen(&store, session.id).await, t1);
    // Past it: written.
    let t3 = t1 + Duration::seconds(10);
    touch(&store, &secret, t3, Duration::seconds(10)).await;
    assert_eq!(last_seen(&store, session.id).await, t3);
}

/// A touch never revives an idle or expired session, nor touches a pending or ended one.
pub async fn touch_never_revives_a_lapsed_session<S: Store>(store: S) {
    let w = World::new();
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let idle = session.idle_deadline();
    for now in [
        idle,
        idle + Duration::seconds(1),
        session.expires_at + Duration::seconds(1),
    ] {
        touch(&store, &secret, now, Duration::ZERO).await;
        assert_eq!(
            last_seen(&store, session.id).await,
            session.last_seen_at,
            "touch at {now} revived a lapsed session"
        );
    }
    let t = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    store.transition(t).await.unwrap();
    let now = epoch() + Duration::seconds(1);
    touch(&store, &secret, now, Duration::ZERO).await;
    assert_eq!(last_seen(&store, session.id).await, session.last_seen_at);

    let consent = Policy::default().consent(impersonation_core::Consent::Required {
        timeout: Duration::minutes(10),
    });
    let (pending, psecret) = w.begin_with(&consent, &w.agent(2), &w.customer(1, "t1"), epoch());
    let (pending, _) = must_start(&store, pending).await;
    touch(&store, &psecret, now, Duration::ZERO).await;
    assert_eq!(last_seen(&store, pending.id).await, pending.last_seen_at);

    // Expiry on its own: a session that would idle out only after its end
    // is still not touched once its time is up.
    let long_idle = Policy::default()
        .max_duration(Duration::minutes(10))
        .idle_timeout(Duration::hours(1));
    let (start, secret) = w.begin_with(&long_idle, &w.agent(3), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    assert!(session.idle_deadline() > session.expires_at + Duration::seconds(1));
    for now in [
        session.expires_at,
        session.expires_at + Duration::seconds(1),
    ] {
        touch(&store, &secret, now, Duration::ZERO).await;
        assert_eq!(
            last_seen(&store, session.id).await,
            session.last_seen_at,
            "touch at {now} revived an expired session"
        );
    }
    // Before its end it is touched: the case above is the expiry's doing.
    let before = session.expires_at - Duration::seconds(1);
    touch(&store, &secret, before, Duration::ZERO).await;
    assert_eq!(last_seen(&store, session.id).await, before);
}

/// A guarded append needs an active session of its own chain; an
/// unguarded one always appends.
pub async fn guarded_append_requires_an_active_session<S: Store>(store: S) {
    let w = World::new();
    let agent = w.agent(1);
    let (start, _) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&store, start).await;
    let access = |at| {
        session.draft(
            at,
            AuditAction::Access,
            Actor::user(agent.id.clone(), "Agent 1"),
        )
    };
    let ok = store
        .append(access(epoch()), AppendGuard::SessionActive(session.id))
        .await
        .unwrap();
    assert_eq!(ok.seq, 1);
    let t = session
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    store.transition(t).await.unwrap();
    assert!(matches!(
        store
            .append(access(epoch()), AppendGuard::SessionActive(session.id))
            .await,
        Err(StoreError::SessionNotActive(_))
    ));
    let (ghost, _) = w.begin(&w.agent(2), &w.customer(1, "t1"), epoch());
    assert!(matches!(
        store
            .append(
                access(epoch()),
                AppendGuard::SessionActive(ghost.session().id)
            )
            .await,
        Err(StoreError::SessionNotFound(_))
    ));
    let unguarded = store
        .append(access(epoch()), AppendGuard::None)
        .await
        .unwrap();
    assert_eq!(unguarded.seq, 3);
    assert_eq!(assert_chain_verifies(&store, &session.chain()).await, 4);

    // The guard names one session, not the agent's live one: with the
    // agent in a new session, the ended one's guard still refuses (a
    // request still holding the old session records nothing in it), and
    // so does a pending session's (live, but not active).
    let (next, _) = must_start(&store, w.begin(&agent, &w.customer(2, "t1"), epoch()).0).await;
    assert!(matches!(
        store
            .append(access(epoch()), AppendGuard::SessionActive(session.id))
            .await,
        Err(StoreError::SessionNotActive(_))
    ));
    let in_next = next.draft(epoch(), AuditAction::Access, Actor::System);
    store
        .append(in_next, AppendGuard::SessionActive(next.id))
        .await
        .unwrap();
    let consent = Policy::default().consent(impersonation_core::Consent::Required {
        timeout: Duration::minutes(10),
    });
    let other = w.agent(3);
    let (pending, _) = must_start(
        &store,
        w.begin_with(&consent, &other, &w.customer(1, "t1"), epoch())
            .0,
    )
    .await;
    assert_eq!(pending.state, SessionState::Pending);
    let in_pending = pending.draft(epoch(), AuditAction::Access, Actor::System);
    assert!(matches!(
        store
            .append(in_pending.clone(), AppendGuard::SessionActive(pending.id))
            .await,
        Err(StoreError::SessionNotActive(_))
    ));
    // Another agent's session, active as it is, guards nothing on this
    // chain: the chain's write does not hold its state still.
    assert!(matches!(
        store
            .append(in_pending, AppendGuard::SessionActive(next.id))
            .await,
        Err(StoreError::SessionNotFound(_))
    ));
    assert_eq!(assert_chain_verifies(&store, &pending.chain()).await, 1);
}

/// Events read back exactly as sealed, and each chain is a gapless sequence from 0.
pub async fn events_read_back_exactly_and_chains_verify<S: Store>(store: S) {
    let w = World::new();
    let agent = w.agent(1);
    let chain = ChainKey::for_agent(&agent.id);
    let mut sealed = Vec::new();
    for i in 0..25_i64 {
        let details = Details::new()
            .with("i", i)
            .with("text", "ünïcødé | pipes \\ and \"quotes\"")
            .with("method", "GET");
        let draft = AuditDraft::new(
            epoch() + Duration::microseconds(i * 1_000_001 + 7),
            AuditAction::Access,
            Actor::user(agent.id.clone(), "Agent 1"),
            chain.clone(),
        )
        .subject(w.user("customer1"), "Customer 1", w.tenant("t1"))
        .details(details);
        sealed.push(store.append(draft, AppendGuard::None).await.unwrap());
    }
    assert_eq!(
        sealed.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (0..25).collect::<Vec<_>>()
    );
    assert_eq!(whole_chain(&store, &chain).await, sealed);
    let from_ten = store.chain_events(&chain, 10, 5).await.unwrap();
    assert_eq!(from_ten, sealed[10..15].to_vec());
    assert_eq!(
        store.chain_head(&chain).await.unwrap(),
        sealed.last().map(AuditEvent::head)
    );
    let queried = all_events(
        &store,
        AuditQuery {
            agent: Some(agent.id.clone()),
            limit: 7,
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(queried, sealed);
    assert_eq!(assert_chain_verifies(&store, &chain).await, 25);
}

/// Chain keys are listed in order, with paging: chains begun by an
/// append and by a start alike.
pub async fn chains_are_listed_in_order_with_paging<S: Store>(store: S) {
    let w = World::new();
    let mut keys = Vec::new();
    for n in 0..5 {
        let agent = w.agent(n);
        let chain = ChainKey::for_agent(&agent.id);
        let draft = AuditDraft::new(
            epoch(),
            AuditAction::Denied,
            Actor::user(agent.id.clone(), "A"),
            chain.clone(),
        );
        store.append(draft, AppendGuard::None).await.unwrap();
        keys.push(chain);
    }
    // Chains begun by a batch (as a group commit begins them).
    let batch: Vec<(AuditDraft, AppendGuard)> = (7..9)
        .map(|n| {
            let agent = w.agent(n);
            let chain = ChainKey::for_agent(&agent.id);
            keys.push(chain.clone());
            let draft = AuditDraft::new(
                epoch(),
                AuditAction::Denied,
                Actor::user(agent.id.clone(), "A"),
                chain,
            );
            (draft, AppendGuard::None)
        })
        .collect();
    for result in store.append_batch(batch).await {
        result.unwrap();
    }
    // A chain begun by a start (as every agent's is), with no append.
    for n in 5..7 {
        let (session, _) = must_start(
            &store,
            w.begin(&w.agent(n), &w.customer(n, "t1"), epoch()).0,
        )
        .await;
        keys.push(session.chain());
    }
    keys.sort();
    let mut listed = Vec::new();
    let mut after: Option<ChainKey> = None;
    loop {
        let page = store.chains(after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        assert!(page.windows(2).all(|p| p[0] < p[1]), "chains out of order");
        // A short page ends the listing (`verify_all` reads it so): while
        // chains of this test follow, a page is full. (Other tests' chains
        // may come between, in a store they share, but never fewer.)
        let last = page.last().cloned();
        if keys.iter().any(|k| Some(k) > last.as_ref()) {
            assert_eq!(page.len(), 2, "a short page before the listing's end");
        }
        after = last;
        listed.extend(page);
    }
    let ours: Vec<ChainKey> = listed
        .into_iter()
        .filter(|k| k.as_str().starts_with(&w.ns))
        .collect();
    assert_eq!(ours, keys);
}

fn agent_query(agent: &Principal) -> AuditQuery {
    AuditQuery {
        agent: Some(agent.id.clone()),
        ..AuditQuery::default()
    }
}

/// Every audit filter selects exactly the matching events.
pub async fn audit_filters_select_exactly<S: Store>(store: S) {
    let w = World::new();
    let (a1, a2) = (w.agent(1), w.agent(2));
    let (c1, c2) = (w.customer(1, "t1"), w.customer(2, "t2"));
    let (s1, _) = must_start(&store, w.begin(&a1, &c1, epoch()).0).await;
    let (s2, _) = must_start(&store, w.begin(&a2, &c2, epoch() + Duration::minutes(1)).0).await;
    for (i, (s, agent)) in [(&s1, &a1), (&s2, &a2), (&s1, &a1)].into_iter().enumerate() {
        let at = epoch() + Duration::minutes(2 + i as i64);
        let draft = s.draft(
            at,
            AuditAction::Modification,
            Actor::user(agent.id.clone(), "x"),
        );
        store
            .append(draft, AppendGuard::SessionActive(s.id))
            .await
            .unwrap();
    }
    let admin = w.user("admin");
    let t = s2
        .end(
            EndReason::Revoked,
            Actor::user(admin.clone(), "Admin"),
            epoch() + Duration::minutes(9),
            Details::new(),
        )
        .unwrap();
    store.transition(t).await.unwrap();

    let count = |q: AuditQuery| {
        let store = &store;
        async move { all_events(store, q).await.len() }
    };
    assert_eq!(count(agent_query(&a1)).await, 3);
    assert_eq!(count(agent_query(&a2)).await, 3);
    assert_eq!(
        count(AuditQuery {
            actor: Some(admin.clone()),
            ..AuditQuery::default()
        })
        .await,
        1
    );
    assert_eq!(
        count(AuditQuery {
            actor: Some(a1.id.clone()),
            ..AuditQuery::default()
        })
        .await,
        3
    );
    assert_eq!(
        count(AuditQuery {
            subject: Some(c2.id.clone()),
            ..AuditQuery::default()
        })
        .await,
        3
    );
    assert_eq!(
        count(AuditQuery {
            tenant: Some(w.tenant("t1")),
            ..AuditQuery::default()
        })
        .await,
        3
    );
    assert_eq!(
        count(AuditQuery {
            session: Some(s2.id),
            ..AuditQuery::default()
        })
        .await,
        3
    );
    assert_eq!(
        count(AuditQuery {
            agent: Some(a1.id.clone()),
            action: Some(AuditAction::Modification),
            ..AuditQuery::default()
        })
        .await,
        2
    );
    let window = AuditQuery {
        subject: Some(c1.id.clone()),
        since: Some(epoch() + Duration::minutes(2)),
        until: Some(epoch() + Duration::minutes(4)),
        ..AuditQuery::default()
    };
    let in_window = all_events(&store, window).await;
    assert_eq!(in_window.len(), 1, "since is inclusive, until exclusive");
    assert_eq!(in_window[0].at, epoch() + Duration::minutes(2));
    // Bounds finer than the events' microseconds: the event at 2:00 lies
    // within half a microsecond either side of it.
    let fine = AuditQuery {
        subject: Some(c1.id.clone()),
        since: Some(epoch() + Duration::minutes(2) - Duration::nanoseconds(500)),
        until: Some(epoch() + Duration::minutes(2) + Duration::nanoseconds(500)),
        ..AuditQuery::default()
    };
    let in_fine_window = all_events(&store, fine).await;
    assert_eq!(in_fine_window.len(), 1, "bounds between two microseconds");
    assert_eq!(in_fine_window[0].at, epoch() + Duration::minutes(2));
    let none = AuditQuery {
        agent: Some(a1.id.clone()),
        subject: Some(c2.id.clone()),
        ..AuditQuery::default()
    };
    assert_eq!(count(none).await, 0, "filters combine with AND");

    // An event that names a customer outside any session (a refused
    // start): found by its subject and tenant, not by a session's.
    let refused = AuditDraft::new(
        epoch() + Duration::minutes(10),
        AuditAction::Denied,
        Actor::user(a1.id.clone(), "x"),
        s1.chain(),
    )
    .subject(c2.id.clone(), "Customer 2", w.tenant("t2"));
    let refused = store.append(refused, AppendGuard::None).await.unwrap();
    for query in [
        AuditQuery {
            subject: Some(c2.id.clone()),
            ..AuditQuery::default()
        },
        AuditQuery {
            tenant: Some(w.tenant("t2")),
            ..AuditQuery::default()
        },
    ] {
        let found = all_events(&store, query).await;
        assert_eq!(found.len(), 4);
        assert_eq!(found.last(), Some(&refused));
    }
    assert_eq!(count(agent_query(&a1)).await, 4);
    assert_eq!(
        count(AuditQuery {
            session: Some(s1.id),
            ..AuditQuery::default()
        })
        .await,
        3,
        "a session's events only"
    );
}

/// Ids that differ only by trailing spaces name different people: their
/// live-session slots, chains, live lists and audit views stay apart.
/// (Under a PAD SPACE collation, as MySQL's and MariaDB's `utf8mb4_bin`
/// are, `'ann' = 'ann '`.)
pub async fn ids_differing_only_by_trailing_spaces_stay_apart<S: Store>(store: S) {
    ids_stay_apart(&store, |id| format!("{id} "), "t1", "Agent 1").await;
}

/// Ids that differ only by case, or by an accent, name different people
/// too, as they do to the host (under a case- or accent-insensitive
/// collation, MySQL 8's default `utf8mb4_0900_ai_ci` say, `'Sam' =
/// 'sam'` and `'José' = 'Jose'`); and a name beyond the Basic
/// Multilingual Plane (four bytes in UTF-8, which MySQL's `utf8mb3`
/// cannot hold) reads back exactly, its record's hash intact.
pub async fn ids_differing_by_case_or_accent_stay_apart<S: Store>(store: S) {
    ids_stay_apart(&store, str::to_uppercase, "t1", "Agent \u{1F6F6} 1").await;
    ids_stay_apart(
        &store,
        |id| id.replacen('e', "\u{e9}", 1),
        "te1",
        "Ag\u{e9}nt \u{1D11E} 1",
    )
    .await;
}

/// Two agents, customers and tenants (the first named `tenant`) whose
/// ids differ only as `vary` makes them: their live-session slots,
/// chains, live lists and audit views stay apart; the varied agent's
/// change is recorded under `name`.
async fn ids_stay_apart<S: Store>(
    store: &S,
    vary: impl Fn(&str) -> String,
    tenant: &str,
    name: &str,
) {
    let w = World::new();
    let varied = |id: &UserId| UserId::new(vary(id.as_str())).unwrap_or_else(|e| panic!("{e}"));
    let (agent, customer) = (w.agent(1), w.customer(1, tenant));
    let mut agent_sp = agent.clone();
    agent_sp.id = varied(&agent.id);
    let mut customer_sp = w.customer(1, &vary(tenant));
    customer_sp.id = varied(&customer.id);
    assert_ne!(agent.id, agent_sp.id);
    assert_ne!(customer.tenant, customer_sp.tenant);
    let (session, _) = must_start(store, w.begin(&agent, &customer, epoch()).0).await;
    // Refused here if the store took the agent's slot for the other's.
    let (session_sp, _) = must_start(store, w.begin(&agent_sp, &customer_sp, epoch()).0).await;
    let draft = session_sp.draft(
        epoch() + Duration::minutes(1),
        AuditAction::Modification,
        Actor::user(agent_sp.id.clone(), name),
    );
    store
        .append(draft, AppendGuard::SessionActive(session_sp.id))
        .await
        .unwrap();
    for (agent, customer, session, events) in [
        (&agent, &customer, &session, 1),
        (&agent_sp, &customer_sp, &session_sp, 2),
    ] {
        let who = format!("{:?}", agent.id);
        assert_eq!(
            assert_chain_verifies(store, &session.chain()).await,
            events,
            "{who}'s chain"
        );
        let filters = [
            LiveFilter {
                agent: Some(agent.id.clone()),
                ..LiveFilter::default()
            },
            LiveFilter {
                subject: Some(customer.id.clone()),
                ..LiveFilter::default()
            },
            LiveFilter {
                tenant: Some(customer.tenant.clone()),
                ..LiveFilter::default()
            },
        ];
        for filter in filters {
            assert_eq!(
                live_ids(store, &filter).await,
                vec![session.id],
                "{filter:?}"
            );
        }
        let queries = [
            agent_query(agent),
            AuditQuery {
                actor: Some(agent.id.clone()),
                ..AuditQuery::default()
            },
            AuditQuery {
                subject: Some(customer.id.clone()),
                ..AuditQuery::default()
            },
            AuditQuery {
                tenant: Some(customer.tenant.clone()),
                ..AuditQuery::default()
            },
        ];
        for query in queries {
            let found = all_events(store, query.clone()).await;
            assert_eq!(found.len(), events as usize, "{query:?}");
            assert!(
                found.iter().all(|e| e.session == Some(session.id)),
                "{query:?}"
            );
        }
    }
}

/// Cursor pagination visits every event once, in order, both ways.
pub async fn audit_pages_visit_every_event_once_in_order<S: Store>(store: S) {
    let w = World::new();
    let agent = w.agent(1);
    let chain = ChainKey::for_agent(&agent.id);
    let mut ids = Vec::new();
    // Several events share a timestamp, so ordering must fall back to the
    // id. Each group of three is drafted first and appended in reverse,
    // so that the ids do not follow the order of writing (as they do not
    // across processes): a store ordering ties by row rather than by id
    // would skip or repeat events at page boundaries.
    for group in 0..8_i64 {
        let at = epoch() + Duration::seconds(group);
        let size = if group == 7 { 2 } else { 3 };
        let drafts: Vec<AuditDraft> = (0..size)
            .map(|_| {
                AuditDraft::new(
                    at,
                    AuditAction::Access,
                    Actor::user(agent.id.clone(), "A"),
                    chain.clone(),
                )
            })
            .collect();
        for draft in drafts.into_iter().rev() {
            ids.push(store.append(draft, AppendGuard::None).await.unwrap());
        }
    }
    let mut expected = ids.clone();
    expected.sort_by_key(|e| (e.at, e.id));
    for (order, limit) in [
        (Order::Oldest, 4),
        (Order::Newest, 5),
        (Order::Oldest, 1000),
    ] {
        let query = AuditQuery {
            agent: Some(agent.id.clone()),
            order,
            limit,
            ..AuditQuery::default()
        };
        let mut pages = 0;
        let mut q = query.clone();
        let mut seen = Vec::new();
        loop {
            let page = store.audit(&q).await.unwrap();
            assert!(page.events.len() <= limit as usize);
            pages += 1;
            seen.extend(page.events);
            match page.next {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        let mut want = expected.clone();
        if order == Order::Newest {
            want.reverse();
        }
        assert_eq!(seen, want, "order {order:?}, limit {limit}");
        assert!(pages <= 23 / limit as usize + 2);
    }
    let single = store
        .audit(&AuditQuery {
            agent: Some(agent.id.clone()),
            limit: 0,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(single.events.len(), 1, "a zero limit is clamped to one");
}

/// A page holds at most [`MAX_PAGE`] events, whatever limit is asked
/// (a store passing a huge limit straight to its database, or reading a
/// whole trail into memory for it, fails this), and the next page goes on
/// where it stopped.
pub async fn a_page_holds_at_most_max_page_events<S: Store>(store: S) {
    let w = World::new();
    let agent = w.agent(1);
    let chain = ChainKey::for_agent(&agent.id);
    let total = MAX_PAGE as usize + 3;
    let mut written = Vec::with_capacity(total);
    for first in (0..total).step_by(250) {
        let batch: Vec<(AuditDraft, AppendGuard)> = (first..total.min(first + 250))
            .map(|i| {
                let at = epoch() + Duration::milliseconds(i64::try_from(i).unwrap_or(0));
                let draft = AuditDraft::new(
                    at,
                    AuditAction::Access,
                    Actor::user(agent.id.clone(), "A"),
                    chain.clone(),
                );
                (draft, AppendGuard::None)
            })
            .collect();
        for result in store.append_batch(batch).await {
            written.push(result.unwrap());
        }
    }
    for limit in [MAX_PAGE + 1, u32::MAX] {
        let query = AuditQuery {
            agent: Some(agent.id.clone()),
            limit,
            ..AuditQuery::default()
        };
        let first = store.audit(&query).await.unwrap();
        assert_eq!(first.events.len(), MAX_PAGE as usize, "limit {limit}");
        assert_eq!(first.events[..], written[..MAX_PAGE as usize]);
        let cursor = first.next.expect("a second page");
        let rest = store
            .audit(&AuditQuery {
                cursor: Some(cursor),
                ..query
            })
            .await
            .unwrap();
        assert_eq!(rest.events[..], written[MAX_PAGE as usize..]);
        assert!(rest.next.is_none());
    }
    assert_eq!(assert_chain_verifies(&store, &chain).await, total as u64);
    // A chain read holds `limit` events while the chain has them (a
    // shorter one is its end, as verification reads it): beyond a
    // store's own page size too.
    assert_eq!(store.chain_events(&chain, 0, 500).await.unwrap().len(), 500);
    let tail = store.chain_events(&chain, 1_000, 500).await.unwrap();
    assert_eq!(tail[..], written[1_000..]);
}

/// `record_check` stores the re-check and the refreshed shadow, on the current version only.
pub async fn record_check_respects_the_version<S: Store>(store: S) {
    let w = World::new();
    let customer = w.customer(1, "t1");
    let (start, secret) = w.begin(&w.agent(1), &customer, epoch());
    let grant = start.session().grant.clone();
    let (session, _) = must_start(&store, start).await;
    let changed = customer
        .clone()
        .with_attribute("timezone", "America/Toronto");
    let shadow = w.rules.project(&changed, &grant);
    let at = epoch() + Duration::minutes(1);
    store
        .record_check(session.id, session.version, at, &shadow)
        .await
        .unwrap();
    let stored = store
        .find_by_secret(&secret.lookup(), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.last_checked_at, at);
    assert_eq!(stored.shadow, shadow);
    assert_eq!(stored.version, session.version);
    // A version that is not the session's, on a live session: refused,
    // and nothing written.
    let other_shadow = w.rules.project(&customer, &grant);
    let later = at + Duration::minutes(1);
    assert!(matches!(
        store
            .record_check(session.id, session.version + 1, later, &other_shadow)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let unchanged = store.session(session.id).await.unwrap().unwrap();
    assert_eq!(
        (unchanged.last_checked_at, &unchanged.shadow),
        (at, &shadow),
        "a refused check writes nothing"
    );
    let t = session
        .end(EndReason::Stopped, Actor::System, at, Details::new())
        .unwrap();
    store.transition(t).await.unwrap();
    assert!(matches!(
        store
            .record_check(session.id, session.version, at, &shadow)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let unknown = SessionId::new();
    assert!(matches!(
        store.record_check(unknown, 1, at, &shadow).await,
        Err(StoreError::SessionNotFound(id)) if id == unknown
    ));
}

/// Live sessions (pending ones too) are filtered by agent, subject and
/// tenant, all that are given at once, and ended ones are left out.
pub async fn live_sessions_filter_and_exclude_ended<S: Store>(store: S) {
    let w = World::new();
    let (c1, c2) = (w.customer(1, "t1"), w.customer(2, "t2"));
    let (s1, _) = must_start(&store, w.begin(&w.agent(1), &c1, epoch()).0).await;
    let (s2, _) = must_start(&store, w.begin(&w.agent(2), &c2, epoch()).0).await;
    let (s3, _) = must_start(&store, w.begin(&w.agent(3), &c1, epoch()).0).await;
    let t = s3
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    store.transition(t).await.unwrap();
    let ids = |v: Vec<Session>| v.into_iter().map(|s| s.id).collect::<BTreeSet<_>>();
    let by_subject = store
        .live_sessions(&LiveFilter {
            subject: Some(c1.id.clone()),
            ..LiveFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(by_subject), [s1.id].into());
    let by_tenant = store
        .live_sessions(&LiveFilter {
            tenant: Some(w.tenant("t2")),
            ..LiveFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(by_tenant), [s2.id].into());
    let by_agent = store
        .live_sessions(&LiveFilter {
            agent: Some(w.agent(3).id),
            ..LiveFilter::default()
        })
        .await
        .unwrap();
    assert!(by_agent.is_empty());

    // A pending session is live too; filters combine (all must match); no
    // filter lists every live session (others' too, on a shared database).
    let consent = Policy::default().consent(impersonation_core::Consent::Required {
        timeout: Duration::minutes(10),
    });
    let c3 = w.customer(3, "t2");
    let (s4, _) = must_start(&store, w.begin_with(&consent, &w.agent(4), &c3, epoch()).0).await;
    assert_eq!(s4.state, SessionState::Pending);
    let live = |filter: LiveFilter| {
        let store = &store;
        async move { ids(store.live_sessions(&filter).await.unwrap()) }
    };
    // The same customer id in another tenant: a filter on both customer
    // and tenant leaves it out.
    let (s5, _) = must_start(
        &store,
        w.begin(&w.agent(5), &w.customer(3, "t1"), epoch()).0,
    )
    .await;
    assert_eq!(
        live(LiveFilter {
            subject: Some(c3.id.clone()),
            ..LiveFilter::default()
        })
        .await,
        [s4.id, s5.id].into()
    );
    assert_eq!(
        live(LiveFilter {
            tenant: Some(w.tenant("t2")),
            ..LiveFilter::default()
        })
        .await,
        [s2.id, s4.id].into()
    );
    assert_eq!(
        live(LiveFilter {
            subject: Some(c3.id.clone()),
            tenant: Some(w.tenant("t2")),
            ..LiveFilter::default()
        })
        .await,
        [s4.id].into()
    );
    assert_eq!(
        live(LiveFilter {
            agent: Some(w.agent(1).id),
            tenant: Some(w.tenant("t2")),
            ..LiveFilter::default()
        })
        .await,
        BTreeSet::new()
    );
    let all = live(LiveFilter::default()).await;
    let mine = [s1.id, s2.id, s4.id];
    assert!(mine.iter().all(|id| all.contains(id)), "{all:?}");
    assert!(!all.contains(&s3.id), "an ended session is not live");
}

/// Racing starts by one agent leave exactly one live session; every loser's
/// refusal is audited, names the winner, and leaves no session behind.
pub async fn racing_starts_leave_one_live_session<S: Store + 'static>(store: S) {
    racing_starts_over(&[Arc::new(store)]).await;
}

/// [`racing_starts_leave_one_live_session`] with the starts shared between
/// two instances of the store on the same data (two processes of an app).
pub async fn racing_starts_across_instances_leave_one_live_session<S: Store + 'static>(
    (a, b): (S, S),
) {
    racing_starts_over(&[Arc::new(a), Arc::new(b)]).await;
}

/// Instance `n` of `handles`, round the list.
fn nth<S>(handles: &[Arc<S>], n: usize) -> Arc<S> {
    Arc::clone(&handles[n % handles.len()])
}

async fn racing_starts_over<S: Store + 'static>(handles: &[Arc<S>]) {
    let w = World::new();
    let store = nth(handles, 0);
    let agent = w.agent(1);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..16 {
        let (start, _) = w.begin(&agent, &w.customer(n, "t1"), epoch());
        let store = nth(handles, n as usize);
        let id = start.session().id;
        tasks.spawn(async move { (id, store.start(start).await) });
    }
    let (mut winners, mut losers, mut named) = (Vec::new(), Vec::new(), BTreeSet::new());
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            (id, Ok(StartOutcome::Started { session, .. })) => {
                assert_eq!(session.id, id);
                winners.push(id);
            }
            (id, Ok(StartOutcome::Refused { live, .. })) => {
                losers.push(id);
                named.insert(live);
            }
            (_, Err(e)) => panic!("racing start failed: {e}"),
        }
    }
    assert_eq!((winners.len(), losers.len()), (1, 15));
    // Every refusal names the one winner, and no loser's session exists.
    assert_eq!(named.into_iter().collect::<Vec<_>>(), winners);
    for loser in losers {
        assert!(store.session(loser).await.unwrap().is_none(), "{loser}");
    }
    let live = LiveFilter {
        agent: Some(agent.id.clone()),
        ..LiveFilter::default()
    };
    for store in handles {
        assert_eq!(
            live_ids(&**store, &live).await,
            winners,
            "on every instance"
        );
    }
    let chain = ChainKey::for_agent(&agent.id);
    assert_eq!(
        assert_chain_verifies(&*store, &chain).await,
        16,
        "every attempt audited"
    );
}

/// Ends, idle touches and guarded appends racing on one session: exactly
/// one end lands (the others, built on the same version, conflict), no
/// touch or policy re-check (`record_check`) puts the ended session back,
/// and no guarded append lands after the end. A store that reads, then writes, outside one atomic step
/// fails this.
pub async fn racing_ends_touches_and_appends_leave_one_end<S: Store + 'static>(store: S) {
    racing_ends_over(&[Arc::new(store)]).await;
}

/// [`racing_ends_touches_and_appends_leave_one_end`] with the calls shared
/// between two instances of the store on the same data.
pub async fn racing_ends_touches_and_appends_across_instances_leave_one_end<S: Store + 'static>(
    (a, b): (S, S),
) {
    racing_ends_over(&[Arc::new(a), Arc::new(b)]).await;
}

/// Touches that race (half of them batched), at 1 s to 16 s after the
/// start with no coalescing, leave the session last seen at the latest:
/// a touch that lands after a later one does not move it back (a store
/// that reads, then writes, checks again as it writes).
pub async fn racing_touches_keep_the_latest<S: Store + 'static>(store: S) {
    racing_touches_over(&[Arc::new(store)]).await;
}

/// [`racing_touches_keep_the_latest`], the touches spread over two
/// instances of the store on the same data.
pub async fn racing_touches_across_instances_keep_the_latest<S: Store + 'static>((a, b): (S, S)) {
    racing_touches_over(&[Arc::new(a), Arc::new(b)]).await;
}

/// A lookup of `secret` with `touch`, alone or through the batched call
/// (which a store may implement on its own, one query for the batch).
async fn touch_by<S: Store + ?Sized>(
    store: &S,
    secret: &SessionSecret,
    touch: Option<Touch>,
    batched: bool,
) -> Result<Option<Session>, StoreError> {
    if batched {
        store
            .find_by_secrets(&[secret.lookup()], touch)
            .await
            .into_iter()
            .next()
            .expect("one answer per lookup")
    } else {
        store.find_by_secret(&secret.lookup(), touch).await
    }
}

async fn racing_touches_over<S: Store + 'static>(handles: &[Arc<S>]) {
    let w = World::new();
    let store = nth(handles, 0);
    let (start, secret) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&*store, start).await;
    let secret = Arc::new(secret);
    let mut touches = tokio::task::JoinSet::new();
    for i in 1..=16_usize {
        let (s, secret) = (nth(handles, i), Arc::clone(&secret));
        let touch = Some(Touch {
            now: epoch() + Duration::seconds(i64::try_from(i).unwrap_or_default()),
            coalesce: Duration::ZERO,
        });
        touches.spawn(async move { touch_by(&*s, &secret, touch, i % 2 == 1).await });
    }
    while let Some(found) = touches.join_next().await {
        assert!(
            found.expect("task").expect("touch").is_some(),
            "the session is found"
        );
    }
    let read = store.session(session.id).await.unwrap().expect("session");
    assert_eq!(read.last_seen_at, epoch() + Duration::seconds(16));
}

async fn racing_ends_over<S: Store + 'static>(handles: &[Arc<S>]) {
    let w = World::new();
    let store = nth(handles, 0);
    let agent = w.agent(1);
    let customer = w.customer(1, "t1");
    let (start, secret) = w.begin(&agent, &customer, epoch());
    let grant = start.session().grant.clone();
    let (session, _) = must_start(&*store, start).await;
    let secret = Arc::new(secret);
    // Policy re-checks race the ends too: one that read the record before
    // an end must not write the live version back over it.
    let shadow = Arc::new(
        w.rules.project(
            &customer
                .clone()
                .with_attribute("timezone", "America/Toronto"),
            &grant,
        ),
    );
    let mut ends = tokio::task::JoinSet::new();
    let mut others = tokio::task::JoinSet::new();
    for i in 0..8_i64 {
        let reason = if i % 2 == 0 {
            EndReason::Stopped
        } else {
            EndReason::Revoked
        };
        let end = session
            .end(
                reason,
                Actor::user(agent.id.clone(), "agent"),
                epoch() + Duration::seconds(30),
                Details::new().with("n", i),
            )
            .unwrap();
        let n = usize::try_from(i).unwrap_or_default();
        // (Spawned before the end, so that on one thread too a re-check
        // may read the record before the end and write after it.)
        let (s, shadow) = (nth(handles, n + 1), Arc::clone(&shadow));
        let checked = epoch() + Duration::seconds(22 + i);
        others.spawn(async move {
            match s
                .record_check(session.id, session.version, checked, &shadow)
                .await
            {
                Ok(()) | Err(StoreError::Conflict(_)) => Ok(None),
                Err(e) => Err(e),
            }
        });
        let s = nth(handles, n);
        ends.spawn(async move { s.transition(end).await.map(|(after, _)| after.state) });
        // Half the touches and appends go through the batched calls,
        // which a store may implement on their own (one query each).
        let batched = i % 2 == 1;
        let (s, secret) = (nth(handles, n + 1), Arc::clone(&secret));
        let now = epoch() + Duration::seconds(20 + i);
        others.spawn(async move {
            let touch = Some(Touch {
                now,
                coalesce: Duration::ZERO,
            });
            touch_by(&*s, &secret, touch, batched).await.map(|_| None)
        });
        let s = nth(handles, n);
        let draft = session
            .draft(
                epoch() + Duration::seconds(25),
                AuditAction::Access,
                Actor::user(agent.id.clone(), "agent"),
            )
            .details(Details::new().with("n", i));
        others.spawn(async move {
            let guard = AppendGuard::SessionActive(session.id);
            let appended = if batched {
                s.append_batch(vec![(draft, guard)])
                    .await
                    .into_iter()
                    .next()
                    .expect("one result per event")
            } else {
                s.append(draft, guard).await
            };
            match appended {
                Ok(event) => Ok(Some(event.seq)),
                Err(StoreError::SessionNotActive(_)) => Ok(None),
                Err(e) => Err(e),
            }
        });
    }
    let mut landed = Vec::new();
    while let Some(result) = ends.join_next().await {
        match result.expect("task") {
            Ok(state) => landed.push(state),
            Err(StoreError::Conflict(id)) => assert_eq!(id, session.id),
            Err(e) => panic!("racing end failed: {e}"),
        }
    }
    assert_eq!(landed.len(), 1, "exactly one end lands: {landed:?}");
    let mut appended = Vec::new();
    while let Some(result) = others.join_next().await {
        match result.expect("task") {
            Ok(Some(seq)) => appended.push(seq),
            Ok(None) => {}
            Err(e) => panic!("racing touch, re-check or append failed: {e}"),
        }
    }
    for store in handles {
        let stored = store.session(session.id).await.unwrap().unwrap();
        assert_eq!(
            stored.state, landed[0],
            "no touch or re-check put the session back"
        );
        assert!(stored.version > session.version, "the end's version stands");
    }
    let chain = ChainKey::for_agent(&agent.id);
    let events = whole_chain(&*store, &chain).await;
    let ends: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.action == AuditAction::SessionEnded)
        .collect();
    assert_eq!(ends.len(), 1, "one end event");
    assert!(
        appended.iter().all(|seq| *seq < ends[0].seq),
        "an access landed after the end: {appended:?} against {}",
        ends[0].seq
    );
    assert_eq!(
        assert_chain_verifies(&*store, &chain).await,
        2 + appended.len() as u64
    );
}

/// Concurrent appends to one chain never fork it.
pub async fn concurrent_appends_keep_the_chain_valid<S: Store + 'static>(store: S) {
    concurrent_appends_over(&[Arc::new(store)]).await;
}

/// [`concurrent_appends_keep_the_chain_valid`] with the appends shared
/// between two instances of the store on the same data, each of which may
/// hold its own idea of the chain's head.
pub async fn concurrent_appends_across_instances_keep_the_chain_valid<S: Store + 'static>(
    (a, b): (S, S),
) {
    concurrent_appends_over(&[Arc::new(a), Arc::new(b)]).await;
}

async fn concurrent_appends_over<S: Store + 'static>(handles: &[Arc<S>]) {
    let w = World::new();
    let store = nth(handles, 0);
    let agent = w.agent(1);
    let (session, _) = must_start(&*store, w.begin(&agent, &w.customer(1, "t1"), epoch()).0).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40_i64 {
        let draft = session.draft(
            epoch() + Duration::milliseconds(i),
            AuditAction::Access,
            Actor::user(agent.id.clone(), "A"),
        );
        let store = nth(handles, usize::try_from(i).unwrap_or_default());
        let id = session.id;
        tasks.spawn(async move { store.append(draft, AppendGuard::SessionActive(id)).await });
    }
    let mut returned = Vec::new();
    while let Some(result) = tasks.join_next().await {
        returned.push(result.expect("task").expect("append"));
    }
    assert_eq!(assert_chain_verifies(&*store, &session.chain()).await, 41);
    // What each call returned is what was stored (an event resealed after
    // a race is returned as resealed).
    returned.sort_by_key(|e| e.seq);
    for store in handles {
        assert_eq!(returned, whole_chain(&**store, &session.chain()).await[1..]);
    }
}

/// A batch of appends judges each event alone, keeps their order within
/// each chain, and returns one result per event, in order.
pub async fn append_batch_judges_each_event_and_keeps_order<S: Store>(store: S) {
    let w = World::new();
    let (a, b) = (w.agent(1), w.agent(2));
    let (live, _) = must_start(&store, w.begin(&a, &w.customer(1, "t1"), epoch()).0).await;
    let (ended, _) = must_start(&store, w.begin(&b, &w.customer(2, "t1"), epoch()).0).await;
    let t = ended
        .end(EndReason::Stopped, Actor::System, epoch(), Details::new())
        .unwrap();
    store.transition(t).await.unwrap();
    // Each later in the batch but earlier in time (and its id drawn
    // later): the chain keeps the batch's order, which a store sorting a
    // batch by time would not.
    let access = |session: &Session, who: &Principal, i: i64| {
        session
            .draft(
                epoch() + Duration::seconds(100 - i),
                AuditAction::Access,
                Actor::user(who.id.clone(), "agent"),
            )
            .details(Details::new().with("i", i))
    };
    let batch = vec![
        (access(&live, &a, 1), AppendGuard::SessionActive(live.id)),
        (access(&ended, &b, 2), AppendGuard::SessionActive(ended.id)),
        (access(&ended, &b, 3), AppendGuard::None),
        (access(&live, &a, 4), AppendGuard::None),
        (access(&live, &a, 5), AppendGuard::SessionActive(live.id)),
        // Guarded by the other agent's live session: not of its chain.
        (access(&ended, &b, 6), AppendGuard::SessionActive(live.id)),
    ];
    let results = store.append_batch(batch).await;
    assert_eq!(results.len(), 6);
    assert!(matches!(results[1], Err(StoreError::SessionNotActive(_))));
    assert!(matches!(results[5], Err(StoreError::SessionNotFound(_))));
    let ok: Vec<&AuditEvent> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        ok.iter()
            .map(|e| (e.chain.clone(), e.seq))
            .collect::<Vec<_>>(),
        vec![
            (live.chain(), 1),
            (ended.chain(), 2),
            (live.chain(), 2),
            (live.chain(), 3),
        ]
    );
    assert_eq!(
        ok.iter().map(|e| e.details.get("i")).collect::<Vec<_>>(),
        [Some("1"), Some("3"), Some("4"), Some("5")]
    );
    let chain_a = whole_chain(&store, &live.chain()).await;
    assert_eq!(
        chain_a[1..].iter().collect::<Vec<_>>(),
        [ok[0], ok[2], ok[3]]
    );
    assert_eq!(assert_chain_verifies(&store, &live.chain()).await, 4);
    assert_eq!(assert_chain_verifies(&store, &ended.chain()).await, 3);
    assert!(store.append_batch(Vec::new()).await.is_empty());

    // A batch on one chain (whose head this store has just written: the
    // shortest path a store may have), one event guarded by another
    // agent's active session: refused alone.
    let (b_live, _) = must_start(&store, w.begin(&b, &w.customer(3, "t1"), epoch()).0).await;
    let results = store
        .append_batch(vec![
            (access(&live, &a, 7), AppendGuard::SessionActive(b_live.id)),
            (access(&live, &a, 8), AppendGuard::SessionActive(live.id)),
        ])
        .await;
    assert!(matches!(results[0], Err(StoreError::SessionNotFound(_))));
    assert_eq!(results[1].as_ref().map(|e| e.seq).ok(), Some(4));
    assert_eq!(assert_chain_verifies(&store, &live.chain()).await, 5);
}

/// A batch of lookups answers each in order (unknown secrets with `None`)
/// and touches every session it finds.
pub async fn find_by_secrets_answers_each_lookup_in_order<S: Store>(store: S) {
    let w = World::new();
    let (start1, secret1) = w.begin(&w.agent(1), &w.customer(1, "t1"), epoch());
    let (start2, secret2) = w.begin(&w.agent(2), &w.customer(2, "t1"), epoch());
    let (_, unknown) = w.begin(&w.agent(3), &w.customer(1, "t1"), epoch());
    let (s1, _) = must_start(&store, start1).await;
    let (s2, _) = must_start(&store, start2).await;
    let untouched = [
        store.session(s2.id).await.unwrap(),
        None,
        store.session(s1.id).await.unwrap(),
    ];
    let now = epoch() + Duration::seconds(30);
    let touch = Touch {
        now,
        coalesce: Duration::ZERO,
    };
    let found = store
        .find_by_secrets(
            &[secret2.lookup(), unknown.lookup(), secret1.lookup()],
            Some(touch),
        )
        .await;
    let found: Vec<Option<_>> = found.into_iter().map(|r| r.unwrap()).collect();
    assert!(untouched[0].is_some() && untouched[2].is_some());
    assert_eq!(found, untouched, "in order, as they were before the touch");
    for id in [s1.id, s2.id] {
        assert_eq!(
            store.session(id).await.unwrap().unwrap().last_seen_at,
            now,
            "touched"
        );
    }
    assert!(store.find_by_secrets(&[], Some(touch)).await.is_empty());

    // The touch rules hold in a batch as in a single lookup: each record
    // comes back as it was before the touch; a lapsed session (idle too
    // long) is found and not touched; a touch within the coalescing
    // window is not written; no touch asked, none written.
    let idle_at = epoch() + Duration::minutes(20);
    let (start3, secret3) = w.begin(&w.agent(4), &w.customer(1, "t1"), idle_at);
    let (s3, _) = must_start(&store, start3).await;
    let later = idle_at + Duration::seconds(10);
    let before: Vec<_> = [s1.id, s2.id, s3.id].into_iter().collect();
    let mut stored = Vec::new();
    for id in &before {
        stored.push(store.session(*id).await.unwrap().unwrap());
    }
    let found = store
        .find_by_secrets(
            &[secret1.lookup(), secret2.lookup(), secret3.lookup()],
            Some(Touch {
                now: later,
                coalesce: Duration::seconds(30),
            }),
        )
        .await;
    let found: Vec<_> = found.into_iter().map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(found, stored, "as they were before the touch");
    for (id, expected) in [
        // Idle past its 15 minutes since `now` (30 s in): not touched.
        (s1.id, now),
        (s2.id, now),
        // Seen 10 s ago, within the 30 s window: not written.
        (s3.id, idle_at),
    ] {
        assert_eq!(
            store.session(id).await.unwrap().unwrap().last_seen_at,
            expected,
            "{id}"
        );
    }
    let found = store.find_by_secrets(&[secret3.lookup()], None).await;
    assert!(found[0].as_ref().unwrap().is_some());
    assert_eq!(
        store.session(s3.id).await.unwrap().unwrap().last_seen_at,
        idle_at,
        "no touch asked"
    );
}

/// Concurrent batches over the same chains never fork them.
pub async fn concurrent_batches_keep_the_chains_valid<S: Store + 'static>(store: S) {
    concurrent_batches_over(&[Arc::new(store)]).await;
}

/// [`concurrent_batches_keep_the_chains_valid`] with the batches shared
/// between two instances of the store on the same data.
pub async fn concurrent_batches_across_instances_keep_the_chains_valid<S: Store + 'static>(
    (a, b): (S, S),
) {
    concurrent_batches_over(&[Arc::new(a), Arc::new(b)]).await;
}

async fn concurrent_batches_over<S: Store + 'static>(handles: &[Arc<S>]) {
    let w = World::new();
    let store = nth(handles, 0);
    let (a, b) = (w.agent(1), w.agent(2));
    let (sa, _) = must_start(&*store, w.begin(&a, &w.customer(1, "t1"), epoch()).0).await;
    let (sb, _) = must_start(&*store, w.begin(&b, &w.customer(2, "t1"), epoch()).0).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12_i64 {
        let batch: Vec<_> = (0..5_i64)
            .map(|j| {
                let (s, who) = if (i + j) % 2 == 0 {
                    (&sa, &a)
                } else {
                    (&sb, &b)
                };
                let draft = s.draft(
                    epoch() + Duration::milliseconds(i * 10 + j),
                    AuditAction::Access,
                    Actor::user(who.id.clone(), "agent"),
                );
                (draft, AppendGuard::SessionActive(s.id))
            })
            .collect();
        let store = nth(handles, usize::try_from(i).unwrap_or_default());
        tasks.spawn(async move { store.append_batch(batch).await });
    }
    let mut returned = Vec::new();
    while let Some(results) = tasks.join_next().await {
        for r in results.expect("task") {
            returned.push(r.expect("append"));
        }
    }
    assert_eq!(assert_chain_verifies(&*store, &sa.chain()).await, 31);
    assert_eq!(assert_chain_verifies(&*store, &sb.chain()).await, 31);
    // What each call returned is what was stored.
    for s in [&sa, &sb] {
        let mut mine: Vec<AuditEvent> = returned
            .iter()
            .filter(|e| e.chain == s.chain())
            .cloned()
            .collect();
        mine.sort_by_key(|e| e.seq);
        for store in handles {
            assert_eq!(mine, whole_chain(&**store, &s.chain()).await[1..]);
        }
    }
}

/// A session started on one instance of the store is found, touched,
/// audited and ended on either, with the two taking turns: each sees what
/// the other wrote (the touch, the chain's head, the end), whatever it
/// held of its own, and the chain stays one.
pub async fn a_session_is_served_by_either_instance<S: Store>((a, b): (S, S)) {
    let w = World::new();
    let agent = w.agent(1);
    let actor = || Actor::user(agent.id.clone(), "agent");
    let (start, secret) = w.begin(&agent, &w.customer(1, "t1"), epoch());
    let (session, _) = must_start(&a, start).await;
    let seen = epoch() + Duration::seconds(30);
    let found = touch(&b, &secret, seen, Duration::ZERO).await;
    assert_eq!(found.map(|s| s.id), Some(session.id), "found on the other");
    assert_eq!(
        last_seen(&a, session.id).await,
        seen,
        "the touch seen on the first"
    );
    for i in 0..4_i64 {
        let on = if i % 2 == 0 { &a } else { &b };
        let draft = session.draft(
            epoch() + Duration::seconds(31 + i),
            AuditAction::Access,
            actor(),
        );
        on.append(draft, AppendGuard::SessionActive(session.id))
            .await
            .expect("an append on either instance");
    }
    let current = b.session(session.id).await.unwrap().unwrap();
    let end = current
        .end(
            EndReason::Stopped,
            actor(),
            epoch() + Duration::seconds(40),
            Details::new(),
        )
        .unwrap();
    b.transition(end).await.expect("the end on the other");
    let stored = a.session(session.id).await.unwrap().unwrap();
    assert_eq!(stored.state, SessionState::Ended(EndReason::Stopped));
    let late = session.draft(
        epoch() + Duration::seconds(41),
        AuditAction::Access,
        actor(),
    );
    assert!(
        matches!(
            a.append(late, AppendGuard::SessionActive(session.id)).await,
            Err(StoreError::SessionNotActive(_))
        ),
        "no access after the end, on the instance that did not end it"
    );
    let chain = session.chain();
    assert_eq!(assert_chain_verifies(&a, &chain).await, 6);
    assert_eq!(whole_chain(&a, &chain).await, whole_chain(&b, &chain).await);
}

/// An access (or a modification) on `session` at `at` by `actor`, the
/// `n`th event of its case (a detail, so that no two are alike), to
/// append unguarded.
fn numbered(
    session: &Session,
    at: OffsetDateTime,
    actor: Actor,
    modification: bool,
    n: i64,
) -> (AuditDraft, AppendGuard) {
    let action = if modification {
        AuditAction::Modification
    } else {
        AuditAction::Access
    };
    let draft = session
        .draft(at, action, actor)
        .details(Details::new().with("n", n));
    (draft, AppendGuard::None)
}

/// Batches whose events' times run out of order, tie, and spread over
/// seconds (as concurrent requests do), on two chains: every filter and
/// window, in both orders and at any page size, pages through exactly the
/// matching events in `(at, id)` order, each once. The batches and the
/// queries are drawn by proptest's deterministic runner.
pub async fn audit_pages_over_batches_match_a_sorted_scan<S: Store>(store: S) {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    let w = World::new();
    let (a, b) = (w.agent(1), w.agent(2));
    let (c1, c2) = (w.customer(1, "t1"), w.customer(2, "t2"));
    let (sa, _) = must_start(&store, w.begin(&a, &c1, epoch()).0).await;
    let (sb, _) = must_start(&store, w.begin(&b, &c2, epoch()).0).await;
    let mut runner = TestRunner::deterministic();
    let mut draw = |strategy: proptest::strategy::BoxedStrategy<Vec<(bool, i64, bool, bool)>>| {
        strategy
            .new_tree(&mut runner)
            .map(|tree| tree.current())
            .unwrap_or_default()
    };
    // Per event: which session, its time (100 ms steps over 2.6 s from the
    // batch's start: out of order, with ties), whether the system acts,
    // whether it is a modification (else an access).
    let event = (
        proptest::bool::weighted(0.5),
        0..27_i64,
        proptest::bool::weighted(0.15),
        proptest::bool::weighted(0.3),
    );
    let mut n = 0_i64;
    for round in 0..12_i64 {
        let drawn = draw(proptest::collection::vec(event.clone(), 1..30).boxed());
        let batch = drawn
            .into_iter()
            .map(|(on_a, step, system, modification)| {
                let (session, who) = if on_a { (&sa, &a) } else { (&sb, &b) };
                let at = epoch() + Duration::milliseconds(round * 400 + step * 100);
                let actor = if system {
                    Actor::System
                } else {
                    Actor::user(who.id.clone(), "agent")
                };
                n += 1;
                numbered(session, at, actor, modification, n)
            })
            .collect();
        for result in store.append_batch(batch).await {
            result.unwrap();
        }
    }
    let mut every = whole_chain(&store, &sa.chain()).await;
    every.extend(whole_chain(&store, &sb.chain()).await);
    assert_eq!(every.len() as i64, 2 + n);
    let filters = [
        // Unfiltered: pages over every chain in the store, ordered by time.
        AuditQuery::default(),
        AuditQuery {
            session: Some(sb.id),
            ..AuditQuery::default()
        },
        AuditQuery {
            subject: Some(c1.id.clone()),
            ..AuditQuery::default()
        },
        AuditQuery {
            tenant: Some(c2.tenant.clone()),
            ..AuditQuery::default()
        },
        AuditQuery {
            actor: Some(a.id.clone()),
            ..AuditQuery::default()
        },
        AuditQuery {
            agent: Some(b.id.clone()),
            ..AuditQuery::default()
        },
        AuditQuery {
            action: Some(AuditAction::Modification),
            ..AuditQuery::default()
        },
        AuditQuery {
            session: Some(sa.id),
            action: Some(AuditAction::Access),
            ..AuditQuery::default()
        },
    ];
    let queries = (
        0..filters.len(),
        proptest::option::of(0..75_i64),
        proptest::option::of(0..75_i64),
        proptest::bool::ANY,
        1..40_u32,
    );
    let mut runner = TestRunner::deterministic();
    for _ in 0..60 {
        let Ok(tree) = queries.new_tree(&mut runner) else {
            continue;
        };
        let (filter, since, until, newest, limit) = tree.current();
        let at = |step: i64| epoch() + Duration::milliseconds(step * 100);
        let query = AuditQuery {
            since: since.map(at),
            until: until.map(at),
            order: if newest { Order::Newest } else { Order::Oldest },
            limit,
            ..filters[filter].clone()
        };
        assert_pages_to_exactly(&store, &query, &every, &[sa.chain(), sb.chain()]).await;
    }
}

/// A query that reads many events for each it matches (modifications
/// among 1,500 accesses: the "every event" view holds them all): following
/// `next` finds each match once, in order, in both orders and within a
/// window. A store may answer such a query a part at a time, pages short
/// of the page size or empty with a cursor to go on (the Diesel and Redis
/// stores stop each call at `views::PageReader::scan_bound`, the memory
/// store at as many events read), but never
/// leaves a match out or shows one twice.
pub async fn sparse_audit_queries_find_every_match<S: Store>(store: S) {
    let w = World::new();
    let (a, b) = (w.agent(1), w.agent(2));
    let (c1, c2) = (w.customer(1, "t1"), w.customer(2, "t2"));
    let (sa, _) = must_start(&store, w.begin(&a, &c1, epoch()).0).await;
    let (sb, _) = must_start(&store, w.begin(&b, &c2, epoch()).0).await;
    let mut n = 0_i64;
    for round in 0..75_i64 {
        let (session, who) = if round % 3 == 0 { (&sb, &b) } else { (&sa, &a) };
        let batch = (0..20_i64)
            .map(|i| {
                n += 1;
                // Ten events a second, out of order within their batch.
                let at = epoch() + Duration::milliseconds(round * 2_000 + (i * 7) % 20 * 100);
                let actor = Actor::user(who.id.clone(), "agent");
                numbered(session, at, actor, n % 250 == 0, n)
            })
            .collect();
        for result in store.append_batch(batch).await {
            result.unwrap();
        }
    }
    let mut every = whole_chain(&store, &sa.chain()).await;
    every.extend(whole_chain(&store, &sb.chain()).await);
    let at = |s: i64| epoch() + Duration::seconds(s);
    for order in [Order::Oldest, Order::Newest] {
        for (since, until) in [(None, None), (Some(at(20)), Some(at(120)))] {
            for limit in [1, 4] {
                let query = AuditQuery {
                    action: Some(AuditAction::Modification),
                    since,
                    until,
                    order,
                    limit,
                    ..AuditQuery::default()
                };
                assert_pages_to_exactly(&store, &query, &every, &[sa.chain(), sb.chain()]).await;
            }
        }
    }
}

/// Pages through `query`, following `next`, and checks that each page
/// holds at most the page size and that, of what the pages visited, the
/// events of `ours` are exactly those of `every` the query matches, in
/// its order, each once. (Other cases' events, where the factory hands
/// every case one database, are left aside: an unfiltered query meets
/// them.)
async fn assert_pages_to_exactly<S: Store>(
    store: &S,
    query: &AuditQuery,
    every: &[AuditEvent],
    ours: &[ChainKey],
) {
    let mut want: Vec<&AuditEvent> = every.iter().filter(|e| query.matches(e)).collect();
    want.sort_by_key(|e| (e.at, e.id));
    if query.order == Order::Newest {
        want.reverse();
    }
    let mut q = query.clone();
    let mut seen = Vec::new();
    for pages in 1.. {
        assert!(pages <= 100_000, "paging does not end: {query:?}");
        let page = store.audit(&q).await.unwrap();
        assert!(page.events.len() <= query.page_size(), "{query:?}");
        seen.extend(page.events);
        match page.next {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    assert!(seen.iter().all(|e| query.matches(e)), "{query:?}");
    let seen: Vec<&AuditEvent> = seen.iter().filter(|e| ours.contains(&e.chain)).collect();
    assert_eq!(seen, want, "{query:?}");
}

/// Runs every case against stores from `factory` (one fresh store per case).
/// Prefer [`crate::store_conformance_tests!`], which makes each case its own test.
/// Call it on tokio's multi-thread runtime
/// (`#[tokio::test(flavor = "multi_thread")]`), as the macro's tests run:
/// the racing cases spawn tasks that must run side by side to race.
pub async fn run_all<S, F, Fut>(factory: F)
where
    S: Store + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    // The same cases as `store_conformance_tests!`, in its order (a test
    // below holds the two lists together).
    start_writes_the_session_and_its_event(factory().await).await;
    session_times_keep_their_microseconds(factory().await).await;
    start_refuses_a_second_live_session_and_audits_it(factory().await).await;
    a_pending_session_counts_as_live(factory().await).await;
    agents_hold_sessions_independently(factory().await).await;
    transition_writes_state_and_event_together(factory().await).await;
    stale_transition_conflicts_and_writes_nothing(factory().await).await;
    transition_of_an_unknown_session_is_not_found(factory().await).await;
    find_by_secret_finds_only_by_hash(factory().await).await;
    touch_updates_last_seen_and_is_coalesced(factory().await).await;
    a_session_that_never_idles_is_found_and_touched(factory().await).await;
    a_touch_is_coalesced_at_most_half_the_idle_timeout(factory().await).await;
    a_touch_of_a_negative_window_is_always_due(factory().await).await;
    a_touch_window_of_part_of_a_microsecond_is_not_cut_short(factory().await).await;
    a_touch_never_moves_last_seen_back(factory().await).await;
    touch_never_revives_a_lapsed_session(factory().await).await;
    guarded_append_requires_an_active_session(factory().await).await;
    events_read_back_exactly_and_chains_verify(factory().await).await;
    chains_are_listed_in_order_with_paging(factory().await).await;
    audit_filters_select_exactly(factory().await).await;
    ids_differing_only_by_trailing_spaces_stay_apart(factory().await).await;
    ids_differing_by_case_or_accent_stay_apart(factory().await).await;
    audit_pages_visit_every_event_once_in_order(factory().await).await;
    a_page_holds_at_most_max_page_events(factory().await).await;
    audit_pages_over_batches_match_a_sorted_scan(factory().await).await;
    sparse_audit_queries_find_every_match(factory().await).await;
    record_check_respects_the_version(factory().await).await;
    live_sessions_filter_and_exclude_ended(factory().await).await;
    racing_starts_leave_one_live_session(factory().await).await;
    racing_ends_touches_and_appends_leave_one_end(factory().await).await;
    racing_touches_keep_the_latest(factory().await).await;
    concurrent_appends_keep_the_chain_valid(factory().await).await;
    append_batch_judges_each_event_and_keeps_order(factory().await).await;
    find_by_secrets_answers_each_lookup_in_order(factory().await).await;
    concurrent_batches_keep_the_chains_valid(factory().await).await;
}

/// How long one conformance case may take: every case finishes in
/// seconds on the stores here; a store whose call never returns (a lock
/// never released, a reply never read) fails its case after this, with
/// the case named, instead of hanging the test run.
pub const CASE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `case` (the conformance case named `name`), failing it if it takes
/// longer than [`CASE_DEADLINE`]. Used by [`crate::store_conformance_tests`].
pub async fn within_deadline(name: &str, case: impl std::future::Future<Output = ()>) {
    within(CASE_DEADLINE, name, case).await;
}

async fn within(
    deadline: std::time::Duration,
    name: &str,
    case: impl std::future::Future<Output = ()>,
) {
    let finished = tokio::time::timeout(deadline, case).await;
    assert!(
        finished.is_ok(),
        "conformance case `{name}` ran past {} ms: a store call does not return",
        deadline.as_millis()
    );
}

/// Expands to one `#[tokio::test]` per conformance case, each calling the
/// factory expression for a fresh store. The calling crate needs `tokio`
/// with the `macros` and `rt-multi-thread` features as a dev-dependency.
///
/// ```ignore
/// mod conformance {
///     impersonation_testkit::store_conformance_tests!(async { impersonation_core::MemoryStore::new() });
/// }
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@cases $factory;
            start_writes_the_session_and_its_event,
            session_times_keep_their_microseconds,
            start_refuses_a_second_live_session_and_audits_it,
            a_pending_session_counts_as_live,
            agents_hold_sessions_independently,
            transition_writes_state_and_event_together,
            stale_transition_conflicts_and_writes_nothing,
            transition_of_an_unknown_session_is_not_found,
            find_by_secret_finds_only_by_hash,
            touch_updates_last_seen_and_is_coalesced,
            a_session_that_never_idles_is_found_and_touched,
            a_touch_is_coalesced_at_most_half_the_idle_timeout,
            a_touch_of_a_negative_window_is_always_due,
            a_touch_window_of_part_of_a_microsecond_is_not_cut_short,
            a_touch_never_moves_last_seen_back,
            touch_never_revives_a_lapsed_session,
            guarded_append_requires_an_active_session,
            events_read_back_exactly_and_chains_verify,
            chains_are_listed_in_order_with_paging,
            audit_filters_select_exactly,
            ids_differing_only_by_trailing_spaces_stay_apart,
            ids_differing_by_case_or_accent_stay_apart,
            audit_pages_visit_every_event_once_in_order,
            a_page_holds_at_most_max_page_events,
            audit_pages_over_batches_match_a_sorted_scan,
            sparse_audit_queries_find_every_match,
            record_check_respects_the_version,
            live_sessions_filter_and_exclude_ended,
            racing_starts_leave_one_live_session,
            racing_ends_touches_and_appends_leave_one_end,
            racing_touches_keep_the_latest,
            concurrent_appends_keep_the_chain_valid,
            append_batch_judges_each_event_and_keeps_order,
            find_by_secrets_answers_each_lookup_in_order,
            concurrent_batches_keep_the_chains_valid,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store = $factory.await;
                $crate::conformance::within_deadline(
                    stringify!($case),
                    $crate::conformance::$case(store),
                )
                .await;
            }
        )*
    };
}

/// Expands to one `#[tokio::test]` per conformance case that needs two
/// instances of the store on the same data, as two processes of an app
/// hold: each calling the factory expression for a fresh pair `(S, S)`.
/// A store that caches anything of what it stored (a chain's head, say)
/// must still agree with the other instance. The calling crate needs
/// `tokio` as for [`store_conformance_tests!`](crate::store_conformance_tests).
///
/// ```ignore
/// mod two_instances {
///     impersonation_testkit::store_pair_conformance_tests!(async {
///         let place = my_database().await;
///         (my_adapter(&place).await, my_adapter(&place).await)
///     });
/// }
/// ```
#[macro_export]
macro_rules! store_pair_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@cases $factory;
            racing_starts_across_instances_leave_one_live_session,
            racing_ends_touches_and_appends_across_instances_leave_one_end,
            racing_touches_across_instances_keep_the_latest,
            concurrent_appends_across_instances_keep_the_chain_valid,
            concurrent_batches_across_instances_keep_the_chains_valid,
            a_session_is_served_by_either_instance,
        );
    };
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// A case whose store call never returns fails, named, at its deadline
    /// (rather than hanging the run).
    #[tokio::test]
    #[should_panic(expected = "conformance case `a_hanging_case` ran past 50 ms")]
    async fn a_case_that_never_finishes_fails_at_its_deadline() {
        super::within(
            Duration::from_millis(50),
            "a_hanging_case",
            std::future::pending(),
        )
        .await;
    }

    #[tokio::test]
    async fn a_case_that_finishes_passes() {
        super::within(Duration::from_secs(5), "a_quick_case", async {}).await;
    }

    /// `run_all` runs the cases `store_conformance_tests!` makes tests
    /// of, every one, in the same order: read off this file's source.
    #[test]
    fn run_all_and_the_macro_run_the_same_cases() {
        let source = include_str!("conformance.rs");
        let body = |from: &str, to: &str| -> Vec<String> {
            let start = source.find(from).unwrap_or(0) + from.len();
            let end = start + source[start..].find(to).unwrap_or(0);
            source[start..end]
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("//"))
                .map(|l| l.split(['(', ',']).next().unwrap_or_default().to_owned())
                .collect()
        };
        let run_all = body("Fut: std::future::Future<Output = S>,\n{\n", "\n}\n");
        let macro_cases = body("(@cases $factory;\n", ");\n");
        assert!(macro_cases.len() > 25, "{macro_cases:?}");
        assert_eq!(run_all, macro_cases);
    }
}
