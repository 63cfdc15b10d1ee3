//! Every policy rule and every denial code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failed test

use std::collections::BTreeSet;

use impersonation_core::{
    Consent, Denial, Policy, PolicyContext, Principal, RelationKind, Relationship, SessionId,
    StartRequest, TenantId, Ticket, UserId,
};
use time::Duration;

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

fn agent() -> Principal {
    Principal::new(UserId::new("sam").unwrap(), "Sam", tenant("vendor"))
        .with_permissions(["impersonation:start", "bookings:read", "bookings:write"])
        .with_relationship(Relationship::new(
            RelationKind::Support,
            "s",
            "Support",
            [tenant("pinewood")],
        ))
}

fn customer() -> Principal {
    Principal::new(UserId::new("olive").unwrap(), "Olive", tenant("pinewood")).with_permissions([
        "bookings:read",
        "billing:manage",
        "export:all",
        "password:change",
    ])
}

fn request(target: &Principal) -> StartRequest {
    StartRequest::new(target.id.clone(), "Customer cannot see bookings")
}

fn decide(
    policy: &Policy,
    agent: &Principal,
    target: &Principal,
    req: &StartRequest,
) -> Result<(), Denial> {
    policy
        .authorize(agent, target, req, PolicyContext::default())
        .map(|_| ())
}

#[test]
fn an_ordinary_request_is_granted_with_the_policy_limits() {
    let policy = Policy::default()
        .max_duration(Duration::minutes(30))
        .idle_timeout(Duration::minutes(5));
    let grant = policy
        .authorize(
            &agent(),
            &customer(),
            &request(&customer()).ticket("SUP-1"),
            PolicyContext::default(),
        )
        .unwrap();
    assert_eq!(grant.reason.as_str(), "Customer cannot see bookings");
    assert_eq!(grant.ticket.as_ref().map(Ticket::as_str), Some("SUP-1"));
    assert_eq!(grant.duration, Duration::minutes(30));
    assert_eq!(grant.idle_timeout, Duration::minutes(5));
    assert_eq!(
        grant.permissions,
        agent().permissions,
        "by default the grant is the agent's own permissions"
    );
    assert!(!grant.read_only);
    assert_eq!(grant.consent_timeout, None);
}

#[test]
fn an_agent_without_the_impersonate_permission_is_refused() {
    let mut a = agent();
    a.permissions
        .retain(|p| p.as_str() != "impersonation:start");
    assert_eq!(
        decide(&Policy::default(), &a, &customer(), &request(&customer())),
        Err(Denial::MissingPermission)
    );
    let custom = Policy::default().impersonate_permission("support:impersonate");
    assert_eq!(
        decide(&custom, &agent(), &customer(), &request(&customer())),
        Err(Denial::MissingPermission)
    );
    let a = a.with_permission("support:impersonate");
    assert_eq!(
        decide(&custom, &a, &customer(), &request(&customer())),
        Ok(())
    );
}

#[test]
fn an_agent_cannot_impersonate_themself() {
    let a = agent();
    assert_eq!(
        decide(&Policy::default(), &a, &a, &request(&a)),
        Err(Denial::SelfImpersonation)
    );
}

#[test]
fn protected_roles_cannot_be_impersonated() {
    let admin = customer().with_role("admin");
    assert_eq!(
        decide(&Policy::default(), &agent(), &admin, &request(&admin)),
        Err(Denial::ProtectedRole)
    );
    let owner = customer().with_role("owner");
    assert_eq!(
        decide(&Policy::default(), &agent(), &owner, &request(&owner)),
        Ok(())
    );
    let policy = Policy::default().protect_role("owner");
    assert_eq!(
        decide(&policy, &agent(), &owner, &request(&owner)),
        Err(Denial::ProtectedRole)
    );
    // In any casing the host app gives its roles.
    for role in ["Admin", "ADMIN", "Owner"] {
        let held = customer().with_role(role);
        assert_eq!(
            decide(&policy, &agent(), &held, &request(&held)),
            Err(Denial::ProtectedRole),
            "{role}"
        );
    }
}

#[test]
fn other_agents_cannot_be_impersonated_by_default() {
    let other = customer().with_permission("impersonation:start");
    assert_eq!(
        decide(&Policy::default(), &agent(), &other, &request(&other)),
        Err(Denial::TargetIsAgent)
    );
    let admin_holder = customer().with_permission("impersonation:admin");
    assert_eq!(
        decide(
            &Policy::default(),
            &agent(),
            &admin_holder,
            &request(&admin_holder)
        ),
        Err(Denial::TargetIsAgent)
    );
    let a = agent().with_permission("impersonation:start");
    let other = other.clone();
    let policy = Policy::default().allow_impersonating_agents();
    assert_eq!(decide(&policy, &a, &other, &request(&other)), Ok(()));
}

/// An agent is one by any spelling the host may read as the impersonate
/// or admin permission: a wildcard (`impersonation:*`, `*`) or another
/// casing (`Impersonation:Admin`).
#[test]
fn agents_holding_wildcards_or_other_casings_are_agents_too() {
    for held in [
        "impersonation:*",
        "*",
        "Impersonation:Admin",
        "IMPERSONATION:START",
        "imp*:st?rt",
    ] {
        let admin = customer().with_permission(held);
        assert_eq!(
            decide(&Policy::default(), &agent(), &admin, &request(&admin)),
            Err(Denial::TargetIsAgent),
            "{held}"
        );
    }
    let wildcard_reader = customer().with_permission("bookings:*");
    assert_ne!(
        decide(
            &Policy::default(),
            &agent(),
            &wildcard_reader,
            &request(&wildcard_reader)
        ),
        Err(Denial::TargetIsAgent)
    );
}

/// A permission whose name is a wildcard (`*`, `bill*`) never reaches a
/// shadow user: an app may read it as one, and the deny list could not
/// tell what it covers.
#[test]
fn wildcard_permissions_never_reach_the_shadow_user() {
    use impersonation_core::ProjectionRules;

    let policy = Policy::default()
        .allow_privilege_escalation()
        .allow_impersonating_agents();
    let superuser = agent().with_permissions(["*", "bill*", "bookings:?ead"]);
    let owner = customer().with_permissions(["*", "bill*", "bookings:?ead"]);
    let grant = policy
        .authorize(
            &superuser,
            &owner,
            &request(&owner),
            PolicyContext::default(),
        )
        .unwrap();
    let shadow = ProjectionRules::new().project(&owner, &grant);
    let held: Vec<&str> = shadow.permissions().iter().map(|p| p.as_str()).collect();
    assert_eq!(held, ["bookings:read"]);
    // Never held, so no escalation either: an agent without `bill*` may
    // impersonate a customer with it.
    let wildcard_holder = customer().with_permission("bill*");
    assert_eq!(
        decide(
            &Policy::default(),
            &agent(),
            &wildcard_holder,
            &request(&wildcard_holder)
        ),
        Ok(())
    );
}

/// Where agents may be impersonated, an agent's permission held by the
/// target in another casing is no escalation: the shadow user never gets
/// it (the projection drops it ignoring case), so an agent without it
/// may impersonate them.
#[test]
fn the_sdks_own_permissions_in_another_casing_are_no_escalation() {
    // Names of the host's own, outside the `impersonation:*` the policy
    // always denies.
    let policy = Policy::default()
        .impersonate_permission("support.impersonate")
        .admin_permission("support.admin")
        .allow_impersonating_agents();
    let sam = agent().with_permission("support.impersonate");
    for held in ["Support.Admin", "SUPPORT.IMPERSONATE"] {
        let lead = customer().with_permission(held);
        assert_eq!(
            decide(&policy, &sam, &lead, &request(&lead)),
            Ok(()),
            "{held}"
        );
    }
}

/// Roles reach the shadow user as the customer holds them, but for those
/// the projection withholds (ignoring case): an app that checks a role
/// for billing sees the shadow user without it. Rules written before
/// roles could be withheld still read back.
#[test]
fn withheld_roles_never_reach_the_shadow_user() {
    use impersonation_core::{ProjectionRules, Role};

    let owner = customer().with_role("Billing_Admin").with_role("staff");
    let grant = Policy::default()
        .authorize(&agent(), &owner, &request(&owner), PolicyContext::default())
        .unwrap();
    let all = ProjectionRules::new().project(&owner, &grant);
    assert!(all.roles().contains(&Role::new("Billing_Admin")));
    let rules = ProjectionRules::new().withhold_role("billing_admin");
    let shadow = rules.project(&owner, &grant);
    let held: Vec<&str> = shadow.roles().iter().map(Role::as_str).collect();
    assert_eq!(held, ["staff"]);
    let old: ProjectionRules = serde_json::from_str(r#"{"rules":{}}"#).unwrap();
    assert_eq!(old, ProjectionRules::new());
    let again: ProjectionRules =
        serde_json::from_value(serde_json::to_value(&rules).unwrap()).unwrap();
    assert_eq!(again, rules);
}

#[test]
fn a_target_with_a_permission_the_agent_lacks_is_escalation() {
    let reporter = customer().with_permission("reports:run");
    assert_eq!(
        decide(&Policy::default(), &agent(), &reporter, &request(&reporter)),
        Err(Denial::Escalation)
    );
    let policy = Policy::default().allow_privilege_escalation();
    let grant = policy
        .authorize(
            &agent(),
            &reporter,
            &request(&reporter),
            PolicyContext::default(),
        )
        .unwrap();
    assert!(
        grant
            .permissions
            .iter()
            .any(|p| p.as_str() == "reports:run"),
        "opt-in escalation grants the target's permissions"
    );
}

#[test]
fn denied_permissions_do_not_count_as_escalation() {
    // The customer holds billing, export and password permissions the agent
    // lacks, but the shadow user never gets those, so nothing escalates.
    assert_eq!(
        decide(
            &Policy::default(),
            &agent(),
            &customer(),
            &request(&customer())
        ),
        Ok(())
    );
    let strict = Policy::default().denied_permissions(["billing:*"]);
    assert_eq!(
        decide(&strict, &agent(), &customer(), &request(&customer())),
        Err(Denial::Escalation)
    );
}

#[test]
fn tenants_are_crossed_only_through_partner_or_support_relationships() {
    let elsewhere = Principal::new(UserId::new("lake").unwrap(), "Lake", tenant("lakeside"))
        .with_permission("bookings:read");
    assert_eq!(
        decide(
            &Policy::default(),
            &agent(),
            &elsewhere,
            &request(&elsewhere)
        ),
        Err(Denial::TenantBoundary)
    );

    let partner = agent().with_relationship(Relationship::new(
        RelationKind::Partner,
        "parkco",
        "ParkCo",
        [tenant("lakeside")],
    ));
    assert_eq!(
        decide(
            &Policy::default(),
            &partner,
            &elsewhere,
            &request(&elsewhere)
        ),
        Ok(())
    );

    let company = agent().with_relationship(Relationship::new(
        RelationKind::Company,
        "c",
        "C",
        [tenant("lakeside")],
    ));
    assert_eq!(
        decide(
            &Policy::default(),
            &company,
            &elsewhere,
            &request(&elsewhere)
        ),
        Err(Denial::TenantBoundary)
    );

    let everywhere = agent().with_relationship(Relationship::all_tenants(
        RelationKind::Support,
        "vendor",
        "Vendor",
    ));
    assert_eq!(
        decide(
            &Policy::default(),
            &everywhere,
            &elsewhere,
            &request(&elsewhere)
        ),
        Ok(())
    );
    let partner_only = Policy::default().cross_tenant_kinds([RelationKind::Partner]);
    assert_eq!(
        decide(&partner_only, &everywhere, &elsewhere, &request(&elsewhere)),
        Err(Denial::TenantBoundary)
    );

    let same_tenant = Principal::new(
        UserId::new("colleague").unwrap(),
        "Colleague",
        tenant("vendor"),
    )
    .with_permission("bookings:read");
    let no_relationships = Principal {
        relationships: vec![],
        ..agent()
    };
    assert_eq!(
        decide(
            &Policy::default(),
            &no_relationships,
            &same_tenant,
            &request(&same_tenant)
        ),
        Ok(())
    );
}

#[test]
fn reasons_are_required_bounded_and_free_of_control_characters() {
    let c = customer();
    let with = |reason: &str| {
        decide(
            &Policy::default(),
            &agent(),
            &c,
            &StartRequest::new(c.id.clone(), reason),
        )
    };
    assert_eq!(with(""), Err(Denial::ReasonRequired));
    assert_eq!(
        with("   \t  ".trim_matches('\t')),
        Err(Denial::ReasonRequired)
    );
    assert_eq!(with("short"), Err(Denial::ReasonTooShort));
    assert_eq!(with(&"x".repeat(501)), Err(Denial::ReasonTooLong));
    assert_eq!(
        with(&"é".repeat(500)),
        Ok(()),
        "the bound counts characters, not bytes"
    );
    assert_eq!(
        with("Line one\nline two"),
        Err(Denial::ReasonInvalidCharacters)
    );
    assert_eq!(
        with("Looks fine \u{202E}txt.exe"),
        Err(Denial::ReasonInvalidCharacters)
    );
    assert_eq!(
        with("Null \u{0} byte here"),
        Err(Denial::ReasonInvalidCharacters)
    );
    // A line or paragraph separator breaks a line as a newline does.
    for separator in ['\u{2028}', '\u{2029}'] {
        assert_eq!(
            with(&format!("Line one{separator}line two")),
            Err(Denial::ReasonInvalidCharacters)
        );
    }
    // Invisible characters are no reason: they do not count.
    assert_eq!(with(&"\u{200B}".repeat(8)), Err(Denial::ReasonTooShort));
    assert_eq!(
        with("ab\u{200B}\u{200D}\u{2060}\u{FEFF}\u{AD}cd"),
        Err(Denial::ReasonTooShort)
    );
    assert_eq!(with("Fix the\u{AD}bookings"), Ok(()));
    // Nor do letters and symbols drawn blank.
    for blank in ['\u{115F}', '\u{1160}', '\u{3164}', '\u{FFA0}', '\u{2800}'] {
        assert_eq!(
            with(&blank.to_string().repeat(8)),
            Err(Denial::ReasonTooShort),
            "{blank:?}"
        );
    }
    // Nor do combining marks: one letter under seven accents is one.
    assert_eq!(
        with(&format!("a{}", "\u{301}".repeat(7))),
        Err(Denial::ReasonTooShort)
    );
    assert_eq!(with("Cafe\u{301} bookings vanish"), Ok(()));
    // The minimum counts letters and digits: punctuation, spaces and
    // symbols pad nothing up to it.
    for padded in [
        "........",
        "a.b.c.d.e.f.g",
        "- - - - - - - -",
        "?!?!?!?!",
        "Bug 1234",
        "★★★★★★★★",
        "ⒶⒷⒸⒹⒺⒻⒼⒽ",
        "①②③④⑤⑥⑦⑧",
        "½½½½ ²²²²",
    ] {
        assert_eq!(with(padded), Err(Denial::ReasonTooShort), "{padded:?}");
    }
    for enough in [
        "Bug 12345",
        "Ticket #4711",
        "預約在週末不見了的問題",
        "Бронь пропала",
    ] {
        assert_eq!(with(enough), Ok(()), "{enough:?}");
    }
    let lenient = Policy::default().reason_length(1, 20);
    assert_eq!(
        decide(
            &lenient,
            &agent(),
            &c,
            &StartRequest::new(c.id.clone(), "ok")
        ),
        Ok(())
    );
    assert_eq!(
        decide(
            &lenient,
            &agent(),
            &c,
            &StartRequest::new(c.id.clone(), "x".repeat(21))
        ),
        Err(Denial::ReasonTooLong)
    );
}

#[test]
fn tickets_are_validated_and_can_be_required() {
    let c = customer();
    let with = |policy: &Policy, ticket: Option<&str>| {
        let mut r = request(&c);
        r.ticket = ticket.map(str::to_owned);
        decide(policy, &agent(), &c, &r)
    };
    let p = Policy::default();
    assert_eq!(with(&p, None), Ok(()));
    assert_eq!(with(&p, Some("SUP-1042")), Ok(()));
    assert_eq!(with(&p, Some("#77/a.b:c_d")), Ok(()));
    assert_eq!(with(&p, Some("SUP 1042")), Err(Denial::TicketInvalid));
    assert_eq!(with(&p, Some("<script>")), Err(Denial::TicketInvalid));
    assert_eq!(with(&p, Some(&"9".repeat(65))), Err(Denial::TicketInvalid));
    let strict = Policy::default().require_ticket();
    assert_eq!(with(&strict, None), Err(Denial::TicketRequired));
    assert_eq!(with(&strict, Some("  ")), Err(Denial::TicketRequired));
    assert_eq!(with(&strict, Some("SUP-1")), Ok(()));
}

#[test]
fn nesting_is_refused_before_anything_else() {
    let context = PolicyContext {
        impersonating: true,
        live_session: None,
    };
    let mut a = agent();
    a.permissions.clear();
    assert_eq!(
        Policy::default()
            .authorize(&a, &a, &StartRequest::new(a.id.clone(), ""), context)
            .map(|_| ()),
        Err(Denial::Nesting)
    );
}

#[test]
fn a_live_session_refuses_a_second() {
    let context = PolicyContext {
        impersonating: false,
        live_session: Some(SessionId::new()),
    };
    let result = Policy::default().authorize(&agent(), &customer(), &request(&customer()), context);
    assert_eq!(result.map(|_| ()), Err(Denial::ActiveSessionExists));
}

#[test]
fn durations_beyond_the_maximum_or_not_positive_are_refused() {
    let c = customer();
    let policy = Policy::default().max_duration(Duration::minutes(30));
    let with = |d| decide(&policy, &agent(), &c, &request(&c).duration(d));
    assert_eq!(with(Duration::minutes(31)), Err(Denial::DurationNotAllowed));
    assert_eq!(with(Duration::ZERO), Err(Denial::DurationNotAllowed));
    assert_eq!(with(Duration::minutes(-1)), Err(Denial::DurationNotAllowed));
    let grant = policy
        .authorize(
            &agent(),
            &c,
            &request(&c).duration(Duration::minutes(10)),
            PolicyContext::default(),
        )
        .unwrap();
    assert_eq!(grant.duration, Duration::minutes(10));
}

/// A session's terms are stored in whole seconds (its grant as JSON): the
/// policy keeps its durations so, rounded up and at least one second, and
/// a grant reads back from storage as the process that made it held it.
#[test]
fn policy_durations_are_whole_seconds_of_at_least_one() {
    use impersonation_core::Consent;
    let ms = Duration::milliseconds;
    let policy = Policy::default()
        .max_duration(ms(90_500))
        .idle_timeout(ms(500))
        .consent(Consent::Required { timeout: ms(-3) });
    assert_eq!(policy.max_session_duration(), Duration::seconds(91));
    assert_eq!(policy.idle_timeout_duration(), Duration::SECOND);
    let (zero, negative) = (
        Policy::default().idle_timeout(Duration::ZERO),
        Policy::default().max_duration(Duration::minutes(-5)),
    );
    assert_eq!(zero.idle_timeout_duration(), Duration::SECOND);
    assert_eq!(negative.max_session_duration(), Duration::SECOND);

    let c = customer();
    let asked = request(&c).duration(ms(1_200));
    let grant = policy
        .authorize(&agent(), &c, &asked, PolicyContext::default())
        .unwrap();
    assert_eq!(grant.duration, Duration::seconds(2));
    assert_eq!(grant.idle_timeout, Duration::SECOND);
    assert_eq!(grant.consent_timeout, Some(Duration::SECOND));
    let stored = serde_json::to_string(&grant).unwrap();
    let read: impersonation_core::Grant = serde_json::from_str(&stored).unwrap();
    assert_eq!(
        (read.duration, read.idle_timeout, read.consent_timeout),
        (grant.duration, grant.idle_timeout, grant.consent_timeout)
    );
}

#[test]
fn scopes_narrow_the_grant_and_cannot_exceed_the_agent() {
    let c = customer();
    let narrow = policy_grant(&request(&c).scope(["bookings:read"])).unwrap();
    assert_eq!(narrow.permissions, BTreeSet::from(["bookings:read".into()]));
    assert_eq!(
        policy_grant(&request(&c).scope(["reports:run"])).map(|_| ()),
        Err(Denial::ScopeExceedsAgent)
    );
}

fn policy_grant(req: &StartRequest) -> Result<impersonation_core::Grant, Denial> {
    Policy::default().authorize(&agent(), &customer(), req, PolicyContext::default())
}

#[test]
fn read_only_can_be_asked_for_or_forced() {
    let c = customer();
    assert!(policy_grant(&request(&c).read_only()).unwrap().read_only);
    let forced = Policy::default().read_only_always();
    assert!(
        forced
            .authorize(&agent(), &c, &request(&c), PolicyContext::default())
            .unwrap()
            .read_only
    );
}

#[test]
fn consent_puts_a_window_in_the_grant() {
    let policy = Policy::default().consent(Consent::Required {
        timeout: Duration::minutes(10),
    });
    let grant = policy
        .authorize(
            &agent(),
            &customer(),
            &request(&customer()),
            PolicyContext::default(),
        )
        .unwrap();
    assert_eq!(grant.consent_timeout, Some(Duration::minutes(10)));
}

#[test]
fn impersonation_permissions_stay_denied_whatever_the_configuration() {
    let policy = Policy::default().denied_permissions(Vec::<&str>::new());
    assert!(
        policy
            .denied_permission_patterns()
            .iter()
            .any(|p| p.as_str() == "impersonation:*")
    );
}

/// Renamed impersonate and admin permissions are still never granted to
/// a shadow user: an agent impersonating another agent cannot impersonate
/// (or revoke) as them.
#[test]
fn renamed_impersonation_permissions_stay_denied_to_the_shadow_user() {
    use impersonation_core::ProjectionRules;

    let policy = Policy::default()
        .impersonate_permission("support:impersonate")
        .admin_permission("support:admin")
        .allow_impersonating_agents();
    let lead = agent().with_permissions(["support:impersonate", "support:admin"]);
    let tier1 = Principal::new(UserId::new("tim").unwrap(), "Tim", tenant("pinewood"))
        .with_permissions(["support:impersonate", "support:admin", "bookings:read"]);
    let grant = policy
        .authorize(&lead, &tier1, &request(&tier1), PolicyContext::default())
        .unwrap();
    let shadow = ProjectionRules::new().project(&tier1, &grant);
    let held: Vec<&str> = shadow.permissions().iter().map(|p| p.as_str()).collect();
    assert_eq!(held, ["bookings:read"]);
}

/// The customer's relationships go to the shadow user: a target whose
/// relationships reach a tenant the agent cannot reach is refused, as the
/// target's own tenant would be.
#[test]
fn a_target_reaching_tenants_beyond_the_agents_is_refused() {
    // The agent reaches pinewood (support) and vendor (their own tenant).
    let partner_of = |scope: Relationship| {
        Principal::new(UserId::new("paula").unwrap(), "Paula", tenant("pinewood"))
            .with_permission("bookings:read")
            .with_relationship(scope)
    };
    let parkco = |tenants: &[&str]| {
        Relationship::new(
            RelationKind::Partner,
            "parkco",
            "ParkCo",
            tenants.iter().map(|t| tenant(t)),
        )
    };
    let within = partner_of(parkco(&["pinewood", "vendor"]));
    assert_eq!(
        decide(&Policy::default(), &agent(), &within, &request(&within)),
        Ok(())
    );
    let beyond = partner_of(parkco(&["pinewood", "lakeside"]));
    assert_eq!(
        decide(&Policy::default(), &agent(), &beyond, &request(&beyond)),
        Err(Denial::TenantBoundary)
    );
    let everywhere = partner_of(Relationship::all_tenants(
        RelationKind::Other("franchise".into()),
        "fr",
        "Franchise",
    ));
    assert_eq!(
        decide(
            &Policy::default(),
            &agent(),
            &everywhere,
            &request(&everywhere)
        ),
        Err(Denial::TenantBoundary)
    );
    // An agent who reaches those tenants may impersonate either.
    let lakeside_too = agent().with_relationship(parkco(&["lakeside"]));
    assert_eq!(
        decide(
            &Policy::default(),
            &lakeside_too,
            &beyond,
            &request(&beyond)
        ),
        Ok(())
    );
    let support_everywhere = agent().with_relationship(Relationship::all_tenants(
        RelationKind::Support,
        "vendor",
        "Vendor",
    ));
    for target in [&beyond, &everywhere] {
        assert_eq!(
            decide(
                &Policy::default(),
                &support_everywhere,
                target,
                &request(target)
            ),
            Ok(())
        );
    }
    // Reaching counts only through the kinds that may cross tenants.
    let company_wide =
        agent().with_relationship(Relationship::all_tenants(RelationKind::Company, "c", "C"));
    assert_eq!(
        decide(
            &Policy::default(),
            &company_wide,
            &everywhere,
            &request(&everywhere)
        ),
        Err(Denial::TenantBoundary)
    );
}

/// Denied patterns ignore case: a host app that spells its permissions
/// `Billing:Manage` gets the same protection as one that spells them
/// `billing:manage`.
#[test]
fn denied_patterns_match_whatever_the_casing() {
    use impersonation_core::ProjectionRules;

    let shouting = Principal::new(UserId::new("olga").unwrap(), "Olga", tenant("pinewood"))
        .with_permissions(["Bookings:Read", "Billing:Manage", "PASSWORD:CHANGE"]);
    let agent = agent().with_permissions(["Bookings:Read", "Billing:Manage", "PASSWORD:CHANGE"]);
    let grant = Policy::default()
        .authorize(
            &agent,
            &shouting,
            &request(&shouting),
            PolicyContext::default(),
        )
        .unwrap();
    let shadow = ProjectionRules::new().project(&shouting, &grant);
    let held: Vec<&str> = shadow.permissions().iter().map(|p| p.as_str()).collect();
    assert_eq!(held, ["Bookings:Read"]);
}

/// The default list holds each sensitive family however an app spells
/// it, singular or plural: `credential:rotate` is as much a credential
/// permission as `credentials:read`.
#[test]
fn default_denials_cover_singular_and_plural_families() {
    use impersonation_core::ProjectionRules;

    let sensitive = [
        "billing:manage",
        "password:change",
        "passwords:reset",
        "credential:rotate",
        "credentials:read",
        "mfa:reset",
        "export:all",
        "exports:csv",
        "impersonation:start",
    ];
    let holder = Principal::new(UserId::new("olga").unwrap(), "Olga", tenant("pinewood"))
        .with_permission("bookings:read")
        .with_permissions(sensitive);
    let agent = agent().with_permissions(sensitive);
    let grant = Policy::default()
        .allow_impersonating_agents()
        .authorize(&agent, &holder, &request(&holder), PolicyContext::default())
        .unwrap();
    let shadow = ProjectionRules::new().project(&holder, &grant);
    let held: Vec<&str> = shadow.permissions().iter().map(|p| p.as_str()).collect();
    assert_eq!(held, ["bookings:read"]);
}

#[test]
fn every_denial_has_a_unique_stable_code() {
    let codes: BTreeSet<&str> = Denial::ALL.iter().map(Denial::code).collect();
    assert_eq!(codes.len(), Denial::ALL.len());
    for denial in Denial::ALL {
        let json = serde_json::to_string(&denial).unwrap();
        assert_eq!(
            json,
            format!("\"{}\"", denial.code()),
            "serde and code() agree"
        );
        assert!(!denial.to_string().is_empty());
    }
    // Codes are API: renaming one is a breaking change this test makes loud.
    assert_eq!(Denial::Escalation.code(), "escalation");
    assert_eq!(Denial::TenantBoundary.code(), "tenant_boundary");
    assert_eq!(Denial::ActiveSessionExists.code(), "active_session_exists");
}

#[test]
fn rules_apply_in_a_fixed_order() {
    // A request breaking several rules always gets the first in policy order.
    let admin_agent_elsewhere = Principal::new(UserId::new("x").unwrap(), "X", tenant("far"))
        .with_role("admin")
        .with_permission("impersonation:start")
        .with_permission("reports:run");
    let c = admin_agent_elsewhere.clone();
    assert_eq!(
        decide(
            &Policy::default(),
            &agent(),
            &c,
            &StartRequest::new(c.id.clone(), "")
        ),
        Err(Denial::ProtectedRole)
    );
}

/// A policy without practical bounds (`Duration::MAX` for "unlimited")
/// gives sessions whose clocks saturate at the latest date rather than
/// overflow: beginning, consenting and checking for a lapse never panic.
#[test]
fn durations_as_long_as_time_allows_saturate_the_session_clock() {
    use impersonation_core::{Actor, Consent};
    use impersonation_testkit::{World, epoch};

    let w = World::new();
    let (agent, customer) = (w.agent(1), w.customer(1, "t1"));
    let unbounded = Policy::default()
        .max_duration(Duration::MAX)
        .idle_timeout(Duration::MAX);
    let (start, _) = w.begin_with(&unbounded, &agent, &customer, epoch());
    let session = start.session();
    // Asking for as long as the policy allows fits it.
    let all = StartRequest::new(customer.id.clone(), "Customer reported a broken page")
        .duration(Duration::MAX);
    let grant = unbounded
        .authorize(&agent, &customer, &all, PolicyContext::default())
        .unwrap();
    assert_eq!(grant.duration, unbounded.max_session_duration());
    let far = epoch() + Duration::days(365 * 5000);
    assert!(session.expires_at > far && session.idle_deadline() > far);
    assert_eq!(session.lapse_at(far), None);

    let consent = unbounded.consent(Consent::Required {
        timeout: Duration::MAX,
    });
    let (start, _) = w.begin_with(&consent, &agent, &customer, epoch());
    let pending = start.session();
    assert!(pending.expires_at > far);
    let activated = pending
        .activate(Actor::user(customer.id.clone(), "Customer 1"), far)
        .unwrap();
    assert!(activated.next().expires_at > far);
}
