//! Fixtures: a small world of agents and customers under a unique namespace,
//! so tests sharing one store (one database) never see each other's rows.

use impersonation_core::{
    AttributeRule, Begin, Mask, PersonRef, Policy, PolicyContext, Principal, ProjectionRules,
    RelationKind, Relationship, Session, SessionSecret, Start, StartRequest, TenantId, UserId,
};
use time::OffsetDateTime;

/// A namespaced set of people, with the policy and projection rules tests use.
#[derive(Debug, Clone)]
pub struct World {
    /// Prefix of every id in this world.
    pub ns: String,
    /// The policy.
    pub policy: Policy,
    /// The projection rules.
    pub rules: ProjectionRules,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// The instant tests start at (a fixed one keeps failures reproducible).
pub fn epoch() -> OffsetDateTime {
    time::macros::datetime!(2024-11-06 10:15 UTC)
}

impl World {
    /// A world with a fresh random namespace.
    pub fn new() -> Self {
        // The tail of a v7 UUID is random; its head is the clock, shared by
        // worlds made in the same millisecond.
        let ns = format!("w{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        Self {
            ns,
            policy: Policy::default(),
            rules: ProjectionRules::new()
                .rule("timezone", AttributeRule::Copy)
                .rule("card_number", AttributeRule::Mask(Mask::default()))
                .rule("email", AttributeRule::Redact),
        }
    }

    /// A user id in this world.
    pub fn user(&self, name: &str) -> UserId {
        UserId::new(format!("{}-{name}", self.ns)).unwrap_or_else(|_| UserId::from(0_u64))
    }

    /// A tenant id in this world.
    pub fn tenant(&self, name: &str) -> TenantId {
        TenantId::new(format!("{}-{name}", self.ns)).unwrap_or_else(|_| TenantId::from(0_u64))
    }

    /// Support agent number `n`, covering every tenant.
    pub fn agent(&self, n: u32) -> Principal {
        Principal::new(
            self.user(&format!("agent{n}")),
            format!("Agent {n}"),
            self.tenant("vendor"),
        )
        .with_permissions([
            "impersonation:start",
            "bookings:read",
            "bookings:write",
            "settings:read",
            "settings:write",
        ])
        .with_relationship(Relationship::all_tenants(
            RelationKind::Support,
            "support",
            "Vendor Support",
        ))
    }

    /// Customer number `n` of tenant `tenant`.
    pub fn customer(&self, n: u32, tenant: &str) -> Principal {
        let t = self.tenant(tenant);
        Principal::new(
            self.user(&format!("customer{n}")),
            format!("Customer {n}"),
            t.clone(),
        )
        .with_permissions([
            "bookings:read",
            "bookings:write",
            "settings:read",
            "billing:manage",
            "credential:rotate",
            "passwords:reset",
            "mfa:reset",
            "exports:csv",
        ])
        .with_attribute("timezone", "Europe/Lisbon")
        .with_attribute("card_number", "4000123456789010")
        .with_attribute("email", format!("customer{n}@example.com"))
        .with_attribute("password_hash", "$argon2id$v=19$secret")
        .with_relationship(Relationship::new(
            RelationKind::Company,
            format!("co-{tenant}"),
            format!("Company {tenant}"),
            [t],
        ))
    }

    /// A `Start` for `agent` on `customer` at `now`, with its secret, built
    /// the way the service builds it (policy, projection, fresh secret).
    pub fn begin(
        &self,
        agent: &Principal,
        customer: &Principal,
        now: OffsetDateTime,
    ) -> (Start, SessionSecret) {
        self.begin_with(&self.policy, agent, customer, now)
    }

    /// As [`World::begin`] with another policy (consent, shorter durations).
    pub fn begin_with(
        &self,
        policy: &Policy,
        agent: &Principal,
        customer: &Principal,
        now: OffsetDateTime,
    ) -> (Start, SessionSecret) {
        let request =
            StartRequest::new(customer.id.clone(), "Customer cannot see bookings").ticket("SUP-1");
        let grant = match policy.authorize(agent, customer, &request, PolicyContext::default()) {
            Ok(grant) => grant,
            Err(denial) => panic!("fixture policy refused the fixture pair: {denial:?}"),
        };
        let shadow = self.rules.project(customer, &grant);
        let chain = impersonation_core::ChainKey::for_agent(&agent.id);
        let secret = match SessionSecret::generate(&chain) {
            Ok(secret) => secret,
            Err(e) => panic!("random source failed: {e}"),
        };
        let start = Session::begin(
            Begin {
                agent: person(agent),
                subject: person(customer),
                grant,
                shadow,
                secret_hash: secret.hash(),
            },
            now,
        );
        (start, secret)
    }
}

/// A principal as a session names it.
pub fn person(p: &Principal) -> PersonRef {
    PersonRef {
        id: p.id.clone(),
        name: p.display_name.as_str().into(),
        tenant: p.tenant.clone(),
    }
}
