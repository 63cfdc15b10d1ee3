//! The chain hash is part of the stored format: every store, and any tool
//! in another language that verifies an export, must compute the same bytes.
//! A fixed event must keep its fixed hash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use impersonation_core::{
    Actor, AuditAction, AuditDraft, AuditEvent, ChainHead, ChainKey, Details, EventHash, EventId,
    Party, SessionId, TenantId, UserId,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use time::macros::datetime;

fn fixed_event(head: Option<ChainHead>) -> impersonation_core::AuditEvent {
    let agent = UserId::new("agent-7").unwrap();
    let mut draft = AuditDraft::new(
        datetime!(2026-11-25 14:36:43.123456 UTC),
        AuditAction::Access,
        Actor::user(agent.clone(), "Abe \"Agent\" Ångström"),
        ChainKey::for_agent(&agent),
    );
    draft.id = "0193f1a2-7c3e-7b1a-9c55-0a1b2c3d4e5f"
        .parse::<EventId>()
        .unwrap();
    draft.subject = Some(Party {
        id: UserId::new("cust-1").unwrap(),
        name: "<script>alert(1)</script>".into(),
    });
    draft.tenant = Some(TenantId::new("pinecone").unwrap());
    draft.session = Some(
        "0193f1a2-0000-7000-8000-000000000001"
            .parse::<SessionId>()
            .unwrap(),
    );
    draft.details = Details::new()
        .with("method", "GET")
        .with("route", "/bookings/{id}")
        .with("status", 200);
    draft.seal(head)
}

#[test]
fn a_fixed_event_keeps_its_hash() {
    let first = fixed_event(None);
    assert_eq!(first.seq, 0);
    assert_eq!(first.prev_hash, EventHash::GENESIS);
    let second = fixed_event(Some(first.head()));
    assert_eq!(first.hash, first.compute_hash());
    assert_eq!(second.prev_hash, first.hash);
    assert_eq!(first.hash.to_hex(), FIRST);
    assert_eq!(second.hash.to_hex(), SECOND);
}

/// Computed by the implementation that hashed a serialised buffer, before
/// the JSON was streamed into the hash: the bytes must not have moved.
const FIRST: &str = "8b9980dd9cd0fad42c356c30fc237c5694608229b535c34845f620774c6f1c12";
const SECOND: &str = "419a16f463311ed4d7114fb181d3e9c7da6b84fa59327b7bab77301b81cb98ec";

/// Hashes and routes are written as lower-case hex, byte for byte what the
/// `hex` crate writes, and read back.
#[test]
fn hashes_are_lower_case_hex_and_read_back() {
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xa5);
    let secret = impersonation_core::SecretHash::from_bytes(bytes);
    assert_eq!(secret.to_hex(), hex::encode(bytes));
    assert_eq!(
        impersonation_core::SecretHash::from_hex(&secret.to_hex()).unwrap(),
        secret
    );
    let event = EventHash::from_bytes(bytes);
    assert_eq!(event.to_hex(), hex::encode(bytes));
    assert_eq!(EventHash::from_hex(&event.to_hex()).unwrap(), event);
    let route = ChainKey::for_agent(&UserId::new("agent-7").unwrap()).route();
    assert_eq!(route.len(), 16);
    assert!(
        route
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
}

/// Resealing a sealed event on another head gives exactly the event that
/// sealing the draft there gives (what a store retries with).
#[test]
fn a_resealed_event_equals_the_draft_sealed_there() {
    let first = fixed_event(None);
    let mut moved = fixed_event(None);
    moved.reseal(Some(first.head()));
    assert_eq!(moved, fixed_event(Some(first.head())));
    assert_eq!(moved.hash.to_hex(), SECOND);
    moved.reseal(None);
    assert_eq!(moved, first);
}

/// A record is the canonical JSON its hash covers, with the two hashes
/// added before the closing brace. Its text is part of the stored format
/// (the Redis store keeps it), so it is pinned here byte for byte.
#[test]
fn a_record_is_the_hashed_json_with_the_hashes_added() {
    let first = fixed_event(None);
    let record = first.to_record().unwrap();
    assert_eq!(
        record,
        concat!(
            r#"{"v":1,"id":"0193f1a2-7c3e-7b1a-9c55-0a1b2c3d4e5f","chain":"agent-7","seq":0,"#,
            r#""at_us":1795617403123456,"action":"access","#,
            r#""actor":{"kind":"user","id":"agent-7","name":"Abe \"Agent\" Ångström"},"#,
            r#""subject":{"id":"cust-1","name":"<script>alert(1)</script>"},"tenant":"pinecone","#,
            r#""session":"0193f1a2-0000-7000-8000-000000000001","#,
            r#""details":{"method":"GET","route":"/bookings/{id}","status":"200"},"#,
            r#""prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","#,
            r#""hash":"8b9980dd9cd0fad42c356c30fc237c5694608229b535c34845f620774c6f1c12"}"#,
        )
    );
    assert_eq!(AuditEvent::from_record(&record).unwrap(), first);
    // Sealing straight to a record gives the same event and text.
    let mut moved_first = fixed_event(None);
    let (sealed, text) = draft_of(&moved_first).seal_to_record(None).unwrap();
    assert_eq!((&sealed, &text), (&first, &record));
    // So does moving an event to another head.
    let second = fixed_event(Some(first.head()));
    let moved = moved_first.reseal_to_record(Some(first.head())).unwrap();
    assert_eq!(moved_first, second);
    assert_eq!(moved, second.to_record().unwrap());
    assert_eq!(second.hash.to_hex(), SECOND);
}

/// A record of another version, or with a field it does not know, is
/// refused; an event stored as serde JSON (the form before records) reads.
#[test]
fn a_record_of_another_shape_is_refused() {
    let record = fixed_event(None).to_record().unwrap();
    // Another version is named as such, even one with fields this one
    // does not know.
    for (written, named) in [
        ("2,", "2"),
        ("12,\"more\":[],", "12"),
        ("1.0,", "1.0"),
        (" 1,", " 1"),
    ] {
        let other = record.replacen(r#"{"v":1,"#, &format!(r#"{{"v":{written}"#), 1);
        let refused = AuditEvent::from_record(&other).unwrap_err().to_string();
        assert!(refused.contains(&format!("version {named:?}")), "{refused}");
    }
    let extra = record.replacen(r#"{"v":1,"#, r#"{"v":1,"extra":true,"#, 1);
    let refused = AuditEvent::from_record(&extra).unwrap_err().to_string();
    assert!(refused.contains("unknown field"), "{refused}");
    // A record always names its subject, tenant and session (`null` when
    // empty): one without them is refused, not read as having none.
    for field in [
        r#""subject":{"id":"cust-1","name":"<script>alert(1)</script>"},"#,
        r#""tenant":"pinecone","#,
        r#""session":"0193f1a2-0000-7000-8000-000000000001","#,
    ] {
        assert!(record.contains(field));
        let without = record.replacen(field, "", 1);
        let refused = AuditEvent::from_record(&without).unwrap_err().to_string();
        assert!(refused.contains("missing field"), "{refused}");
    }
    // An event stored as its serde JSON (before records) still reads.
    let legacy = serde_json::to_string(&fixed_event(None)).unwrap();
    assert!(legacy.starts_with(r#"{"id":"#));
    assert_eq!(AuditEvent::from_record(&legacy).unwrap(), fixed_event(None));
    // A detail key written twice: the hash covers the last value, and a
    // reader that keeps the first would show one it never saw.
    let twice = record.replacen(
        r#""details":{"method":"GET","#,
        r#""details":{"method":"DELETE","method":"GET","#,
        1,
    );
    assert_ne!(twice, record);
    let refused = AuditEvent::from_record(&twice).unwrap_err().to_string();
    assert!(refused.contains("`method` appears twice"), "{refused}");
    let legacy_twice = legacy.replacen(r#""method":"GET""#, r#""method":"PUT","method":"GET""#, 1);
    assert_ne!(legacy_twice, legacy);
    assert!(AuditEvent::from_record(&legacy_twice).is_err());
    let cut = &record[..record.len() - 2];
    assert!(AuditEvent::from_record(cut).is_err());
    assert!(AuditEvent::from_record("[]").is_err());
}

/// A stored event whose time is in range as written but not in UTC (a
/// legacy serde line at `9999-12-31T23:30:00-05:00`, year 10000 in UTC)
/// is refused when read, not a panic in the audit table; and a time built
/// so by hand shows in the table and seals without a panic.
#[test]
fn a_time_past_the_last_utc_date_is_refused_not_a_panic() {
    let legacy = serde_json::to_string(&fixed_event(None)).unwrap();
    let at = r#""at":"2026-11-25T14:36:43.123456Z""#;
    assert!(legacy.contains(at), "{legacy}");
    let edge = legacy.replacen(at, r#""at":"9999-12-31T23:30:00-05:00""#, 1);
    let refused = AuditEvent::from_record(&edge).unwrap_err().to_string();
    assert!(refused.contains("out of range"), "{refused}");
    let late = datetime!(9999-12-31 23:30 -5);
    assert!(!impersonation_core::table_timestamp(late).is_empty());
    let mut draft = draft_of(&fixed_event(None));
    draft.at = late;
    let event = draft.seal(None);
    assert!(impersonation_core::to_table([&event]).contains("9999-12-31"));
}

/// The draft an event was sealed from.
fn draft_of(event: &AuditEvent) -> AuditDraft {
    AuditDraft {
        id: event.id,
        at: event.at,
        action: event.action,
        actor: event.actor.clone(),
        subject: event.subject.clone(),
        tenant: event.tenant.clone(),
        session: event.session,
        chain: event.chain.clone(),
        details: event.details.clone(),
    }
}

fn arb_name() -> impl Strategy<Value = String> {
    // Quotes, backslashes, control characters, non-ASCII: everything JSON
    // must escape or carry as it is.
    proptest::string::string_regex("[ -~\"\\\\\u{7}\u{1f}é€😀]{0,24}").unwrap()
}

/// A detail value: mostly short, sometimes long enough to overflow the
/// 512-byte buffer the canonical JSON is written through, in one write
/// (a long run of plain characters) or several.
fn arb_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => arb_name(),
        1 => "[a-z]{500,1000}",
        1 => proptest::string::string_regex("[ -~é\"]{200,1000}").unwrap(),
    ]
}

prop_compose! {
    fn arb_event()(
        micros in -62_135_596_800_000_000_i64..253_402_300_799_999_999,
        action in proptest::sample::select(AuditAction::ALL.to_vec()),
        actor in proptest::option::of(("[a-z0-9-]{1,12}", arb_name())),
        subject in proptest::option::of(("[a-z0-9-]{1,12}", arb_name(), "[a-z]{1,8}")),
        session in proptest::option::of(any::<u128>()),
        details in proptest::collection::vec(("[a-z_.]{1,10}", arb_value()), 0..6),
        head in proptest::option::of((0_u64..u64::MAX / 2, any::<[u8; 32]>())),
    ) -> AuditEvent {
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).unwrap();
        let actor = match actor {
            Some((id, name)) => Actor::user(UserId::new(id).unwrap(), name),
            None => Actor::System,
        };
        let mut draft = AuditDraft::new(
            at,
            action,
            actor,
            ChainKey::for_agent(&UserId::new("agent-7").unwrap()),
        );
        if let Some((id, name, tenant)) = subject {
            draft = draft.subject(UserId::new(id).unwrap(), name, TenantId::new(tenant).unwrap());
        }
        if let Some(session) = session {
            draft = draft.session(SessionId::from_uuid(uuid::Uuid::from_u128(session)));
        }
        let mut d = Details::new();
        for (key, value) in details {
            d.insert(&key, value);
        }
        draft.details(d).seal(head.map(|(seq, hash)| ChainHead { seq, hash: EventHash::from_bytes(hash) }))
    }
}

proptest! {
    /// Whatever an event holds, its record reads back to the same event,
    /// sealing or resealing straight to a record gives what sealing and
    /// then writing it gives, and the record's text before the hashes,
    /// closed, is exactly the JSON its hash covers.
    #[test]
    fn records_read_back_and_carry_the_hashed_bytes(event in arb_event()) {
        let record = event.to_record().unwrap();
        prop_assert_eq!(&AuditEvent::from_record(&record).unwrap(), &event);

        let head = (event.seq > 0).then(|| ChainHead { seq: event.seq - 1, hash: event.prev_hash });
        let (sealed, text) = draft_of(&event).seal_to_record(head).unwrap();
        prop_assert_eq!(&sealed, &event);
        prop_assert_eq!(&text, &record);
        let mut moved = sealed.clone();
        let elsewhere = Some(ChainHead { seq: 41, hash: event.hash });
        let moved_text = moved.reseal_to_record(elsewhere).unwrap();
        prop_assert_eq!(&moved, &draft_of(&event).seal(elsewhere));
        prop_assert_eq!(moved_text, moved.to_record().unwrap());

        let (hashed, hashes) = record.rsplit_once(r#","prev_hash":"#).unwrap();
        let digest = Sha256::new()
            .chain_update(b"impersonation-audit-v1\0")
            .chain_update(event.prev_hash.as_bytes())
            .chain_update(hashed.as_bytes())
            .chain_update(b"}")
            .finalize();
        prop_assert_eq!(EventHash::from_bytes(digest.into()), event.hash);
        prop_assert_eq!(
            hashes,
            format!(r#""{}","hash":"{}"}}"#, event.prev_hash.to_hex(), event.hash.to_hex())
        );
    }
}

/// A draft whose time was set by hand, finer than microseconds or off UTC,
/// is sealed at its normalised time, so the event returned is the event
/// its record reads back as (the hash covers whole microseconds anyway).
#[test]
fn a_hand_set_time_is_sealed_normalised() {
    let mut draft = draft_of(&fixed_event(None));
    draft.at = time::macros::datetime!(2026-11-25 16:36:43.123456789 +02:00);
    let (event, record) = draft.clone().seal_to_record(None).unwrap();
    assert_eq!(event, fixed_event(None));
    assert_eq!(draft.seal(None), event);
    assert_eq!(AuditEvent::from_record(&record).unwrap(), event);
}
