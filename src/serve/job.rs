//! What a job is: the request the engine takes ([`JobSpec`]), the events it gives back
//! ([`JobEvent`]) and the queued form the workers run ([`GenJob`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::cancel::{CancelToken, StopReason};
use super::metrics::Stats;
use super::queue::{Priority, QueueItem};
use crate::pipeline::{BatchSpec, SetSpec};

/// The request facts recorded in every image.
#[derive(Clone, Debug)]
pub struct Provenance {
    pub model: Arc<str>,
    pub family: &'static str,
    /// SHA-256 of the model's UNet weights (hex).
    pub model_sha256: Arc<str>,
}

/// One Generate request (one style-aligned set), validated, for [`Engine::submit`](super::engine::Engine::submit).
#[derive(Debug)]
pub struct JobSpec {
    /// For logs and spans ([`Engine::next_id`](super::engine::Engine::next_id)).
    pub id: u64,
    pub priority: Priority,
    /// The model's name (a key of the workers' models).
    pub model: Arc<str>,
    pub provenance: Provenance,
    /// What its batch shares (size, steps, sampler, guidance, patch).
    pub batch: BatchSpec,
    pub set: SetSpec,
    /// SHA-256 of the encoded reference image, recorded in the images' parameters.
    pub reference_sha256: Option<String>,
    /// The set's img2img targets as recorded in the images' parameters.
    pub init_images: Vec<super::convert::InitParameters>,
    /// The set's ControlNets as recorded in the images' parameters (`model`: the name each worker
    /// resolves to its device's copy), in the order of `set.controls`.
    pub controls: Vec<super::convert::ControlParameters>,
    /// The session's LoRAs (names and weights): each worker binds them to its device's loaded
    /// LoRAs when the batch starts. Not part of batch compatibility: sets with different LoRAs
    /// share a batch.
    pub loras: Vec<super::convert::LoraParameters>,
    /// Past it, the job stops wherever it is (queued, or running: within a step).
    pub deadline: Option<Instant>,
    /// The request's span (see [`crate::telemetry`]); the worker's spans for this set go below it.
    pub span: tracing::Span,
    /// What admission granted: the reference pixels it holds until it ends, its batch row cap.
    pub admitted: super::admission::Admitted,
}

/// A generated image, ready to send.
#[derive(Clone, Debug)]
pub struct ImageOut {
    pub index: usize,
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub png: Vec<u8>,
    pub parameters: String,
}

/// Failure classes, mapped to gRPC codes by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailCode {
    InvalidArgument,
    DeadlineExceeded,
    Cancelled,
    Unavailable,
    /// A resource the job needs is exhausted (a LoRA does not fit the LoRA cache).
    ResourceExhausted,
    Internal,
}

impl From<StopReason> for FailCode {
    fn from(r: StopReason) -> Self {
        match r {
            StopReason::Deadline => FailCode::DeadlineExceeded,
            StopReason::ClientGone => FailCode::Cancelled,
            StopReason::Shutdown => FailCode::Unavailable,
        }
    }
}

/// What a job tells its [`JobStream`](super::engine::JobStream), in order: `Queued` (zero or
/// more), `Started`, `Progress` per step, `Image` per image, then `Done` — or `Failed` at any
/// point, last.
#[derive(Clone, Debug)]
pub enum JobEvent {
    Queued { position: usize, depth: usize },
    Started { batch_rows: usize, batch_sets: usize, queue_time: Duration },
    Progress { step: usize, total: usize },
    Image(Box<ImageOut>),
    Done,
    Failed { code: FailCode, message: String },
}

impl JobEvent {
    /// The event that ends a job stopped for `reason`.
    pub fn stopped(reason: StopReason, running: bool) -> JobEvent {
        let when = if running { "while running" } else { "while queued (never ran)" };
        let message = match reason {
            StopReason::Deadline => format!("deadline exceeded {when}"),
            StopReason::ClientGone => format!("cancelled {when}"),
            StopReason::Shutdown => format!("server shutting down: stopped {when}"),
        };
        JobEvent::Failed { code: reason.into(), message }
    }

    /// Whether it is the job's last event.
    pub fn is_final(&self) -> bool {
        matches!(self, JobEvent::Done | JobEvent::Failed { .. })
    }
}

/// A job in the engine: its spec, its stop token and its event channel. Dropped when it is done
/// (run, or left the queue); it then leaves the engine's registry.
pub struct GenJob {
    pub spec: JobSpec,
    pub token: CancelToken,
    pub events: UnboundedSender<JobEvent>,
    pub stats: Arc<Stats>,
    /// Open while the job waits for a worker.
    pub queue_span: Option<tracing::Span>,
    /// Removes the job from the engine's registry when dropped.
    pub(crate) _registration: Option<super::engine::Registration>,
}

impl GenJob {
    pub fn send(&self, e: JobEvent) {
        // The stream may be gone (client left); its token is then cancelled.
        let _ = self.events.send(e);
    }

    pub fn fail(&self, code: FailCode, message: impl Into<String>) {
        self.send(JobEvent::Failed { code, message: message.into() });
    }
}

impl QueueItem for GenJob {
    fn priority(&self) -> Priority {
        self.spec.priority
    }

    fn rows(&self) -> usize {
        self.spec.set.prompts.len()
    }

    fn max_rows(&self) -> usize {
        self.spec.admitted.max_rows
    }

    fn compatible(&self, other: &Self) -> bool {
        self.spec.model == other.spec.model && self.spec.batch == other.spec.batch
    }

    fn stopped(&self, _now: Instant) -> Option<StopReason> {
        self.token.reason()
    }

    fn on_position(&mut self, position: usize, depth: usize) {
        self.send(JobEvent::Queued { position, depth });
    }

    fn on_dropped(self, reason: StopReason) {
        self.stats.record_dropped_in_queue(reason);
        self.send(JobEvent::stopped(reason, false));
    }
}
