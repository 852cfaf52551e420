//! Our CubeCL kernels (src/kernels) against the burn-op composition they replace, on the wgpu
//! device (Mesa's lavapipe where no GPU is present): random inputs, Stable Diffusion shapes and
//! odd sizes, f32 and f16.
//!
//! Tolerances (max |kernel − reference| over all elements, outputs of order 1):
//! - f32: 2e-4 for GroupNorm (the kernel's one-pass f32 statistics against the reference's two-pass
//!   ones over up to 40 960 elements per group), 1e-4 for attention (online softmax against an
//!   explicit softmax, both f32).
//! - f16 inputs and outputs: compared with the f32 reference of the same f16-rounded inputs, 1e-2
//!   (an f16 output of magnitude ≤ 8 is rounded by up to 4e-3; the kernels keep statistics and
//!   accumulators in f32).
//!
//! Without a wgpu device these tests fail: CI installs Mesa's Vulkan driver.
#![cfg(feature = "wgpu")]

use std::sync::Arc;

use burn::tensor::{DType, Device, DeviceKind, Distribution, FloatDType, Int, Tensor, TensorData};
use stylealign::kernels::{self, SharedKeys, StyleAttention};
use stylealign::model::nn::{Attention, GroupNorm, Linear, reference_attention};
use stylealign::style_aligned::ops::{self, AttnSwitches, DevicePlan, adain, with_reference};
use stylealign::style_aligned::plan::ReferencePlan;

/// The wgpu device, or a loud failure naming what is missing.
fn device() -> Device {
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let identity = device.identity().expect("no wgpu device: install a Vulkan driver (Mesa's lavapipe: mesa-vulkan-drivers)");
    assert!(
        device.supports_dtype(DType::F16),
        "wgpu device {identity:?} does not support f16: not a Vulkan/Metal/DX12 adapter (OpenGL fallback?)"
    );
    assert!(kernels::supported(&device), "wgpu device is not on burn's cubecl backend");
    assert!(kernels::active(&device), "STYLEALIGN_KERNELS=reference is set: these tests compare the kernels with the reference");
    device
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
}

/// Largest absolute difference, after checking shapes and finiteness.
fn max_diff<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let (a, b) = (values(got), values(want));
    assert!(a.iter().all(|x| x.is_finite()), "kernel output has non-finite values");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn to_f16<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    t.cast(FloatDType::F16)
}

fn to_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    t.cast(FloatDType::F32)
}

fn norm(channels: usize, groups: usize, device: &Device) -> GroupNorm {
    GroupNorm { weight: random([channels], device) * 0.5 + 1.0, bias: random([channels], device) * 0.3, groups, eps: 1e-5 }
}

fn index(list: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = list.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, [list.len()]), device)
}

#[test]
fn group_norm_sd_shape_f32() {
    let dev = device();
    let gn = norm(320, 32, &dev);
    // An offset mean: the statistics must not lose the variance to cancellation.
    let x = random([2, 320, 64, 64], &dev) * 2.0 + 3.0;
    for silu in [false, true] {
        let got = gn.forward_act(x.clone(), silu);
        let want = gn.reference_forward(x.clone(), silu);
        let d = max_diff(got, want);
        assert!(d <= 2e-4, "GroupNorm 2×320×64×64 (silu {silu}) differs by {d}");
    }
}

#[test]
fn group_norm_odd_sizes_and_shared_f32() {
    let dev = device();
    // 40 channels in 8 groups (5 per group), 7×9 spatial, 3 rows.
    let gn = norm(40, 8, &dev);
    let x = random([3, 40, 7, 9], &dev) - 1.5;
    let d = max_diff(gn.forward_act(x.clone(), true), gn.reference_forward(x.clone(), true));
    assert!(d <= 2e-4, "GroupNorm 3×40×7×9 differs by {d}");
    // StyleAligned: rows pooled with their reference rows (row 0 is its own reference).
    let stats_reference_of = [0usize, 0, 1];
    let plan = DevicePlan::new(ReferencePlan::uniform(stats_reference_of.to_vec(), vec![1.0; 3]), &dev);
    for silu in [false, true] {
        let got = ops::shared_group_norm_act(&gn, x.clone(), &plan, silu);
        let reference = ops::shared_group_norm(&gn, x.clone(), &index(&stats_reference_of, &dev));
        let want = if silu { burn::tensor::activation::silu(reference) } else { reference };
        let d = max_diff(got, want);
        assert!(d <= 2e-4, "shared GroupNorm (silu {silu}) differs by {d}");
    }
}

#[test]
fn group_norm_f16() {
    let dev = device();
    let gn = norm(320, 32, &dev);
    let x = to_f16(random([2, 320, 32, 32], &dev) * 2.0 + 1.0);
    let gn16 = GroupNorm { weight: to_f16(gn.weight.clone()), bias: to_f16(gn.bias.clone()), groups: gn.groups, eps: gn.eps };
    let gn32 = GroupNorm { weight: to_f32(gn16.weight.clone()), bias: to_f32(gn16.bias.clone()), groups: gn.groups, eps: gn.eps };
    let got = gn16.forward_act(x.clone(), true);
    assert_eq!(got.dtype(), DType::F16);
    let d = max_diff(to_f32(got), gn32.reference_forward(to_f32(x.clone()), true));
    assert!(d <= 1e-2, "f16 GroupNorm differs by {d}");
    // The shared variant in f16.
    let stats_reference_of = [1usize, 1];
    let plan = DevicePlan::new(ReferencePlan::uniform(stats_reference_of.to_vec(), vec![1.0; 2]), &dev);
    let got = ops::shared_group_norm_act(&gn16, x.clone(), &plan, false);
    let want = ops::shared_group_norm(&gn32, to_f32(x), &index(&stats_reference_of, &dev));
    let d = max_diff(to_f32(got), want);
    assert!(d <= 1e-2, "f16 shared GroupNorm differs by {d}");
}

#[test]
fn attention_sd_shapes_f32_and_f16() {
    let dev = device();
    for head_dim in [40, 64] {
        let c = 8 * head_dim;
        let q = random([2, 1024, c], &dev);
        let k = random([2, 1024, c], &dev);
        let v = random([2, 1024, c], &dev);
        let want = reference_attention(q.clone(), k.clone(), v.clone(), 8, None);
        let got = kernels::attention(q.clone(), k.clone(), v.clone(), 8, None).expect("kernel on wgpu");
        let d = max_diff(got, want.clone());
        assert!(d <= 1e-4, "attention 2×8×1024, d {head_dim}, f32 differs by {d}");
        if head_dim == 40 {
            let (q16, k16, v16) = (to_f16(q), to_f16(k), to_f16(v));
            let want = reference_attention(to_f32(q16.clone()), to_f32(k16.clone()), to_f32(v16.clone()), 8, None);
            let got = kernels::attention(q16, k16, v16, 8, None).expect("kernel on wgpu");
            assert_eq!(got.dtype(), DType::F16);
            let d = max_diff(to_f32(got), want);
            assert!(d <= 1e-2, "attention 2×8×1024, d 40, f16 differs by {d}");
        }
    }
}

#[test]
fn attention_odd_sizes_cross() {
    let dev = device();
    // 3 heads of 24, 77 queries over 50 keys (cross-attention shapes, nothing a multiple of a tile).
    let q = random([3, 77, 72], &dev);
    let k = random([3, 50, 72], &dev);
    let v = random([3, 50, 72], &dev);
    let want = reference_attention(q.clone(), k.clone(), v.clone(), 3, None);
    // Through the model's entry point, which takes the kernel on this device.
    let got = stylealign::model::nn::attention(q, k, v, 3, None);
    let d = max_diff(got, want);
    assert!(d <= 1e-4, "attention 3×3×77×50, d 24, differs by {d}");
}

/// A plan of 5 rows in two style groups, with distinct key, value and statistics references and
/// gains other than 1.
fn plan(device: &Device) -> DevicePlan {
    DevicePlan::new(
        ReferencePlan {
            reference_of: vec![0, 0, 0, 3, 3],
            gain: vec![1.0, 0.8, 1.3, 1.0, 0.6],
            value_reference_of: vec![0, 0, 1, 3, 3],
            stats_reference_of: vec![0, 0, 0, 3, 4],
        },
        device,
    )
}

fn linear(d_in: usize, d_out: usize, bias: bool, name: &str, device: &Device) -> Linear {
    Linear {
        weight: random([d_in, d_out], device) / (d_in as f64).sqrt(),
        bias: bias.then(|| random([d_out], device) * 0.1),
        name: Arc::from(name),
    }
}

fn attn(c: usize, heads: usize, qkv_bias: bool, device: &Device) -> Attention {
    Attention {
        to_q: linear(c, c, qkv_bias, "to_q", device),
        to_k: linear(c, c, qkv_bias, "to_k", device),
        to_v: linear(c, c, qkv_bias, "to_v", device),
        to_out: linear(c, c, true, "to_out.0", device),
        heads,
    }
}

#[test]
fn style_aligned_attention_official_and_node() {
    let dev = device();
    let plan = plan(&dev);
    // 5 rows, 2 heads of 40, 100 tokens (not a multiple of any tile).
    let layer = attn(80, 2, false, &dev);
    let x = random([5, 100, 80], &dev);
    let switches = [
        AttnSwitches { adain_q: true, adain_k: true, adain_v: false, share: true, score_shift: 0.0 },
        AttnSwitches { adain_q: true, adain_k: true, adain_v: true, share: true, score_shift: -0.7 },
        AttnSwitches { adain_q: false, adain_k: false, adain_v: false, share: true, score_shift: 0.4 },
        AttnSwitches { adain_q: true, adain_k: false, adain_v: true, share: false, score_shift: 0.0 },
    ];
    for s in switches {
        let got = ops::official_attention(&layer, x.clone(), &plan, s);
        let want = ops::official_attention_reference(&layer, x.clone(), &plan, s);
        let d = max_diff(got, want);
        assert!(d <= 1e-4, "official attention {s:?} differs by {d}");
        let got = ops::node_attention(&layer, x.clone(), &plan, s);
        let want = ops::node_attention_reference(&layer, x.clone(), &plan, s);
        let d = max_diff(got, want);
        assert!(d <= 1e-4, "node attention {s:?} differs by {d}");
    }
}

#[test]
fn style_aligned_attention_kernel_f16() {
    let dev = device();
    let plan = plan(&dev);
    let (q, k, v) = (to_f16(random([5, 64, 64], &dev)), to_f16(random([5, 64, 64], &dev)), to_f16(random([5, 64, 64], &dev)));
    let u32s = |l: &[usize]| l.iter().map(|&i| i as u32).collect::<Vec<_>>();
    let style = StyleAttention {
        adain_q: true,
        adain_k: true,
        adain_v: true,
        stats_reference_of: u32s(&plan.plan.stats_reference_of),
        adain_eps: ops::ADAIN_EPS as f32,
        share: Some(SharedKeys {
            reference_of: u32s(&plan.plan.reference_of),
            value_reference_of: u32s(&plan.plan.value_reference_of),
            gain: plan.plan.gain.clone(),
            score_shift: 0.5,
        }),
    };
    let got = kernels::attention(q.clone(), k.clone(), v.clone(), 2, Some(&style)).expect("kernel on wgpu");
    assert_eq!(got.dtype(), DType::F16);
    // The reference composition in f32 on the same (f16-rounded) inputs.
    let (q, k, v) = (to_f32(q), to_f32(k), to_f32(v));
    let q = adain(q, &plan.stats_reference_of);
    let k = adain(k, &plan.stats_reference_of);
    let v = adain(v, &plan.stats_reference_of);
    let k = with_reference(k, &plan.reference_of, Some(&plan.gain));
    let v = with_reference(v, &plan.value_reference_of, None);
    let mut bias = vec![0f32; 128];
    bias[64..].fill(0.5);
    let bias = Tensor::<4>::from_data(TensorData::new(bias, [1, 1, 1, 128]), &dev);
    let want = reference_attention(q, k, v, 2, Some(bias));
    let d = max_diff(to_f32(got), want);
    assert!(d <= 1e-2, "f16 StyleAligned attention differs by {d}");
}

#[test]
fn adain_kernel_f32() {
    let dev = device();
    let x = random([4, 90, 48], &dev) * 3.0 + 2.0;
    let refs = [0usize, 0, 1, 3];
    let got = kernels::adain(x.clone(), &refs, ops::ADAIN_EPS).expect("kernel on wgpu");
    let want = adain(x, &index(&refs, &dev));
    let d = max_diff(got, want);
    assert!(d <= 2e-4, "AdaIN differs by {d}");
}

/// Times of the kernels and of the reference path on this device (information for
/// docs/kernels.md, no assertion on speed): `cargo test --release --features wgpu --test kernels
/// -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_times() {
    let dev = device();
    let time = |label: &str, f: &dyn Fn() -> Tensor<4>| {
        f().into_data(); // compile and warm up
        let runs = 3;
        let t0 = std::time::Instant::now();
        for _ in 0..runs {
            f();
            dev.sync().expect("sync");
        }
        eprintln!("{label}: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3 / runs as f64);
    };
    let gn = norm(320, 32, &dev);
    let x = random([2, 320, 64, 64], &dev);
    time("GroupNorm+SiLU 2×320×64×64 kernel", &|| gn.forward_act(x.clone(), true));
    time("GroupNorm+SiLU 2×320×64×64 reference", &|| gn.reference_forward(x.clone(), true));
    let plan2 = DevicePlan::new(ReferencePlan::uniform(vec![0, 0], vec![1.0; 2]), &dev);
    time("shared GroupNorm 2×320×64×64 kernel", &|| ops::shared_group_norm_act(&gn, x.clone(), &plan2, false));
    time("shared GroupNorm 2×320×64×64 reference", &|| ops::shared_group_norm(&gn, x.clone(), &plan2.stats_reference_of));
    let (q, k, v) = (random([2, 1024, 320], &dev), random([2, 1024, 320], &dev), random([2, 1024, 320], &dev));
    let as4 = |t: Tensor<3>| t.unsqueeze::<4>();
    time("attention 2×8×1024 d 40 kernel", &|| as4(kernels::attention(q.clone(), k.clone(), v.clone(), 8, None).expect("kernel")));
    time("attention 2×8×1024 d 40 reference", &|| as4(reference_attention(q.clone(), k.clone(), v.clone(), 8, None)));
    let plan = plan(&dev);
    let layer = attn(320, 8, false, &dev);
    let x5 = random([5, 256, 320], &dev);
    let s = AttnSwitches { adain_q: true, adain_k: true, adain_v: false, share: true, score_shift: 0.0 };
    time("StyleAligned attention (official) 5×8×256 d 40 kernel", &|| as4(ops::official_attention(&layer, x5.clone(), &plan, s)));
    time("StyleAligned attention (official) 5×8×256 d 40 reference", &|| {
        as4(ops::official_attention_reference(&layer, x5.clone(), &plan, s))
    });
}
