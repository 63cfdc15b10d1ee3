//! Principals as the host app describes them, and the `Directory` that supplies them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

use crate::id::{TenantId, UserId};

macro_rules! name_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a name as the host app spells it.
            pub fn new(name: impl Into<String>) -> Self {
                Self(name.into())
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(name: &str) -> Self {
                Self(name.to_owned())
            }
        }
    };
}

name_newtype! {
    /// A role of the host app (`"admin"`, `"owner"`, `"support"`).
    Role
}

/// Whether two names are the same ignoring case, as permission patterns
/// match: `Admin` is `admin`, whatever casing the host app gives its roles
/// and permissions (the policy's protected roles and agents, the
/// projection's withheld roles).
pub(crate) fn eq_ignoring_case(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

name_newtype! {
    /// A permission of the host app (`"bookings:read"`, `"billing:manage"`).
    ///
    /// The SDK's own defaults assume `area:verb` names; every default pattern
    /// can be replaced through [`crate::Policy`].
    Permission
}

/// A pattern over permission names where `*` matches any run of characters
/// and `?` any one character (`"billing:*"`, `"*:read"`), ignoring case:
/// `"billing:*"` keeps `Billing:Manage` from a shadow user too, whatever
/// casing the host app gives its permissions. Matching is done by the
/// `wildmatch` crate. (A grant stored when patterns still matched exactly
/// is read with this matching too: its read-only patterns then also allow
/// other casings of the permissions they named.)
#[derive(Clone, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct PermissionPattern {
    source: String,
    matcher: WildMatch,
}

impl PermissionPattern {
    /// Compiles a pattern.
    pub fn new(pattern: impl Into<String>) -> Self {
        let source = pattern.into();
        let matcher = WildMatch::new_case_insensitive(&source);
        Self { source, matcher }
    }

    /// Whether the permission matches this pattern.
    pub fn matches(&self, permission: &Permission) -> bool {
        self.matcher.matches(permission.as_str())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for PermissionPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for PermissionPattern {}

impl fmt::Debug for PermissionPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PermissionPattern({:?})", self.source)
    }
}

impl From<String> for PermissionPattern {
    fn from(source: String) -> Self {
        Self::new(source)
    }
}

impl From<&str> for PermissionPattern {
    fn from(source: &str) -> Self {
        Self::new(source)
    }
}

impl From<PermissionPattern> for String {
    fn from(pattern: PermissionPattern) -> String {
        pattern.source
    }
}

/// Whether any pattern of the list matches the permission.
pub(crate) fn any_matches(patterns: &[PermissionPattern], permission: &Permission) -> bool {
    patterns.iter().any(|p| p.matches(permission))
}

/// The kind of a relationship between a principal and an organisation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelationKind {
    /// The company the principal belongs to (shown in the banner).
    Company,
    /// A partner company that manages some tenants.
    Partner,
    /// The SaaS vendor's own support organisation.
    Support,
    /// Anything else the host app models.
    Other(String),
}

/// Which tenants a relationship covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantScope {
    /// These tenants only.
    Tenants(BTreeSet<TenantId>),
    /// Every tenant (the vendor's own support team). Only honoured for kinds
    /// the policy lets cross tenants.
    AllTenants,
}

impl TenantScope {
    /// Whether the scope covers the tenant.
    pub fn covers(&self, tenant: &TenantId) -> bool {
        match self {
            Self::Tenants(tenants) => tenants.contains(tenant),
            Self::AllTenants => true,
        }
    }
}

/// A relationship of a principal with a company or partner, copied into the
/// shadow user so the agent sees the customer's context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relationship {
    /// What the relationship is.
    pub kind: RelationKind,
    /// The organisation's key in the host app.
    pub id: String,
    /// The organisation's display name.
    pub name: String,
    /// The tenants the relationship covers.
    pub scope: TenantScope,
}

impl Relationship {
    /// A relationship covering the listed tenants.
    pub fn new(
        kind: RelationKind,
        id: impl Into<String>,
        name: impl Into<String>,
        tenants: impl IntoIterator<Item = TenantId>,
    ) -> Self {
        Self {
            kind,
            id: id.into(),
            name: name.into(),
            scope: TenantScope::Tenants(tenants.into_iter().collect()),
        }
    }

    /// A relationship covering every tenant (the vendor's support organisation).
    pub fn all_tenants(kind: RelationKind, id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            id: id.into(),
            name: name.into(),
            scope: TenantScope::AllTenants,
        }
    }
}

/// A user of the host app as the SDK sees it.
///
/// `attributes` hold settings and personal data alike; which of them reach
/// the shadow user is decided by [`crate::ProjectionRules`]. `Debug` prints
/// attribute names, never their values.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Principal {
    /// The host app's key for the user.
    pub id: UserId,
    /// The name shown in banners and the audit table.
    pub display_name: String,
    /// The tenant the user belongs to.
    pub tenant: TenantId,
    /// Roles held.
    pub roles: BTreeSet<Role>,
    /// Permissions held.
    pub permissions: BTreeSet<Permission>,
    /// Settings and personal data, by name.
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// Company, partner and support relationships.
    pub relationships: Vec<Relationship>,
}

impl Principal {
    /// A principal with no roles, permissions, attributes or relationships.
    pub fn new(id: UserId, display_name: impl Into<String>, tenant: TenantId) -> Self {
        Self {
            id,
            display_name: display_name.into(),
            tenant,
            roles: BTreeSet::new(),
            permissions: BTreeSet::new(),
            attributes: BTreeMap::new(),
            relationships: Vec::new(),
        }
    }

    /// Adds a role.
    #[must_use]
    pub fn with_role(mut self, role: impl Into<Role>) -> Self {
        self.roles.insert(role.into());
        self
    }

    /// Adds a permission.
    #[must_use]
    pub fn with_permission(mut self, permission: impl Into<Permission>) -> Self {
        self.permissions.insert(permission.into());
        self
    }

    /// Adds several permissions.
    #[must_use]
    pub fn with_permissions<P: Into<Permission>>(
        mut self,
        permissions: impl IntoIterator<Item = P>,
    ) -> Self {
        self.permissions
            .extend(permissions.into_iter().map(Into::into));
        self
    }

    /// Sets an attribute.
    #[must_use]
    pub fn with_attribute(
        mut self,
        name: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }

    /// Adds a relationship.
    #[must_use]
    pub fn with_relationship(mut self, relationship: Relationship) -> Self {
        self.relationships.push(relationship);
        self
    }

    /// Whether the principal holds the permission.
    pub fn has_permission(&self, permission: &Permission) -> bool {
        self.permissions.contains(permission)
    }

    /// Whether the principal holds the role.
    pub fn has_role(&self, role: &Role) -> bool {
        self.roles.contains(role)
    }

    /// The name of the first company relationship, shown in the banner.
    pub fn company(&self) -> Option<&str> {
        self.relationships
            .iter()
            .find(|r| r.kind == RelationKind::Company)
            .map(|r| r.name.as_str())
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("id", &self.id)
            .field("display_name", &self.display_name)
            .field("tenant", &self.tenant)
            .field("roles", &self.roles)
            .field("permissions", &self.permissions)
            .field("attributes", &self.attributes.keys().collect::<Vec<_>>())
            .field("relationships", &self.relationships)
            .finish()
    }
}

/// The directory could not answer (its database is down, say). The SDK fails
/// closed on it: no request is served as an impersonated user it could not check.
#[derive(Debug, thiserror::Error)]
#[error("directory unavailable: {message}")]
pub struct DirectoryError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl DirectoryError {
    /// A directory error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// A directory error wrapping its cause.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// How the host app supplies principals. The SDK never owns users or
/// authentication; it asks the directory for the current truth about an
/// agent or a customer whenever a policy decision needs it.
#[async_trait]
pub trait Directory: Send + Sync {
    /// The principal with this id, or `None` if it does not exist (or is disabled).
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, DirectoryError>;
}

#[async_trait]
impl<D: Directory + ?Sized> Directory for Arc<D> {
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, DirectoryError> {
        (**self).principal(id).await
    }
}

/// A directory held in memory: for tests, demos and apps with a fixed staff list.
#[derive(Debug, Default, Clone)]
pub struct MemoryDirectory {
    principals: Arc<RwLock<BTreeMap<UserId, Principal>>>,
}

impl MemoryDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a principal.
    pub fn insert(&self, principal: Principal) {
        let mut map = self.principals.write().unwrap_or_else(|e| e.into_inner());
        map.insert(principal.id.clone(), principal);
    }

    /// Removes a principal (a disabled account).
    pub fn remove(&self, id: &UserId) -> Option<Principal> {
        let mut map = self.principals.write().unwrap_or_else(|e| e.into_inner());
        map.remove(id)
    }

    /// Changes a principal in place; returns whether it existed.
    pub fn update(&self, id: &UserId, change: impl FnOnce(&mut Principal)) -> bool {
        let mut map = self.principals.write().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(id) {
            Some(p) => {
                change(p);
                true
            }
            None => false,
        }
    }

    /// A copy of a principal.
    pub fn get(&self, id: &UserId) -> Option<Principal> {
        let map = self.principals.read().unwrap_or_else(|e| e.into_inner());
        map.get(id).cloned()
    }

    /// Every principal, ordered by id.
    pub fn all(&self) -> Vec<Principal> {
        let map = self.principals.read().unwrap_or_else(|e| e.into_inner());
        map.values().cloned().collect()
    }
}

#[async_trait]
impl Directory for MemoryDirectory {
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, DirectoryError> {
        Ok(self.get(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_with_wildcards() {
        let p = PermissionPattern::new("billing:*");
        assert!(p.matches(&Permission::new("billing:manage")));
        assert!(!p.matches(&Permission::new("bookings:read")));
        assert!(PermissionPattern::new("*:read").matches(&Permission::new("bookings:read")));
    }

    #[test]
    fn debug_of_a_principal_never_prints_attribute_values() {
        let p = Principal::new(UserId::from(1_u64), "Ann", TenantId::from(1_u64))
            .with_attribute("card_number", "4242424242424242");
        let shown = format!("{p:?}");
        assert!(shown.contains("card_number"));
        assert!(!shown.contains("4242"));
    }
}
