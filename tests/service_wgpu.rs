//! The service on a wgpu device: a StyleAligned set generated through gRPC by a server whose
//! worker runs on `--device wgpu` gives the CPU server's images (to rounding in f32, within
//! 35 dB PSNR in the GPU default f16), and a machine
//! without a Vulkan driver gets a clear refusal at startup instead of wgpu's silent OpenGL
//! fallback.
//!
//! Built with the `wgpu` feature only. They need a Vulkan device: on Linux without a GPU, Mesa's
//! software driver lavapipe (package `mesa-vulkan-drivers`); without one they fail.
#![cfg(feature = "wgpu")]

mod service_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use service_common::*;
use stylealign::client::Identity;
use stylealign::device::DeviceSpec;
use stylealign::model::precision::Precision;
use stylealign::pipeline::image::Image;
use stylealign::serve::ServeConfig;

const LIMIT: Duration = Duration::from_secs(600);

/// The images of one two-prompt StyleAligned set from a server on `device`.
async fn set_on(device: DeviceSpec, dtype: Option<Precision>) -> Vec<Image> {
    let cfg = ServeConfig { devices: vec![device], dtype, ..test_config() };
    let server = start(cfg).await;
    let who = Identity::client("wgpu-test");
    let mut c = connect(&server).await;
    let session = session(&mut c, &who, default_patch()).await;
    let set = generate(&mut c, &who, request(&session, &["a house, watercolor", "a cat"], 32, 3, 11)).await.expect("Generate");
    server.shutdown().await;
    set.images.iter().map(|i| Image::from_png(&i.png).expect("PNG").0).collect()
}

/// PSNR in dB of two 8-bit images.
fn psnr(a: &Image, b: &Image) -> f64 {
    let mse = a.rgb.iter().zip(&b.rgb).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>() / a.rgb.len() as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}

#[test]
fn a_set_generated_on_wgpu_matches_the_cpu() {
    run(LIMIT, || async {
        let cpu = set_on(DeviceSpec::Cpu, None).await;
        let f32_gpu = set_on(DeviceSpec::Wgpu(None), Some(Precision::F32)).await;
        let f16_gpu = set_on(DeviceSpec::Wgpu(None), None).await;
        assert_eq!((cpu.len(), f32_gpu.len(), f16_gpu.len()), (2, 2, 2));
        for ((c, g32), g16) in cpu.iter().zip(&f32_gpu).zip(&f16_gpu) {
            assert_eq!((g32.width, g32.height, g16.width, g16.height), (c.width, c.height, c.width, c.height));
            // f32 on both: the kernels differ in summation order only, so a pixel may round
            // to the neighbouring 8-bit value, no more.
            let worst = g32.rgb.iter().zip(&c.rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(worst <= 2, "wgpu f32 and CPU images differ by up to {worst}/255");
            // The GPU default, f16, within the end-to-end bound of docs/precision.md.
            let db = psnr(g16, c);
            assert!(db >= 35.0 && g16 != g32, "wgpu f16 vs CPU f32: {db:.1} dB");
        }
    });
}

#[test]
fn without_a_vulkan_driver_the_server_refuses_wgpu_at_startup() {
    let out = Command::new(env!("CARGO_BIN_EXE_stylealign"))
        .args(["serve", "--model", "tiny", "--device", "wgpu", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"])
        // No Vulkan driver is found: wgpu would settle on OpenGL (or nothing).
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .stdin(Stdio::null())
        .output()
        .expect("run stylealign serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the server started without a Vulkan driver: {stderr}");
    assert!(stderr.contains("no Vulkan, Metal or DX12 adapter") && stderr.contains("mesa-vulkan-drivers"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
