//! Group commit for store calls: callers that arrive while calls are in
//! flight wait, and the next call carries all of them at once.
//!
//! There is no background task (the core has no runtime). A caller that
//! finds fewer than `limit` calls in flight runs one itself, carrying every
//! queued item (its own included); then it passes its place to the oldest
//! waiting caller, who runs the next call, and so on. Every item is carried
//! by a store call that starts after the item was queued, so a lookup never
//! sees a session older than its request, and a write is on record before
//! its caller returns.
//!
//! Cancellation is safe at every await: a caller dropped in the middle of a
//! call passes its place on (from `Drop`), and the callers whose items that
//! call was carrying get [`Interrupted`]; a caller dropped after being told
//! to run passes the place on in turn. The item of a caller dropped while
//! it waited stays queued, and the next call carries it (a write still
//! lands): the caller told to run next, or, when no caller is left
//! waiting, the one whose call just finished; whoever runs a call always
//! carries its own item among them. One case is left: a caller told to
//! run and dropped before it ran, with no caller left to pass the place
//! to and no other call in flight (one in flight carries them), leaves
//! the queued items (its own among them) to the next call in this
//! process, whenever one comes (there is no task of its own to run
//! them; a binding that must land a write runs it to its end, as the
//! Axum binding does).

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;

use futures_channel::oneshot;

/// The most items one store call carries.
pub(crate) const MAX_BATCH: usize = 256;

/// The call that carried an item was abandoned before it answered (its
/// caller was cancelled, or the store returned fewer results than items).
/// Whether the item took effect is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interrupted;

struct Waiting<I, O> {
    item: I,
    done: oneshot::Sender<O>,
    turn: Turn,
}

/// Where a queued item's caller stands on running a call.
enum Turn {
    /// Waiting to be told (through this sender) to run the next call.
    Waiting(oneshot::Sender<()>),
    /// Told, and about to run it (or passing the place on, if dropped).
    Told,
    /// Gone before it could be told: it will run no call.
    Gone,
}

impl<I, O> Waiting<I, O> {
    /// Whether this item's caller is still there to run a call (waiting to
    /// be told, or told and about to).
    fn may_run(&self) -> bool {
        match &self.turn {
            Turn::Waiting(run) => !run.is_canceled(),
            Turn::Told => true,
            Turn::Gone => false,
        }
    }
}

struct Lane<I, O> {
    pending: VecDeque<Waiting<I, O>>,
    /// Calls in flight, or about to be run by a caller told to.
    running: usize,
}

impl<I, O> Lane<I, O> {
    /// A call is done (or abandoned): its place goes to the oldest caller
    /// still waiting, or is freed.
    fn hand_over(&mut self) {
        for waiting in &mut self.pending {
            if !matches!(waiting.turn, Turn::Waiting(_)) {
                continue;
            }
            // A caller that cannot be told is gone: its item is an
            // orphan's, which the call just finished carries if nobody
            // else is left to.
            if let Turn::Waiting(run) = std::mem::replace(&mut waiting.turn, Turn::Gone)
                && run.send(()).is_ok()
            {
                waiting.turn = Turn::Told;
                return;
            }
        }
        self.running = self.running.saturating_sub(1);
    }

    /// The next call's items: the oldest, up to [`MAX_BATCH`], and always
    /// the item of the caller who runs the call (`own`, if still queued).
    /// Behind a full batch of items whose callers went away, the runner
    /// would otherwise carry theirs, give up its place, and wait for an
    /// answer that no call is bringing.
    fn take_batch(&mut self, own: &oneshot::Receiver<O>) -> Vec<Waiting<I, O>> {
        let n = self.pending.len().min(MAX_BATCH);
        let beyond = self
            .pending
            .iter()
            .skip(n)
            .position(|w| w.done.is_connected_to(own));
        match beyond.and_then(|at| self.pending.remove(n + at)) {
            Some(mine) => {
                let mut batch: Vec<_> = self.pending.drain(..n - 1).collect();
                batch.push(mine);
                batch
            }
            None => self.pending.drain(..n).collect(),
        }
    }
}

/// A queue of items for one kind of store call, with at most `limit` calls
/// in flight.
pub(crate) struct Coalescer<I, O> {
    lane: Mutex<Lane<I, O>>,
    limit: usize,
}

impl<I, O> fmt::Debug for Coalescer<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lane = self.lock();
        f.debug_struct("Coalescer")
            .field("pending", &lane.pending.len())
            .field("running", &lane.running)
            .field("limit", &self.limit)
            .finish()
    }
}

/// Passes the running place on when a call finishes or is dropped midway.
struct Place<'a, I, O> {
    coalescer: &'a Coalescer<I, O>,
}

impl<I, O> Drop for Place<'_, I, O> {
    fn drop(&mut self) {
        self.coalescer.lock().hand_over();
    }
}

/// A caller's receivers; if the caller is dropped after being told to run
/// a call, it passes the place on.
struct Caller<'a, I, O> {
    coalescer: &'a Coalescer<I, O>,
    done: oneshot::Receiver<O>,
    run: oneshot::Receiver<()>,
    run_spent: bool,
}

impl<I, O> Drop for Caller<'_, I, O> {
    fn drop(&mut self) {
        if self.run_spent {
            return;
        }
        // Closing first means no message can arrive after the check.
        self.run.close();
        if let Ok(Some(())) = self.run.try_recv() {
            let mut lane = self.coalescer.lock();
            // Told, it will not run after all: its item (if still queued)
            // is an orphan's, which a call in flight carries.
            if let Some(mine) = lane
                .pending
                .iter_mut()
                .find(|w| w.done.is_connected_to(&self.done))
            {
                mine.turn = Turn::Gone;
            }
            lane.hand_over();
        }
    }
}

enum Woken<O> {
    Done(Result<O, oneshot::Canceled>),
    /// Told to run the next call (or, on `Err`, our item was taken into a
    /// call before we were ever told).
    Run(Result<(), oneshot::Canceled>),
}

impl<I, O> Coalescer<I, O> {
    /// A queue allowing `limit` calls in flight at once (at least one).
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            lane: Mutex::new(Lane {
                pending: VecDeque::new(),
                running: 0,
            }),
            limit: limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lane<I, O>> {
        // Nothing panics while the lock is held; recover anyway.
        self.lane.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` and returns its output, from a call of `run` that
    /// started after the item was queued. `run` gets up to [`MAX_BATCH`]
    /// items in arrival order and returns one output per item, in order.
    pub(crate) async fn submit<F, Fut>(&self, item: I, run: F) -> Result<O, Interrupted>
    where
        F: Fn(Vec<I>) -> Fut,
        Fut: Future<Output = Vec<O>>,
    {
        let (done_tx, done) = oneshot::channel();
        let (run_tx, run_rx) = oneshot::channel();
        let batch = {
            let mut lane = self.lock();
            lane.pending.push_back(Waiting {
                item,
                done: done_tx,
                turn: Turn::Waiting(run_tx),
            });
            if lane.running < self.limit {
                lane.running += 1;
                Some(lane.take_batch(&done))
            } else {
                None
            }
        };
        let mut caller = Caller {
            coalescer: self,
            done,
            run: run_rx,
            run_spent: false,
        };
        if let Some(batch) = batch {
            caller.run_spent = true;
            self.run_batch(batch, &run).await;
        }
        loop {
            let woken = poll_fn(|cx| {
                if let Poll::Ready(r) = Pin::new(&mut caller.done).poll(cx) {
                    return Poll::Ready(Woken::Done(r));
                }
                if !caller.run_spent
                    && let Poll::Ready(r) = Pin::new(&mut caller.run).poll(cx)
                {
                    caller.run_spent = true;
                    return Poll::Ready(Woken::Run(r));
                }
                Poll::Pending
            })
            .await;
            match woken {
                Woken::Done(Ok(output)) => return Ok(output),
                Woken::Done(Err(oneshot::Canceled)) => return Err(Interrupted),
                Woken::Run(Ok(())) => {
                    let batch = self.lock().take_batch(&caller.done);
                    self.run_batch(batch, &run).await;
                }
                // Our item went into a call without us being told to run:
                // its answer comes through `done`.
                Woken::Run(Err(oneshot::Canceled)) => {}
            }
        }
    }

    /// Runs one call for `batch` in a place already counted in `running`,
    /// answers its callers, then passes the place on.
    async fn run_batch<F, Fut>(&self, batch: Vec<Waiting<I, O>>, run: &F)
    where
        F: Fn(Vec<I>) -> Fut,
        Fut: Future<Output = Vec<O>>,
    {
        let place = Place { coalescer: self };
        if batch.is_empty() {
            return;
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        for waiting in batch {
            answers.push(waiting.done);
            items.push(waiting.item);
        }
        let outputs = run(items).await;
        // Callers beyond the outputs' length get `Interrupted` when their
        // sender drops here; a caller that went away misses its answer.
        for (done, output) in answers.into_iter().zip(outputs) {
            let _ = done.send(output);
        }
        // Items whose callers went away while they waited, with no caller
        // left to run the next call: carried now, not whenever the next
        // caller comes (if one ever does), so a write still lands, and in
        // its turn.
        loop {
            let orphans: Vec<I> = {
                let mut lane = self.lock();
                if lane.pending.is_empty() || lane.pending.iter().any(Waiting::may_run) {
                    break;
                }
                let n = lane.pending.len().min(MAX_BATCH);
                lane.pending.drain(..n).map(|w| w.item).collect()
            };
            run(orphans).await;
        }
        drop(place);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Runs a batch after yielding, so concurrent submitters queue up.
    async fn double(calls: &AtomicUsize, items: Vec<u32>) -> Vec<u32> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        items.into_iter().map(|i| i * 2).collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_submitters_share_calls_and_each_gets_its_own_output() {
        let c = Arc::new(Coalescer::<u32, u32>::new(1));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let (c, calls) = (Arc::clone(&c), Arc::clone(&calls));
                tokio::spawn(async move { c.submit(i, |items| double(&calls, items)).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Ok(u32::try_from(i).unwrap() * 2));
        }
        let calls = calls.load(Ordering::SeqCst);
        assert!(calls < 10, "100 submitters took {calls} calls");
        assert!(c.lock().running == 0 && c.lock().pending.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn up_to_the_limit_calls_run_at_once_and_the_rest_wait() {
        let c = Arc::new(Coalescer::<u32, u32>::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (c, running, most) = (Arc::clone(&c), Arc::clone(&running), Arc::clone(&most));
                tokio::spawn(async move {
                    c.submit(i, |items| {
                        let (running, most) = (Arc::clone(&running), Arc::clone(&most));
                        async move {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            tokio::task::yield_now().await;
                            running.fetch_sub(1, Ordering::SeqCst);
                            items
                        }
                    })
                    .await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), Ok(u32::try_from(i).unwrap()));
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert_eq!(c.lock().running, 0);
    }

    /// An item whose caller went away while it waited, with nobody left
    /// waiting, is carried by the caller whose call was in flight, before
    /// that caller returns: not left queued until some later caller comes.
    #[tokio::test(flavor = "current_thread")]
    async fn an_item_whose_caller_went_away_is_carried_by_the_call_in_flight() {
        let c = Coalescer::<usize, usize>::new(1);
        let carried = std::sync::Mutex::new(Vec::new());
        let run = |items: Vec<usize>| {
            carried.lock().unwrap().push(items.clone());
            async move {
                tokio::task::yield_now().await;
                items
            }
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut first = Box::pin(c.submit(1, &run));
        assert!(first.as_mut().poll(&mut cx).is_pending(), "in flight");
        let mut gone = Box::pin(c.submit(2, &run));
        assert!(gone.as_mut().poll(&mut cx).is_pending(), "queued");
        drop(gone);
        assert_eq!(first.await, Ok(1));
        assert_eq!(*carried.lock().unwrap(), [vec![1], vec![2]]);
        let lane = c.lock();
        assert!(lane.pending.is_empty() && lane.running == 0);
    }

    /// A caller told to run carries its own item even behind a full batch
    /// of items whose callers went away (clients that disconnected while a
    /// slow call was in flight), and gets its answer; the items its call
    /// had no room for are carried before it returns, not left queued for
    /// whichever call comes next (the place passed over their callers,
    /// who could not be told, marks them gone).
    #[tokio::test(flavor = "current_thread")]
    async fn a_caller_behind_a_batch_of_cancelled_ones_still_gets_its_answer() {
        let c = Coalescer::<usize, usize>::new(1);
        let seen = std::sync::Mutex::new(Vec::new());
        let echo = |items: Vec<usize>| {
            seen.lock().unwrap().push(items.clone());
            async move { items }
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // A call is in flight: everyone queues behind it.
        c.lock().running = 1;
        for i in 0..=MAX_BATCH {
            let mut gone = Box::pin(c.submit(i, &echo));
            assert!(gone.as_mut().poll(&mut cx).is_pending());
        }
        let mut caller = Box::pin(c.submit(999, &echo));
        assert!(caller.as_mut().poll(&mut cx).is_pending());
        // The call in flight ends and passes its place on.
        c.lock().hand_over();
        let mut answer = Poll::Pending;
        for _ in 0..3 {
            answer = caller.as_mut().poll(&mut cx);
            if answer.is_ready() {
                break;
            }
        }
        assert_eq!(answer, Poll::Ready(Ok(999)));
        // Its call carried the oldest of the others' items besides its own,
        // then the two left over.
        let mut first: Vec<usize> = (0..MAX_BATCH - 1).collect();
        first.push(999);
        assert_eq!(
            *seen.lock().unwrap(),
            [first, vec![MAX_BATCH - 1, MAX_BATCH]]
        );
        assert!(c.lock().pending.is_empty());
        assert_eq!(c.lock().running, 0);
    }

    /// A caller told to run and dropped before it ran leaves its item, and
    /// those of callers gone while they waited, to a call still in flight
    /// (two calls at once here), which carries them before it returns.
    #[tokio::test(flavor = "current_thread")]
    async fn a_call_in_flight_carries_the_items_of_a_caller_told_to_run_and_dropped() {
        let c = Coalescer::<usize, usize>::new(2);
        let seen = std::sync::Mutex::new(Vec::new());
        let gate = tokio::sync::Notify::new();
        let run = |items: Vec<usize>| {
            seen.lock().unwrap().push(items.clone());
            let gate = &gate;
            async move {
                if items == [1] {
                    gate.notified().await;
                }
                items
            }
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // Another call is in flight beside the one this test runs.
        c.lock().running = 1;
        let mut in_flight = Box::pin(c.submit(1, &run));
        assert!(in_flight.as_mut().poll(&mut cx).is_pending());
        let mut told = Box::pin(c.submit(2, &run));
        assert!(told.as_mut().poll(&mut cx).is_pending());
        let mut gone = Box::pin(c.submit(3, &run));
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        drop(gone);
        // The other call ends and tells the oldest waiting caller to run,
        // who is dropped before it does.
        c.lock().hand_over();
        drop(told);
        gate.notify_one();
        assert_eq!(in_flight.as_mut().poll(&mut cx), Poll::Ready(Ok(1)));
        assert_eq!(*seen.lock().unwrap(), [vec![1], vec![2, 3]]);
        let lane = c.lock();
        assert!(lane.pending.is_empty() && lane.running == 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_submitter_runs_its_own_call_at_once() {
        let c = Coalescer::<u32, u32>::new(1);
        let calls = AtomicUsize::new(0);
        for i in 0..3 {
            assert_eq!(c.submit(i, |items| double(&calls, items)).await, Ok(i * 2));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_leader_hands_over_and_its_batch_is_interrupted() {
        let c = Arc::new(Coalescer::<u32, u32>::new(1));
        let gate = Arc::new(tokio::sync::Notify::new());
        // The leader's call blocks until cancelled.
        let leader = {
            let (c, gate) = (Arc::clone(&c), Arc::clone(&gate));
            tokio::spawn(async move {
                c.submit(1, |items| {
                    let gate = Arc::clone(&gate);
                    async move {
                        gate.notified().await;
                        items
                    }
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        // Two followers queue behind it.
        let followers: Vec<_> = (2..4)
            .map(|i| {
                let c = Arc::clone(&c);
                tokio::spawn(async move { c.submit(i, |items| async move { items }).await })
            })
            .collect();
        tokio::task::yield_now().await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        // The first follower was promoted and carries both.
        for (i, f) in followers.into_iter().enumerate() {
            assert_eq!(f.await.unwrap(), Ok(u32::try_from(i).unwrap() + 2));
        }
        assert_eq!(c.lock().running, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn callers_in_an_abandoned_batch_are_told_it_was_interrupted() {
        let c = Arc::new(Coalescer::<u32, u32>::new(1));
        let gate = Arc::new(tokio::sync::Notify::new());
        let blocked = |gate: Arc<tokio::sync::Notify>| {
            move |items: Vec<u32>| {
                let gate = Arc::clone(&gate);
                async move {
                    gate.notified().await;
                    items
                }
            }
        };
        // A first leader holds the lane while a follower queues.
        let first = {
            let (c, gate) = (Arc::clone(&c), Arc::clone(&gate));
            tokio::spawn(async move { c.submit(1, blocked(gate)).await })
        };
        tokio::task::yield_now().await;
        let second = {
            let (c, gate) = (Arc::clone(&c), Arc::clone(&gate));
            tokio::spawn(async move { c.submit(2, blocked(gate)).await })
        };
        let third = {
            let (c, gate) = (Arc::clone(&c), Arc::clone(&gate));
            tokio::spawn(async move { c.submit(3, blocked(gate)).await })
        };
        tokio::task::yield_now().await;
        // First finishes; second is promoted and carries 2 and 3.
        gate.notify_one();
        assert_eq!(first.await.unwrap(), Ok(1));
        tokio::task::yield_now().await;
        // Second is cancelled mid-call: third's answer is lost.
        second.abort();
        assert!(second.await.unwrap_err().is_cancelled());
        assert_eq!(third.await.unwrap(), Err(Interrupted));
        assert_eq!(c.lock().running, 0);
        // The lane still works.
        assert_eq!(c.submit(4, |items| async move { items }).await, Ok(4));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_promoted_caller_dropped_before_it_runs_passes_leadership_on() {
        let c = Coalescer::<u32, u32>::new(1);
        // Simulate: a leader is active, two callers wait.
        c.lock().running = 1;
        let mut a = Box::pin(c.submit(1, |items| async move { items }));
        let mut b = Box::pin(c.submit(2, |items| async move { items }));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        // The leader finishes without carrying them and hands over to `a`,
        // which is dropped before it is polled again.
        c.lock().hand_over();
        drop(a);
        // `b` was promoted in its place and carries its own item (and `a`'s).
        match b.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(out) => assert_eq!(out, Ok(2)),
            std::task::Poll::Pending => panic!("b should have been promoted"),
        }
        assert_eq!(c.lock().running, 0);
    }
}
