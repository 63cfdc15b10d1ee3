//! The session record and its state machine: pure transitions that return the
//! next record *and* the audit event recording it.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::audit::{Actor, AuditAction, AuditDraft, ChainKey, Details};
use crate::clock::normalize;
use crate::id::{SessionId, TenantId, UserId};
use crate::policy::{Denial, Grant};
use crate::projection::ShadowUser;
use crate::secret::SecretHash;

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The session's agent stopped it (an administrator revokes instead).
    Stopped,
    /// The maximum duration passed (or a consent request went unanswered).
    Expired,
    /// It sat unused longer than the idle timeout.
    IdleTimeout,
    /// It was revoked: by an administrator, because the agent or customer
    /// changed, or because a policy re-check failed.
    Revoked,
    /// The customer declined the consent request.
    ConsentDenied,
}

impl EndReason {
    /// The stable code.
    pub const fn code(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Expired => "expired",
            Self::IdleTimeout => "idle_timeout",
            Self::Revoked => "revoked",
            Self::ConsentDenied => "consent_denied",
        }
    }

    /// Every reason.
    pub const ALL: [EndReason; 5] = [
        Self::Stopped,
        Self::Expired,
        Self::IdleTimeout,
        Self::Revoked,
        Self::ConsentDenied,
    ];
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum SessionState {
    /// Awaiting the customer's consent.
    Pending,
    /// In use.
    Active,
    /// Over.
    Ended(EndReason),
}

impl SessionState {
    /// Pending or active: counts toward "one live session per agent".
    pub const fn is_live(self) -> bool {
        matches!(self, Self::Pending | Self::Active)
    }

    /// The stable code (`pending`, `active`, `ended`).
    pub const fn code(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Ended(_) => "ended",
        }
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ended(r) => write!(f, "ended ({})", r.code()),
            other => f.write_str(other.code()),
        }
    }
}

/// A person named by a session, as they were when it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonRef {
    /// Their id.
    pub id: UserId,
    /// Their display name (shared text: cloning is cheap).
    pub name: Arc<str>,
    /// Their tenant.
    pub tenant: TenantId,
}

/// An illegal transition: a typed error, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a session cannot go from {from} to {to}")]
pub struct TransitionError {
    /// The state it was in.
    pub from: SessionState,
    /// The state asked for.
    pub to: SessionState,
}

/// A session record. The real agent is bound here, never looked up by the
/// customer, so two agents on one customer each get themselves back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Id (UUID v7).
    pub id: SessionId,
    /// The real agent.
    pub agent: PersonRef,
    /// The impersonated customer.
    pub subject: PersonRef,
    /// What the policy allowed (shared: it never changes once granted).
    pub grant: Arc<Grant>,
    /// The customer as the agent sees them (refreshed at each policy re-check).
    pub shadow: ShadowUser,
    /// Hash of the bearer secret; stores never see the secret itself.
    pub secret_hash: SecretHash,
    /// The state.
    pub state: SessionState,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it became active.
    #[serde(with = "time::serde::rfc3339::option")]
    pub activated_at: Option<OffsetDateTime>,
    /// When the current state lapses: the end of the maximum duration once
    /// active, the end of the consent window while pending.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Last use (touched by `resolve`, possibly coalesced).
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen_at: OffsetDateTime,
    /// Last policy re-check.
    #[serde(with = "time::serde::rfc3339")]
    pub last_checked_at: OffsetDateTime,
    /// When it ended.
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    /// Incremented by every transition; stores compare it to apply a
    /// transition only to the record it was computed from.
    pub version: u64,
}

/// The creation of a session with the audit event recording it, and the event
/// recording the refusal should the store find the agent already has a live
/// session. Built only by [`Session::begin`]; a store applies exactly one of
/// the two outcomes atomically.
#[derive(Debug, Clone)]
pub struct Start {
    session: Session,
    event: AuditDraft,
    refusal: AuditDraft,
}

impl Start {
    /// The new session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The event recording it.
    pub fn event(&self) -> &AuditDraft {
        &self.event
    }

    /// The event recording a refusal (`active_session_exists`).
    pub fn refusal(&self) -> &AuditDraft {
        &self.refusal
    }

    /// Takes the parts: (session, its event, the refusal event).
    pub fn into_parts(self) -> (Session, AuditDraft, AuditDraft) {
        (self.session, self.event, self.refusal)
    }
}

/// A change of a session's state with the audit event recording it. Built
/// only by the state machine; a store applies both or neither, and only if
/// the stored record still has `expected_version`.
#[derive(Debug, Clone)]
pub struct Transition {
    next: Session,
    expected_version: u64,
    event: AuditDraft,
}

impl Transition {
    /// The record after the transition.
    pub fn next(&self) -> &Session {
        &self.next
    }

    /// The version the stored record must have.
    pub fn expected_version(&self) -> u64 {
        self.expected_version
    }

    /// The event recording it.
    pub fn event(&self) -> &AuditDraft {
        &self.event
    }

    /// Takes the parts: (next record, expected version, event).
    pub fn into_parts(self) -> (Session, u64, AuditDraft) {
        (self.next, self.expected_version, self.event)
    }
}

/// Everything needed to begin a session.
#[derive(Debug, Clone)]
pub struct Begin {
    /// The real agent.
    pub agent: PersonRef,
    /// The customer.
    pub subject: PersonRef,
    /// What the policy allowed.
    pub grant: Grant,
    /// The projected customer.
    pub shadow: ShadowUser,
    /// Hash of the new bearer secret.
    pub secret_hash: SecretHash,
}

/// Names `agent` in `draft` (the details `agent` and `agent_name`) when
/// someone else acts in it, so that its row says whose session it was.
pub(crate) fn name_the_agent(draft: &mut AuditDraft, agent: &PersonRef) {
    if draft.actor.id() != Some(&agent.id) {
        draft.details.insert("agent", &agent.id);
        draft.details.insert("agent_name", &agent.name);
    }
}

impl Session {
    /// The chain this session's events go to: its agent's.
    pub fn chain(&self) -> ChainKey {
        ChainKey::for_agent(&self.agent.id)
    }

    /// The customer's tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.subject.tenant
    }

    /// A draft naming this session's agent chain, customer and tenant.
    ///
    /// An event someone other than the agent acts in (the system ending
    /// the session, an admin revoking it, the customer consenting, a
    /// stranger's refused stop) carries the agent's id and name as the
    /// details `agent` and `agent_name`, so that its row says whose
    /// session it was.
    pub fn draft(&self, at: OffsetDateTime, action: AuditAction, actor: Actor) -> AuditDraft {
        let mut draft = AuditDraft::new(at, action, actor, self.chain())
            .subject(
                self.subject.id.clone(),
                self.subject.name.clone(),
                self.subject.tenant.clone(),
            )
            .session(self.id);
        name_the_agent(&mut draft, &self.agent);
        draft
    }

    fn agent_actor(&self) -> Actor {
        Actor::user(self.agent.id.clone(), self.agent.name.clone())
    }

    /// A new session: pending when the grant asks for consent, active otherwise.
    pub fn begin(begin: Begin, now: OffsetDateTime) -> Start {
        let now = normalize(now);
        let (state, expires_at, activated_at, action) = match begin.grant.consent_timeout {
            Some(window) => (
                SessionState::Pending,
                now.saturating_add(window),
                None,
                AuditAction::SessionRequested,
            ),
            None => (
                SessionState::Active,
                now.saturating_add(begin.grant.duration),
                Some(now),
                AuditAction::SessionStarted,
            ),
        };
        let session = Session {
            id: SessionId::new(),
            agent: begin.agent,
            subject: begin.subject,
            grant: Arc::new(begin.grant),
            shadow: begin.shadow,
            secret_hash: begin.secret_hash,
            state,
            created_at: now,
            activated_at,
            expires_at: normalize(expires_at),
            last_seen_at: now,
            last_checked_at: now,
            ended_at: None,
            version: 0,
        };
        let mut details = Details::new()
            .with("reason_text", session.grant.reason.as_str())
            .with("expires_at", session.expires_at)
            .with("read_only", session.grant.read_only);
        if let Some(ticket) = &session.grant.ticket {
            details.insert("ticket", ticket);
        }
        let event = session
            .draft(now, action, session.agent_actor())
            .details(details);
        let refusal = AuditDraft::new(
            now,
            AuditAction::Denied,
            session.agent_actor(),
            session.chain(),
        )
        .subject(
            session.subject.id.clone(),
            session.subject.name.clone(),
            session.subject.tenant.clone(),
        )
        .details(
            Details::new()
                .with("denial", Denial::ActiveSessionExists.code())
                .with("message", Denial::ActiveSessionExists)
                .with("attempt", "start"),
        );
        Start {
            session,
            event,
            refusal,
        }
    }

    /// Pending → Active: the customer consented.
    pub fn activate(&self, by: Actor, now: OffsetDateTime) -> Result<Transition, TransitionError> {
        let now = normalize(now);
        if self.state != SessionState::Pending {
            return Err(TransitionError {
                from: self.state,
                to: SessionState::Active,
            });
        }
        let mut next = self.clone();
        next.state = SessionState::Active;
        next.activated_at = Some(now);
        next.expires_at = normalize(now.saturating_add(self.grant.duration));
        next.last_seen_at = now;
        next.version = self.version.saturating_add(1);
        let mut event = self.draft(now, AuditAction::SessionStarted, by);
        event
            .details
            .insert("reason_text", self.grant.reason.as_str());
        event.details.insert("expires_at", next.expires_at);
        if let Some(id) = event.actor.id() {
            event.details.insert("consented_by", id);
        }
        Ok(Transition {
            next,
            expected_version: self.version,
            event,
        })
    }

    /// Active or Pending → Ended. `details` add to the event (a note, a cause).
    pub fn end(
        &self,
        reason: EndReason,
        by: Actor,
        now: OffsetDateTime,
        details: Details,
    ) -> Result<Transition, TransitionError> {
        let now = normalize(now);
        let to = SessionState::Ended(reason);
        let legal = match (self.state, reason) {
            (SessionState::Active, EndReason::ConsentDenied) => false,
            (SessionState::Active, _) => true,
            (SessionState::Pending, EndReason::IdleTimeout) => false,
            (SessionState::Pending, _) => true,
            (SessionState::Ended(_), _) => false,
        };
        if !legal {
            return Err(TransitionError {
                from: self.state,
                to,
            });
        }
        let mut next = self.clone();
        next.state = to;
        next.ended_at = Some(now);
        next.version = self.version.saturating_add(1);
        // The end's own details first (its reason, and whose session it
        // was), so that neither a caller's detail of the same name nor a
        // full list of them takes their place.
        let mut event = self.draft(now, AuditAction::SessionEnded, by);
        event.details.insert("reason", reason.code());
        for (key, value) in details.iter() {
            if !matches!(key, "reason" | "agent" | "agent_name") {
                event.details.insert(key, value);
            }
        }
        Ok(Transition {
            next,
            expected_version: self.version,
            event,
        })
    }

    /// The instant after which the session counts as idle.
    pub fn idle_deadline(&self) -> OffsetDateTime {
        self.last_seen_at.saturating_add(self.grant.idle_timeout)
    }

    /// Why the session is over at `now` by the clock alone, if it is.
    pub fn lapse_at(&self, now: OffsetDateTime) -> Option<EndReason> {
        match self.state {
            SessionState::Ended(_) => None,
            _ if now >= self.expires_at => Some(EndReason::Expired),
            SessionState::Active if now >= self.idle_deadline() => Some(EndReason::IdleTimeout),
            _ => None,
        }
    }
}
