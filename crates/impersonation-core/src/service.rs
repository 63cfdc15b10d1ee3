//! The `Impersonation` service: the one entry point host apps and bindings call.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use time::{Duration, OffsetDateTime};
use tracing::{Instrument, Span, field::Empty};

use crate::audit::{
    Actor, AuditAction, AuditDraft, AuditEvent, BreakKind, ChainBreak, ChainHead, ChainKey,
    ChainReport, ChainVerifier, Details, EventHash,
};
use crate::batch::{Coalescer, Interrupted};
use crate::clock::{Clock, SystemClock, normalize};
use crate::id::{SessionId, TenantId, UserId};
use crate::policy::{Denial, Policy, PolicyContext, Reason, StartRequest, Ticket};
use crate::principal::{Directory, DirectoryError, Principal};
use crate::projection::{ProjectionRules, ShadowUser};
use crate::reuse::{Reuse, ReuseKey, Settings};
use crate::secret::{SecretError, SecretHash, SecretLookup, SessionSecret};
use crate::session::{Begin, EndReason, PersonRef, Session, SessionState, TransitionError};
use crate::store::{
    AppendGuard, AuditPage, AuditQuery, LiveFilter, StartOutcome, Store, StoreError, Touch,
};

/// Why a service call failed. [`Error::code`] is stable; [`Error::http_status`]
/// is the status every binding answers with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The policy refused; the refusal is in the audit trail.
    #[error("denied: {0}")]
    Denied(Denial),
    /// No session matches the presented secret (or it is malformed).
    #[error("no valid impersonation session")]
    Unauthenticated,
    /// The session has ended.
    #[error("the impersonation session has ended ({})", .0.code())]
    Ended(EndReason),
    /// The session awaits the customer's consent.
    #[error("the impersonation session awaits the customer's consent")]
    PendingConsent,
    /// No session has that id.
    #[error("no such impersonation session")]
    UnknownSession,
    /// An illegal state transition was asked for.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The store failed; nothing was served as an impersonated user.
    #[error("store failure: {0}")]
    Store(#[from] StoreError),
    /// The directory failed; nothing was served as an impersonated user.
    #[error("directory failure: {0}")]
    Directory(#[from] DirectoryError),
    /// The random source failed while generating a secret.
    #[error("could not generate a session secret")]
    Random,
    /// A revocation of the customer's or the agent's sessions overtook
    /// this start: the session was ended as it was written, and its secret
    /// is not handed out. Starting again judges both as they are now.
    #[error("the customer's or the agent's sessions were revoked while this one started")]
    RevokedWhileStarting,
}

impl Error {
    /// A stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Denied(d) => d.code(),
            Self::Unauthenticated => "unauthenticated",
            Self::Ended(_) => "session_ended",
            Self::PendingConsent => "pending_consent",
            Self::UnknownSession => "unknown_session",
            Self::Transition(_) => "illegal_transition",
            Self::Store(_) => "store_unavailable",
            Self::Directory(_) => "directory_unavailable",
            Self::Random => "random_unavailable",
            Self::RevokedWhileStarting => "revoked_while_starting",
        }
    }

    /// The HTTP status a binding answers with: 401 for no usable session,
    /// 403 for a policy refusal, 404 for an unknown session id, 409 for an
    /// illegal transition, 503 when the SDK could not check (it fails closed).
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Denied(_) | Self::PendingConsent => 403,
            Self::Unauthenticated | Self::Ended(_) => 401,
            Self::UnknownSession => 404,
            Self::Transition(_) | Self::RevokedWhileStarting => 409,
            Self::Store(_) | Self::Directory(_) | Self::Random => 503,
        }
    }
}

impl From<SecretError> for Error {
    fn from(e: SecretError) -> Self {
        match e {
            SecretError::Malformed => Self::Unauthenticated,
            SecretError::Random => Self::Random,
        }
    }
}

/// Service settings beyond the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How long this process reuses a session it resolved (the store's
    /// record of it and its policy check) before reading the store again
    /// (default: one second, so a page's burst of requests reads it once).
    ///
    /// A stop, revocation or expiry made through this service takes effect
    /// at once whatever the interval. One made by another process reaches
    /// an audited request at once too (the audit write checks the session
    /// in the store, and a refused write withholds the response), and any
    /// other request within this interval; so does a permission removed in
    /// the directory. Requests that change something
    /// ([`Impersonation::resolve_fresh`]) always read the store.
    /// `Duration::ZERO` reads the store on every request; an interval
    /// above half a session's idle timeout is taken as half of it for
    /// that session (a reused read writes no idle touch). Clones of a
    /// service share what it reuses and every end it makes; a clone given
    /// other settings (`with_policy`, `with_projection`, `with_config`,
    /// `with_clock`) still sees those ends at once, but reuses only the
    /// sessions it resolved itself.
    pub reuse_interval: Duration,
    /// When `resolve` reads the store, it re-checks through the directory
    /// that the agent still holds the impersonate permission and the policy
    /// still allows the pair if the last check is this old, and projects
    /// the shadow user again under this service's rules. Between checks a
    /// session is served with the shadow user the store holds, projected
    /// by the process that started or last checked it: a projection rule
    /// changed in one process reaches a live session at its next check.
    /// `Duration::ZERO` (the default) checks at every read.
    pub recheck_interval: Duration,
    /// Write the idle touch at most this often (default: one second, so a
    /// page's burst of requests writes it once; idle timeouts are minutes).
    /// `Duration::ZERO` writes it at every read of the store; a few seconds
    /// spare a busy session's writes at the cost of that much idle-timeout
    /// precision. (Reused sessions are not touched: the touch waits for the
    /// next read, at most `reuse_interval` later.) An interval above half
    /// a session's idle timeout is taken as half of it (stores apply
    /// [`crate::Touch::coalesce_for`]): a longer one would let a busy
    /// session idle out.
    pub touch_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            reuse_interval: Duration::seconds(1),
            recheck_interval: Duration::ZERO,
            touch_interval: Duration::seconds(1),
        }
    }
}

/// Who asks to start a session.
#[derive(Debug, Clone, Copy)]
pub enum Requester<'a> {
    /// A signed-in user acting as themself.
    User(&'a Principal),
    /// A request made from inside an impersonation session: always refused (no nesting).
    Impersonating(&'a Context),
}

/// Who initiates a bulk revocation.
#[derive(Debug, Clone, Copy)]
pub enum Initiator<'a> {
    /// Host code reacting to an event (an agent disabled, a password changed).
    System,
    /// A person; must be entitled (see each method).
    User(&'a Principal),
}

/// A started session and the secret to hand to the agent's client. The
/// secret is shown once; stores keep only its hash.
#[derive(Debug)]
pub struct Started {
    /// The session (active, or pending consent).
    pub session: Session,
    /// The bearer secret.
    pub secret: SessionSecret,
}

/// What a request served under impersonation knows: the shadow user it acts
/// as, the real agent beside it, and what the banner shows. Only the service
/// builds one.
///
/// Cloning is cheap: a context is shared, never changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Context(Arc<ContextData>);

#[derive(Debug, PartialEq, Eq, Serialize)]
struct ContextData {
    session: SessionId,
    agent: PersonRef,
    shadow: ShadowUser,
    reason: Reason,
    ticket: Option<Ticket>,
    #[serde(with = "time::serde::rfc3339")]
    started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    idle_deadline: OffsetDateTime,
}

impl Context {
    fn of(session: &Session) -> Self {
        Self(Arc::new(ContextData {
            session: session.id,
            agent: session.agent.clone(),
            shadow: session.shadow.clone(),
            reason: session.grant.reason.clone(),
            ticket: session.grant.ticket.clone(),
            started_at: session.activated_at.unwrap_or(session.created_at),
            expires_at: session.expires_at,
            idle_deadline: session.idle_deadline().min(session.expires_at),
        }))
    }

    /// The session.
    pub fn session(&self) -> SessionId {
        self.0.session
    }

    /// The real agent, always reachable beside the shadow user.
    pub fn agent(&self) -> &PersonRef {
        &self.0.agent
    }

    /// The user the request acts as.
    pub fn shadow(&self) -> &ShadowUser {
        &self.0.shadow
    }

    /// The impersonated customer's id.
    pub fn subject(&self) -> &UserId {
        self.0.shadow.id()
    }

    /// The customer's tenant.
    pub fn tenant(&self) -> &TenantId {
        self.0.shadow.tenant()
    }

    /// Why the session was started.
    pub fn reason(&self) -> &Reason {
        &self.0.reason
    }

    /// The ticket, if any.
    pub fn ticket(&self) -> Option<&Ticket> {
        self.0.ticket.as_ref()
    }

    /// When the session became active.
    pub fn started_at(&self) -> OffsetDateTime {
        self.0.started_at
    }

    /// When the session ends at the latest.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.0.expires_at
    }

    /// When the session ends if unused.
    pub fn idle_deadline(&self) -> OffsetDateTime {
        self.0.idle_deadline
    }

    /// Whether the session is within its deadlines at `now`, as this copy
    /// of it knows them.
    pub(crate) fn in_time(&self, now: OffsetDateTime) -> bool {
        now < self.0.expires_at && now < self.0.idle_deadline
    }

    /// Whether the session is read-only.
    pub fn read_only(&self) -> bool {
        self.0.shadow.read_only()
    }

    /// The audit chain of this session.
    pub fn chain(&self) -> ChainKey {
        ChainKey::for_agent(&self.0.agent.id)
    }

    /// An event of `action` by the agent, about this session's customer.
    fn draft(&self, at: OffsetDateTime, action: AuditAction) -> AuditDraft {
        AuditDraft::new(
            at,
            action,
            Actor::user(self.0.agent.id.clone(), self.0.agent.name.clone()),
            self.chain(),
        )
        .subject(
            self.subject().clone(),
            self.0.shadow.display_name_shared(),
            self.tenant().clone(),
        )
        .session(self.0.session)
    }

    /// What the banner shows at `now`.
    pub fn banner(&self, now: OffsetDateTime) -> Banner {
        let left = self.0.expires_at.min(self.0.idle_deadline) - now;
        Banner {
            subject_name: self.0.shadow.display_name().to_owned(),
            company: self.0.shadow.company().map(str::to_owned),
            agent_name: self.0.agent.name.to_string(),
            reason: self.0.reason.as_str().to_owned(),
            ticket: self.0.ticket.as_ref().map(|t| t.as_str().to_owned()),
            expires_at: self.0.expires_at,
            seconds_left: left.whole_seconds().max(0),
        }
    }
}

/// The data of the "You are impersonating …" banner. Plain text: bindings escape it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Banner {
    /// The customer's name.
    pub subject_name: String,
    /// The customer's company.
    pub company: Option<String>,
    /// The agent's name.
    pub agent_name: String,
    /// The reason given.
    pub reason: String,
    /// The ticket, if any.
    pub ticket: Option<String>,
    /// When the session ends at the latest.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Seconds until the session ends (by expiry or idleness, whichever is sooner).
    pub seconds_left: i64,
}

impl Banner {
    /// "You are impersonating Jane Doe (Pinewood Campground)".
    pub fn message(&self) -> String {
        match &self.company {
            Some(company) => format!("You are impersonating {} ({company})", self.subject_name),
            None => format!("You are impersonating {}", self.subject_name),
        }
    }

    /// Time left as `mm:ss` (or `h:mm:ss`).
    pub fn time_left(&self) -> String {
        let s = self.seconds_left.max(0);
        if s >= 3600 {
            format!("{}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
        } else {
            format!("{}:{:02}", s / 60, s % 60)
        }
    }
}

/// Whether an audited activity read or changed something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivityKind {
    /// A read (safe HTTP methods).
    Access,
    /// A change (unsafe HTTP methods).
    Modification,
}

/// Something the agent did inside a session, to audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// Read or change.
    pub kind: ActivityKind,
    /// The sentence for the table ("Accessed account settings.").
    pub description: String,
    /// Structured details (method, route, status…). Never secrets.
    /// `description` and `after_end` are the SDK's own keys (a host's are
    /// dropped), and at most [`crate::MAX_DETAIL_ENTRIES`] − 2 are kept
    /// (the first by key).
    pub details: Details,
}

impl Activity {
    /// A read.
    pub fn access(description: impl Into<String>) -> Self {
        Self {
            kind: ActivityKind::Access,
            description: description.into(),
            details: Details::new(),
        }
    }

    /// A change.
    pub fn modification(description: impl Into<String>) -> Self {
        Self {
            kind: ActivityKind::Modification,
            description: description.into(),
            details: Details::new(),
        }
    }

    /// Adds a detail.
    #[must_use]
    pub fn detail(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.details.insert(key, value);
        self
    }
}

/// The result of verifying the chains, and a listing of the trail against
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Chains that verified.
    pub verified: Vec<ChainReport>,
    /// Chains that did not, with their first bad position.
    pub broken: Vec<ChainBreak>,
    /// Where the listing ([`Store::audit`], what people read) does not
    /// show the verified chains' events one for one, as verified: an event
    /// hidden from it or shown in another's place, or a chain the store's
    /// list of chains leaves out.
    pub listing: Vec<ListingMismatch>,
    /// Of the verified events, those the listing's filters select and the
    /// comparison covered: all of them for [`Impersonation::verify_all`]
    /// (but a chain begun between its two reads of the listing, verified
    /// and not compared), a customer's for a listing by customer
    /// ([`Impersonation::verify_listing`]). When the report is ok, the
    /// listing shows each of them once.
    pub selected: u64,
}

impl VerifyReport {
    /// Whether every chain verified and the listing shows each of their
    /// events once.
    pub fn is_ok(&self) -> bool {
        self.broken.is_empty() && self.listing.is_empty()
    }

    /// Events verified in all.
    pub fn events(&self) -> u64 {
        self.verified.iter().map(|c| c.events).sum()
    }
}

/// How the trail's listing differs from the verified chains (see
/// [`Impersonation::verify_all`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ListingMismatch {
    /// The listing shows `listed` events of the `chained` positions
    /// verified in `chain` that its filters select: fewer hides events
    /// from whoever reads the trail.
    #[error("the listing shows {listed} entries for the {chained} events of chain {chain}")]
    Count {
        /// The chain.
        chain: ChainKey,
        /// Events verified in the chain that the listing's filters select
        /// (every one, unfiltered).
        chained: u64,
        /// Of those positions, events the listing shows.
        listed: u64,
    },
    /// The listing shows `listed` events of a chain the store's list of
    /// chains ([`Store::chains`]) leaves out, so verification never read
    /// it.
    #[error(
        "the listing shows {listed} events of chain {chain}, which the list of chains leaves out"
    )]
    UnlistedChain {
        /// The chain.
        chain: ChainKey,
        /// Events of it the listing shows.
        listed: u64,
    },
    /// The listing of one agent's events ([`Impersonation::verify_agent`])
    /// shows `listed` events of another chain.
    #[error("the listing of one chain shows {listed} events of chain {chain}")]
    OtherChain {
        /// The other chain.
        chain: ChainKey,
        /// Events of it the listing shows.
        listed: u64,
    },
    /// The listing shows as many events of `chain` as were verified (and
    /// its filters select), but not the same ones (an event in another's
    /// place, or edited in the copy the listing reads, or one its filters
    /// leave out), or events past them that the chain does not hold as
    /// listed.
    #[error("the listing shows events of chain {chain} that are not the chain's")]
    Altered {
        /// The chain.
        chain: ChainKey,
    },
    /// A page of the listing did not decode, and the comparison stopped
    /// there (the event is a chain's break too, if its chain holds it).
    #[error("the listing does not decode past {read} events")]
    Unreadable {
        /// Events read before the page that did not decode.
        read: u64,
    },
}

/// A set of event hashes folded together in any order: the XOR of
/// SHA-256(key, hash) over the set, under a key drawn for one verification
/// and never shown, so that nobody can choose events whose fold matches
/// another set's (an unkeyed XOR of hashes is a linear system to solve).
/// The chain's events as verified, against the same positions as listed:
/// an event missing, shown twice or shown altered changes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Digest([u8; 32]);

impl Digest {
    fn add(&mut self, key: &DigestKey, hash: &EventHash) {
        use sha2::Digest as _;
        let keyed = sha2::Sha256::new()
            .chain_update(key.0)
            .chain_update(hash.as_bytes())
            .finalize();
        for (d, k) in self.0.iter_mut().zip(keyed) {
            *d ^= k;
        }
    }
}

/// The key of one verification's [`Digest`]s.
struct DigestKey([u8; 32]);

/// A verification under way: the listing's filters, the report, and of
/// each verified chain the events the filters select: how many, and their
/// [`Digest`] under the run's key.
struct Verification {
    filter: AuditQuery,
    report: VerifyReport,
    digests: HashMap<ChainKey, (u64, Digest)>,
    key: DigestKey,
}

impl Verification {
    /// A verification of the listing `query` selects (its filters; its
    /// cursor, order and page size aside).
    fn new(query: &AuditQuery) -> Result<Self, Error> {
        let mut key = [0; 32];
        getrandom::fill(&mut key).map_err(|_| Error::Random)?;
        Ok(Self {
            filter: AuditQuery {
                cursor: None,
                order: crate::store::Order::Oldest,
                limit: crate::store::MAX_PAGE,
                ..query.clone()
            },
            report: VerifyReport::default(),
            digests: HashMap::new(),
            key: DigestKey(key),
        })
    }

    /// The events the filters select in the chains verified so far.
    fn selected(&self) -> u64 {
        self.digests.values().map(|(n, _)| n).sum()
    }
}

/// What the listing shows of one verified chain.
#[derive(Default)]
struct Listed {
    /// Events at the verified positions.
    count: u64,
    /// Their [`Digest`], each hash computed again from the event as listed.
    digest: Digest,
    /// Events past them (appended since it was verified, if they are the
    /// chain's): position and hash computed again.
    past: Vec<(u64, EventHash)>,
    /// Whether it shows an event its filters leave out.
    stray: bool,
}

fn person(p: &Principal) -> PersonRef {
    PersonRef {
        id: p.id.clone(),
        name: p.display_name.as_str().into(),
        tenant: p.tenant.clone(),
    }
}

fn actor_of(p: &Principal) -> Actor {
    Actor::user(p.id.clone(), p.display_name.as_str())
}

/// Who a revocation's events name as acting: the person, or the system.
fn actor_by(by: Initiator<'_>) -> Actor {
    match by {
        Initiator::System => Actor::System,
        Initiator::User(p) => actor_of(p),
    }
}

/// A revocation's details: `details`, then its cause, and the note if one
/// was given.
fn revocation_details(details: Details, cause: &str, note: &str) -> Details {
    let mut details = details.with("cause", cause);
    if !note.trim().is_empty() {
        details.insert("note", note.trim());
    }
    details
}

/// Fills a span's `impersonation.*` fields from the session it is about.
fn record_session(span: &Span, session: &Session) {
    span.record(
        "impersonation.agent",
        tracing::field::display(&session.agent.id),
    );
    span.record(
        "impersonation.subject",
        tracing::field::display(&session.subject.id),
    );
    span.record("impersonation.session", tracing::field::display(session.id));
}

/// Fills a span's `impersonation.*` fields from a reused context.
fn record_context(span: &Span, ctx: &Context) {
    span.record(
        "impersonation.agent",
        tracing::field::display(&ctx.agent().id),
    );
    span.record(
        "impersonation.subject",
        tracing::field::display(ctx.subject()),
    );
    span.record(
        "impersonation.session",
        tracing::field::display(ctx.session()),
    );
}

fn stop_span() -> Span {
    tracing::info_span!(
        "impersonation.stop",
        impersonation.agent = Empty,
        impersonation.subject = Empty,
        impersonation.session = Empty,
    )
}

/// `draft` with the details that name `denial` and the `attempt` refused.
fn with_denial(mut draft: AuditDraft, denial: &Denial, attempt: &str) -> AuditDraft {
    for (key, value) in denial_details(denial, attempt).iter() {
        draft.details.insert(key, value);
    }
    draft
}

fn denial_details(denial: &Denial, attempt: &str) -> Details {
    Details::new()
        .with("denial", denial.code())
        .with("message", denial)
        .with("attempt", attempt)
}

/// Page size used when streaming a chain for verification.
const VERIFY_PAGE: u32 = 500;

/// How an attempt to end a session came out.
enum Ending {
    /// It ended: by this call, with its reason, or by another first.
    Ended(EndReason),
    /// It changed under the call and is still live, as it now stands.
    Changed(Box<Session>),
    /// The store no longer has it.
    Gone,
}

/// How many times an end (`Impersonation::end`: a stop, a revoke, a
/// revoke-all's) tries a session that keeps changing under it before it
/// gives up on it (reporting the conflict).
const CHANGED_RETRIES: usize = 3;

/// Ties the policy, projection, store, directory and clock together.
///
/// ```
/// use impersonation_core::*;
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let directory = MemoryDirectory::new();
/// let tenant = TenantId::from(1_u64);
/// let agent = Principal::new(UserId::from(1_u64), "Sam Support", tenant.clone())
///     .with_permissions(["impersonation:start", "bookings:read"]);
/// let customer = Principal::new(UserId::from(2_u64), "Jane Camper", tenant)
///     .with_permission("bookings:read")
///     .with_attribute("card_number", "4242424242424242");
/// directory.insert(agent.clone());
/// directory.insert(customer.clone());
///
/// let service = Impersonation::new(MemoryStore::new(), directory)
///     .with_projection(ProjectionRules::new().rule("card_number", AttributeRule::Mask(Mask::default())));
/// let started = service
///     .start(Requester::User(&agent), StartRequest::new(customer.id.clone(), "Ticket: cannot see bookings"))
///     .await?;
/// let ctx = service.resolve(&started.secret).await?;
/// assert_eq!(ctx.agent().id, agent.id);
/// assert_eq!(ctx.banner(time::OffsetDateTime::now_utc()).message(), "You are impersonating Jane Camper");
/// service.stop(&started.secret, &agent).await?;
/// assert!(service.resolve(&started.secret).await.is_err());
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Impersonation<S, D> {
    store: S,
    directory: D,
    policy: Policy,
    projection: ProjectionRules,
    config: Config,
    clock: Arc<dyn Clock>,
    // Group commit, for stores whose `batches()` says so; clones share
    // them (lookups, until a clone gets a config or clock of its own).
    appends: Arc<Coalescer<(AuditDraft, AppendGuard), Result<AuditEvent, StoreError>>>,
    lookups: Arc<Coalescer<SecretLookup, Result<Touched, StoreError>>>,
    // Sessions resolved a moment ago (`Config::reuse_interval`); clones share them.
    reuse: Arc<Reuse>,
    // Which of them this service may reuse: those resolved under its settings.
    settings: Settings,
}

/// A lookup's answer (the record as it was before the touch) and the
/// touch the store was sent with it: a batched lookup's touch is stamped
/// when its call starts, after the request's own time.
type Touched = (Option<Session>, Touch);

/// The store call that carried a write or lookup was abandoned before it
/// answered (its caller was cancelled); whether a write took effect is
/// unknown, so the caller fails closed.
#[derive(Debug, thiserror::Error)]
#[error("the store call carrying this request was interrupted")]
struct CallInterrupted;

fn interrupted() -> StoreError {
    StoreError::unavailable(CallInterrupted)
}

impl<S: Store, D: Directory> Impersonation<S, D> {
    /// A service with the default policy, no projection rules (every attribute
    /// dropped), the default config and the system clock.
    pub fn new(store: S, directory: D) -> Self {
        let batching = store.batching();
        Self {
            store,
            directory,
            policy: Policy::default(),
            projection: ProjectionRules::default(),
            config: Config::default(),
            clock: Arc::new(SystemClock),
            appends: Arc::new(Coalescer::new(batching.appends)),
            lookups: Arc::new(Coalescer::new(batching.lookups)),
            reuse: Arc::default(),
            settings: Settings::fresh(),
        }
    }

    /// Replaces the policy.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self.settings = Settings::fresh();
        self
    }

    /// Replaces the projection rules.
    #[must_use]
    pub fn with_projection(mut self, projection: ProjectionRules) -> Self {
        self.projection = projection;
        self.settings = Settings::fresh();
        self
    }

    /// Replaces the config. (A clone given its own config batches its
    /// lookups apart from the service it was cloned from: a batch is
    /// touched with the interval of the service that runs it.)
    #[must_use]
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self.settings = Settings::fresh();
        self.lookups_apart();
        self
    }

    /// Replaces the clock. (A clone given its own clock batches its
    /// lookups apart, as for [`Self::with_config`]: a batch is touched at
    /// the time of the service that runs it.)
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self.settings = Settings::fresh();
        self.lookups_apart();
        self
    }

    /// A group commit of lookups of this service's own, not shared with
    /// the clones it was cloned beside.
    fn lookups_apart(&mut self) {
        self.lookups = Arc::new(Coalescer::new(self.store.batching().lookups));
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The directory.
    pub fn directory(&self) -> &D {
        &self.directory
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The projection rules.
    pub fn projection(&self) -> &ProjectionRules {
        &self.projection
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Now, by the service's clock, normalised to UTC microseconds.
    pub fn now(&self) -> OffsetDateTime {
        normalize(self.clock.now())
    }

    /// Appends through the group commit when the store batches.
    async fn append(
        &self,
        draft: AuditDraft,
        guard: AppendGuard,
    ) -> Result<AuditEvent, StoreError> {
        if self.store.batching().appends == 0 {
            return self.store.append(draft, guard).await;
        }
        self.appends
            .submit((draft, guard), |batch| self.store.append_batch(batch))
            .await
            .unwrap_or_else(|Interrupted| Err(interrupted()))
    }

    /// The per-request lookup, through the group commit when the store
    /// batches (identical secrets in one batch are looked up once), and
    /// the touch it was sent with (whose time decides whether it was
    /// written: [`Touch::applies_to`]).
    async fn find_touching(
        &self,
        lookup: SecretLookup,
        touch: Touch,
    ) -> Result<Touched, StoreError> {
        if self.store.batching().lookups == 0 {
            let found = self.store.find_by_secret(&lookup, Some(touch)).await?;
            return Ok((found.map(|s| self.policy.bound(s)), touch));
        }
        let run = |lookups: Vec<SecretLookup>| async move {
            // Stamped when the call starts: no earlier than any request in it.
            let touch = Touch {
                now: self.now(),
                coalesce: touch.coalesce,
            };
            let mut distinct: Vec<SecretLookup> = Vec::new();
            let mut position: HashMap<SecretHash, usize> = HashMap::new();
            let slots: Vec<usize> = lookups
                .into_iter()
                .map(|l| {
                    *position.entry(l.hash).or_insert_with(|| {
                        distinct.push(l);
                        distinct.len() - 1
                    })
                })
                .collect();
            let found = self.store.find_by_secrets(&distinct, Some(touch)).await;
            slots
                .into_iter()
                .map(|i| match found.get(i) {
                    Some(Ok(session)) => Ok((session.clone(), touch)),
                    Some(Err(e)) => Err(e.clone()),
                    None => Err(interrupted()),
                })
                .collect()
        };
        self.lookups
            .submit(lookup, run)
            .await
            .unwrap_or_else(|Interrupted| Err(interrupted()))
            .map(|(found, touch)| (found.map(|s| self.policy.bound(s)), touch))
    }

    async fn audit_denial(
        &self,
        draft: AuditDraft,
        denial: Denial,
        attempt: &str,
    ) -> Result<Error, Error> {
        self.append(with_denial(draft, &denial, attempt), AppendGuard::None)
            .await?;
        tracing::warn!(
            denial = denial.code(),
            attempt,
            "impersonation attempt refused"
        );
        Ok(Error::Denied(denial))
    }

    /// Starts a session: checks the policy, projects the shadow user, writes
    /// the session with its audit event, and returns the bearer secret.
    /// Every refusal is audited.
    ///
    /// The agent is judged as the host gives them and as the directory has
    /// them now (the check a session's first use makes), so an agent the
    /// host read before a demotion is refused. A revoke-all of the agent's
    /// or the customer's sessions that overtakes the start ends its session
    /// at once ([`Error::RevokedWhileStarting`]).
    pub async fn start(
        &self,
        requester: Requester<'_>,
        request: StartRequest,
    ) -> Result<Started, Error> {
        let span = tracing::info_span!(
            "impersonation.start",
            impersonation.agent = Empty,
            impersonation.subject = %request.target,
            impersonation.session = Empty,
        );
        self.start_inner(requester, request, span.clone())
            .instrument(span)
            .await
    }

    async fn start_inner(
        &self,
        requester: Requester<'_>,
        request: StartRequest,
        span: Span,
    ) -> Result<Started, Error> {
        let now = self.now();
        let agent = match requester {
            Requester::User(agent) => agent,
            Requester::Impersonating(ctx) => {
                span.record(
                    "impersonation.agent",
                    tracing::field::display(&ctx.0.agent.id),
                );
                let draft = ctx.draft(now, AuditAction::Denied);
                return Err(self.audit_denial(draft, Denial::Nesting, "start").await?);
            }
        };
        span.record("impersonation.agent", tracing::field::display(&agent.id));
        let chain = ChainKey::for_agent(&agent.id);
        let refuse = |target: Option<&Principal>| {
            let draft = AuditDraft::new(now, AuditAction::Denied, actor_of(agent), chain.clone());
            match target {
                Some(t) => draft.subject(t.id.clone(), t.display_name.as_str(), t.tenant.clone()),
                None => draft,
            }
        };
        let live = self
            .live_records(&LiveFilter {
                agent: Some(agent.id.clone()),
                ..LiveFilter::default()
            })
            .await?;
        // A session of the agent's whose time is up (expired, or idle too
        // long) but that no request came along to end is ended now, with
        // its own audit event, instead of blocking this start as if it
        // were live: the agent may have lost its secret (another browser,
        // an expired token) and could not end it otherwise.
        let mut still_live = None;
        for session in &live {
            let ended = match session.lapse_at(now) {
                Some(lapse) => Box::pin(self.end_lapse(session, lapse)).await?.is_ok(),
                None => false,
            };
            if !ended {
                still_live = still_live.or(Some(session.id));
            }
        }
        // Before the directory is asked: someone who may not impersonate
        // anyone gets the same refusal, with the same work behind it,
        // whether or not the target exists, and writes nothing into a
        // customer's or a tenant's view of the trail. The record, in the
        // requester's own chain, names the target asked for as a detail.
        let unnamed = || refuse(None).details(Details::new().with("target", &request.target));
        if let Err(denial) = self.policy.permits_agent(agent) {
            return Err(self.audit_denial(unnamed(), denial, "start").await?);
        }
        // The customer's revocation chain and the agent's own chain as
        // they stand before the directory is asked: a revocation that
        // moves the one, or writes into the other, from here may have been
        // for what the directory answers now (a password changed, an agent
        // demoted).
        let fence = ChainKey::revocations_of(&request.target);
        let fenced = self.store.chain_head(&fence).await?;
        let agent_head = self.store.chain_head(&chain).await?;
        // The agent as the directory has them now, not only as the host
        // read them when its request began (perhaps before a demotion
        // that a revocation of their sessions followed, which the reads
        // above came too late to see): the same check a session's first
        // use would make, so a start it would end is refused.
        // A directory that answers for an id other than its own (one that
        // folds case, say) is answered as not knowing it: the fences above
        // and the session's keys are by the ids asked for, and a revocation
        // by the directory's own id would miss them.
        let current = match self.directory.principal(&agent.id).await? {
            Some(current) if current.id == agent.id => {
                self.policy.permits_agent(&current).map(|()| current)
            }
            _ => Err(Denial::UnknownAgent),
        };
        let current = match current {
            Ok(current) => current,
            Err(denial) => return Err(self.audit_denial(unnamed(), denial, "start").await?),
        };
        let Some(target) = self
            .directory
            .principal(&request.target)
            .await?
            .filter(|target| target.id == request.target)
        else {
            return Err(self
                .audit_denial(unnamed(), Denial::UnknownTarget, "start")
                .await?);
        };
        let context = PolicyContext {
            impersonating: false,
            live_session: still_live,
        };
        // The grant is the directory's agent's (what the session's
        // re-checks hold it to); the host's copy must pass the pair's
        // rules too.
        let grant = match self
            .policy
            .authorize(&current, &target, &request, context)
            .and_then(|grant| self.policy.permits_pair(agent, &target).map(|()| grant))
        {
            Ok(grant) => grant,
            Err(denial) => {
                return Err(self
                    .audit_denial(refuse(Some(&target)), denial, "start")
                    .await?);
            }
        };
        let shadow = self.projection.project(&target, &grant);
        let secret = SessionSecret::generate(&chain)?;
        let start = Session::begin(
            Begin {
                agent: person(&current),
                subject: person(&target),
                grant,
                shadow,
                secret_hash: secret.hash(),
            },
            now,
        );
        match self.store.start(start).await? {
            StartOutcome::Started { session, .. } => {
                span.record("impersonation.session", tracing::field::display(session.id));
                tracing::info!(state = %session.state, "impersonation session started");
                // A revocation of the customer's or the agent's sessions
                // that began after this start read the directory may have
                // listed them before this one was written: it would not
                // have ended it. It wrote its record first (in the
                // customer's revocation chain, or the agent's chain), so
                // this session ends now, as revoked, and its secret is
                // never handed out.
                let moved = match self.overtaken(&fence, fenced, &chain, agent_head).await {
                    Ok(false) => None,
                    Ok(true) => Some(Error::RevokedWhileStarting),
                    // Unconfirmed: not handed out, and ended if it can be.
                    Err(e) => Some(e),
                };
                if let Some(refusal) = moved {
                    self.end_overtaken(*session).await;
                    return Err(refusal);
                }
                Ok(Started {
                    session: *session,
                    secret,
                })
            }
            StartOutcome::Refused { .. } => {
                tracing::warn!(
                    denial = Denial::ActiveSessionExists.code(),
                    "impersonation attempt refused"
                );
                Err(Error::Denied(Denial::ActiveSessionExists))
            }
        }
    }

    /// Whether a revoke-all overtook a start that read `fenced` and `from`
    /// before it asked the directory: the customer's revocation chain
    /// `fence` moved on, or a revocation of the agent's sessions follows
    /// `from` in their chain (where the start's own event, and refusals of
    /// the agent's other attempts meanwhile, go too).
    async fn overtaken(
        &self,
        fence: &ChainKey,
        fenced: Option<ChainHead>,
        chain: &ChainKey,
        from: Option<ChainHead>,
    ) -> Result<bool, Error> {
        if self.store.chain_head(fence).await? != fenced {
            return Ok(true);
        }
        const PAGE: u32 = 64;
        let mut seq = from.map_or(0, |h| h.seq.saturating_add(1));
        loop {
            let events = self.store.chain_events(chain, seq, PAGE).await?;
            if events
                .iter()
                .any(|e| e.action == AuditAction::SessionsRevoked)
            {
                return Ok(true);
            }
            if events.len() < PAGE as usize {
                return Ok(false);
            }
            seq += u64::from(PAGE);
        }
    }

    /// Ends a session a revocation overtook as it started, reading it again
    /// if it changed meanwhile (the customer consented to it, say), as a
    /// revoke-all does. Its secret is not handed out whatever happens: if
    /// it cannot be ended, nobody can use it, and it ends when its time is
    /// up.
    async fn end_overtaken(&self, session: Session) {
        let details = Details::new().with("cause", "revoked_while_starting");
        match self
            .end(&session, EndReason::Revoked, Actor::System, details)
            .await
        {
            Ok(_) | Err(Error::UnknownSession) => {}
            Err(Error::Store(StoreError::Conflict(_))) => {
                tracing::warn!(session = %session.id, "a session a revocation overtook kept changing and was not ended; its secret was not handed out");
            }
            Err(e) => {
                tracing::warn!(error = %e, session = %session.id, "a session a revocation overtook could not be ended; its secret was not handed out");
            }
        }
    }

    /// Ends a session by transition, tolerating a concurrent end: returns the
    /// reason the session actually ended with. One that changed under the
    /// call and is still live (a consent came in) is ended as it now
    /// stands, as a revoke-all does, if `reason` may end it as it stands
    /// (a decline ends only a pending session: a [`TransitionError`]
    /// otherwise); a conflict once it has changed [`CHANGED_RETRIES`] times.
    async fn end(
        &self,
        session: &Session,
        reason: EndReason,
        by: Actor,
        details: Details,
    ) -> Result<EndReason, Error> {
        let mut changed: Option<Box<Session>> = None;
        for attempt in 1..=CHANGED_RETRIES {
            let current = changed.as_deref().unwrap_or(session);
            match self
                .try_end(current, reason, by.clone(), details.clone())
                .await?
            {
                Ending::Ended(reason) => return Ok(reason),
                // A lapse is judged on the copy it is ended with: one the
                // store's record no longer shows is not made.
                Ending::Changed(now)
                    if attempt < CHANGED_RETRIES
                        && !matches!(reason, EndReason::Expired | EndReason::IdleTimeout) =>
                {
                    changed = Some(now);
                }
                Ending::Changed(now) => return Err(Error::Store(StoreError::Conflict(now.id))),
                Ending::Gone => return Err(Error::UnknownSession),
            }
        }
        Err(Error::Store(StoreError::Conflict(session.id)))
    }

    /// Ends a session the caller's copy shows lapsed (`lapse`: expired or
    /// idle too long), as judged again on the store's record: the reason it
    /// ended with (its lapse, or whatever ended it first), or the store's
    /// record if that is live (used since the caller's copy was read).
    async fn end_lapse(
        &self,
        session: &Session,
        lapse: EndReason,
    ) -> Result<Result<EndReason, Box<Session>>, Error> {
        match self
            .try_end(session, lapse, Actor::System, Details::new())
            .await?
        {
            Ending::Ended(reason) => Ok(Ok(reason)),
            Ending::Changed(now) if now.lapse_at(self.now()).is_none() => Ok(Err(now)),
            // Changed and lapsed still (a consent, say): the caller retries.
            Ending::Changed(now) => Err(Error::Store(StoreError::Conflict(now.id))),
            Ending::Gone => Err(Error::UnknownSession),
        }
    }

    /// [`Impersonation::end`], answering with the session as it now stands
    /// when it changed under the call and is still live. An end for a
    /// lapse (`Expired`, `IdleTimeout`) that the store's record does not
    /// show is not made: the answer is that record, as changed.
    async fn try_end(
        &self,
        session: &Session,
        reason: EndReason,
        by: Actor,
        details: Details,
    ) -> Result<Ending, Error> {
        let now = self.now();
        // A session whose time is already up ended then, by the clock,
        // whoever asks now: the trail says it expired or idled out, not
        // that it was stopped or revoked after it should have ended. The
        // caller's copy may be older than a touch since (a revoke-all's
        // listing), so a lapse is judged on the store's record.
        let fresh;
        let (session, reason, by, details) = match session.lapse_at(now) {
            None => (session, reason, by, details),
            Some(_) => {
                fresh = match self.session_record(session.id).await? {
                    Some(s) => s,
                    None => return Ok(Ending::Gone),
                };
                if let SessionState::Ended(actual) = fresh.state {
                    return Ok(Ending::Ended(actual));
                }
                match fresh.lapse_at(now) {
                    Some(lapse) => (&fresh, lapse, Actor::System, Details::new()),
                    // The caller judged a lapse on an older copy.
                    None if matches!(reason, EndReason::Expired | EndReason::IdleTimeout) => {
                        return Ok(Ending::Changed(Box::new(fresh)));
                    }
                    None => (&fresh, reason, by, details),
                }
            }
        };
        self.apply_end(session, reason, by, details, now).await
    }

    /// Ends `session` as the caller's copy has it: the store refuses the
    /// end if the session changed since (its version moved on), and the
    /// answer then says how it stands now.
    async fn apply_end(
        &self,
        session: &Session,
        reason: EndReason,
        by: Actor,
        details: Details,
        now: OffsetDateTime,
    ) -> Result<Ending, Error> {
        let transition = session.end(reason, by, now, details)?;
        // Whatever the outcome, this process stops reusing the session: it
        // has ended, or changed under us. Also if this call is dropped
        // while the store works on it: the store may have ended it anyway.
        let forget = self.reuse.forget_on_drop(session.id);
        let outcome = self.store.transition(transition).await;
        drop(forget);
        match outcome {
            Ok((ended, _)) => {
                tracing::info!(reason = reason.code(), session = %ended.id, "impersonation session ended");
                Ok(Ending::Ended(reason))
            }
            Err(StoreError::Conflict(id)) => Ok(match self.session_record(id).await? {
                Some(Session {
                    state: SessionState::Ended(actual),
                    ..
                }) => Ending::Ended(actual),
                Some(now) => Ending::Changed(Box::new(now)),
                None => Ending::Gone,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The per-request path: finds the session by secret (touching its idle
    /// time in the same round trip), ends it if expired, idle, or no longer
    /// allowed by the policy, and returns the context. Fails closed.
    ///
    /// A session this process resolved less than
    /// [`Config::reuse_interval`] ago is not read again: use this for
    /// requests that only read (and are audited, or may be served with a
    /// view up to that old), and [`Impersonation::resolve_fresh`] for those
    /// that change something.
    pub async fn resolve(&self, secret: &SessionSecret) -> Result<Context, Error> {
        self.resolve_traced(secret, true).await
    }

    /// [`Impersonation::resolve`], always reading the store: for requests
    /// that change something, which must not run in a session that has
    /// just ended elsewhere.
    pub async fn resolve_fresh(&self, secret: &SessionSecret) -> Result<Context, Error> {
        self.resolve_traced(secret, false).await
    }

    async fn resolve_traced(&self, secret: &SessionSecret, reuse: bool) -> Result<Context, Error> {
        let span = tracing::info_span!(
            "impersonation.resolve",
            impersonation.agent = Empty,
            impersonation.subject = Empty,
            impersonation.session = Empty,
        );
        let now = self.now();
        let key = ReuseKey::Secret(self.settings, secret.hash());
        if reuse && let Some(ctx) = self.reused(&key, now, &span) {
            return Ok(ctx);
        }
        // Boxed: a read served from the reuse map, the common case, then
        // builds no store-call future at all (a store call's future is
        // over a kilobyte, which would otherwise be allocated, and take
        // malloc's slow path, on every request).
        Box::pin(
            self.resolve_from_store(secret, key, now, span.clone())
                .instrument(span),
        )
        .await
    }

    /// [`Impersonation::resolve`] past the reuse map: the store's record.
    async fn resolve_from_store(
        &self,
        secret: &SessionSecret,
        key: ReuseKey,
        now: OffsetDateTime,
        span: Span,
    ) -> Result<Context, Error> {
        // Read before the store: an end that lands meanwhile keeps this
        // answer out of the reuse map.
        let epoch = self.reuse.epoch();
        let (found, touch) = self.find_touching(secret.lookup(), self.touch(now)).await?;
        let Some(session) = found else {
            return Err(Error::Unauthenticated);
        };
        let interval = self.reuse_interval_for(session.grant.idle_timeout);
        let ctx = self.judge(session, now, Some(touch), &span).await?;
        self.reuse.put(key, &ctx, now, epoch, interval);
        Ok(ctx)
    }

    /// The store's record of session `id`, as the policy bounds it now
    /// ([`Policy::bound`]).
    async fn session_record(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        Ok(self.store.session(id).await?.map(|s| self.policy.bound(s)))
    }

    /// The store's live sessions under `filter`, as the policy bounds
    /// them now ([`Policy::bound`]).
    async fn live_records(&self, filter: &LiveFilter) -> Result<Vec<Session>, StoreError> {
        let listed = self.store.live_sessions(filter).await?;
        Ok(listed.into_iter().map(|s| self.policy.bound(s)).collect())
    }

    /// [`Config::reuse_interval`] for a session whose idle timeout is
    /// `idle`: at most half of it, since a reused read writes no idle
    /// touch, and a longer one would let a session in constant use idle
    /// out.
    fn reuse_interval_for(&self, idle: Duration) -> Duration {
        let most: Duration = idle / 2_i32;
        self.config.reuse_interval.min(most.max(Duration::ZERO))
    }

    /// The idle touch of a read of the store at `now`: written at most once
    /// a [`Config::touch_interval`], but at least twice an idle timeout,
    /// or a busy session would never count as used and idle out.
    fn touch(&self, now: OffsetDateTime) -> Touch {
        let most: Duration = self.policy.idle_timeout_duration() / 2_i32;
        Touch {
            now,
            coalesce: self
                .config
                .touch_interval
                .clamp(Duration::ZERO, most.max(Duration::ZERO)),
        }
    }

    /// The context this process resolved for `key` within
    /// [`Config::reuse_interval`], if any, its session recorded on `span`.
    fn reused(&self, key: &ReuseKey, now: OffsetDateTime, span: &Span) -> Option<Context> {
        let interval = self.config.reuse_interval;
        if interval <= Duration::ZERO {
            return None;
        }
        let ctx = self.reuse.get(key, now, interval)?;
        record_context(span, &ctx);
        Some(ctx)
    }

    /// Like [`Impersonation::resolve_fresh`], for a credential that names
    /// the session by id instead of carrying its bearer secret (the signed
    /// tokens of `impersonation-oidc`): the same checks, always on the
    /// store's record, so a stopped, expired or revoked session fails on
    /// the next request.
    pub async fn resolve_session(&self, id: SessionId) -> Result<Context, Error> {
        self.resolve_session_traced(id, false).await
    }

    /// Like [`Impersonation::resolve`], by session id: for a request that
    /// only reads, a session this process resolved less than
    /// [`Config::reuse_interval`] ago is answered without a store call, as
    /// for a secret (its audit write still checks the store). A request
    /// that changes something calls [`Impersonation::resolve_session`].
    pub async fn resolve_session_reusing(&self, id: SessionId) -> Result<Context, Error> {
        self.resolve_session_traced(id, true).await
    }

    async fn resolve_session_traced(&self, id: SessionId, reuse: bool) -> Result<Context, Error> {
        let span = tracing::info_span!(
            "impersonation.resolve",
            impersonation.agent = Empty,
            impersonation.subject = Empty,
            impersonation.session = %id,
        );
        let now = self.now();
        let key = ReuseKey::Session(self.settings, id);
        if reuse && let Some(ctx) = self.reused(&key, now, &span) {
            return Ok(ctx);
        }
        // Boxed, as for a secret: a reused read builds no store-call future.
        Box::pin(
            async {
                // Read before the store, as for a secret.
                let epoch = self.reuse.epoch();
                let touch = self.touch(now);
                let Some(found) = self.session_record(id).await? else {
                    return Err(Error::Unauthenticated);
                };
                // The idle touch goes through the lookup by secret hash (once a
                // touch interval), which every store writes in one step.
                let (session, touch) = if touch.applies_to(&found) {
                    let lookup = SecretLookup {
                        hash: found.secret_hash,
                        route: found.chain().route(),
                    };
                    match self.find_touching(lookup, touch).await? {
                        (Some(session), sent) if session.id == id => (session, sent),
                        _ => return Err(Error::Unauthenticated),
                    }
                } else {
                    (found, touch)
                };
                let interval = self.reuse_interval_for(session.grant.idle_timeout);
                let ctx = self.judge(session, now, Some(touch), &span).await?;
                self.reuse.put(key, &ctx, now, epoch, interval);
                Ok(ctx)
            }
            .instrument(span.clone()),
        )
        .await
    }

    /// Whether the session is still live, judged on the store's record as
    /// a request would be (ended, expired, idled out, or refused by a
    /// policy re-check that is due: the last three end it, on the trail,
    /// as [`Impersonation::resolve_session`] would), but without counting
    /// as its use: the idle time is not touched, so a watcher that checks
    /// every few seconds does not keep a session alive that its agent has
    /// walked away from. For what outlives one request: a streamed
    /// response, a WebSocket, which must end when their session does.
    /// Never served from the reuse map.
    pub async fn check_session(&self, id: SessionId) -> Result<Context, Error> {
        let span = tracing::info_span!(
            "impersonation.check",
            impersonation.agent = Empty,
            impersonation.subject = Empty,
            impersonation.session = %id,
        );
        async {
            let now = self.now();
            let Some(session) = self.session_record(id).await? else {
                return Err(Error::Unauthenticated);
            };
            self.judge(session, now, None, &span).await
        }
        .instrument(span.clone())
        .await
    }

    /// The checks every resolution makes on the record the store returned.
    async fn judge(
        &self,
        mut session: Session,
        now: OffsetDateTime,
        touch: Option<Touch>,
        span: &Span,
    ) -> Result<Context, Error> {
        record_session(span, &session);
        if let SessionState::Ended(reason) = session.state {
            // Ended by another process: this one stops reusing it too.
            self.reuse.forget_if_kept(session.id);
            return Err(Error::Ended(reason));
        }
        if let Some(lapse) = session.lapse_at(now) {
            // Boxed here and below: the rare ending path stays out of the
            // every-request future, which is moved at each await level.
            // (The record was read a moment ago; another request's use
            // since keeps it live, and it is judged as it is now.)
            match Box::pin(self.end_lapse(&session, lapse)).await? {
                Ok(reason) => return Err(Error::Ended(reason)),
                Err(now) => session = *now,
            }
        }
        if session.state == SessionState::Pending {
            return Err(Error::PendingConsent);
        }
        // The touch as the store was sent it: a batched lookup's is stamped
        // when its call ran, which may be past the idle deadline that this
        // request's own time is within (then the store wrote nothing).
        if let Some(t) = touch
            && t.applies_to(&session)
        {
            session.last_seen_at = t.now;
        }
        // A check stamped ahead of this clock (another server's runs fast)
        // is due too, or a skew would put off every re-check until this
        // clock caught up.
        let since_check = now - session.last_checked_at;
        if since_check >= self.config.recheck_interval || since_check.is_negative() {
            session = self.recheck(session, now).await?;
        }
        Ok(Context::of(&session))
    }

    async fn recheck(&self, mut session: Session, now: OffsetDateTime) -> Result<Session, Error> {
        let target = self.pair_or_end(&session).await?;
        // Under the policy as it stands now: a permission it has come to
        // deny since the start leaves the shadow user here, and a policy
        // that has made every session read-only since makes this one so.
        let as_now = self.policy.grant_as_now(&session.grant);
        let shadow = self
            .projection
            .project(&target, as_now.as_ref().unwrap_or(&session.grant));
        // Persisting the check is only needed to space re-checks out, or to
        // keep a changed shadow user; an unchanged every-request check costs
        // no write, so resolve stays one round trip.
        if shadow != session.shadow || self.config.recheck_interval > Duration::ZERO {
            match self
                .store
                .record_check(session.id, session.version, now, &shadow)
                .await
            {
                Ok(()) => {}
                Err(StoreError::Conflict(id)) => return Err(self.ended_or_conflict(id).await),
                Err(e) => return Err(e.into()),
            }
            session.last_checked_at = now;
            session.shadow = shadow;
        }
        Ok(session)
    }

    /// Stops the session the secret belongs to. Only the session's own agent may.
    pub async fn stop(&self, secret: &SessionSecret, by: &Principal) -> Result<EndReason, Error> {
        let span = stop_span();
        async {
            let found = self
                .store
                .find_by_secret(&secret.lookup(), None)
                .await?
                .map(|s| self.policy.bound(s));
            self.stop_found(found, by).await
        }
        .instrument(span)
        .await
    }

    /// Stops a session named by id (for credentials that carry the id, such
    /// as `impersonation-oidc`'s tokens). Only the session's own agent may;
    /// an unknown id is `Unauthenticated`, as an unknown secret is.
    pub async fn stop_session(&self, id: SessionId, by: &Principal) -> Result<EndReason, Error> {
        let span = stop_span();
        async {
            let found = self.session_record(id).await?;
            self.stop_found(found, by).await
        }
        .instrument(span)
        .await
    }

    async fn stop_found(&self, found: Option<Session>, by: &Principal) -> Result<EndReason, Error> {
        let Some(session) = found else {
            return Err(Error::Unauthenticated);
        };
        record_session(&Span::current(), &session);
        // Who asks before how it stands: a stranger's attempt is audited,
        // and learns nothing of how the session ended.
        if by.id != session.agent.id {
            let draft = session.draft(self.now(), AuditAction::Denied, actor_of(by));
            return Err(self
                .audit_denial(draft, Denial::NotSessionAgent, "stop")
                .await?);
        }
        if let SessionState::Ended(reason) = session.state {
            return Err(Error::Ended(reason));
        }
        let reason = self
            .end(&session, EndReason::Stopped, actor_of(by), Details::new())
            .await?;
        if reason == EndReason::Stopped {
            Ok(reason)
        } else {
            Err(Error::Ended(reason))
        }
    }

    /// Revokes one session. Its own agent or a holder of the admin permission may.
    ///
    /// `Ok(Revoked)` when this call ended it; [`Error::Ended`] with the
    /// reason when it had ended already, or its time was up (it is ended
    /// now as expired or idle, which the trail records).
    pub async fn revoke(
        &self,
        session: SessionId,
        by: &Principal,
        note: &str,
    ) -> Result<EndReason, Error> {
        let Some(found) = self.session_record(session).await? else {
            return Err(Error::UnknownSession);
        };
        // Who asks before how it stands, as for a stop.
        if by.id != found.agent.id && !self.policy.is_admin(by) {
            let draft = found.draft(self.now(), AuditAction::Denied, actor_of(by));
            return Err(self
                .audit_denial(draft, Denial::NotSessionAgent, "revoke")
                .await?);
        }
        if let SessionState::Ended(reason) = found.state {
            return Err(Error::Ended(reason));
        }
        let mut details = Details::new();
        if !note.trim().is_empty() {
            details.insert("note", note.trim());
        }
        match self
            .end(&found, EndReason::Revoked, actor_of(by), details)
            .await?
        {
            EndReason::Revoked => Ok(EndReason::Revoked),
            // Its time was up, or it ended otherwise meanwhile.
            other => Err(Error::Ended(other)),
        }
    }

    async fn revoke_matching(
        &self,
        filter: LiveFilter,
        by: Initiator<'_>,
        cause: &str,
        note: &str,
    ) -> Result<Vec<SessionId>, Error> {
        let actor = actor_by(by);
        let mut revoked = Vec::new();
        // A failure on one session does not stop the others; the first is
        // returned once every session has been tried.
        let mut failed = None;
        let details = revocation_details(Details::new(), cause, note);
        for session in self.live_records(&filter).await? {
            // A session that changed since it was listed (a consent came
            // in) is ended as it now stands (`end`).
            match self
                .end(&session, EndReason::Revoked, actor.clone(), details.clone())
                .await
            {
                Ok(EndReason::Revoked) => revoked.push(session.id),
                // Ended otherwise meanwhile.
                Ok(_) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(revoked),
        }
    }

    /// Revokes every live session of an agent (disabled or demoted). The
    /// agent themself, an administrator or host code (`Initiator::System`) may.
    ///
    /// Change the agent in the directory first, then call this. The
    /// revocation is written first, as an [`AuditAction::SessionsRevoked`]
    /// event in the agent's chain, even when there is no session to end.
    /// A start by the agent that is under way meanwhile either reads the
    /// directory after the change (and is refused), or finds that event in
    /// the agent's chain once its session is written (and ends it at once,
    /// as revoked, without handing out its secret). Both need a directory
    /// that answers with what was last written to it (not a stale cache
    /// or replica), and a record that was written: if the record fails,
    /// the sessions listed are ended all the same and the failure is
    /// answered, but a start under way may keep its session until its
    /// first re-check.
    pub async fn revoke_all_for_agent(
        &self,
        agent: &UserId,
        by: Initiator<'_>,
        note: &str,
    ) -> Result<Vec<SessionId>, Error> {
        if let Initiator::User(p) = by
            && p.id != *agent
            && !self.policy.is_admin(p)
        {
            let draft = AuditDraft::new(
                self.now(),
                AuditAction::Denied,
                actor_of(p),
                ChainKey::for_agent(agent),
            );
            return Err(self
                .audit_denial(draft, Denial::NotSessionAgent, "revoke_all_for_agent")
                .await?);
        }
        // The record goes in the agent's chain, where a start that
        // overtakes the listing finds it after it writes its session.
        let draft = AuditDraft::new(
            self.now(),
            AuditAction::SessionsRevoked,
            actor_by(by),
            ChainKey::for_agent(agent),
        );
        let details =
            revocation_details(Details::new().with("agent", agent), "agent_revoked", note);
        let filter = LiveFilter {
            agent: Some(agent.clone()),
            ..LiveFilter::default()
        };
        self.revoke_recorded(draft.details(details), filter, by, "agent_revoked", note)
            .await
    }

    /// A revoke-all: writes its `record` first (what a start that
    /// overtakes the listing finds after it writes its session), then ends
    /// every live session `filter` matches. A failed record does not hold
    /// the revocation up: the sessions are ended all the same, and the
    /// failure answered after.
    async fn revoke_recorded(
        &self,
        record: AuditDraft,
        filter: LiveFilter,
        by: Initiator<'_>,
        cause: &str,
        note: &str,
    ) -> Result<Vec<SessionId>, Error> {
        let recorded = self.append(record, AppendGuard::None).await;
        let revoked = self.revoke_matching(filter, by, cause, note).await?;
        recorded?;
        Ok(revoked)
    }

    /// `draft` named as the customer `subject`, so that a look at the
    /// customer's trail finds it; by id (a `target` detail) if the
    /// directory has no such person, or cannot answer (which does not keep
    /// the record off the trail, nor hold it up).
    async fn naming_customer(&self, draft: AuditDraft, subject: &UserId) -> AuditDraft {
        match self.directory.principal(subject).await {
            Ok(Some(t)) => draft.subject(t.id.clone(), t.display_name.as_str(), t.tenant.clone()),
            Ok(None) | Err(_) => draft.details(Details::new().with("target", subject)),
        }
    }

    /// Revokes every live session on a customer (password or MFA changed).
    /// The customer, an administrator or host code may.
    ///
    /// The revocation is written first, as an
    /// [`AuditAction::SessionsRevoked`] event in the customer's revocation
    /// chain ([`ChainKey::revocations_of`]), even when there is no session
    /// to end. A start that read the directory before that and writes its
    /// session after the listing here (so this call cannot see it) finds
    /// the chain moved and ends its session at once, as revoked, without
    /// handing out its secret.
    pub async fn revoke_all_for_subject(
        &self,
        subject: &UserId,
        by: Initiator<'_>,
        note: &str,
    ) -> Result<Vec<SessionId>, Error> {
        if let Initiator::User(p) = by
            && p.id != *subject
            && !self.policy.is_admin(p)
        {
            let draft = AuditDraft::new(
                self.now(),
                AuditAction::Denied,
                actor_of(p),
                ChainKey::for_agent(&p.id),
            );
            let draft = self.naming_customer(draft, subject).await;
            return Err(self
                .audit_denial(draft, Denial::NotSubject, "revoke_all_for_subject")
                .await?);
        }
        // The record goes in the customer's revocation chain, which a
        // start that overtakes the listing finds moved after it writes its
        // session.
        let draft = AuditDraft::new(
            self.now(),
            AuditAction::SessionsRevoked,
            actor_by(by),
            ChainKey::revocations_of(subject),
        );
        let draft = self.naming_customer(draft, subject).await;
        let details = revocation_details(
            Details::new().with("target", subject),
            "subject_changed",
            note,
        );
        let filter = LiveFilter {
            subject: Some(subject.clone()),
            ..LiveFilter::default()
        };
        self.revoke_recorded(draft.details(details), filter, by, "subject_changed", note)
            .await
    }

    /// Ends, each with its audit event, every live session whose time is
    /// up (expired, idle too long, or a consent request unanswered) that
    /// no request came along to end. Answers the sessions it ended (and
    /// those another request ended the same way meanwhile). A session is
    /// judged on the store's record and ended only as that record stands:
    /// one a consent activated since it was read is left alone. (A use
    /// cannot bring a lapsed session back: the store refuses the touch.)
    ///
    /// A lapsed session refuses every request whether or not this runs;
    /// what it adds is the trail's end event, on time, for a session its
    /// agent walked away from (a closed tab, a token never used again),
    /// and stores that expire their own keys (Redis: the session's end of
    /// validity plus the retention) need it to run within that retention
    /// for the end event to be written at all. Host code runs it every
    /// minute or so (a `tokio::time::interval` task, a cron job).
    ///
    /// A failure on one session does not stop the others; the first is
    /// returned once every session has been tried.
    pub async fn end_lapsed(&self) -> Result<Vec<SessionId>, Error> {
        let span = tracing::info_span!("impersonation.end_lapsed");
        async {
            let mut ended = Vec::new();
            let mut failed = None;
            for listed in self.live_records(&LiveFilter::default()).await? {
                // The listing may be older than a touch, never newer: a
                // session it shows live in time is, and one it shows
                // lapsed is judged again on the store's record.
                if listed.lapse_at(self.now()).is_none() {
                    continue;
                }
                let mut current = match self.session_record(listed.id).await {
                    Ok(Some(session)) => session,
                    Ok(None) => continue,
                    Err(e) => {
                        failed.get_or_insert(e.into());
                        continue;
                    }
                };
                for attempt in 1..=CHANGED_RETRIES {
                    if matches!(current.state, SessionState::Ended(_)) {
                        break;
                    }
                    // Judged on this record, and ended only as it stands:
                    // a consent or a stop since makes the store refuse the
                    // end, and the session is judged again as it is then.
                    let now = self.now();
                    let Some(lapse) = current.lapse_at(now) else {
                        break;
                    };
                    match self
                        .apply_end(&current, lapse, Actor::System, Details::new(), now)
                        .await
                    {
                        Ok(Ending::Ended(reason)) if reason == lapse => ended.push(current.id),
                        // Stopped or revoked by someone else meanwhile.
                        Ok(Ending::Ended(_)) => {}
                        Ok(Ending::Changed(now)) if attempt < CHANGED_RETRIES => {
                            current = *now;
                            continue;
                        }
                        Ok(Ending::Changed(now)) => {
                            failed.get_or_insert(Error::Store(StoreError::Conflict(now.id)));
                        }
                        Ok(Ending::Gone) => {}
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                    break;
                }
            }
            if !ended.is_empty() {
                tracing::info!(count = ended.len(), "lapsed impersonation sessions ended");
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(ended),
            }
        }
        .instrument(span)
        .await
    }

    async fn pending_for(
        &self,
        session: SessionId,
        by: &Principal,
        attempt: &str,
    ) -> Result<Session, Error> {
        let Some(found) = self.session_record(session).await? else {
            return Err(Error::UnknownSession);
        };
        if by.id != found.subject.id {
            let draft = found.draft(self.now(), AuditAction::Denied, actor_of(by));
            return Err(self
                .audit_denial(draft, Denial::NotSubject, attempt)
                .await?);
        }
        if let SessionState::Ended(reason) = found.state {
            return Err(Error::Ended(reason));
        }
        if let Some(lapse) = found.lapse_at(self.now()) {
            return match self.end_lapse(&found, lapse).await? {
                Ok(reason) => Err(Error::Ended(reason)),
                Err(now) => Ok(*now),
            };
        }
        Ok(found)
    }

    /// The customer consents to a pending session, which becomes active.
    /// The pair is judged first as a re-check judges it: an agent who lost
    /// the right to impersonate, or a customer who became protected,
    /// while the request waited ends it as revoked ([`Error::Ended`]), as
    /// does anything else that ended it meanwhile (with its reason).
    pub async fn grant_consent(
        &self,
        session: SessionId,
        by: &Principal,
    ) -> Result<Session, Error> {
        let found = self.pending_for(session, by, "grant_consent").await?;
        // The pair as the policy judges it now, as a session's re-check
        // would: an agent demoted, or a customer who became protected,
        // while the request waited does not get a session that the first
        // use would end; it ends now, as revoked.
        self.pair_or_end(&found).await?;
        // The window judged again once the directory has answered (a slow
        // one may have taken it past its close): a consent that comes too
        // late ends the request as expired, as any later use would.
        let now = self.now();
        if let Some(lapse) = found.lapse_at(now) {
            return Err(match self.end_lapse(&found, lapse).await? {
                Ok(reason) => Error::Ended(reason),
                // Changed meanwhile (consented, stopped elsewhere).
                Err(changed) => self.ended_or_conflict(changed.id).await,
            });
        }
        let transition = found.activate(actor_of(by), now)?;
        match self.store.transition(transition).await {
            Ok((active, _)) => Ok(active),
            // Ended meanwhile (stopped, revoked): the answer says so.
            Err(StoreError::Conflict(id)) => Err(self.ended_or_conflict(id).await),
            Err(e) => Err(e.into()),
        }
    }

    /// The answer to a write that conflicted on session `id`: the reason
    /// it ended, if it has, else the conflict.
    async fn ended_or_conflict(&self, id: SessionId) -> Error {
        match self.session_record(id).await {
            Ok(Some(Session {
                state: SessionState::Ended(reason),
                ..
            })) => Error::Ended(reason),
            Ok(_) => Error::Store(StoreError::Conflict(id)),
            Err(e) => e.into(),
        }
    }

    /// The session's agent and customer as the directory has them now,
    /// judged by the policy's rules for the pair: the customer; or, refused,
    /// the session ends as revoked (the denial in its details) and the
    /// answer is [`Error::Ended`].
    async fn pair_or_end(&self, session: &Session) -> Result<Principal, Error> {
        let agent = self.directory.principal(&session.agent.id).await?;
        let target = self.directory.principal(&session.subject.id).await?;
        // An answer for another id (a directory that folds case, accounts
        // merged since) is no answer for this session's people: its keys,
        // fences and trail are by their ids, as the start refuses.
        let verdict = match (agent, target) {
            (Some(a), _) if a.id != session.agent.id => Err(Denial::UnknownAgent),
            (_, Some(t)) if t.id != session.subject.id => Err(Denial::UnknownTarget),
            (None, _) => Err(Denial::UnknownAgent),
            (_, None) => Err(Denial::UnknownTarget),
            (Some(a), Some(t)) => self.policy.permits_pair(&a, &t).map(|()| t),
        };
        match verdict {
            Ok(target) => Ok(target),
            Err(denial) => {
                let details = Details::new()
                    .with(
                        "cause",
                        format!("policy re-check failed: {}", denial.code()),
                    )
                    .with("denial", denial.code());
                let reason =
                    Box::pin(self.end(session, EndReason::Revoked, Actor::System, details)).await?;
                Err(Error::Ended(reason))
            }
        }
    }

    /// The customer declines a pending session: `Ok(ConsentDenied)` when
    /// this call ended it; [`Error::Ended`] with the reason when something
    /// else ended it first.
    pub async fn deny_consent(
        &self,
        session: SessionId,
        by: &Principal,
    ) -> Result<EndReason, Error> {
        let found = self.pending_for(session, by, "deny_consent").await?;
        if found.state != SessionState::Pending {
            return Err(TransitionError {
                from: found.state,
                to: SessionState::Ended(EndReason::ConsentDenied),
            }
            .into());
        }
        // A consent granted meanwhile (another tab) stands: only a pending
        // session can be declined.
        let reason = self
            .end(
                &found,
                EndReason::ConsentDenied,
                actor_of(by),
                Details::new(),
            )
            .await?;
        // Ended otherwise meanwhile (stopped, revoked, expired): as for a
        // stop, the answer says it had ended, not that the decline did.
        if reason == EndReason::ConsentDenied {
            Ok(reason)
        } else {
            Err(Error::Ended(reason))
        }
    }

    /// Consent requests awaiting this customer.
    pub async fn pending_consents(&self, subject: &UserId) -> Result<Vec<Session>, Error> {
        let filter = LiveFilter {
            subject: Some(subject.clone()),
            ..LiveFilter::default()
        };
        let mut sessions = self.live_records(&filter).await?;
        // Not one whose consent window has passed: no answer would start
        // it (it is ended as expired when next met).
        let now = self.now();
        sessions.retain(|s| s.state == SessionState::Pending && s.lapse_at(now).is_none());
        Ok(sessions)
    }

    /// Asks, before a change is made, whether the session may make it: a
    /// modification in a read-only session may not, and the refusal is
    /// audited (`Denied`, `read_only_session`, with `attempt` as its
    /// description). An access is always admitted. It makes no store call
    /// unless it refuses, so a binding calls it before every handler that
    /// changes something, and [`Impersonation::record_completed`] after it.
    pub async fn admit(
        &self,
        ctx: &Context,
        kind: ActivityKind,
        attempt: &str,
    ) -> Result<(), Error> {
        if kind == ActivityKind::Modification && ctx.read_only() {
            return Err(self.refuse_read_only(ctx, attempt).await?);
        }
        Ok(())
    }

    /// Audits the refused change of a read-only session; the error to return.
    async fn refuse_read_only(&self, ctx: &Context, attempt: &str) -> Result<Error, Error> {
        // A context kept past its session's time is judged first, as
        // `record` judges it: a lapsed session refuses nothing on the
        // trail, it ends.
        let now = self.now();
        self.refuse_if_lapsed(ctx, now).await?;
        let mut draft = ctx.draft(now, AuditAction::Denied);
        let mut details = denial_details(&Denial::ReadOnlySession, "modification");
        details.insert("description", attempt);
        draft = draft.details(details);
        match self
            .append(draft, AppendGuard::SessionActive(ctx.0.session))
            .await
        {
            Ok(_) => Ok(Error::Denied(Denial::ReadOnlySession)),
            // Ended elsewhere meanwhile: as for any request in an ended
            // session, nothing is recorded and the caller is told so.
            Err(StoreError::SessionNotActive(_) | StoreError::SessionNotFound(_)) => {
                self.reuse.forget(ctx.0.session);
                Ok(Error::Unauthenticated)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Audits an access or modification inside a session, before it takes
    /// place: a modification in a read-only session is refused (and the
    /// refusal audited), and so is anything in a session that has ended
    /// or whose time is up, judged on the store's record when `ctx` shows
    /// it lapsed (`Unauthenticated`, nothing recorded; a lapsed session is
    /// ended as it lapsed), so the caller goes on only
    /// if this succeeds. For an activity that has already happened, call
    /// [`Impersonation::record_completed`].
    ///
    /// It does not ask the directory again: the agent's permission is
    /// re-checked when a request resolves the session. A context kept past
    /// its request (a socket's handler, a job) is not re-checked by
    /// recording with it; call [`Impersonation::check_session`] as often as
    /// a revoked permission must take effect (the Axum binding's watch of a
    /// stream or socket does every 5 s).
    pub async fn record(
        &self,
        ctx: &Context,
        activity: Activity,
    ) -> Result<crate::AuditEvent, Error> {
        if activity.kind == ActivityKind::Modification && ctx.read_only() {
            return Err(self.refuse_read_only(ctx, &activity.description).await?);
        }
        self.refuse_if_lapsed(ctx, self.now()).await?;
        self.record_guarded(ctx, activity, false).await
    }

    /// A context kept past its session's time by its copy (a socket's
    /// handler, a job): the store guards an append on the session being
    /// active, not in time, so the session is judged here on the store's
    /// record (other requests may have kept it in use). Lapsed there, it
    /// is ended as it lapsed, and the answer is `Unauthenticated`. While
    /// the context shows the session in time, there is nothing to judge.
    async fn refuse_if_lapsed(&self, ctx: &Context, now: OffsetDateTime) -> Result<(), Error> {
        if ctx.in_time(now) {
            return Ok(());
        }
        // Boxed: the store read and the end it may write stay off the
        // callers' futures (every audited request's) while in time.
        Box::pin(self.refuse_lapsed_on_record(ctx, now)).await
    }

    /// [`Self::refuse_if_lapsed`] for a context that shows its session
    /// lapsed: the store's record decides.
    async fn refuse_lapsed_on_record(
        &self,
        ctx: &Context,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        let lapsed = match self.session_record(ctx.0.session).await? {
            None => true,
            Some(found) => match found.lapse_at(now) {
                // Ended as it lapsed (or as it ended first), or found in
                // use since it was read.
                Some(lapse) => self.end_lapse(&found, lapse).await?.is_ok(),
                None => matches!(found.state, SessionState::Ended(_)),
            },
        };
        if lapsed {
            self.reuse.forget(ctx.0.session);
            return Err(Error::Unauthenticated);
        }
        Ok(())
    }

    /// Audits an access or modification that has already taken place (a
    /// binding calls it once the handler has answered, to record the
    /// status), after [`Impersonation::admit`] let it in.
    ///
    /// If the session ended in the meantime (another process stopped or
    /// revoked it while the handler ran), an access is refused as with
    /// [`Impersonation::record`] (`Unauthenticated`: withhold the answer,
    /// nothing recorded), but a modification has been made and so stays on
    /// the trail: it is appended after the session's end, with the detail
    /// `after_end = true`, and the call still returns
    /// `Err(Error::Unauthenticated)` so the caller knows the session is over.
    pub async fn record_completed(
        &self,
        ctx: &Context,
        activity: Activity,
    ) -> Result<crate::AuditEvent, Error> {
        // A request whose session's time ran out while it ran (a slow
        // handler, a long page read for the banner): judged on the store's
        // record, as `record` judges a kept context. Lapsed there, the
        // session is ended as it lapsed, and the activity is one in an
        // ended session: an access withheld, a change recorded after the
        // end. Where the end could not be made (the record gone, or
        // changed and lapsed still), the guarded append below decides on
        // the record as it stands: a change made is never left off.
        match self.refuse_if_lapsed(ctx, self.now()).await {
            Ok(()) | Err(Error::Unauthenticated) => {}
            Err(Error::UnknownSession | Error::Store(StoreError::Conflict(_))) => {
                // Lapsed, and not ended (its record gone, or changed and
                // lapsed still): an access is withheld, unrecorded; a change
                // made is recorded as the record now allows (after the end,
                // if there is one), and the caller still learns the
                // session is over.
                if activity.kind == ActivityKind::Modification {
                    match self.record_guarded(ctx, activity, true).await {
                        Ok(_) | Err(Error::Unauthenticated) => {}
                        Err(e) => return Err(e),
                    }
                }
                self.reuse.forget(ctx.0.session);
                return Err(Error::Unauthenticated);
            }
            Err(e) => return Err(e),
        }
        self.record_guarded(ctx, activity, true).await
    }

    /// Appends `activity`, guarded on the session being active; if it has
    /// `happened` and is a modification, a refusal appends it after the end.
    async fn record_guarded(
        &self,
        ctx: &Context,
        activity: Activity,
        happened: bool,
    ) -> Result<crate::AuditEvent, Error> {
        let keep = happened && activity.kind == ActivityKind::Modification;
        let draft = Self::activity_draft(ctx, self.now(), activity);
        let late = keep.then(|| draft.clone());
        match self
            .append(draft, AppendGuard::SessionActive(ctx.0.session))
            .await
        {
            Ok(event) => Ok(event),
            Err(StoreError::SessionNotActive(_) | StoreError::SessionNotFound(_)) => {
                // Ended elsewhere: stop reusing it here.
                self.reuse.forget(ctx.0.session);
                if let Some(mut draft) = late {
                    // A new event (the refused one was never written),
                    // placed after the end.
                    draft.id = crate::EventId::new();
                    draft.at = normalize(self.now());
                    draft.details.insert("after_end", "true");
                    Box::pin(self.append(draft, AppendGuard::None)).await?;
                    tracing::warn!(
                        session = %ctx.0.session,
                        "an impersonated change finished after its session ended; recorded after the end"
                    );
                }
                Err(Error::Unauthenticated)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The draft that audits `activity` (its description among its details).
    fn activity_draft(ctx: &Context, now: OffsetDateTime, activity: Activity) -> AuditDraft {
        let mut details = activity.details;
        // `description` and `after_end` are the SDK's to write: a host's
        // detail never stands in for them, and a full set of the host's
        // details leaves room for both.
        details.remove("after_end");
        details.remove("description");
        details.truncate(crate::audit::MAX_DETAIL_ENTRIES - 2);
        details.insert_owned("description", activity.description);
        let action = match activity.kind {
            ActivityKind::Access => AuditAction::Access,
            ActivityKind::Modification => AuditAction::Modification,
        };
        ctx.draft(now, action).details(details)
    }

    /// Audits a refused action inside a session (a billing route, say) and
    /// gives the error to answer with: `Denied(denial)`, the refusal on
    /// the trail. A session that has ended meanwhile (stopped by another
    /// process, whose end this process's reuse of the session did not
    /// see) gets nothing recorded after its end, and neither does one
    /// whose time is up on the store's record, which this call then ends
    /// as it lapsed (its `SessionEnded` event written); the answer is
    /// then `Ok(Unauthenticated)`, whichever way the session turned out
    /// to be over. `Err` is a store that failed.
    pub async fn record_denied(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<Error, Error> {
        match self
            .refuse_in_session(
                ctx,
                denial.clone(),
                attempt,
                "impersonation attempt refused",
            )
            .await
        {
            Ok(()) => Ok(Error::Denied(denial)),
            Err(Error::Unauthenticated) => Ok(Error::Unauthenticated),
            Err(e) => Err(e),
        }
    }

    /// Audits the app's own refusal of a request inside the session (a
    /// form naming another tenant's record, say): a `Denied` event with
    /// `denial` and `attempt`, appended only while the session is active,
    /// as [`Impersonation::record_completed`] appends. A session that
    /// ended meanwhile (stopped in another tab) refuses it: nothing is
    /// recorded after the end, and the answer is `Unauthenticated`. So
    /// does one whose time ran out while the request ran, which is ended
    /// as it lapsed, as `record_completed` ends it.
    pub async fn record_refused(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
    ) -> Result<(), Error> {
        self.refuse_in_session(
            ctx,
            denial,
            attempt,
            "impersonated request refused by the app",
        )
        .await
    }

    /// [`Impersonation::record_refused`], logged once on the trail with
    /// `message` (which says who refused).
    async fn refuse_in_session(
        &self,
        ctx: &Context,
        denial: Denial,
        attempt: &str,
        message: &'static str,
    ) -> Result<(), Error> {
        match self.refuse_if_lapsed(ctx, self.now()).await {
            Ok(()) => {}
            // Lapsed, and not ended (its record gone, or changed and
            // lapsed still): over all the same, and the refusal changed
            // nothing that would need a record after the end.
            Err(Error::UnknownSession | Error::Store(StoreError::Conflict(_))) => {
                self.reuse.forget(ctx.0.session);
                return Err(Error::Unauthenticated);
            }
            Err(e) => return Err(e),
        }
        let draft = ctx.draft(self.now(), AuditAction::Denied);
        match self
            .append(
                with_denial(draft, &denial, attempt),
                AppendGuard::SessionActive(ctx.0.session),
            )
            .await
        {
            Ok(_) => {
                tracing::warn!(denial = denial.code(), attempt, "{message}");
                Ok(())
            }
            Err(StoreError::SessionNotActive(_) | StoreError::SessionNotFound(_)) => {
                self.reuse.forget(ctx.0.session);
                Err(Error::Unauthenticated)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Audits a use of a session's credential by `by`, who is not its
    /// agent (a bearer secret or token sent beside someone else signed
    /// in): a `Denied` event on the session's trail, naming `by` as acting
    /// and `not_session_agent` as the denial, as a stop by someone else is.
    /// The session's own agent is no such person: for them nothing is
    /// recorded, and the answer is `Unauthenticated`.
    pub async fn record_used_by_other(
        &self,
        ctx: &Context,
        by: &Principal,
        attempt: &str,
    ) -> Result<Error, Error> {
        if by.id == ctx.agent().id {
            return Ok(Error::Unauthenticated);
        }
        let mut draft = ctx.draft(self.now(), AuditAction::Denied);
        draft.actor = actor_of(by);
        crate::session::name_the_agent(&mut draft, ctx.agent());
        self.audit_denial(draft, Denial::NotSessionAgent, attempt)
            .await
    }

    /// A page of the audit trail.
    pub async fn audit(&self, query: &AuditQuery) -> Result<AuditPage, Error> {
        Ok(self.store.audit(query).await?)
    }

    /// Verifies one chain, streaming it in pages, against the store's head.
    pub async fn verify_chain(
        &self,
        chain: &ChainKey,
    ) -> Result<Result<ChainReport, ChainBreak>, Error> {
        Ok(self
            .verify_chain_digest(chain, None)
            .await?
            .map(|(report, _)| report))
    }

    /// [`Impersonation::verify_chain`], and of the events it verified
    /// those `select`ed (none without it): how many, and their [`Digest`]
    /// under its key.
    async fn verify_chain_digest(
        &self,
        chain: &ChainKey,
        select: Option<(&AuditQuery, &DigestKey)>,
    ) -> Result<Result<(ChainReport, (u64, Digest)), ChainBreak>, Error> {
        // A record or head that does not decode is a break like any other
        // (and `verify_all` goes on to the next chain).
        let first = match self.head_or_break(chain, 0).await? {
            Ok(head) => head,
            Err(b) => return Ok(Err(b)),
        };
        // The event at the first head's position must be the one it names
        // (the verifier holds each event against it as it passes).
        let mut verifier = ChainVerifier::with_head(chain.clone(), first);
        // How many events were read in all.
        let mut read = 0_u64;
        let mut selected = 0_u64;
        let mut digest = Digest::default();
        loop {
            let (page, unreadable) = self.chain_page(chain, read).await?;
            for event in &page {
                if let Err(b) = verifier.push(event) {
                    return Ok(Err(b));
                }
                // Pushed: its hash is its content's.
                if let Some((filter, key)) = select
                    && filter.matches(event)
                {
                    selected += 1;
                    digest.add(key, &event.hash);
                }
            }
            read += page.len() as u64;
            if let Some(why) = unreadable {
                tracing::error!(chain = %chain, position = read, error = %why, "an audit event does not decode");
                return Ok(Err(ChainBreak {
                    chain: chain.clone(),
                    position: read,
                    kind: BreakKind::Unreadable,
                }));
            }
            if page.len() < VERIFY_PAGE as usize {
                break;
            }
        }
        // Events past the first head (any event, if there was none) were
        // appended while the chain was read (an agent at work), or written
        // without moving the head, or the head was taken away (with events
        // cut off the end, say, which only the head would tell). The first
        // head matched what was read at its position (the verifier saw to
        // that), and the head read
        // again must cover them: exactly, and it is compared as usual; past
        // them, more was appended since, and the chain is verified as far
        // as read; short of them, they are past any head; none at all, the
        // chain has lost its head.
        let past_first = first.map_or(read > 0, |h| read > h.seq.saturating_add(1));
        let head = if past_first {
            let again = match self.head_or_break(chain, read - 1).await? {
                Ok(head) => head,
                Err(b) => return Ok(Err(b)),
            };
            match again.or(first) {
                Some(now) if now.seq.saturating_add(1) > read => None,
                Some(now) => Some(now),
                None => {
                    return Ok(Err(ChainBreak {
                        chain: chain.clone(),
                        position: read - 1,
                        kind: BreakKind::HeadMismatch,
                    }));
                }
            }
        } else {
            first
        };
        Ok(verifier
            .finish(head)
            .map(|report| (report, (selected, digest))))
    }

    /// The head of `chain`, for verification; one that does not decode
    /// cannot say where the chain ends: a `HeadMismatch` break at
    /// `position`.
    async fn head_or_break(
        &self,
        chain: &ChainKey,
        position: u64,
    ) -> Result<Result<Option<ChainHead>, ChainBreak>, Error> {
        match self.store.chain_head(chain).await {
            Ok(head) => Ok(Ok(head)),
            Err(StoreError::Corrupt(why)) => {
                tracing::error!(chain = %chain, error = %why, "an audit chain's head does not decode");
                Ok(Err(ChainBreak {
                    chain: chain.clone(),
                    position,
                    kind: BreakKind::HeadMismatch,
                }))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A page of `chain` from `from`, for verification: the events read,
    /// and, if one does not decode, why. The page is then read again one
    /// event at a time, so that those before it are verified and the
    /// break is placed at the event itself.
    async fn chain_page(
        &self,
        chain: &ChainKey,
        from: u64,
    ) -> Result<(Vec<crate::AuditEvent>, Option<String>), Error> {
        match self.store.chain_events(chain, from, VERIFY_PAGE).await {
            Ok(page) => return Ok((page, None)),
            Err(StoreError::Corrupt(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let mut page = Vec::new();
        while page.len() < VERIFY_PAGE as usize {
            let at = from + page.len() as u64;
            match self.store.chain_events(chain, at, 1).await {
                Ok(one) if one.is_empty() => break,
                Ok(one) => page.extend(one),
                Err(StoreError::Corrupt(why)) => return Ok((page, Some(why))),
                Err(e) => return Err(e.into()),
            }
        }
        // Read whole one by one (changed since): as it reads now.
        Ok((page, None))
    }

    /// Verifies every chain in the store, then reads the listing of every
    /// event ([`Store::audit`] unfiltered, the trail as people read it)
    /// and checks that it shows each verified event once, as verified: a
    /// store whose listing is an index beside the chains (Redis's views,
    /// the Diesel store's run rows) could otherwise hide an event from
    /// every reader, or show another in its place, while its chain
    /// verifies. Events it shows past a chain's verified end are held to
    /// the chain read on from there. The filtered listings (by agent,
    /// customer, tenant, actor, session) are compared by
    /// [`Impersonation::verify_listing`]. The trail is read twice.
    ///
    /// Events appended while it runs are past what was verified and not
    /// counted; a chain begun meanwhile is verified when the listing shows
    /// it. Where they differ, the listing is read again once, for a
    /// listing write still in flight the first time (a Redis view write
    /// the store is still retrying after a fault, up to about 150 ms, can
    /// outlast both reads: run it again before acting on a `Count`).
    pub async fn verify_all(&self) -> Result<VerifyReport, Error> {
        self.verify_listing(&AuditQuery::default()).await
    }

    /// [`Impersonation::verify_all`] for one agent: verifies the agent's
    /// chain, then reads the listing of that agent's events
    /// ([`AuditQuery::agent`]) and checks that it shows each verified event
    /// once, as verified. For an agent who may check their own trail and
    /// no one else's.
    pub async fn verify_agent(&self, agent: &UserId) -> Result<VerifyReport, Error> {
        self.verify_listing(&AuditQuery {
            agent: Some(agent.clone()),
            ..AuditQuery::default()
        })
        .await
    }

    /// [`Impersonation::verify_all`] for the listing `query` selects (its
    /// filters; its cursor, order and page size aside): verifies the
    /// chains its events can come from (the agent's, when it names one;
    /// every chain otherwise), then reads that listing whole and checks
    /// that it shows each verified event its filters select once, as
    /// verified, and nothing else of the verified chains. A store may
    /// answer a filtered listing from an index of its own (Redis keeps one
    /// per customer, tenant, actor and session), which can lose an entry
    /// (a view write that failed) or be edited while the listing of every
    /// event and the chains agree: this is the check of what one reader
    /// sees, a customer shown the sessions that impersonated them, say.
    /// It reads every chain the listing can draw from, whatever the
    /// filters.
    ///
    /// ```
    /// use impersonation_core::*;
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let t = TenantId::new("pinewood").unwrap();
    /// let agent = Principal::new(UserId::from(1_u64), "Sam Support", t.clone())
    ///     .with_permission("impersonation:start");
    /// let carol = Principal::new(UserId::from(2_u64), "Carol", t);
    /// let directory = MemoryDirectory::new();
    /// directory.insert(agent.clone());
    /// directory.insert(carol.clone());
    /// let service = Impersonation::new(MemoryStore::new(), directory);
    /// let started = service
    ///     .start(Requester::User(&agent), StartRequest::new(carol.id.clone(), "Bookings page is empty"))
    ///     .await?;
    /// service.stop(&started.secret, &agent).await?;
    ///
    /// // What Carol is shown of the trail: the events about her.
    /// let hers = AuditQuery { subject: Some(carol.id.clone()), ..AuditQuery::new() };
    /// let report = service.verify_listing(&hers).await?;
    /// assert!(report.is_ok());
    /// assert_eq!(report.selected, 2); // the start and the stop, each listed once
    /// # Ok::<(), Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn verify_listing(&self, query: &AuditQuery) -> Result<VerifyReport, Error> {
        let mut run = Verification::new(query)?;
        match &query.agent {
            Some(agent) => {
                self.verify_into(&ChainKey::for_agent(agent), &mut run)
                    .await?;
            }
            None => {
                for key in self.all_chains().await? {
                    self.verify_into(&key, &mut run).await?;
                }
            }
        }
        self.compare_twice(&mut run).await?;
        Ok(run.report)
    }

    /// Compares the listing the run's filters select with the verified
    /// chains, and again where they differ. Of a listing of every chain
    /// (no agent filter), a chain it shows that the list of chains names
    /// by then was begun meanwhile: verified, not reported. A listing of
    /// one agent's chain shows no other.
    async fn compare_twice(&self, run: &mut Verification) -> Result<(), Error> {
        let one_chain = run.filter.agent.is_some();
        let mut mismatches = self.compare_listing(run).await?;
        let mut selected = run.selected();
        // A chain begun meanwhile, now verified, is compared the second
        // time.
        let born = !one_chain && self.verify_born_meanwhile(run, &mut mismatches).await?;
        let again = born
            || mismatches
                .iter()
                .any(|m| !matches!(m, ListingMismatch::Unreadable { .. }));
        if again {
            mismatches = self.compare_listing(run).await?;
            selected = run.selected();
            // (A chain begun since is verified, not compared: it counts
            // among neither `selected` nor the mismatches.)
            if !one_chain {
                self.verify_born_meanwhile(run, &mut mismatches).await?;
            }
        }
        if one_chain {
            for m in &mut mismatches {
                if let ListingMismatch::UnlistedChain { chain, listed } = m {
                    *m = ListingMismatch::OtherChain {
                        chain: chain.clone(),
                        listed: *listed,
                    };
                }
            }
        }
        run.report.listing = mismatches;
        run.report.selected = selected;
        Ok(())
    }

    /// Takes out of `mismatches` each chain the list of chains now names
    /// (no store shows a chain's event before it lists the chain, so it
    /// was begun after the list was read), and verifies it; whether there
    /// was one.
    async fn verify_born_meanwhile(
        &self,
        run: &mut Verification,
        mismatches: &mut Vec<ListingMismatch>,
    ) -> Result<bool, Error> {
        if !mismatches
            .iter()
            .any(|m| matches!(m, ListingMismatch::UnlistedChain { .. }))
        {
            return Ok(false);
        }
        let known: std::collections::HashSet<ChainKey> =
            self.all_chains().await?.into_iter().collect();
        let mut born = Vec::new();
        mismatches.retain(|m| match m {
            ListingMismatch::UnlistedChain { chain, .. } if known.contains(chain) => {
                born.push(chain.clone());
                false
            }
            _ => true,
        });
        let any = !born.is_empty();
        for chain in born {
            if !run.digests.contains_key(&chain) {
                self.verify_into(&chain, run).await?;
            }
        }
        Ok(any)
    }

    /// Every chain key the store lists, in order.
    async fn all_chains(&self) -> Result<Vec<ChainKey>, Error> {
        let mut all = Vec::new();
        loop {
            let keys = self.store.chains(all.last(), VERIFY_PAGE).await?;
            let done = keys.len() < VERIFY_PAGE as usize;
            all.extend(keys);
            if done {
                return Ok(all);
            }
        }
    }

    async fn verify_into(&self, chain: &ChainKey, run: &mut Verification) -> Result<(), Error> {
        match self
            .verify_chain_digest(chain, Some((&run.filter, &run.key)))
            .await?
        {
            Ok((ok, digest)) => {
                run.digests.insert(chain.clone(), digest);
                run.report.verified.push(ok);
            }
            Err(b) => run.report.broken.push(b),
        }
        Ok(())
    }

    /// Reads the listing the run's filters select (all of it) and
    /// compares, for each verified chain, the events it shows at the
    /// verified positions with those the filters select there: how many,
    /// and their [`Digest`], each hash computed again from the event as
    /// listed; and the events it shows past them with the chain's own,
    /// read now. An event the filters leave out is out of place anywhere.
    /// A broken chain's events are not compared (its break is reported).
    /// A page that does not decode ends the comparison: it answers
    /// `Unreadable` alone.
    async fn compare_listing(&self, run: &Verification) -> Result<Vec<ListingMismatch>, Error> {
        let mut seen: HashMap<&ChainKey, (&ChainReport, Listed)> = run
            .report
            .verified
            .iter()
            .map(|c| (&c.chain, (c, Listed::default())))
            .collect();
        let broken: std::collections::HashSet<&ChainKey> =
            run.report.broken.iter().map(|b| &b.chain).collect();
        let mut unknown: std::collections::BTreeMap<ChainKey, u64> = Default::default();
        let mut query = run.filter.clone();
        let mut read = 0_u64;
        loop {
            let page = match self.store.audit(&query).await {
                Ok(page) => page,
                Err(StoreError::Corrupt(why)) => {
                    tracing::error!(position = read, error = %why, "the audit listing does not decode");
                    return Ok(vec![ListingMismatch::Unreadable { read }]);
                }
                Err(e) => return Err(e.into()),
            };
            read += page.events.len() as u64;
            for event in &page.events {
                if broken.contains(&event.chain) {
                    continue;
                }
                match seen.get_mut(&event.chain) {
                    Some((_, listed)) if !run.filter.matches(event) => listed.stray = true,
                    Some((report, listed)) if event.seq < report.events => {
                        listed.count += 1;
                        listed.digest.add(&run.key, &event.compute_hash());
                    }
                    Some((_, listed)) => listed.past.push((event.seq, event.compute_hash())),
                    None => *unknown.entry(event.chain.clone()).or_default() += 1,
                }
            }
            match page.next {
                Some(cursor) => query.cursor = Some(cursor),
                None => break,
            }
        }
        let mut mismatches = Vec::new();
        for c in &run.report.verified {
            let (Some((_, listed)), Some((selected, digest))) =
                (seen.get_mut(&c.chain), run.digests.get(&c.chain))
            else {
                continue;
            };
            if listed.count != *selected {
                mismatches.push(ListingMismatch::Count {
                    chain: c.chain.clone(),
                    chained: *selected,
                    listed: listed.count,
                });
            } else if listed.stray
                || listed.digest != *digest
                || !self.past_is_chained(c, &mut listed.past).await?
            {
                mismatches.push(ListingMismatch::Altered {
                    chain: c.chain.clone(),
                });
            }
        }
        mismatches.extend(
            unknown
                .into_iter()
                .map(|(chain, listed)| ListingMismatch::UnlistedChain { chain, listed }),
        );
        Ok(mismatches)
    }

    /// Whether the events a listing shows past a verified chain's end
    /// (`past`: position, hash computed again) are the chain's, each once:
    /// the chain is read on from its end, each event held to its place
    /// and its link, as far as the last one listed.
    async fn past_is_chained(
        &self,
        verified: &ChainReport,
        past: &mut [(u64, EventHash)],
    ) -> Result<bool, Error> {
        past.sort_unstable_by_key(|(seq, _)| *seq);
        if past.windows(2).any(|w| w[0].0 == w[1].0) {
            return Ok(false);
        }
        let mut wanted = past.iter().peekable();
        let mut verifier = ChainVerifier::after(verified);
        let mut next = verified.events;
        while wanted.peek().is_some() {
            let (page, unreadable) = self.chain_page(&verified.chain, next).await?;
            for event in &page {
                if verifier.push(event).is_err() {
                    return Ok(false);
                }
                if let Some((_, hash)) = wanted.next_if(|(seq, _)| *seq == event.seq)
                    && *hash != event.hash
                {
                    return Ok(false);
                }
                if wanted.peek().is_none() {
                    return Ok(true);
                }
            }
            next += page.len() as u64;
            if unreadable.is_some() || page.len() < VERIFY_PAGE as usize {
                // The chain ends (or stops reading) before an event listed
                // past it.
                return Ok(false);
            }
        }
        Ok(true)
    }
}
