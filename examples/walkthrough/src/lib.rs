//! The demo's story in the terminal, on the core API alone and the
//! in-memory store (`cargo run -p impersonation-walkthrough`; `cargo xtask
//! demo --walkthrough` plays it over HTTP against the demo app). A support
//! agent impersonates a campground owner with a reason; the shadow user is
//! shown beside the real customer; actions are audited; the billing page,
//! a session started from inside one, and an attempt on the platform
//! admin are refused; the agent stops; the audit table is printed and
//! every chain verified.

use std::io::Write;

use anyhow::{Context as _, Result, bail};
use impersonation_core::{
    Activity, AttributeRule, AuditQuery, Denial, Error, Impersonation, ManualClock, Mask,
    MemoryDirectory, MemoryStore, Principal, ProjectionRules, RelationKind, Relationship,
    Requester, ShadowValue, StartRequest, TenantId, UserId, table_timestamp, to_table,
};
use time::{Duration, OffsetDateTime};

fn people() -> Result<Vec<Principal>> {
    let pinewood = TenantId::new("pinewood")?;
    let lakeside = TenantId::new("lakeside")?;
    let platform = TenantId::new("platform")?;
    let vendor_support = Relationship::all_tenants(
        RelationKind::Support,
        "campsoft-support",
        "CampSoft Support",
    );
    Ok(vec![
        Principal::new(UserId::new("olive")?, "Olive Owner", pinewood.clone())
            .with_role("owner")
            .with_permissions([
                "bookings:read",
                "bookings:write",
                "settings:read",
                "settings:write",
                "billing:manage",
                "export:bookings",
            ])
            .with_attribute("timezone", "Europe/Lisbon")
            .with_attribute("language", "pt-PT")
            .with_attribute("card_number", "4242 4242 4242 4242")
            .with_attribute("email", "olive@pinewood.example")
            .with_attribute(
                "password_hash",
                "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
            )
            .with_relationship(Relationship::new(
                RelationKind::Company,
                "pinewood-ltd",
                "Pinewood Campground",
                [pinewood.clone()],
            ))
            .with_relationship(Relationship::new(
                RelationKind::Partner,
                "parkco",
                "ParkCo Management",
                [pinewood, lakeside],
            )),
        Principal::new(UserId::new("sam")?, "Sam Support", platform.clone())
            .with_role("support")
            .with_permissions([
                "impersonation:start",
                "bookings:read",
                "bookings:write",
                "settings:read",
                "settings:write",
            ])
            .with_relationship(vendor_support.clone()),
        Principal::new(UserId::new("ada")?, "Ada Admin", platform)
            .with_role("admin")
            .with_permissions(["impersonation:admin", "bookings:read", "settings:write"])
            .with_relationship(vendor_support),
    ])
}

fn show(value: Option<&serde_json::Value>) -> String {
    match value {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "-".into(),
    }
}

fn shown(value: Option<&ShadowValue>) -> String {
    match value {
        Some(ShadowValue::Copied(v)) => show(Some(v)),
        Some(ShadowValue::Masked(m)) => format!("{m}  (masked)"),
        Some(ShadowValue::Redacted) => "[redacted]".into(),
        None => "(dropped)".into(),
    }
}

fn styled(color: bool, text: &str, ansi: &str) -> String {
    if color {
        format!("\x1b[{ansi}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

fn step(out: &mut impl Write, color: bool, n: u32, title: &str) -> Result<()> {
    writeln!(out, "\n{}", styled(color, &format!("{n}. {title}"), "1"))?;
    Ok(())
}

/// Runs the walkthrough, writing it to `out`. `color` adds ANSI emphasis.
pub async fn run(out: &mut impl Write, color: bool) -> Result<()> {
    let directory = MemoryDirectory::new();
    for p in people()? {
        directory.insert(p);
    }
    let get = |id: &str| -> Result<Principal> {
        directory
            .get(&UserId::new(id)?)
            .with_context(|| format!("{id} is seeded"))
    };
    let (olive, sam, ada) = (get("olive")?, get("sam")?, get("ada")?);

    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let rules = ProjectionRules::new()
        .rule("timezone", AttributeRule::Copy)
        .rule("language", AttributeRule::Copy)
        .rule("card_number", AttributeRule::Mask(Mask::default()))
        .rule("email", AttributeRule::Redact);
    let service = Impersonation::new(MemoryStore::new(), directory.clone())
        .with_projection(rules)
        .with_clock(clock.clone());

    writeln!(out, "impersonation: walkthrough on the in-memory store")?;
    writeln!(
        out,
        "People: Olive Owner (owner of Pinewood Campground), Sam Support (support agent), Ada Admin (platform admin)."
    )?;

    step(
        out,
        color,
        1,
        "Sam starts impersonating Olive, with a reason and a ticket",
    )?;
    let started = service
        .start(
            Requester::User(&sam),
            StartRequest::new(olive.id.clone(), "Olive cannot see next week's bookings")
                .ticket("SUP-1042"),
        )
        .await?;
    writeln!(
        out,
        "   session {} ({}), ends at the latest {}",
        started.session.id,
        started.session.state,
        table_timestamp(started.session.expires_at)
    )?;
    writeln!(
        out,
        "   bearer secret handed to Sam's browser: {} (only its hash is stored)",
        started.secret
    )?;
    let ctx = service.resolve(&started.secret).await?;
    let banner = ctx.banner(service.now());
    writeln!(
        out,
        "   banner: {}  reason: {}  time left before idle timeout: {}",
        styled(color, &format!(" {} ", banner.message()), "43;30"),
        banner.reason,
        banner.time_left()
    )?;

    step(out, color, 2, "The shadow user beside the real customer")?;
    writeln!(
        out,
        "   {:<14} {:<48} shadow user (what Sam sees)",
        "attribute", "Olive (real)"
    )?;
    for name in olive.attributes.keys() {
        writeln!(
            out,
            "   {:<14} {:<48} {}",
            name,
            show(olive.attributes.get(name)),
            shown(ctx.shadow().attribute(name))
        )?;
    }
    let perms = |it: &mut dyn Iterator<Item = &impersonation_core::Permission>| {
        it.map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
    };
    writeln!(
        out,
        "   permissions, real:   {}",
        perms(&mut olive.permissions.iter())
    )?;
    writeln!(
        out,
        "   permissions, shadow: {}",
        perms(&mut ctx.shadow().permissions().iter())
    )?;
    writeln!(
        out,
        "   relationships kept:  {}",
        ctx.shadow()
            .relationships()
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        out,
        "   the real agent stays reachable: {} ({})",
        ctx.agent().name,
        ctx.agent().id
    )?;

    step(
        out,
        color,
        3,
        "Sam works as Olive: every access and change is recorded",
    )?;
    clock.advance(Duration::minutes(3));
    let ctx = service.resolve(&started.secret).await?;
    service
        .record(
            &ctx,
            Activity::access("Accessed account settings.")
                .detail("route", "/settings")
                .detail("status", 200),
        )
        .await?;
    clock.advance(Duration::minutes(4));
    let ctx = service.resolve(&started.secret).await?;
    service
        .record(
            &ctx,
            Activity::modification("Updated booking #2231 dates.")
                .detail("route", "/bookings/{id}")
                .detail("status", 303),
        )
        .await?;
    writeln!(out, "   recorded: settings viewed, booking #2231 updated")?;

    step(
        out,
        color,
        4,
        "Refused: the billing page, nesting, and the platform admin",
    )?;
    clock.advance(Duration::minutes(1));
    let ctx = service.resolve(&started.secret).await?;
    // What an app's guard does for its billing route: the shadow user
    // holds no billing permission (the policy's default denials), and
    // the attempt goes on the trail.
    let billing = impersonation_core::Permission::new("billing:manage");
    if ctx.shadow().has_permission(&billing) {
        bail!("the shadow user holds billing:manage");
    }
    let refusal = match service
        .record_denied(&ctx, Denial::SensitiveAction, "GET /billing")
        .await?
    {
        e @ Error::Denied(Denial::SensitiveAction) => e,
        other => bail!("the billing page was not refused as sensitive: {other:?}"),
    };
    writeln!(
        out,
        "   billing page while impersonating -> {refusal} (the shadow user has no billing:manage)"
    )?;
    match service
        .start(
            Requester::Impersonating(&ctx),
            StartRequest::new(ada.id.clone(), "Need to check admin settings"),
        )
        .await
    {
        Err(e @ Error::Denied(Denial::Nesting)) => writeln!(
            out,
            "   start from inside the session   -> {e} ({})",
            e.code()
        )?,
        other => bail!("a nested session was not refused as nesting: {other:?}"),
    }
    match service
        .start(
            Requester::User(&sam),
            StartRequest::new(ada.id.clone(), "Need to check admin settings"),
        )
        .await
    {
        Err(e @ Error::Denied(Denial::ProtectedRole)) => {
            writeln!(
                out,
                "   Sam impersonating Ada Admin     -> {e} ({})",
                e.code()
            )?;
        }
        other => bail!("impersonating the admin was not refused: {other:?}"),
    }

    step(out, color, 5, "Sam stops; the secret no longer works")?;
    clock.advance(Duration::minutes(2));
    service.stop(&started.secret, &sam).await?;
    match service.resolve(&started.secret).await {
        Err(e) => writeln!(
            out,
            "   resolve after stop -> {e} (HTTP {})",
            e.http_status()
        )?,
        Ok(_) => bail!("the session outlived its stop"),
    }

    step(out, color, 6, "The audit trail")?;
    let page = service
        .audit(&AuditQuery {
            limit: 1_000,
            ..AuditQuery::default()
        })
        .await?;
    writeln!(out, "{}", to_table(&page.events))?;
    let report = service.verify_all().await?;
    if !report.is_ok() {
        bail!(
            "the audit trail did not verify: chains {:?}, listing {:?}",
            report.broken,
            report.listing
        );
    }
    writeln!(
        out,
        "chain verified: {} chain(s), {} events, SHA-256 linked",
        report.verified.len(),
        report.events()
    )?;
    Ok(())
}
