//! The device pool: one lane of the [`Queue`](super::queue::Queue) per device, each with its own
//! memory budget, row cap and metrics.
//!
//! - **Routing** (in [`super::queue`]): a request goes to the least-loaded device that can run it.
//!   The load is the rows of the batches running on the device, then its busy time so far: rows
//!   are known exactly when a batch starts, and a device's time and memory per step grow with
//!   them; a device with a worker waiting for work runs nothing unless it shares the device
//!   (the CPU's `--cpu-workers`), so among idle GPUs the busy-time tie-break spreads work over
//!   all of them, and a faster device, back sooner, takes more. Estimated time per batch would
//!   need a per-device speed model that nothing measures yet.
//! - **Cap**: a device's batch row cap at a request's size comes from its own budget
//!   ([`Admission::for_device`]); a device whose cap is below a request's rows is not routed to.
//! - **Failure**: a worker whose batch panicked on a GPU device (a device error: lost device,
//!   out of memory) marks the device down (`stylealign_device_up` 0): it gets no more work. A
//!   worker thread that ends leaves its device; with no device left, waiting requests fail
//!   and new ones are refused (UNAVAILABLE).
//! - **Metrics** (label `device`: `cpu`, `cuda:0`, `wgpu:0`; a device named twice gets `#1`, …):
//!   see [`super::metrics`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::admission::Admission;
use super::job::GenJob;
use super::metrics as m;
use crate::device::DeviceSpec;
use crate::device_memory::{self, MemoryReport};
use crate::pipeline::cost::CostModel;

/// One device of the pool.
pub struct PoolDevice {
    /// Its `device` label in the metrics and logs.
    pub label: String,
    pub spec: DeviceSpec,
    pub device: burn::tensor::Device,
    /// Its memory budget, request limit and row caps.
    pub admission: Arc<Admission>,
    /// `--max-batch-rows`.
    pub max_batch_rows: usize,
    /// Each served model's cost model on this device.
    costs: HashMap<Arc<str>, CostModel>,
}

impl PoolDevice {
    /// A device serving `costs` (model name → its cost model there) under `admission`.
    pub fn new(
        label: String,
        spec: DeviceSpec,
        device: burn::tensor::Device,
        admission: Arc<Admission>,
        max_batch_rows: usize,
        costs: HashMap<Arc<str>, CostModel>,
    ) -> Self {
        Self { label, spec, device, admission, max_batch_rows, costs }
    }

    /// Most rows of a batch of `model` at `width`×`height`, `steps` steps on this device (0 when
    /// not even one fits, or the model is not served here).
    pub fn max_rows(&self, model: &str, width: usize, height: usize, steps: usize) -> usize {
        self.costs.get(model).map_or(0, |c| self.admission.max_rows(c, width, height, steps, self.max_batch_rows))
    }

    /// [`max_rows`](Self::max_rows) for a queued job.
    pub fn cap(&self, j: &GenJob) -> usize {
        let b = &j.spec.batch;
        self.max_rows(&j.spec.model, b.width, b.height, b.steps)
    }

    /// What the device reports about its memory now.
    pub fn memory(&self) -> MemoryReport {
        device_memory::report(&self.spec, &self.device)
    }

    /// Publishes the gauges known at start: up, budget, memory in use, and each model's row cap
    /// at `(size, steps)` (its native size, the default steps).
    pub fn publish(&self, caps_at: &[(Arc<str>, usize, usize)]) {
        let d = self.label.clone();
        metrics::gauge!(m::DEVICE_UP, "device" => d.clone()).set(1.0);
        metrics::gauge!(m::DEVICE_MEMORY_BUDGET, "device" => d.clone()).set(self.admission.budget() as f64);
        // Shown from the start (in-process servers share the recorder: add, never reset).
        metrics::gauge!(m::DEVICE_RUNNING_ROWS, "device" => d.clone()).increment(0.0);
        metrics::counter!(m::DEVICE_BATCHES, "device" => d.clone()).increment(0);
        metrics::gauge!(m::DEVICE_BUSY_SECONDS, "device" => d.clone()).increment(0.0);
        for (model, size, steps) in caps_at {
            let cap = self.max_rows(model, *size, *size, *steps);
            metrics::gauge!(m::DEVICE_MAX_BATCH_ROWS, "device" => d.clone(), "model" => model.to_string()).set(cap as f64);
        }
        self.update_memory();
    }

    /// Sets the memory-in-use gauge from a fresh report.
    pub fn update_memory(&self) {
        if let Some(b) = self.memory().in_use {
            metrics::gauge!(m::DEVICE_MEMORY, "device" => self.label.clone()).set(b as f64);
        }
    }

    /// A batch of `rows` rows started on the device.
    pub fn batch_started(&self, rows: usize) {
        metrics::gauge!(m::DEVICE_RUNNING_ROWS, "device" => self.label.clone()).increment(rows as f64);
        metrics::histogram!(m::DEVICE_BATCH_ROWS, "device" => self.label.clone()).record(rows as f64);
    }

    /// A batch of `rows` rows ended after `busy`.
    pub fn batch_done(&self, rows: usize, busy: Duration) {
        let d = self.label.clone();
        self.update_memory();
        metrics::gauge!(m::DEVICE_RUNNING_ROWS, "device" => d.clone()).decrement(rows as f64);
        metrics::gauge!(m::DEVICE_BUSY_SECONDS, "device" => d.clone()).increment(busy.as_secs_f64());
        // Last: a reader who sees the batch counted sees the rest of it.
        metrics::counter!(m::DEVICE_BATCHES, "device" => d).increment(1);
    }

    /// The device failed: no more work goes to it.
    pub fn mark_down(&self) {
        metrics::gauge!(m::DEVICE_UP, "device" => self.label.clone()).set(0.0);
    }
}

/// The `device` label of each of `specs`: its name (`cpu`, `cuda:1`, `wgpu:0`), with `#1`, `#2`,
/// … after a name given again.
pub fn labels(specs: &[DeviceSpec]) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    specs
        .iter()
        .map(|s| {
            let name = s.to_string();
            let n = seen.entry(name.clone()).or_default();
            let label = if *n == 0 { name } else { format!("{name}#{n}") };
            *n += 1;
            label
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_repeated_devices_apart() {
        let specs = [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cpu, DeviceSpec::Cuda(1), DeviceSpec::Cpu];
        assert_eq!(labels(&specs), ["cpu", "cuda:0", "cpu#1", "cuda:1", "cpu#2"]);
    }
}
