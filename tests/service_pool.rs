//! The device pool through the public interface: a server with two devices (`cpu,wgpu` when the
//! binary has the `wgpu` feature, else two CPU devices) routes concurrent sets over both (the
//! per-device metrics of the admin `/metrics`), a set's images are the same whichever device ran
//! it, and each device's batch row cap, derived from its memory budget, is in the metrics and
//! is the one ListModels and admission apply.

mod service_common;

use std::time::Duration;

use service_common::*;
use stylealign::client::Identity;
use stylealign::device::DeviceSpec;
use stylealign::pipeline::cost::SetShape;
use stylealign::pipeline::tiny::tiny_pipeline;
use stylealign::serve::admission::Admission;
use stylealign::serve::{ServeConfig, Server, pb, pool};
use tonic_types::StatusExt as _;

/// The two devices: the CPU, and wgpu's default adapter when built with it, else the CPU again.
fn two_devices() -> Vec<DeviceSpec> {
    let second = if cfg!(feature = "wgpu") { "wgpu".parse().expect("the wgpu feature parses `wgpu`") } else { DeviceSpec::Cpu };
    vec![DeviceSpec::Cpu, second]
}

/// The value of the sample `name{labels}` in a Prometheus text exposition (0 when absent).
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let key = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).map_or(0.0, |v| v.trim().parse().expect("a number"))
}

async fn metrics(server: &Server) -> String {
    let (code, body) = http_get(server.admin_addr().expect("an admin listener"), "/metrics").await;
    assert_eq!(code, 200);
    body
}

/// Batches each device ran so far, in device order.
async fn batches(server: &Server, labels: &[String]) -> Vec<f64> {
    let m = metrics(server).await;
    labels.iter().map(|d| sample(&m, "stylealign_device_batches_total", &format!("device=\"{d}\""))).collect()
}

/// [`batches`] once they add up to `total` (a worker records a batch just after its sets' last
/// events), within 30 s.
async fn batches_when(server: &Server, labels: &[String], total: f64) -> Vec<f64> {
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let b = batches(server, labels).await;
        let sum: f64 = b.iter().sum();
        assert!(sum <= total, "more batches than sets: {b:?}");
        if sum == total {
            return b;
        }
        assert!(tokio::time::Instant::now() < end, "batches {b:?} never added up to {total}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The device whose batch count grew by one from `before` to `after` (the others unchanged).
fn the_one_that_ran(before: &[f64], after: &[f64]) -> usize {
    let grew: Vec<usize> = (0..before.len()).filter(|&i| after[i] != before[i]).collect();
    assert_eq!(grew.len(), 1, "one device ran the set: {before:?} → {after:?}");
    assert_eq!(after[grew[0]] - before[grew[0]], 1.0);
    grew[0]
}

/// PSNR in dB of two same-sized 8-bit images.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let pa = image::load_from_memory(a).expect("a PNG").to_rgb8();
    let pb = image::load_from_memory(b).expect("a PNG").to_rgb8();
    assert_eq!(pa.dimensions(), pb.dimensions());
    let mse = pa.as_raw().iter().zip(pb.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / pa.as_raw().len() as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}

/// One set run twice goes to each device in turn (equal loads: the less busy device), with the
/// same images; four concurrent sets are spread over both devices.
#[test]
fn sets_spread_over_both_devices_with_the_same_images() {
    run(Duration::from_secs(600), || async {
        let devices = two_devices();
        let labels = pool::labels(&devices);
        let server = start(ServeConfig { devices, batching: false, cpu_workers: 1, ..test_config() }).await;
        let mut c = connect(&server).await;
        let me = Identity::client("pool");
        let s = session(&mut c, &me, default_patch()).await;

        // Tests in this binary share the process's metrics: compare with the start.
        let m0 = metrics(&server).await;
        let m = &m0;
        for d in &labels {
            assert_eq!(sample(m, "stylealign_device_up", &format!("device=\"{d}\"")), 1.0, "{d} is up");
            assert!(sample(m, "stylealign_device_memory_budget_bytes", &format!("device=\"{d}\"")) > 0.0, "{d} has a budget");
        }

        // The same set twice: each device runs it once.
        let set = || request(&s, &["a red fox", "a blue bird"], 64, 3, 7);
        let b0 = batches(&server, &labels).await;
        let first = generate(&mut c, &me, set()).await.expect("first run");
        let b1 = batches_when(&server, &labels, b0.iter().sum::<f64>() + 1.0).await;
        let second = generate(&mut c, &me, set()).await.expect("second run");
        let b2 = batches_when(&server, &labels, b0.iter().sum::<f64>() + 2.0).await;
        let (d1, d2) = (the_one_that_ran(&b0, &b1), the_one_that_ran(&b1, &b2));
        assert_ne!(d1, d2, "the second run goes to the device that has been busy less");
        assert_eq!(first.images.len(), 2);
        for (a, b) in pngs(&first.images).iter().zip(pngs(&second.images).iter()) {
            if labels.iter().all(|l| l.starts_with("cpu")) {
                assert_eq!(a, b, "two CPU devices give the same bytes");
            } else {
                // A GPU computes in another order (and f16 by default): the f16-vs-f32 bound.
                let p = psnr(a, b);
                assert!(p >= 35.0, "PSNR {p:.1} dB between the devices' images");
            }
        }

        // Four concurrent sets (no batching: one batch each): both devices take some.
        let before = batches(&server, &labels).await;
        let mut runs = Vec::new();
        for seed in 0..4u64 {
            let (mut c, me, req) = (c.clone(), me.clone(), request(&s, &["a castle", "a ship"], 64, 3, 100 + seed));
            runs.push(tokio::spawn(async move { generate(&mut c, &me, req).await }));
        }
        for r in runs {
            assert_eq!(r.await.unwrap().expect("a concurrent set").images.len(), 2);
        }
        let after = batches_when(&server, &labels, before.iter().sum::<f64>() + 4.0).await;
        let ran: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(ran.iter().sum::<f64>(), 4.0, "{ran:?}");
        assert!(ran.iter().all(|&n| n >= 1.0), "every device ran some of the concurrent sets: {ran:?}");

        // Per-device rows per batch, busy time and memory.
        let m = metrics(&server).await;
        for (i, d) in labels.iter().enumerate() {
            let l = format!("device=\"{d}\"");
            let delta = |name: &str| sample(&m, name, &l) - sample(&m0, name, &l);
            let count = delta("stylealign_device_batch_rows_count");
            assert_eq!(count, after[i] - b0[i], "{d}: one rows sample per batch");
            assert_eq!(delta("stylealign_device_batch_rows_sum"), 2.0 * count, "{d}: two rows per batch");
            assert!(delta("stylealign_device_busy_seconds") > 0.0, "{d} was busy");
            assert_eq!(sample(&m, "stylealign_device_running_rows", &l), 0.0, "{d} is idle");
            assert!(sample(&m, "stylealign_device_memory_bytes", &l) > 0.0, "{d} reports its memory in use");
        }
        server.shutdown().await;
    });
}

/// Each device's row cap comes from its memory budget and its own cost model: with a budget
/// that holds three 64² images per batch on the CPU, the metrics show each device's cap (a GPU
/// path that materialises attention has a lower one), ListModels the CPU's, four images are
/// refused, and three run on a device whose cap takes them.
#[test]
fn the_per_device_cap_follows_the_memory_budget() {
    run(Duration::from_secs(600), || async {
        let devices = two_devices();
        let labels = pool::labels(&devices);
        // The host's budget is shared by both devices' workers (neither reports free memory).
        let workers = devices.len();
        let costs: Vec<_> =
            devices.iter().map(|d| tiny_pipeline(&stylealign::device::open(d).expect("the device opens")).unwrap().cost_model()).collect();
        let cap_on = |i: usize, budget: u64| Admission::new(budget, "t", workers).max_rows(&costs[i], 64, 64, 3, 8);
        let est = |rows: usize| costs[0].estimate(&SetShape { images: rows, width: 64, height: 64, steps: 3, ..Default::default() }).total;
        // The smallest budget with a CPU cap of 3 (a cap grows with the budget).
        let (mut lo, mut hi) = (1u64, est(3) * 4 * workers as u64);
        assert!(cap_on(0, hi) >= 3);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if cap_on(0, mid) >= 3 { hi = mid } else { lo = mid + 1 }
        }
        assert_eq!(cap_on(0, lo), 3, "a budget with a cap of 3");
        let server = start(ServeConfig { devices, memory_budget: Some(lo), cpu_workers: 1, ..test_config() }).await;
        let mut c = connect(&server).await;
        let me = Identity::client("pool-cap");

        let m = metrics(&server).await;
        let mut caps = Vec::new();
        for (i, d) in labels.iter().enumerate() {
            let l = format!("device=\"{d}\",model=\"tiny\"");
            let cap = sample(&m, "stylealign_device_max_batch_rows", &l);
            assert_eq!(cap, cap_on(i, lo) as f64, "{d}'s cap at 64², 3 steps");
            caps.push(cap);
            assert_eq!(sample(&m, "stylealign_device_memory_budget_bytes", &format!("device=\"{d}\"")), lo as f64);
        }
        assert_eq!(caps[0], 3.0);
        let models = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner();
        assert_eq!(models.models[0].max_batch_rows, 3);
        let s = session(&mut c, &me, default_patch()).await;
        for seed in 0..3 {
            let before = batches(&server, &labels).await;
            generate(&mut c, &me, request(&s, &["a", "b", "c"], 64, 3, seed)).await.expect("three images fit a device");
            let after = batches_when(&server, &labels, before.iter().sum::<f64>() + 1.0).await;
            let ran = the_one_that_ran(&before, &after);
            assert!(caps[ran] >= 3.0, "three images ran on {} whose cap is {}", labels[ran], caps[ran]);
        }
        let e = generate(&mut c, &me, request(&s, &["a", "b", "c", "d"], 64, 3, 1)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
        assert_eq!(e.get_details_error_info().expect("ErrorInfo").reason, "OVER_MEMORY_BUDGET");
        server.shutdown().await;
    });
}
