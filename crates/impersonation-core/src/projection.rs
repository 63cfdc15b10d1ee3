//! Shadow-user projection: what of the customer the agent works with.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::{TenantId, UserId};
use crate::policy::Grant;
use crate::principal::{Permission, Principal, Relationship, Role, eq_ignoring_case};

/// How one attribute reaches the shadow user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttributeRule {
    /// The value as is (settings: time zone, language, feature flags).
    /// A structured value is copied whole, every nested field with it:
    /// give `Copy` to an object only if all of it may be seen (a
    /// `preferences` object holding a saved card may not).
    Copy,
    /// A partial view: every character hidden but the last few (card or phone numbers).
    Mask(Mask),
    /// The attribute is present but its value is not: the app can show "hidden".
    Redact,
    /// The attribute is absent. Attributes without a rule are dropped.
    Drop,
}

/// A mask that keeps the last `keep_last` characters, and only for values
/// long enough that those characters are a small part of the whole (three
/// times `keep_last` letters or digits or more; spaces and punctuation, a
/// PIN's padding say, do not count); shorter values are hidden entirely,
/// length included (eight mask characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    /// How many trailing characters stay visible.
    pub keep_last: usize,
}

impl Default for Mask {
    fn default() -> Self {
        Self { keep_last: 4 }
    }
}

/// The character that replaces hidden ones.
pub const MASK_CHAR: char = '•';

/// How many [`MASK_CHAR`]s stand for a value hidden entirely, whatever its
/// length.
const HIDDEN_WIDTH: usize = 8;

impl Mask {
    /// Masks a text.
    pub fn apply(&self, text: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let significant = chars.iter().filter(|c| c.is_alphanumeric()).count();
        let keep = if significant >= self.keep_last.saturating_mul(3) {
            self.keep_last
        } else {
            0
        };
        if keep == 0 {
            // Hidden entirely: its length is withheld too.
            return std::iter::repeat_n(MASK_CHAR, HIDDEN_WIDTH).collect();
        }
        let hidden = chars.len() - keep;
        std::iter::repeat_n(MASK_CHAR, hidden.max(4))
            .chain(chars[hidden..].iter().copied())
            .collect()
    }
}

/// An attribute as the shadow user holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum ShadowValue {
    /// Copied as is.
    Copied(serde_json::Value),
    /// Masked text.
    Masked(String),
    /// Present, value withheld.
    Redacted,
}

/// Per-attribute rules. The default has no rules, so every attribute is
/// dropped: secure by default, each attribute the agent should see is opted in.
///
/// ```
/// use impersonation_core::{ProjectionRules, AttributeRule, Mask};
/// let rules = ProjectionRules::new()
///     .rule("timezone", AttributeRule::Copy)
///     .rule("card_number", AttributeRule::Mask(Mask::default()))
///     .rule("email", AttributeRule::Redact);
/// assert_eq!(rules.rule_for("password_hash"), AttributeRule::Drop);
/// ```
///
/// Roles are copied, as permissions are (cut to the grant): an app that
/// checks roles rather than permissions for what the policy's denials
/// cover (billing, credentials, export) withholds those roles from the
/// shadow user with [`ProjectionRules::withhold_role`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionRules {
    rules: BTreeMap<String, AttributeRule>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    withheld_roles: BTreeSet<Role>,
}

impl ProjectionRules {
    /// No rules: every attribute dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the rule for an attribute.
    #[must_use]
    pub fn rule(mut self, attribute: impl Into<String>, rule: AttributeRule) -> Self {
        self.rules.insert(attribute.into(), rule);
        self
    }

    /// Withholds a role from the shadow user (matched ignoring case, as
    /// the policy's protected roles are): a role that stands for access
    /// the policy denies during impersonation (`billing_admin`, say),
    /// where the app checks that role rather than a permission.
    ///
    /// ```
    /// use impersonation_core::ProjectionRules;
    /// let rules = ProjectionRules::new().withhold_role("billing_admin");
    /// assert!(rules.withholds_role("Billing_Admin"));
    /// assert!(!rules.withholds_role("staff"));
    /// ```
    #[must_use]
    pub fn withhold_role(mut self, role: impl Into<Role>) -> Self {
        self.withheld_roles.insert(role.into());
        self
    }

    /// Whether `role` is withheld from the shadow user.
    pub fn withholds_role(&self, role: &str) -> bool {
        self.withheld_roles
            .iter()
            .any(|w| eq_ignoring_case(w.as_str(), role))
    }

    /// The rule for an attribute (`Drop` when none was set).
    pub fn rule_for(&self, attribute: &str) -> AttributeRule {
        self.rules
            .get(attribute)
            .copied()
            .unwrap_or(AttributeRule::Drop)
    }

    /// Every explicit rule.
    pub fn rules(&self) -> impl Iterator<Item = (&str, AttributeRule)> {
        self.rules.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Projects the customer into the shadow user the agent works as.
    pub fn project(&self, target: &Principal, grant: &Grant) -> ShadowUser {
        let mut attributes = BTreeMap::new();
        for (name, value) in &target.attributes {
            let shadow = match self.rule_for(name) {
                AttributeRule::Copy => ShadowValue::Copied(value.clone()),
                AttributeRule::Mask(mask) => match value {
                    serde_json::Value::String(s) => ShadowValue::Masked(mask.apply(s)),
                    serde_json::Value::Number(n) => ShadowValue::Masked(mask.apply(&n.to_string())),
                    // Structured values cannot be masked meaningfully.
                    _ => ShadowValue::Redacted,
                },
                AttributeRule::Redact => ShadowValue::Redacted,
                AttributeRule::Drop => continue,
            };
            attributes.insert(name.clone(), shadow);
        }
        ShadowUser(Arc::new(ShadowData {
            id: target.id.clone(),
            display_name: target.display_name.as_str().into(),
            tenant: target.tenant.clone(),
            roles: if self.withheld_roles.is_empty() {
                target.roles.clone()
            } else {
                target
                    .roles
                    .iter()
                    .filter(|r| !self.withholds_role(r.as_str()))
                    .cloned()
                    .collect()
            },
            permissions: grant.effective_permissions(&target.permissions),
            attributes,
            relationships: target.relationships.clone(),
            read_only: grant.read_only,
        }))
    }
}

/// The user an agent works as during a session: the customer's id, tenant,
/// roles, settings and relationships, with permissions cut to
/// target ∩ grant − denied and sensitive attributes masked, redacted or absent.
///
/// Only [`ProjectionRules::project`] builds one (stores read them back through serde).
///
/// Cloning is cheap (the data is shared and never changes), so every request
/// can carry its own handle.
///
/// Its `Debug` names the attributes and how each is held, never their
/// values (as [`Principal`]'s does): the customer's settings, even masked
/// ones, do not reach a log through a handler's `#[instrument]`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShadowUser(Arc<ShadowData>);

impl std::fmt::Debug for ShadowUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.0;
        let held: BTreeMap<&str, &str> = d
            .attributes
            .iter()
            .map(|(name, value)| {
                let how = match value {
                    ShadowValue::Copied(_) => "copied",
                    ShadowValue::Masked(_) => "masked",
                    ShadowValue::Redacted => "redacted",
                };
                (name.as_str(), how)
            })
            .collect();
        f.debug_struct("ShadowUser")
            .field("id", &d.id)
            .field("display_name", &d.display_name)
            .field("tenant", &d.tenant)
            .field("roles", &d.roles)
            .field("permissions", &d.permissions)
            .field("attributes", &held)
            .field("relationships", &d.relationships)
            .field("read_only", &d.read_only)
            .finish()
    }
}

#[derive(PartialEq, Eq, Serialize, Deserialize)]
struct ShadowData {
    id: UserId,
    display_name: Arc<str>,
    tenant: TenantId,
    roles: BTreeSet<Role>,
    permissions: BTreeSet<Permission>,
    attributes: BTreeMap<String, ShadowValue>,
    relationships: Vec<Relationship>,
    read_only: bool,
}

impl ShadowUser {
    /// The customer's id (the app's "current user" id during the session).
    pub fn id(&self) -> &UserId {
        &self.0.id
    }

    /// The customer's display name.
    pub fn display_name(&self) -> &str {
        &self.0.display_name
    }

    /// The display name as shared text, for events that name the customer.
    pub(crate) fn display_name_shared(&self) -> Arc<str> {
        Arc::clone(&self.0.display_name)
    }

    /// The customer's tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.0.tenant
    }

    /// The customer's roles, less any the projection withholds
    /// ([`ProjectionRules::withhold_role`]).
    pub fn roles(&self) -> &BTreeSet<Role> {
        &self.0.roles
    }

    /// The effective permissions.
    pub fn permissions(&self) -> &BTreeSet<Permission> {
        &self.0.permissions
    }

    /// Whether the shadow user holds a permission.
    pub fn has_permission(&self, permission: &Permission) -> bool {
        self.0.permissions.contains(permission)
    }

    /// The projected attributes.
    pub fn attributes(&self) -> &BTreeMap<String, ShadowValue> {
        &self.0.attributes
    }

    /// One projected attribute.
    pub fn attribute(&self, name: &str) -> Option<&ShadowValue> {
        self.0.attributes.get(name)
    }

    /// The customer's company and partner relationships.
    pub fn relationships(&self) -> &[Relationship] {
        &self.0.relationships
    }

    /// The customer's company name.
    pub fn company(&self) -> Option<&str> {
        self.0
            .relationships
            .iter()
            .find(|r| r.kind == crate::principal::RelationKind::Company)
            .map(|r| r.name.as_str())
    }

    /// Whether the session is read-only.
    pub fn read_only(&self) -> bool {
        self.0.read_only
    }
}
