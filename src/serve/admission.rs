//! Cost-based admission: a memory budget per device, checked before a request is queued.
//!
//! The budget (`--memory-budget`, `STYLEALIGN_MEMORY_BUDGET`, e.g. `12GiB`, `1536MiB`) is what
//! requests may use on top of the loaded process. By default it is derived after the models are
//! loaded: the memory limit (the cgroup's `memory.max` (v2) or `memory.limit_in_bytes` (v1), else
//! `MemTotal`), less 10 % headroom, less the process's resident memory at that point, less a
//! [`MARGIN`] (allocator slack, gRPC buffers, PNG encoding).
//!
//! A quarter of it is the **reference pool**: a request with a reference image (or img2img init
//! images) holds the decoded images' bytes (a [`Reservation`]) from before it is decoded until its job ends, and is refused
//! (RESOURCE_EXHAUSTED, reason `REFERENCE_POOL_FULL`) when the pool cannot take it. The rest,
//! shared by the device's workers (the CPU's `--cpu-workers` run batches side by side), is the
//! **request limit**: a request whose estimated peak ([`crate::pipeline::cost`]) exceeds it is
//! refused (RESOURCE_EXHAUSTED, reason `OVER_MEMORY_BUDGET`, metadata `estimate_bytes`,
//! `limit_bytes`, `budget_bytes`). The batch row cap at each size comes from the same limit, so
//! batching never builds a batch the limit would refuse.
//!
//! Each device has its own budget ([`Admission::for_device`]): a CUDA device's is derived from
//! its free memory after the models are loaded on it (`cuMemGetInfo`, see
//! [`crate::device_memory`]): free less 10 % of its total, less [`MARGIN`]; the CPU's and other
//! runtimes' (wgpu reports no free memory) as above. `--memory-budget` sets every device's. A
//! request is admitted when it fits the largest device's request limit; each device's worker
//! caps the batches it takes at its own limit ([`Admission::max_rows`]), and the router sends a
//! request only to devices whose cap takes it (see [`super::pool`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::Status;

use super::errors::{self, Reason};
use super::validate::ValidRequest;
use crate::device_memory::MemoryReport;
use crate::pipeline::cost::{CostModel, Estimate, SetShape};
use crate::style_aligned::StyleAligned;

/// Subtracted from the derived budget.
pub const MARGIN: u64 = 256 << 20;
/// Share of the limit kept as headroom when the budget is derived.
pub const HEADROOM_PERCENT: u64 = 10;
/// Share of the budget that queued reference images may hold.
pub const REFERENCE_POOL_PERCENT: u64 = 25;

/// The `--memory-budget` flag (flattened into `stylealign serve`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MemoryArgs {
    /// Memory budget per device for the requests, on top of the loaded models (e.g. `12GiB`,
    /// `1536MiB`, `800MB`, or bytes). Default: the cgroup memory limit (or the machine's memory)
    /// less 10 %, less the process's resident memory after loading, less 256 MiB.
    #[arg(long = "memory-budget", env = "STYLEALIGN_MEMORY_BUDGET", value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
}

/// Parses a byte size: an integer with an optional unit `B`, `K`/`KiB`/`Ki`, `M`/`MiB`/`Mi`,
/// `G`/`GiB`/`Gi`, `T`/`TiB`/`Ti` (powers of 1024) or `kB`, `MB`, `GB`, `TB` (powers of 1000).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 12GiB, 1536MiB, 800MB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "Ki" => 1 << 10,
        "M" | "MiB" | "Mi" => 1 << 20,
        "G" | "GiB" | "Gi" => 1 << 30,
        "T" | "TiB" | "Ti" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("unknown unit {other:?} in {s:?} (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")),
    };
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 {
        return Err("the memory budget must be positive".into());
    }
    Ok(bytes)
}

/// `bytes` as people read it (`1.5 GiB`).
pub fn show_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// The memory limit of this process and where it comes from: the cgroup (v2, then v1), else
/// `MemTotal`.
pub fn memory_limit() -> Option<(u64, &'static str)> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    if let Some(v) = read("/sys/fs/cgroup/memory.max").and_then(|s| s.trim().parse::<u64>().ok()) {
        return Some((v, "cgroup v2 memory.max"));
    }
    if let Some(v) = read("/sys/fs/cgroup/memory/memory.limit_in_bytes").and_then(|s| s.trim().parse::<u64>().ok())
        // v1 reports "no limit" as a huge number.
        && v < (1 << 60)
    {
        return Some((v, "cgroup v1 memory.limit_in_bytes"));
    }
    let meminfo = read("/proc/meminfo")?;
    meminfo_kib(&meminfo, "MemTotal:").map(|k| (k * 1024, "MemTotal"))
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident memory of this process (`VmRSS`), in bytes.
pub fn process_rss() -> Option<u64> {
    meminfo_kib(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS:").map(|k| k * 1024)
}

/// The default budget: `limit` less [`HEADROOM_PERCENT`], less `rss`, less [`MARGIN`] (at least
/// 1 byte, so that everything is refused rather than everything admitted).
pub fn derive_budget(limit: u64, rss: u64) -> u64 {
    (limit - limit * HEADROOM_PERCENT / 100).saturating_sub(rss).saturating_sub(MARGIN).max(1)
}

/// A GPU's default budget: its `free` memory once the models are loaded, less
/// [`HEADROOM_PERCENT`] of its `total`, less [`MARGIN`] (at least 1 byte).
pub fn derive_device_budget(free: u64, total: u64) -> u64 {
    free.saturating_sub(total * HEADROOM_PERCENT / 100).saturating_sub(MARGIN).max(1)
}

/// The request limit of a budget shared by `workers` batches at once.
pub fn request_limit_of(budget: u64, workers: usize) -> u64 {
    (budget - budget * REFERENCE_POOL_PERCENT / 100) / workers.max(1) as u64
}

/// The admission state of a server.
#[derive(Debug)]
pub struct Admission {
    budget: u64,
    source: String,
    request_limit: u64,
    pool: u64,
    held: AtomicU64,
}

impl Admission {
    /// `budget` bytes (`source` says where it came from), shared by `workers` concurrent batches.
    pub fn new(budget: u64, source: impl Into<String>, workers: usize) -> Self {
        Self {
            budget,
            source: source.into(),
            request_limit: request_limit_of(budget, workers),
            pool: budget * REFERENCE_POOL_PERCENT / 100,
            held: AtomicU64::new(0),
        }
    }

    /// The configured budget, or the one derived from the memory limit and the process's
    /// resident memory now (call after loading the models).
    pub fn configure(configured: Option<u64>, workers: usize) -> Self {
        match configured {
            Some(b) => Self::new(b, "--memory-budget", workers),
            None => match (memory_limit(), process_rss()) {
                (Some((limit, from)), rss) => {
                    let rss = rss.unwrap_or(0);
                    let source =
                        format!("{from} {} less 10 %, less {} resident, less {}", show_bytes(limit), show_bytes(rss), show_bytes(MARGIN));
                    Self::new(derive_budget(limit, rss), source, workers)
                }
                (None, _) => Self::new(u64::MAX / 4, "unknown memory limit (no budget)", workers),
            },
        }
    }

    /// The budget of one device, `spec`, whose memory is `mem` once its models are loaded (see
    /// the module docs), shared by its `workers`.
    pub fn for_device(configured: Option<u64>, workers: usize, spec: &crate::device::DeviceSpec, mem: &MemoryReport) -> Self {
        match (configured, mem.free, mem.total) {
            (None, Some(free), Some(total)) => {
                let source = format!(
                    "{spec}: {} free of {} (cuMemGetInfo after loading) less 10 % of the total, less {}",
                    show_bytes(free),
                    show_bytes(total),
                    show_bytes(MARGIN)
                );
                Self::new(derive_device_budget(free, total), source, workers)
            }
            (configured, _, _) => {
                let a = Self::configure(configured, workers);
                let source = format!("{spec}: {}", a.source);
                Self { source, ..a }
            }
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The most a single request (or batch) may be estimated to use.
    pub fn request_limit(&self) -> u64 {
        self.request_limit
    }

    /// Bytes the queued reference images may hold in all.
    pub fn reference_pool(&self) -> u64 {
        self.pool
    }

    /// Bytes held by queued and running reference images now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// Admits a request with this estimate: refused when over the request limit, or when its
    /// reference pixels do not fit the pool; else a reservation of those pixels, released when
    /// dropped (with the job).
    pub fn admit(self: &Arc<Self>, e: &Estimate) -> Result<Reservation, Status> {
        if e.total > self.request_limit {
            return Err(errors::error_with(
                Reason::OverMemoryBudget,
                format!(
                    "the request's estimated peak memory, {}, exceeds the limit of {} per request (memory budget {}); ask for fewer images or a smaller size",
                    show_bytes(e.total),
                    show_bytes(self.request_limit),
                    show_bytes(self.budget)
                ),
                &[
                    ("estimate_bytes", e.total.to_string()),
                    ("limit_bytes", self.request_limit.to_string()),
                    ("budget_bytes", self.budget.to_string()),
                ],
            ));
        }
        let bytes = e.reference_pixels;
        if bytes > 0 {
            let fits = self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_add(bytes).filter(|&n| n <= self.pool));
            if let Err(held) = fits {
                return Err(errors::error_with(
                    Reason::ReferencePoolFull,
                    format!(
                        "queued requests' images (references, init images) hold {} of their {} pool; this one needs {}; retry later",
                        show_bytes(held),
                        show_bytes(self.pool),
                        show_bytes(bytes)
                    ),
                    &[("held_bytes", held.to_string()), ("pool_bytes", self.pool.to_string()), ("needed_bytes", bytes.to_string())],
                ));
            }
        }
        Ok(Reservation { admission: self.clone(), bytes })
    }

    /// Most rows (images without a reference) a batch may hold at `width`×`height`, up to `cap`.
    pub fn max_rows(&self, cost: &CostModel, width: usize, height: usize, steps: usize, cap: usize) -> usize {
        let fits = |r: usize| {
            let shape = SetShape { images: r, width, height, steps, ..Default::default() };
            cost.estimate(&shape).total <= self.request_limit
        };
        (1..=cap).take_while(|&r| fits(r)).last().unwrap_or(0)
    }

    /// The largest square size (a multiple of `multiple`, at most `cap`) of a one-image request.
    pub fn max_size(&self, cost: &CostModel, multiple: usize, cap: usize, steps: usize) -> usize {
        let m = multiple.max(1);
        let fits = |s: usize| {
            let shape = SetShape { images: 1, width: s, height: s, steps, ..Default::default() };
            cost.estimate(&shape).total <= self.request_limit
        };
        (1..=cap / m).map(|k| k * m).take_while(|&s| fits(s)).last().unwrap_or(0)
    }
}

/// The shape of a validated request under a session's patch, for its estimate.
pub fn shape_of(v: &ValidRequest, patch: &StyleAligned) -> SetShape {
    SetShape {
        images: v.prompts.len(),
        width: v.width,
        height: v.height,
        steps: v.steps,
        reference_pixels: v.reference.as_ref().map(|r| r.pixels()),
        full_share: patch.resolve().is_ok_and(|r| r.share_attention && r.full_attention_share),
        input_images: v.init_images.len() + v.controls.iter().map(|c| c.images.len()).sum::<usize>(),
        input_pixels: v
            .init_images
            .iter()
            .map(|i| i.image.pixels())
            .chain(v.controls.iter().flat_map(|c| c.images.iter().map(|i| i.pixels())))
            .sum(),
        init_images: v.init_images.len(),
        controls: v.controls.len(),
    }
}

/// What an admitted request's job carries.
#[derive(Debug)]
pub struct Admitted {
    /// Its reference pixels, held until the job is dropped.
    pub reservation: Reservation,
    /// Most rows of a batch at its size under the request limit (at least its own rows).
    pub max_rows: usize,
}

/// Reference pixels held by an admitted request until it is dropped.
#[derive(Debug)]
pub struct Reservation {
    admission: Arc<Admission>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Keeps only `bytes` of it: once the reference is decoded and fitted to the request's size,
    /// a queued request holds just those pixels.
    pub fn shrink_to(&mut self, bytes: u64) {
        let release = self.bytes.saturating_sub(bytes);
        if release > 0 {
            self.admission.held.fetch_sub(release, Ordering::SeqCst);
            self.bytes -= release;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.admission.held.fetch_sub(self.bytes, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("12GiB"), Ok(12 << 30));
        assert_eq!(parse_bytes("1536MiB"), Ok(1536 << 20));
        assert_eq!(parse_bytes("1536Mi"), Ok(1536 << 20));
        assert_eq!(parse_bytes("800MB"), Ok(800_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }

    #[test]
    fn budget_derivation() {
        assert_eq!(derive_budget(10 << 30, 2 << 30), (10u64 << 30) - (1 << 30) - (2 << 30) - MARGIN);
        assert_eq!(derive_budget(1 << 30, 2 << 30), 1);
        assert_eq!(request_limit_of(1000, 1), 750);
        assert_eq!(request_limit_of(1000, 2), 375);
        assert_eq!(derive_device_budget(60 << 30, 80 << 30), (60u64 << 30) - (8 << 30) - MARGIN);
        assert_eq!(derive_device_budget(1 << 30, 80 << 30), 1);
    }

    #[test]
    fn a_device_budget_comes_from_its_free_memory_unless_configured() {
        let gpu = MemoryReport { in_use: Some(20 << 30), free: Some(60 << 30), total: Some(80 << 30) };
        let spec = crate::device::DeviceSpec::Cuda(1);
        let a = Admission::for_device(None, 1, &spec, &gpu);
        assert_eq!(a.budget(), derive_device_budget(60 << 30, 80 << 30));
        assert!(a.source().starts_with("cuda:1: 60.0 GiB free of 80.0 GiB"), "{}", a.source());
        let c = Admission::for_device(Some(4 << 30), 1, &spec, &gpu);
        assert_eq!(c.budget(), 4 << 30);
        assert_eq!(c.source(), "cuda:1: --memory-budget");
        // Nothing reported: the host's budget, as for the CPU.
        let cpu = Admission::for_device(Some(1 << 30), 2, &crate::device::DeviceSpec::Cpu, &MemoryReport::default());
        assert_eq!((cpu.budget(), cpu.request_limit()), (1 << 30, request_limit_of(1 << 30, 2)));
    }

    #[test]
    fn reservations_fill_the_pool_and_come_back() {
        let a = Arc::new(Admission::new(4000, "test", 1));
        let e = Estimate { total: 100, reference_pixels: 400, ..Default::default() };
        let r1 = a.admit(&e).unwrap();
        let r2 = a.admit(&e).unwrap();
        let s = a.admit(&e).unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        drop(r1);
        let _r3 = a.admit(&e).unwrap();
        drop(r2);
        assert_eq!(a.held(), 400);
        let mut r4 = a.admit(&e).unwrap();
        r4.shrink_to(100);
        assert_eq!(a.held(), 500);
        r4.shrink_to(300);
        assert_eq!(a.held(), 500, "a reservation never grows");
        drop(r4);
        assert_eq!(a.held(), 400);
        let over = a.admit(&Estimate { total: 3001, ..Default::default() }).unwrap_err();
        assert!(over.message().contains("exceeds"), "{}", over.message());
        assert!(a.admit(&Estimate { total: 3000, ..Default::default() }).is_ok());
    }
}
