//! The seeded world: three campgrounds, a partner company managing two of
//! them, their owners and staff, two support agents (ordinary and lead) and
//! a platform admin nobody may impersonate.

use impersonation_core::{
    AttributeRule, IdError, Mask, MemoryDirectory, Policy, Principal, ProjectionRules,
    RelationKind, Relationship, TenantId, UserId,
};

/// A campground (a tenant of the SaaS).
#[derive(Debug, Clone)]
pub struct Campground {
    /// Tenant id.
    pub tenant: &'static str,
    /// Display name.
    pub name: &'static str,
}

/// The campgrounds.
pub const CAMPGROUNDS: [Campground; 3] = [
    Campground {
        tenant: "pinewood",
        name: "Pinewood Campground",
    },
    Campground {
        tenant: "lakeside",
        name: "Lakeside RV Park",
    },
    Campground {
        tenant: "redrock",
        name: "Red Rock Camp",
    },
];

/// A booking on a campground's dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    /// Guest name.
    pub guest: String,
    /// Pitch or site.
    pub site: String,
    /// Arrival date (ISO).
    pub arrival: String,
    /// Nights.
    pub nights: u32,
}

/// The bookings each campground starts with.
pub fn bookings(tenant: &str) -> Vec<Booking> {
    let rows: &[(&str, &str, &str, u32)] = match tenant {
        "pinewood" => &[
            ("Hansen family", "Pitch 12", "2026-12-04", 3),
            ("J. Okafor", "Cabin 2", "2026-12-11", 2),
            ("Scout troop 41", "Group field", "2026-12-18", 4),
        ],
        "lakeside" => &[
            ("M. Rossi", "RV 7", "2026-12-02", 7),
            ("The Parks", "RV 3", "2026-12-20", 5),
        ],
        "redrock" => &[("A. Nakamura", "Tent 5", "2026-12-06", 2)],
        _ => &[],
    };
    rows.iter()
        .map(|(guest, site, arrival, nights)| Booking {
            guest: (*guest).into(),
            site: (*site).into(),
            arrival: (*arrival).into(),
            nights: *nights,
        })
        .collect()
}

const OWNER: [&str; 7] = [
    "bookings:read",
    "bookings:write",
    "settings:read",
    "settings:write",
    "billing:manage",
    "password:change",
    "export:bookings",
];

fn company(id: &str, name: &str, tenant: &TenantId) -> Relationship {
    Relationship::new(RelationKind::Company, id, name, [tenant.clone()])
}

fn customer(
    id: &str,
    name: &str,
    tenant: &TenantId,
    email: &str,
    card: Option<&str>,
) -> Result<Principal, IdError> {
    let mut p = Principal::new(UserId::new(id)?, name, tenant.clone())
        .with_attribute("timezone", "Europe/Lisbon")
        .with_attribute("language", "en-GB")
        .with_attribute("email", email)
        .with_attribute("phone", "+351 912 345 678")
        .with_attribute(
            "password_hash",
            "$argon2id$v=19$m=19456,t=2,p=1$ZGVtby1zYWx0$ZGVtby1oYXNo",
        );
    if let Some(card) = card {
        p = p.with_attribute("card_number", card);
    }
    Ok(p)
}

/// Everyone the demo seeds, in the order the sign-in picker shows them.
pub fn people() -> Result<Vec<Principal>, IdError> {
    let pinewood = TenantId::new("pinewood")?;
    let lakeside = TenantId::new("lakeside")?;
    let redrock = TenantId::new("redrock")?;
    let parkco = TenantId::new("parkco")?;
    let platform = TenantId::new("platform")?;
    let support = Relationship::all_tenants(RelationKind::Support, "campsoft", "CampSoft Support");
    // ParkCo manages Pinewood and Lakeside: its people work across both;
    // each campground's own people see only that it is managed by ParkCo.
    let managed_by = |tenant: &TenantId| {
        Relationship::new(
            RelationKind::Partner,
            "parkco",
            "ParkCo Management",
            [tenant.clone()],
        )
    };
    let manages = Relationship::new(
        RelationKind::Partner,
        "parkco",
        "ParkCo Management",
        [pinewood.clone(), lakeside.clone()],
    );
    Ok(vec![
        customer(
            "olive",
            "Olive Owner",
            &pinewood,
            "olive@pinewood.example",
            Some("4242 4242 4242 4242"),
        )?
        .with_role("owner")
        .with_permissions(OWNER)
        .with_relationship(company("pinewood-ltd", "Pinewood Campground", &pinewood))
        .with_relationship(managed_by(&pinewood)),
        customer(
            "stan",
            "Stan Staff",
            &pinewood,
            "stan@pinewood.example",
            None,
        )?
        .with_role("staff")
        .with_permissions([
            "bookings:read",
            "bookings:write",
            "settings:read",
            "password:change",
        ])
        .with_relationship(company("pinewood-ltd", "Pinewood Campground", &pinewood)),
        customer(
            "lena",
            "Lena Lakes",
            &lakeside,
            "lena@lakeside.example",
            Some("5555 5555 5555 4444"),
        )?
        .with_role("owner")
        .with_permissions(OWNER)
        .with_relationship(company("lakeside-rv", "Lakeside RV Park", &lakeside))
        .with_relationship(managed_by(&lakeside)),
        customer(
            "rosa",
            "Rosa Rock",
            &redrock,
            "rosa@redrock.example",
            Some("3782 822463 10005"),
        )?
        .with_role("owner")
        .with_permissions(OWNER)
        .with_relationship(company("redrock-camp", "Red Rock Camp", &redrock)),
        customer(
            "paula",
            "Paula Partner",
            &parkco,
            "paula@parkco.example",
            None,
        )?
        .with_role("partner")
        .with_permissions([
            "bookings:read",
            "settings:read",
            "reports:read",
            "password:change",
        ])
        .with_relationship(company("parkco", "ParkCo Management", &parkco))
        .with_relationship(manages),
        Principal::new(UserId::new("sam")?, "Sam Support", platform.clone())
            .with_role("support")
            .with_permissions([
                "impersonation:start",
                "bookings:read",
                "bookings:write",
                "settings:read",
                "settings:write",
            ])
            .with_relationship(support.clone()),
        Principal::new(UserId::new("lee")?, "Lee Lead", platform.clone())
            .with_role("support-lead")
            .with_permissions([
                "impersonation:start",
                "impersonation:admin",
                "bookings:read",
                "bookings:write",
                "settings:read",
                "settings:write",
                "reports:read",
            ])
            .with_relationship(support.clone()),
        Principal::new(UserId::new("ada")?, "Ada Admin", platform)
            .with_role("admin")
            .with_permissions([
                "impersonation:admin",
                "bookings:read",
                "bookings:write",
                "settings:read",
                "settings:write",
                "reports:read",
                "billing:manage",
            ])
            .with_relationship(support),
    ])
}

/// One line per seeded person, for the console and the sign-in page.
pub fn describe(p: &Principal) -> String {
    let role = p
        .roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let place = p.company().unwrap_or(p.tenant.as_str());
    match role.as_str() {
        "support" => "support agent (ordinary): staff and owners, not partners".into(),
        "support-lead" => "support lead: every customer, partners included (not agents or admins); sees and revokes every session".into(),
        "admin" => "platform admin: protected, nobody may impersonate her".into(),
        _ => format!("{role} at {place}"),
    }
}

/// A directory holding [`people`].
pub fn directory() -> Result<MemoryDirectory, IdError> {
    let directory = MemoryDirectory::new();
    for p in people()? {
        directory.insert(p);
    }
    Ok(directory)
}

/// The demo's policy: the SDK defaults (admins protected, agents not
/// impersonable, no escalation, billing/password/credentials/export never in
/// the shadow user, one hour at most, 15 minutes idle).
pub fn policy() -> Policy {
    Policy::default()
}

/// What the shadow user keeps of a customer: settings copied, the card
/// masked, contact data redacted; everything else (the password hash) dropped.
pub fn projection() -> ProjectionRules {
    ProjectionRules::new()
        .rule("timezone", AttributeRule::Copy)
        .rule("language", AttributeRule::Copy)
        .rule("card_number", AttributeRule::Mask(Mask::default()))
        .rule("email", AttributeRule::Redact)
        .rule("phone", AttributeRule::Redact)
}
