//! The chain hash is part of the stored format: every store, and any tool
//! in another language that verifies an export, must compute the same bytes.
//! A fixed event must keep its fixed hash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use impersonation_core::{
    Actor, AuditAction, AuditDraft, ChainHead, ChainKey, Details, EventHash, EventId, Party,
    SessionId, TenantId, UserId,
};
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
