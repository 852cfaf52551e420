//! The worker threads of the [`Engine`](super::engine::Engine): take a batch, run it, send the
//! jobs' events.
//!
//! One worker per device (for the CPU, a configurable number sharing it); each is a dedicated OS
//! thread, since burn's operations are synchronous and CPU-heavy: the async runtime never runs
//! model code. A worker takes a [`Batch`] from the queue and runs all its sets as one UNet batch
//! ([`Pipeline::generate_until`]), each set its own style group, stopped by the sets' tokens:
//! a stopped set leaves the batch at the next step boundary (its batch-mates continue
//! unchanged); when every set is stopped the step itself is abandoned.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::cancel::CancelToken;
use super::convert::{GENERATOR, ImageParameters, ReferenceParameters};
use super::infotext::infotext;
use super::job::{FailCode, GenJob, ImageOut, JobEvent};
use super::metrics::{self as m, Stats, StopRecord};
use super::pool::PoolDevice;
use super::queue::{Batch, BatchPolicy, Queue};
use crate::device::DeviceSpec;
use crate::model::controlnet::ControlNet;
use crate::pipeline::{Pipeline, PipelineError, RunEvent, SetSpec, SetStop};

/// The models a worker can run, by name.
/// A device's loaded models and ControlNets, by name.
#[derive(Clone, Default)]
pub struct Models {
    pub pipelines: HashMap<Arc<str>, Pipeline>,
    pub controlnets: HashMap<Arc<str>, Arc<ControlNet>>,
    /// The served LoRAs and their cache (`--lora-dir`).
    pub loras: Option<Arc<super::loras::LoraLibrary>>,
}

/// Spawns a worker thread of `device`, lane `lane` of the queue; it ends when the queue is
/// closed and empty, or when its device fails (see [`super::pool`]).
pub(crate) fn spawn(
    name: String,
    lane: usize,
    device: Arc<PoolDevice>,
    models: Models,
    queue: Arc<Queue<GenJob>>,
    policy: BatchPolicy,
    stats: Arc<Stats>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name.clone()).spawn(move || {
        /// Leaves the lane however the thread ends (also when it unwinds).
        struct Leave(Arc<Queue<GenJob>>, usize);
        impl Drop for Leave {
            fn drop(&mut self) {
                self.0.worker_stopped(self.1);
            }
        }
        let _leave = Leave(queue.clone(), lane);
        tracing::info!(worker = %name, device = %device.label, "worker started");
        while let Some(batch) = queue.next_batch_on(lane, &policy) {
            let rows = batch.rows;
            metrics::gauge!(m::QUEUE_DEPTH).set(queue.depth() as f64);
            metrics::gauge!(m::RUNNING).increment(1.0);
            device.batch_started(rows);
            let started = Instant::now();
            let panicked = run_batch(&name, &models, batch, &stats);
            let busy = started.elapsed();
            device.batch_done(rows, busy);
            metrics::gauge!(m::RUNNING).decrement(1.0);
            queue.finish_batch_on(lane, rows, busy);
            // A GPU that panicked (lost device, out of memory) is in an unknown state.
            if panicked && device.spec != DeviceSpec::Cpu {
                tracing::error!(worker = %name, device = %device.label, "a batch panicked on a GPU device: no more work goes to it");
                device.mark_down();
                queue.lane_down(lane);
                break;
            }
        }
        tracing::info!(worker = %name, "worker stopped");
    })
}

/// The span of one denoising step of a set.
fn step_span(batch: &tracing::Span, step: usize, total: usize) -> tracing::Span {
    tracing::info_span!(target: crate::telemetry::TARGET, parent: batch, "step", step = step as i64, total = total as i64)
}

/// A job's set with its ControlNets bound to this device's copies (by name), and its LoRAs to
/// this device's loaded LoRAs (held until the batch ends).
fn on_this_device(models: &Models, pipeline: &Pipeline, j: &GenJob) -> Result<SetSpec, (FailCode, String)> {
    let mut set = j.spec.set.clone();
    for (c, rec) in set.controls.iter_mut().zip(&j.spec.controls) {
        let net = models
            .controlnets
            .get(rec.model.as_str())
            .ok_or_else(|| (FailCode::Internal, format!("ControlNet {} is not loaded", rec.model)))?;
        c.net = net.clone();
    }
    if !j.spec.loras.is_empty() {
        let lib = models.loras.as_ref().ok_or_else(|| (FailCode::Internal, "no LoRAs are served".to_string()))?;
        for l in &j.spec.loras {
            let lora = lib.get(&j.spec.model, pipeline, &l.name).map_err(|e| match e {
                super::loras::LoraError::Busy { .. } | super::loras::LoraError::TooLarge { .. } => {
                    (FailCode::ResourceExhausted, e.to_string())
                }
                other => (FailCode::Internal, other.to_string()),
            })?;
            set.loras.push((lora, l.weight));
        }
    }
    Ok(set)
}

/// Runs one batch; every job gets its images or a failure, even if the model panics. True when
/// it panicked.
fn run_batch(worker: &str, models: &Models, batch: Batch<GenJob>, stats: &Stats) -> bool {
    let (mut jobs, waits): (Vec<GenJob>, Vec<Duration>) = batch.items.into_iter().unzip();
    for j in &mut jobs {
        j.queue_span = None;
    }
    let Some(first) = jobs.first() else { return false };
    let Some(pipeline) = models.pipelines.get(&first.spec.model).cloned() else {
        for j in &jobs {
            j.fail(FailCode::Internal, format!("model {} is not loaded on worker {worker}", j.spec.model));
        }
        return false;
    };
    let spec = first.spec.batch.clone();
    let rows: usize = jobs.iter().map(|j| j.spec.set.prompts.len()).sum();
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.batch_rows.fetch_add(rows as u64, Ordering::Relaxed);
    stats.max_batch_sets.fetch_max(jobs.len() as u64, Ordering::Relaxed);
    metrics::histogram!(m::BATCH_ROWS).record(rows as f64);
    metrics::histogram!(m::BATCH_SETS).record(jobs.len() as f64);
    for (j, w) in jobs.iter().zip(&waits) {
        metrics::histogram!(m::QUEUE_TIME).record(w.as_secs_f64());
        j.send(JobEvent::Started { batch_rows: rows, batch_sets: jobs.len(), queue_time: *w });
    }
    let model = first.spec.model.clone();
    let span = tracing::info_span!("batch", worker, model = %model, sets = jobs.len(), rows, steps = spec.steps, width = spec.width, height = spec.height);
    let _enter = span.enter();
    tracing::info!(jobs = ?jobs.iter().map(|j| j.spec.id).collect::<Vec<_>>(), "batch started");
    let started = Instant::now();

    // A job whose ControlNets or LoRAs cannot be bound fails alone; the others run.
    let bound: Vec<Result<SetSpec, (FailCode, String)>> = jobs.iter().map(|j| on_this_device(models, &pipeline, j)).collect();
    let mut sets: Vec<SetSpec> = Vec::with_capacity(jobs.len());
    let mut kept = Vec::with_capacity(jobs.len());
    for (j, b) in jobs.into_iter().zip(bound) {
        match b {
            Ok(set) => {
                sets.push(set);
                kept.push(j);
            }
            Err((code, message)) => j.fail(code, format!("{message} on worker {worker}")),
        }
    }
    let jobs = kept;
    if jobs.is_empty() {
        return false;
    }
    let set_spans: Vec<tracing::Span> = jobs
        .iter()
        .map(|j| tracing::info_span!(target: crate::telemetry::TARGET, parent: &j.spec.span, "batch", worker, sets = jobs.len() as i64, rows = rows as i64, width = spec.width as i64, height = spec.height as i64))
        .collect();
    // Per set: the span of the step running now, then of the VAE decode.
    let mut phase: Vec<Option<tracing::Span>> = set_spans.iter().map(|b| Some(step_span(b, 1, spec.steps))).collect();
    // The one stop signal of each set: its token.
    let tokens: Vec<CancelToken> = jobs.iter().map(|j| j.token.clone()).collect();
    let stop: SetStop = Arc::new(move |set| tokens.get(set).is_some_and(CancelToken::is_cancelled));
    // Sets still in the batch.
    let mut live = vec![true; jobs.len()];
    let mut last = Instant::now();
    let mut on_event = |e: RunEvent| match e {
        RunEvent::Stepped(v) => {
            let now = Instant::now();
            metrics::histogram!(m::STEP_TIME).record(now.duration_since(last).as_secs_f64());
            last = now;
            stats.steps.fetch_add(1, Ordering::Relaxed);
            for &(k, _) in &v.sets {
                let j = &jobs[k];
                j.token.set_progress(v.step as u32);
                j.send(JobEvent::Progress { step: v.step, total: v.total });
                phase[k] = (v.step < v.total).then(|| step_span(&set_spans[k], v.step + 1, v.total));
            }
        }
        RunEvent::Dropped { set, steps } => {
            let j = &jobs[set];
            live[set] = false;
            phase[set] = None;
            let Some(stop) = j.token.stop() else {
                j.fail(FailCode::Internal, "a set left its batch without a stop request");
                return;
            };
            let latency = Instant::now().saturating_duration_since(stop.at);
            stats.record_stop(StopRecord {
                job: j.spec.id,
                reason: stop.reason,
                latency,
                requested_at_step: stop.at_step,
                stopped_after_step: steps as u32,
                total_steps: spec.steps as u32,
            });
            tracing::info!(
                job = j.spec.id,
                step = steps,
                total = spec.steps,
                reason = stop.reason.label(),
                latency_ms = latency.as_millis() as u64,
                "set stopped"
            );
            let JobEvent::Failed { code, message } = JobEvent::stopped(stop.reason, true) else { unreachable!("stopped() is a failure") };
            j.fail(code, format!("{message} (after step {steps} of {})", spec.steps));
        }
        RunEvent::Decoding { set } => {
            phase[set] = Some(tracing::info_span!(target: crate::telemetry::TARGET, parent: &set_spans[set], "decode"));
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pipeline.generate_until(&spec, &sets, &stop, &mut on_event)));
    let (hits, misses) = pipeline.inversion_cache_stats();
    metrics::counter!(m::INVERSION_CACHE_HITS).absolute(hits);
    metrics::counter!(m::INVERSION_CACHE_MISSES).absolute(misses);
    drop(phase);
    match result {
        Ok(Ok(outputs)) => {
            for (((j, out), alive), set_span) in jobs.iter().zip(outputs).zip(live).zip(&set_spans) {
                match out {
                    Some(images) if alive => send_images(j, images, &spec, set_span, stats),
                    // Stopped: already told.
                    _ if !alive => {}
                    _ => j.fail(FailCode::Internal, "the pipeline returned no images for a set it was not asked to stop"),
                }
            }
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "batch done");
            false
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
            false
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
            true
        }
    }
}

/// Encodes a set's images as PNGs with their parameters and sends them, then `Done`.
fn send_images(
    j: &GenJob,
    images: Vec<crate::pipeline::Image>,
    spec: &crate::pipeline::BatchSpec,
    set_span: &tracing::Span,
    stats: &Stats,
) {
    let js = &j.spec;
    for (index, img) in images.into_iter().enumerate() {
        let _encode = tracing::info_span!(target: crate::telemetry::TARGET, parent: set_span, "encode", index = index as i64).entered();
        let prompt = js.set.prompts.get(index).cloned().unwrap_or_default();
        let params = ImageParameters {
            generator: GENERATOR,
            model: &js.provenance.model,
            model_family: js.provenance.family,
            model_sha256: &js.provenance.model_sha256,
            prompts: &js.set.prompts,
            index,
            prompt: &prompt,
            negative_prompt: &js.set.negative_prompt,
            seed: js.set.seed,
            steps: spec.steps,
            sampler: spec.sampler.as_str(),
            guidance_scale: spec.guidance,
            width: spec.width,
            height: spec.height,
            options: spec.patch.as_ref().expect("sessions always patch"),
            scope: &spec.scope,
            reference: js.set.reference.as_ref().map(|r| ReferenceParameters {
                image_sha256: js.reference_sha256.as_deref().unwrap_or(""),
                caption: &r.caption,
                offset: r.offset,
                guidance_scale: r.guidance,
            }),
            size_conditioning: spec.size_conditioning.map(|s| s.time_ids()),
            init_images: &js.init_images,
            controls: &js.controls,
            loras: &js.loras,
        };
        let parameters = serde_json::to_string(&params).expect("parameters serialize");
        let png = img.to_png(&[("parameters".to_string(), infotext(&params)), ("stylealign".to_string(), parameters.clone())]);
        stats.images.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::IMAGES).increment(1);
        j.send(JobEvent::Image(Box::new(ImageOut {
            index,
            prompt,
            width: img.width,
            height: img.height,
            seed: js.set.seed,
            png,
            parameters,
        })));
    }
    stats.sets_completed.fetch_add(1, Ordering::Relaxed);
    j.send(JobEvent::Done);
}
