//! # impersonation-core
//!
//! Safe, audited user impersonation for SaaS support teams: *impersonation*,
//! not *masquerading*. A support agent with the right permission starts a
//! session with a reason; they work as a **shadow user** that carries the
//! customer's permissions, settings and company/partner relationships but
//! none of their sensitive data; the session ends on stop, expiry, idleness
//! or revocation; and every step lands in a **hash-chained audit trail**.
//!
//! This crate has no web framework and no database dependency:
//!
//! * [`Policy`]: pure rules (permission, protected targets, no escalation,
//!   tenant boundary, reason, no nesting, one live session, durations, consent),
//!   each refusal a typed [`Denial`] with a stable code;
//! * [`Session`]: the state machine `Pending → Active → Ended`, whose pure
//!   transitions return the next record *and* its [`AuditDraft`];
//! * [`ProjectionRules`] → [`ShadowUser`]: Copy / Mask / Redact / Drop per
//!   attribute, permissions = target's ∩ grant − denied;
//! * [`AuditEvent`] chains with [`verify_chain`], exported by [`to_json_lines`]
//!   and [`to_table`];
//! * the [`Store`] trait (whole transitions only) and [`MemoryStore`];
//! * [`Impersonation`], the service bindings call: `start`, `resolve`,
//!   `record`, `stop`, `revoke`, `revoke_all_for_agent`, `revoke_all_for_subject`.
//!
//! ```
//! use impersonation_core::*;
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let directory = MemoryDirectory::new();
//! let t = TenantId::new("pinewood").unwrap();
//! let agent = Principal::new(UserId::from(1_u64), "Sam Support", t.clone())
//!     .with_permissions(["impersonation:start", "bookings:read"]);
//! let customer = Principal::new(UserId::from(2_u64), "Olive Owner", t)
//!     .with_permission("bookings:read")
//!     .with_attribute("timezone", "Europe/Lisbon")
//!     .with_attribute("password_hash", "$argon2id$…");
//! directory.insert(agent.clone());
//! directory.insert(customer.clone());
//!
//! let service = Impersonation::new(MemoryStore::new(), directory)
//!     .with_projection(ProjectionRules::new().rule("timezone", AttributeRule::Copy));
//! let started = service
//!     .start(Requester::User(&agent), StartRequest::new(customer.id.clone(), "Bookings page is empty").ticket("SUP-42"))
//!     .await?;
//! let ctx = service.resolve(&started.secret).await?;
//! assert!(ctx.shadow().attribute("password_hash").is_none()); // no rule: dropped
//! service.record(&ctx, Activity::access("Viewed bookings.")).await?;
//! service.stop(&started.secret, &agent).await?;
//!
//! assert!(service.verify_all().await?.is_ok());
//! let page = service.audit(&AuditQuery::new()).await?;
//! println!("{}", to_table(&page.events));
//! # Ok::<(), Error>(())
//! # }).unwrap();
//! ```
//!
//! ## Feature flags
//!
//! None: the core is always the whole core.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
mod audit;
mod batch;
mod clock;
mod id;
mod memory;
mod policy;
mod principal;
mod projection;
mod reuse;
mod secret;
mod serde_util;
mod service;
mod session;
mod store;
pub mod views;

pub use api::{ImpersonationApi, TokenResolver};
pub use audit::{
    Actor, AuditAction, AuditDraft, AuditEvent, BreakKind, ChainBreak, ChainHead, ChainKey,
    ChainReport, ChainVerifier, Details, EventHash, MAX_DETAIL_ENTRIES, MAX_DETAIL_KEY,
    MAX_DETAIL_VALUE, Party, TABLE_HEAD, display_text, table_rows, table_timestamp, to_json_lines,
    to_table, verify_chain,
};
pub use clock::{Clock, ManualClock, SystemClock, normalize, unix_micros};
pub use id::{EventId, IdError, MAX_ID_LEN, SessionId, TenantId, UserId};
pub use memory::MemoryStore;
pub use policy::{
    Consent, DEFAULT_DENIED, DEFAULT_READ_ONLY, Denial, Grant, Policy, PolicyContext, Reason,
    StartRequest, Ticket,
};
pub use principal::{
    Directory, DirectoryError, MemoryDirectory, Permission, PermissionPattern, Principal,
    RelationKind, Relationship, Role, TenantScope,
};
pub use projection::{AttributeRule, MASK_CHAR, Mask, ProjectionRules, ShadowUser, ShadowValue};
pub use secret::{SecretError, SecretHash, SecretLookup, SessionSecret, TOKEN_LEN};
pub use service::{
    Activity, ActivityKind, Banner, Config, Context, Error, Impersonation, Initiator,
    ListingMismatch, Requester, Started, VerifyReport,
};
pub use session::{
    Begin, EndReason, PersonRef, Session, SessionState, Start, Transition, TransitionError,
};
pub use store::{
    AppendGuard, AuditCursor, AuditPage, AuditQuery, BackendError, Batching, CursorError,
    DecodedSessions, LiveFilter, MAX_PAGE, Order, StartOutcome, Store, StoreError, Touch,
    redacted_url,
};

/// Re-exported so adapters and apps use the same versions.
pub use async_trait::async_trait;
pub use time;

// The README's integration example is compiled as a doctest, so it cannot rot.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
