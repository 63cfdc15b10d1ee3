//! The `Impersonation` service end to end on `MemoryStore`: authority rules,
//! lapses, re-checks, consent, read-only, fail-closed behaviour and secrecy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failed test

use std::sync::Arc;

use async_trait::async_trait;
use impersonation_core::{
    Activity, ActivityKind, AttributeRule, AuditAction, AuditEvent, AuditQuery, ChainKey, Config,
    Consent, Denial, Directory, DirectoryError, EndReason, Error, Impersonation, Initiator,
    ListingMismatch, LiveFilter, ManualClock, Mask, MemoryDirectory, MemoryStore, Permission,
    Policy, Principal, ProjectionRules, RelationKind, Relationship, Requester, SessionState,
    ShadowValue, StartRequest, Started, Store, TenantId, TransitionError, UserId, verify_chain,
};
use impersonation_testkit::conformance::{all_events, whole_chain};
use impersonation_testkit::epoch;
use impersonation_testkit::faults::{Calls, FaultyStore, When};
use time::Duration;

fn id(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn agent(name: &str) -> Principal {
    Principal::new(id(name), name, TenantId::new("vendor").unwrap())
        .with_permissions([
            "impersonation:start",
            "bookings:read",
            "bookings:write",
            "settings:write",
        ])
        .with_relationship(Relationship::all_tenants(
            RelationKind::Support,
            "support",
            "Support",
        ))
}

fn lead() -> Principal {
    agent("lead").with_permission("impersonation:admin")
}

fn customer(name: &str) -> Principal {
    let t = TenantId::new("pinewood").unwrap();
    Principal::new(id(name), format!("{name} owner"), t.clone())
        .with_permissions(["bookings:read", "bookings:write", "billing:manage"])
        .with_attribute("card_number", "4000123456789010")
        .with_attribute("timezone", "Europe/Lisbon")
        .with_relationship(Relationship::new(
            RelationKind::Company,
            "pw",
            "Pinewood Campground",
            [t],
        ))
}

struct Fixture<S: Store> {
    service: Impersonation<S, MemoryDirectory>,
    directory: MemoryDirectory,
    clock: ManualClock,
}

impl<S: Store> Fixture<S> {
    /// Sam loses the impersonate permission in the directory.
    fn demote_sam(&self) {
        self.directory.update(&id("sam"), |p| {
            p.permissions
                .remove(&Permission::new("impersonation:start"));
        });
    }

    /// Ends every session of Olive's (her password changed) or of Sam's.
    async fn revoke_all(
        &self,
        revoking: Revoking,
    ) -> Result<Vec<impersonation_core::SessionId>, Error> {
        match revoking {
            Revoking::Customer => {
                self.service
                    .revoke_all_for_subject(&id("olive"), Initiator::System, "password changed")
                    .await
            }
            Revoking::Agent => {
                self.service
                    .revoke_all_for_agent(&id("sam"), Initiator::System, "agent demoted")
                    .await
            }
        }
    }

    /// The store's record of session `id`, which must be there.
    async fn stored(&self, id: impersonation_core::SessionId) -> impersonation_core::Session {
        self.service.store().session(id).await.unwrap().unwrap()
    }

    /// Sam starts impersonating Olive, as the tests' usual first step.
    async fn sam_on_olive(&self) -> Started {
        self.service
            .start(Requester::User(&agent("sam")), req("olive"))
            .await
            .unwrap()
    }
}

fn fixture_with<S: Store>(store: S, policy: Policy, config: Config) -> Fixture<S> {
    let directory = MemoryDirectory::new();
    for p in [
        agent("sam"),
        agent("kim"),
        lead(),
        customer("olive"),
        customer("oscar"),
    ] {
        directory.insert(p);
    }
    let clock = ManualClock::new(epoch());
    let service = Impersonation::new(store, directory.clone())
        .with_policy(policy)
        .with_config(config)
        .with_clock(clock.clone())
        .with_projection(
            ProjectionRules::new()
                .rule("card_number", AttributeRule::Mask(Mask::default()))
                .rule("timezone", AttributeRule::Copy),
        );
    Fixture {
        service,
        directory,
        clock,
    }
}

/// Two services on one store and clock: two processes of the same app.
fn two_processes() -> (
    Fixture<Arc<MemoryStore>>,
    Impersonation<Arc<MemoryStore>, MemoryDirectory>,
) {
    let store = Arc::new(MemoryStore::new());
    let f = fixture_with(Arc::clone(&store), Policy::default(), Config::default());
    let other = Impersonation::new(store, f.directory.clone()).with_clock(f.clock.clone());
    (f, other)
}

fn fixture() -> Fixture<MemoryStore> {
    fixture_with(MemoryStore::new(), Policy::default(), Config::default())
}

fn req(target: &str) -> StartRequest {
    StartRequest::new(id(target), "Customer cannot see bookings")
}

async fn session_events<S: Store>(
    f: &Fixture<S>,
    session: impersonation_core::SessionId,
) -> Vec<AuditEvent> {
    all_events(
        f.service.store(),
        AuditQuery {
            session: Some(session),
            ..AuditQuery::default()
        },
    )
    .await
}

async fn denied<S: Store>(f: &Fixture<S>, code: &str) -> usize {
    let all = all_events(
        f.service.store(),
        AuditQuery {
            action: Some(AuditAction::Denied),
            ..AuditQuery::default()
        },
    )
    .await;
    all.iter()
        .filter(|e| e.details.get("denial") == Some(code))
        .count()
}

#[tokio::test]
async fn start_resolve_record_stop_audits_every_step() {
    let f = fixture();
    let sam = agent("sam");
    let started = f
        .service
        .start(Requester::User(&sam), req("olive").ticket("SUP-1"))
        .await
        .unwrap();
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    assert_eq!(ctx.agent().id, sam.id);
    assert_eq!(ctx.subject(), &id("olive"));
    assert_eq!(
        ctx.shadow().attribute("card_number"),
        Some(&ShadowValue::Masked("••••••••••••9010".into()))
    );
    assert!(
        !ctx.shadow()
            .has_permission(&Permission::new("billing:manage"))
    );
    let banner = ctx.banner(f.service.now());
    assert_eq!(
        banner.message(),
        "You are impersonating olive owner (Pinewood Campground)"
    );
    assert_eq!(banner.ticket.as_deref(), Some("SUP-1"));
    f.service
        .record(&ctx, Activity::access("Accessed account settings."))
        .await
        .unwrap();
    f.service
        .record(&ctx, Activity::modification("Updated profile information."))
        .await
        .unwrap();
    assert_eq!(
        f.service.stop(&started.secret, &sam).await.unwrap(),
        EndReason::Stopped
    );
    let actions: Vec<AuditAction> = session_events(&f, started.session.id)
        .await
        .iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            AuditAction::SessionStarted,
            AuditAction::Access,
            AuditAction::Modification,
            AuditAction::SessionEnded
        ]
    );
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
    assert!(f.service.verify_all().await.unwrap().is_ok());
}

/// A listing by customer is what that customer's reader is shown, and a
/// store may answer it from an index of its own: an event hidden from it
/// alone, one shown altered in it, or another customer's event shown in
/// it, each with the listing of every event as stored. `verify_all` finds
/// nothing; `verify_listing` for the customer says what is wrong, and
/// counts the customer's events.
#[tokio::test]
async fn verify_listing_checks_one_customers_listing() {
    let by_olive = AuditQuery {
        subject: Some(id("olive")),
        ..AuditQuery::default()
    };
    for case in ["hidden", "altered", "another customer's"] {
        let store = FaultyStore::new(MemoryStore::new());
        let f = fixture_with(store, Policy::default(), Config::default());
        let sam = agent("sam");
        let on_olive = sam_reads_olives_settings(&f).await;
        f.service.stop(&on_olive.secret, &sam).await.unwrap();
        let on_oscar = f
            .service
            .start(Requester::User(&sam), req("oscar"))
            .await
            .unwrap();
        f.service.stop(&on_oscar.secret, &sam).await.unwrap();
        let report = f.service.verify_listing(&by_olive).await.unwrap();
        assert!(report.is_ok(), "{case}: {report:?}");
        assert_eq!((report.events(), report.selected), (5, 3), "{case}");

        let oscars = all_events(
            f.service.store(),
            AuditQuery {
                subject: Some(id("oscar")),
                ..AuditQuery::default()
            },
        )
        .await;
        assert_eq!(oscars.len(), 2);
        f.service
            .store()
            .edit_listing(move |q: &AuditQuery, page: &mut Vec<AuditEvent>| {
                if q.subject.is_none() {
                    return;
                }
                match case {
                    "hidden" => page.retain(|e| e.action != AuditAction::Access),
                    "altered" => {
                        for e in page.iter_mut() {
                            e.details.insert("reason", "Routine check.");
                            e.hash = e.compute_hash();
                        }
                    }
                    _ => page.extend(oscars.iter().cloned()),
                }
            });
        assert!(f.service.verify_all().await.unwrap().is_ok(), "{case}");
        let report = f.service.verify_listing(&by_olive).await.unwrap();
        assert!(
            report.broken.is_empty(),
            "{case}: the chain itself is whole"
        );
        let chain = on_olive.session.chain();
        let expected = if case == "hidden" {
            ListingMismatch::Count {
                chain,
                chained: 3,
                listed: 2,
            }
        } else {
            ListingMismatch::Altered { chain }
        };
        assert_eq!(report.listing, [expected], "{case}");
        assert!(!report.is_ok(), "{case}");
    }
}

/// The listing of one agent's events showing another agent's as well (a
/// store whose index by agent mixed two up): `verify_agent` names the
/// other chain and how many of its events the listing shows.
#[tokio::test]
async fn verify_agent_reports_another_chain_in_the_agents_listing() {
    let store = FaultyStore::new(MemoryStore::new());
    let f = fixture_with(store, Policy::default(), Config::default());
    let sam = agent("sam");
    sam_reads_olives_settings(&f).await;
    let kim = agent("kim");
    let on_oscar = f
        .service
        .start(Requester::User(&kim), req("oscar"))
        .await
        .unwrap();
    f.service.stop(&on_oscar.secret, &kim).await.unwrap();
    assert!(f.service.verify_agent(&sam.id).await.unwrap().is_ok());
    let kims = all_events(
        f.service.store(),
        AuditQuery {
            agent: Some(kim.id.clone()),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(kims.len(), 2);
    f.service
        .store()
        .edit_listing(move |q: &AuditQuery, page: &mut Vec<AuditEvent>| {
            if q.agent == Some(id("sam")) && q.cursor.is_none() {
                page.extend(kims.iter().cloned());
            }
        });
    let report = f.service.verify_agent(&sam.id).await.unwrap();
    assert!(report.broken.is_empty(), "{report:?}");
    assert_eq!(
        report.listing,
        [ListingMismatch::OtherChain {
            chain: on_oscar.session.chain(),
            listed: 2
        }]
    );
    assert_eq!(
        report.listing[0].to_string(),
        "the listing of one chain shows 2 events of chain kim"
    );
    // The listing of every event is as stored.
    assert!(f.service.verify_all().await.unwrap().is_ok());
}

/// Sam starts impersonating Olive and reads her settings: two events.
async fn sam_reads_olives_settings<S: Store>(f: &Fixture<S>) -> Started {
    let started = f
        .service
        .start(Requester::User(&agent("sam")), req("olive"))
        .await
        .unwrap();
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    f.service
        .record(&ctx, Activity::access("Accessed account settings."))
        .await
        .unwrap();
    started
}

/// Every chain verifies, and yet the listing people read (an index beside
/// the chains) has lost an event: `verify_all` says which chain, and how
/// many of its events the listing shows. A broken chain's events are not
/// counted again (its break is the report).
#[tokio::test]
async fn verify_all_finds_an_event_hidden_from_the_listing() {
    let f = fixture();
    let sam = agent("sam");
    let started = sam_reads_olives_settings(&f).await;
    f.service.stop(&started.secret, &sam).await.unwrap();
    let report = f.service.verify_all().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!((report.verified.len(), report.events()), (1, 3));

    let chain = started.session.chain();
    assert!(f.service.store().tamper_unlist_event(&chain, 1));
    assert_eq!(session_events(&f, started.session.id).await.len(), 2);
    let report = f.service.verify_all().await.unwrap();
    assert!(report.broken.is_empty(), "the chain itself is whole");
    assert_eq!(
        report.listing,
        [ListingMismatch::Count {
            chain: chain.clone(),
            chained: 3,
            listed: 2
        }]
    );
    assert!(!report.is_ok());
    assert_eq!(
        report.listing[0].to_string(),
        format!("the listing shows 2 entries for the 3 events of chain {chain}")
    );

    // Once the chain itself is cut, its break is what is reported.
    assert!(f.service.store().tamper_remove_event(&chain, 0));
    let report = f.service.verify_all().await.unwrap();
    assert_eq!(report.broken.len(), 1);
    assert!(report.listing.is_empty(), "{report:?}");
}

/// A listing that shows as many events as the chain holds, but one of
/// them edited in the copy it reads (its hash kept, or computed again to
/// match), or one more past them, linked to the last as the next would
/// be: the chain verifies, and `verify_all` and `verify_agent` say the
/// listing shows events that are not the chain's.
#[tokio::test]
async fn verify_all_finds_an_event_the_listing_shows_altered() {
    fn edit(e: &mut AuditEvent) {
        e.details.insert("description", "Nothing happened.");
    }
    #[allow(clippy::ptr_arg)] // the type of every edit: some add events
    fn edit_kept_hash(_: &AuditQuery, page: &mut Vec<AuditEvent>) {
        page.iter_mut().filter(|e| e.seq == 1).for_each(edit);
    }
    #[allow(clippy::ptr_arg)] // the type of every edit: some add events
    fn edit_new_hash(_: &AuditQuery, page: &mut Vec<AuditEvent>) {
        for e in page.iter_mut().filter(|e| e.seq == 1) {
            edit(e);
            e.hash = e.compute_hash();
        }
    }
    fn one_more(_: &AuditQuery, page: &mut Vec<AuditEvent>) {
        if let Some(last) = page.iter().max_by_key(|e| e.seq).cloned() {
            let mut next = last.clone();
            next.id = impersonation_core::EventId::new();
            next.seq = last.seq + 1;
            next.prev_hash = last.hash;
            edit(&mut next);
            next.hash = next.compute_hash();
            page.push(next);
        }
    }
    type Edit = fn(&AuditQuery, &mut Vec<AuditEvent>);
    for edit in [edit_kept_hash as Edit, edit_new_hash, one_more] {
        let store = FaultyStore::new(MemoryStore::new());
        let f = fixture_with(store, Policy::default(), Config::default());
        let sam = agent("sam");
        let started = sam_reads_olives_settings(&f).await;
        assert!(f.service.verify_all().await.unwrap().is_ok());
        f.service.store().edit_listing(edit);
        let chain = started.session.chain();
        let altered = [ListingMismatch::Altered {
            chain: chain.clone(),
        }];
        let report = f.service.verify_all().await.unwrap();
        assert!(report.broken.is_empty(), "the chain itself is whole");
        assert_eq!(report.listing, altered);
        let report = f.service.verify_agent(&sam.id).await.unwrap();
        assert_eq!((report.verified.len(), report.events()), (1, 2));
        assert_eq!(report.listing, altered);
        assert_eq!(
            report.listing[0].to_string(),
            format!("the listing shows events of chain {chain} that are not the chain's")
        );
    }
}

#[tokio::test]
async fn each_recorded_event_names_both_agent_and_customer() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    let event = f
        .service
        .record(
            &ctx,
            Activity::access("Viewed bookings.").detail("status", 200),
        )
        .await
        .unwrap();
    assert_eq!(event.actor.id(), Some(&id("sam")));
    assert_eq!(event.subject.as_ref().map(|s| &s.id), Some(&id("olive")));
    assert_eq!(event.tenant, Some(TenantId::new("pinewood").unwrap()));
    assert_eq!(event.details.get("status"), Some("200"));
}

#[tokio::test]
async fn an_unknown_target_is_refused_and_audited() {
    let f = fixture();
    let err = f
        .service
        .start(Requester::User(&agent("sam")), req("nobody"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::UnknownTarget)));
    assert_eq!(err.http_status(), 403);
    assert_eq!(denied(&f, "unknown_target").await, 1);
}

/// Someone without the impersonate permission is refused the same way
/// whether or not the target exists: the refusal tells no one who does.
#[tokio::test]
async fn a_start_without_the_permission_is_refused_before_the_target_is_looked_up() {
    let f = fixture();
    let olive = customer("olive");
    for target in ["oscar", "nobody"] {
        let err = f
            .service
            .start(Requester::User(&olive), req(target))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Denied(Denial::MissingPermission)),
            "{target}: {err:?}"
        );
    }
    assert_eq!(denied(&f, "missing_permission").await, 2);
    assert_eq!(denied(&f, "unknown_target").await, 0);
    // The records name the target asked for, as a detail only: nothing is
    // written into Oscar's or his tenant's views.
    let attempts = all_events(
        f.service.store(),
        AuditQuery {
            agent: Some(id("olive")),
            ..AuditQuery::default()
        },
    )
    .await;
    let asked: Vec<_> = attempts.iter().map(|e| e.details.get("target")).collect();
    assert_eq!(asked, [Some("oscar"), Some("nobody")]);
    assert!(
        attempts
            .iter()
            .all(|e| e.subject.is_none() && e.tenant.is_none())
    );
}

#[tokio::test]
async fn policy_refusals_are_audited_with_their_code() {
    let f = fixture();
    let err = f
        .service
        .start(Requester::User(&agent("sam")), req("lead"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::TargetIsAgent)));
    assert_eq!(denied(&f, "target_is_agent").await, 1);
}

#[tokio::test]
async fn a_second_session_for_one_agent_is_refused_and_audited() {
    let f = fixture();
    let sam = agent("sam");
    f.service
        .start(Requester::User(&sam), req("olive"))
        .await
        .unwrap();
    let err = f
        .service
        .start(Requester::User(&sam), req("oscar"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::ActiveSessionExists)));
    assert_eq!(denied(&f, "active_session_exists").await, 1);
}

#[tokio::test]
async fn starting_from_inside_a_session_is_refused_as_nesting() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    let err = f
        .service
        .start(Requester::Impersonating(&ctx), req("oscar"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::Nesting)));
    assert_eq!(denied(&f, "nesting").await, 1);
}

#[tokio::test]
async fn stop_by_another_agent_is_refused_and_audited() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let err = f
        .service
        .stop(&started.secret, &agent("kim"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::NotSessionAgent)));
    assert_eq!(denied(&f, "not_session_agent").await, 1);
    // Kim's refused stop says whose session it was.
    let refusal = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(refusal.details.get("agent"), Some("sam"));
    assert!(
        refusal.describe().ends_with(" Agent: \u{201C}sam\u{201D}."),
        "{}",
        refusal.describe()
    );
    assert!(
        f.service.resolve(&started.secret).await.is_ok(),
        "the session survives"
    );
}

#[tokio::test]
async fn an_admin_may_revoke_any_session_and_others_may_not() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let err = f
        .service
        .revoke(started.session.id, &agent("kim"), "")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::NotSessionAgent)));
    assert_eq!(
        f.service
            .revoke(started.session.id, &lead(), "audit review")
            .await
            .unwrap(),
        EndReason::Revoked
    );
    let end = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(end.actor.id(), Some(&id("lead")));
    assert_eq!(end.details.get("note"), Some("audit review"));
    assert_eq!(
        end.chain,
        impersonation_core::ChainKey::for_agent(&id("sam")),
        "the end is in the agent's chain"
    );
    assert!(matches!(
        f.service.revoke(started.session.id, &lead(), "").await,
        Err(Error::Ended(EndReason::Revoked))
    ));
    assert!(matches!(
        f.service
            .revoke(impersonation_core::SessionId::new(), &lead(), "")
            .await,
        Err(Error::UnknownSession)
    ));
}

/// `end_lapsed` writes the end of a session its agent walked away from, as
/// it lapsed and by the system; a session still in time is left alone,
/// and a second sweep finds nothing more to end.
#[tokio::test]
async fn end_lapsed_ends_only_the_sessions_whose_time_is_up() {
    let f = fixture();
    let sam = f.sam_on_olive().await;
    f.clock.advance(Duration::minutes(10));
    let kim = f
        .service
        .start(Requester::User(&agent("kim")), req("oscar"))
        .await
        .unwrap();
    assert_eq!(f.service.end_lapsed().await.unwrap(), []);
    // Sam's session idles out at 15 minutes; Kim's (started at 10) not yet.
    f.clock.advance(Duration::minutes(6));
    assert_eq!(f.service.end_lapsed().await.unwrap(), [sam.session.id]);
    let end = session_events(&f, sam.session.id).await.pop().unwrap();
    assert_eq!(
        (end.action, end.details.get("reason")),
        (AuditAction::SessionEnded, Some("idle_timeout"))
    );
    assert_eq!(end.actor, impersonation_core::Actor::System);
    assert_eq!(session_events(&f, kim.session.id).await.len(), 1);
    f.service.resolve(&kim.secret).await.unwrap();
    assert_eq!(f.service.end_lapsed().await.unwrap(), []);
    // Kept in use, Kim's session runs to its maximum duration.
    for _ in 0..5 {
        f.clock.advance(Duration::minutes(10));
        f.service.resolve(&kim.secret).await.unwrap();
    }
    f.clock.advance(Duration::minutes(10));
    assert_eq!(f.service.end_lapsed().await.unwrap(), [kim.session.id]);
    let end = session_events(&f, kim.session.id).await.pop().unwrap();
    assert_eq!(end.details.get("reason"), Some("expired"));
    assert_eq!(f.service.end_lapsed().await.unwrap(), []);
    assert!(matches!(
        f.service.resolve(&sam.secret).await,
        Err(Error::Ended(EndReason::IdleTimeout))
    ));
}

/// A consent that lands between the sweep's read of a pending session past
/// its deadline and its end: the store refuses the end (the session moved
/// on), and the sweep judges it again as it now stands, active and in
/// time, and leaves it alone rather than record it expired.
#[tokio::test]
async fn end_lapsed_leaves_a_session_a_consent_just_activated() {
    let clock = ManualClock::new(epoch());
    let store = BusyChain::consent_on_read();
    let directory = MemoryDirectory::new();
    for p in [agent("sam"), customer("olive")] {
        directory.insert(p);
    }
    let service = Impersonation::new(store, directory)
        .with_policy(consent_policy())
        .with_clock(clock.clone());
    let started = service
        .start(Requester::User(&agent("sam")), req("olive"))
        .await
        .unwrap();
    assert_eq!(started.session.state, SessionState::Pending);
    clock.advance(Duration::minutes(10));
    assert_eq!(service.end_lapsed().await.unwrap(), []);
    let now = service
        .store()
        .inner
        .session(started.session.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.state, SessionState::Active);
    let ends = all_events(
        service.store(),
        AuditQuery {
            session: Some(started.session.id),
            action: Some(AuditAction::SessionEnded),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(ends, []);
}

/// A stop or revocation that comes after a session's time was up (no
/// request came along to end it) ends it as it lapsed: the trail says it
/// idled out or expired, by the system, not that a person ended a session
/// that was still running.
#[tokio::test]
async fn a_stop_or_revocation_after_the_session_lapsed_records_the_lapse() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    f.clock.advance(Duration::minutes(20));
    assert!(matches!(
        f.service.stop(&started.secret, &agent("sam")).await,
        Err(Error::Ended(EndReason::IdleTimeout))
    ));
    let end = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(
        (end.action, end.details.get("reason")),
        (AuditAction::SessionEnded, Some("idle_timeout"))
    );
    assert_eq!(end.actor, impersonation_core::Actor::System);

    let kim = f
        .service
        .start(Requester::User(&agent("kim")), req("olive"))
        .await
        .unwrap();
    for _ in 0..6 {
        f.clock.advance(Duration::minutes(10));
    }
    assert!(matches!(
        f.service
            .revoke(kim.session.id, &lead(), "audit review")
            .await,
        Err(Error::Ended(EndReason::Expired))
    ));
    let end = session_events(&f, kim.session.id).await.pop().unwrap();
    assert_eq!(
        (
            end.action,
            end.details.get("reason"),
            end.details.get("note")
        ),
        (AuditAction::SessionEnded, Some("expired"), None)
    );
    assert_eq!(end.actor, impersonation_core::Actor::System);
    assert!(
        f.service
            .revoke_all_for_agent(&id("kim"), Initiator::System, "")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn revoke_all_for_agent_ends_every_live_session_of_that_agent() {
    let f = fixture();
    let sam = f.sam_on_olive().await;
    let kim = f
        .service
        .start(Requester::User(&agent("kim")), req("olive"))
        .await
        .unwrap();
    let revoked = f
        .service
        .revoke_all_for_agent(&id("sam"), Initiator::System, "agent disabled")
        .await
        .unwrap();
    assert_eq!(revoked, vec![sam.session.id]);
    assert!(matches!(
        f.service.resolve(&sam.secret).await,
        Err(Error::Ended(EndReason::Revoked))
    ));
    assert!(f.service.resolve(&kim.secret).await.is_ok());
    let err = f
        .service
        .revoke_all_for_agent(&id("kim"), Initiator::User(&agent("sam")), "")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::NotSessionAgent)));
    assert_eq!(
        f.service
            .revoke_all_for_agent(&id("kim"), Initiator::User(&lead()), "")
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn revoke_all_for_subject_ends_sessions_of_every_agent() {
    let f = fixture();
    let sam = f.sam_on_olive().await;
    let kim = f
        .service
        .start(Requester::User(&agent("kim")), req("olive"))
        .await
        .unwrap();
    let other = f
        .service
        .start(Requester::User(&lead()), req("oscar"))
        .await
        .unwrap();
    let olive = customer("olive");
    let mut revoked = f
        .service
        .revoke_all_for_subject(&olive.id, Initiator::User(&olive), "password changed")
        .await
        .unwrap();
    revoked.sort();
    let mut expected = vec![sam.session.id, kim.session.id];
    expected.sort();
    assert_eq!(revoked, expected);
    assert!(f.service.resolve(&other.secret).await.is_ok());
    let err = f
        .service
        .revoke_all_for_subject(&id("oscar"), Initiator::User(&olive), "")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::NotSubject)));
}

#[tokio::test]
async fn two_agents_on_one_customer_each_get_themselves_back() {
    let f = fixture();
    let sam = f.sam_on_olive().await;
    let kim = f
        .service
        .start(Requester::User(&agent("kim")), req("olive"))
        .await
        .unwrap();
    assert_eq!(
        f.service.resolve(&sam.secret).await.unwrap().agent().id,
        id("sam")
    );
    assert_eq!(
        f.service.resolve(&kim.secret).await.unwrap().agent().id,
        id("kim")
    );
    f.service.stop(&sam.secret, &agent("sam")).await.unwrap();
    assert_eq!(
        f.service.resolve(&kim.secret).await.unwrap().agent().id,
        id("kim")
    );
}

#[tokio::test]
async fn resolve_ends_an_expired_session_with_an_expired_event() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    for _ in 0..5 {
        f.clock.advance(Duration::minutes(10));
        f.service.resolve(&started.secret).await.unwrap();
    }
    f.clock.advance(Duration::minutes(10));
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Expired))
    ));
    let end = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(
        (end.action, end.details.get("reason")),
        (AuditAction::SessionEnded, Some("expired"))
    );
    assert_eq!(end.actor, impersonation_core::Actor::System);
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Expired))
    ));
}

#[tokio::test]
async fn resolve_ends_an_idle_session_and_use_keeps_it_alive() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    f.clock.advance(Duration::minutes(14));
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    assert_eq!(
        ctx.idle_deadline(),
        f.service.now() + Duration::minutes(15),
        "the touch moved the idle deadline"
    );
    f.clock.advance(Duration::minutes(15));
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::IdleTimeout))
    ));
}

/// A touch interval at or above the idle timeout would never let a touch
/// land before the idle deadline: a busy session would idle out. It is
/// taken as half the idle timeout, and one out of any range panics nowhere.
#[tokio::test]
async fn a_touch_interval_longer_than_the_idle_timeout_still_keeps_a_busy_session() {
    for interval in [Duration::minutes(15), Duration::hours(2), Duration::MAX] {
        let config = Config {
            touch_interval: interval,
            ..Config::default()
        };
        let f = fixture_with(MemoryStore::new(), Policy::default(), config);
        let started = f.sam_on_olive().await;
        // A request every 10 minutes for 50 minutes, against a 15-minute
        // idle timeout.
        for _ in 0..5 {
            f.clock.advance(Duration::minutes(10));
            f.service
                .resolve(&started.secret)
                .await
                .unwrap_or_else(|e| panic!("interval {interval}: {e}"));
        }
    }
}

#[tokio::test]
async fn touches_are_coalesced_when_configured() {
    let config = Config {
        touch_interval: Duration::seconds(30),
        ..Config::default()
    };
    let f = fixture_with(MemoryStore::new(), Policy::default(), config);
    let started = f.sam_on_olive().await;
    f.clock.advance(Duration::seconds(10));
    f.service.resolve(&started.secret).await.unwrap();
    let stored = f.stored(started.session.id).await;
    assert_eq!(
        stored.last_seen_at,
        epoch(),
        "within the interval: no write"
    );
    f.clock.advance(Duration::seconds(25));
    f.service.resolve(&started.secret).await.unwrap();
    let stored = f.stored(started.session.id).await;
    assert_eq!(stored.last_seen_at, epoch() + Duration::seconds(35));
}

#[tokio::test]
async fn a_demoted_agent_loses_the_session_once_the_reuse_interval_is_over() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    f.service.resolve(&started.secret).await.unwrap();
    f.demote_sam();
    // Within the interval the session resolved a moment ago is reused;
    // a request that changes something reads the store and is refused.
    f.clock.advance(Duration::milliseconds(500));
    f.service.resolve(&started.secret).await.unwrap();
    assert!(matches!(
        f.service.resolve_fresh(&started.secret).await,
        Err(Error::Ended(EndReason::Revoked))
    ));
    let end = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(end.details.get("denial"), Some("missing_permission"));
    assert_eq!(
        end.describe(),
        "Ended impersonation session (revoked). Agent: \u{201C}sam\u{201D}. Cause: policy re-check failed: missing_permission."
    );
    // The end, made here, is seen at once by reads too.
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Revoked))
    ));
}

/// A clone given other settings never reuses a context resolved under
/// the first's (its shadow user is projected by its own rules), yet an
/// end made through either is seen by both at once.
#[tokio::test]
async fn a_clone_with_other_rules_reuses_nothing_of_the_first_but_sees_its_ends() {
    let f = fixture();
    let loose = f
        .service
        .clone()
        .with_projection(ProjectionRules::new().rule("card_number", AttributeRule::Copy));
    let strict = loose.clone().with_projection(ProjectionRules::new());
    let started = f.sam_on_olive().await;
    let seen = loose.resolve(&started.secret).await.unwrap();
    assert!(seen.shadow().attribute("card_number").is_some());
    let seen = strict.resolve(&started.secret).await.unwrap();
    assert_eq!(seen.shadow().attribute("card_number"), None);
    // A plain clone shares the settings, and what they resolved.
    let same = loose.clone().resolve(&started.secret).await.unwrap();
    assert!(same.shadow().attribute("card_number").is_some());
    strict.stop(&started.secret, &agent("sam")).await.unwrap();
    assert!(matches!(
        loose.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
}

/// A service on a store that batches lookups and holds the first until
/// `go` (`held` says it is held), with Sam's session on Olive and Kim's on
/// Oscar.
async fn held_lookups() -> (
    Fixture<Arc<BusyChain>>,
    Started,
    Started,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (reached, held) = tokio::sync::oneshot::channel();
    let (go, wait) = tokio::sync::oneshot::channel();
    let f = fixture_with(
        Arc::new(BusyChain::hold_lookup(reached, wait)),
        Policy::default(),
        Config::default(),
    );
    let started = f.sam_on_olive().await;
    let other = f
        .service
        .start(Requester::User(&agent("kim")), req("oscar"))
        .await
        .unwrap();
    (f, started, other, held, go)
}

/// A lookup batched behind another's call runs after its request's own
/// time. When that run falls past the session's idle deadline the store
/// writes no touch, and the request's context keeps the deadline the
/// store has, not one counted from the request's time (which a reused or
/// kept context would serve for another idle timeout).
#[tokio::test]
async fn a_batched_lookup_run_past_the_idle_deadline_moves_no_deadline() {
    let (f, started, other, held, go) = held_lookups().await;
    let deadline = started.session.idle_deadline();
    f.clock
        .advance(deadline - epoch() - Duration::milliseconds(20));
    // Kim's lookup holds the one call in flight; Sam's, at 20 ms before
    // his deadline, queues behind it.
    let service = f.service.clone();
    let first = tokio::spawn(async move { service.resolve(&other.secret).await });
    held.await.unwrap();
    let service = f.service.clone();
    let secret = started.secret;
    let second = tokio::spawn(async move { service.resolve(&secret).await });
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    f.clock.advance(Duration::milliseconds(25));
    go.send(()).unwrap();
    first.await.unwrap().unwrap();
    let ctx = second.await.unwrap().unwrap();
    assert_eq!(ctx.idle_deadline(), deadline);
    let stored = f.stored(started.session.id).await;
    assert_eq!(stored.last_seen_at, started.session.last_seen_at);
}

/// A clone given a clock (or config) of its own batches its lookups
/// apart: its lookup is never carried by another clone's call, which
/// would touch the session at that clone's time (here: no touch at all,
/// at the time the session started) instead of its own.
#[tokio::test]
async fn a_clone_with_its_own_clock_touches_its_lookups_at_its_own_time() {
    let (f, started, other, held, go) = held_lookups().await;
    let third_session = f
        .service
        .start(Requester::User(&lead()), req("oscar"))
        .await
        .unwrap();
    let later = epoch() + Duration::minutes(5);
    let own_clock = f.service.clone().with_clock(ManualClock::new(later));
    // Kim's lookup holds the original's one call in flight; another of
    // the original's queues behind it, then the clone's of Sam's.
    let service = f.service.clone();
    let first = tokio::spawn(async move { service.resolve(&other.secret).await });
    held.await.unwrap();
    let service = f.service.clone();
    let second = tokio::spawn(async move { service.resolve(&third_session.secret).await });
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    let secret = started.secret;
    let third = tokio::spawn(async move { own_clock.resolve(&secret).await });
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    go.send(()).unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    third.await.unwrap().unwrap();
    let stored = f.stored(started.session.id).await;
    assert_eq!(stored.last_seen_at, later);
}

#[tokio::test]
async fn a_demoted_agent_loses_the_session_on_the_next_read_after_the_interval() {
    for reuse in [Duration::ZERO, Duration::seconds(1)] {
        let config = Config {
            reuse_interval: reuse,
            ..Config::default()
        };
        let f = fixture_with(MemoryStore::new(), Policy::default(), config);
        let started = f.sam_on_olive().await;
        f.service.resolve(&started.secret).await.unwrap();
        f.demote_sam();
        f.clock.advance(reuse);
        assert!(
            matches!(
                f.service.resolve(&started.secret).await,
                Err(Error::Ended(EndReason::Revoked))
            ),
            "reuse interval {reuse}"
        );
    }
}

/// A reuse interval longer than half the idle timeout is taken as half
/// of it: a session in constant use is read, and touched, often enough
/// not to idle out.
#[tokio::test]
async fn a_long_reuse_interval_does_not_let_a_session_in_use_idle_out() {
    let config = Config {
        reuse_interval: Duration::hours(1),
        ..Config::default()
    };
    let f = fixture_with(MemoryStore::new(), Policy::default(), config);
    let started = f.sam_on_olive().await;
    let idle = started.session.grant.idle_timeout;
    for _ in 0..4 {
        f.clock.advance(idle / 2_i32);
        f.service.resolve(&started.secret).await.unwrap();
    }
    let stored = f.stored(started.session.id).await;
    assert_eq!(stored.last_seen_at, f.service.now());
    // Capped by each session's own idle timeout: one started under a
    // shorter one than the policy's today.
    let started = f
        .service
        .start(Requester::User(&agent("kim")), req("oscar"))
        .await
        .unwrap();
    let idle = started.session.grant.idle_timeout;
    let longer = f
        .service
        .clone()
        .with_policy(Policy::default().idle_timeout(idle * 4_i32));
    for _ in 0..4 {
        f.clock.advance(idle / 2_i32);
        longer.resolve(&started.secret).await.unwrap();
    }
}

/// A change that reads the store and finds the session ended by another
/// process ends its reuse here too: the next read is refused at once, not
/// served for the rest of the reuse interval.
#[tokio::test]
async fn a_change_that_finds_the_session_ended_elsewhere_ends_its_reuse() {
    let (f, other) = two_processes();
    let started = f.sam_on_olive().await;
    f.service.resolve(&started.secret).await.unwrap();
    other.stop(&started.secret, &agent("sam")).await.unwrap();
    assert!(matches!(
        f.service.resolve_fresh(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
}

#[tokio::test]
async fn an_end_made_by_another_process_refuses_the_next_audited_read() {
    // Two services on one store: two processes of the same app.
    let (f, other) = two_processes();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    other.stop(&started.secret, &agent("sam")).await.unwrap();
    // This process still reuses the session for a read within the interval,
    // but its audit write checks the store and is refused...
    let reused = f.service.resolve(&started.secret).await.unwrap();
    assert_eq!(reused, ctx);
    assert!(matches!(
        f.service
            .record(&reused, Activity::access("Viewed bookings."))
            .await,
        Err(Error::Unauthenticated)
    ));
    // ...after which the session is not reused any more.
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
    // A change reads the store at once.
    let started = f
        .service
        .start(Requester::User(&agent("kim")), req("oscar"))
        .await
        .unwrap();
    f.service.resolve(&started.secret).await.unwrap();
    other.stop(&started.secret, &agent("kim")).await.unwrap();
    assert!(matches!(
        f.service.resolve_fresh(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
}

/// A session named by id (a signed token) is reused for reads as a secret
/// is: within the interval a read is answered from this process, a change
/// always reads the store, and an end made here is seen at once.
#[tokio::test]
async fn a_session_named_by_id_is_reused_for_reads_only() {
    let (f, other) = two_processes();
    let started = f.sam_on_olive().await;
    let id = started.session.id;
    let ctx = f.service.resolve_session_reusing(id).await.unwrap();
    assert_eq!(ctx.session(), id);
    // Another process ends it: a read within the interval is still
    // answered here (its audit write is what refuses it)...
    other.stop(&started.secret, &agent("sam")).await.unwrap();
    f.clock.advance(Duration::milliseconds(500));
    assert_eq!(f.service.resolve_session_reusing(id).await.unwrap(), ctx);
    assert!(matches!(
        f.service
            .record(&ctx, Activity::access("Viewed bookings."))
            .await,
        Err(Error::Unauthenticated)
    ));
    // ...and not once the refused write has made this process forget it.
    assert!(matches!(
        f.service.resolve_session_reusing(id).await,
        Err(Error::Ended(EndReason::Stopped))
    ));

    // A change reads the store at once; and past the interval so does a read.
    let started = f
        .service
        .start(Requester::User(&agent("kim")), req("oscar"))
        .await
        .unwrap();
    let id = started.session.id;
    f.service.resolve_session_reusing(id).await.unwrap();
    other.stop(&started.secret, &agent("kim")).await.unwrap();
    assert!(matches!(
        f.service.resolve_session(id).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
    f.clock.advance(Config::default().reuse_interval);
    assert!(matches!(
        f.service.resolve_session_reusing(id).await,
        Err(Error::Ended(EndReason::Stopped))
    ));

    // An end made by this process is seen at once, reads included.
    let started = f.sam_on_olive().await;
    let id = started.session.id;
    f.service.resolve_session_reusing(id).await.unwrap();
    f.service
        .stop(&started.secret, &agent("sam"))
        .await
        .unwrap();
    assert!(matches!(
        f.service.resolve_session_reusing(id).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
}

#[tokio::test]
async fn a_deleted_agent_or_customer_ends_the_session() {
    for (who, code) in [("sam", "unknown_agent"), ("olive", "unknown_target")] {
        let f = fixture();
        let started = f.sam_on_olive().await;
        f.directory.remove(&id(who));
        assert!(matches!(
            f.service.resolve(&started.secret).await,
            Err(Error::Ended(EndReason::Revoked))
        ));
        let end = session_events(&f, started.session.id).await.pop().unwrap();
        assert_eq!(end.details.get("denial"), Some(code));
    }
}

#[tokio::test]
async fn a_customer_promoted_to_admin_ends_the_session() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    f.directory.update(&id("olive"), |p| {
        p.roles.insert("admin".into());
    });
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Revoked))
    ));
}

/// A re-check stamped ahead of this server's clock (written by a server
/// whose clock runs fast; here this clock goes back) is still due: the
/// demoted agent loses the session on the next read, not once this clock
/// has caught up.
#[tokio::test]
async fn a_recheck_stamped_ahead_of_this_clock_is_still_due() {
    for recheck in [Duration::ZERO, Duration::seconds(60)] {
        let config = Config {
            reuse_interval: Duration::ZERO,
            recheck_interval: recheck,
            ..Config::default()
        };
        let f = fixture_with(MemoryStore::new(), Policy::default(), config);
        let started = f.sam_on_olive().await;
        f.service.resolve(&started.secret).await.unwrap();
        f.demote_sam();
        f.clock.advance(Duration::seconds(-30));
        assert!(
            matches!(
                f.service.resolve(&started.secret).await,
                Err(Error::Ended(EndReason::Revoked))
            ),
            "re-check interval {recheck}"
        );
    }
}

#[tokio::test]
async fn rechecks_can_be_spaced_out() {
    let config = Config {
        recheck_interval: Duration::seconds(60),
        ..Config::default()
    };
    let f = fixture_with(MemoryStore::new(), Policy::default(), config);
    let started = f.sam_on_olive().await;
    f.demote_sam();
    f.clock.advance(Duration::seconds(30));
    assert!(
        f.service.resolve(&started.secret).await.is_ok(),
        "not due yet"
    );
    f.clock.advance(Duration::seconds(30));
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Revoked))
    ));
}

#[tokio::test]
async fn changed_customer_settings_reach_the_shadow_user_on_recheck() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    f.directory.update(&id("olive"), |p| {
        p.attributes
            .insert("timezone".into(), "America/Toronto".into());
    });
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    assert_eq!(
        ctx.shadow().attribute("timezone"),
        Some(&ShadowValue::Copied("America/Toronto".into()))
    );
    let stored = f.stored(started.session.id).await;
    assert_eq!(
        stored.shadow,
        *ctx.shadow(),
        "the refreshed shadow user is stored"
    );
}

fn consent_policy() -> Policy {
    Policy::default().consent(Consent::Required {
        timeout: Duration::minutes(10),
    })
}

#[tokio::test]
async fn a_session_needing_consent_is_pending_until_the_customer_agrees() {
    let f = fixture_with(MemoryStore::new(), consent_policy(), Config::default());
    let started = f.sam_on_olive().await;
    assert_eq!(started.session.state, SessionState::Pending);
    let err = f.service.resolve(&started.secret).await.unwrap_err();
    assert!(matches!(err, Error::PendingConsent));
    let pending = f.service.pending_consents(&id("olive")).await.unwrap();
    assert_eq!(
        pending.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![started.session.id]
    );
    let err = f
        .service
        .grant_consent(started.session.id, &customer("oscar"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::NotSubject)));
    f.clock.advance(Duration::minutes(2));
    let active = f
        .service
        .grant_consent(started.session.id, &customer("olive"))
        .await
        .unwrap();
    assert_eq!(active.state, SessionState::Active);
    assert_eq!(active.expires_at, epoch() + Duration::minutes(62));
    assert!(f.service.resolve(&started.secret).await.is_ok());
    let actions: Vec<AuditAction> = session_events(&f, started.session.id)
        .await
        .iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            AuditAction::SessionRequested,
            AuditAction::Denied,
            AuditAction::SessionStarted
        ]
    );
}

#[tokio::test]
async fn declined_or_unanswered_consent_ends_the_session() {
    let f = fixture_with(MemoryStore::new(), consent_policy(), Config::default());
    let declined = f.sam_on_olive().await;
    assert_eq!(
        f.service
            .deny_consent(declined.session.id, &customer("olive"))
            .await
            .unwrap(),
        EndReason::ConsentDenied
    );
    assert!(matches!(
        f.service.resolve(&declined.secret).await,
        Err(Error::Ended(EndReason::ConsentDenied))
    ));
    let unanswered = f.sam_on_olive().await;
    f.clock.advance(Duration::minutes(10));
    let err = f
        .service
        .grant_consent(unanswered.session.id, &customer("olive"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Ended(EndReason::Expired)));
}

#[tokio::test]
async fn read_only_sessions_refuse_modifications_and_audit_the_refusal() {
    let f = fixture();
    let started = f
        .service
        .start(Requester::User(&agent("sam")), req("olive").read_only())
        .await
        .unwrap();
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    assert!(ctx.read_only());
    f.service
        .record(&ctx, Activity::access("Viewed bookings."))
        .await
        .unwrap();
    let err = f
        .service
        .record(&ctx, Activity::modification("Cancelled booking."))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::ReadOnlySession)));
    assert_eq!(denied(&f, "read_only_session").await, 1);
}

#[tokio::test]
async fn admit_asks_before_a_change_and_only_a_read_only_session_is_refused() {
    let f = fixture();
    let open = f.sam_on_olive().await;
    let ctx = f.service.resolve(&open.secret).await.unwrap();
    let before = session_events(&f, ctx.session()).await.len();
    for kind in [ActivityKind::Access, ActivityKind::Modification] {
        f.service.admit(&ctx, kind, "POST /bookings").await.unwrap();
    }
    assert_eq!(
        session_events(&f, ctx.session()).await.len(),
        before,
        "admitting writes nothing"
    );

    let closed = f
        .service
        .start(Requester::User(&agent("kim")), req("oscar").read_only())
        .await
        .unwrap();
    let ctx = f.service.resolve(&closed.secret).await.unwrap();
    f.service
        .admit(&ctx, ActivityKind::Access, "GET /bookings")
        .await
        .unwrap();
    let err = f
        .service
        .admit(&ctx, ActivityKind::Modification, "POST /bookings")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::ReadOnlySession)));
    let events = session_events(&f, ctx.session()).await;
    let last = events.last().unwrap();
    assert_eq!(last.action, AuditAction::Denied);
    assert_eq!(last.details.get("denial"), Some("read_only_session"));
    assert_eq!(last.details.get("description"), Some("POST /bookings"));
}

/// A read-only session's refused change, in a session that another
/// process ended meanwhile: told the session is over (nothing recorded
/// after the end), not a store failure.
#[tokio::test]
async fn a_read_only_refusal_in_a_session_ended_elsewhere_is_unauthenticated() {
    let (f, other) = two_processes();
    let started = f
        .service
        .start(Requester::User(&agent("sam")), req("olive").read_only())
        .await
        .unwrap();
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    other.stop(&started.secret, &agent("sam")).await.unwrap();
    let before = session_events(&f, ctx.session()).await.len();
    assert!(matches!(
        f.service
            .admit(&ctx, ActivityKind::Modification, "POST /bookings")
            .await,
        Err(Error::Unauthenticated)
    ));
    assert_eq!(session_events(&f, ctx.session()).await.len(), before);
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
}

/// `description` and `after_end` are the SDK's: a host's detail neither
/// crowds them out (a full set of details) nor stands in for them (an
/// `after_end` of its own on a change made in the session).
#[tokio::test]
async fn a_hosts_details_neither_crowd_out_nor_forge_the_sdks_own() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve_fresh(&started.secret).await.unwrap();
    let mut activity = Activity::modification("Moved booking 7.");
    activity.details.insert("after_end", "true");
    for i in 0..40 {
        activity.details.insert(&format!("k{i:02}"), i);
    }
    let event = f.service.record_completed(&ctx, activity).await.unwrap();
    assert_eq!(event.details.get("description"), Some("Moved booking 7."));
    assert_eq!(event.details.get("after_end"), None);
    assert_eq!(
        event.details.iter().count(),
        impersonation_core::MAX_DETAIL_ENTRIES - 1
    );
}

/// A stranger's attempt to revoke a customer's sessions is on the
/// customer's trail.
#[tokio::test]
async fn a_refused_revoke_all_for_a_customer_names_the_customer() {
    let f = fixture();
    let err = f
        .service
        .revoke_all_for_subject(&id("olive"), Initiator::User(&agent("kim")), "")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::NotSubject)));
    let on_olive = all_events(
        f.service.store(),
        AuditQuery {
            subject: Some(id("olive")),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(on_olive.len(), 1);
    assert_eq!(on_olive[0].details.get("denial"), Some("not_subject"));

    // A directory that cannot answer does not keep the refusal off the
    // trail: the customer is named by id.
    let down =
        Impersonation::new(f.service.store().clone(), DownDirectory).with_clock(f.clock.clone());
    let err = down
        .revoke_all_for_subject(&id("olive"), Initiator::User(&agent("kim")), "")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Denied(Denial::NotSubject)));
    assert_eq!(denied(&f, "not_subject").await, 2);
}

#[tokio::test]
async fn a_completed_change_stays_on_the_trail_when_its_session_ended_meanwhile() {
    // Two services on one store: the other process ends the session while
    // this one's handler runs.
    let (f, other) = two_processes();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve_fresh(&started.secret).await.unwrap();
    f.service
        .record_completed(&ctx, Activity::modification("Moved booking 7."))
        .await
        .unwrap();
    other.stop(&started.secret, &agent("sam")).await.unwrap();
    f.clock.advance(Duration::milliseconds(5));

    // A read that finished after the end is not recorded (its answer is withheld)...
    assert!(matches!(
        f.service
            .record_completed(&ctx, Activity::access("Viewed bookings."))
            .await,
        Err(Error::Unauthenticated)
    ));
    // ...but a change that did is, after the end, and the caller still learns the end.
    assert!(matches!(
        f.service
            .record_completed(&ctx, Activity::modification("Cancelled booking 7."))
            .await,
        Err(Error::Unauthenticated)
    ));
    let events = session_events(&f, ctx.session()).await;
    let tail: Vec<(AuditAction, Option<&str>)> = events
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|e| (e.action, e.details.get("description")))
        .collect();
    assert_eq!(
        tail,
        [
            (AuditAction::Modification, Some("Moved booking 7.")),
            (AuditAction::SessionEnded, None),
            (AuditAction::Modification, Some("Cancelled booking 7.")),
        ]
    );
    let late = events.last().unwrap();
    assert_eq!(late.details.get("after_end"), Some("true"));
    assert_eq!(late.subject.as_ref().map(|s| s.id.as_str()), Some("olive"));
    assert!(f.service.verify_all().await.unwrap().is_ok());
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
}

#[tokio::test]
async fn a_refused_sensitive_route_is_audited_in_the_session() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    let err = f
        .service
        .record_denied(&ctx, Denial::SensitiveAction, "GET /billing")
        .await
        .unwrap();
    assert_eq!(err.http_status(), 403);
    let last = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(last.action, AuditAction::Denied);
    assert_eq!(
        last.describe(),
        "Refused GET /billing: this action is not available while impersonating."
    );
}

#[tokio::test]
async fn recording_after_the_session_ended_is_refused() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    f.service
        .stop(&started.secret, &agent("sam"))
        .await
        .unwrap();
    let err = f
        .service
        .record(&ctx, Activity::access("Viewed bookings."))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated));
    assert_eq!(err.http_status(), 401);
}

/// A refusal of a sensitive action in a session another process has
/// ended (this one reuses it within the interval) records nothing after
/// the end: the answer is `Unauthenticated`, and the session is not
/// reused any more. So for a context kept past the session's time: the
/// session is ended as it lapsed, with no refusal after it.
#[tokio::test]
async fn a_refused_sensitive_route_in_a_session_over_records_nothing() {
    let (f, other) = two_processes();
    let started = f.sam_on_olive().await;
    f.service.resolve(&started.secret).await.unwrap();
    other.stop(&started.secret, &agent("sam")).await.unwrap();
    let reused = f.service.resolve(&started.secret).await.unwrap();
    let before = session_events(&f, started.session.id).await;
    let answer = f
        .service
        .record_denied(&reused, Denial::SensitiveAction, "GET /billing")
        .await
        .unwrap();
    assert!(matches!(answer, Error::Unauthenticated), "{answer:?}");
    assert_eq!(answer.http_status(), 401);
    assert_eq!(session_events(&f, started.session.id).await, before);
    assert!(matches!(
        f.service.resolve(&started.secret).await,
        Err(Error::Ended(EndReason::Stopped))
    ));

    let started = f
        .service
        .start(Requester::User(&agent("kim")), req("oscar"))
        .await
        .unwrap();
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    f.clock.advance(Duration::minutes(20));
    let answer = f
        .service
        .record_denied(&ctx, Denial::SensitiveAction, "GET /billing")
        .await
        .unwrap();
    assert!(matches!(answer, Error::Unauthenticated), "{answer:?}");
    let events = session_events(&f, started.session.id).await;
    let end = events.last().unwrap();
    assert_eq!(
        (end.action, end.details.get("reason")),
        (AuditAction::SessionEnded, Some("idle_timeout"))
    );
    assert!(events.iter().all(|e| e.action != AuditAction::Denied));
}

/// A context kept past its session's time (a socket's handler, a job)
/// lets nothing more be done: before an activity the session is judged on
/// the store's record, which other requests may have kept in use, and
/// once it has lapsed there it is ended as it lapsed and nothing is
/// recorded.
#[tokio::test]
async fn recording_with_a_context_kept_past_its_sessions_time_is_refused() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    // Another request keeps the session in use: the kept context's idle
    // deadline (15 minutes) has passed, the store's has not.
    f.clock.advance(Duration::minutes(10));
    f.service.resolve(&started.secret).await.unwrap();
    f.clock.advance(Duration::minutes(6));
    f.service
        .record(&ctx, Activity::access("Viewed bookings."))
        .await
        .unwrap();
    // Then nobody uses it, and it idles out.
    f.clock.advance(Duration::minutes(10));
    let err = f
        .service
        .record(&ctx, Activity::access("Viewed bookings again."))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated), "{err:?}");
    let events = session_events(&f, started.session.id).await;
    let end = events.last().unwrap();
    assert_eq!(
        (end.action, end.details.get("reason")),
        (AuditAction::SessionEnded, Some("idle_timeout"))
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == AuditAction::Access)
            .count(),
        1
    );
}

/// The same for a change in a read-only session: a context kept past the
/// session's time gets no refusal on the trail (dated after the session's
/// end); the session is ended as it lapsed, through `record` and
/// `admit` alike.
#[tokio::test]
async fn a_read_only_change_with_a_context_kept_past_its_time_ends_the_session() {
    let f = fixture();
    for (n, through_admit) in [(0, false), (1, true)] {
        let started = f
            .service
            .start(Requester::User(&agent("sam")), req("olive").read_only())
            .await
            .unwrap();
        let ctx = f.service.resolve(&started.secret).await.unwrap();
        f.clock.advance(Duration::minutes(16));
        let err = if through_admit {
            f.service
                .admit(&ctx, ActivityKind::Modification, "POST /bookings")
                .await
                .unwrap_err()
        } else {
            f.service
                .record(&ctx, Activity::modification("Moved booking 7."))
                .await
                .unwrap_err()
        };
        assert!(matches!(err, Error::Unauthenticated), "{n}: {err:?}");
        let events = session_events(&f, started.session.id).await;
        assert!(
            events.iter().all(|e| e.action != AuditAction::Denied),
            "{n}: {events:#?}"
        );
        let end = events.last().unwrap();
        assert_eq!(
            (end.action, end.details.get("reason")),
            (AuditAction::SessionEnded, Some("idle_timeout")),
            "{n}"
        );
    }
}

/// A request whose session's time runs out while its handler runs (no
/// one has ended the session yet): when it is audited, the session is
/// judged on the store's record and ended as it lapsed; the read is
/// withheld, and the change, made, is recorded after the end.
#[tokio::test]
async fn a_request_that_outlives_its_sessions_time_is_judged_when_audited() {
    let f = fixture();
    for activity in [
        Activity::access("Viewed bookings."),
        Activity::modification("Moved booking 7."),
    ] {
        let kind = activity.kind;
        let started = f.sam_on_olive().await;
        let ctx = f.service.resolve(&started.secret).await.unwrap();
        f.clock.advance(Duration::minutes(16));
        let err = f
            .service
            .record_completed(&ctx, activity)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unauthenticated), "{kind:?}: {err:?}");
        let events = session_events(&f, started.session.id).await;
        let end = events
            .iter()
            .position(|e| e.action == AuditAction::SessionEnded)
            .expect("ended");
        assert_eq!(events[end].details.get("reason"), Some("idle_timeout"));
        let after: Vec<_> = events[end + 1..].iter().map(|e| e.action).collect();
        match kind {
            ActivityKind::Access => assert!(after.is_empty(), "{after:?}"),
            ActivityKind::Modification => {
                assert_eq!(after, [AuditAction::Modification]);
                assert_eq!(events[end + 1].details.get("after_end"), Some("true"));
            }
        }
        assert!(
            events[..end]
                .iter()
                .all(|e| !matches!(e.action, AuditAction::Access | AuditAction::Modification)),
            "{kind:?}: {events:#?}"
        );
    }
}

/// A permission the policy comes to deny while a session is live (taken
/// away after an incident, and deployed) leaves the shadow user at the
/// session's next re-check, not when the session ends.
#[tokio::test]
async fn a_permission_denied_since_the_start_leaves_the_live_shadow_user() {
    let (f, _) = two_processes();
    let started = f.sam_on_olive().await;
    let write = Permission::new("bookings:write");
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    assert!(ctx.shadow().has_permission(&write));
    // The app again, with the new policy (the store and the sessions in
    // it are the same): what it denied, and now bookings:write too.
    let mut denied = Policy::default().denied_permission_patterns().to_vec();
    denied.push(impersonation_core::PermissionPattern::new("bookings:write"));
    let redeployed = Impersonation::new(Arc::clone(f.service.store()), f.directory.clone())
        .with_clock(f.clock.clone())
        .with_policy(Policy::default().denied_permissions(denied));
    let ctx = redeployed.resolve(&started.secret).await.unwrap();
    assert!(!ctx.shadow().has_permission(&write));
    assert!(
        ctx.shadow()
            .has_permission(&Permission::new("bookings:read"))
    );
}

#[tokio::test]
async fn a_policy_made_read_only_since_the_start_reaches_the_live_session() {
    let (f, _) = two_processes();
    let started = f.sam_on_olive().await;
    let write = Permission::new("bookings:write");
    assert!(
        !f.service
            .resolve(&started.secret)
            .await
            .unwrap()
            .read_only()
    );
    let redeployed = Impersonation::new(Arc::clone(f.service.store()), f.directory.clone())
        .with_clock(f.clock.clone())
        .with_policy(Policy::default().read_only_always());
    let ctx = redeployed.resolve(&started.secret).await.unwrap();
    assert!(ctx.read_only());
    assert!(!ctx.shadow().has_permission(&write));
    assert!(
        ctx.shadow()
            .has_permission(&Permission::new("bookings:read"))
    );
    // A change is refused now, and the refusal audited.
    let refused = redeployed
        .admit(&ctx, ActivityKind::Modification, "POST /bookings")
        .await;
    assert!(
        matches!(refused, Err(Error::Denied(Denial::ReadOnlySession))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_shorter_longest_duration_since_the_start_ends_the_live_session_on_time() {
    let (f, _) = two_processes();
    let started = f.sam_on_olive().await;
    let redeployed = Impersonation::new(Arc::clone(f.service.store()), f.directory.clone())
        .with_clock(f.clock.clone())
        .with_policy(Policy::default().max_duration(Duration::minutes(5)));
    // Within today's bound, the session is live, and shows today's end.
    f.clock.advance(Duration::minutes(4));
    let ctx = redeployed.resolve(&started.secret).await.unwrap();
    let activated = started.session.activated_at.unwrap();
    assert_eq!(ctx.expires_at(), activated + Duration::minutes(5));
    // Past it (and well inside the start's hour and idle timeout), it
    // has expired, on the trail as such.
    f.clock.advance(Duration::minutes(2));
    let err = redeployed.resolve(&started.secret).await.unwrap_err();
    assert!(matches!(err, Error::Ended(EndReason::Expired)), "{err:?}");
    let stored = f
        .service
        .store()
        .session(started.session.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.state, SessionState::Ended(EndReason::Expired));
    // The old policy's process finds it ended too.
    assert!(f.service.resolve(&started.secret).await.is_err());
}

/// The app's own refusal is a denied event inside a live session, and
/// none once the session has ended: the append is guarded, as a
/// request's record is.
#[tokio::test]
async fn an_apps_refusal_is_recorded_only_in_a_live_session() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    f.service
        .record_refused(&ctx, Denial::TenantBoundary, "POST /bookings")
        .await
        .unwrap();
    let last = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(last.action, AuditAction::Denied);
    assert_eq!(last.details.get("denial"), Some("tenant_boundary"));
    assert_eq!(last.details.get("attempt"), Some("POST /bookings"));
    f.service
        .stop(&started.secret, &agent("sam"))
        .await
        .unwrap();
    let refused = f
        .service
        .record_refused(&ctx, Denial::TenantBoundary, "POST /bookings")
        .await;
    assert!(
        matches!(refused, Err(Error::Unauthenticated)),
        "{refused:?}"
    );
    let last = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(last.action, AuditAction::SessionEnded);
}

/// A refusal made after the session's time ran out (a slow handler) is
/// no event in a live session: the session is ended as it lapsed, and the
/// answer is `Unauthenticated`, as for a completed request.
#[tokio::test]
async fn an_apps_refusal_after_the_session_lapsed_ends_it_and_is_not_recorded() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    f.clock.advance(Duration::minutes(16));
    let refused = f
        .service
        .record_refused(&ctx, Denial::TenantBoundary, "POST /bookings")
        .await;
    assert!(
        matches!(refused, Err(Error::Unauthenticated)),
        "{refused:?}"
    );
    let events = session_events(&f, started.session.id).await;
    assert!(
        !events.iter().any(|e| e.action == AuditAction::Denied),
        "{events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last.action, AuditAction::SessionEnded);
    let stored = f
        .service
        .store()
        .session(started.session.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.state, SessionState::Ended(EndReason::IdleTimeout));
}

#[tokio::test]
async fn malformed_and_unknown_secrets_are_unauthenticated() {
    let f = fixture();
    let other = impersonation_core::SessionSecret::generate(
        &impersonation_core::ChainKey::for_agent(&id("x")),
    )
    .unwrap();
    assert!(matches!(
        f.service.resolve(&other).await,
        Err(Error::Unauthenticated)
    ));
    let parsed: Result<impersonation_core::SessionSecret, Error> =
        impersonation_core::SessionSecret::parse("imp1.garbage").map_err(Error::from);
    assert!(matches!(parsed, Err(Error::Unauthenticated)));
}

// --- failure and secrecy -----------------------------------------------------

fn faulty() -> Fixture<Arc<FaultyStore<MemoryStore>>> {
    fixture_with(
        Arc::new(FaultyStore::new(MemoryStore::new())),
        Policy::default(),
        Config::default(),
    )
}

#[tokio::test]
async fn a_failed_start_leaves_neither_half() {
    let f = faulty();
    let store = f.service.store().clone();
    store.fail_next_write(When::Before);
    let err = f
        .service
        .start(Requester::User(&agent("sam")), req("olive"))
        .await
        .unwrap_err();
    assert_eq!(err.http_status(), 503);
    let chain = impersonation_core::ChainKey::for_agent(&id("sam"));
    assert!(
        store.inner().chain_head(&chain).await.unwrap().is_none(),
        "no event"
    );
    assert!(
        store
            .inner()
            .live_sessions(&Default::default())
            .await
            .unwrap()
            .is_empty(),
        "no session"
    );

    // Lost after the write: both halves are there, never one.
    store.fail_next_write(When::After);
    assert!(
        f.service
            .start(Requester::User(&agent("sam")), req("olive"))
            .await
            .is_err()
    );
    let live = store
        .inner()
        .live_sessions(&Default::default())
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    let events = all_events(
        store.inner(),
        AuditQuery {
            session: Some(live[0].id),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, AuditAction::SessionStarted);
}

/// A session whose time is up, with no request since to end it, does not
/// keep its agent from starting another (the agent may have lost its
/// secret): the start ends it first, audited as expired or idle.
#[tokio::test]
async fn a_lapsed_session_nobody_ended_does_not_block_the_next_start() {
    let f = fixture();
    let sam = agent("sam");
    let first = f
        .service
        .start(Requester::User(&sam), req("olive"))
        .await
        .unwrap();
    // Still live: a second start is refused.
    let refused = f.service.start(Requester::User(&sam), req("oscar")).await;
    assert!(
        matches!(refused, Err(Error::Denied(Denial::ActiveSessionExists))),
        "{refused:?}"
    );

    f.clock.advance(Duration::hours(3));
    let second = f
        .service
        .start(Requester::User(&sam), req("oscar"))
        .await
        .unwrap();
    assert_ne!(second.session.id, first.session.id);
    let old = f.stored(first.session.id).await;
    assert!(
        matches!(
            old.state,
            SessionState::Ended(EndReason::Expired | EndReason::IdleTimeout)
        ),
        "{:?}",
        old.state
    );
    let ends: Vec<AuditAction> = session_events(&f, first.session.id)
        .await
        .into_iter()
        .map(|e| e.action)
        .filter(|a| *a == AuditAction::SessionEnded)
        .collect();
    assert_eq!(ends.len(), 1);
}

/// A stop whose caller is dropped after the store has ended the session
/// (its reply lost, the request given up) still stops this process from
/// reusing the session: the next read is refused, not served from the
/// reuse map.
#[tokio::test]
async fn a_stop_dropped_after_the_store_ended_the_session_is_not_reused() {
    let f = faulty();
    let store = f.service.store().clone();
    let started = f.sam_on_olive().await;
    // A read fills the reuse map.
    f.service.resolve(&started.secret).await.unwrap();

    store.fail_next_write(When::Hang);
    let sam = agent("sam");
    let mut stop = Box::pin(f.service.stop(&started.secret, &sam));
    let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(stop.as_mut().poll(cx))).await;
    assert!(polled.is_pending());
    drop(stop);
    assert_eq!(store.injected(), 1);
    let ended = store
        .inner()
        .session(started.session.id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ended.state, SessionState::Ended(EndReason::Stopped)),
        "{:?}",
        ended.state
    );

    let read = f.service.resolve(&started.secret).await;
    assert!(read.is_err(), "served from the reuse map: {read:?}");
}

#[tokio::test]
async fn a_failed_stop_leaves_neither_half() {
    let f = faulty();
    let store = f.service.store().clone();
    let started = f.sam_on_olive().await;
    store.fail_next_write(When::Before);
    assert!(matches!(
        f.service.stop(&started.secret, &agent("sam")).await,
        Err(Error::Store(_))
    ));
    let s = store
        .inner()
        .session(started.session.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.state, SessionState::Active);
    assert_eq!(
        session_events(&f, started.session.id).await.len(),
        1,
        "no end event without the end"
    );
    store.fail_next_write(When::After);
    assert!(
        f.service
            .stop(&started.secret, &agent("sam"))
            .await
            .is_err()
    );
    let s = store
        .inner()
        .session(started.session.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.state, SessionState::Ended(EndReason::Stopped));
    assert_eq!(
        session_events(&f, started.session.id).await.len(),
        2,
        "the end with its event"
    );
}

#[tokio::test]
async fn a_store_outage_fails_closed() {
    let f = faulty();
    let store = f.service.store().clone();
    let started = f.sam_on_olive().await;
    store.fail_nth(1, When::Before, Calls::All);
    let err = f.service.resolve(&started.secret).await.unwrap_err();
    assert!(matches!(err, Error::Store(_)));
    assert_eq!(err.http_status(), 503);
    assert!(f.service.resolve(&started.secret).await.is_ok(), "healed");
    let ctx = f.service.resolve(&started.secret).await.unwrap();
    store.fail_next_write(When::Before);
    assert!(matches!(
        f.service.record(&ctx, Activity::access("Viewed.")).await,
        Err(Error::Store(_))
    ));
}

#[derive(Clone)]
struct DownDirectory;

#[async_trait]
impl Directory for DownDirectory {
    async fn principal(&self, _: &UserId) -> Result<Option<Principal>, DirectoryError> {
        Err(DirectoryError::new("connection refused"))
    }
}

/// A directory that folds case: it answers for `OLIVE` with Olive, whose
/// id is `olive`.
struct FoldingDirectory(MemoryDirectory);

#[async_trait]
impl Directory for FoldingDirectory {
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, DirectoryError> {
        let folded = UserId::new(id.as_str().to_lowercase())
            .map_err(|e| DirectoryError::new(e.to_string()))?;
        self.0.principal(&folded).await
    }
}

/// A start names the customer by the directory's own id: the fences and
/// the session's keys are by the id asked for, so a directory's answer
/// for another id (one that folds case) is refused as an unknown target,
/// on the trail, and no session starts.
#[tokio::test]
async fn a_start_by_an_id_the_directory_folds_is_refused() {
    let f = fixture();
    let directory = MemoryDirectory::new();
    for p in [agent("sam"), customer("olive")] {
        directory.insert(p);
    }
    let folding = Impersonation::new(f.service.store().clone(), FoldingDirectory(directory))
        .with_clock(f.clock.clone());
    let refused = folding
        .start(
            Requester::User(&agent("sam")),
            StartRequest::new(id("OLIVE"), "Customer cannot see bookings"),
        )
        .await;
    assert!(
        matches!(refused, Err(Error::Denied(Denial::UnknownTarget))),
        "{refused:?}"
    );
    assert_eq!(denied(&f, "unknown_target").await, 1);
    let started = folding
        .start(
            Requester::User(&agent("sam")),
            StartRequest::new(id("olive"), "Customer cannot see bookings"),
        )
        .await;
    assert!(started.is_ok(), "{started:?}");
}

/// A directory that answers for Olive with an account merged into
/// another (`olive-merged`).
struct MergingDirectory(MemoryDirectory);

#[async_trait]
impl Directory for MergingDirectory {
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, DirectoryError> {
        let found = self.0.principal(id).await?;
        Ok(found.map(|mut p| {
            if p.id.as_str() == "olive" {
                p.id = UserId::new("olive-merged").unwrap_or_else(|_| p.id.clone());
            }
            p
        }))
    }
}

/// A re-check whose directory now answers for the customer with another
/// account ends the session, as revoked: the shadow user is never that
/// other person, whom the session's keys and trail do not name.
#[tokio::test]
async fn a_recheck_that_finds_another_account_ends_the_session() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let merging = Impersonation::new(
        f.service.store().clone(),
        MergingDirectory(f.directory.clone()),
    )
    .with_clock(f.clock.clone());
    let resolved = merging.resolve_fresh(&started.secret).await;
    assert!(
        matches!(resolved, Err(Error::Ended(EndReason::Revoked))),
        "{resolved:?}"
    );
    let events = session_events(&f, started.session.id).await;
    let last = events.last().unwrap();
    assert_eq!(last.action, AuditAction::SessionEnded);
    assert_eq!(last.details.get("denial"), Some("unknown_target"));
}

#[tokio::test]
async fn a_directory_outage_fails_closed_without_ending_the_session() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let down =
        Impersonation::new(f.service.store().clone(), DownDirectory).with_clock(f.clock.clone());
    let err = down.resolve(&started.secret).await.unwrap_err();
    assert!(matches!(err, Error::Directory(_)));
    assert_eq!(err.http_status(), 503);
    assert!(
        f.service.resolve(&started.secret).await.is_ok(),
        "the session was not ended by an outage"
    );
}

#[tokio::test]
async fn the_bearer_secret_is_stored_only_as_a_hash() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let token = started.secret.expose().to_owned();
    let random_part = token.rsplit('.').next().unwrap().to_owned();
    let stored =
        serde_json::to_string(&f.service.store().session(started.session.id).await.unwrap())
            .unwrap();
    let events = serde_json::to_string(&session_events(&f, started.session.id).await).unwrap();
    for text in [&stored, &events] {
        assert!(!text.contains(&random_part));
    }
    assert!(stored.contains(&started.secret.hash().to_hex()));
}

#[tokio::test]
async fn a_session_resolves_by_id_with_the_same_checks() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let sid = started.session.id;
    let by_id = f.service.resolve_session(sid).await.unwrap();
    let by_secret = f.service.resolve(&started.secret).await.unwrap();
    assert_eq!(by_id.session(), by_secret.session());
    assert_eq!(by_id.agent().id, id("sam"));
    assert_eq!(by_id.subject(), &id("olive"));
    // Use by id keeps the session alive: the touch is written.
    f.clock.advance(Duration::minutes(14));
    f.service.resolve_session(sid).await.unwrap();
    assert_eq!(f.stored(sid).await.last_seen_at, f.service.now());
    f.clock.advance(Duration::minutes(14));
    f.service.resolve_session(sid).await.unwrap();
    // A stopped session fails at once, by id as by secret.
    f.service
        .stop(&started.secret, &agent("sam"))
        .await
        .unwrap();
    assert!(matches!(
        f.service.resolve_session(sid).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
    assert!(matches!(
        f.service
            .resolve_session(impersonation_core::SessionId::new())
            .await,
        Err(Error::Unauthenticated)
    ));
}

#[tokio::test]
async fn resolving_by_id_ends_an_idle_session_with_its_event() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    f.clock.advance(Duration::minutes(16));
    assert!(matches!(
        f.service.resolve_session(started.session.id).await,
        Err(Error::Ended(EndReason::IdleTimeout))
    ));
    let end = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(
        (end.action, end.details.get("reason")),
        (AuditAction::SessionEnded, Some("idle_timeout"))
    );
}

/// Sam on Olive, used 14 minutes in, now 16 minutes in, on a store whose
/// listing of live sessions is 14 minutes old (so it shows the session
/// idle past its 15 minutes; the store's record, 2).
async fn used_since_it_was_listed() -> (Fixture<BusyChain>, Started) {
    let f = fixture_with(
        BusyChain::listed_before(Duration::minutes(14)),
        Policy::default(),
        Config::default(),
    );
    let started = f.sam_on_olive().await;
    f.clock.advance(Duration::minutes(14));
    f.service.resolve(&started.secret).await.unwrap();
    f.clock.advance(Duration::minutes(2));
    (f, started)
}

/// A revoke-all's listing may be older than a touch since: a session it
/// shows as idle too long, but that was used meanwhile, is revoked, not
/// ended as idle.
#[tokio::test]
async fn a_revoke_all_judges_a_lapse_on_the_store_not_on_its_listing() {
    let (f, started) = used_since_it_was_listed().await;
    let revoked = f
        .service
        .revoke_all_for_subject(&id("olive"), Initiator::System, "password changed")
        .await
        .unwrap();
    assert_eq!(revoked, [started.session.id]);
    let end = session_events(&f, started.session.id).await.pop().unwrap();
    assert_eq!(
        (end.details.get("reason"), end.details.get("cause")),
        (Some("revoked"), Some("subject_changed"))
    );
}

/// A start's listing of the agent's sessions may be older than a touch
/// since: a session it shows as idle too long, but that was used
/// meanwhile, is live on the store's record. It still blocks the new
/// start, and is not ended as idle.
#[tokio::test]
async fn a_start_judges_a_lapse_on_the_store_not_on_its_listing() {
    let (f, started) = used_since_it_was_listed().await;
    let second = f
        .service
        .start(Requester::User(&agent("sam")), req("oscar"))
        .await;
    assert!(
        matches!(second, Err(Error::Denied(Denial::ActiveSessionExists))),
        "{second:?}"
    );
    let events = session_events(&f, started.session.id).await;
    assert!(
        events.iter().all(|e| e.action != AuditAction::SessionEnded),
        "{events:?}"
    );
    f.service.resolve_fresh(&started.secret).await.unwrap();
}

/// A request's read may show its session idle too long where the store's
/// record, used since by another request, does not: the session is not
/// ended, and the request is served.
#[tokio::test]
async fn a_request_judges_a_lapse_on_the_store_not_on_its_read() {
    let f = fixture_with(
        BusyChain::found_before(Duration::minutes(14)),
        Policy::default(),
        Config::default(),
    );
    let started = f.sam_on_olive().await;
    f.clock.advance(Duration::minutes(2));
    // The read shows it last seen 16 minutes ago (idle past 15); the
    // store, 2.
    let served = f.service.resolve_fresh(&started.secret).await;
    assert!(served.is_ok(), "{served:?}");
    let events = session_events(&f, started.session.id).await;
    assert!(
        events.iter().all(|e| e.action != AuditAction::SessionEnded),
        "{events:?}"
    );
}

/// A change whose session's time ran out while it ran, and whose record
/// is gone by the time its end would be written: the change is still on
/// the trail (the guarded append decides), not dropped with an error.
#[tokio::test]
async fn a_completed_change_stays_on_the_trail_when_its_lapsed_session_cannot_be_ended() {
    let f = fixture_with(
        BusyChain::gone_after_first_read(),
        Policy::default(),
        Config::default(),
    );
    let started = f.sam_on_olive().await;
    let ctx = f.service.resolve_fresh(&started.secret).await.unwrap();
    f.clock.advance(Duration::hours(2));
    let recorded = f
        .service
        .record_completed(&ctx, Activity::modification("Moved booking 7."))
        .await;
    assert!(
        !matches!(recorded, Err(Error::UnknownSession)),
        "{recorded:?}"
    );
    let events = session_events(&f, started.session.id).await;
    assert!(
        events.iter().any(|e| e.action == AuditAction::Modification
            && e.details.get("description") == Some("Moved booking 7.")),
        "{events:?}"
    );
}

/// A store whose `chain_head` of an agent's chain is followed at once by
/// one more event on that chain (an agent at work while the chain is
/// being verified), or,
/// `stale`, whose head stays at the chain's first event (events written
/// past it without moving it). With `consent_race` set, the first
/// transition finds its (pending) session activated a moment before, as
/// if the customer had just consented; with `consent_on_read`, the consent
/// lands just after the first read of a pending session (another
/// process's request, between a caller's read and its write).
/// With `stop_race`, the first transition finds its session stopped by
/// its agent a moment before.
/// With a `found_before` duration, a lookup by secret shows the session
/// last seen that much earlier (a read older than another request's use).
/// With a `listed_before` duration, its listing of live sessions shows
/// each as last seen that much earlier (listed before a touch).
struct BusyChain {
    inner: MemoryStore,
    stale: bool,
    consent_race: std::sync::atomic::AtomicBool,
    consent_on_read: std::sync::atomic::AtomicBool,
    stop_race: std::sync::atomic::AtomicBool,
    listed_before: Duration,
    found_before: Duration,
    /// With `gone_after_first_read`, every read of a session by id after
    /// the first finds none (a record taken away between two reads).
    gone_after_first_read: bool,
    reads: std::sync::atomic::AtomicUsize,
    /// Holds the first start before it reaches the store: says so on the
    /// first channel, goes on when the second says.
    start_gate: StartGate,
    /// Holds the first lookup by secret likewise.
    lookup_gate: StartGate,
    /// Lookups batched, one call in flight (as the SQL and Redis stores).
    batched_lookups: bool,
    /// Left out of the first listing of chains (a chain begun just after
    /// it was read).
    first_chains_without: std::sync::Mutex<Option<impersonation_core::ChainKey>>,
}

type StartGate = std::sync::Mutex<
    Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    )>,
>;

impl BusyChain {
    fn new(stale: bool) -> Self {
        Self {
            inner: MemoryStore::new(),
            stale,
            consent_race: false.into(),
            consent_on_read: false.into(),
            stop_race: false.into(),
            listed_before: Duration::ZERO,
            found_before: Duration::ZERO,
            gone_after_first_read: false,
            reads: 0.into(),
            start_gate: std::sync::Mutex::new(None),
            lookup_gate: std::sync::Mutex::new(None),
            batched_lookups: false,
            first_chains_without: std::sync::Mutex::new(None),
        }
    }

    /// Batches lookups, and holds the first until `go`; `reached` says it
    /// is held.
    fn hold_lookup(
        reached: tokio::sync::oneshot::Sender<()>,
        go: tokio::sync::oneshot::Receiver<()>,
    ) -> Self {
        Self {
            lookup_gate: std::sync::Mutex::new(Some((reached, go))),
            batched_lookups: true,
            ..Self::new(false)
        }
    }

    fn gone_after_first_read() -> Self {
        Self {
            gone_after_first_read: true,
            ..Self::new(false)
        }
    }

    /// Holds the first start before the store writes it, until `go`;
    /// `reached` says it is held.
    fn hold_start(
        reached: tokio::sync::oneshot::Sender<()>,
        go: tokio::sync::oneshot::Receiver<()>,
    ) -> Self {
        Self {
            start_gate: std::sync::Mutex::new(Some((reached, go))),
            ..Self::new(false)
        }
    }

    fn consent_race() -> Self {
        Self {
            consent_race: true.into(),
            ..Self::new(false)
        }
    }

    fn consent_on_read() -> Self {
        Self {
            consent_on_read: true.into(),
            ..Self::new(false)
        }
    }

    fn stop_race() -> Self {
        Self {
            stop_race: true.into(),
            ..Self::new(false)
        }
    }

    fn found_before(touch: Duration) -> Self {
        Self {
            found_before: touch,
            ..Self::new(false)
        }
    }

    fn listed_before(touch: Duration) -> Self {
        Self {
            listed_before: touch,
            ..Self::new(false)
        }
    }

    /// Activates `pending`, as the customer's consent would.
    async fn consent(
        &self,
        pending: &impersonation_core::Session,
    ) -> Result<(), impersonation_core::StoreError> {
        let consent = pending
            .activate(impersonation_core::Actor::System, epoch())
            .unwrap();
        self.inner.transition(consent).await.map(|_| ())
    }
}

#[async_trait]
impl Store for BusyChain {
    async fn start(
        &self,
        s: impersonation_core::Start,
    ) -> Result<impersonation_core::StartOutcome, impersonation_core::StoreError> {
        let gate = self
            .start_gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((reached, go)) = gate {
            let _ = reached.send(());
            let _ = go.await;
        }
        self.inner.start(s).await
    }
    async fn transition(
        &self,
        t: impersonation_core::Transition,
    ) -> Result<(impersonation_core::Session, AuditEvent), impersonation_core::StoreError> {
        if self
            .consent_race
            .swap(false, std::sync::atomic::Ordering::SeqCst)
            && let Some(pending) = self.inner.session(t.next().id).await?
            && pending.state == SessionState::Pending
        {
            self.consent(&pending).await?;
        }
        if self
            .stop_race
            .swap(false, std::sync::atomic::Ordering::SeqCst)
            && let Some(live) = self.inner.session(t.next().id).await?
        {
            let by = impersonation_core::Actor::user(live.agent.id.clone(), "agent");
            let stop = live
                .end(
                    EndReason::Stopped,
                    by,
                    epoch(),
                    impersonation_core::Details::new(),
                )
                .unwrap();
            self.inner.transition(stop).await?;
        }
        self.inner.transition(t).await
    }
    async fn append(
        &self,
        e: impersonation_core::AuditDraft,
        g: impersonation_core::AppendGuard,
    ) -> Result<AuditEvent, impersonation_core::StoreError> {
        self.inner.append(e, g).await
    }
    fn batching(&self) -> impersonation_core::Batching {
        impersonation_core::Batching {
            lookups: usize::from(self.batched_lookups),
            ..impersonation_core::Batching::OFF
        }
    }
    async fn find_by_secret(
        &self,
        l: &impersonation_core::SecretLookup,
        t: Option<impersonation_core::Touch>,
    ) -> Result<Option<impersonation_core::Session>, impersonation_core::StoreError> {
        let gate = self
            .lookup_gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((reached, go)) = gate {
            let _ = reached.send(());
            let _ = go.await;
        }
        let mut found = self.inner.find_by_secret(l, t).await?;
        if let Some(s) = &mut found {
            s.last_seen_at -= self.found_before;
        }
        Ok(found)
    }
    async fn session(
        &self,
        id: impersonation_core::SessionId,
    ) -> Result<Option<impersonation_core::Session>, impersonation_core::StoreError> {
        let earlier = self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.gone_after_first_read && earlier > 0 {
            return Ok(None);
        }
        let read = self.inner.session(id).await?;
        if let Some(pending) = &read
            && pending.state == SessionState::Pending
            && self
                .consent_on_read
                .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.consent(pending).await?;
        }
        Ok(read)
    }
    async fn live_sessions(
        &self,
        f: &impersonation_core::LiveFilter,
    ) -> Result<Vec<impersonation_core::Session>, impersonation_core::StoreError> {
        let mut listed = self.inner.live_sessions(f).await?;
        for s in &mut listed {
            s.last_seen_at -= self.listed_before;
        }
        Ok(listed)
    }
    async fn record_check(
        &self,
        id: impersonation_core::SessionId,
        v: u64,
        at: time::OffsetDateTime,
        s: &impersonation_core::ShadowUser,
    ) -> Result<(), impersonation_core::StoreError> {
        self.inner.record_check(id, v, at, s).await
    }
    async fn audit(
        &self,
        q: &AuditQuery,
    ) -> Result<impersonation_core::AuditPage, impersonation_core::StoreError> {
        self.inner.audit(q).await
    }
    async fn chain_events(
        &self,
        c: &impersonation_core::ChainKey,
        from: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, impersonation_core::StoreError> {
        self.inner.chain_events(c, from, limit).await
    }
    async fn chain_head(
        &self,
        c: &impersonation_core::ChainKey,
    ) -> Result<Option<impersonation_core::ChainHead>, impersonation_core::StoreError> {
        let head = self.inner.chain_head(c).await?;
        // Busy are the agents' chains; a customer's revocation chain moves
        // only when a revocation writes it (a start reads it to tell).
        if c.as_str().starts_with("revocations:") {
            return Ok(head);
        }
        if self.stale {
            return Ok(self
                .inner
                .chain_events(c, 0, 1)
                .await?
                .first()
                .map(AuditEvent::head));
        }
        let draft = impersonation_core::AuditDraft::new(
            epoch(),
            AuditAction::Access,
            impersonation_core::Actor::System,
            c.clone(),
        );
        self.inner
            .append(draft, impersonation_core::AppendGuard::None)
            .await?;
        Ok(head)
    }
    async fn chains(
        &self,
        after: Option<&impersonation_core::ChainKey>,
        limit: u32,
    ) -> Result<Vec<impersonation_core::ChainKey>, impersonation_core::StoreError> {
        let mut chains = self.inner.chains(after, limit).await?;
        let without = self
            .first_chains_without
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(without) = without {
            chains.retain(|c| *c != without);
        }
        Ok(chains)
    }
}

/// A chain written to while it is verified is verified as of its head
/// when the check began: the events appended meanwhile are left for the
/// next check, not taken for a head that disagrees (a chain reported
/// broken while nothing was changed).
#[tokio::test]
async fn a_chain_written_to_while_it_is_verified_still_verifies() {
    let f = fixture_with(BusyChain::new(false), Policy::default(), Config::default());
    f.sam_on_olive().await;
    let chain = impersonation_core::ChainKey::for_agent(&id("sam"));
    let report = f.service.verify_chain(&chain).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    // The next check covers what was appended during the first.
    let again = f.service.verify_chain(&chain).await.unwrap().unwrap();
    assert!(again.events >= 2, "{again:?}");
    // The whole trail too: its listing shows an event appended past what
    // was verified (at the second read of the head), and it is the
    // chain's.
    let all = f.service.verify_all().await.unwrap();
    assert!(all.is_ok(), "{all:?}");
    let all = f.service.verify_agent(&id("sam")).await.unwrap();
    assert!(all.is_ok(), "{all:?}");
    // Filtered listings likewise (the customer's, the accesses'): what
    // they show past the verified end is held to the chain, not counted.
    for query in [
        AuditQuery {
            subject: Some(id("olive")),
            ..AuditQuery::default()
        },
        AuditQuery {
            action: Some(AuditAction::Access),
            ..AuditQuery::default()
        },
    ] {
        let report = f.service.verify_listing(&query).await.unwrap();
        assert!(report.is_ok(), "{query:?}: {report:?}");
    }
    // A chain the first listing of chains missed (begun just after it was
    // read) but the listing of events shows: it is listed by the next
    // look, so it is verified and compared, not reported.
    *f.service.store().first_chains_without.lock().unwrap() = Some(chain.clone());
    let all = f.service.verify_all().await.unwrap();
    assert!(all.is_ok(), "{all:?}");
    assert!(all.verified.iter().any(|c| c.chain == chain), "{all:?}");

    // Events past a head that never moves are still a mismatch.
    let f = fixture_with(BusyChain::new(true), Policy::default(), Config::default());
    let started = f.sam_on_olive().await;
    f.service
        .stop(&started.secret, &agent("sam"))
        .await
        .unwrap();
    let broken = f.service.verify_chain(&chain).await.unwrap().unwrap_err();
    assert_eq!(broken.kind, impersonation_core::BreakKind::HeadMismatch);
}

/// Someone who may not stop or revoke a session is refused as such, and
/// audited, even once it has ended: the answer does not tell a stranger
/// how it ended.
#[tokio::test]
async fn a_stranger_is_refused_even_on_an_ended_session_and_audited() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    f.service
        .stop(&started.secret, &agent("sam"))
        .await
        .unwrap();
    let before = denied(&f, "not_session_agent").await;

    let revoke = f
        .service
        .revoke(started.session.id, &agent("kim"), "")
        .await;
    assert!(
        matches!(revoke, Err(Error::Denied(Denial::NotSessionAgent))),
        "{revoke:?}"
    );
    let stop = f.service.stop(&started.secret, &agent("kim")).await;
    assert!(
        matches!(stop, Err(Error::Denied(Denial::NotSessionAgent))),
        "{stop:?}"
    );
    assert_eq!(denied(&f, "not_session_agent").await, before + 2);
    // The agent themself still hears how it ended.
    let again = f.service.stop(&started.secret, &agent("sam")).await;
    assert!(
        matches!(again, Err(Error::Ended(EndReason::Stopped))),
        "{again:?}"
    );
}

/// A customer who declines a session its agent stopped a moment before
/// is told it had ended (stopped), not that the decline ended it.
#[tokio::test]
async fn declining_a_session_stopped_meanwhile_says_it_had_ended() {
    let consent = consent_policy();
    let f = fixture_with(BusyChain::stop_race(), consent, Config::default());
    let started = f.sam_on_olive().await;
    let declined = f
        .service
        .deny_consent(started.session.id, &customer("olive"))
        .await;
    assert!(
        matches!(declined, Err(Error::Ended(EndReason::Stopped))),
        "{declined:?}"
    );
}

/// A directory that takes 11 minutes (on the shared manual clock) to
/// answer its next lookup once `slow` is set.
struct SlowDirectory {
    inner: MemoryDirectory,
    clock: ManualClock,
    slow: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Directory for SlowDirectory {
    async fn principal(&self, id: &UserId) -> Result<Option<Principal>, DirectoryError> {
        if self.slow.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.clock.advance(Duration::minutes(11));
        }
        self.inner.principal(id).await
    }
}

/// A consent whose directory check takes the request past the window's
/// close activates nothing: the session has expired, on the trail.
#[tokio::test]
async fn a_consent_that_the_directory_holds_past_the_window_expires_the_session() {
    let f = fixture_with(MemoryStore::new(), consent_policy(), Config::default());
    let started = f.sam_on_olive().await;
    let directory = Arc::new(SlowDirectory {
        inner: f.directory.clone(),
        clock: f.clock.clone(),
        slow: std::sync::atomic::AtomicBool::new(true),
    });
    let slow = Impersonation::new(f.service.store().clone(), directory)
        .with_clock(f.clock.clone())
        .with_policy(consent_policy());
    let granted = slow
        .grant_consent(started.session.id, &customer("olive"))
        .await;
    assert!(
        matches!(granted, Err(Error::Ended(EndReason::Expired))),
        "{granted:?}"
    );
    let stored = f.stored(started.session.id).await;
    assert_eq!(stored.state, SessionState::Ended(EndReason::Expired));
    assert_eq!(stored.activated_at, None);
}

/// Consent given to a session stopped meanwhile says it had ended (not
/// a conflict, a 503); consent given after the agent lost the right to
/// impersonate ends the session as revoked, on the trail, rather than
/// starting one the first use would end; and a request whose window has
/// passed is no longer listed as awaiting an answer.
#[tokio::test]
async fn consent_is_judged_as_the_pair_and_the_session_stand_now() {
    let consent = consent_policy();
    let f = fixture_with(BusyChain::stop_race(), consent.clone(), Config::default());
    let started = f.sam_on_olive().await;
    let granted = f
        .service
        .grant_consent(started.session.id, &customer("olive"))
        .await;
    assert!(
        matches!(granted, Err(Error::Ended(EndReason::Stopped))),
        "{granted:?}"
    );

    let f = fixture_with(BusyChain::new(false), consent, Config::default());
    let started = f.sam_on_olive().await;
    f.directory.insert(
        Principal::new(id("sam"), "sam", TenantId::new("vendor").unwrap())
            .with_permissions(["bookings:read"]),
    );
    let granted = f
        .service
        .grant_consent(started.session.id, &customer("olive"))
        .await;
    assert!(
        matches!(granted, Err(Error::Ended(EndReason::Revoked))),
        "{granted:?}"
    );
    let events = session_events(&f, started.session.id).await;
    assert!(
        events
            .iter()
            .all(|e| e.action != AuditAction::SessionStarted
                || e.details.get("consented_by").is_none()),
        "{events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last.action, AuditAction::SessionEnded);
    assert!(last.details.get("denial").is_some(), "{last:?}");

    let kim = f
        .service
        .start(Requester::User(&agent("kim")), req("olive"))
        .await
        .unwrap();
    let waiting = f.service.pending_consents(&id("olive")).await.unwrap();
    assert_eq!(
        waiting.iter().map(|s| s.id).collect::<Vec<_>>(),
        [kim.session.id]
    );
    f.clock.advance(Duration::minutes(11));
    assert!(
        f.service
            .pending_consents(&id("olive"))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A revoke-all whose listing a consent overtakes (the session it ends
/// was activated a moment before) reads that session again and ends it,
/// and goes on to the others: every session on the customer ends.
#[tokio::test]
async fn a_revoke_all_ends_a_session_that_changed_since_it_was_listed() {
    let consent = consent_policy();
    let f = fixture_with(BusyChain::consent_race(), consent, Config::default());
    let mut started = Vec::new();
    for who in ["sam", "kim"] {
        let s = f
            .service
            .start(Requester::User(&agent(who)), req("olive"))
            .await
            .unwrap();
        started.push(s.session.id);
    }
    let revoked = f
        .service
        .revoke_all_for_subject(&id("olive"), Initiator::System, "password changed")
        .await
        .unwrap();
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    for session in started {
        let now = f.stored(session).await;
        assert_eq!(now.state, SessionState::Ended(EndReason::Revoked));
    }
}

/// A stop, a revoke and the policy re-check's revocation that meet a
/// consent (the session they end was activated since they read it) end
/// the session as it now stands, as a revoke-all does: the agent asked to
/// end it, and it must not stay live for its whole duration.
#[tokio::test]
async fn a_stop_or_revoke_racing_a_consent_still_ends_the_session() {
    let f = fixture_with(
        BusyChain::consent_race(),
        consent_policy(),
        Config::default(),
    );
    let started = f.sam_on_olive().await;
    assert_eq!(started.session.state, SessionState::Pending);
    let stopped = f.service.stop(&started.secret, &agent("sam")).await;
    assert!(matches!(stopped, Ok(EndReason::Stopped)), "{stopped:?}");
    assert_eq!(
        f.stored(started.session.id).await.state,
        SessionState::Ended(EndReason::Stopped)
    );

    let f = fixture_with(
        BusyChain::consent_race(),
        consent_policy(),
        Config::default(),
    );
    let started = f.sam_on_olive().await;
    let revoked = f
        .service
        .revoke(started.session.id, &lead(), "customer called")
        .await;
    assert!(matches!(revoked, Ok(EndReason::Revoked)), "{revoked:?}");
    let now = f.stored(started.session.id).await;
    assert_eq!(now.state, SessionState::Ended(EndReason::Revoked));
    // One end on the trail, the revoke's, after the consent.
    let trail = f
        .service
        .store()
        .chain_events(&ChainKey::for_agent(&id("sam")), 0, 10)
        .await
        .unwrap();
    let trail: Vec<_> = trail
        .iter()
        .map(|e| (e.action, e.details.get("reason").map(str::to_owned)))
        .collect();
    assert_eq!(
        trail,
        [
            // The busy chain's own write, as the start first read its head.
            (AuditAction::Access, None),
            (AuditAction::SessionRequested, None),
            (AuditAction::SessionStarted, None),
            (AuditAction::SessionEnded, Some("revoked".to_owned())),
        ]
    );

    // A decline that meets a consent (the customer's other tab) leaves the
    // consent standing: only a session still pending is declined.
    let f = fixture_with(
        BusyChain::consent_race(),
        consent_policy(),
        Config::default(),
    );
    let started = f.sam_on_olive().await;
    let declined = f
        .service
        .deny_consent(started.session.id, &customer("olive"))
        .await;
    assert!(
        matches!(
            declined,
            Err(Error::Transition(TransitionError {
                from: SessionState::Active,
                to: SessionState::Ended(EndReason::ConsentDenied),
            }))
        ),
        "{declined:?}"
    );
    assert_eq!(
        f.stored(started.session.id).await.state,
        SessionState::Active
    );
}

/// Whose sessions a revoke-all ends.
#[derive(Clone, Copy)]
enum Revoking {
    /// Olive's (her password changed).
    Customer,
    /// Sam's (demoted in the directory first).
    Agent,
}

/// Sam's start on Olive, held before the store writes it while a
/// revoke-all of Olive's (or Sam's) sessions runs (its listing then finds
/// nothing to end), on a `BusyChain` that `configure` sets up further: the
/// start's outcome, what the revoke-all ended, and Olive's live sessions
/// after.
async fn start_overtaken_by_revocation(
    configure: impl FnOnce(BusyChain) -> BusyChain,
    policy: Policy,
) -> (
    Fixture<BusyChain>,
    Result<Started, Error>,
    Vec<impersonation_core::SessionId>,
    Vec<impersonation_core::Session>,
) {
    start_overtaken_by(Revoking::Customer, configure, policy).await
}

async fn start_overtaken_by(
    revoking: Revoking,
    configure: impl FnOnce(BusyChain) -> BusyChain,
    policy: Policy,
) -> (
    Fixture<BusyChain>,
    Result<Started, Error>,
    Vec<impersonation_core::SessionId>,
    Vec<impersonation_core::Session>,
) {
    let (reached_tx, reached) = tokio::sync::oneshot::channel();
    let (go, go_rx) = tokio::sync::oneshot::channel();
    let store = configure(BusyChain::hold_start(reached_tx, go_rx));
    let f = fixture_with(store, policy, Config::default());
    let sam = agent("sam");
    let start = f.service.start(Requester::User(&sam), req("olive"));
    let revoke = async {
        reached.await.unwrap();
        if matches!(revoking, Revoking::Agent) {
            f.demote_sam();
        }
        let revoked = f.revoke_all(revoking).await.unwrap();
        go.send(()).unwrap();
        revoked
    };
    let (started, revoked) = tokio::join!(start, revoke);
    let live = f
        .service
        .store()
        .live_sessions(&LiveFilter {
            subject: Some(id("olive")),
            ..LiveFilter::default()
        })
        .await
        .unwrap();
    (f, started, revoked, live)
}

/// A start that a revocation of the customer's sessions overtakes (the
/// revocation lists them after the start read the directory and before it
/// wrote its session, so it finds nothing to end) ends its session at once,
/// as revoked, and hands out no secret. The trail holds the revocation, in
/// the customer's revocation chain, and the session's start and end.
#[tokio::test]
async fn a_start_a_revocation_overtakes_ends_its_session_at_once() {
    let (f, started, revoked, live) =
        start_overtaken_by_revocation(|store| store, Policy::default()).await;
    assert!(
        revoked.is_empty(),
        "nothing was written to list: {revoked:?}"
    );
    assert!(
        matches!(started, Err(Error::RevokedWhileStarting)),
        "{started:?}"
    );
    assert!(live.is_empty(), "{live:?}");
    let trail = all_events(
        f.service.store(),
        AuditQuery {
            subject: Some(id("olive")),
            ..AuditQuery::default()
        },
    )
    .await;
    let mut trail: Vec<(AuditAction, Option<String>)> = trail
        .iter()
        .map(|e| (e.action, e.details.get("cause").map(str::to_owned)))
        .collect();
    trail.sort_by_key(|(action, _)| *action);
    assert_eq!(
        trail,
        [
            (AuditAction::SessionStarted, None),
            (
                AuditAction::SessionEnded,
                Some("revoked_while_starting".to_owned())
            ),
            (
                AuditAction::SessionsRevoked,
                Some("subject_changed".to_owned())
            ),
        ]
    );
    // A start after the revocation is the customer's new state's: it stands.
    f.sam_on_olive().await;
}

/// The same for a revocation of the agent's sessions (the agent demoted
/// after the start read the directory): the start's session ends at once,
/// as revoked, its secret unhanded; the agent's chain holds the
/// revocation, then the session's start and end.
#[tokio::test]
async fn a_start_an_agent_revocation_overtakes_ends_its_session_at_once() {
    let (f, started, revoked, live) =
        start_overtaken_by(Revoking::Agent, |store| store, Policy::default()).await;
    assert!(revoked.is_empty(), "{revoked:?}");
    assert!(
        matches!(started, Err(Error::RevokedWhileStarting)),
        "{started:?}"
    );
    assert!(live.is_empty(), "{live:?}");
    let own = f
        .service
        .store()
        .chain_events(&ChainKey::for_agent(&id("sam")), 0, 10)
        .await
        .unwrap();
    let own: Vec<_> = own
        .iter()
        .map(|e| (e.action, e.details.get("cause").map(str::to_owned)))
        .collect();
    assert_eq!(
        own,
        [
            // The busy chain's own write, as the start first read its head:
            // other events in the agent's chain are not a revocation.
            (AuditAction::Access, None),
            (
                AuditAction::SessionsRevoked,
                Some("agent_revoked".to_owned())
            ),
            (AuditAction::SessionStarted, None),
            (
                AuditAction::SessionEnded,
                Some("revoked_while_starting".to_owned())
            ),
        ]
    );
    // Demoted, Sam cannot start again, whatever the host's copy of him says.
    let again = f
        .service
        .start(Requester::User(&agent("sam")), req("olive"))
        .await;
    assert!(
        matches!(again, Err(Error::Denied(Denial::MissingPermission))),
        "{again:?}"
    );
}

/// A start is judged on the agent as the directory has them, not only as
/// the host read them when its request began: an agent demoted meanwhile
/// is refused (audited), as their session's first use would end it.
#[tokio::test]
async fn a_start_by_an_agent_the_directory_has_demoted_is_refused() {
    let f = fixture();
    f.demote_sam();
    let started = f
        .service
        .start(Requester::User(&agent("sam")), req("olive"))
        .await;
    assert!(
        matches!(started, Err(Error::Denied(Denial::MissingPermission))),
        "{started:?}"
    );
    // So is an agent the directory no longer knows.
    f.directory.remove(&id("kim"));
    let unknown = f
        .service
        .start(Requester::User(&agent("kim")), req("olive"))
        .await;
    assert!(
        matches!(unknown, Err(Error::Denied(Denial::UnknownAgent))),
        "{unknown:?}"
    );
    let denied = all_events(
        f.service.store(),
        AuditQuery {
            action: Some(AuditAction::Denied),
            ..AuditQuery::default()
        },
    )
    .await;
    let mut codes: Vec<_> = denied
        .iter()
        .map(|e| {
            (
                e.chain.to_string(),
                e.details.get("denial").map(str::to_owned),
            )
        })
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            ("kim".to_owned(), Some("unknown_agent".to_owned())),
            ("sam".to_owned(), Some("missing_permission".to_owned())),
        ]
    );
}

/// A revocation of an agent's sessions is on the trail even when there is
/// none to end, in the agent's own chain (so their part of the trail shows
/// it), which verifies; a start after it stands.
#[tokio::test]
async fn a_revocation_is_recorded_in_the_agents_chain() {
    let f = fixture();
    let revoked = f
        .service
        .revoke_all_for_agent(&id("sam"), Initiator::User(&lead()), "left the team")
        .await
        .unwrap();
    assert!(revoked.is_empty());
    let trail = all_events(
        f.service.store(),
        AuditQuery {
            agent: Some(id("sam")),
            ..AuditQuery::default()
        },
    )
    .await;
    assert_eq!(trail.len(), 1);
    let event = &trail[0];
    assert_eq!(event.action, AuditAction::SessionsRevoked);
    assert_eq!(event.subject, None);
    assert_eq!(event.details.get("agent"), Some("sam"));
    assert_eq!(event.details.get("note"), Some("left the team"));
    assert_eq!(
        event.describe(),
        "Revoked every impersonation by the agent. Agent: sam. Note: \u{201C}left the team\u{201D}. Cause: agent_revoked."
    );
    assert!(
        matches!(&event.actor, impersonation_core::Actor::User { id: who, .. } if who.as_str() == "lead")
    );
    let chain = ChainKey::for_agent(&id("sam"));
    let head = f.service.store().chain_head(&chain).await.unwrap();
    assert!(verify_chain(&chain, &trail, head).is_ok());
    // Sam was not demoted: his next start is his new state's, and stands.
    f.sam_on_olive().await;
}

/// A consent-required start that a revocation overtakes, its session
/// consented to by the customer in the moment the start ends it: read
/// again and ended all the same, never left live with a secret nobody has.
#[tokio::test]
async fn an_overtaken_start_consented_meanwhile_is_ended_all_the_same() {
    let consent = consent_policy();
    let (_, started, _, live) = start_overtaken_by_revocation(
        |store| BusyChain {
            consent_race: true.into(),
            ..store
        },
        consent,
    )
    .await;
    assert!(
        matches!(started, Err(Error::RevokedWhileStarting)),
        "{started:?}"
    );
    assert!(live.is_empty(), "{live:?}");
}

/// A revocation whose own record cannot be written still ends the
/// sessions, and then answers the failure: a revocation of the customer's
/// sessions, and one of the agent's.
#[tokio::test]
async fn a_revocation_ends_the_sessions_even_if_its_record_fails() {
    for revoking in [Revoking::Customer, Revoking::Agent] {
        let f = fixture_with(
            FaultyStore::new(MemoryStore::new()),
            Policy::default(),
            Config::default(),
        );
        let started = f.sam_on_olive().await;
        f.service.store().fail_next_write(When::Before);
        let outcome = f.revoke_all(revoking).await;
        assert!(matches!(outcome, Err(Error::Store(_))), "{outcome:?}");
        let now = f.stored(started.session.id).await;
        assert_eq!(now.state, SessionState::Ended(EndReason::Revoked));
    }
}

/// A revocation of a customer's sessions is on the trail even when there
/// is none to end, in the customer's own revocation chain, which verifies.
#[tokio::test]
async fn a_revocation_is_recorded_in_the_customers_revocation_chain() {
    let f = fixture();
    let revoked = f
        .service
        .revoke_all_for_subject(&id("olive"), Initiator::System, "password changed")
        .await
        .unwrap();
    assert!(revoked.is_empty());
    let chain = ChainKey::revocations_of(&id("olive"));
    let events = f.service.store().chain_events(&chain, 0, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event.action, AuditAction::SessionsRevoked);
    assert_eq!(event.subject.as_ref().map(|p| p.id.as_str()), Some("olive"));
    assert_eq!(
        event.describe(),
        "Revoked every impersonation of the customer. Note: \u{201C}password changed\u{201D}. Cause: subject_changed."
    );
    let head = f.service.store().chain_head(&chain).await.unwrap();
    verify_chain(&chain, &events, head).unwrap();
    assert_ne!(chain, ChainKey::for_agent(&id("olive")));
}

/// A watcher's check (a stream, a WebSocket) sees the session as a request
/// would, but is no use of it: checks every minute do not keep a session
/// alive that its agent walked away from, and the one that finds it idle
/// ends it, on the trail.
#[tokio::test]
async fn checking_a_session_does_not_keep_it_alive_and_ends_it_when_idle() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    let id = started.session.id;
    let before = f.service.check_session(id).await.unwrap();
    for _ in 0..14 {
        f.clock.advance(Duration::minutes(1));
        let ctx = f.service.check_session(id).await.unwrap();
        assert_eq!(ctx.idle_deadline(), before.idle_deadline(), "no touch");
    }
    f.clock.advance(Duration::minutes(1));
    assert!(matches!(
        f.service.check_session(id).await,
        Err(Error::Ended(EndReason::IdleTimeout))
    ));
    let end = session_events(&f, id).await.pop().unwrap();
    assert_eq!(
        (end.action, end.details.get("reason")),
        (AuditAction::SessionEnded, Some("idle_timeout"))
    );
    // Another request's use in between does move the deadline it checks.
    let again = f
        .service
        .start(Requester::User(&agent("sam")), req("olive"))
        .await
        .unwrap();
    f.clock.advance(Duration::minutes(10));
    f.service.resolve(&again.secret).await.unwrap();
    f.clock.advance(Duration::minutes(10));
    let ctx = f.service.check_session(again.session.id).await.unwrap();
    assert_eq!(ctx.idle_deadline(), f.service.now() + Duration::minutes(5));
}

/// A check finds a stopped session ended, and one the policy no longer
/// allows (its re-check due) revoked, as a request would.
#[tokio::test]
async fn checking_a_session_finds_it_stopped_or_revoked() {
    let f = fixture();
    let started = f.sam_on_olive().await;
    f.service
        .stop(&started.secret, &agent("sam"))
        .await
        .unwrap();
    assert!(matches!(
        f.service.check_session(started.session.id).await,
        Err(Error::Ended(EndReason::Stopped))
    ));
    let started = f.sam_on_olive().await;
    f.demote_sam();
    f.clock.advance(Duration::minutes(2));
    assert!(matches!(
        f.service.check_session(started.session.id).await,
        Err(Error::Ended(EndReason::Revoked))
    ));
    assert!(matches!(
        f.service
            .check_session(impersonation_core::SessionId::new())
            .await,
        Err(Error::Unauthenticated)
    ));
}

/// The filters of one generated listing: agent, customer, tenant, actor
/// (each one of a few, some matching nothing, or none past them), action,
/// and a time window in steps of 2 s from the epoch (none from 8).
type Filters = (u8, u8, u8, u8, u8, u8, u8);

/// The listing `filters` select.
fn filtered(filters: Filters) -> AuditQuery {
    let (agent, subject, tenant, actor, action, since, until) = filters;
    let person = |n: u8, names: [&str; 2]| names.get(usize::from(n)).map(|s| id(s));
    let at = |s: u8| (s < 8).then(|| epoch() + Duration::seconds(i64::from(s) * 2));
    AuditQuery {
        agent: person(agent, ["sam", "kim"]),
        subject: person(subject, ["olive", "oscar"]),
        tenant: ["pinewood", "vendor"]
            .get(usize::from(tenant))
            .map(|t| TenantId::new(*t).unwrap()),
        actor: person(actor, ["kim", "olive"]),
        action: [
            AuditAction::SessionStarted,
            AuditAction::Access,
            AuditAction::SessionEnded,
        ]
        .get(usize::from(action))
        .copied(),
        since: at(since),
        until: at(until),
        ..AuditQuery::default()
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Whatever its filters, the listing of an intact store verifies, and
    /// `selected` is the number of chained events they select; with one of
    /// those events taken out of every listing, `verify_listing` names its
    /// chain and counts one fewer listed.
    #[test]
    fn any_filtered_listing_verifies_and_one_hidden_event_is_found(
        visits in proptest::collection::vec(
            (proptest::bool::ANY, proptest::bool::ANY, 0_u8..3, 0_u8..3),
            1..6,
        ),
        // Each filter left out more often than not.
        filters in (0_u8..5, 0_u8..5, 0_u8..5, 0_u8..5, 0_u8..7, 0_u8..16, 0_u8..16),
        hide in 0_usize..64,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let f = fixture_with(
                FaultyStore::new(MemoryStore::new()),
                Policy::default(),
                Config::default(),
            );
            // Each visit: an agent impersonates a customer, reads some
            // pages a second apart, and stops.
            for (by_kim, of_oscar, reads, gap) in visits {
                f.clock.advance(Duration::seconds(i64::from(gap)));
                let agent = agent(if by_kim { "kim" } else { "sam" });
                let started = f
                    .service
                    .start(Requester::User(&agent), req(if of_oscar { "oscar" } else { "olive" }))
                    .await
                    .unwrap();
                let ctx = f.service.resolve(&started.secret).await.unwrap();
                for _ in 0..reads {
                    f.clock.advance(Duration::seconds(1));
                    f.service
                        .record(&ctx, Activity::access("Viewed bookings."))
                        .await
                        .unwrap();
                }
                f.service.stop(&started.secret, &agent).await.unwrap();
            }
            let query = filtered(filters);
            let mut chosen = Vec::new();
            for agent in ["sam", "kim"] {
                let chain = ChainKey::for_agent(&id(agent));
                chosen.extend(
                    whole_chain(f.service.store(), &chain)
                        .await
                        .into_iter()
                        .filter(|e| query.matches(e)),
                );
            }
            let report = f.service.verify_listing(&query).await.unwrap();
            assert!(report.is_ok(), "{query:?}: {report:?}");
            assert_eq!(report.selected, chosen.len() as u64, "{query:?}");

            let Some(hidden) = chosen.get(hide % chosen.len().max(1)).cloned() else {
                return;
            };
            let in_chain = chosen.iter().filter(|e| e.chain == hidden.chain).count() as u64;
            let hidden_id = hidden.id;
            f.service
                .store()
                .edit_listing(move |_: &AuditQuery, page: &mut Vec<AuditEvent>| {
                    page.retain(|e| e.id != hidden_id);
                });
            let report = f.service.verify_listing(&query).await.unwrap();
            assert_eq!(
                report.listing,
                [ListingMismatch::Count {
                    chain: hidden.chain.clone(),
                    chained: in_chain,
                    listed: in_chain - 1,
                }],
                "{query:?}"
            );
        });
    }
}
