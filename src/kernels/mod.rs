//! Our own fused GPU kernels, written once in CubeCL (`#[cube]`): the same source compiles for
//! every cubecl runtime burn runs (wgpu — Vulkan, Metal, DX12 — and CUDA).
//!
//! - [`group_norm`]: GroupNorm with f32 statistics from one read of the input, the following SiLU
//!   fused where the model applies one, and StyleAligned's shared variant (each row's statistics
//!   pooled with its reference row's) without concatenating anything.
//! - [`attention`]: multi-head attention with online softmax and f32 accumulation; with a
//!   [`StyleAttention`], StyleAligned's shared self-attention — each row's queries attend over its
//!   own keys / values and its reference's, read in place, the gain and score shift applied inside,
//!   AdaIN of q / k / v applied as the values are loaded.
//! - [`adain`]: AdaIN over the token axis (the ComfyUI-node flavour's AdaIN of the attention input).
//!
//! They are used on GPU devices (burn's cubecl backend); the CPU keeps the burn-op composition.
//! The environment variable `STYLEALIGN_KERNELS=reference` forces the burn-op composition on GPUs
//! too (the reference the kernels are tested against, see `tests/kernels.rs`). Each function here
//! returns `None` where no kernel applies (a CPU device, a build without a GPU backend), and the
//! caller then computes the reference.

use burn::tensor::{Device, Tensor};

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod adain;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod attention;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod group_norm;

/// The StyleAligned part of an attention call: AdaIN of q / k / v (towards the rows
/// `stats_reference_of`) and the reference keys / values each row also attends to.
#[derive(Clone, Debug, PartialEq)]
pub struct StyleAttention {
    pub adain_q: bool,
    pub adain_k: bool,
    pub adain_v: bool,
    /// Row whose statistics AdaIN gives each row.
    pub stats_reference_of: Vec<u32>,
    /// Added to the unbiased variance.
    pub adain_eps: f32,
    /// `Some` when each row also attends to its reference's keys and values.
    pub share: Option<SharedKeys>,
}

/// The reference keys / values of each row.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedKeys {
    /// Row whose keys (times `gain`) row i also attends to.
    pub reference_of: Vec<u32>,
    /// Row whose values go with those keys.
    pub value_reference_of: Vec<u32>,
    pub gain: Vec<f32>,
    /// Added to the logits of the reference keys.
    pub score_shift: f32,
}

/// Largest head dimension [`attention`] takes (its accumulators live in registers).
pub const MAX_HEAD_DIM: usize = 160;

/// Whether `device` runs on burn's cubecl backend (wgpu, CUDA), where the kernels exist.
pub fn supported(device: &Device) -> bool {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = device;
        false
    }
}

/// Whether the model uses the kernels on `device`: a supported device, unless
/// `STYLEALIGN_KERNELS=reference` asks for the burn-op composition.
pub fn active(device: &Device) -> bool {
    static REFERENCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let reference = *REFERENCE.get_or_init(|| std::env::var("STYLEALIGN_KERNELS").is_ok_and(|v| v == "reference"));
    !reference && supported(device)
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn table(list: &[usize]) -> Vec<u32> {
    list.iter().map(|&i| i as u32).collect()
}

/// GroupNorm of `x` (B, C, H, W) in `groups` groups with affine `weight` / `bias` (C), SiLU after
/// it when `silu`; with `stats_reference_of` (one row index per row), the StyleAligned variant.
/// `None` where no kernel applies.
pub fn group_norm(
    x: Tensor<4>,
    weight: &Tensor<1>,
    bias: &Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
    stats_reference_of: Option<&[usize]>,
) -> Option<Tensor<4>> {
    if !supported(&x.device()) {
        return None;
    }
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let out = <burn::backend::Dispatch as ext::KernelBackend>::sa_group_norm(
            x.into_dispatch(),
            weight.clone().into_dispatch(),
            bias.clone().into_dispatch(),
            groups,
            eps as f32,
            silu,
            stats_reference_of.map(table),
        );
        Some(Tensor::from_dispatch(out))
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, weight, bias, groups, eps, silu, stats_reference_of);
        None
    }
}

/// AdaIN of `x` (B, N, C) over the token axis towards the rows `stats_reference_of` (semantics of
/// `style_aligned::ops::adain`). `None` where no kernel applies.
pub fn adain(x: Tensor<3>, stats_reference_of: &[usize], eps: f64) -> Option<Tensor<3>> {
    if !supported(&x.device()) {
        return None;
    }
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let out = <burn::backend::Dispatch as ext::KernelBackend>::sa_adain(x.into_dispatch(), table(stats_reference_of), eps as f32);
        Some(Tensor::from_dispatch(out))
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (x, stats_reference_of, eps);
        None
    }
}

/// Attention of q (B, Nq, H·d) over k / v (B, Nk, H·d), `heads` heads, with the StyleAligned
/// extras of `style`. `None` where no kernel applies (also for a head dimension above
/// [`MAX_HEAD_DIM`]).
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, style: Option<&StyleAttention>) -> Option<Tensor<3>> {
    let c = q.dims()[2];
    if !supported(&q.device()) || heads == 0 || !c.is_multiple_of(heads) || c / heads > MAX_HEAD_DIM {
        return None;
    }
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    {
        let out = <burn::backend::Dispatch as ext::KernelBackend>::sa_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            heads,
            style.cloned(),
        );
        Some(Tensor::from_dispatch(out))
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    {
        let _ = (q, k, v, heads, style);
        None
    }
}

/// The kernels as a burn backend extension: one method per kernel, implemented for burn's cubecl
/// backend (and, with the `cuda` feature, through burn's fusion layer as an opaque operation).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod ext {
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Backend, backend_extension};
    use burn_cubecl::CubeBackend;

    use super::StyleAttention;

    #[backend_extension(Cube: cfg(any(feature = "wgpu", feature = "cuda")), Fusion: cfg(feature = "cuda"))]
    pub trait KernelBackend: Backend {
        #[fusion(dtype = x, shape = x)]
        fn sa_group_norm(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            bias: FloatTensor<Self>,
            groups: usize,
            eps: f32,
            silu: bool,
            stats_reference_of: Option<Vec<u32>>,
        ) -> FloatTensor<Self>;

        #[fusion(dtype = x, shape = x)]
        fn sa_adain(x: FloatTensor<Self>, stats_reference_of: Vec<u32>, eps: f32) -> FloatTensor<Self>;

        #[fusion(dtype = q, shape = q)]
        fn sa_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            heads: usize,
            style: Option<StyleAttention>,
        ) -> FloatTensor<Self>;
    }

    impl KernelBackend for CubeBackend {
        fn sa_group_norm(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            bias: FloatTensor<Self>,
            groups: usize,
            eps: f32,
            silu: bool,
            stats_reference_of: Option<Vec<u32>>,
        ) -> FloatTensor<Self> {
            super::group_norm::group_norm(x, weight, bias, groups, eps, silu, stats_reference_of.as_deref())
        }

        fn sa_adain(x: FloatTensor<Self>, stats_reference_of: Vec<u32>, eps: f32) -> FloatTensor<Self> {
            super::adain::adain(x, &stats_reference_of, eps)
        }

        fn sa_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            heads: usize,
            style: Option<StyleAttention>,
        ) -> FloatTensor<Self> {
            super::attention::attention(q, k, v, heads, style.as_ref())
        }
    }
}
