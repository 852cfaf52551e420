//! `stylealign serve --dtype`: the models' precision, end to end through gRPC. The same Generate on
//! the embedded model served with `--dtype f16` and with `--dtype f32` gives images that differ
//! (the f16 weights and activations are used) but stay close; a dtype the device cannot compute
//! in is refused at startup, naming `--dtype`.

mod service_common;

use std::io::BufReader;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use service_common::{ServerLog, request, spawn_server, stylealign_command};
use stylealign::client::{self, Identity};
use stylealign::serve::pb;
use tonic::Code;

/// The binary, with a clean `STYLEALIGN_*` environment.
fn stylealign() -> Command {
    let mut cmd = stylealign_command();
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("STYLEALIGN_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info").stdin(Stdio::null());
    cmd
}

/// A `stylealign serve --model tiny` child process with `extra` flags; killed on drop.
struct Served {
    child: Child,
    addr: String,
    _stdout: BufReader<ChildStdout>,
    log: ServerLog,
}

impl Served {
    fn spawn(extra: &[&str]) -> Served {
        let (child, addrs, log, reader) = spawn_server(
            stylealign()
                .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"])
                .args(["--max-size", "256", "--max-batch-delay-ms", "0", "--drain-timeout-secs", "2"])
                .args(extra),
        );
        Served { child, addr: addrs[0].to_string(), _stdout: reader, log }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.assert_no_panic();
    }
}

/// One two-image set (64², 4 steps, fixed seed) from the server at `addr`, as RGB pixels.
async fn generate_pixels(addr: &str) -> Vec<Vec<u8>> {
    let end = Instant::now() + Duration::from_secs(120);
    let who = Identity::client("precision-test");
    let mut c = client::connect(addr).await.expect("connect");
    let session = loop {
        match c.patch_model(who.request(pb::PatchModelRequest { model: "tiny".into(), ..Default::default() }, None)).await {
            Ok(r) => break r.into_inner().session_id,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < end => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) => panic!("{addr}: PatchModel: {s}"),
        }
    };
    let set = client::generate(&mut c, &who, request(&session, &["a house, ink", "a tree, ink"], 64, 4, 7), None, |_| {})
        .await
        .expect("Generate");
    assert_eq!(set.images.len(), 2);
    set.images
        .iter()
        .map(|i| {
            let img = image::load_from_memory(&i.png).expect("a PNG").to_rgb8();
            assert_eq!(img.dimensions(), (64, 64));
            img.into_raw()
        })
        .collect()
}

/// PSNR in dB of two 8-bit images.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}

#[test]
fn f16_generates_an_image_close_to_f32() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let full = Served::spawn(&["--dtype", "f32"]);
        let want = generate_pixels(&full.addr).await;
        drop(full);
        let half = Served::spawn(&["--dtype", "f16"]);
        let got = generate_pixels(&half.addr).await;
        drop(half);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let db = psnr(g, w);
            eprintln!("image {i}: f16 against f32: PSNR {db:.1} dB");
            assert!(g != w, "image {i}: f16 gave the f32 image bit for bit: the dtype was not applied");
            assert!(db >= 30.0, "image {i}: f16 is {db:.1} dB from f32 (want ≥ 30 dB)");
        }
    });
}

#[test]
fn the_default_dtype_on_the_cpu_is_f32() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let explicit = Served::spawn(&["--dtype", "f32"]);
        let want = generate_pixels(&explicit.addr).await;
        drop(explicit);
        let default = Served::spawn(&[]);
        assert_eq!(generate_pixels(&default.addr).await, want, "the CPU default is f32");
    });
}

/// Runs `stylealign serve` expecting it to exit at startup; returns its standard error.
fn serve_fails(extra: &[&str]) -> String {
    let o = stylealign()
        .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"])
        .args(extra)
        .output()
        .expect("run stylealign serve");
    assert!(!o.status.success(), "serve {extra:?} started");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_bad_dtype_is_refused_naming_the_flag() {
    let err = serve_fails(&["--dtype", "f8"]);
    assert!(err.contains("--dtype") && err.contains("`f16`"), "{err}");
    let mut cmd = stylealign();
    let o = cmd.args(["serve", "--help"]).output().expect("serve --help");
    let help = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(help.contains("--dtype") && help.contains("STYLEALIGN_DTYPE"), "{help}");
}

/// lavapipe (and most Vulkan devices) store bf16 but cannot compute in it.
#[cfg(feature = "wgpu")]
#[test]
fn bf16_on_a_device_that_cannot_is_refused_at_startup() {
    let device = burn::tensor::Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    if device.supports_dtype(burn::tensor::FloatDType::BF16) {
        eprintln!("skipped: this wgpu device computes in bf16");
        return;
    }
    let err = serve_fails(&["--device", "wgpu", "--dtype", "bf16"]);
    assert!(err.contains("--dtype") && err.contains("bf16") && err.contains("not supported"), "{err}");
}
