//! The session state machine (every legal and illegal transition), the
//! projection rules, and the audit chain (tampering, exports).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failed test

use impersonation_core::{
    Actor, AttributeRule, AuditAction, AuditDraft, AuditEvent, Begin, BreakKind, ChainHead,
    ChainKey, Consent, Details, EndReason, Mask, PersonRef, Policy, PolicyContext, Principal,
    ProjectionRules, RelationKind, Relationship, Session, SessionSecret, SessionState, ShadowValue,
    StartRequest, TenantId, UserId, to_json_lines, to_table, verify_chain,
};
use time::{Duration, OffsetDateTime, macros::datetime};

const T0: OffsetDateTime = datetime!(2024-11-06 10:15 UTC);

fn agent() -> Principal {
    Principal::new(UserId::from(1_u64), "AdminUser1", TenantId::from(1_u64)).with_permissions([
        "impersonation:start",
        "bookings:read",
        "bookings:write",
        "settings:read",
    ])
}

fn customer() -> Principal {
    let t = TenantId::from(1_u64);
    Principal::new(UserId::from(123_u64), "User123", t.clone())
        .with_permissions([
            "bookings:read",
            "bookings:write",
            "billing:manage",
            "password:change",
            "export:csv",
        ])
        .with_attribute("timezone", "Europe/Lisbon")
        .with_attribute("card_number", "4000123456789010")
        .with_attribute("pin", "1234")
        .with_attribute("email", "user123@example.com")
        .with_attribute("address", serde_json::json!({"city": "Porto"}))
        .with_attribute("password_hash", "$argon2id$secret")
        .with_relationship(Relationship::new(
            RelationKind::Company,
            "co",
            "Pinewood Campground",
            [t.clone()],
        ))
        .with_relationship(Relationship::new(
            RelationKind::Partner,
            "pc",
            "ParkCo",
            [t],
        ))
}

fn rules() -> ProjectionRules {
    ProjectionRules::new()
        .rule("timezone", AttributeRule::Copy)
        .rule("card_number", AttributeRule::Mask(Mask::default()))
        .rule("pin", AttributeRule::Mask(Mask::default()))
        .rule("address", AttributeRule::Mask(Mask::default()))
        .rule("email", AttributeRule::Redact)
        .rule("password_hash", AttributeRule::Drop)
}

fn person(p: &Principal) -> PersonRef {
    PersonRef {
        id: p.id.clone(),
        name: p.display_name.as_str().into(),
        tenant: p.tenant.clone(),
    }
}

fn session_with(policy: &Policy) -> Session {
    let (a, c) = (agent(), customer());
    let grant = policy
        .authorize(
            &a,
            &c,
            &StartRequest::new(c.id.clone(), "Started impersonation session"),
            PolicyContext::default(),
        )
        .unwrap();
    let shadow = rules().project(&c, &grant);
    let secret = SessionSecret::generate(&ChainKey::for_agent(&a.id)).unwrap();
    let start = Session::begin(
        Begin {
            agent: person(&a),
            subject: person(&c),
            grant,
            shadow,
            secret_hash: secret.hash(),
        },
        T0,
    );
    assert_eq!(
        start.session().state,
        if policy_requires_consent(policy) {
            SessionState::Pending
        } else {
            SessionState::Active
        }
    );
    start.session().clone()
}

fn policy_requires_consent(policy: &Policy) -> bool {
    let (a, c) = (agent(), customer());
    policy
        .authorize(
            &a,
            &c,
            &StartRequest::new(c.id.clone(), "Started impersonation session"),
            PolicyContext::default(),
        )
        .unwrap()
        .consent_timeout
        .is_some()
}

fn active() -> Session {
    session_with(&Policy::default())
}

fn pending() -> Session {
    session_with(&Policy::default().consent(Consent::Required {
        timeout: Duration::minutes(10),
    }))
}

fn ended(reason: EndReason) -> Session {
    let s = if reason == EndReason::ConsentDenied {
        pending()
    } else {
        active()
    };
    s.end(reason, Actor::System, T0, Details::new())
        .unwrap()
        .next()
        .clone()
}

// --- state machine -------------------------------------------------------

#[test]
fn begin_returns_the_session_with_its_start_event_and_a_refusal_event() {
    let (a, c) = (agent(), customer());
    let grant = Policy::default()
        .authorize(
            &a,
            &c,
            &StartRequest::new(c.id.clone(), "Customer cannot log in").ticket("SUP-9"),
            PolicyContext::default(),
        )
        .unwrap();
    let start = Session::begin(
        Begin {
            agent: person(&a),
            subject: person(&c),
            shadow: rules().project(&c, &grant),
            grant,
            secret_hash: SessionSecret::generate(&ChainKey::for_agent(&a.id))
                .unwrap()
                .hash(),
        },
        T0,
    );
    let s = start.session();
    assert_eq!(
        (s.state, s.version, s.activated_at),
        (SessionState::Active, 0, Some(T0))
    );
    assert_eq!(s.expires_at, T0 + Duration::hours(1));
    assert_eq!(start.event().action, AuditAction::SessionStarted);
    assert_eq!(start.event().session, Some(s.id));
    assert_eq!(start.event().chain, ChainKey::for_agent(&a.id));
    assert_eq!(start.event().details.get("ticket"), Some("SUP-9"));
    assert_eq!(start.refusal().action, AuditAction::Denied);
    assert_eq!(
        start.refusal().details.get("denial"),
        Some("active_session_exists")
    );
    assert_eq!(
        start.refusal().session,
        None,
        "a refused start has no session"
    );
}

#[test]
fn consent_starts_pending_and_activation_starts_the_clock() {
    let p = pending();
    assert_eq!(p.expires_at, T0 + Duration::minutes(10));
    let later = T0 + Duration::minutes(3);
    let customer = Actor::user(customer().id, "User123");
    let t = p.activate(customer, later).unwrap();
    assert_eq!(t.next().state, SessionState::Active);
    assert_eq!(t.next().activated_at, Some(later));
    assert_eq!(t.next().expires_at, later + Duration::hours(1));
    assert_eq!(t.next().version, 1);
    assert_eq!(t.expected_version(), 0);
    assert_eq!(t.event().action, AuditAction::SessionStarted);
    assert_eq!(t.event().details.get("consented_by"), Some("123"));
}

#[test]
fn every_legal_transition_returns_the_next_state_and_its_event() {
    let legal = [
        (active(), EndReason::Stopped),
        (active(), EndReason::Expired),
        (active(), EndReason::IdleTimeout),
        (active(), EndReason::Revoked),
        (pending(), EndReason::Stopped),
        (pending(), EndReason::Expired),
        (pending(), EndReason::Revoked),
        (pending(), EndReason::ConsentDenied),
    ];
    for (session, reason) in legal {
        let at = T0 + Duration::minutes(1);
        let t = session
            .end(
                reason,
                Actor::System,
                at,
                Details::new().with("note", "why"),
            )
            .unwrap_or_else(|e| panic!("{} -> {reason:?} refused: {e}", session.state));
        assert_eq!(t.next().state, SessionState::Ended(reason));
        assert_eq!(t.next().ended_at, Some(at));
        assert_eq!(t.next().version, session.version + 1);
        assert_eq!(t.event().action, AuditAction::SessionEnded);
        assert_eq!(t.event().details.get("reason"), Some(reason.code()));
        assert_eq!(t.event().details.get("note"), Some("why"));
        assert_eq!(t.event().session, Some(session.id));
        assert_eq!(
            t.event().chain,
            session.chain(),
            "end events go to the agent's chain"
        );
    }
}

#[test]
fn every_illegal_transition_is_a_typed_error() {
    let a = active();
    let e = a
        .end(EndReason::ConsentDenied, Actor::System, T0, Details::new())
        .unwrap_err();
    assert_eq!(
        (e.from, e.to),
        (
            SessionState::Active,
            SessionState::Ended(EndReason::ConsentDenied)
        )
    );
    assert!(a.activate(Actor::System, T0).is_err(), "active -> active");
    assert!(
        pending()
            .end(EndReason::IdleTimeout, Actor::System, T0, Details::new())
            .is_err(),
        "pending cannot idle out"
    );
    for reason in EndReason::ALL {
        let done = ended(reason);
        assert!(done.activate(Actor::System, T0).is_err(), "ended -> active");
        for again in EndReason::ALL {
            let err = done
                .end(again, Actor::System, T0, Details::new())
                .unwrap_err();
            assert_eq!(err.from, SessionState::Ended(reason));
        }
    }
}

#[test]
fn lapse_is_judged_by_expiry_then_idleness() {
    let s = active();
    assert_eq!(s.lapse_at(T0 + Duration::minutes(14)), None);
    assert_eq!(
        s.lapse_at(T0 + Duration::minutes(15)),
        Some(EndReason::IdleTimeout)
    );
    assert_eq!(
        s.lapse_at(T0 + Duration::hours(1)),
        Some(EndReason::Expired)
    );
    let p = pending();
    assert_eq!(
        p.lapse_at(T0 + Duration::minutes(9)),
        None,
        "pending sessions do not idle"
    );
    assert_eq!(
        p.lapse_at(T0 + Duration::minutes(10)),
        Some(EndReason::Expired)
    );
    assert_eq!(
        ended(EndReason::Stopped).lapse_at(T0 + Duration::days(9)),
        None
    );
}

// --- projection ------------------------------------------------------------

#[test]
fn copy_mask_redact_and_drop_each_apply() {
    let shadow = active().shadow;
    assert_eq!(
        shadow.attribute("timezone"),
        Some(&ShadowValue::Copied("Europe/Lisbon".into()))
    );
    assert_eq!(
        shadow.attribute("card_number"),
        Some(&ShadowValue::Masked("••••••••••••9010".into()))
    );
    assert_eq!(shadow.attribute("email"), Some(&ShadowValue::Redacted));
    assert_eq!(shadow.attribute("password_hash"), None);
    let json = serde_json::to_string(&shadow).unwrap();
    for secret in [
        "user123@example.com",
        "4000123456789010",
        "argon2id",
        "Porto",
    ] {
        assert!(
            !json.contains(secret),
            "{secret} leaked into the shadow user"
        );
    }
}

#[test]
fn attributes_without_a_rule_are_dropped() {
    let c = customer().with_attribute("ssn", "123-45-6789");
    let grant = Policy::default()
        .authorize(
            &agent(),
            &c,
            &StartRequest::new(c.id.clone(), "Looking into it"),
            PolicyContext::default(),
        )
        .unwrap();
    assert_eq!(
        ProjectionRules::new()
            .project(&c, &grant)
            .attributes()
            .len(),
        0,
        "no rules: nothing copied"
    );
    assert!(rules().project(&c, &grant).attribute("ssn").is_none());
}

#[test]
fn short_and_structured_values_are_masked_entirely() {
    let shadow = active().shadow;
    assert_eq!(
        shadow.attribute("pin"),
        Some(&ShadowValue::Masked("••••••••".into())),
        "a 4-digit pin shows nothing, not even its length"
    );
    assert_eq!(
        shadow.attribute("address"),
        Some(&ShadowValue::Redacted),
        "objects cannot be masked, so they are redacted"
    );
    assert_eq!(Mask { keep_last: 2 }.apply("abcdef"), "••••ef");
    // A kept end still follows at least four mask characters.
    assert_eq!(Mask { keep_last: 1 }.apply("abc"), "••••c");
    assert_eq!(Mask { keep_last: 4 }.apply(""), "••••••••");
    assert_eq!(Mask { keep_last: 4 }.apply("0123456789a"), "••••••••");
    assert_eq!(Mask { keep_last: 0 }.apply("whatever"), "••••••••");
    // Padding and punctuation do not make a short value long enough to
    // show its end: a right-aligned PIN stays hidden, a card keeps 4.
    assert_eq!(Mask { keep_last: 4 }.apply("        4821"), "••••••••");
    assert_eq!(
        Mask { keep_last: 4 }.apply("4242-4242-4242-4242"),
        "•••••••••••••••4242"
    );
}

#[test]
fn permissions_are_the_targets_within_the_grant_minus_the_denied_set() {
    let shadow = active().shadow;
    let got: Vec<&str> = shadow.permissions().iter().map(|p| p.as_str()).collect();
    assert_eq!(
        got,
        ["bookings:read", "bookings:write"],
        "billing, password and export are denied; settings is not the target's"
    );
}

#[test]
fn read_only_keeps_only_read_permissions() {
    let (a, c) = (agent(), customer());
    let grant = Policy::default()
        .authorize(
            &a,
            &c,
            &StartRequest::new(c.id.clone(), "Only looking").read_only(),
            PolicyContext::default(),
        )
        .unwrap();
    let shadow = rules().project(&c, &grant);
    assert!(shadow.read_only());
    let got: Vec<&str> = shadow.permissions().iter().map(|p| p.as_str()).collect();
    assert_eq!(got, ["bookings:read"]);
}

#[test]
fn identity_roles_and_relationships_are_copied() {
    let shadow = active().shadow;
    assert_eq!(shadow.id(), &customer().id);
    assert_eq!(shadow.display_name(), "User123");
    assert_eq!(shadow.tenant(), &customer().tenant);
    assert_eq!(shadow.relationships(), customer().relationships.as_slice());
    assert_eq!(shadow.company(), Some("Pinewood Campground"));
}

// --- audit chain -------------------------------------------------------------

fn chain_of(n: usize) -> (ChainKey, Vec<AuditEvent>) {
    let chain = ChainKey::for_agent(&UserId::from(1_u64));
    let mut events: Vec<AuditEvent> = Vec::new();
    for i in 0..n {
        let draft = AuditDraft::new(
            T0 + Duration::minutes(i as i64),
            AuditAction::Access,
            Actor::user(UserId::from(1_u64), "AdminUser1"),
            chain.clone(),
        )
        .subject(UserId::from(123_u64), "User123", TenantId::from(1_u64))
        .details(Details::new().with("description", format!("Accessed page {i}.")));
        events.push(draft.seal(events.last().map(AuditEvent::head)));
    }
    (chain, events)
}

#[test]
fn an_intact_chain_verifies() {
    let (chain, events) = chain_of(5);
    let report = verify_chain(&chain, &events, events.last().map(AuditEvent::head)).unwrap();
    assert_eq!(report.events, 5);
    assert_eq!(events[0].prev_hash, impersonation_core::EventHash::GENESIS);
}

#[test]
fn editing_an_event_breaks_the_chain_at_its_position() {
    let (chain, mut events) = chain_of(5);
    events[2].details = Details::new().with("description", "Accessed nothing.");
    let b = verify_chain(&chain, &events, None).unwrap_err();
    assert_eq!((b.position, b.kind), (2, BreakKind::HashMismatch));
    let (chain, mut events) = chain_of(5);
    events[3].at += Duration::seconds(1);
    assert_eq!(verify_chain(&chain, &events, None).unwrap_err().position, 3);
    let (chain, mut events) = chain_of(5);
    events[1].actor = Actor::System;
    assert_eq!(verify_chain(&chain, &events, None).unwrap_err().position, 1);
}

#[test]
fn rehashing_an_edited_event_still_breaks_the_next_link() {
    let (chain, mut events) = chain_of(5);
    events[2].details = Details::new().with("description", "Forged.");
    events[2].hash = events[2].compute_hash();
    let b = verify_chain(&chain, &events, None).unwrap_err();
    assert_eq!((b.position, b.kind), (3, BreakKind::BrokenLink));
}

#[test]
fn deleting_an_event_breaks_the_chain_at_its_position() {
    let (chain, mut events) = chain_of(5);
    events.remove(1);
    let b = verify_chain(&chain, &events, None).unwrap_err();
    assert_eq!(
        (b.position, b.kind),
        (1, BreakKind::OutOfSequence { found: 2 })
    );
}

#[test]
fn reordering_events_breaks_the_chain() {
    let (chain, mut events) = chain_of(5);
    events.swap(1, 3);
    assert_eq!(verify_chain(&chain, &events, None).unwrap_err().position, 1);
    let (chain, mut events) = chain_of(5);
    // Swapping the positions too, as a raw UPDATE would.
    let (s1, s3) = (events[1].seq, events[3].seq);
    events[1].seq = s3;
    events[3].seq = s1;
    events.swap(1, 3);
    let b = verify_chain(&chain, &events, None).unwrap_err();
    assert_eq!((b.position, b.kind), (1, BreakKind::BrokenLink));
}

#[test]
fn truncating_the_chain_is_caught_by_the_head() {
    let (chain, mut events) = chain_of(5);
    let head = events.last().map(AuditEvent::head);
    events.pop();
    let b = verify_chain(&chain, &events, head).unwrap_err();
    assert_eq!(b.kind, BreakKind::Truncated { head_seq: 4 });
    assert_eq!(b.position, 4);
}

/// Events appended past a head that did not move: the break is at the
/// first one the head does not vouch for, not the last (the ones between
/// are no better anchored); a head that names the last position with
/// another hash breaks there.
#[test]
fn a_head_behind_its_events_breaks_at_the_first_it_does_not_cover() {
    let (chain, events) = chain_of(9);
    let b = verify_chain(&chain, &events, Some(events[5].head())).unwrap_err();
    assert_eq!((b.position, b.kind), (6, BreakKind::HeadMismatch));
    let other = ChainHead {
        seq: 8,
        hash: events[7].hash,
    };
    let b = verify_chain(&chain, &events, Some(other)).unwrap_err();
    assert_eq!((b.position, b.kind), (8, BreakKind::HeadMismatch));
    // Behind its events and naming another hash: the break is where the
    // head points, the event it does not name, not one past it.
    let wrong = ChainHead {
        seq: 5,
        hash: events[4].hash,
    };
    let b = verify_chain(&chain, &events, Some(wrong)).unwrap_err();
    assert_eq!((b.position, b.kind), (5, BreakKind::HeadMismatch));
    // Streamed with the head given only at the end, the verifier cannot
    // know; given it first, it can.
    let mut late = impersonation_core::ChainVerifier::new(chain.clone());
    let mut early = impersonation_core::ChainVerifier::with_head(chain.clone(), Some(wrong));
    for e in &events {
        late.push(e).unwrap();
    }
    assert_eq!(late.finish(Some(wrong)).unwrap_err().position, 6);
    let b = events.iter().find_map(|e| early.push(e).err()).unwrap();
    assert_eq!((b.position, b.kind), (5, BreakKind::HeadMismatch));
}

/// A head at the last place there is (only a damaged store holds one)
/// is a break to report, not an overflow; and an event placed after it
/// takes that same last place, which the chain then refuses.
#[test]
fn a_head_at_the_last_place_is_a_break_not_an_overflow() {
    let (chain, events) = chain_of(2);
    let far = ChainHead {
        seq: u64::MAX,
        hash: events[1].hash,
    };
    let b = verify_chain(&chain, &events, Some(far)).unwrap_err();
    assert_eq!(b.kind, BreakKind::Truncated { head_seq: u64::MAX });
    let after = AuditDraft::new(
        events[1].at,
        AuditAction::Access,
        Actor::System,
        chain.clone(),
    )
    .seal(Some(far));
    assert_eq!(after.seq, u64::MAX);
}

#[test]
fn an_event_from_another_chain_is_caught() {
    let (chain, mut events) = chain_of(3);
    events[1].chain = ChainKey::for_agent(&UserId::from(2_u64));
    assert_eq!(
        verify_chain(&chain, &events, None).unwrap_err().kind,
        BreakKind::WrongChain
    );
}

#[test]
fn the_table_has_the_seed_columns_and_escapes_cells() {
    let (_, mut events) = chain_of(2);
    events[1].details = Details::new().with("description", "Viewed a | b");
    let table = to_table(&events);
    let mut lines = table.lines();
    assert_eq!(
        lines.next(),
        Some("| Timestamp | Action | User Performing Action | Impersonated User | Details |")
    );
    assert_eq!(lines.next(), Some("|---|---|---|---|---|"));
    assert_eq!(
        lines.next(),
        Some(
            "| 2024-11-06 10:15:00 AM UTC | Data Access | AdminUser1 | User123 | Accessed page 0. |"
        )
    );
    assert_eq!(
        lines.next(),
        Some(
            "| 2024-11-06 10:16:00 AM UTC | Data Access | AdminUser1 | User123 | Viewed a \\| b |"
        )
    );
}

/// A display name with a line break cannot end its row and forge another
/// (a customer who renamed themself `Jane\n| ... | Session Ended | ...`),
/// and bidirectional controls cannot reorder what the row shows.
#[test]
fn names_cannot_forge_or_reorder_table_rows() {
    let chain = ChainKey::for_agent(&UserId::from(1_u64));
    let forged = "Jane\n| 2024-11-06 10:20:00 AM UTC | User Impersonation | Kim | Jane | Stopped |";
    let event = AuditDraft::new(
        T0,
        AuditAction::Access,
        Actor::user(UserId::from(1_u64), "Sam\u{202E}troppuS"),
        chain,
    )
    .subject(UserId::from(123_u64), forged, TenantId::from(1_u64))
    .seal(None);
    let table = to_table([&event]);
    assert_eq!(table.lines().count(), 3, "{table}");
    let row = table.lines().nth(2).unwrap();
    assert!(row.contains("| Sam\u{FFFD}troppuS |"), "{row}");
    assert!(row.contains("| Jane\u{FFFD}\\| 2024-11-06"), "{row}");
    for c in ['\n', '\r', '\u{2028}', '\u{202E}'] {
        assert!(!row.contains(c), "{row:?}");
    }

    // What a Markdown renderer would turn into something else is escaped:
    // HTML that ends the row, a character reference for a direction
    // control, a link whose text hides the name.
    for (name, shown) in [
        (
            "x</td></tr><tr><td>forged",
            "x\\</td>\\</tr>\\<tr>\\<td>forged",
        ),
        ("&#x202E;ecilA", "\\&#x202E;ecilA"),
        (
            "[Alice](https://evil.example)",
            "\\[Alice](https://evil.example)",
        ),
    ] {
        let event = AuditDraft::new(
            T0,
            AuditAction::Access,
            Actor::user(UserId::from(1_u64), "Sam"),
            ChainKey::for_agent(&UserId::from(1_u64)),
        )
        .subject(UserId::from(123_u64), name, TenantId::from(1_u64))
        .seal(None);
        let table = to_table([&event]);
        let row = table.lines().nth(2).unwrap();
        assert!(row.contains(&format!("| Sam | {shown} |")), "{row}");
    }
}

/// A row someone other than the agent writes about a session (the system
/// ending it, an admin revoking it, the customer consenting) names the
/// agent whose session it was; the agent's own rows need not.
#[test]
fn rows_written_by_others_name_the_agent_whose_session_it_was() {
    let s = active();
    let by_agent = Actor::user(agent().id, "AdminUser1");
    let ended = |by: Actor, reason: EndReason| {
        let event = s
            .end(reason, by, T0, Details::new())
            .unwrap()
            .event()
            .clone();
        event.seal(None)
    };
    let expired = ended(Actor::System, EndReason::Expired);
    assert_eq!(expired.details.get("agent"), Some("1"));
    assert_eq!(expired.details.get("agent_name"), Some("AdminUser1"));
    assert_eq!(
        expired.describe(),
        "Ended impersonation session (maximum duration reached). Agent: \u{201C}AdminUser1\u{201D}."
    );
    let revoked = ended(
        Actor::user(UserId::from(9_u64), "Ada Admin"),
        EndReason::Revoked,
    );
    assert!(
        revoked
            .describe()
            .ends_with("(revoked). Agent: \u{201C}AdminUser1\u{201D}.")
    );
    let stopped = ended(by_agent.clone(), EndReason::Stopped);
    assert_eq!(stopped.details.get("agent"), None);
    assert!(!stopped.describe().contains("Agent:"));
    // The end's own details stand against a caller's of the same name, and
    // against a full list of them.
    let mut crowded = Details::new().with("agent", "9").with("reason", "stopped");
    for n in 0..40 {
        crowded.insert(&format!("k{n:02}"), n);
    }
    let ended_by_ada = s
        .end(
            EndReason::Revoked,
            Actor::user(UserId::from(9_u64), "Ada Admin"),
            T0,
            crowded,
        )
        .unwrap()
        .event()
        .clone()
        .seal(None);
    assert_eq!(ended_by_ada.details.get("agent"), Some("1"));
    assert_eq!(ended_by_ada.details.get("reason"), Some("revoked"));
    assert!(
        ended_by_ada.describe().starts_with(
            "Ended impersonation session (revoked). Agent: \u{201C}AdminUser1\u{201D}."
        ),
        "{}",
        ended_by_ada.describe()
    );
    // An agent revoking their own sessions is named once, as the actor.
    let own = AuditDraft::new(T0, AuditAction::SessionsRevoked, by_agent, s.chain())
        .details(
            Details::new()
                .with("agent", &agent().id)
                .with("cause", "agent_revoked"),
        )
        .seal(None);
    assert!(!own.describe().contains("Agent:"), "{}", own.describe());

    let consented = pending()
        .activate(Actor::user(customer().id, "User123"), T0)
        .unwrap()
        .event()
        .clone()
        .seal(None);
    let table = to_table([&consented]);
    assert!(
        table.contains(
            "| User123 | User123 | Customer consented; impersonation session started. Agent: \u{201C}AdminUser1\u{201D}. Reason: "
        ),
        "{table}"
    );
}

/// Free text (a reason, a note) is quoted, its own curly quotes made
/// straight, so it cannot pass for the row's own words.
#[test]
fn a_reason_cannot_pass_for_a_ticket() {
    let event = Session::draft(
        &active(),
        T0,
        AuditAction::SessionStarted,
        Actor::user(agent().id, "AdminUser1"),
    )
    .details(
        Details::new()
            .with("reason_text", "Locked out\u{201D}. Ticket: SUP-1. \u{201C}")
            .with("ticket", "SUP-2")
            .with("note", "x"),
    )
    .seal(None);
    assert_eq!(
        event.describe(),
        "Started impersonation session. Reason: \u{201C}Locked out\". Ticket: SUP-1. \"\u{201D}. Ticket: SUP-2. Note: \u{201C}x\u{201D}."
    );
    // Marks drawn like a closing quote are made straight too.
    for mark in [
        "\u{201F}",
        "\u{2033}",
        "\u{2036}",
        "\u{301E}",
        "\u{FF02}",
        "\u{02EE}",
        "\u{02BA}",
        "\u{05F4}",
        "\u{2019}\u{2019}",
    ] {
        let event = AuditDraft::new(
            T0,
            AuditAction::SessionStarted,
            Actor::user(agent().id, "AdminUser1"),
            ChainKey::for_agent(&agent().id),
        )
        .details(Details::new().with("reason_text", format!("Locked out{mark}. Ticket: SUP-1")))
        .seal(None);
        assert_eq!(
            event.describe(),
            "Started impersonation session. Reason: \u{201C}Locked out\". Ticket: SUP-1\u{201D}.",
            "{mark:?}"
        );
    }
}

#[test]
fn each_action_reads_like_the_seed_table() {
    let s = active();
    let start = Session::draft(
        &s,
        T0,
        AuditAction::SessionStarted,
        Actor::user(agent().id, "AdminUser1"),
    )
    .details(Details::new().with("reason_text", "Customer cannot log in"))
    .seal(None);
    assert_eq!(start.action.label(), "User Impersonation");
    assert_eq!(
        start.describe(),
        "Started impersonation session. Reason: \u{201C}Customer cannot log in\u{201D}."
    );
    let end = s
        .end(
            EndReason::Stopped,
            Actor::user(agent().id, "AdminUser1"),
            T0,
            Details::new(),
        )
        .unwrap()
        .event()
        .clone()
        .seal(None);
    assert_eq!(end.action.label(), "User Impersonation End");
    assert_eq!(
        end.describe(),
        "Ended impersonation session (stopped by the agent)."
    );
    assert_eq!(AuditAction::Access.label(), "Data Access");
    assert_eq!(AuditAction::Modification.label(), "Data Modification");
    for action in AuditAction::ALL {
        assert_eq!(AuditAction::from_code(action.code()), Some(action));
    }
}

#[test]
fn json_lines_round_trip_and_still_verify() {
    let (chain, events) = chain_of(4);
    let text = to_json_lines(&events).unwrap();
    assert_eq!(text.lines().count(), 4);
    let back: Vec<AuditEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, events);
    assert!(verify_chain(&chain, &back, None).is_ok());
}

/// A display name is kept as written, line separators and direction
/// controls included: the export writes them as escapes, so no reader
/// that splits lines at U+2028 or U+0085 sees a second, forged event, and
/// each line still reads back as the event it was.
#[test]
fn json_lines_escape_line_separators_and_direction_controls_in_names() {
    let chain = ChainKey::for_agent(&UserId::from(1_u64));
    let forged = "Jane\u{2028}{\"id\":\"forged\"}\u{85}\u{202E}evil\u{2066}\u{7f}";
    let draft = AuditDraft::new(
        datetime!(2024-11-06 10:15:03 UTC),
        AuditAction::Access,
        Actor::user(UserId::from(1_u64), forged),
        chain.clone(),
    )
    .subject(UserId::from(2_u64), forged, TenantId::from(1_u64));
    let events = vec![draft.seal(None)];
    let text = to_json_lines(&events).unwrap();
    for c in ['\u{2028}', '\u{85}', '\u{202E}', '\u{2066}', '\u{7f}'] {
        assert!(!text.contains(c), "{c:?} in {text:?}");
    }
    assert!(text.contains("Jane\\u2028{"), "{text}");
    assert_eq!(text.lines().count(), 1);
    let back: AuditEvent = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(back.actor.name(), forged);
    assert_eq!(back, events[0]);
    assert!(verify_chain(&chain, &[back], None).is_ok());
}

/// An event whose time RFC 3339 cannot write (year -1, given by hand)
/// fails the export: it is not left out of it.
#[test]
fn json_lines_refuse_an_event_they_cannot_write() {
    let (chain, mut events) = chain_of(2);
    let draft = AuditDraft::new(
        datetime!(-0001-01-01 0:00 UTC),
        AuditAction::Access,
        Actor::user(UserId::from(1_u64), "AdminUser1"),
        chain.clone(),
    );
    events.push(draft.seal(events.last().map(AuditEvent::head)));
    assert!(to_json_lines(&events).is_err());
    assert!(to_json_lines(&events[..2]).is_ok());
}

#[test]
fn details_are_sanitised_and_bounded() {
    let d = Details::new()
        .with("note", "line\nbreak \u{202E}rtl")
        .with("long", "y".repeat(5_000))
        .with("bad key!", "dropped")
        .with("", "dropped");
    assert_eq!(d.get("note"), Some("line\u{FFFD}break \u{FFFD}rtl"));
    assert_eq!(
        d.get("long").unwrap().chars().count(),
        impersonation_core::MAX_DETAIL_VALUE
    );
    assert_eq!(d.iter().count(), 2);
    let mut many = Details::new();
    for i in 0..100 {
        many.insert(&format!("k{i}"), i);
    }
    assert_eq!(many.iter().count(), impersonation_core::MAX_DETAIL_ENTRIES);
}

#[test]
fn timestamps_are_kept_to_the_microsecond_in_utc() {
    let at = datetime!(2024-11-06 10:15:00.123456789 +02:00);
    let draft = AuditDraft::new(
        at,
        AuditAction::Access,
        Actor::System,
        ChainKey::for_agent(&UserId::from(1_u64)),
    );
    assert_eq!(draft.at, datetime!(2024-11-06 08:15:00.123456 UTC));
    assert_eq!(draft.at.offset(), time::UtcOffset::UTC);
}

proptest::proptest! {
    /// `Details` is a sorted list: whatever the order of inserts, it reads,
    /// iterates and serialises exactly as a sorted map given the same
    /// inserts would (the audit hash covers that JSON), and reads back.
    /// 64 keys and up to 80 inserts: a run goes past the cap of 32 entries
    /// (a new key refused, a known one replaced) in about four cases of ten.
    #[test]
    fn details_behave_as_a_sorted_map(
        inserts in proptest::collection::vec(("[a-h]{2}", "[ -~]{0,8}"), 0..80),
    ) {
        let mut details = Details::new();
        let mut map = std::collections::BTreeMap::<String, String>::new();
        for (key, value) in &inserts {
            let kept = details.insert(key, value);
            let fits = map.len() < impersonation_core::MAX_DETAIL_ENTRIES || map.contains_key(key);
            proptest::prop_assert_eq!(kept, fits);
            if fits {
                map.insert(key.clone(), value.clone());
            }
        }
        for key in map.keys() {
            proptest::prop_assert_eq!(details.get(key), map.get(key).map(String::as_str));
        }
        proptest::prop_assert_eq!(details.get("zz"), None);
        let listed: Vec<(&str, &str)> = details.iter().collect();
        let expected: Vec<(&str, &str)> = map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        proptest::prop_assert_eq!(listed, expected);
        let json = serde_json::to_string(&details).unwrap();
        proptest::prop_assert_eq!(&json, &serde_json::to_string(&map).unwrap());
        let back: Details = serde_json::from_str(&json).unwrap();
        proptest::prop_assert_eq!(back, details);
    }
}

/// A clone shares its list until one of them changes: the change is the
/// changed one's own.
#[test]
fn a_changed_clone_of_details_leaves_the_original_alone() {
    let original = Details::new().with("method", "GET").with("route", "/a");
    let mut copy = original.clone();
    assert_eq!(copy, original);
    assert!(copy.insert("route", "/b"));
    assert!(copy.insert("custom.key", 200));
    assert_eq!(
        original.iter().collect::<Vec<_>>(),
        [("method", "GET"), ("route", "/a")]
    );
    assert_eq!(
        copy.iter().collect::<Vec<_>>(),
        [("custom.key", "200"), ("method", "GET"), ("route", "/b")]
    );
    assert_ne!(copy, original);
    // Empty reads back as empty, however it was made.
    let empty: Details = serde_json::from_str("{}").unwrap();
    assert_eq!(empty, Details::new());
    assert!(empty.is_empty());
}

/// A stored object with a key written twice is refused: the hash covers
/// one value per key, and a reader keeping the first of two would show a
/// value it never covered. Keys in any order read as sorted.
#[test]
fn details_refuse_a_repeated_key() {
    let refused = serde_json::from_str::<Details>(r#"{"b":"1","a":"2","b":"3"}"#).unwrap_err();
    assert!(
        refused.to_string().contains("`b` appears twice"),
        "{refused}"
    );
    let back: Details = serde_json::from_str(r#"{"b":"1","a":"2"}"#).unwrap();
    assert_eq!(back.iter().collect::<Vec<_>>(), [("a", "2"), ("b", "1")]);
}

proptest::proptest! {
    /// A stored event's time and hashes read exactly as `time`'s RFC 3339
    /// and lower-case hex write them (they are formatted on the stack), and
    /// read back to the same event.
    #[test]
    fn stored_times_and_hashes_keep_their_text(
        micros in 0_i64..253_402_300_799_999_999,
        seq in 0_usize..3,
    ) {
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).unwrap();
        let (_, mut events) = chain_of(seq + 1);
        let mut event = events.pop().unwrap();
        event.at = at;
        event.hash = event.compute_hash();
        let json = serde_json::to_value(&event).unwrap();
        let expected = at.format(&time::format_description::well_known::Rfc3339).unwrap();
        proptest::prop_assert_eq!(json["at"].as_str(), Some(expected.as_str()));
        let (hash, prev) = (event.hash.to_hex(), event.prev_hash.to_hex());
        proptest::prop_assert_eq!(json["hash"].as_str(), Some(hash.as_str()));
        proptest::prop_assert_eq!(json["prev_hash"].as_str(), Some(prev.as_str()));
        let back: AuditEvent = serde_json::from_value(json).unwrap();
        proptest::prop_assert_eq!(back, event);
    }
}
