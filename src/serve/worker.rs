//! Generation jobs and the worker threads that run them.
//!
//! One worker per device (for the CPU, a configurable number sharing it); each is a dedicated OS
//! thread, since burn's operations are synchronous and CPU-heavy: the async runtime never runs
//! model code. A worker takes a [`Batch`] from the queue and runs all its sets as one UNet batch
//! ([`Pipeline::generate`]), each set its own style group.
//!
//! Stopping: after every step the worker asks each job whether it is still wanted (client still
//! there, deadline not passed, server not aborting). An unwanted set leaves the batch at once, so
//! its rows take no part in the next step; its batch-mates continue unchanged (a set's images do
//! not depend on what it is batched with).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::convert::{GENERATOR, ImageParameters, ReferenceParameters};
use super::infotext::infotext;
use super::metrics::{self as m, Stats, StopRecord};
use super::queue::{Batch, BatchPolicy, Dropped, Priority, Queue, QueueItem};
use crate::pipeline::{BatchSpec, Pipeline, PipelineError, SetSpec};

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
    Internal,
}

/// What a job tells its request stream.
#[derive(Clone, Debug)]
pub enum JobEvent {
    Queued { position: usize, depth: usize },
    Started { batch_rows: usize, batch_sets: usize, queue_time: Duration },
    Progress { step: usize, total: usize },
    Image(Box<ImageOut>),
    Done,
    Failed { code: FailCode, message: String },
}

/// Shared between a request's stream and the worker.
#[derive(Debug, Default)]
pub struct JobControl {
    /// 0: wanted; else a [`Dropped`] reason code.
    stop: AtomicU8,
    /// Steps completed so far.
    pub progress: AtomicU32,
    /// `progress` when the stop was requested.
    pub stop_requested_at: AtomicU32,
}

impl JobControl {
    /// Asks the job to stop (first reason wins).
    pub fn request_stop(&self, reason: Dropped) {
        let code = match reason {
            Dropped::DeadlineExceeded => 1,
            Dropped::Cancelled => 2,
            Dropped::ShuttingDown => 3,
        };
        if self.stop.compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            self.stop_requested_at.store(self.progress.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }

    pub fn stop_reason(&self) -> Option<Dropped> {
        match self.stop.load(Ordering::SeqCst) {
            1 => Some(Dropped::DeadlineExceeded),
            2 => Some(Dropped::Cancelled),
            3 => Some(Dropped::ShuttingDown),
            _ => None,
        }
    }
}

/// The request facts recorded in every image.
#[derive(Clone, Debug)]
pub struct Provenance {
    pub model: Arc<str>,
    pub family: &'static str,
    /// SHA-256 of the model's UNet weights (hex).
    pub model_sha256: Arc<str>,
}

/// One Generate request in the queue: one set.
pub struct GenJob {
    pub id: u64,
    pub priority: Priority,
    pub model: Arc<str>,
    pub provenance: Provenance,
    pub batch: BatchSpec,
    pub set: SetSpec,
    /// SHA-256 of the encoded reference image, recorded in the images' parameters.
    pub reference_sha256: Option<String>,
    pub deadline: Option<Instant>,
    pub control: Arc<JobControl>,
    pub events: UnboundedSender<JobEvent>,
    pub stats: Arc<Stats>,
    /// The request's span (see [`crate::telemetry`]); the worker's spans for this set go below it.
    pub span: tracing::Span,
    /// Open while the job waits for a worker.
    pub queue_span: Option<tracing::Span>,
    /// What admission granted: the reference pixels it holds until it ends, its batch row cap.
    pub admitted: super::admission::Admitted,
}

impl GenJob {
    fn send(&self, e: JobEvent) {
        // The stream may be gone (client left); the job is then stopped at the next check.
        let _ = self.events.send(e);
    }

    fn fail(&self, code: FailCode, message: impl Into<String>) {
        self.send(JobEvent::Failed { code, message: message.into() });
    }

    /// Why it should stop now, if it should.
    fn stop_now(&self, now: Instant, abort: bool) -> Option<Dropped> {
        if let Some(r) = self.control.stop_reason() {
            return Some(r);
        }
        if self.events.is_closed() {
            return Some(Dropped::Cancelled);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Some(Dropped::DeadlineExceeded);
        }
        abort.then_some(Dropped::ShuttingDown)
    }
}

pub fn dropped_failure(reason: Dropped, running: bool) -> (FailCode, String) {
    let when = if running { "while running" } else { "while queued (never ran)" };
    match reason {
        Dropped::DeadlineExceeded => (FailCode::DeadlineExceeded, format!("deadline exceeded {when}")),
        Dropped::Cancelled => (FailCode::Cancelled, format!("cancelled {when}")),
        Dropped::ShuttingDown => (FailCode::Unavailable, format!("server shutting down: stopped {when}")),
    }
}

impl QueueItem for GenJob {
    fn priority(&self) -> Priority {
        self.priority
    }

    fn rows(&self) -> usize {
        self.set.prompts.len()
    }

    fn max_rows(&self) -> usize {
        self.admitted.max_rows
    }

    fn compatible(&self, other: &Self) -> bool {
        self.model == other.model && self.batch == other.batch
    }

    fn stopped(&self, now: Instant) -> Option<Dropped> {
        self.stop_now(now, false)
    }

    fn on_position(&mut self, position: usize, depth: usize) {
        self.send(JobEvent::Queued { position, depth });
    }

    fn on_dropped(self, reason: Dropped) {
        self.stats.record_dropped_in_queue(reason);
        let (code, msg) = dropped_failure(reason, false);
        self.fail(code, msg);
    }
}

/// The models a worker can run, by name.
pub type Models = HashMap<Arc<str>, Pipeline>;

/// Set by the server to cut running work short (drain deadline passed).
pub type AbortFlag = Arc<AtomicBool>;

/// Spawns a worker thread; it ends when the queue is closed and empty.
pub fn spawn_worker(
    name: String,
    models: Models,
    queue: Arc<Queue<GenJob>>,
    policy: BatchPolicy,
    abort: AbortFlag,
    stats: Arc<Stats>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        tracing::info!(worker = %name, "worker started");
        while let Some(batch) = queue.next_batch(&policy) {
            metrics::gauge!(m::QUEUE_DEPTH).set(queue.depth() as f64);
            metrics::gauge!(m::RUNNING).increment(1.0);
            run_batch(&name, &models, batch, &abort, &stats);
            metrics::gauge!(m::RUNNING).decrement(1.0);
            queue.finish_batch();
        }
        tracing::info!(worker = %name, "worker stopped");
    })
}

/// The span of one denoising step of a set.
fn step_span(batch: &tracing::Span, step: usize, total: usize) -> tracing::Span {
    tracing::info_span!(target: crate::telemetry::TARGET, parent: batch, "step", step = step as i64, total = total as i64)
}

/// Runs one batch; every job gets its images or a failure, even if the model panics.
pub fn run_batch(worker: &str, models: &Models, batch: Batch<GenJob>, abort: &AtomicBool, stats: &Stats) {
    let (mut jobs, waits): (Vec<GenJob>, Vec<Duration>) = batch.items.into_iter().unzip();
    for j in &mut jobs {
        j.queue_span = None;
    }
    let Some(first) = jobs.first() else { return };
    let Some(pipeline) = models.get(&first.model).cloned() else {
        for j in &jobs {
            j.fail(FailCode::Internal, format!("model {} is not loaded on worker {worker}", j.model));
        }
        return;
    };
    let spec = first.batch.clone();
    let rows: usize = jobs.iter().map(|j| j.set.prompts.len()).sum();
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.batch_rows.fetch_add(rows as u64, Ordering::Relaxed);
    stats.max_batch_sets.fetch_max(jobs.len() as u64, Ordering::Relaxed);
    metrics::histogram!(m::BATCH_ROWS).record(rows as f64);
    metrics::histogram!(m::BATCH_SETS).record(jobs.len() as f64);
    for (j, w) in jobs.iter().zip(&waits) {
        metrics::histogram!(m::QUEUE_TIME).record(w.as_secs_f64());
        j.send(JobEvent::Started { batch_rows: rows, batch_sets: jobs.len(), queue_time: *w });
    }
    let span = tracing::info_span!("batch", worker, model = %first.model, sets = jobs.len(), rows, steps = spec.steps, width = spec.width, height = spec.height);
    let _enter = span.enter();
    tracing::info!(jobs = ?jobs.iter().map(|j| j.id).collect::<Vec<_>>(), "batch started");
    let started = Instant::now();

    let sets: Vec<SetSpec> = jobs.iter().map(|j| j.set.clone()).collect();
    let set_spans: Vec<tracing::Span> = jobs
        .iter()
        .map(|j| tracing::info_span!(target: crate::telemetry::TARGET, parent: &j.span, "batch", worker, sets = jobs.len() as i64, rows = rows as i64, width = spec.width as i64, height = spec.height as i64))
        .collect();
    // Per set: the span of the step running now, then of the VAE decode after the last step.
    let mut phase: Vec<Option<tracing::Span>> = set_spans.iter().map(|b| Some(step_span(b, 1, spec.steps))).collect();
    // Jobs still in the batch; the closure records who stopped when.
    let live = Mutex::new(vec![true; jobs.len()]);
    let mut last = Instant::now();
    let mut on_step = |step: usize, total: usize| -> Vec<bool> {
        let now = Instant::now();
        metrics::histogram!(m::STEP_TIME).record(now.duration_since(last).as_secs_f64());
        last = now;
        stats.steps.fetch_add(1, Ordering::Relaxed);
        let abort = abort.load(Ordering::SeqCst);
        let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
        for (k, j) in jobs.iter().enumerate() {
            if !live[k] {
                continue;
            }
            // A job whose last step just finished is complete: nothing to stop.
            match (step < total).then(|| j.stop_now(now, abort)).flatten() {
                Some(reason) => {
                    live[k] = false;
                    if j.control.stop_reason().is_none() {
                        j.control.request_stop(reason);
                    }
                    stats.record_stop(StopRecord {
                        job: j.id,
                        reason,
                        requested_at_step: j.control.stop_requested_at.load(Ordering::SeqCst),
                        stopped_after_step: step as u32,
                        total_steps: total as u32,
                    });
                    tracing::info!(job = j.id, step, total, reason = m::dropped_label(reason), "set stopped");
                    let (code, msg) = dropped_failure(reason, true);
                    j.fail(code, format!("{msg} (after step {step} of {total})"));
                }
                None => {
                    j.control.progress.store(step as u32, Ordering::SeqCst);
                    j.send(JobEvent::Progress { step, total });
                }
            }
            phase[k] = live[k].then(|| match step < total {
                true => step_span(&set_spans[k], step + 1, total),
                false => tracing::info_span!(target: crate::telemetry::TARGET, parent: &set_spans[k], "decode"),
            });
        }
        live.clone()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pipeline.generate(&spec, &sets, &mut on_step)));
    let (hits, misses) = pipeline.inversion_cache_stats();
    metrics::counter!(m::INVERSION_CACHE_HITS).absolute(hits);
    metrics::counter!(m::INVERSION_CACHE_MISSES).absolute(misses);
    drop(phase);
    let live = live.into_inner().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(Ok(outputs)) => {
            for (((j, out), alive), set_span) in jobs.iter().zip(outputs).zip(live).zip(&set_spans) {
                match out {
                    Some(images) if alive => {
                        for (index, img) in images.into_iter().enumerate() {
                            let _encode =
                                tracing::info_span!(target: crate::telemetry::TARGET, parent: set_span, "encode", index = index as i64)
                                    .entered();
                            let prompt = j.set.prompts.get(index).cloned().unwrap_or_default();
                            let params = ImageParameters {
                                generator: GENERATOR,
                                model: &j.provenance.model,
                                model_family: j.provenance.family,
                                model_sha256: &j.provenance.model_sha256,
                                prompts: &j.set.prompts,
                                index,
                                prompt: &prompt,
                                negative_prompt: &j.set.negative_prompt,
                                seed: j.set.seed,
                                steps: spec.steps,
                                sampler: spec.sampler.as_str(),
                                guidance_scale: spec.guidance,
                                width: spec.width,
                                height: spec.height,
                                options: spec.patch.as_ref().expect("sessions always patch"),
                                reference: j.set.reference.as_ref().map(|r| ReferenceParameters {
                                    image_sha256: j.reference_sha256.as_deref().unwrap_or(""),
                                    caption: &r.caption,
                                    offset: r.offset,
                                    guidance_scale: r.guidance,
                                }),
                                size_conditioning: spec.size_conditioning.map(|s| s.time_ids()),
                            };
                            let parameters = serde_json::to_string(&params).expect("parameters serialize");
                            let png = img
                                .to_png(&[("parameters".to_string(), infotext(&params)), ("stylealign".to_string(), parameters.clone())]);
                            stats.images.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!(m::IMAGES).increment(1);
                            j.send(JobEvent::Image(Box::new(ImageOut {
                                index,
                                prompt,
                                width: img.width,
                                height: img.height,
                                seed: j.set.seed,
                                png,
                                parameters,
                            })));
                        }
                        stats.sets_completed.fetch_add(1, Ordering::Relaxed);
                        j.send(JobEvent::Done);
                    }
                    // Stopped: already told.
                    _ if !alive => {}
                    _ => j.fail(FailCode::Internal, "the pipeline returned no images for a set it was not asked to stop"),
                }
            }
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "batch done");
        }
        Ok(Err(e)) => {
            let (code, msg) = match &e {
                PipelineError::Invalid { .. } => (FailCode::InvalidArgument, e.to_string()),
                _ => (FailCode::Internal, format!("generation failed: {e}")),
            };
            tracing::error!(error = %e, "batch failed");
            for (j, alive) in jobs.iter().zip(live) {
                if alive {
                    j.fail(code, msg.clone());
                }
            }
        }
        Err(panic) => {
            let what =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            tracing::error!(panic = %what, "batch panicked");
            for (j, alive) in jobs.iter().zip(live) {
                if alive {
                    j.fail(FailCode::Internal, format!("generation panicked: {what}"));
                }
            }
        }
    }
}
