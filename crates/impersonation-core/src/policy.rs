//! The pure, synchronous policy: who may impersonate whom, why, and for how long.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::Duration;

use crate::id::{SessionId, TenantId, UserId};
use crate::principal::{
    Permission, PermissionPattern, Principal, RelationKind, Relationship, Role, TenantScope,
    any_matches, eq_ignoring_case,
};

/// Every reason a request is refused, each with a stable machine-readable code
/// ([`Denial::code`]) that bindings return and audit events record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Denial {
    /// The agent lacks the impersonate permission.
    #[error("the agent lacks the impersonate permission")]
    MissingPermission,
    /// The agent asked to impersonate themself.
    #[error("an agent cannot impersonate themself")]
    SelfImpersonation,
    /// The target holds a protected role (an administrator, say).
    #[error("the target holds a protected role")]
    ProtectedRole,
    /// The target is an agent (holds the impersonate permission).
    #[error("the target is a support agent")]
    TargetIsAgent,
    /// The target holds a permission the agent lacks.
    #[error("the target holds a permission the agent lacks")]
    Escalation,
    /// The target is in a tenant the agent's relationships do not cover,
    /// or has a relationship reaching one (the shadow user would carry it).
    #[error("the target is in, or reaches, a tenant outside the agent's")]
    TenantBoundary,
    /// No reason was given.
    #[error("a reason is required")]
    ReasonRequired,
    /// The reason is shorter than the policy's minimum.
    #[error("the reason is too short")]
    ReasonTooShort,
    /// The reason is longer than the policy's maximum.
    #[error("the reason is too long")]
    ReasonTooLong,
    /// The reason contains control or bidirectional formatting characters.
    #[error("the reason contains control characters")]
    ReasonInvalidCharacters,
    /// A ticket reference is required by the policy.
    #[error("a ticket reference is required")]
    TicketRequired,
    /// The ticket reference is malformed.
    #[error("the ticket reference is malformed")]
    TicketInvalid,
    /// The agent is impersonating already and tried to start another session from inside it.
    #[error("impersonation sessions cannot be nested")]
    Nesting,
    /// The agent already has a live session.
    #[error("the agent already has an active impersonation session")]
    ActiveSessionExists,
    /// The requested duration exceeds the policy's maximum, or is not positive.
    #[error("the requested duration is not allowed")]
    DurationNotAllowed,
    /// The requested scope names a permission the agent lacks.
    #[error("the requested scope exceeds the agent's permissions")]
    ScopeExceedsAgent,
    /// The target user does not exist.
    #[error("the target user does not exist")]
    UnknownTarget,
    /// The agent no longer exists in the directory.
    #[error("the agent no longer exists")]
    UnknownAgent,
    /// Someone other than the session's agent (or an administrator) tried to stop or revoke it.
    #[error("only the session's own agent or an administrator may end it")]
    NotSessionAgent,
    /// Someone other than the impersonated customer tried to answer a consent request.
    #[error("only the impersonated customer may answer a consent request")]
    NotSubject,
    /// A modification was attempted in a read-only session.
    #[error("the session is read-only")]
    ReadOnlySession,
    /// A route or action is refused while impersonating (billing, passwords, credentials, export).
    #[error("this action is not available while impersonating")]
    SensitiveAction,
    /// The app refused the action because the effective user (under
    /// impersonation, the shadow user, with the customer's permissions)
    /// lacks a permission of the app's own, as it would refuse the
    /// customer.
    #[error("the user lacks a permission this action requires")]
    NotPermitted,
}

impl Denial {
    /// The stable code, for APIs, logs and audit details.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::MissingPermission => "missing_permission",
            Self::SelfImpersonation => "self_impersonation",
            Self::ProtectedRole => "protected_role",
            Self::TargetIsAgent => "target_is_agent",
            Self::Escalation => "escalation",
            Self::TenantBoundary => "tenant_boundary",
            Self::ReasonRequired => "reason_required",
            Self::ReasonTooShort => "reason_too_short",
            Self::ReasonTooLong => "reason_too_long",
            Self::ReasonInvalidCharacters => "reason_invalid_characters",
            Self::TicketRequired => "ticket_required",
            Self::TicketInvalid => "ticket_invalid",
            Self::Nesting => "nesting",
            Self::ActiveSessionExists => "active_session_exists",
            Self::DurationNotAllowed => "duration_not_allowed",
            Self::ScopeExceedsAgent => "scope_exceeds_agent",
            Self::UnknownTarget => "unknown_target",
            Self::UnknownAgent => "unknown_agent",
            Self::NotSessionAgent => "not_session_agent",
            Self::NotSubject => "not_subject",
            Self::ReadOnlySession => "read_only_session",
            Self::SensitiveAction => "sensitive_action",
            Self::NotPermitted => "not_permitted",
        }
    }

    /// Every denial, for exhaustive tests and documentation.
    pub const ALL: [Denial; 23] = [
        Self::MissingPermission,
        Self::SelfImpersonation,
        Self::ProtectedRole,
        Self::TargetIsAgent,
        Self::Escalation,
        Self::TenantBoundary,
        Self::ReasonRequired,
        Self::ReasonTooShort,
        Self::ReasonTooLong,
        Self::ReasonInvalidCharacters,
        Self::TicketRequired,
        Self::TicketInvalid,
        Self::Nesting,
        Self::ActiveSessionExists,
        Self::DurationNotAllowed,
        Self::ScopeExceedsAgent,
        Self::UnknownTarget,
        Self::UnknownAgent,
        Self::NotSessionAgent,
        Self::NotSubject,
        Self::ReadOnlySession,
        Self::SensitiveAction,
        Self::NotPermitted,
    ];
}

/// Characters that rewrite the line they are shown in, besides
/// `char::is_control`: the line and paragraph separators (U+2028, U+2029),
/// which break it as a newline does, and the bidirectional embeddings,
/// overrides and isolates, which can make it read differently from what it
/// stores ("Trojan Source"). Refused in ids as well as in free text.
pub(crate) fn rewrites_lines(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// A character refused in free text: one that [`rewrites_lines`], or a
/// plain direction mark (U+061C, U+200E, U+200F), which ids may hold but
/// reasons and audit details need not.
pub(crate) fn is_forbidden_char(c: char) -> bool {
    rewrites_lines(c) || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}')
}

/// Whether a permission's name holds a wildcard character.
fn is_wildcard(permission: &Permission) -> bool {
    permission.as_str().contains(['*', '?'])
}

/// Whether free text holds a character refused in it ([`is_forbidden_char`]).
pub(crate) fn has_forbidden_chars(text: &str) -> bool {
    text.chars().any(is_forbidden_char)
}

/// The characters that say something: letters (Unicode's general category
/// L) and decimal digits (Nd), in any script. Not spaces, punctuation or
/// symbols (eight dots, or a word padded with dashes, are no reason; nor
/// are circled letters, which are symbols, or ①, ² and ½), nor the
/// invisible format characters (zero-width spaces and joiners, the soft
/// hyphen, the byte-order mark), combining marks (which only change the
/// character before them) and the letters drawn blank (the Hangul
/// fillers), so that eight Hangul fillers or one letter under seven
/// accents are no reason either.
fn meaningful_chars(text: &str) -> usize {
    use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};
    text.chars()
        .filter(|c| {
            (c.general_category_group() == GeneralCategoryGroup::Letter
                || c.general_category() == GeneralCategory::DecimalNumber)
                && !matches!(c, '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}')
        })
        .count()
}

/// A validated reason for an impersonation session (shown in the banner and audited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Reason(String);

impl Reason {
    /// The reason text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated support-ticket reference (`SUP-1234`, `#5678`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ticket(String);

impl Ticket {
    /// Longest accepted ticket reference.
    pub const MAX_LEN: usize = 64;

    /// Validates a ticket reference: 1 to 64 ASCII letters, digits or `-_#./:`.
    pub fn parse(text: &str) -> Result<Self, Denial> {
        let text = text.trim();
        let valid_char = |c: char| c.is_ascii_alphanumeric() || "-_#./:".contains(c);
        if text.is_empty() || text.len() > Self::MAX_LEN || !text.chars().all(valid_char) {
            return Err(Denial::TicketInvalid);
        }
        Ok(Self(text.to_owned()))
    }

    /// The reference.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an agent asks for when starting a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// The customer to impersonate.
    pub target: UserId,
    /// Why (required; shown in the banner, audited).
    pub reason: String,
    /// The support ticket, if any.
    pub ticket: Option<String>,
    /// A shorter duration than the policy's maximum.
    #[serde(default, with = "crate::serde_util::opt_duration_secs")]
    pub duration: Option<Duration>,
    /// Narrow the session to these permissions (never wider than the agent's own).
    pub scope: Option<BTreeSet<Permission>>,
    /// Ask for a read-only session.
    pub read_only: bool,
}

impl StartRequest {
    /// A request to impersonate `target` for `reason`.
    pub fn new(target: UserId, reason: impl Into<String>) -> Self {
        Self {
            target,
            reason: reason.into(),
            ticket: None,
            duration: None,
            scope: None,
            read_only: false,
        }
    }

    /// Adds a ticket reference.
    #[must_use]
    pub fn ticket(mut self, ticket: impl Into<String>) -> Self {
        self.ticket = Some(ticket.into());
        self
    }

    /// Asks for a shorter session.
    #[must_use]
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = Some(duration);
        self
    }

    /// Narrows the session to these permissions.
    #[must_use]
    pub fn scope<P: Into<Permission>>(mut self, permissions: impl IntoIterator<Item = P>) -> Self {
        self.scope = Some(permissions.into_iter().map(Into::into).collect());
        self
    }

    /// Asks for a read-only session.
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
}

/// What the policy allowed: the full statement of what a session may do,
/// stored with the session so it can be audited and re-checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The validated reason.
    pub reason: Reason,
    /// The validated ticket.
    pub ticket: Option<Ticket>,
    /// The most the shadow user may hold (intersected with the target's own).
    pub permissions: BTreeSet<Permission>,
    /// Permissions the shadow user never holds.
    pub denied: Vec<PermissionPattern>,
    /// Read-only session: only permissions matching `read_only_allowed` survive.
    pub read_only: bool,
    /// Which permissions count as read-only.
    pub read_only_allowed: Vec<PermissionPattern>,
    /// How long the session may last once active.
    #[serde(with = "crate::serde_util::duration_secs")]
    pub duration: Duration,
    /// How long the session may sit unused.
    #[serde(with = "crate::serde_util::duration_secs")]
    pub idle_timeout: Duration,
    /// When the customer must consent first: how long the request stays open.
    #[serde(default, with = "crate::serde_util::opt_duration_secs")]
    pub consent_timeout: Option<Duration>,
}

impl Grant {
    /// Whether the shadow user may hold this permission (before intersecting
    /// with the target's own permissions). Never one whose name holds `*`
    /// or `?`: an app may read such a permission as a wildcard (`*`,
    /// `bill*`), and no denied pattern could tell what it covers.
    pub fn allows(&self, permission: &Permission) -> bool {
        self.permissions.contains(permission)
            && !is_wildcard(permission)
            && !any_matches(&self.denied, permission)
            && (!self.read_only || any_matches(&self.read_only_allowed, permission))
    }

    /// The shadow user's permissions: target's ∩ grant − denied (∩ read-only set).
    pub fn effective_permissions(&self, target: &BTreeSet<Permission>) -> BTreeSet<Permission> {
        target.iter().filter(|p| self.allows(p)).cloned().collect()
    }
}

/// Whether the customer must consent before a session becomes active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// Sessions start active.
    NotRequired,
    /// Sessions start pending; the customer has `timeout` to answer.
    Required {
        /// How long a consent request stays open.
        timeout: Duration,
    },
}

/// The facts the policy decides on, besides the two principals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyContext {
    /// The request comes from inside an impersonation session.
    pub impersonating: bool,
    /// The agent's current live session, if any.
    pub live_session: Option<SessionId>,
}

/// The configurable, pure policy. `Policy::default()` is the secure default;
/// every loosening has a named method.
///
/// ```
/// use impersonation_core::{Policy, Principal, StartRequest, PolicyContext, UserId, TenantId, Denial};
/// let policy = Policy::default();
/// let t = TenantId::from(1_u64);
/// let agent = Principal::new(UserId::from(1_u64), "Sam", t.clone())
///     .with_permission("impersonation:start").with_permission("bookings:read");
/// let admin = Principal::new(UserId::from(2_u64), "Root", t).with_role("admin");
/// let request = StartRequest::new(admin.id.clone(), "Customer reported a broken page");
/// let denied = policy.authorize(&agent, &admin, &request, PolicyContext::default());
/// assert_eq!(denied.unwrap_err().code(), "protected_role");
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    impersonate_permission: Permission,
    admin_permission: Permission,
    protected_roles: BTreeSet<Role>,
    protect_agents: bool,
    no_escalation: bool,
    cross_tenant_kinds: BTreeSet<RelationKind>,
    reason_min_chars: usize,
    reason_max_chars: usize,
    require_ticket: bool,
    max_duration: Duration,
    idle_timeout: Duration,
    consent: Consent,
    denied_permissions: Vec<PermissionPattern>,
    read_only_allowed: Vec<PermissionPattern>,
    read_only_by_default: bool,
}

/// `d` rounded up to whole seconds (saturating at `i64::MAX` seconds, the
/// longest whole-second duration `time` holds, a hair under
/// `Duration::MAX`).
fn round_up_to_seconds(d: Duration) -> Duration {
    let secs = d.whole_seconds();
    if d.subsec_nanoseconds() > 0 {
        Duration::seconds(secs.saturating_add(1))
    } else {
        Duration::seconds(secs)
    }
}

/// A policy duration as the stores keep it: whole seconds, rounded up, and
/// at least one. A session's terms are written in whole seconds (its grant
/// is stored as JSON), so a fraction would read back shorter than the
/// process that began the session held it (an idle timeout of half a second
/// as none at all), and a zero or negative one would end every session
/// before its first request; the latter is warned about, as a mistake.
fn whole_seconds(what: &'static str, d: Duration) -> Duration {
    if d <= Duration::ZERO {
        tracing::warn!(
            setting = what,
            given = %d,
            "a policy duration must be positive; one second is used"
        );
    }
    round_up_to_seconds(d).max(Duration::SECOND)
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            impersonate_permission: Permission::new("impersonation:start"),
            admin_permission: Permission::new("impersonation:admin"),
            protected_roles: [Role::new("admin")].into(),
            protect_agents: true,
            no_escalation: true,
            cross_tenant_kinds: [RelationKind::Partner, RelationKind::Support].into(),
            reason_min_chars: 8,
            reason_max_chars: 500,
            require_ticket: false,
            max_duration: Duration::hours(1),
            idle_timeout: Duration::minutes(15),
            consent: Consent::NotRequired,
            denied_permissions: DEFAULT_DENIED
                .iter()
                .map(|p| PermissionPattern::new(*p))
                .collect(),
            read_only_allowed: DEFAULT_READ_ONLY
                .iter()
                .map(|p| PermissionPattern::new(*p))
                .collect(),
            read_only_by_default: false,
        }
    }
}

/// Permissions a shadow user never holds by default: billing, credentials,
/// passwords, MFA, data export, and impersonation itself (no nesting).
/// Each family in the singular and the plural where apps spell it both
/// ways (`credential:rotate`, `credentials:read`); the patterns ignore
/// case. An app whose names follow another scheme (`read_billing`,
/// `billing.manage`) sets its own with [`Policy::denied_permissions`].
pub const DEFAULT_DENIED: &[&str] = &[
    "billing:*",
    "password:*",
    "passwords:*",
    "credential:*",
    "credentials:*",
    "mfa:*",
    "export:*",
    "exports:*",
    "impersonation:*",
];

/// Permissions that count as read-only by default.
pub const DEFAULT_READ_ONLY: &[&str] = &["*:read", "*:view", "*:list"];

impl Policy {
    /// The permission an agent needs (default `impersonation:start`).
    #[must_use]
    pub fn impersonate_permission(mut self, permission: impl Into<Permission>) -> Self {
        self.impersonate_permission = permission.into();
        self
    }

    /// The permission that lets a holder revoke anyone's session (default `impersonation:admin`).
    #[must_use]
    pub fn admin_permission(mut self, permission: impl Into<Permission>) -> Self {
        self.admin_permission = permission.into();
        self
    }

    /// Adds a protected role: nobody holding it (in any casing) can be
    /// impersonated.
    #[must_use]
    pub fn protect_role(mut self, role: impl Into<Role>) -> Self {
        self.protected_roles.insert(role.into());
        self
    }

    /// Lets agents impersonate other agents: holders of the impersonate
    /// permission and of the admin permission alike. Off by default. The
    /// shadow user never holds either permission, so this cannot nest or
    /// lend admin powers; to keep admins out of reach anyway, give them a
    /// role passed to [`Policy::protect_role`].
    #[must_use]
    pub fn allow_impersonating_agents(mut self) -> Self {
        self.protect_agents = false;
        self
    }

    /// Lets agents impersonate users holding permissions they lack themselves.
    /// Off by default: this is privilege escalation, opt in knowingly.
    #[must_use]
    pub fn allow_privilege_escalation(mut self) -> Self {
        self.no_escalation = false;
        self
    }

    /// Which relationship kinds let an agent cross into another tenant (default partner and support).
    #[must_use]
    pub fn cross_tenant_kinds(mut self, kinds: impl IntoIterator<Item = RelationKind>) -> Self {
        self.cross_tenant_kinds = kinds.into_iter().collect();
        self
    }

    /// Bounds on the reason's length in characters (default 8 to 500). The
    /// minimum counts letters and decimal digits only (in any script: not
    /// spaces, punctuation, symbols, invisible or blank characters, nor
    /// accents apart from their letter), so a reason cannot be padded up
    /// to it; the maximum counts every character.
    #[must_use]
    pub fn reason_length(mut self, min_chars: usize, max_chars: usize) -> Self {
        self.reason_min_chars = min_chars.max(1);
        self.reason_max_chars = max_chars.max(self.reason_min_chars);
        self
    }

    /// Requires a ticket reference on every session.
    #[must_use]
    pub fn require_ticket(mut self) -> Self {
        self.require_ticket = true;
        self
    }

    /// The longest a session may last (default one hour). A shorter one
    /// than a live session began under binds it too, from its next read:
    /// it expires at its activation plus this. Kept in whole seconds, as
    /// the stores keep a session's terms: a fraction is rounded up, and
    /// anything under a second (zero, negative) is taken as one second.
    #[must_use]
    pub fn max_duration(mut self, duration: Duration) -> Self {
        self.max_duration = whole_seconds("max_duration", duration);
        self
    }

    /// How long a session may sit unused (default fifteen minutes), for
    /// the sessions started under it. Kept in whole seconds, at least one,
    /// as [`Self::max_duration`].
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = whole_seconds("idle_timeout", timeout);
        self
    }

    /// Whether the customer must consent first. A consent timeout is kept
    /// in whole seconds, at least one, as [`Self::max_duration`].
    #[must_use]
    pub fn consent(mut self, consent: Consent) -> Self {
        self.consent = match consent {
            Consent::Required { timeout } => Consent::Required {
                timeout: whole_seconds("consent timeout", timeout),
            },
            Consent::NotRequired => Consent::NotRequired,
        };
        self
    }

    /// Replaces the denied-permission patterns. `impersonation:*` is always
    /// kept, and a grant also denies the impersonate and admin permissions
    /// by their configured names.
    #[must_use]
    pub fn denied_permissions<P: Into<PermissionPattern>>(
        mut self,
        patterns: impl IntoIterator<Item = P>,
    ) -> Self {
        self.denied_permissions = patterns.into_iter().map(Into::into).collect();
        let always = PermissionPattern::new("impersonation:*");
        if !self.denied_permissions.contains(&always) {
            self.denied_permissions.push(always);
        }
        self
    }

    /// Replaces the patterns of permissions that count as read-only.
    #[must_use]
    pub fn read_only_permissions<P: Into<PermissionPattern>>(
        mut self,
        patterns: impl IntoIterator<Item = P>,
    ) -> Self {
        self.read_only_allowed = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// Makes every session read-only, whatever the request says: the live
    /// ones too, at their next re-check.
    #[must_use]
    pub fn read_only_always(mut self) -> Self {
        self.read_only_by_default = true;
        self
    }

    /// The permission an agent needs.
    pub fn impersonate_permission_name(&self) -> &Permission {
        &self.impersonate_permission
    }

    /// The administrator permission.
    pub fn admin_permission_name(&self) -> &Permission {
        &self.admin_permission
    }

    /// The longest a session may last.
    pub fn max_session_duration(&self) -> Duration {
        self.max_duration
    }

    /// The idle timeout.
    pub fn idle_timeout_duration(&self) -> Duration {
        self.idle_timeout
    }

    /// The denied-permission patterns.
    pub fn denied_permission_patterns(&self) -> &[PermissionPattern] {
        &self.denied_permissions
    }

    /// Whether the principal may revoke any session.
    pub fn is_admin(&self, principal: &Principal) -> bool {
        principal.has_permission(&self.admin_permission)
    }

    /// Decides a start request. Rules run in a fixed order, so the same
    /// request always gets the same denial.
    pub fn authorize(
        &self,
        agent: &Principal,
        target: &Principal,
        request: &StartRequest,
        context: PolicyContext,
    ) -> Result<Grant, Denial> {
        if context.impersonating {
            return Err(Denial::Nesting);
        }
        self.permits_pair(agent, target)?;
        let reason = self.validate_reason(&request.reason)?;
        let ticket = match &request.ticket {
            Some(t) if !t.trim().is_empty() => Some(Ticket::parse(t)?),
            _ if self.require_ticket => return Err(Denial::TicketRequired),
            _ => None,
        };
        // Compared as kept: rounded up to whole seconds, as the maximum is
        // (`Duration::MAX` asked under a maximum of `Duration::MAX` fits).
        let duration = match request.duration.map(round_up_to_seconds) {
            Some(d) if d <= Duration::ZERO || d > self.max_duration => {
                return Err(Denial::DurationNotAllowed);
            }
            Some(d) => d,
            None => self.max_duration,
        };
        let permissions = match &request.scope {
            Some(scope) => {
                if self.no_escalation && !scope.is_subset(&agent.permissions) {
                    return Err(Denial::ScopeExceedsAgent);
                }
                scope.clone()
            }
            None if self.no_escalation => agent.permissions.clone(),
            None => target.permissions.clone(),
        };
        if context.live_session.is_some() {
            return Err(Denial::ActiveSessionExists);
        }
        Ok(Grant {
            reason,
            ticket,
            permissions,
            denied: self.never_held(),
            read_only: request.read_only || self.read_only_by_default,
            read_only_allowed: self.read_only_allowed.clone(),
            duration,
            idle_timeout: self.idle_timeout,
            consent_timeout: match self.consent {
                Consent::NotRequired => None,
                Consent::Required { timeout } => Some(timeout),
            },
        })
    }

    /// The rule about the agent alone, the first of [`Self::permits_pair`]:
    /// they hold the impersonate permission. The service asks it before it
    /// looks the target up, so that a refusal for want of it tells no one
    /// whether the target exists.
    pub fn permits_agent(&self, agent: &Principal) -> Result<(), Denial> {
        if agent.has_permission(&self.impersonate_permission) {
            Ok(())
        } else {
            Err(Denial::MissingPermission)
        }
    }

    /// The rules about the two people alone, re-checked while a session runs:
    /// the agent's permission, self-impersonation, protected targets,
    /// escalation and the tenant boundary.
    pub fn permits_pair(&self, agent: &Principal, target: &Principal) -> Result<(), Denial> {
        self.permits_agent(agent)?;
        if agent.id == target.id {
            return Err(Denial::SelfImpersonation);
        }
        // Ignoring case: `Admin` is protected by `admin`.
        if target.roles.iter().any(|r| {
            self.protected_roles
                .iter()
                .any(|p| eq_ignoring_case(p.as_str(), r.as_str()))
        }) {
            return Err(Denial::ProtectedRole);
        }
        // An agent by any spelling: a held permission that, read as a
        // pattern ignoring case (`impersonation:*`, `*`,
        // `Impersonation:Admin`), covers the impersonate or admin one.
        // (A plain name is compared as text; only a wildcard is compiled.)
        let agent_permission = |held: &Permission| {
            let names = [&self.impersonate_permission, &self.admin_permission];
            if is_wildcard(held) {
                let held = PermissionPattern::new(held.as_str());
                names.iter().any(|name| held.matches(name))
            } else {
                names
                    .iter()
                    .any(|name| eq_ignoring_case(held.as_str(), name.as_str()))
            }
        };
        if self.protect_agents && target.permissions.iter().any(agent_permission) {
            return Err(Denial::TargetIsAgent);
        }
        if self.no_escalation {
            // Permissions the shadow user never gets cannot escalate
            // anything: those the grant's `allows` refuses whatever it
            // holds, matched by the same patterns.
            let never = self.never_held();
            let escalates = target
                .permissions
                .iter()
                .any(|p| !(is_wildcard(p) || any_matches(&never, p) || agent.has_permission(p)));
            if escalates {
                return Err(Denial::Escalation);
            }
        }
        let crossing = |r: &&Relationship| self.cross_tenant_kinds.contains(&r.kind);
        let reaches = |tenant: &TenantId| {
            *tenant == agent.tenant
                || agent
                    .relationships
                    .iter()
                    .filter(crossing)
                    .any(|r| r.scope.covers(tenant))
        };
        if !reaches(&target.tenant) {
            return Err(Denial::TenantBoundary);
        }
        // The customer's relationships go to the shadow user as they are:
        // one reaching a tenant the agent cannot reach (a partner's other
        // campgrounds, say) would carry the agent there.
        let reaches_all = agent
            .relationships
            .iter()
            .filter(crossing)
            .any(|r| r.scope == TenantScope::AllTenants);
        let beyond = target.relationships.iter().any(|r| match &r.scope {
            TenantScope::Tenants(tenants) => !tenants.iter().all(reaches),
            TenantScope::AllTenants => !reaches_all,
        });
        if beyond {
            return Err(Denial::TenantBoundary);
        }
        Ok(())
    }

    /// What a shadow user never holds: the denied patterns, and the
    /// impersonate and admin permissions under whatever names they were
    /// given (`impersonation:*` covers only the default names), so that
    /// impersonation never nests.
    fn never_held(&self) -> Vec<PermissionPattern> {
        let mut denied = self.denied_permissions.clone();
        for permission in [&self.impersonate_permission, &self.admin_permission] {
            if !any_matches(&denied, permission) {
                denied.push(PermissionPattern::new(permission.as_str()));
            }
        }
        denied
    }

    /// `grant` as it stands under this policy now: with what the policy
    /// denies today added to what it denied when the session started, and
    /// read-only if the policy makes every session so today. A pattern
    /// denied since (a permission withdrawn after an incident), or
    /// [`Policy::read_only_always`] switched on since, reaches a live
    /// session at its next re-check; one no longer denied, or read-only
    /// switched off, does not come back to it. A session made read-only
    /// this way keeps what today's [`Policy::read_only_permissions`]
    /// allow; one read-only from its start keeps its own list. `None` (and
    /// no copy) when the grant already stands as the policy has it.
    pub(crate) fn grant_as_now(&self, grant: &Grant) -> Option<Grant> {
        let covered = self
            .denied_permissions
            .iter()
            .all(|p| grant.denied.contains(p))
            && [&self.impersonate_permission, &self.admin_permission]
                .iter()
                .all(|permission| any_matches(&grant.denied, permission));
        let read_only_since = self.read_only_by_default && !grant.read_only;
        if covered && !read_only_since {
            return None;
        }
        let mut now = grant.clone();
        for pattern in self.never_held() {
            if !now.denied.contains(&pattern) {
                now.denied.push(pattern);
            }
        }
        if read_only_since {
            now.read_only = true;
            now.read_only_allowed.clone_from(&self.read_only_allowed);
        }
        Some(now)
    }

    /// `session` as this policy bounds it now, in time: a session that
    /// began under a longer [`Policy::max_duration`] than today's is held
    /// to today's (its expiry brought forward to its activation plus
    /// today's longest duration); one of a shorter one keeps its own. A
    /// pending session's duration, once the customer consents, is today's
    /// at most too. Applied to every record the service reads, so a policy
    /// tightened after an incident and redeployed reaches the sessions
    /// already live at their next request. (The record keeps its own
    /// expiry until the session's next write.) A shorter
    /// [`Policy::idle_timeout`] reaches only sessions started under it: a
    /// store writes a request's idle touch by the session's own timeout,
    /// before the service sees the record.
    pub(crate) fn bound(&self, mut session: crate::Session) -> crate::Session {
        if matches!(session.state, crate::SessionState::Ended(_)) {
            return session;
        }
        if let Some(activated) = session.activated_at {
            let most = crate::clock::normalize(activated.saturating_add(self.max_duration));
            if most < session.expires_at {
                session.expires_at = most;
            }
        }
        if session.grant.duration > self.max_duration {
            std::sync::Arc::make_mut(&mut session.grant).duration = self.max_duration;
        }
        session
    }

    fn validate_reason(&self, text: &str) -> Result<Reason, Denial> {
        let text = text.trim();
        if text.is_empty() {
            return Err(Denial::ReasonRequired);
        }
        if has_forbidden_chars(text) {
            return Err(Denial::ReasonInvalidCharacters);
        }
        if meaningful_chars(text) < self.reason_min_chars {
            return Err(Denial::ReasonTooShort);
        }
        if text.chars().count() > self.reason_max_chars {
            return Err(Denial::ReasonTooLong);
        }
        Ok(Reason(text.to_owned()))
    }
}
