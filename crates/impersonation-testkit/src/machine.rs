//! The state-machine property test: random sequences of start / stop /
//! resolve / record / revoke / consent / lapse sweeps / clock moves /
//! directory changes from
//! several agents, run against the real service on any store, checked
//! against a reference model after every step. A second process of the
//! app on the same store stops sessions too, whose end this process's
//! reuse map does not see.
//!
//! Invariants checked after every step:
//! 1. no session without its start event (the session's first event starts it);
//! 2. each ended session has exactly one end event, a live one none;
//! 3. at most one live session per agent (and exactly the model's);
//! 4. `resolve` never returns a session past its maximum duration or idle
//!    timeout, and its context's deadlines are the session's;
//! 5. every audit chain verifies against its head (the agents' and the
//!    customers' revocation chains);
//! 6. no shadow user holds a dropped or redacted value, or a permission
//!    outside target ∩ grant − denied;
//! 7. no nesting: a start from inside a session is always refused;
//! 8. no tenant is crossed without a relationship covering it;
//! 9. every denied attempt is audited, in the chain it belongs to (the
//!    model's count per agent's chain, and none elsewhere);
//! 10. every access and change a record answered for is on its agent's
//!     chain once, and the chain holds no other (a change that finished
//!     after its session ended too, after the end, marked `after_end`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use impersonation_core::{
    Activity, AttributeRule, AuditAction, AuditEvent, AuditQuery, ChainKey, Consent, Context,
    Denial, EndReason, Error, Grant, Impersonation, Initiator, LiveFilter, MASK_CHAR, ManualClock,
    MemoryDirectory, Permission, Policy, Principal, RelationKind, Relationship, Requester, Role,
    SessionId, SessionSecret, SessionState, ShadowUser, ShadowValue, StartRequest, Store, TenantId,
    TenantScope, verify_chain,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use time::{Duration, OffsetDateTime};

use crate::conformance::{all_events, whole_chain};
use crate::world::{World, epoch};

/// How many sequences, and how long.
#[derive(Debug, Clone, Copy)]
pub struct MachineConfig {
    /// Number of random sequences.
    pub cases: u32,
    /// Longest sequence.
    pub max_steps: usize,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            cases: 1_000,
            max_steps: 50,
        }
    }
}

/// A reason as the random agent types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonKind {
    /// Acceptable.
    Valid,
    /// Blank.
    Empty,
    /// Below the minimum length.
    Short,
    /// With a bidirectional override.
    Control,
    /// Above the maximum length.
    TooLong,
}

impl ReasonKind {
    fn text(self) -> String {
        match self {
            Self::Valid => "Customer reports missing bookings".into(),
            Self::Empty => "   ".into(),
            Self::Short => "short".into(),
            Self::Control => "Investigating \u{202E}gnp.exe issue".into(),
            Self::TooLong => "x".repeat(501),
        }
    }

    fn denial(self) -> Option<Denial> {
        match self {
            Self::Valid => None,
            Self::Empty => Some(Denial::ReasonRequired),
            Self::Short => Some(Denial::ReasonTooShort),
            Self::Control => Some(Denial::ReasonInvalidCharacters),
            Self::TooLong => Some(Denial::ReasonTooLong),
        }
    }
}

/// One step. Agents are 0 (support for tenant t1 only), 1 (support for every
/// tenant) and 2 (the lead: every tenant, and the admin permission).
/// Targets are 0 (t1 owner), 1 (t1 staff), 2 (t2 owner), 3 (t1 user holding
/// a permission no agent has), 4 (t1 admin), 5 (the lead), 6 (the agent itself),
/// 7 (a t1 partner whose relationship reaches t2 too: beyond agent 0's reach).
/// New kinds of step come as the model grows: match with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Start, possibly from inside the agent's own session.
    Start {
        /// Agent.
        agent: usize,
        /// Target.
        target: usize,
        /// Reason.
        reason: ReasonKind,
        /// Try from inside the agent's current session.
        nested: bool,
    },
    /// Resolve the agent's latest secret.
    Resolve {
        /// Agent.
        agent: usize,
    },
    /// Record an activity with the agent's last context.
    Record {
        /// Agent.
        agent: usize,
        /// A modification rather than an access.
        modification: bool,
    },
    /// Record an activity that has already taken place with the agent's
    /// last context (`record_completed`, as a binding records a request
    /// once its handler answered): a change made in a session that has
    /// ended since (or lapsed) is recorded after the end, `after_end`.
    Complete {
        /// Agent.
        agent: usize,
        /// A modification rather than an access.
        modification: bool,
    },
    /// The agent stops their latest session in another process of the
    /// app (another instance behind the load balancer): the store has it
    /// ended, while this process may still serve a read from its reuse map
    /// for `Config::reuse_interval`, but records nothing more in it.
    StopElsewhere {
        /// Agent.
        agent: usize,
    },
    /// Stop the agent's latest session, as `by`.
    Stop {
        /// Agent.
        agent: usize,
        /// Who asks.
        by: usize,
    },
    /// Revoke the agent's latest session, as `by`.
    Revoke {
        /// Agent.
        agent: usize,
        /// Who asks.
        by: usize,
    },
    /// Host code revokes all of an agent's sessions.
    RevokeAllForAgent {
        /// Agent.
        agent: usize,
    },
    /// Host code revokes all sessions on a customer.
    RevokeAllForSubject {
        /// Target.
        target: usize,
    },
    /// The customer answers the agent's latest request (pending, or in
    /// any other state, which no answer changes), or someone else tries
    /// to (`stranger`: another agent), which is refused and audited.
    Consent {
        /// Agent.
        agent: usize,
        /// Yes or no.
        grant: bool,
        /// Answered by another agent instead of the customer.
        stranger: bool,
    },
    /// Host code ends every lapsed session (`Impersonation::end_lapsed`).
    EndLapsed,
    /// The clock moves.
    Advance {
        /// Seconds.
        secs: i64,
    },
    /// The clock moves by a second or less: within the service's reuse
    /// interval and a touch's coalescing, and across their edges.
    Tick {
        /// Milliseconds.
        millis: i64,
    },
    /// The clock moves to `millis` from the next deadline of the agent's
    /// latest session, as the model knows it, if that is ahead; otherwise
    /// it stays. The deadline is the end of the consent window for a
    /// pending session, else the earlier of its idle deadline (its last
    /// touch, plus the idle timeout) and its expiry; an ended session has
    /// none. Random sequences of `Advance` and `Tick` seldom land within a
    /// second of such an edge, where a resolve served from the reuse cache,
    /// or one whose touch is coalesced, meets a session that has idled out
    /// since its last touch.
    ToDeadline {
        /// Agent.
        agent: usize,
        /// Milliseconds from the deadline (negative: before it).
        millis: i64,
    },
    /// Resolve the secret of one of the case's ended sessions, long after
    /// the agent moved on: it must still answer that the session ended,
    /// and why (`pick` is taken modulo their number).
    ResolveRetired {
        /// Which one.
        pick: usize,
    },
    /// The agent loses (or regains) the impersonate permission.
    SetPermission {
        /// Agent 0 or 1.
        agent: usize,
        /// Whether they hold it.
        granted: bool,
    },
    /// A customer (targets 0-2) moves to another time zone: an attribute
    /// the shadow user copies, so that the next re-check refreshes the
    /// shadow user and the store keeps the new one (`record_check`).
    SetTimezone {
        /// Target 0, 1 or 2.
        target: usize,
        /// Lisbon, or Toronto.
        lisbon: bool,
    },
    /// A customer (targets 0-2) is made an administrator, a role nobody
    /// may impersonate, or is one no longer: a session on them ends as
    /// revoked at its next re-check, and a start on them is refused.
    SetAdmin {
        /// Target 0, 1 or 2.
        target: usize,
        /// Whether they hold the role.
        admin: bool,
    },
    /// A customer (targets 0-2) gains a permission no agent holds
    /// (`reports:run`), or loses it: impersonating them would escalate,
    /// so a session on them ends as revoked at its next re-check, and a
    /// start on them is refused.
    SetEscalating {
        /// Target 0, 1 or 2.
        target: usize,
        /// Whether they hold it.
        granted: bool,
    },
    /// A customer of t1 (target 0 or 1) moves to tenant t2, or back: out of
    /// agent 0's reach (support for t1 only), whose session on them ends as
    /// revoked at its next re-check; agents 1 and 2 reach every tenant.
    MoveToT2 {
        /// Target 0 or 1.
        target: usize,
        /// In t2 (else t1).
        moved: bool,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let agent = 0..3_usize;
    let reason = prop_oneof![
        6 => Just(ReasonKind::Valid),
        1 => Just(ReasonKind::Empty),
        1 => Just(ReasonKind::Short),
        1 => Just(ReasonKind::Control),
        1 => Just(ReasonKind::TooLong),
    ];
    prop_oneof![
        6 => (agent.clone(), 0..8_usize, reason, prop::bool::weighted(0.1))
            .prop_map(|(agent, target, reason, nested)| Op::Start { agent, target, reason, nested }),
        6 => agent.clone().prop_map(|agent| Op::Resolve { agent }),
        4 => (agent.clone(), any::<bool>()).prop_map(|(agent, modification)| Op::Record { agent, modification }),
        2 => (agent.clone(), any::<bool>()).prop_map(|(agent, modification)| Op::Complete { agent, modification }),
        2 => (agent.clone(), prop::sample::select(vec![0_usize, 1, 2, 0, 1, 2, 9]))
            .prop_map(|(agent, by)| Op::Stop { agent, by: if by == 9 { agent } else { by } }),
        1 => agent.clone().prop_map(|agent| Op::StopElsewhere { agent }),
        1 => (agent.clone(), 0..3_usize).prop_map(|(agent, by)| Op::Revoke { agent, by }),
        1 => agent.clone().prop_map(|agent| Op::RevokeAllForAgent { agent }),
        1 => (0..4_usize).prop_map(|target| Op::RevokeAllForSubject { target }),
        2 => (agent.clone(), any::<bool>(), prop::bool::weighted(0.25))
            .prop_map(|(agent, grant, stranger)| Op::Consent { agent, grant, stranger }),
        4 => prop_oneof![0..120_i64, 300..1_200_i64, Just(3_600_i64), Just(899_i64), Just(900_i64)]
            .prop_map(|secs| Op::Advance { secs }),
        3 => prop_oneof![1..1_000_i64, Just(500_i64), Just(999_i64), Just(1_000_i64)]
            .prop_map(|millis| Op::Tick { millis }),
        3 => (agent, prop_oneof![-1_000..=1_000_i64, -1_500..1_500_i64, Just(-1_i64), Just(0_i64), Just(1_i64)])
            .prop_map(|(agent, millis)| Op::ToDeadline { agent, millis }),
        2 => (0..8_usize).prop_map(|pick| Op::ResolveRetired { pick }),
        1 => (0..2_usize, any::<bool>()).prop_map(|(agent, granted)| Op::SetPermission { agent, granted }),
        1 => (0..3_usize, any::<bool>()).prop_map(|(target, lisbon)| Op::SetTimezone { target, lisbon }),
        1 => (0..3_usize, any::<bool>()).prop_map(|(target, admin)| Op::SetAdmin { target, admin }),
        1 => (0..3_usize, any::<bool>())
            .prop_map(|(target, granted)| Op::SetEscalating { target, granted }),
        1 => (0..2_usize, any::<bool>()).prop_map(|(target, moved)| Op::MoveToT2 { target, moved }),
        1 => Just(Op::EndLapsed),
    ]
}

/// What the model expects of a session.
#[derive(Debug, Clone)]
struct ModelSession {
    id: SessionId,
    subject: usize,
    state: SessionState,
    expires_at: OffsetDateTime,
    last_seen: OffsetDateTime,
}

struct Case<S: Store> {
    world: World,
    service: Impersonation<Arc<S>, MemoryDirectory>,
    /// A second process of the app on the same store: its ends do not
    /// reach the first's reuse map (`Op::StopElsewhere`).
    elsewhere: Impersonation<Arc<S>, MemoryDirectory>,
    directory: MemoryDirectory,
    clock: ManualClock,
    consent: bool,
    agents: Vec<Principal>,
    targets: Vec<Principal>,
    demoted: [bool; 3],
    /// The revoke-alls of each agent's sessions so far: each is on record
    /// in the agent's chain, whether or not it ended a session.
    agent_revocations: [usize; 3],
    /// The revoke-alls on each target so far, by index into `targets`:
    /// each is on record in the customer's revocation chain.
    subject_revocations: Vec<usize>,
    /// Latest session and secret of each agent.
    latest: BTreeMap<usize, (ModelSession, SessionSecret)>,
    /// Last context each agent resolved.
    contexts: BTreeMap<usize, Context>,
    /// The session each agent's last store read resolved, and when: the
    /// service reuses it for `Config::reuse_interval`.
    reused: BTreeMap<SessionId, (OffsetDateTime, Context)>,
    /// Every session ever started, by id, with its agent.
    sessions: BTreeMap<SessionId, usize>,
    /// Refused attempts on record in each agent's chain: the agent's own
    /// starts, and strangers' stops and revokes of the agent's sessions
    /// (which go on the session's chain).
    denials: [usize; 3],
    /// Accesses and changes on record in each agent's chain: every record
    /// that answered with its event (and every change made after its
    /// session's end), as `[accesses, changes]`.
    activities: [[usize; 2]; 3],
    /// The events those records answered with, and their agents: each on
    /// that agent's chain once.
    recorded: Vec<(usize, impersonation_core::EventId)>,
    /// The sessions the agents started before their latest, all ended:
    /// id, why, and secret.
    retired: Vec<(SessionId, EndReason, SessionSecret)>,
}

/// The role the default policy lets nobody impersonate.
const PROTECTED_ROLE: &str = "admin";
/// A permission customers may hold and no agent does.
const ESCALATING_PERMISSION: &str = "reports:run";
const IDLE: Duration = Duration::minutes(15);
const MAX: Duration = Duration::hours(1);
const CONSENT_WINDOW: Duration = Duration::minutes(10);

/// Why the model's session has lapsed at `now`, if it has: the rules a
/// resolve applies (`Session::lapse_at`).
fn lapse_of(m: &ModelSession, now: OffsetDateTime) -> Option<EndReason> {
    match m.state {
        SessionState::Ended(_) => None,
        _ if now >= m.expires_at => Some(EndReason::Expired),
        SessionState::Active if now >= m.last_seen + IDLE => Some(EndReason::IdleTimeout),
        _ => None,
    }
}

pub(crate) fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

impl<S: Store> Case<S> {
    fn new(store: S, consent: bool) -> Self {
        let world = World::new();
        let t1 = world.tenant("t1");
        let t2 = world.tenant("t2");
        let support = |n: u32| world.agent(n);
        let agent0 = support(0);
        let mut agent0 = agent0;
        // Support for t1 alone; and the vendor's company, which covers
        // every tenant but is not a kind that crosses into one.
        agent0.relationships = vec![
            Relationship::new(
                RelationKind::Support,
                "support-t1",
                "Support (t1)",
                [t1.clone()],
            ),
            Relationship::all_tenants(RelationKind::Company, "vendor", "Vendor"),
        ];
        let agent1 = support(1);
        let lead = support(2).with_permission("impersonation:admin");
        let escalated = Principal::new(world.user("escalated"), "Escalated", t1.clone())
            .with_permission(ESCALATING_PERMISSION);
        let admin = Principal::new(world.user("admin"), "Admin", t1.clone())
            .with_role(PROTECTED_ROLE)
            .with_permission("bookings:read");
        let mut staff = world.customer(1, "t1");
        staff.permissions = [Permission::new("bookings:read")].into();
        // A partner of t1 whose company manages t2 as well: the shadow
        // user would carry that relationship, so only an agent who reaches
        // t2 too may impersonate them.
        let mut partner = world.customer(7, "t1");
        partner.relationships.push(Relationship::new(
            RelationKind::Partner,
            "partner-t1-t2",
            "Partner (t1, t2)",
            [t1.clone(), t2],
        ));
        let targets = vec![
            world.customer(0, "t1"),
            staff,
            world.customer(2, "t2"),
            escalated,
            admin,
            lead.clone(),
            partner,
        ];
        let directory = MemoryDirectory::new();
        for p in [&agent0, &agent1, &lead].into_iter().chain(targets.iter()) {
            directory.insert(p.clone());
        }
        let clock = ManualClock::new(epoch());
        let mut policy = Policy::default().max_duration(MAX).idle_timeout(IDLE);
        if consent {
            policy = policy.consent(Consent::Required {
                timeout: CONSENT_WINDOW,
            });
        }
        let target_count = targets.len();
        let store = Arc::new(store);
        let process = |store: Arc<S>| {
            Impersonation::new(store, directory.clone())
                .with_policy(policy.clone())
                .with_projection(world.rules.clone())
                .with_clock(clock.clone())
        };
        let service = process(Arc::clone(&store));
        let elsewhere = process(store);
        Self {
            world,
            service,
            elsewhere,
            directory,
            clock,
            consent,
            agents: vec![agent0, agent1, lead],
            targets,
            demoted: [false; 3],
            agent_revocations: [0; 3],
            subject_revocations: vec![0; target_count],
            latest: BTreeMap::new(),
            contexts: BTreeMap::new(),
            reused: BTreeMap::new(),
            sessions: BTreeMap::new(),
            denials: [0; 3],
            activities: [[0; 2]; 3],
            recorded: Vec::new(),
            retired: Vec::new(),
        }
    }

    fn now(&self) -> OffsetDateTime {
        self.service.now()
    }

    fn agent(&self, n: usize) -> Principal {
        self.directory
            .get(&self.agents[n].id)
            .unwrap_or_else(|| self.agents[n].clone())
    }

    fn target(&self, agent: usize, n: usize) -> Principal {
        match n {
            6 => self.agent(agent),
            7 => self.targets[6].clone(),
            n => self.targets[n].clone(),
        }
    }

    /// Whether target `n` of `agent` (as `Op::Start` numbers them) holds
    /// the role nobody may impersonate now.
    fn is_protected(&self, agent: usize, n: usize) -> bool {
        self.target(agent, n)
            .roles
            .contains(&Role::new(PROTECTED_ROLE))
    }

    /// Whether a re-check of a session of `agent`'s on target `n` ends it:
    /// the agent lost the right to impersonate, or the pair is refused now
    /// (the customer became someone nobody may impersonate, holds a
    /// permission the agent lacks, or moved out of the agent's reach).
    fn recheck_ends(&self, agent: usize, n: usize) -> bool {
        self.demoted[agent] || self.pair_denial(agent, n).is_some()
    }

    /// The policy's refusal of the pair as it stands now, rule by rule in
    /// the policy's order (the agent's permission aside).
    fn pair_denial(&self, agent: usize, n: usize) -> Option<Denial> {
        let target = self.target(agent, n);
        let escalates = target
            .permissions
            .contains(&Permission::new(ESCALATING_PERMISSION));
        // Agent 0 supports t1 alone: a customer elsewhere (target 2, or one
        // moved), or the partner whose company reaches t2 too, is beyond.
        let beyond_agent0 = n == 7 || target.tenant != self.world.tenant("t1");
        match n {
            6 => Some(Denial::SelfImpersonation),
            5 if agent == 2 => Some(Denial::SelfImpersonation),
            n if self.is_protected(agent, n) => Some(Denial::ProtectedRole),
            5 => Some(Denial::TargetIsAgent),
            _ if escalates => Some(Denial::Escalation),
            _ if agent == 0 && beyond_agent0 => Some(Denial::TenantBoundary),
            _ => None,
        }
    }

    /// Changes customer `target` (0-2) in the directory and in the model.
    fn change_target(&mut self, target: usize, change: impl Fn(&mut Principal)) {
        self.directory.update(&self.targets[target].id, &change);
        change(&mut self.targets[target]);
    }

    /// The policy decision the model expects, rule by rule in the policy's order.
    fn expected_denial(&self, agent: usize, target: usize, reason: ReasonKind) -> Option<Denial> {
        if self.demoted[agent] {
            return Some(Denial::MissingPermission);
        }
        let pair = self.pair_denial(agent, target);
        pair.or(reason.denial()).or_else(|| {
            self.latest
                .get(&agent)
                .filter(|(s, _)| s.state.is_live())
                .map(|_| Denial::ActiveSessionExists)
        })
    }

    /// The context this process serves for session `id` at `now` without
    /// reading the store, as its reuse map does: one it read less than
    /// `Config::reuse_interval` before, still within the deadlines it had
    /// then (whatever the store holds now, ended elsewhere included).
    fn reused_at(&self, id: SessionId, now: OffsetDateTime) -> Option<&Context> {
        let reuse = self.service.config().reuse_interval;
        self.reused
            .get(&id)
            .filter(|(at, ctx)| {
                *at <= now
                    && now - *at < reuse
                    && now < ctx.expires_at()
                    && now < ctx.idle_deadline()
            })
            .map(|(_, ctx)| ctx)
    }

    fn end_model(&mut self, agent: usize, reason: EndReason) {
        if let Some((s, _)) = self.latest.get_mut(&agent)
            && s.state.is_live()
        {
            // Every end goes through the service, which stops reusing the
            // session (an ended one it meets is no end of its own).
            self.reused.remove(&s.id);
            s.state = SessionState::Ended(reason);
        }
    }

    async fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Start {
                agent,
                target,
                reason,
                nested,
            } => self.start(agent, target, reason, nested).await,
            Op::Resolve { agent } => self.resolve(agent).await.map(|_| ()),
            Op::Record {
                agent,
                modification,
            } => self.record(agent, modification).await,
            Op::Complete {
                agent,
                modification,
            } => self.complete(agent, modification).await,
            Op::Stop { agent, by } => self.stop(agent, by, false).await,
            Op::StopElsewhere { agent } => self.stop(agent, agent, true).await,
            Op::Revoke { agent, by } => self.revoke(agent, by).await,
            Op::RevokeAllForAgent { agent } => {
                let revoked = self
                    .service
                    .revoke_all_for_agent(
                        &self.agents[agent].id,
                        Initiator::System,
                        "agent disabled",
                    )
                    .await
                    .map_err(|e| fail(format!("revoke_all_for_agent: {e}")))?;
                self.agent_revocations[agent] += 1;
                // A session whose time was up ends as expired or idle, and
                // is not among those revoked.
                let now = self.now();
                let live = self
                    .latest
                    .get(&agent)
                    .filter(|(s, _)| s.state.is_live())
                    .map(|(s, _)| (s.id, lapse_of(s, now)));
                let expected = live.and_then(|(id, lapse)| lapse.is_none().then_some(id));
                prop_assert_eq!(revoked, expected.into_iter().collect::<Vec<_>>());
                let reason = live
                    .and_then(|(_, lapse)| lapse)
                    .unwrap_or(EndReason::Revoked);
                self.end_model(agent, reason);
                Ok(())
            }
            Op::RevokeAllForSubject { target } => {
                let subject = self.targets[target].id.clone();
                let mut revoked = self
                    .service
                    .revoke_all_for_subject(&subject, Initiator::System, "password changed")
                    .await
                    .map_err(|e| fail(format!("revoke_all_for_subject: {e}")))?;
                self.subject_revocations[target] += 1;
                revoked.sort();
                let mut expected: Vec<SessionId> = Vec::new();
                let now = self.now();
                for agent in 0..3 {
                    if let Some((s, _)) = self.latest.get(&agent)
                        && s.state.is_live()
                        && s.subject == target
                    {
                        match lapse_of(s, now) {
                            Some(lapse) => self.end_model(agent, lapse),
                            None => {
                                expected.push(s.id);
                                self.end_model(agent, EndReason::Revoked);
                            }
                        }
                    }
                }
                expected.sort();
                prop_assert_eq!(revoked, expected);
                Ok(())
            }
            Op::Consent {
                agent,
                grant,
                stranger,
            } => self.consent(agent, grant, stranger).await,
            Op::ResolveRetired { pick } => {
                if self.retired.is_empty() {
                    return Ok(());
                }
                let (id, reason, secret) = &self.retired[pick % self.retired.len()];
                let now = self.now();
                // Ended in another process a moment after this one read it:
                // served from its reuse map while that read is in time.
                let kept = self.reused_at(*id, now).cloned();
                match (self.service.resolve(secret).await, kept) {
                    (Ok(ctx), Some(kept)) if ctx.session() == *id => {
                        prop_assert_eq!(ctx.shadow(), kept.shadow(), "a reused context changed");
                        Ok(())
                    }
                    (Err(Error::Ended(r)), None) if r == *reason => Ok(()),
                    (other, kept) => Err(fail(format!(
                        "the secret of session {id}, ended ({reason:?}; kept here: {}): {other:?}",
                        kept.is_some()
                    ))),
                }
            }
            Op::EndLapsed => {
                let ended = self
                    .service
                    .end_lapsed()
                    .await
                    .map_err(|e| fail(format!("end_lapsed: {e}")))?;
                // The store may hold other cases' sessions (one database for
                // all of them): of this case's, exactly the lapsed ones end.
                let now = self.now();
                for agent in 0..3 {
                    let Some((s, _)) = self.latest.get(&agent) else {
                        continue;
                    };
                    let (id, lapse) = (s.id, lapse_of(s, now).filter(|_| s.state.is_live()));
                    prop_assert_eq!(
                        ended.contains(&id),
                        lapse.is_some(),
                        "end_lapsed and agent {}'s session {} (lapse {:?})",
                        agent,
                        id,
                        lapse
                    );
                    if let Some(lapse) = lapse {
                        self.end_model(agent, lapse);
                    }
                }
                Ok(())
            }
            Op::Advance { secs } => {
                self.clock.advance(Duration::seconds(secs));
                Ok(())
            }
            Op::Tick { millis } => {
                self.clock.advance(Duration::milliseconds(millis));
                Ok(())
            }
            Op::ToDeadline { agent, millis } => {
                let deadline = self.latest.get(&agent).and_then(|(m, _)| match m.state {
                    SessionState::Pending => Some(m.expires_at),
                    SessionState::Active => Some(m.expires_at.min(m.last_seen + IDLE)),
                    _ => None,
                });
                if let Some(deadline) = deadline {
                    let to = deadline + Duration::milliseconds(millis);
                    let now = self.now();
                    if to > now {
                        self.clock.advance(to - now);
                    }
                }
                Ok(())
            }
            Op::SetPermission { agent, granted } => {
                let permission = Permission::new("impersonation:start");
                self.directory.update(&self.agents[agent].id, |p| {
                    if granted {
                        p.permissions.insert(permission.clone());
                    } else {
                        p.permissions.remove(&permission);
                    }
                });
                self.demoted[agent] = !granted;
                Ok(())
            }
            Op::SetTimezone { target, lisbon } => {
                let zone = if lisbon {
                    "Europe/Lisbon"
                } else {
                    "America/Toronto"
                };
                self.change_target(target, |p| {
                    p.attributes.insert("timezone".into(), zone.into());
                });
                Ok(())
            }
            Op::SetEscalating { target, granted } => {
                self.change_target(target, |p| {
                    if granted {
                        p.permissions.insert(Permission::new(ESCALATING_PERMISSION));
                    } else {
                        p.permissions
                            .remove(&Permission::new(ESCALATING_PERMISSION));
                    }
                });
                Ok(())
            }
            Op::MoveToT2 { target, moved } => {
                let tenant = self.world.tenant(if moved { "t2" } else { "t1" });
                self.change_target(target, |p| p.tenant = tenant.clone());
                Ok(())
            }
            Op::SetAdmin { target, admin } => {
                self.change_target(target, |p| {
                    if admin {
                        p.roles.insert(Role::new(PROTECTED_ROLE));
                    } else {
                        p.roles.remove(&Role::new(PROTECTED_ROLE));
                    }
                });
                Ok(())
            }
        }
    }

    async fn start(
        &mut self,
        agent: usize,
        target: usize,
        reason: ReasonKind,
        nested: bool,
    ) -> Result<(), TestCaseError> {
        if nested && let Some(ctx) = self.resolve(agent).await? {
            let request = StartRequest::new(self.target(agent, target).id, reason.text());
            let result = self
                .service
                .start(Requester::Impersonating(&ctx), request)
                .await;
            self.denials[agent] += 1;
            return match result {
                Err(Error::Denied(Denial::Nesting)) => Ok(()),
                other => Err(fail(format!(
                    "nested start was not refused as nesting: {other:?}"
                ))),
            };
        }
        // The service ends a session of the agent's whose time is up before
        // it decides (expired, or idle too long), as a resolve would.
        let now = self.now();
        if let Some(lapse) = self.latest.get(&agent).and_then(|(m, _)| lapse_of(m, now)) {
            self.end_model(agent, lapse);
        }
        let principal = self.agent(agent);
        let target_principal = self.target(agent, target);
        let expected = self.expected_denial(agent, target, reason);
        let request = StartRequest::new(target_principal.id.clone(), reason.text()).ticket("SUP-7");
        let result = self
            .service
            .start(Requester::User(&principal), request)
            .await;
        match (result, expected) {
            (Ok(started), None) => {
                let s = &started.session;
                // Only a support or partner relationship crosses tenants
                // (a company one does not), and the shadow user's
                // relationships reach no tenant the agent cannot.
                let crossing: Vec<&Relationship> = principal
                    .relationships
                    .iter()
                    .filter(|r| matches!(r.kind, RelationKind::Support | RelationKind::Partner))
                    .collect();
                let reaches = |tenant: &TenantId| {
                    *tenant == principal.tenant || crossing.iter().any(|r| r.scope.covers(tenant))
                };
                prop_assert!(
                    reaches(&target_principal.tenant),
                    "a tenant was crossed without a relationship"
                );
                for r in &target_principal.relationships {
                    let within = match &r.scope {
                        TenantScope::Tenants(tenants) => tenants.iter().all(reaches),
                        TenantScope::AllTenants => {
                            crossing.iter().any(|c| c.scope == TenantScope::AllTenants)
                        }
                    };
                    prop_assert!(
                        within,
                        "the shadow user's relationship {} reaches beyond the agent",
                        r.id
                    );
                }
                check_shadow(&s.shadow, &target_principal, &s.grant, &self.world)?;
                prop_assert_eq!(&s.agent.id, &principal.id);
                let state = if self.consent {
                    SessionState::Pending
                } else {
                    SessionState::Active
                };
                prop_assert_eq!(s.state, state);
                let now = self.now();
                let model = ModelSession {
                    id: s.id,
                    subject: target,
                    state,
                    expires_at: now + if self.consent { CONSENT_WINDOW } else { MAX },
                    last_seen: now,
                };
                self.sessions.insert(s.id, agent);
                // A start is refused while the latest session is live,
                // so the one it replaces has ended.
                if let Some((old, secret)) = self.latest.insert(agent, (model, started.secret)) {
                    match old.state {
                        SessionState::Ended(reason) => self.retired.push((old.id, reason, secret)),
                        state => {
                            return Err(fail(format!(
                                "session {} replaced while {state:?}",
                                old.id
                            )));
                        }
                    }
                }
                self.contexts.remove(&agent);
                Ok(())
            }
            (Err(Error::Denied(actual)), Some(expected)) => {
                self.denials[agent] += 1;
                prop_assert_eq!(actual, expected);
                Ok(())
            }
            (result, expected) => Err(fail(format!(
                "start: expected {expected:?}, got {result:?}"
            ))),
        }
    }

    async fn resolve(&mut self, agent: usize) -> Result<Option<Context>, TestCaseError> {
        let now = self.now();
        let Some((model, secret)) = self.latest.get(&agent) else {
            return Ok(None);
        };
        let ends = self.recheck_ends(agent, model.subject);
        let model = model.clone();
        let result = self.service.resolve(secret).await;
        // A session this service read a moment ago is reused without a
        // store read or a policy re-check (so a demotion waits for the
        // next read), unless it has lapsed by the clock.
        let kept = self.reused_at(model.id, now).cloned();
        let reused = kept.is_some();
        let expected: Result<(), Error> = match (model.state, lapse_of(&model, now)) {
            // Ended in another process: this one serves what it read a
            // moment ago.
            (SessionState::Ended(_), _) if reused => Ok(()),
            (SessionState::Ended(r), _) => Err(Error::Ended(r)),
            (_, Some(lapse)) => Err(Error::Ended(lapse)),
            (SessionState::Pending, None) => Err(Error::PendingConsent),
            _ if ends && !reused => Err(Error::Ended(EndReason::Revoked)),
            _ => Ok(()),
        };
        match (result, expected) {
            (Ok(ctx), Ok(())) => {
                // Invariant 4: the context's deadlines are the session's.
                prop_assert_eq!(ctx.expires_at(), model.expires_at, "the context's expiry");
                prop_assert!(
                    now < ctx.expires_at() && now < ctx.idle_deadline(),
                    "resolve returned a lapsed session"
                );
                prop_assert_eq!(
                    &ctx.agent().id,
                    &self.agents[agent].id,
                    "the real agent is bound to the session"
                );
                prop_assert_eq!(ctx.subject(), &self.target(agent, model.subject).id);
                let stored = self
                    .service
                    .store()
                    .session(model.id)
                    .await
                    .map_err(|e| fail(e.to_string()))?
                    .ok_or_else(|| fail("resolved session vanished".into()))?;
                if let Some(kept) = &kept {
                    // The context read a moment ago, as it was then (a
                    // customer's change waits for the next read).
                    prop_assert_eq!(ctx.shadow(), kept.shadow(), "a reused context changed");
                } else {
                    // Re-checked against the customer as they are now, and
                    // the store keeps the shadow user the context carries.
                    check_shadow(
                        ctx.shadow(),
                        &self.target(agent, model.subject),
                        &stored.grant,
                        &self.world,
                    )?;
                    prop_assert_eq!(
                        &stored.shadow,
                        ctx.shadow(),
                        "the store keeps the re-checked shadow user"
                    );
                }
                // The store's `last_seen`, as the model keeps it: a read
                // from the store touches it unless a touch came less than
                // the coalescing ago (the touch interval, at most half the
                // idle timeout); a reused session is not read, nor touched.
                let coalesce = self.service.config().touch_interval.min(IDLE / 2);
                if !reused
                    && let Some((m, _)) = self.latest.get_mut(&agent)
                    && m.last_seen + coalesce <= now
                {
                    m.last_seen = now;
                }
                if !reused {
                    self.reused.insert(model.id, (now, ctx.clone()));
                    // Read from the store: idle from its `last_seen` as
                    // touched now, and never past the expiry.
                    if let Some((m, _)) = self.latest.get(&agent) {
                        prop_assert_eq!(
                            ctx.idle_deadline(),
                            (m.last_seen + IDLE).min(m.expires_at),
                            "the context's idle deadline"
                        );
                    }
                }
                self.contexts.insert(agent, ctx.clone());
                Ok(Some(ctx))
            }
            (Err(actual), Err(expected)) => {
                prop_assert_eq!(format!("{actual:?}"), format!("{expected:?}"));
                if let Error::Ended(reason) = expected
                    && model.state.is_live()
                {
                    self.end_model(agent, reason);
                }
                Ok(None)
            }
            (result, expected) => Err(fail(format!(
                "resolve: expected {expected:?}, got {result:?}"
            ))),
        }
    }

    /// Whether `ctx`'s session is the agent's latest and active, as the
    /// model has it, and how it lapses `now` if its time is up.
    fn standing_of(
        &self,
        agent: usize,
        ctx: &Context,
        now: OffsetDateTime,
    ) -> (bool, Option<EndReason>) {
        self.latest
            .get(&agent)
            .filter(|(s, _)| s.id == ctx.session() && s.state == SessionState::Active)
            .map_or((false, None), |(s, _)| (true, lapse_of(s, now)))
    }

    async fn record(&mut self, agent: usize, modification: bool) -> Result<(), TestCaseError> {
        let Some(ctx) = self.contexts.get(&agent).cloned() else {
            return Ok(());
        };
        let now = self.now();
        let result = self.service.record(&ctx, activity(modification)).await;
        let (active, lapse) = self.standing_of(agent, &ctx, now);
        match (result, active) {
            // Its time was up: it ends as expired or idle, and nothing is
            // done in it.
            (Err(Error::Unauthenticated), true) if lapse.is_some() => {
                if let Some(reason) = lapse {
                    self.end_model(agent, reason);
                }
                Ok(())
            }
            (Ok(event), true) if lapse.is_none() => {
                prop_assert_eq!(event.session, Some(ctx.session()));
                prop_assert_eq!(event.actor.id(), Some(&self.agents[agent].id));
                prop_assert_eq!(event.action, activity_action(modification));
                self.activities[agent][usize::from(modification)] += 1;
                self.recorded.push((agent, event.id));
                Ok(())
            }
            // Ended (here, or in another process): refused, and this
            // process stops reusing it.
            (Err(Error::Unauthenticated), false) => {
                self.reused.remove(&ctx.session());
                Ok(())
            }
            (result, active) => Err(fail(format!(
                "record (session active: {active}): got {result:?}"
            ))),
        }
    }

    async fn complete(&mut self, agent: usize, modification: bool) -> Result<(), TestCaseError> {
        let Some(ctx) = self.contexts.get(&agent).cloned() else {
            return Ok(());
        };
        let now = self.now();
        let result = self
            .service
            .record_completed(&ctx, activity(modification))
            .await;
        let (active, lapse) = self.standing_of(agent, &ctx, now);
        match result {
            Ok(event) if active && lapse.is_none() => {
                prop_assert_eq!(event.session, Some(ctx.session()));
                prop_assert!(event.details.get("after_end").is_none());
                prop_assert_eq!(event.action, activity_action(modification));
                self.activities[agent][usize::from(modification)] += 1;
                self.recorded.push((agent, event.id));
                Ok(())
            }
            // Over (ended, or its time up, which ends it now): an access
            // is withheld, unrecorded; a change made is on the trail,
            // after the end.
            Err(Error::Unauthenticated) if !active || lapse.is_some() => {
                self.reused.remove(&ctx.session());
                if let Some(reason) = lapse {
                    self.end_model(agent, reason);
                }
                if modification {
                    self.activities[agent][1] += 1;
                }
                Ok(())
            }
            other => Err(fail(format!(
                "record_completed (session active: {active}, lapse: {lapse:?}): got {other:?}"
            ))),
        }
    }

    async fn stop(
        &mut self,
        agent: usize,
        by: usize,
        elsewhere: bool,
    ) -> Result<(), TestCaseError> {
        let Some((model, secret)) = self.latest.get(&agent) else {
            return Ok(());
        };
        let state = model.state;
        let lapse = lapse_of(model, self.now());
        let process = if elsewhere {
            &self.elsewhere
        } else {
            &self.service
        };
        let result = process.stop(secret, &self.agent(by)).await;
        // This process's reuse map keeps what it read: an end elsewhere
        // does not reach it.
        let id = model.id;
        let kept = elsewhere.then(|| self.reused.get(&id).cloned()).flatten();
        // Who asks comes first: a stranger is refused, ended or not.
        match (result, state) {
            (Err(Error::Ended(r)), SessionState::Ended(m)) if by == agent => {
                prop_assert_eq!(r, m);
                Ok(())
            }
            // Its time was up: it ends as expired or idle, not stopped.
            (Err(Error::Ended(r)), s) if s.is_live() && by == agent && lapse.is_some() => {
                prop_assert_eq!(Some(r), lapse);
                self.end_model(agent, r);
                if let Some(kept) = kept {
                    self.reused.insert(id, kept);
                }
                Ok(())
            }
            (Err(Error::Denied(Denial::NotSessionAgent)), _) if by != agent => {
                self.denials[agent] += 1;
                Ok(())
            }
            (Ok(EndReason::Stopped), s) if s.is_live() && by == agent && lapse.is_none() => {
                self.end_model(agent, EndReason::Stopped);
                if let Some(kept) = kept {
                    self.reused.insert(id, kept);
                }
                Ok(())
            }
            (result, state) => Err(fail(format!(
                "stop by {by} of agent {agent}'s session ({state}): {result:?}"
            ))),
        }
    }

    async fn revoke(&mut self, agent: usize, by: usize) -> Result<(), TestCaseError> {
        let Some((model, _)) = self.latest.get(&agent) else {
            return Ok(());
        };
        let (id, state) = (model.id, model.state);
        let lapse = lapse_of(model, self.now());
        let entitled = by == agent || by == 2;
        let result = self
            .service
            .revoke(id, &self.agent(by), "checked by the lead")
            .await;
        match (result, state) {
            (Err(Error::Ended(r)), SessionState::Ended(m)) if entitled => {
                prop_assert_eq!(r, m);
                Ok(())
            }
            // Its time was up: it ends as expired or idle, not revoked.
            (Err(Error::Ended(r)), s) if s.is_live() && entitled && lapse.is_some() => {
                prop_assert_eq!(Some(r), lapse);
                self.end_model(agent, r);
                Ok(())
            }
            (Err(Error::Denied(Denial::NotSessionAgent)), _) if !entitled => {
                self.denials[agent] += 1;
                Ok(())
            }
            (Ok(EndReason::Revoked), s) if s.is_live() && entitled && lapse.is_none() => {
                self.end_model(agent, EndReason::Revoked);
                Ok(())
            }
            (result, state) => Err(fail(format!(
                "revoke by {by} of agent {agent}'s session ({state}): {result:?}"
            ))),
        }
    }

    async fn consent(
        &mut self,
        agent: usize,
        grant: bool,
        stranger: bool,
    ) -> Result<(), TestCaseError> {
        let Some((model, _)) = self.latest.get(&agent) else {
            return Ok(());
        };
        let model = model.clone();
        let now = self.now();
        let customer = self.target(agent, model.subject);
        if stranger {
            // Who answers before how it stands: refused, on the agent's
            // chain, whatever the state.
            let other = self.agents[(agent + 1) % self.agents.len()].clone();
            let result = if grant {
                self.service
                    .grant_consent(model.id, &other)
                    .await
                    .map(|_| ())
            } else {
                self.service
                    .deny_consent(model.id, &other)
                    .await
                    .map(|_| ())
            };
            return match result {
                Err(Error::Denied(Denial::NotSubject)) => {
                    self.denials[agent] += 1;
                    Ok(())
                }
                other => Err(fail(format!("consent by a stranger: {other:?}"))),
            };
        }
        if model.state != SessionState::Pending {
            return self
                .consent_to_no_request(agent, &model, &customer, grant)
                .await;
        }
        if grant {
            let result = self.service.grant_consent(model.id, &customer).await;
            let ends = self.recheck_ends(agent, model.subject);
            match result {
                // The pair is judged as a re-check would: an agent who
                // lost the right meanwhile, or a customer made an
                // administrator, gets no session.
                Err(Error::Ended(EndReason::Revoked)) if ends && now < model.expires_at => {
                    self.end_model(agent, EndReason::Revoked);
                    Ok(())
                }
                Ok(active) if !ends && now < model.expires_at => {
                    prop_assert_eq!(active.state, SessionState::Active);
                    if let Some((m, _)) = self.latest.get_mut(&agent) {
                        m.state = SessionState::Active;
                        m.expires_at = now + MAX;
                        m.last_seen = now;
                    }
                    Ok(())
                }
                Err(Error::Ended(EndReason::Expired)) if now >= model.expires_at => {
                    self.end_model(agent, EndReason::Expired);
                    Ok(())
                }
                other => Err(fail(format!("grant_consent: {other:?}"))),
            }
        } else {
            match self.service.deny_consent(model.id, &customer).await {
                Ok(EndReason::ConsentDenied) if now < model.expires_at => {
                    self.end_model(agent, EndReason::ConsentDenied);
                    Ok(())
                }
                Err(Error::Ended(EndReason::Expired)) if now >= model.expires_at => {
                    self.end_model(agent, EndReason::Expired);
                    Ok(())
                }
                other => Err(fail(format!("deny_consent: {other:?}"))),
            }
        }
    }

    /// The customer answers a session that awaits no answer: an ended one
    /// says how it ended; one whose time is up now ends as it lapsed; a
    /// consent is judged as a re-check first (which may end it as
    /// revoked); else no answer changes it.
    async fn consent_to_no_request(
        &mut self,
        agent: usize,
        model: &ModelSession,
        customer: &Principal,
        grant: bool,
    ) -> Result<(), TestCaseError> {
        let now = self.now();
        let result = if grant {
            self.service
                .grant_consent(model.id, customer)
                .await
                .map(|_| ())
        } else {
            self.service
                .deny_consent(model.id, customer)
                .await
                .map(|_| ())
        };
        let lapse = lapse_of(model, now);
        let ends = grant && self.recheck_ends(agent, model.subject);
        match (result, model.state) {
            (Err(Error::Ended(reason)), SessionState::Ended(ended)) if reason == ended => Ok(()),
            (Err(Error::Ended(reason)), _) if lapse == Some(reason) => {
                self.end_model(agent, reason);
                Ok(())
            }
            (Err(Error::Ended(EndReason::Revoked)), SessionState::Active)
                if lapse.is_none() && ends =>
            {
                self.end_model(agent, EndReason::Revoked);
                Ok(())
            }
            (Err(Error::Transition(_)), SessionState::Active) if lapse.is_none() && !ends => Ok(()),
            (other, state) => Err(fail(format!(
                "{} of a session {state}: {other:?}",
                if grant {
                    "grant_consent"
                } else {
                    "deny_consent"
                }
            ))),
        }
    }

    /// The invariants, checked against the store after every step.
    async fn check_invariants(&self) -> Result<(), TestCaseError> {
        let store = self.service.store();
        let mut events: Vec<AuditEvent> = Vec::new();
        for (index, agent) in self.agents.iter().enumerate() {
            let chain_events = verified_chain(store, &ChainKey::for_agent(&agent.id)).await?;
            let live = live_of(store, agent).await?;
            // And exactly the model's: its latest session while that is
            // live (pending or active, lapsed by the clock or not), else none.
            let listed: Vec<SessionId> = live.iter().map(|s| s.id).collect();
            let expected: Vec<SessionId> = self
                .latest
                .get(&index)
                .filter(|(model, _)| model.state.is_live())
                .map(|(model, _)| model.id)
                .into_iter()
                .collect();
            prop_assert_eq!(
                listed,
                expected,
                "invariant 3: agent {}'s live sessions differ from the model's",
                agent.id
            );
            prop_assert_eq!(
                count_of(&chain_events, AuditAction::SessionsRevoked),
                self.agent_revocations[index],
                "agent {}'s revoke-alls on record",
                agent.id
            );
            prop_assert_eq!(
                count_of(&chain_events, AuditAction::Denied),
                self.denials[index],
                "invariant 9: every denied attempt is audited, in agent {}'s chain",
                agent.id
            );
            prop_assert_eq!(
                [
                    count_of(&chain_events, AuditAction::Access),
                    count_of(&chain_events, AuditAction::Modification)
                ],
                self.activities[index],
                "invariant 10: every access and change that answered is on agent {}'s chain, and no other",
                agent.id
            );
            for (_, id) in self.recorded.iter().filter(|(a, _)| *a == index) {
                prop_assert_eq!(
                    chain_events.iter().filter(|e| e.id == *id).count(),
                    1,
                    "invariant 10: a recorded event is on its agent's chain once: {}",
                    id
                );
            }
            events.extend(chain_events);
        }
        // The customers' revocation chains, which no agent's is, verify
        // too, and hold each revoke-all on the customer.
        for (target, expected) in self.targets.iter().zip(&self.subject_revocations) {
            let chain = verified_chain(store, &ChainKey::revocations_of(&target.id)).await?;
            prop_assert_eq!(
                count_of(&chain, AuditAction::SessionsRevoked),
                *expected,
                "customer {}'s revoke-alls on record",
                target.id
            );
        }
        // Refusals outside the three agents' chains would be missed above;
        // the model has none: every refusal is of one of the agents' own
        // attempts, and these queries (by who acted, over the whole trail,
        // which other cases may share) find no more than the chains hold.
        let mut refusals = 0;
        for agent in &self.agents {
            refusals += all_events(
                store,
                AuditQuery {
                    actor: Some(agent.id.clone()),
                    action: Some(AuditAction::Denied),
                    ..AuditQuery::default()
                },
            )
            .await
            .len();
        }
        prop_assert_eq!(
            refusals,
            self.denials.iter().sum::<usize>(),
            "a refusal landed outside the agents' chains"
        );
        // Invariant 1 from the other side: every session the trail names
        // is one the model started (an orphan, ended or live, is not).
        for event in &events {
            if let Some(id) = event.session {
                prop_assert!(
                    self.sessions.contains_key(&id),
                    "the trail names session {}, which no start made",
                    id
                );
            }
        }

        for (id, agent) in &self.sessions {
            let session = stored_with_its_events(store, *id, &events).await?;
            if let Some((model, _)) = self.latest.get(agent)
                && model.id == *id
            {
                prop_assert_eq!(
                    session.state,
                    model.state,
                    "stored state differs from the model"
                );
            }
        }
        Ok(())
    }
}

/// The agent's live sessions, at most one (invariant 3).
pub(crate) async fn live_of<S: Store + ?Sized>(
    store: &S,
    agent: &Principal,
) -> Result<Vec<impersonation_core::Session>, TestCaseError> {
    let live = store
        .live_sessions(&LiveFilter {
            agent: Some(agent.id.clone()),
            ..LiveFilter::default()
        })
        .await
        .map_err(|e| fail(e.to_string()))?;
    prop_assert!(
        live.len() <= 1,
        "invariant 3: agent {} has {} live sessions",
        agent.id,
        live.len()
    );
    Ok(live)
}

/// Invariants 1 and 2 for one session: the store holds it, its first
/// event (of `events`, refusals aside) starts it, and it has exactly one
/// end event, its last (but for changes recorded after it, each marked
/// `after_end`), with the state's reason, if it has ended, none if it is
/// live. Returns the stored session.
pub(crate) async fn stored_with_its_events<S: Store + ?Sized>(
    store: &S,
    id: SessionId,
    events: &[AuditEvent],
) -> Result<impersonation_core::Session, TestCaseError> {
    let session = store
        .session(id)
        .await
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail(format!("session {id} vanished")))?;
    // A change that finished after the session ended is recorded after
    // its end, marked so (`record_completed`): the end is last but for
    // those.
    let (late, mine): (Vec<&AuditEvent>, Vec<&AuditEvent>) = events
        .iter()
        .filter(|e| e.session == Some(id) && e.action != AuditAction::Denied)
        .partition(|e| e.details.get("after_end") == Some("true"));
    let end_seq = mine
        .iter()
        .find(|e| e.action == AuditAction::SessionEnded)
        .map(|e| e.seq);
    for event in &late {
        prop_assert!(
            event.action == AuditAction::Modification && end_seq.is_some_and(|s| s < event.seq),
            "invariant 2: session {}'s {:?} marked after_end is no change after its end",
            id,
            event.action
        );
    }
    let first = mine.first().map(|e| e.action);
    prop_assert!(
        matches!(
            first,
            Some(AuditAction::SessionStarted | AuditAction::SessionRequested)
        ),
        "invariant 1: session {} has no start event first ({:?})",
        id,
        first
    );
    let ends = mine
        .iter()
        .filter(|e| e.action == AuditAction::SessionEnded)
        .count();
    match session.state {
        SessionState::Ended(reason) => {
            prop_assert_eq!(
                ends,
                1,
                "invariant 2: session {} has {} end events",
                id,
                ends
            );
            let last = mine.last().map(|e| (e.action, e.details.get("reason")));
            prop_assert_eq!(
                last,
                Some((AuditAction::SessionEnded, Some(reason.code()))),
                "invariant 2: session {}'s end event is not its last, with its reason",
                id
            );
        }
        _ => prop_assert_eq!(ends, 0, "invariant 2: live session {} has an end event", id),
    }
    Ok(session)
}

/// Permission families no shadow user holds under the testkit's policy
/// (the default deny list), written here rather than read from the policy
/// under test: a deny list that lost one would still pass a check against
/// itself.
const NEVER_PROJECTED: [&str; 9] = [
    "billing:",
    "password:",
    "passwords:",
    "credential:",
    "credentials:",
    "mfa:",
    "export:",
    "exports:",
    "impersonation:",
];

/// How many of `events` are `action`s.
/// The activity a record step records.
fn activity(modification: bool) -> Activity {
    if modification {
        Activity::modification("Updated a booking.").detail("method", "POST")
    } else {
        Activity::access("Viewed bookings.").detail("method", "GET")
    }
}

/// The action a recorded activity is on the trail as.
fn activity_action(modification: bool) -> AuditAction {
    if modification {
        AuditAction::Modification
    } else {
        AuditAction::Access
    }
}

fn count_of(events: &[AuditEvent], action: AuditAction) -> usize {
    events.iter().filter(|e| e.action == action).count()
}

/// Invariant 6: what a shadow user may hold.
fn check_shadow(
    shadow: &ShadowUser,
    target: &Principal,
    grant: &Grant,
    world: &World,
) -> Result<(), TestCaseError> {
    for (name, value) in shadow.attributes() {
        let original = target.attributes.get(name);
        match (world.rules.rule_for(name), value) {
            (AttributeRule::Copy, ShadowValue::Copied(v)) => prop_assert_eq!(Some(v), original),
            (AttributeRule::Mask(mask), ShadowValue::Masked(m)) => {
                if let Some(serde_json::Value::String(o)) = original {
                    prop_assert!(
                        m != o && !m.contains(o.as_str()),
                        "masked value reveals the original"
                    );
                    // What shows is at most the rule's last characters of
                    // the original, nothing else.
                    let shown: String = m.chars().filter(|c| *c != MASK_CHAR).collect();
                    prop_assert!(
                        shown.chars().count() <= mask.keep_last && o.ends_with(shown.as_str()),
                        "masked value {} shows more than the last {} of the original",
                        m,
                        mask.keep_last
                    );
                }
            }
            (AttributeRule::Mask(_) | AttributeRule::Redact, ShadowValue::Redacted) => {}
            (rule, value) => {
                return Err(fail(format!(
                    "attribute {name} is {value:?} under rule {rule:?}"
                )));
            }
        }
    }
    for name in target.attributes.keys() {
        if world.rules.rule_for(name) == AttributeRule::Drop {
            prop_assert!(
                shadow.attribute(name).is_none(),
                "dropped attribute {} present",
                name
            );
        }
    }
    for permission in shadow.permissions() {
        prop_assert!(
            !NEVER_PROJECTED
                .iter()
                .any(|family| permission.as_str().starts_with(family)),
            "sensitive permission {} in the shadow user",
            permission
        );
        prop_assert!(
            target.permissions.contains(permission),
            "{} not held by the target",
            permission
        );
        prop_assert!(
            grant.permissions.contains(permission),
            "{} outside the grant",
            permission
        );
        prop_assert!(
            !grant.denied.iter().any(|p| p.matches(permission)),
            "denied permission {} in the shadow user",
            permission
        );
    }
    Ok(())
}

/// A runtime of its own for a property run, and its runner: `config.cases`
/// cases, none persisted (a store's failure is for its own run to show).
pub(crate) fn runtime_and_runner(config: MachineConfig) -> (tokio::runtime::Runtime, TestRunner) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("could not build a tokio runtime: {e}"),
    };
    let runner = TestRunner::new(ProptestConfig {
        cases: config.cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    (runtime, runner)
}

/// A factory for [`run_state_machine`],
/// [`crate::fault_sequences::run_fault_sequences`] and
/// [`crate::fault_sequences::run_concurrent_sequences`] that hands every case
/// one store, made by `make` for the first case inside the run's runtime
/// (a pooled connection belongs to the runtime that made it): what a store
/// on a database wants, its cases kept apart by their namespaced ids.
pub fn shared_store<S, F, Fut>(make: F) -> impl Fn() -> Pin<Box<dyn Future<Output = S> + Send>>
where
    S: Clone + Send + Sync + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = S> + Send + 'static,
{
    let cell = Arc::new(tokio::sync::OnceCell::new());
    let make = Arc::new(make);
    move || {
        let (cell, make) = (Arc::clone(&cell), Arc::clone(&make));
        Box::pin(async move { cell.get_or_init(|| make()).await.clone() })
    }
}

/// Runs the property test: `config.cases` random sequences of up to
/// `config.max_steps` steps, each against a store from `factory`, on a
/// runtime of its own. Call it from a plain `#[test]` (not `#[tokio::test]`).
/// Stores from the factory may share a database: every case namespaces its ids.
pub fn run_state_machine<S, F, Fut>(config: MachineConfig, factory: F)
where
    S: Store + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let (runtime, mut runner) = runtime_and_runner(config);
    let strategy = (
        prop::bool::weighted(0.25),
        prop::collection::vec(op_strategy(), 1..=config.max_steps),
    );
    let result = runner.run(&strategy, |(consent, ops)| {
        runtime.block_on(async { run_case(factory().await, consent, &ops).await })
    });
    if let Err(e) = result {
        panic!("state-machine property failed: {e}");
    }
}

/// Runs one given sequence of steps against `store`, checking each step
/// against the model and the invariants after it, as
/// [`run_state_machine`] does with the sequences it draws: for a sequence
/// that random drawing rarely reaches (a clock that lands within a
/// second of an edge, [`idle_edge_sequences`]). `consent` asks for the
/// customer's consent before a session goes live. Returns the first
/// disagreement. Call it on any tokio runtime with its timer.
///
/// # Panics
///
/// On an op the drawn sequences never hold: an agent past 2 (past 1 for
/// `SetPermission`), a target past 6, or a clock moved backwards.
pub async fn run_ops<S: Store + 'static>(
    store: S,
    consent: bool,
    ops: &[Op],
) -> Result<(), String> {
    run_case(store, consent, ops)
        .await
        .map_err(|e| e.to_string())
}

/// Agent 0's start on customer 0 and resolve, of which the edge
/// sequences are made.
fn agent_0_starts_and_resolves() -> (Op, Op) {
    let start = Op::Start {
        agent: 0,
        target: 0,
        reason: ReasonKind::Valid,
        nested: false,
    };
    (start, Op::Resolve { agent: 0 })
}

/// Sequences that end a session's idle timeout a fraction of a second
/// after its last touch and before its last resolve: a resolve served
/// from the reuse cache, or one whose touch is coalesced, does not move
/// the store's `last_seen`, so the session idles out 15 minutes after the
/// last touch. A model (or a store) that counted every resolve as a touch
/// expects the last resolve to find the session live, and fails. Run
/// each with [`run_ops`]; [`edge_sequences`] holds these and more.
pub fn idle_edge_sequences() -> Vec<Vec<Op>> {
    let (start, resolve) = agent_0_starts_and_resolves();
    vec![
        // Read at the start (a touch coalesced), then reused half a second
        // later; the idle edge falls between the two resolves' times.
        vec![
            start.clone(),
            resolve.clone(),
            Op::Tick { millis: 500 },
            resolve.clone(),
            Op::Advance { secs: 899 },
            Op::Tick { millis: 700 },
            resolve.clone(),
        ],
        // Touched a second after the start, reused after that.
        vec![
            start,
            Op::Tick { millis: 1_000 },
            resolve.clone(),
            Op::Tick { millis: 500 },
            resolve.clone(),
            Op::Advance { secs: 899 },
            Op::Tick { millis: 600 },
            resolve,
        ],
    ]
}

/// Sequences at edges that random runs reach seldom, for every store to
/// run with [`run_ops`]: the [`idle_edge_sequences`]; a session in use
/// into its last quarter hour, where the expiry comes before the idle
/// timeout (the context's idle deadline is the expiry then); a
/// customer's change read by the next resolve, whose re-check refreshes
/// the shadow user, which the store must keep (`Store::record_check`);
/// and a customer made an administrator while impersonated, whose session
/// the next re-check ends.
pub fn edge_sequences() -> Vec<Vec<Op>> {
    let (start, resolve) = agent_0_starts_and_resolves();
    let mut sequences = idle_edge_sequences();
    // Read every ten minutes: at 50 minutes in, idle would end at 65,
    // the session's hour at 60.
    sequences.push(
        std::iter::once(start.clone())
            .chain((0..5).flat_map(|_| [Op::Advance { secs: 600 }, resolve.clone()]))
            .collect(),
    );
    // Moved to Toronto while impersonated, read past the reuse window, and
    // back to Lisbon.
    sequences.push(vec![
        start.clone(),
        resolve.clone(),
        Op::SetTimezone {
            target: 0,
            lisbon: false,
        },
        Op::Advance { secs: 2 },
        resolve.clone(),
        Op::SetTimezone {
            target: 0,
            lisbon: true,
        },
        Op::Advance { secs: 2 },
        resolve.clone(),
    ]);
    // Made an administrator: the next read ends the session as revoked,
    // a start is refused; no longer one, a start goes ahead.
    let admin = |admin| Op::SetAdmin { target: 0, admin };
    sequences.push(vec![
        start.clone(),
        resolve.clone(),
        admin(true),
        Op::Advance { secs: 2 },
        resolve.clone(),
        start.clone(),
        admin(false),
        start.clone(),
    ]);
    // Given a permission no agent holds: the next read ends the session as
    // revoked (escalation), a start is refused; without it, one goes ahead.
    let escalating = |granted| Op::SetEscalating { target: 0, granted };
    sequences.push(vec![
        start.clone(),
        resolve.clone(),
        escalating(true),
        Op::Advance { secs: 2 },
        resolve.clone(),
        start.clone(),
        escalating(false),
        start.clone(),
    ]);
    // Moved to t2, beyond agent 0's reach: the next read ends agent 0's
    // session as revoked (tenant boundary), a start is refused; agent 1,
    // who reaches every tenant, may start; moved back, agent 0 may too.
    let moved = |moved| Op::MoveToT2 { target: 0, moved };
    sequences.push(vec![
        start.clone(),
        resolve.clone(),
        moved(true),
        Op::Advance { secs: 2 },
        resolve.clone(),
        start.clone(),
        Op::Start {
            agent: 1,
            target: 0,
            reason: ReasonKind::Valid,
            nested: false,
        },
        Op::Resolve { agent: 1 },
        moved(false),
        start.clone(),
    ]);
    // Stopped in another process: this one serves a read from its reuse
    // map a moment longer, but records nothing more in the session (a
    // change made meanwhile lands after the end), and its next read from
    // the store finds the session ended.
    sequences.push(vec![
        start,
        resolve.clone(),
        Op::StopElsewhere { agent: 0 },
        resolve.clone(),
        Op::Complete {
            agent: 0,
            modification: true,
        },
        Op::Record {
            agent: 0,
            modification: false,
        },
        resolve.clone(),
        Op::Tick { millis: 1_000 },
        resolve.clone(),
    ]);
    // Stopped in another process: a revoke-all here finds nothing live and
    // leaves this process's read of a moment ago in its reuse map; so does
    // a new start, and the old secret is served from it a moment longer.
    sequences.push(vec![
        agent_0_starts_and_resolves().0,
        resolve.clone(),
        Op::StopElsewhere { agent: 0 },
        Op::RevokeAllForAgent { agent: 0 },
        resolve.clone(),
        agent_0_starts_and_resolves().0,
        Op::ResolveRetired { pick: 0 },
        Op::Tick { millis: 1_000 },
        Op::ResolveRetired { pick: 0 },
        resolve,
    ]);
    sequences
}

async fn run_case<S: Store + 'static>(
    store: S,
    consent: bool,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut case = Case::new(store, consent);
    for (i, op) in ops.iter().enumerate() {
        case.apply(op)
            .await
            .map_err(|e| fail(format!("step {i} {op:?}: {e}")))?;
        case.check_invariants()
            .await
            .map_err(|e| fail(format!("after step {i} {op:?}: {e}")))?;
    }
    Ok(())
}

/// A chain's events, once they verify against its head (invariant 5).
pub(crate) async fn verified_chain<S: Store + ?Sized>(
    store: &S,
    chain: &ChainKey,
) -> Result<Vec<AuditEvent>, TestCaseError> {
    let events = whole_chain(store, chain).await;
    let head = store
        .chain_head(chain)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if head != events.last().map(AuditEvent::head) {
        return Err(fail(format!(
            "invariant 5: chain {chain}'s head {head:?} is not its last event's"
        )));
    }
    match verify_chain(chain, &events, head) {
        Ok(_) => Ok(events),
        Err(b) => Err(fail(format!(
            "invariant 5: chain {chain} does not verify: {b}"
        ))),
    }
}
