//! Prometheus metrics (served on the admin port at `/metrics`) and in-process counters.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `stylealign_requests_total` | counter | `method`, `code` (gRPC status name, `OK` …) |
//! | `stylealign_queue_depth` | gauge | |
//! | `stylealign_queue_time_seconds` | histogram | |
//! | `stylealign_step_time_seconds` | histogram | (one UNet batch step, all its rows) |
//! | `stylealign_batch_rows` | histogram | (images per UNet batch) |
//! | `stylealign_batch_sets` | histogram | (requests per UNet batch) |
//! | `stylealign_generate_seconds` | histogram | (request arrival → last image) |
//! | `stylealign_images_total` | counter | |
//! | `stylealign_dropped_total` | counter | `reason` (`deadline_exceeded`, `cancelled`, `shutting_down`), `stage` (`queued`, `running`) |
//! | `stylealign_sessions` | gauge | |
//! | `stylealign_running_batches` | gauge | |
//! | `stylealign_stop_seconds` | histogram | `reason` (as `stylealign_dropped_total`): a running set's stop request (for a deadline: the deadline) → the set stopped |
//! | `process_resident_memory_bytes` | gauge | (Linux: `VmRSS`, read when `/metrics` is scraped) |
//! | `stylealign_device_up` | gauge | `device`: 1 while it takes work, 0 once failed |
//! | `stylealign_device_batches_total` | counter | `device`: batches it ran |
//! | `stylealign_device_busy_seconds` | gauge | `device`: time its workers spent running batches (only grows) |
//! | `stylealign_device_batch_rows` | histogram | `device`: images per UNet batch it ran |
//! | `stylealign_device_running_rows` | gauge | `device`: rows of its running batches (the router's load) |
//! | `stylealign_device_memory_bytes` | gauge | `device`: memory in use (CUDA: the device's used memory; CPU: resident memory; wgpu: burn's reserved pool), after each batch |
//! | `stylealign_device_memory_budget_bytes` | gauge | `device`: its memory budget for requests |
//! | `stylealign_device_max_batch_rows` | gauge | `device`, `model`: its batch row cap at the model's native size and the default steps |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::cancel::StopReason;

pub const REQUESTS: &str = "stylealign_requests_total";
pub const QUEUE_DEPTH: &str = "stylealign_queue_depth";
pub const QUEUE_TIME: &str = "stylealign_queue_time_seconds";
pub const STEP_TIME: &str = "stylealign_step_time_seconds";
pub const BATCH_ROWS: &str = "stylealign_batch_rows";
pub const BATCH_SETS: &str = "stylealign_batch_sets";
pub const GENERATE_TIME: &str = "stylealign_generate_seconds";
pub const IMAGES: &str = "stylealign_images_total";
pub const DROPPED: &str = "stylealign_dropped_total";
pub const SESSIONS: &str = "stylealign_sessions";
pub const RUNNING: &str = "stylealign_running_batches";
pub const STOP_TIME: &str = "stylealign_stop_seconds";
/// The Prometheus client libraries' standard name.
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
pub const INVERSION_CACHE_HITS: &str = "stylealign_inversion_cache_hits_total";
pub const INVERSION_CACHE_MISSES: &str = "stylealign_inversion_cache_misses_total";
pub const DEVICE_UP: &str = "stylealign_device_up";
pub const DEVICE_BATCHES: &str = "stylealign_device_batches_total";
pub const DEVICE_BUSY_SECONDS: &str = "stylealign_device_busy_seconds";
pub const DEVICE_BATCH_ROWS: &str = "stylealign_device_batch_rows";
pub const DEVICE_RUNNING_ROWS: &str = "stylealign_device_running_rows";
pub const DEVICE_MEMORY: &str = "stylealign_device_memory_bytes";
pub const DEVICE_MEMORY_BUDGET: &str = "stylealign_device_memory_budget_bytes";
pub const DEVICE_MAX_BATCH_ROWS: &str = "stylealign_device_max_batch_rows";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
/// If another recorder was installed first, metrics go there and `/metrics` renders nothing.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let seconds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
            let rows = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), &rows))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SETS.into()), &rows))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(DEVICE_BATCH_ROWS.into()), &rows))
                .expect("bucket lists are non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(REQUESTS, "RPCs by method and final gRPC status code");
    metrics::describe_gauge!(QUEUE_DEPTH, "Generate requests waiting in the admission queue");
    metrics::describe_histogram!(QUEUE_TIME, metrics::Unit::Seconds, "Time a request waited before its batch started");
    metrics::describe_histogram!(STEP_TIME, metrics::Unit::Seconds, "Time of one denoising step of a UNet batch");
    metrics::describe_histogram!(BATCH_ROWS, "Images (rows) per UNet batch");
    metrics::describe_histogram!(BATCH_SETS, "Requests (sets) per UNet batch");
    metrics::describe_histogram!(GENERATE_TIME, metrics::Unit::Seconds, "Generate requests: arrival to last image");
    metrics::describe_counter!(IMAGES, "Images generated");
    metrics::describe_counter!(DROPPED, "Requests stopped before completion, by reason and stage");
    metrics::describe_gauge!(SESSIONS, "Live sessions");
    metrics::describe_gauge!(RUNNING, "UNet batches running");
    metrics::describe_histogram!(
        STOP_TIME,
        metrics::Unit::Seconds,
        "Running sets: time from the stop request (or deadline) to the set stopped"
    );
    metrics::describe_gauge!(DEVICE_UP, "1 while the device takes work, 0 once it failed");
    metrics::describe_counter!(DEVICE_BATCHES, "UNet batches run on the device");
    metrics::describe_gauge!(DEVICE_BUSY_SECONDS, metrics::Unit::Seconds, "Time the device's workers spent running batches");
    metrics::describe_histogram!(DEVICE_BATCH_ROWS, "Images (rows) per UNet batch on the device");
    metrics::describe_gauge!(DEVICE_RUNNING_ROWS, "Rows of the batches running on the device (the router's load)");
    metrics::describe_gauge!(DEVICE_MEMORY, metrics::Unit::Bytes, "Memory in use on the device");
    metrics::describe_gauge!(DEVICE_MEMORY_BUDGET, metrics::Unit::Bytes, "The device's memory budget for requests");
    metrics::describe_gauge!(DEVICE_MAX_BATCH_ROWS, "The device's batch row cap at the model's native size and the default steps");
    metrics::describe_gauge!(RESIDENT_MEMORY, metrics::Unit::Bytes, "Resident memory size of the server process");
}

/// Sets `process_resident_memory_bytes` from `/proc/self/status` (no-op where it is missing).
pub fn update_process_memory() {
    if let Some(b) = resident_memory_bytes() {
        metrics::gauge!(RESIDENT_MEMORY).set(b as f64);
    }
}

/// This process's resident set size (Linux `VmRSS`), in bytes.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A stopped running request: when the stop was asked for and after which step its rows left
/// the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopRecord {
    pub job: u64,
    pub reason: StopReason,
    /// From the stop request (for a deadline: the deadline) to the set leaving its batch.
    pub latency: std::time::Duration,
    /// Steps completed when the stop was requested.
    pub requested_at_step: u32,
    /// The last step its rows took part in.
    pub stopped_after_step: u32,
    pub total_steps: u32,
}

/// In-process counters (exact, for tests and the load test).
#[derive(Debug, Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub batch_rows: AtomicU64,
    /// Most sets seen in one batch.
    pub max_batch_sets: AtomicU64,
    pub sets_completed: AtomicU64,
    pub images: AtomicU64,
    pub steps: AtomicU64,
    pub expired_in_queue: AtomicU64,
    pub cancelled_in_queue: AtomicU64,
    pub aborted_in_queue: AtomicU64,
    stops: Mutex<Vec<StopRecord>>,
}

impl Stats {
    pub fn record_stop(&self, r: StopRecord) {
        metrics::counter!(DROPPED, "reason" => r.reason.label(), "stage" => "running").increment(1);
        metrics::histogram!(STOP_TIME, "reason" => r.reason.label()).record(r.latency.as_secs_f64());
        self.stops.lock().unwrap_or_else(|p| p.into_inner()).push(r);
    }

    pub fn record_dropped_in_queue(&self, reason: StopReason) {
        metrics::counter!(DROPPED, "reason" => reason.label(), "stage" => "queued").increment(1);
        let c = match reason {
            StopReason::Deadline => &self.expired_in_queue,
            StopReason::ClientGone => &self.cancelled_in_queue,
            StopReason::Shutdown => &self.aborted_in_queue,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stops(&self) -> Vec<StopRecord> {
        self.stops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
