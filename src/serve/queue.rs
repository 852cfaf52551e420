//! The bounded admission queue and the batcher.
//!
//! - Bounded: [`Queue::push`] fails at once when `capacity` requests wait (RESOURCE_EXHAUSTED),
//!   and after [`Queue::close`] (draining: UNAVAILABLE).
//! - Order: higher [`Priority`] first, FIFO within a priority.
//! - Batching: a worker takes the head request and every later waiting request *compatible* with
//!   it (same model, size, steps, sampler, guidance and patch options: [`QueueItem::compatible`]),
//!   in queue order, while the rows fit `max_rows` (the head always runs, even alone above the
//!   limit). If the batch is not full, it waits for batch-mates until the head has been queued
//!   for `max_delay`; a head that already waited that long (workers busy) runs at once.
//! - Items that are stopped (cancelled, past their deadline) are dropped without running.
//! - Devices ([`Queue::add_lane`]): with lanes, every worker belongs to one (its device), and a
//!   request goes to the **least-loaded** device that can run it: among the lanes with a worker
//!   waiting whose row cap ([`LaneCap`], from the device's memory) takes the request's rows, the
//!   one with the fewest rows running, then the least busy time so far, then the first. A lane
//!   whose workers all stopped, or that was marked down ([`Queue::lane_down`]), gets nothing;
//!   when no lane is left, waiting requests are dropped and new ones refused. A worker skips
//!   requests another waiting lane is chosen for, or that its device cannot take.
//!
//! The queue is generic over the item so its policy is tested without a model.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cancel::StopReason;

/// Scheduling priority; higher runs first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, clap::ValueEnum)]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// What the queue needs from an item.
pub trait QueueItem: Send {
    fn priority(&self) -> Priority;
    /// Images it adds to a batch.
    fn rows(&self) -> usize;
    /// Most rows of a batch it heads (e.g. what the memory budget allows at its size).
    fn max_rows(&self) -> usize {
        usize::MAX
    }
    /// Whether the two may run in one batch.
    fn compatible(&self, other: &Self) -> bool;
    /// `Some` when it should not run any more.
    fn stopped(&self, now: Instant) -> Option<StopReason>;
    /// Its position changed: `position` requests run before it; `depth` wait in all.
    fn on_position(&mut self, position: usize, depth: usize);
    /// It left the queue without running.
    fn on_dropped(self, reason: StopReason);
}

/// Batching policy.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub batching: bool,
    pub max_rows: usize,
    pub max_delay: Duration,
}

/// A device's row cap for an item: the most rows of a batch it heads on that device (from the
/// device's memory budget); below the item's own rows, the device cannot run it.
pub type LaneCap<T> = Box<dyn Fn(&T) -> usize + Send + Sync>;

/// Why a push failed; the item comes back.
pub enum PushError<T> {
    Full(T),
    Closed(T),
    /// Lanes were added and none can run anything any more (every worker stopped or failed).
    NoDevice(T),
}

impl<T> std::fmt::Debug for PushError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushError::Full(_) => "Full",
            PushError::Closed(_) => "Closed",
            PushError::NoDevice(_) => "NoDevice",
        })
    }
}

/// Identifies a waiting item (to take it back out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(Reverse<Priority>, u64);

struct Waiting<T> {
    item: T,
    enqueued: Instant,
    position: Option<usize>,
}

/// One device's workers (see the module docs).
struct Lane<T> {
    cap: LaneCap<T>,
    /// Workers running (started, not yet stopped).
    live: usize,
    /// Workers waiting in [`Queue::next_batch_on`].
    idle: usize,
    /// Rows of its running batches: its load.
    rows: usize,
    /// Time its workers spent running batches.
    busy: Duration,
    /// Marked failed: gets no more work.
    down: bool,
}

impl<T> Lane<T> {
    fn usable(&self) -> bool {
        !self.down && self.live > 0
    }
}

/// A lane's load as the router sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneLoad {
    /// Rows of its running batches.
    pub rows: usize,
    /// Time its workers spent running batches so far.
    pub busy: Duration,
    /// Workers running.
    pub live: usize,
    /// Marked down.
    pub down: bool,
}

struct State<T> {
    waiting: BTreeMap<Ticket, Waiting<T>>,
    next_seq: u64,
    closed: bool,
    running: usize,
    lanes: Vec<Lane<T>>,
}

impl<T> State<T> {
    /// Lanes were added and none is usable.
    fn no_device(&self) -> bool {
        !self.lanes.is_empty() && !self.lanes.iter().any(Lane::usable)
    }
}

/// A batch taken by a worker: items and how long each waited.
pub struct Batch<T> {
    pub items: Vec<(T, Duration)>,
    /// Its rows (the items' rows).
    pub rows: usize,
}

pub struct Queue<T> {
    state: Mutex<State<T>>,
    cond: Condvar,
    capacity: usize,
}

impl<T: QueueItem> Queue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State { waiting: BTreeMap::new(), next_seq: 0, closed: false, running: 0, lanes: Vec::new() }),
            cond: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Requests waiting.
    pub fn depth(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Nothing waiting and no batch running.
    pub fn is_idle(&self) -> bool {
        let s = self.lock();
        s.waiting.is_empty() && s.running == 0
    }

    /// Batches running.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Enqueues, or fails at once when full or closed.
    pub fn push(&self, item: T) -> Result<Ticket, PushError<T>> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed(item));
        }
        if s.no_device() {
            return Err(PushError::NoDevice(item));
        }
        if s.waiting.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        let ticket = Ticket(Reverse(item.priority()), s.next_seq);
        s.next_seq += 1;
        s.waiting.insert(ticket, Waiting { item, enqueued: Instant::now(), position: None });
        Self::report_positions(&mut s);
        drop(s);
        self.cond.notify_all();
        Ok(ticket)
    }

    /// Takes a waiting item back out (its client gave up); `None` if a worker already took it.
    pub fn remove(&self, ticket: Ticket) -> Option<T> {
        let mut s = self.lock();
        let w = s.waiting.remove(&ticket)?;
        Self::report_positions(&mut s);
        drop(s);
        self.cond.notify_all();
        Some(w.item)
    }

    /// Refuses new items from now on; waiting items still run.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cond.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Drops every waiting item (shutdown).
    pub fn abort_waiting(&self) -> usize {
        let items: Vec<T> = {
            let mut s = self.lock();
            std::mem::take(&mut s.waiting).into_values().map(|w| w.item).collect()
        };
        let n = items.len();
        for it in items {
            it.on_dropped(StopReason::Shutdown);
        }
        self.cond.notify_all();
        n
    }

    /// A worker is done with a batch from [`next_batch`](Self::next_batch).
    pub fn finish_batch(&self) {
        let mut s = self.lock();
        s.running = s.running.saturating_sub(1);
        drop(s);
        self.cond.notify_all();
    }

    /// Adds a device lane with `workers` workers (each calls [`next_batch_on`](Self::next_batch_on)
    /// with its index and [`worker_stopped`](Self::worker_stopped) when it ends); returns its index.
    pub fn add_lane(&self, cap: LaneCap<T>, workers: usize) -> usize {
        let mut s = self.lock();
        s.lanes.push(Lane { cap, live: workers, idle: 0, rows: 0, busy: Duration::ZERO, down: false });
        s.lanes.len() - 1
    }

    /// A worker of `lane` is done with a batch of `rows` rows that ran for `busy`.
    pub fn finish_batch_on(&self, lane: usize, rows: usize, busy: Duration) {
        let mut s = self.lock();
        s.running = s.running.saturating_sub(1);
        if let Some(l) = s.lanes.get_mut(lane) {
            l.rows = l.rows.saturating_sub(rows);
            l.busy += busy;
        }
        drop(s);
        self.cond.notify_all();
    }

    /// A worker of `lane` ended (its thread returns or unwinds).
    pub fn worker_stopped(&self, lane: usize) {
        let mut s = self.lock();
        if let Some(l) = s.lanes.get_mut(lane) {
            l.live = l.live.saturating_sub(1);
        }
        self.after_lane_change(s);
    }

    /// Marks `lane` failed: it gets no more work, its idle workers end.
    pub fn lane_down(&self, lane: usize) {
        let mut s = self.lock();
        if let Some(l) = s.lanes.get_mut(lane) {
            l.down = true;
        }
        self.after_lane_change(s);
    }

    /// After a lane lost a worker or went down: when no lane is left, the waiting items are
    /// dropped (nothing can run them); the other workers re-route.
    fn after_lane_change(&self, s: MutexGuard<'_, State<T>>) {
        let orphans = s.no_device() && !s.waiting.is_empty();
        drop(s);
        if orphans {
            let n = self.abort_waiting();
            tracing::error!(dropped = n, "no device is left to run requests: the waiting ones were dropped");
        }
        self.cond.notify_all();
    }

    /// Each lane's load, in lane order.
    pub fn lane_loads(&self) -> Vec<LaneLoad> {
        self.lock().lanes.iter().map(|l| LaneLoad { rows: l.rows, busy: l.busy, live: l.live, down: l.down }).collect()
    }

    fn report_positions(s: &mut State<T>) {
        let depth = s.waiting.len();
        for (i, w) in s.waiting.values_mut().enumerate() {
            if w.position != Some(i) {
                w.position = Some(i);
                w.item.on_position(i, depth);
            }
        }
    }

    fn purge(&self, s: &mut State<T>, now: Instant) -> Vec<(T, StopReason)> {
        let dead: Vec<(Ticket, StopReason)> = s.waiting.iter().filter_map(|(t, w)| w.item.stopped(now).map(|r| (*t, r))).collect();
        dead.into_iter().filter_map(|(t, r)| s.waiting.remove(&t).map(|w| (w.item, r))).collect()
    }

    /// Blocks until a batch is ready; `None` once the queue is closed and empty. Ignores lanes.
    pub fn next_batch(&self, policy: &BatchPolicy) -> Option<Batch<T>> {
        self.take(None, policy)
    }

    /// [`next_batch`](Self::next_batch) for a worker of `lane`: a batch routed to that lane
    /// (see the module docs), its rows within the lane's cap. `None` once the queue is closed
    /// and empty, or the lane is down; finish it with [`finish_batch_on`](Self::finish_batch_on).
    pub fn next_batch_on(&self, lane: usize, policy: &BatchPolicy) -> Option<Batch<T>> {
        {
            let mut s = self.lock();
            let l = s.lanes.get_mut(lane)?;
            l.idle += 1;
        }
        let batch = self.take(Some(lane), policy);
        let mut s = self.lock();
        let l = &mut s.lanes[lane];
        l.idle -= 1;
        if let Some(b) = &batch {
            l.rows += b.rows;
        }
        drop(s);
        // The lane's load changed: other workers route again.
        self.cond.notify_all();
        batch
    }

    /// The first waiting item routed to `lane` and its cap there (see the module docs).
    fn routed_head(s: &State<T>, lane: usize) -> Option<(Ticket, usize)> {
        let me = &s.lanes[lane];
        if !me.usable() {
            return None;
        }
        for (t, w) in &s.waiting {
            let rows = w.item.rows();
            let caps: Vec<usize> = s.lanes.iter().map(|l| if l.usable() { (l.cap)(&w.item) } else { 0 }).collect();
            // A request no device fits runs alone wherever it is routed (its estimate passed
            // admission, which checks against the largest device).
            let fits_any = caps.iter().any(|&c| c >= rows);
            let eligible = |i: usize| s.lanes[i].usable() && (!fits_any || caps[i] >= rows);
            if !eligible(lane) {
                continue;
            }
            let best =
                (0..s.lanes.len()).filter(|&i| eligible(i) && s.lanes[i].idle > 0).min_by_key(|&i| (s.lanes[i].rows, s.lanes[i].busy, i));
            if best == Some(lane) {
                return Some((*t, caps[lane].max(rows)));
            }
        }
        None
    }

    fn take(&self, lane: Option<usize>, policy: &BatchPolicy) -> Option<Batch<T>> {
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            let dead = self.purge(&mut s, now);
            if !dead.is_empty() {
                Self::report_positions(&mut s);
                drop(s);
                for (it, r) in dead {
                    it.on_dropped(r);
                }
                s = self.lock();
                continue;
            }
            if let Some(l) = lane
                && !s.lanes[l].usable()
            {
                return None;
            }
            if s.waiting.is_empty() && s.closed {
                return None;
            }
            let routed = match lane {
                None => s.waiting.keys().next().map(|t| (*t, usize::MAX)),
                Some(l) => Self::routed_head(&s, l),
            };
            let Some((head_ticket, lane_cap)) = routed else {
                s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let head = &s.waiting[&head_ticket];
            let mut chosen = vec![head_ticket];
            let mut rows = head.item.rows();
            let policy = &BatchPolicy { max_rows: policy.max_rows.min(head.item.max_rows()).min(lane_cap), ..*policy };
            if policy.batching {
                for (t, w) in s.waiting.range(head_ticket..).skip(1) {
                    if rows >= policy.max_rows {
                        break;
                    }
                    if w.item.compatible(&head.item) && rows + w.item.rows() <= policy.max_rows {
                        rows += w.item.rows();
                        chosen.push(*t);
                    }
                }
                let ready_at = head.enqueued + policy.max_delay;
                // Draining: do not wait for batch-mates that cannot come.
                if rows < policy.max_rows && now < ready_at && !s.closed {
                    let (g, _) = self.cond.wait_timeout(s, ready_at - now).unwrap_or_else(|p| p.into_inner());
                    s = g;
                    continue;
                }
            }
            let items: Vec<(T, Duration)> =
                chosen.into_iter().filter_map(|t| s.waiting.remove(&t)).map(|w| (w.item, now.duration_since(w.enqueued))).collect();
            s.running += 1;
            Self::report_positions(&mut s);
            return Some(Batch { items, rows });
        }
    }

    /// Waits (blocking) until idle or `timeout`; true when idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if s.waiting.is_empty() && s.running == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            s = self.cond.wait_timeout(s, end - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    #[derive(Debug)]
    struct Item {
        name: &'static str,
        prio: Priority,
        rows: usize,
        key: u32,
        deadline: Option<Instant>,
        cancelled: Arc<AtomicBool>,
        log: mpsc::Sender<String>,
    }

    impl QueueItem for Item {
        fn priority(&self) -> Priority {
            self.prio
        }
        fn rows(&self) -> usize {
            self.rows
        }
        fn compatible(&self, other: &Self) -> bool {
            self.key == other.key
        }
        fn stopped(&self, now: Instant) -> Option<StopReason> {
            if self.cancelled.load(Ordering::SeqCst) {
                Some(StopReason::ClientGone)
            } else if self.deadline.is_some_and(|d| now >= d) {
                Some(StopReason::Deadline)
            } else {
                None
            }
        }
        fn on_position(&mut self, position: usize, depth: usize) {
            let _ = self.log.send(format!("{} at {position}/{depth}", self.name));
        }
        fn on_dropped(self, reason: StopReason) {
            let _ = self.log.send(format!("{} dropped {reason:?}", self.name));
        }
    }

    fn item(name: &'static str, prio: Priority, rows: usize, key: u32, log: &mpsc::Sender<String>) -> Item {
        Item { name, prio, rows, key, deadline: None, cancelled: Arc::default(), log: log.clone() }
    }

    const NO_BATCH: BatchPolicy = BatchPolicy { batching: false, max_rows: 8, max_delay: Duration::ZERO };

    fn names(b: &Batch<Item>) -> Vec<&'static str> {
        b.items.iter().map(|(i, _)| i.name).collect()
    }

    #[test]
    fn priority_then_fifo() {
        let (tx, _rx) = mpsc::channel();
        let q = Queue::new(10);
        q.push(item("n1", Priority::Normal, 1, 0, &tx)).unwrap();
        q.push(item("l1", Priority::Low, 1, 0, &tx)).unwrap();
        q.push(item("h1", Priority::High, 1, 0, &tx)).unwrap();
        q.push(item("n2", Priority::Normal, 1, 0, &tx)).unwrap();
        q.push(item("h2", Priority::High, 1, 0, &tx)).unwrap();
        let order: Vec<_> = (0..5).map(|_| names(&q.next_batch(&NO_BATCH).unwrap())[0]).collect();
        assert_eq!(order, ["h1", "h2", "n1", "n2", "l1"]);
    }

    #[test]
    fn bounded_and_closed() {
        let (tx, _rx) = mpsc::channel();
        let q = Queue::new(2);
        q.push(item("a", Priority::Normal, 1, 0, &tx)).unwrap();
        q.push(item("b", Priority::Normal, 1, 0, &tx)).unwrap();
        assert!(matches!(q.push(item("c", Priority::High, 1, 0, &tx)), Err(PushError::Full(_))));
        q.close();
        assert!(matches!(q.push(item("d", Priority::Normal, 1, 0, &tx)), Err(PushError::Closed(_))));
        // Closed: waiting items still come out, then None.
        assert_eq!(names(&q.next_batch(&NO_BATCH).unwrap()), ["a"]);
        q.finish_batch();
        assert_eq!(names(&q.next_batch(&NO_BATCH).unwrap()), ["b"]);
        assert!(!q.is_idle());
        q.finish_batch();
        assert!(q.is_idle());
        assert!(q.next_batch(&NO_BATCH).is_none());
    }

    #[test]
    fn batches_compatible_items_up_to_row_limit() {
        let (tx, _rx) = mpsc::channel();
        let q = Queue::new(10);
        q.push(item("a", Priority::Normal, 2, 1, &tx)).unwrap();
        q.push(item("x", Priority::Normal, 1, 2, &tx)).unwrap();
        q.push(item("b", Priority::Normal, 3, 1, &tx)).unwrap();
        q.push(item("c", Priority::Low, 2, 1, &tx)).unwrap();
        q.push(item("d", Priority::Normal, 1, 1, &tx)).unwrap();
        let policy = BatchPolicy { batching: true, max_rows: 6, max_delay: Duration::ZERO };
        // a(2) + b(3) = 5; c(2) does not fit; d(1) fits (queue order: a, x, b, d, c).
        assert_eq!(names(&q.next_batch(&policy).unwrap()), ["a", "b", "d"]);
        assert_eq!(names(&q.next_batch(&policy).unwrap()), ["x"]);
        assert_eq!(names(&q.next_batch(&policy).unwrap()), ["c"]);
    }

    #[test]
    fn waits_for_batch_mates_up_to_max_delay() {
        let (tx, _rx) = mpsc::channel();
        let q = Arc::new(Queue::new(10));
        let policy = BatchPolicy { batching: true, max_rows: 4, max_delay: Duration::from_millis(300) };
        q.push(item("a", Priority::Normal, 1, 1, &tx)).unwrap();
        let q2 = q.clone();
        let tx2 = tx.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            q2.push(item("b", Priority::Normal, 1, 1, &tx2)).unwrap();
        });
        let start = Instant::now();
        let b = q.next_batch(&policy).unwrap();
        t.join().unwrap();
        assert_eq!(names(&b), ["a", "b"]);
        assert!(start.elapsed() >= Duration::from_millis(250), "waited for the delay");
        // Full batch: no wait.
        for n in ["c", "d", "e", "f"] {
            q.push(item(n, Priority::Normal, 1, 1, &tx)).unwrap();
        }
        let start = Instant::now();
        assert_eq!(names(&q.next_batch(&policy).unwrap()), ["c", "d", "e", "f"]);
        assert!(start.elapsed() < Duration::from_millis(200));
    }

    #[test]
    fn stopped_items_never_run_and_positions_update() {
        let (tx, rx) = mpsc::channel();
        let q = Queue::new(10);
        let mut late = item("late", Priority::Normal, 1, 0, &tx);
        late.deadline = Some(Instant::now() + Duration::from_millis(10));
        let gone = item("gone", Priority::Normal, 1, 0, &tx);
        let flag = gone.cancelled.clone();
        q.push(late).unwrap();
        q.push(gone).unwrap();
        let t = q.push(item("kept", Priority::Normal, 1, 0, &tx)).unwrap();
        q.push(item("last", Priority::Normal, 1, 0, &tx)).unwrap();
        flag.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(names(&q.next_batch(&NO_BATCH).unwrap()), ["kept"]);
        let log: Vec<String> = rx.try_iter().collect();
        assert!(log.contains(&"late dropped Deadline".to_string()), "{log:?}");
        assert!(log.contains(&"gone dropped ClientGone".to_string()), "{log:?}");
        assert!(log.contains(&"last at 3/4".to_string()), "{log:?}");
        assert!(log.contains(&"last at 0/1".to_string()), "{log:?}");
        assert!(q.remove(t).is_none(), "already taken");
    }

    #[test]
    fn abort_waiting_drops_all() {
        let (tx, rx) = mpsc::channel();
        let q = Queue::new(10);
        q.push(item("a", Priority::Normal, 1, 0, &tx)).unwrap();
        q.push(item("b", Priority::Normal, 1, 0, &tx)).unwrap();
        assert_eq!(q.abort_waiting(), 2);
        let log: Vec<String> = rx.try_iter().collect();
        assert!(log.contains(&"b dropped Shutdown".to_string()));
        assert_eq!(q.depth(), 0);
    }

    /// A lane whose cap is `cap` rows for every item.
    fn cap(rows: usize) -> LaneCap<Item> {
        Box::new(move |_: &Item| rows)
    }

    /// Takes a batch on `lane` from another thread (a worker), reporting it on `tx`.
    fn worker(q: &Arc<Queue<Item>>, lane: usize, tx: &mpsc::Sender<(usize, Vec<&'static str>, usize)>) -> std::thread::JoinHandle<()> {
        let (q, tx) = (q.clone(), tx.clone());
        std::thread::spawn(move || {
            if let Some(b) = q.next_batch_on(lane, &NO_BATCH) {
                let _ = tx.send((lane, names(&b), b.rows));
            }
        })
    }

    #[test]
    fn routes_to_the_least_loaded_lane() {
        let (log, _rx) = mpsc::channel();
        let q = Arc::new(Queue::new(10));
        let a = q.add_lane(cap(8), 1);
        let b = q.add_lane(cap(8), 1);
        // Lane a runs 3 rows; b is idle: the next request goes to b even though a waits too.
        q.push(item("first", Priority::Normal, 3, 0, &log)).unwrap();
        let first = q.next_batch_on(a, &NO_BATCH).unwrap();
        assert_eq!(q.lane_loads()[a].rows, 3);
        let (tx, rx) = mpsc::channel();
        let wa = worker(&q, a, &tx);
        let wb = worker(&q, b, &tx);
        std::thread::sleep(Duration::from_millis(50));
        q.push(item("second", Priority::Normal, 1, 0, &log)).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (b, vec!["second"], 1));
        // Both loaded now (a: 3 rows, b: 1): the least-loaded is b.
        q.finish_batch_on(a, first.rows, Duration::from_millis(5));
        q.push(item("third", Priority::Normal, 1, 0, &log)).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (a, vec!["third"], 1), "b is busy, a waits");
        wa.join().unwrap();
        q.close();
        wb.join().unwrap();
    }

    #[test]
    fn equal_loads_go_to_the_less_busy_lane_then_the_first() {
        let (log, _rx) = mpsc::channel();
        let q = Arc::new(Queue::new(10));
        let a = q.add_lane(cap(8), 1);
        let b = q.add_lane(cap(8), 1);
        q.push(item("x", Priority::Normal, 1, 0, &log)).unwrap();
        let x = q.next_batch_on(a, &NO_BATCH).unwrap();
        q.finish_batch_on(a, x.rows, Duration::from_millis(10));
        let (tx, rx) = mpsc::channel();
        let wa = worker(&q, a, &tx);
        let wb = worker(&q, b, &tx);
        std::thread::sleep(Duration::from_millis(50));
        q.push(item("y", Priority::Normal, 1, 0, &log)).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().0, b, "b has been busy less");
        q.close();
        wa.join().unwrap();
        wb.join().unwrap();
    }

    #[test]
    fn a_lane_never_gets_what_its_cap_cannot_take_and_batches_within_its_cap() {
        let (log, _rx) = mpsc::channel();
        let q = Arc::new(Queue::new(10));
        let small = q.add_lane(cap(2), 1);
        let big = q.add_lane(cap(6), 1);
        let batching = BatchPolicy { batching: true, max_rows: 8, max_delay: Duration::ZERO };
        q.push(item("wide", Priority::Normal, 4, 0, &log)).unwrap();
        q.push(item("s1", Priority::Normal, 1, 0, &log)).unwrap();
        q.push(item("s2", Priority::Normal, 1, 0, &log)).unwrap();
        q.push(item("s3", Priority::Normal, 1, 0, &log)).unwrap();
        // The small lane skips `wide` (4 rows > its cap of 2) and batches up to 2 rows.
        let b = q.next_batch_on(small, &batching).unwrap();
        assert_eq!((names(&b), b.rows), (vec!["s1", "s2"], 2));
        // The big lane takes `wide` and fills up to its cap of 6 rows.
        let b = q.next_batch_on(big, &batching).unwrap();
        assert_eq!((names(&b), b.rows), (vec!["wide", "s3"], 5));
    }

    #[test]
    fn a_lane_down_or_without_workers_gets_nothing_and_with_none_left_requests_are_refused() {
        let (log, rx) = mpsc::channel();
        let q = Arc::new(Queue::new(10));
        let a = q.add_lane(cap(8), 1);
        let b = q.add_lane(cap(8), 2);
        q.lane_down(a);
        assert!(q.next_batch_on(a, &NO_BATCH).is_none(), "a down lane's worker ends");
        q.push(item("p", Priority::Normal, 1, 0, &log)).unwrap();
        assert_eq!(names(&q.next_batch_on(b, &NO_BATCH).unwrap()), ["p"]);
        q.push(item("waiting", Priority::Normal, 1, 0, &log)).unwrap();
        q.worker_stopped(b);
        assert_eq!(q.depth(), 1, "b still has a worker");
        q.worker_stopped(b);
        assert_eq!(q.depth(), 0, "no lane left: the waiting request is dropped");
        assert!(rx.try_iter().any(|l| l == "waiting dropped Shutdown"));
        assert!(matches!(q.push(item("late", Priority::Normal, 1, 0, &log)), Err(PushError::NoDevice(_))));
        assert_eq!(q.lane_loads().iter().map(|l| (l.live, l.down)).collect::<Vec<_>>(), [(1, true), (0, false)]);
    }
}
