//! UNet benchmark on CPU: ms per call unpatched and StyleAligned-patched (node defaults), where
//! the patched call's time goes, load time and peak RSS, and the same call in PyTorch (diffusers)
//! on the same weights when torch is importable — all measured in one run, printed as ratios.
//!
//! cargo bench --bench unet -- [--model DIR[:BATCH:LATENT:ITERS]]... [--no-torch]
//!
//! Without `--model`: the tiny SD1.5 golden UNet (batch 8 = 4 images × CFG, latent 16×16) and, if
//! present, `$STYLEALIGN_SD15` / `$STYLEALIGN_SDXL` (diffusers folders with `unet/`; batch 2 =
//! 1 image × CFG, latent 32×32). PyTorch runs `tools/bench_torch_unet.py` with
//! `$STYLEALIGN_PYTHON` (default `python3`). Each model is measured in a child process so that
//! its peak RSS is its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor, TensorData};
use stylealign::model::nn::{Attention, GroupNorm};
use stylealign::model::unet::{NoHooks, Site, TextTime, UNet, UNetHooks};
use stylealign::style_aligned::{ReferencePlan, StyleAligned, StyleAlignedHooks};

struct Job {
    dir: PathBuf,
    batch: usize,
    latent: usize,
    iters: usize,
}

fn parse_job(s: &str) -> Job {
    let mut parts = s.split(':');
    let dir = PathBuf::from(parts.next().unwrap());
    let mut num = |d: usize| parts.next().map(|x| x.parse().expect("number")).unwrap_or(d);
    Job { dir, batch: num(2), latent: num(32), iters: num(2) }
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Wraps hooks and accumulates the time spent in each hook kind.
struct Timed<'a, H: UNetHooks> {
    inner: &'a H,
    device: Device,
    attn: Mutex<Duration>,
    norm: Mutex<Duration>,
}

impl<H: UNetHooks> Timed<'_, H> {
    fn time<T>(&self, slot: &Mutex<Duration>, f: impl FnOnce() -> T) -> T {
        self.device.sync().ok();
        let t0 = Instant::now();
        let out = f();
        self.device.sync().ok();
        *slot.lock().unwrap() += t0.elapsed();
        out
    }
}

impl<H: UNetHooks> UNetHooks for Timed<'_, H> {
    fn group_norm(&self, site: Site, norm: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
        self.time(&self.norm, || self.inner.group_norm(site, norm, x, silu))
    }
    fn self_attention(&self, site: Site, layer: usize, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
        self.time(&self.attn, || self.inner.self_attention(site, layer, attn, x))
    }
}

fn run_child(job: &Job) {
    let device = Device::flex();
    let unet_dir = if job.dir.join("unet").is_dir() { job.dir.join("unet") } else { job.dir.clone() };
    let rss0 = peak_rss_mb();
    let t0 = Instant::now();
    let unet = UNet::load(&unet_dir, &device).unwrap_or_else(|e| panic!("{e}"));
    let load_s = t0.elapsed().as_secs_f64();
    let rss_load = peak_rss_mb();
    let cfg = &unet.config;
    let (b, l) = (job.batch, job.latent);
    let seq = 77;
    let det = |n: usize, salt: u32| -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ salt) % 2000) as f32 / 1000.0 - 1.0).collect()
    };
    let sample = Tensor::<4>::from_data(TensorData::new(det(b * cfg.in_channels * l * l, 1), [b, cfg.in_channels, l, l]), &device);
    let d = cfg.cross_attention_dim[0];
    let ehs = Tensor::<3>::from_data(TensorData::new(det(b * seq * d, 2), [b, seq, d]), &device);
    let ts = Tensor::<1>::from_data(TensorData::new(vec![421f32; b], [b]), &device);
    let tt = cfg.text_embeds_dim().map(|td| {
        let px = (l * 8) as f32;
        TextTime {
            text_embeds: Tensor::from_data(TensorData::new(det(b * td, 3), [b, td]), &device),
            time_ids: Tensor::from_data(
                TensorData::new((0..b).flat_map(|_| [px, px, 0.0, 0.0, px, px]).collect::<Vec<f32>>(), [b, 6]),
                &device,
            ),
        }
    });
    let call = |hooks: &dyn UNetHooks| {
        let out = unet.forward(sample.clone(), ts.clone(), &ehs, tt.as_ref(), hooks).expect("forward");
        out.into_data();
    };
    let time = |hooks: &dyn UNetHooks| -> f64 {
        call(hooks); // warm-up
        let t0 = Instant::now();
        for _ in 0..job.iters {
            call(hooks);
        }
        t0.elapsed().as_secs_f64() * 1000.0 / job.iters as f64
    };
    let halves = if b % 2 == 0 { 2 } else { 1 };
    let plan = ReferencePlan::from_groups(&[b / halves], halves, 1.0).unwrap();
    let patch = StyleAligned::default();
    let hooks = StyleAlignedHooks::new(&patch, plan, unet.self_attention_layers(), &device).unwrap();
    let plain_ms = time(&NoHooks);
    let patched_ms = time(&hooks);
    let timed_plain = Timed { inner: &NoHooks, device: device.clone(), attn: Mutex::new(Duration::ZERO), norm: Mutex::new(Duration::ZERO) };
    let timed_patched = Timed { inner: &hooks, device: device.clone(), attn: Mutex::new(Duration::ZERO), norm: Mutex::new(Duration::ZERO) };
    call(&timed_plain);
    call(&timed_patched);
    let ms = |m: &Mutex<Duration>| m.lock().unwrap().as_secs_f64() * 1000.0;
    println!(
        "{{\"impl\":\"burn-flex\",\"model\":{:?},\"batch\":{b},\"latent\":{l},\"seq\":{seq},\"iters\":{},\"load_s\":{load_s:.3},\"rss_before_load_mb\":{rss0:.0},\"peak_rss_after_load_mb\":{rss_load:.0},\"peak_rss_mb\":{:.0},\"ms_per_call\":{plain_ms:.2},\"patched_ms_per_call\":{patched_ms:.2},\"self_attn_ms\":{:.2},\"self_attn_patched_ms\":{:.2},\"group_norm_ms\":{:.2},\"group_norm_patched_ms\":{:.2},\"self_attention_layers\":{},\"group_norms\":{}}}",
        job.dir.display().to_string(),
        job.iters,
        peak_rss_mb(),
        ms(&timed_plain.attn),
        ms(&timed_patched.attn),
        ms(&timed_plain.norm),
        ms(&timed_patched.norm),
        unet.self_attention_layers(),
        unet.group_norms(),
    );
}

fn json_field(line: &str, key: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get(key)?.as_f64()
}

fn torch_ms(python: &str, job: &Job) -> Option<f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench_torch_unet.py");
    let ok = Command::new(python).args(["-c", "import torch, diffusers"]).output().ok()?.status.success();
    if !ok {
        eprintln!("(PyTorch baseline skipped: `{python} -c 'import torch, diffusers'` failed)");
        return None;
    }
    let px = (job.latent * 8).to_string();
    let out = Command::new(python)
        .arg(script)
        .args(["--model", &job.dir.to_string_lossy(), "--batch", &job.batch.to_string(), "--height", &px, "--width", &px])
        .args([
            "--iters",
            &job.iters.to_string(),
            "--steps-warmup",
            "1",
            "--threads",
            &std::thread::available_parallelism().map_or(2, |n| n.get()).to_string(),
            "--seq",
            "77",
            "--json",
        ])
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'))?;
    json_field(line, "ms_per_call")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if let Ok(spec) = std::env::var("STYLEALIGN_BENCH_CHILD") {
        run_child(&parse_job(&spec));
        return;
    }
    let mut jobs = Vec::new();
    let mut torch = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => jobs.push(it.next().expect("--model DIR[:BATCH:LATENT:ITERS]").clone()),
            "--no-torch" => torch = false,
            other => panic!("unknown argument {other}"),
        }
    }
    if jobs.is_empty() {
        jobs.push(format!("{}/tests/fixtures/goldens/tiny_sd15:8:16:20", env!("CARGO_MANIFEST_DIR")));
        for var in ["STYLEALIGN_SD15", "STYLEALIGN_SDXL"] {
            if let Ok(dir) = std::env::var(var) {
                jobs.push(format!("{dir}:2:32:2"));
            }
        }
    }
    let python = std::env::var("STYLEALIGN_PYTHON").unwrap_or_else(|_| "python3".into());
    println!(
        "machine: {} cores; burn-flex (f32) vs PyTorch CPU (f32), same weights and input shapes, one run",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for spec in jobs {
        let job = parse_job(&spec);
        let out = Command::new(std::env::current_exe().unwrap()).env("STYLEALIGN_BENCH_CHILD", &spec).output().expect("run child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().find(|l| l.starts_with('{')) else {
            eprintln!("{} failed: {}", job.dir.display(), String::from_utf8_lossy(&out.stderr));
            continue;
        };
        println!("{line}");
        let f = |k: &str| json_field(line, k).unwrap_or(f64::NAN);
        let (plain, patched) = (f("ms_per_call"), f("patched_ms_per_call"));
        println!(
            "{}: batch {} latent {}x{}: load {:.2} s, peak RSS {:.0} MB after load; unpatched {:.1} ms/call, patched {:.1} ms/call (patched/unpatched {:.2}x); self-attention {:.1} -> {:.1} ms, GroupNorm {:.1} -> {:.1} ms",
            job.dir.display(),
            job.batch,
            job.latent,
            job.latent,
            f("load_s"),
            f("peak_rss_after_load_mb"),
            plain,
            patched,
            patched / plain,
            f("self_attn_ms"),
            f("self_attn_patched_ms"),
            f("group_norm_ms"),
            f("group_norm_patched_ms")
        );
        if torch && let Some(t) = torch_ms(&python, &job) {
            println!("{}: PyTorch {:.1} ms/call; burn/PyTorch = {:.2}x", job.dir.display(), t, plain / t);
        }
    }
}
