//! LoRA benchmark on CPU: a mixed batch of 4 style-aligned sets, each with its own LoRA, against
//! the same 4 sets run one after another (throughput ratio), the same batch without LoRAs, and
//! memory: the base model, each loaded LoRA, and each extra session — all measured in one run.
//!
//! cargo bench --bench lora -- [--model DIR] [--size PX] [--steps N] [--rank R] [--iters N]
//!
//! Without `--model` (a diffusers folder): the embedded tiny model, 32×32 images. The LoRAs are random (every adaptable layer, rank `--rank`, default 8), written to a
//! temporary folder and loaded like `--lora-dir` files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stylealign::model::lora::{LoraFormat, synthetic_file};
use stylealign::pipeline::{BatchSpec, Pipeline, SetSpec};
use stylealign::sampling::sampler::SamplerKind;
use stylealign::serve::loras::LoraWeight;
use stylealign::serve::session::SessionStore;
use stylealign::style_aligned::StyleAligned;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let num = |name: &str, d: usize| flag(name).map_or(d, |v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number")));
    let model = flag("--model");
    let (size, steps, rank, iters) = (num("--size", 32), num("--steps", 4), num("--rank", 8), num("--iters", 3));
    let device = stylealign::device::open(&stylealign::device::DeviceSpec::Cpu).expect("cpu device");
    let rss0 = rss_bytes();
    let pipe = match &model {
        Some(dir) => Pipeline::load(&PathBuf::from(dir), &device).expect("load model"),
        None => stylealign::pipeline::tiny::tiny_pipeline(&device).expect("the embedded model"),
    };
    let rss_model = rss_bytes().saturating_sub(rss0);
    let shown = model.as_deref().unwrap_or("the embedded tiny model");
    println!("model {shown} ({}), {size}x{size}, {steps} DDIM steps, StyleAligned defaults", pipe.family().as_str());

    // Four random LoRAs, written and loaded as the server does.
    let dir = std::env::temp_dir().join(format!("stylealign-bench-loras-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rss1 = rss_bytes();
    let mut loras = Vec::new();
    for k in 0..4u64 {
        let path = dir.join(format!("l{k}.safetensors"));
        let format = if k % 2 == 0 { LoraFormat::Kohya } else { LoraFormat::Peft };
        std::fs::write(&path, synthetic_file(&pipe.lora_targets(), format, 100 + k, rank, 1.0)).unwrap();
        loras.push(Arc::new(pipe.load_lora(&format!("l{k}"), &path).unwrap()));
    }
    let rss_loras = rss_bytes().saturating_sub(rss1);
    let _ = std::fs::remove_dir_all(&dir);
    let lora_bytes = loras[0].bytes;

    let batch = BatchSpec { patch: Some(StyleAligned::default()), ..BatchSpec::patched(size, steps, 7.5, SamplerKind::Ddim) };
    let set = |k: usize, with_lora: bool| SetSpec {
        prompts: vec![format!("a lighthouse {k}, linocut"), format!("a fox {k}, linocut")],
        seed: 7 + k as u64,
        loras: if with_lora { vec![(loras[k].clone(), 0.8)] } else { Vec::new() },
        ..Default::default()
    };
    let mixed: Vec<SetSpec> = (0..4).map(|k| set(k, true)).collect();
    let plain: Vec<SetSpec> = (0..4).map(|k| set(k, false)).collect();
    let run = |sets: &[SetSpec]| {
        let t = Instant::now();
        let out = pipe.generate(&batch, sets, &mut |_, _| vec![true; sets.len()]).expect("generate");
        assert!(out.iter().all(Option::is_some));
        t.elapsed()
    };
    // Warm-up, then alternate so that drift hits every variant alike.
    run(&mixed);
    let (mut t_mixed, mut t_seq, mut t_plain, mut t_seq_plain) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        t_mixed.push(run(&mixed));
        t_seq.push(mixed.iter().map(|s| run(std::slice::from_ref(s))).sum());
        t_plain.push(run(&plain));
        t_seq_plain.push(plain.iter().map(|s| run(std::slice::from_ref(s))).sum());
    }
    let (m, s, p, sp) = (median(t_mixed), median(t_seq), median(t_plain), median(t_seq_plain));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("4 sets x 2 images, 4 different LoRAs (rank {rank}), median of {iters}:");
    println!("  one mixed batch          {:>9.1} ms", ms(m));
    println!("  one after another        {:>9.1} ms", ms(s));
    println!("  throughput ratio (sequential / mixed): {:.2}x", s.as_secs_f64() / m.as_secs_f64());
    println!(
        "  same 4 sets without LoRA: one batch {:.1} ms, one after another {:.1} ms (ratio {:.2}x)",
        ms(p),
        ms(sp),
        sp.as_secs_f64() / p.as_secs_f64()
    );
    println!("  LoRA cost in the mixed batch: {:.2}x the batch without LoRA", m.as_secs_f64() / p.as_secs_f64());
    println!("  LoRA cost one after another:  {:.2}x the same without LoRA", s.as_secs_f64() / sp.as_secs_f64());

    // Memory: sessions hold LoRA names and weights only.
    let store = SessionStore::new(Duration::from_secs(3600), 1_000_000, 1_000_000);
    let n = 20_000;
    let rss2 = rss_bytes();
    for k in 0..n {
        let loras = vec![LoraWeight { name: format!("l{}", k % 10), weight: 0.8 }];
        store.create_with_loras(&format!("client-{k}"), "model", StyleAligned::default(), Default::default(), loras).expect("session");
    }
    let per_session = rss_bytes().saturating_sub(rss2) as f64 / n as f64;
    println!("memory:");
    println!("  base model (RSS after load)        {:>10.1} MiB", rss_model as f64 / (1 << 20) as f64);
    println!(
        "  one loaded LoRA (f32 matrices)     {:>10.1} KiB (RSS for 4: {:.1} KiB)",
        lora_bytes as f64 / 1024.0,
        rss_loras as f64 / 1024.0
    );
    println!("  one extra session with a LoRA      {:>10.0} bytes (RSS over {n} sessions)", per_session);
    println!(
        "  1000 sessions over 10 LoRAs: base + 10 LoRAs + sessions = {:.1} MiB + {:.1} MiB + {:.1} MiB",
        rss_model as f64 / (1 << 20) as f64,
        10.0 * lora_bytes as f64 / (1 << 20) as f64,
        1000.0 * per_session / (1 << 20) as f64
    );
}
