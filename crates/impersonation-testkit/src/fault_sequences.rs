//! Random sequences of service calls with store faults among them: the
//! [`FaultyStore`] wrapper fails a random call of a step, before the inner
//! store runs it or after (the store acted, the caller got an error), and
//! the trail must hold whatever happened. No model of outcomes: a call
//! that failed may or may not have acted, so each check reads the store
//! alone, after every step, with the fault healed:
//!
//! 1. every session found (started with an answer, listed live by a
//!    check, or named by an event) is held by the store and has its start
//!    event first in its agent's chain: no session without its audit
//!    record, and no record of a session the store lacks (a session with
//!    no event at all that a step made and ended unseen is beyond what
//!    the `Store` trait can list);
//! 2. an ended session has exactly one end event, last, with the state's
//!    reason; a live one none;
//! 3. at most one live session per agent;
//! 4. every chain verifies against its head (the agents' and the
//!    customers' revocation chains).
//!
//! And the answers that matter fail closed:
//!
//! 5. a resolve or record during which a fault fired answers an error
//!    (it is never served, or reported recorded, past a store call that
//!    failed);
//! 6. a resolve that answers serves a session the store holds active and
//!    in time;
//! 7. a record that answers returned an event that is on its agent's
//!    chain, once.
//!
//! Run it on a store beside [`crate::machine::run_state_machine`]: that one
//! checks the outcomes against a model with no fault, this one the trail's
//! completeness under faults.
//!
//! [`run_concurrent_sequences`] runs the same calls with no fault, one to
//! three at a time, each a task of its own on a runtime of two workers
//! (starts racing starts and revocations, records racing stops, lapses
//! ended twice), every store call yielding a few times and group commit
//! on, so that the calls interleave at their store calls and share
//! batched ones as they would on a database. Invariants 1 to 4 and 7
//! hold after each step, and 6 for every resolve on its own: each step
//! of one call, and each agent's latest secret and session resolved
//! after every step of several (a read that raced an end must not have
//! put the ended session back for reuse). A step that never finishes (a
//! deadlock between the calls) fails its case. How the calls meet
//! depends on the scheduler, so a failing case may not fail again when
//! run alone, and proptest's shrinking may stop short of the smallest.
//! [`run_concurrent_sequences_in_two_processes`] spreads the calls over
//! two services on two instances of the store (two instances of the
//! app), for invariants 1 to 4 and 7, and 6 as far as reuse allows.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use impersonation_core::{
    Activity, AuditEvent, Batching, ChainKey, Error, Impersonation, Initiator, ManualClock,
    MemoryDirectory, Policy, Principal, Requester, SessionId, SessionSecret, StartRequest, Store,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use time::Duration;

use crate::faults::{Calls, FaultyStore, When};
use crate::machine::{
    MachineConfig, fail, live_of, runtime_and_runner, stored_with_its_events, verified_chain,
};
use crate::world::{World, epoch};

/// Agents in a case.
const AGENTS: usize = 2;
/// Customers in a case.
const TARGETS: usize = 2;

/// One call of a sequence.
#[derive(Debug, Clone)]
enum Call {
    Start {
        agent: usize,
        target: usize,
    },
    Resolve {
        agent: usize,
    },
    /// `resolve_session_reusing`: the agent's latest session by id, as a
    /// signed token names it (reused for reads as a secret is).
    ResolveById {
        agent: usize,
    },
    /// `resolve_fresh`: the agent's latest secret, read from the store
    /// (as for a change), never from the reuse map.
    ResolveFresh {
        agent: usize,
    },
    Record {
        agent: usize,
        modification: bool,
    },
    /// `record_completed`: a change made in a session that ended
    /// meanwhile is recorded after its end.
    Complete {
        agent: usize,
        modification: bool,
    },
    Stop {
        agent: usize,
    },
    RevokeAllForAgent {
        agent: usize,
    },
    RevokeAllForSubject {
        target: usize,
    },
    EndLapsed,
    Advance {
        minutes: i64,
    },
}

/// A call, and the fault planned for it: its `nth` store call (of those
/// counted) fails.
#[derive(Debug, Clone)]
struct Step {
    call: Call,
    fault: Option<(usize, When, Calls)>,
}

fn call_strategy() -> impl Strategy<Value = Call> {
    prop_oneof![
        3 => (0..AGENTS, 0..TARGETS).prop_map(|(agent, target)| Call::Start { agent, target }),
        3 => (0..AGENTS).prop_map(|agent| Call::Resolve { agent }),
        1 => (0..AGENTS).prop_map(|agent| Call::ResolveById { agent }),
        1 => (0..AGENTS).prop_map(|agent| Call::ResolveFresh { agent }),
        3 => (0..AGENTS, any::<bool>())
            .prop_map(|(agent, modification)| Call::Record { agent, modification }),
        1 => (0..AGENTS, any::<bool>())
            .prop_map(|(agent, modification)| Call::Complete { agent, modification }),
        2 => (0..AGENTS).prop_map(|agent| Call::Stop { agent }),
        1 => (0..AGENTS).prop_map(|agent| Call::RevokeAllForAgent { agent }),
        1 => (0..TARGETS).prop_map(|target| Call::RevokeAllForSubject { target }),
        1 => Just(Call::EndLapsed),
        1 => (1_i64..=90).prop_map(|minutes| Call::Advance { minutes }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let fault = prop::option::weighted(
        0.6,
        (
            // `fail_nth` counts from 1; a start alone makes six store
            // calls, and a lapse ended on the way more.
            1_usize..=8,
            prop_oneof![Just(When::Before), Just(When::After)],
            prop_oneof![Just(Calls::All), Just(Calls::Writes)],
        ),
    );
    (call_strategy(), fault).prop_map(|(call, fault)| Step { call, fault })
}

/// The service under test, shared by the tasks of a step.
type Service<S> = Arc<Impersonation<FaultyStore<S>, MemoryDirectory>>;

/// A call under way, holding all it needs (so that it runs as a task of
/// its own beside others).
type Running = Pin<Box<dyn Future<Output = Effect> + Send>>;

/// What a call's answer tells the case.
enum Effect {
    Nothing,
    Started {
        agent: usize,
        session: SessionId,
        secret: SessionSecret,
    },
    Resolved {
        agent: usize,
        ctx: impersonation_core::Context,
    },
    Unresolved {
        agent: usize,
    },
    Recorded {
        agent: usize,
        event: impersonation_core::EventId,
    },
}

impl Effect {
    /// What a resolve of `agent`'s session answered.
    fn resolved(agent: usize, answer: Result<impersonation_core::Context, Error>) -> Self {
        match answer {
            Ok(ctx) => Self::Resolved { agent, ctx },
            Err(_) => Self::Unresolved { agent },
        }
    }
}

struct Case<S: Store> {
    service: Service<S>,
    /// A second process of the app on the same store, if the case has
    /// one: its own reuse map and group commit, the same directory and
    /// clock.
    elsewhere: Option<Service<S>>,
    clock: ManualClock,
    agents: [Principal; AGENTS],
    targets: [Principal; TARGETS],
    /// Each agent's latest secret, from a start that answered.
    secrets: BTreeMap<usize, SessionSecret>,
    /// Each agent's latest session, from a start that answered.
    sessions: BTreeMap<usize, SessionId>,
    /// Each agent's latest context, from a resolve that answered.
    contexts: BTreeMap<usize, impersonation_core::Context>,
    /// Every session seen: started with an answer, listed live by a check
    /// (a start whose answer a fault lost), or named by an event (one made
    /// and ended in a step).
    seen: BTreeSet<SessionId>,
    /// Events a record answered with, by id, with their agents: each
    /// must be on that agent's chain.
    recorded: BTreeSet<(usize, impersonation_core::EventId)>,
}

impl<S: Store + 'static> Case<S> {
    /// A case on `store`; `racing`, for calls side by side: every store
    /// call yields a few times, and an answer-at-once store gets group
    /// commit (so that racing calls share batched calls, as on a
    /// database).
    fn new(store: S, racing: bool, second: Option<S>) -> Self {
        let wrap = |store: S| {
            let mut wrapped = FaultyStore::new(store);
            if racing {
                wrapped.yield_on_every_call();
                if wrapped.batching() == Batching::OFF {
                    wrapped = wrapped.with_batching(Batching {
                        appends: 1,
                        lookups: 1,
                    });
                }
            }
            wrapped
        };
        let world = World::new();
        let agents: [Principal; AGENTS] = [world.agent(0), world.agent(1)];
        let targets: [Principal; TARGETS] = [world.customer(0, "t1"), world.customer(1, "t1")];
        let directory = MemoryDirectory::new();
        for p in agents.iter().chain(&targets) {
            directory.insert(p.clone());
        }
        let clock = ManualClock::new(epoch());
        let policy = Policy::default()
            .max_duration(Duration::hours(2))
            .idle_timeout(Duration::minutes(30));
        let process = |store: S| {
            Arc::new(
                Impersonation::new(wrap(store), directory.clone())
                    .with_policy(policy.clone())
                    .with_projection(world.rules.clone())
                    .with_clock(clock.clone()),
            )
        };
        Self {
            service: process(store),
            elsewhere: second.map(process),
            clock,
            agents,
            targets,
            secrets: BTreeMap::new(),
            sessions: BTreeMap::new(),
            contexts: BTreeMap::new(),
            seen: BTreeSet::new(),
            recorded: BTreeSet::new(),
        }
    }

    /// Runs one call. What most answer is not judged (a fault may fail
    /// any of them), only what they leave in the store; a resolve's and a
    /// record's answers are (invariants 5 to 7).
    async fn run(&mut self, call: &Call) -> Result<(), TestCaseError> {
        let faults_before = self.service.store().injected();
        let effect = self.call(call, false).await;
        let faulted = self.service.store().injected() > faults_before;
        match &effect {
            Effect::Resolved { ctx, .. } => {
                if faulted {
                    return Err(fail("a resolve answered past a failed store call".into()));
                }
                // With a second process, an end made there is not seen
                // by this one's reuse map until it reads the store (an
                // audited request is refused there): a read from the
                // reuse map may serve a session the other ended within
                // the reuse interval, never one ended before it.
                let reused = self.elsewhere.is_some() && !matches!(call, Call::ResolveFresh { .. });
                self.serves_a_live_session(ctx, reused).await?;
            }
            Effect::Recorded { .. } if faulted => {
                return Err(fail("a record answered past a failed store call".into()));
            }
            _ => {}
        }
        self.learn(effect);
        Ok(())
    }

    /// Runs `calls` side by side, each a task of its own (all of them
    /// aborted if one fails as a task).
    async fn run_together(&mut self, calls: &[(Call, bool)]) -> Result<(), TestCaseError> {
        let mut tasks = tokio::task::JoinSet::new();
        // The clock moves before any call runs: one that moved it while
        // another was under way would date that one's reads and writes
        // apart (an end at the old time, a read at the new).
        let (moves, others): (Vec<_>, Vec<_>) = calls
            .iter()
            .partition(|(call, _)| matches!(call, Call::Advance { .. }));
        for (call, elsewhere) in moves.into_iter().chain(others) {
            tasks.spawn(self.call(call, *elsewhere));
        }
        while let Some(done) = tasks.join_next().await {
            let effect = done.map_err(|e| fail(format!("a call failed as a task: {e}")))?;
            self.learn(effect);
        }
        Ok(())
    }

    /// Invariant 6 after a step of calls side by side: each agent's
    /// latest secret and session, resolved on their own, serve a session
    /// the store holds active and in time (a read that raced an end must
    /// not have put the ended session back for reuse). What they answer
    /// is not kept: the contexts the step left, stale ones included, stay
    /// for the next step's records.
    async fn probe(&self) -> Result<(), TestCaseError> {
        for agent in 0..AGENTS {
            for call in [Call::Resolve { agent }, Call::ResolveById { agent }] {
                if let Effect::Resolved { ctx, .. } = self.call(&call, false).await {
                    self.serves_a_live_session(&ctx, false)
                        .await
                        .map_err(|e| fail(format!("probing with {call:?}: {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// `call`, as a future of its own, on what the case knows now; in
    /// the second process if `elsewhere` (and the case has one).
    fn call(&self, call: &Call, elsewhere: bool) -> Running {
        let service = match &self.elsewhere {
            Some(other) if elsewhere => Arc::clone(other),
            _ => Arc::clone(&self.service),
        };
        match *call {
            Call::Start { agent, target } => {
                let who = self.agents[agent].clone();
                let request = StartRequest::new(
                    self.targets[target].id.clone(),
                    "Customer reports missing bookings",
                );
                Box::pin(async move {
                    match service.start(Requester::User(&who), request).await {
                        Ok(started) => Effect::Started {
                            agent,
                            session: started.session.id,
                            secret: started.secret,
                        },
                        Err(_) => Effect::Nothing,
                    }
                })
            }
            Call::Resolve { agent } | Call::ResolveFresh { agent } => {
                let Some(secret) = self.secret_of(agent) else {
                    return Box::pin(std::future::ready(Effect::Nothing));
                };
                let fresh = matches!(call, Call::ResolveFresh { .. });
                Box::pin(async move {
                    let answer = if fresh {
                        service.resolve_fresh(&secret).await
                    } else {
                        service.resolve(&secret).await
                    };
                    Effect::resolved(agent, answer)
                })
            }
            Call::ResolveById { agent } => {
                let Some(id) = self.sessions.get(&agent).copied() else {
                    return Box::pin(std::future::ready(Effect::Nothing));
                };
                Box::pin(async move {
                    Effect::resolved(agent, service.resolve_session_reusing(id).await)
                })
            }
            Call::Record {
                agent,
                modification,
            }
            | Call::Complete {
                agent,
                modification,
            } => {
                let Some(ctx) = self.contexts.get(&agent).cloned() else {
                    return Box::pin(std::future::ready(Effect::Nothing));
                };
                let completed = matches!(call, Call::Complete { .. });
                Box::pin(async move {
                    let activity = if modification {
                        Activity::modification("PUT /bookings/{id}")
                    } else {
                        Activity::access("GET /bookings")
                    };
                    let answer = if completed {
                        service.record_completed(&ctx, activity).await
                    } else {
                        service.record(&ctx, activity).await
                    };
                    match answer {
                        Ok(event) => Effect::Recorded {
                            agent,
                            event: event.id,
                        },
                        Err(_) => Effect::Nothing,
                    }
                })
            }
            Call::Stop { agent } => {
                let Some(secret) = self.secret_of(agent) else {
                    return Box::pin(std::future::ready(Effect::Nothing));
                };
                let who = self.agents[agent].clone();
                Box::pin(async move {
                    let _ = service.stop(&secret, &who).await;
                    Effect::Nothing
                })
            }
            Call::RevokeAllForAgent { agent } => {
                let agent = self.agents[agent].id.clone();
                Box::pin(async move {
                    let _ = service
                        .revoke_all_for_agent(&agent, Initiator::System, "offboarded")
                        .await;
                    Effect::Nothing
                })
            }
            Call::RevokeAllForSubject { target } => {
                let target = self.targets[target].id.clone();
                Box::pin(async move {
                    let _ = service
                        .revoke_all_for_subject(&target, Initiator::System, "password changed")
                        .await;
                    Effect::Nothing
                })
            }
            Call::EndLapsed => Box::pin(async move {
                let _ = service.end_lapsed().await;
                Effect::Nothing
            }),
            Call::Advance { minutes } => {
                self.clock.advance(Duration::minutes(minutes));
                Box::pin(std::future::ready(Effect::Nothing))
            }
        }
    }

    /// The agent's latest secret, a copy for a call of its own.
    fn secret_of(&self, agent: usize) -> Option<SessionSecret> {
        let held = self.secrets.get(&agent)?;
        match SessionSecret::parse(held.expose()) {
            Ok(copy) => Some(copy),
            Err(e) => panic!("a secret the service gave out does not parse again: {e}"),
        }
    }

    /// Takes in what a call's answer tells.
    fn learn(&mut self, effect: Effect) {
        match effect {
            Effect::Nothing => {}
            Effect::Started {
                agent,
                session,
                secret,
            } => {
                self.seen.insert(session);
                self.sessions.insert(agent, session);
                self.secrets.insert(agent, secret);
            }
            Effect::Resolved { agent, ctx } => {
                self.contexts.insert(agent, ctx);
            }
            Effect::Unresolved { agent } => {
                self.contexts.remove(&agent);
            }
            Effect::Recorded { agent, event } => {
                self.recorded.insert((agent, event));
            }
        }
    }

    /// Invariant 6: `ctx`'s session, as the store holds it (read past the
    /// fault wrapper), is active and in time now; or, if it may have been
    /// `reused` after another process ended it, ended no longer ago than
    /// the reuse interval.
    async fn serves_a_live_session(
        &self,
        ctx: &impersonation_core::Context,
        reused: bool,
    ) -> Result<(), TestCaseError> {
        let stored = self
            .service
            .store()
            .inner()
            .session(ctx.session())
            .await
            .map_err(|e| fail(format!("reading a served session: {e}")))?
            .ok_or_else(|| fail("a resolve served a session the store does not hold".into()))?;
        let now = self.service.now();
        let ended_lately = stored
            .ended_at
            .is_some_and(|at| now - at < self.service.config().reuse_interval);
        let live = stored.state == impersonation_core::SessionState::Active
            && stored.lapse_at(now).is_none();
        let allowed = live || (reused && ended_lately);
        if !allowed {
            return Err(fail(format!(
                "a resolve served session {} at {now}, which the store holds {:?} (expires {}, idle at {})",
                stored.id,
                stored.state,
                stored.expires_at,
                stored.idle_deadline()
            )));
        }
        Ok(())
    }

    /// The invariants, read from the store alone.
    async fn check(&mut self) -> Result<(), TestCaseError> {
        let store = self.service.store().inner();
        let mut events: Vec<AuditEvent> = Vec::new();
        for agent in &self.agents {
            events.extend(verified_chain(store, &ChainKey::for_agent(&agent.id)).await?);
            let live = live_of(store, agent).await?;
            self.seen.extend(live.iter().map(|s| s.id));
        }
        for target in &self.targets {
            verified_chain(store, &ChainKey::revocations_of(&target.id)).await?;
        }
        // Every session the trail names is checked too (one a start made
        // and ended in the same step, say, that no check saw live), and
        // must be one the store holds.
        self.seen.extend(events.iter().filter_map(|e| e.session));
        for id in &self.seen {
            stored_with_its_events(store, *id, &events).await?;
        }
        // Invariant 7: what a record answered with is on its agent's
        // chain, once.
        for (agent, id) in &self.recorded {
            let chain = ChainKey::for_agent(&self.agents[*agent].id);
            let on_chain = events
                .iter()
                .filter(|e| e.id == *id && e.chain == chain)
                .count();
            if on_chain != 1 {
                return Err(fail(format!(
                    "recorded event {id} is on agent {agent}'s chain {on_chain} times"
                )));
            }
        }
        Ok(())
    }
}

async fn run_case<S: Store + 'static>(
    store: S,
    steps: &[Step],
    injected: &std::sync::atomic::AtomicUsize,
) -> Result<(), TestCaseError> {
    let mut case = Case::new(store, false, None);
    for (n, step) in steps.iter().enumerate() {
        if let Some((nth, when, calls)) = step.fault {
            case.service.store().fail_nth(nth, when, calls);
        }
        let answered = case.run(&step.call).await;
        case.service.store().heal();
        answered.map_err(|e| fail(format!("at step {n} ({step:?}): {e}")))?;
        case.check()
            .await
            .map_err(|e| fail(format!("after step {n} ({step:?}): {e}")))?;
    }
    injected.fetch_add(
        case.service.store().injected(),
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(())
}

/// Runs the fault sequences: `config.cases` random sequences of up to
/// `config.max_steps` calls, each against a store from `factory` wrapped
/// in a [`FaultyStore`], on a runtime of its own. Call it from a plain
/// `#[test]` (not `#[tokio::test]`). Stores from the factory may share a
/// database: every case namespaces its ids.
pub fn run_fault_sequences<S, F, Fut>(config: MachineConfig, factory: F)
where
    S: Store + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let (runtime, mut runner) = runtime_and_runner(config);
    let strategy = prop::collection::vec(step_strategy(), 1..=config.max_steps);
    let injected = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&strategy, |steps| {
        runtime.block_on(async { run_case(factory().await, &steps, &injected).await })
    });
    if let Err(e) = result {
        panic!("fault-sequence property failed: {e}");
    }
    // A plan that never fired would pass every check, and show nothing.
    assert!(
        config.cases == 0 || injected.into_inner() > 0,
        "no fault was injected in {} cases",
        config.cases
    );
}

/// Runs `steps`, each a set of calls side by side (each in the second
/// process where it says so, if the case has one), with no fault; a step
/// that runs past [`crate::conformance::CASE_DEADLINE`] (a deadlock
/// between the racing calls, say) fails the case.
async fn run_concurrent_case<S: Store + 'static>(
    store: S,
    second: Option<S>,
    steps: &[Vec<(Call, bool)>],
) -> Result<(), TestCaseError> {
    let mut case = Case::new(store, true, second);
    for (n, calls) in steps.iter().enumerate() {
        let step = async {
            match calls.as_slice() {
                [(one, false)] => case.run(one).await,
                _ => {
                    case.run_together(calls).await?;
                    // The probe's reads may be answered by the reuse map
                    // after the other process's end (see `run`).
                    if case.elsewhere.is_none() {
                        case.probe().await?;
                    }
                    Ok(())
                }
            }
        };
        tokio::time::timeout(crate::conformance::CASE_DEADLINE, step)
            .await
            .map_err(|_| fail(format!("step {n} ({calls:?}) never finished")))?
            .map_err(|e| fail(format!("at step {n} ({calls:?}): {e}")))?;
        case.check()
            .await
            .map_err(|e| fail(format!("after step {n} ({calls:?}): {e}")))?;
    }
    Ok(())
}

/// Runs the concurrent sequences: `config.cases` random sequences of up
/// to `config.max_steps` steps, each of one to three calls that run side
/// by side as tasks of their own, against a store from `factory` (no
/// fault), on a runtime of two workers. The invariants of the module's
/// head hold after every step. Call it from a plain `#[test]`; stores
/// from the factory may share a database.
pub fn run_concurrent_sequences<S, F, Fut>(config: MachineConfig, factory: F)
where
    S: Store + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let (runtime, mut runner) = runtime_and_runner(config);
    let step = prop::collection::vec((call_strategy(), Just(false)), 1..=3);
    let strategy = prop::collection::vec(step, 1..=config.max_steps);
    let result = runner.run(&strategy, |steps| {
        runtime.block_on(async { run_concurrent_case(factory().await, None, &steps).await })
    });
    if let Err(e) = result {
        panic!("concurrent-sequence property failed: {e}");
    }
}

/// [`run_concurrent_sequences`] with two processes of the app on the
/// same data: two services, each on one of the two store instances
/// `factory` gives (made as two processes make them, each with its own
/// connections and caches, as `store_pair_conformance_tests!` takes
/// them), each with its own reuse map and group commit, as two instances
/// behind a load balancer. Each call runs in one or the other, so starts
/// race across processes, an end made in one meets reads and records in
/// the other, and the trail's invariants (1 to 4 and 7) must hold after
/// every step. Invariant 6 is checked on the steps of one call in the
/// first process, and weaker for a read the reuse map may answer: a
/// process serves one for up to `Config::reuse_interval` after the other
/// ended the session (its audit write is what refuses it), so the session
/// it serves must be live, or have ended within that interval; a
/// `resolve_fresh` must serve a live one. When a case fails, shrinking
/// tends to move calls into the first process.
pub fn run_concurrent_sequences_in_two_processes<S, F, Fut>(config: MachineConfig, factory: F)
where
    S: Store + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (S, S)>,
{
    let (runtime, mut runner) = runtime_and_runner(config);
    let step = prop::collection::vec((call_strategy(), any::<bool>()), 1..=3);
    let strategy = prop::collection::vec(step, 1..=config.max_steps);
    let result = runner.run(&strategy, |steps| {
        runtime.block_on(async {
            let (store, second) = factory().await;
            run_concurrent_case(store, Some(second), &steps).await
        })
    });
    if let Err(e) = result {
        panic!("two-process concurrent-sequence property failed: {e}");
    }
}
