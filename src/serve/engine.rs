//! The serving core: one [`Engine`] owns the admission queue, the workers (one thread per device;
//! for the CPU a configurable number), the jobs' stop tokens and the queue/worker metrics.
//!
//! The protocol layers (gRPC in [`super::service`], HTTP/JSON through it) only validate requests
//! into a [`JobSpec`], [`submit`](Engine::submit) it, and translate the [`JobEvent`]s of the
//! returned [`JobStream`] into their messages (in the spirit of text-generation-inference's
//! router `Infer`).
//!
//! Stopping goes through one mechanism, the job's [`CancelToken`]:
//! - the client leaves: the [`JobStream`] is dropped, which cancels the token
//!   ([`StopReason::ClientGone`]) and takes a queued job out of the queue;
//! - the deadline passes: the token fires by itself; the stream answers DEADLINE_EXCEEDED at once
//!   (taking a queued job out of the queue), and a running set stops within a step;
//! - shutdown: [`close`](Engine::close) refuses new jobs, [`drain`](Engine::drain) waits for the
//!   rest up to a deadline, [`cut_off`](Engine::cut_off) cancels everything still there
//!   ([`StopReason::Shutdown`]), [`abandon`](Engine::abandon) answers the jobs of a worker that
//!   did not stop, and [`join_workers`](Engine::join_workers) waits for the threads, bounded.
//!
//! A worker checks the tokens of its batch between steps (a stopped set leaves the batch, its
//! batch-mates continue unchanged) and, through [`crate::model::stop`], inside a step: when every
//! set of the batch is stopped, the step is abandoned between UNet blocks, VAE decoder blocks or
//! attention query tiles. See `docs/engine.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use super::cancel::{CancelToken, StopReason};
use super::job::{FailCode, GenJob, JobEvent, JobSpec};
use super::metrics::{self as m, Stats};
use super::pool::PoolDevice;
use super::queue::{BatchPolicy, LaneLoad, PushError, Queue, Ticket};
use super::worker::{self, Models};

/// Why [`Engine::submit`] refused a job.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// `capacity` jobs wait already (RESOURCE_EXHAUSTED).
    #[error("admission queue full ({capacity} requests waiting); retry later")]
    Full { capacity: usize },
    /// The engine is closed (draining; UNAVAILABLE).
    #[error("server is shutting down")]
    Closed,
    /// Every device failed or stopped (UNAVAILABLE).
    #[error("no device is left to run requests: every device's workers stopped or failed")]
    NoDevice,
    /// Its deadline passed before it was queued (DEADLINE_EXCEEDED).
    #[error("deadline exceeded before the request was queued")]
    DeadlineExceeded,
}

/// The jobs in the engine (queued or running): their tokens and event senders.
#[derive(Default)]
pub(crate) struct Registry {
    jobs: Mutex<HashMap<u64, (CancelToken, UnboundedSender<JobEvent>)>>,
    next: AtomicU64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (CancelToken, UnboundedSender<JobEvent>)>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A job's place in the [`Registry`]; dropping it (with its [`GenJob`]) removes the job.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    key: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

struct Inner {
    queue: Arc<Queue<GenJob>>,
    policy: BatchPolicy,
    stats: Arc<Stats>,
    registry: Arc<Registry>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    devices: Mutex<Vec<Arc<PoolDevice>>>,
    next_id: AtomicU64,
}

/// The serving core (see the module docs). Cloning is cheap (shared).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// An engine whose queue holds up to `capacity` waiting jobs; no worker yet.
    pub fn new(capacity: usize, policy: BatchPolicy, stats: Arc<Stats>) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue: Arc::new(Queue::new(capacity)),
                policy,
                stats,
                registry: Arc::default(),
                workers: Mutex::new(Vec::new()),
                devices: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// A fresh job id (1, 2, …) for a [`JobSpec`].
    pub fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds `device` to the pool with `workers` worker threads running `models` (its copies),
    /// named `worker-{label}-{i}`; they end when the engine is closed and its queue empty, or
    /// when the device fails. Requests are routed to the least-loaded device (see
    /// [`super::pool`]). Returns the device's lane.
    pub fn add_device(&self, device: Arc<PoolDevice>, models: Models, workers: usize) -> std::io::Result<usize> {
        let st = &self.inner;
        let cap_of = device.clone();
        let lane = st.queue.add_lane(Box::new(move |j: &GenJob| cap_of.cap(j)), workers);
        for i in 0..workers {
            let name = format!("worker-{}-{i}", device.label);
            match worker::spawn(name, lane, device.clone(), models.clone(), st.queue.clone(), st.policy, st.stats.clone()) {
                Ok(h) => st.workers.lock().unwrap_or_else(|p| p.into_inner()).push(h),
                Err(e) => {
                    for _ in i..workers {
                        st.queue.worker_stopped(lane);
                    }
                    return Err(e);
                }
            }
        }
        st.devices.lock().unwrap_or_else(|p| p.into_inner()).push(device);
        Ok(lane)
    }

    /// The devices of the pool, in lane order.
    pub fn devices(&self) -> Vec<Arc<PoolDevice>> {
        self.inner.devices.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Each device's load (rows running, busy time, workers), in lane order.
    pub fn device_loads(&self) -> Vec<LaneLoad> {
        self.inner.queue.lane_loads()
    }

    /// Queues a job; its events come through the returned stream. Dropping the stream cancels
    /// the job.
    pub fn submit(&self, spec: JobSpec) -> Result<JobStream, SubmitError> {
        let st = &self.inner;
        let token = CancelToken::new(spec.deadline);
        if token.reason() == Some(StopReason::Deadline) {
            st.stats.record_dropped_in_queue(StopReason::Deadline);
            return Err(SubmitError::DeadlineExceeded);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let key = st.registry.next.fetch_add(1, Ordering::Relaxed);
        st.registry.lock().insert(key, (token.clone(), tx.clone()));
        let registration = Registration { registry: st.registry.clone(), key };
        let id = spec.id;
        let queue_span = tracing::info_span!(target: crate::telemetry::TARGET, parent: &spec.span, "queue");
        let job = GenJob {
            spec,
            token: token.clone(),
            events: tx,
            stats: st.stats.clone(),
            queue_span: Some(queue_span),
            _registration: Some(registration),
        };
        let ticket = st.queue.push(job).map_err(|e| match e {
            PushError::Full(_) => SubmitError::Full { capacity: st.queue.capacity() },
            PushError::Closed(_) => SubmitError::Closed,
            PushError::NoDevice(_) => SubmitError::NoDevice,
        })?;
        metrics::gauge!(m::QUEUE_DEPTH).set(st.queue.depth() as f64);
        Ok(JobStream { id, events: rx, token, ticket, engine: self.inner.clone(), done: false })
    }

    /// Refuses new jobs from now on; queued and running ones continue.
    pub fn close(&self) {
        self.inner.queue.close();
    }

    pub fn is_closed(&self) -> bool {
        self.inner.queue.is_closed()
    }

    /// Waits until no job is queued or running, or `deadline`; true when idle.
    pub async fn drain(&self, deadline: Instant) -> bool {
        loop {
            if self.is_idle() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(10))).await;
        }
    }

    /// Stops everything now: every job's token is cancelled ([`StopReason::Shutdown`]; running
    /// sets stop within a step, or inside it), waiting jobs leave the queue (UNAVAILABLE).
    /// Returns the number of jobs it stopped.
    pub fn cut_off(&self) -> usize {
        let n = self.inner.registry.lock().values().filter(|(t, _)| t.cancel(StopReason::Shutdown)).count();
        self.inner.queue.abort_waiting();
        n
    }

    /// Answers UNAVAILABLE to every job still in the engine (after [`cut_off`](Self::cut_off),
    /// those of a worker stuck in an operation that cannot be interrupted). Returns their number.
    pub fn abandon(&self) -> usize {
        let jobs = self.inner.registry.lock();
        for (t, tx) in jobs.values() {
            t.cancel(StopReason::Shutdown);
            let _ = tx.send(JobEvent::Failed {
                code: FailCode::Unavailable,
                message: "server shutting down: the drain deadline passed while running".into(),
            });
        }
        jobs.len()
    }

    /// Waits up to `timeout` for the worker threads to end (after [`close`](Self::close) and
    /// the queue emptied); true when all ended. Blocks the calling thread.
    pub fn join_workers(&self, timeout: Duration) -> bool {
        let workers: Vec<_> = std::mem::take(&mut *self.inner.workers.lock().unwrap_or_else(|p| p.into_inner()));
        if workers.is_empty() {
            return true;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let joiner = std::thread::Builder::new().name("worker-join".into()).spawn(move || {
            for w in workers {
                let _ = w.join();
            }
            let _ = tx.send(());
        });
        joiner.is_ok() && rx.recv_timeout(timeout).is_ok()
    }

    /// Jobs waiting in the queue.
    pub fn depth(&self) -> usize {
        self.inner.queue.depth()
    }

    pub fn capacity(&self) -> usize {
        self.inner.queue.capacity()
    }

    /// Batches running.
    pub fn running(&self) -> usize {
        self.inner.queue.running()
    }

    /// Jobs in the engine (queued or running, until their last event is sent).
    pub fn jobs(&self) -> usize {
        self.inner.registry.lock().len()
    }

    /// Nothing queued and no batch running.
    pub fn is_idle(&self) -> bool {
        self.inner.queue.is_idle()
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }
}

/// A submitted job's events (see [`JobEvent`] for their order), and its handle: dropping it
/// before the last event cancels the job ([`StopReason::ClientGone`]).
pub struct JobStream {
    id: u64,
    events: UnboundedReceiver<JobEvent>,
    token: CancelToken,
    ticket: Ticket,
    engine: Arc<Inner>,
    done: bool,
}

impl JobStream {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn token(&self) -> &CancelToken {
        &self.token
    }

    /// The next event; `None` after the last. When the deadline passes first, the job is stopped
    /// and the event is its DEADLINE_EXCEEDED failure.
    pub async fn next(&mut self) -> Option<JobEvent> {
        if self.done {
            return None;
        }
        let deadline = self.token.deadline();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            biased;
            e = self.events.recv() => Some(e),
            _ = sleep => None,
        };
        let Some(event) = event else { return Some(self.cancel(StopReason::Deadline)) };
        let event =
            event.unwrap_or_else(|| JobEvent::Failed { code: FailCode::Internal, message: "the job ended without a result".into() });
        self.done = event.is_final();
        Some(event)
    }

    /// Stops the job (the token's first reason wins): a queued job leaves the queue, a running
    /// set its batch within a step. Returns the failure that ends the stream; later
    /// [`next`](Self::next) calls give `None`.
    pub fn cancel(&mut self, reason: StopReason) -> JobEvent {
        self.done = true;
        // A deadline is dated at the deadline itself (the token sets it lazily).
        if self.token.reason().is_none() {
            self.token.cancel(reason);
        }
        let reason = self.token.reason().unwrap_or(reason);
        let queued = match self.engine.queue.remove(self.ticket) {
            Some(job) => {
                self.engine.stats.record_dropped_in_queue(reason);
                metrics::gauge!(m::QUEUE_DEPTH).set(self.engine.queue.depth() as f64);
                drop(job);
                true
            }
            None => false,
        };
        JobEvent::stopped(reason, !queued)
    }
}

impl Drop for JobStream {
    fn drop(&mut self) {
        if !self.done {
            self.cancel(StopReason::ClientGone);
        }
    }
}
