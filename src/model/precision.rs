//! The floating-point precision a model is loaded and run in (`--dtype f32|f16|bf16`).
//!
//! Weights are converted once, while they are read ([`super::weights::Weights`]), and kept on the
//! device in the model's dtype; activations follow them. What diffusers keeps in f32 stays f32
//! here too (see `docs/precision.md`): GroupNorm and LayerNorm statistics, the softmax of the
//! explicit attention path, AdaIN statistics, timestep embeddings, and everything outside the
//! models — the sampler's latents and arithmetic, the text conditioning handed to the UNet, the
//! decoded images. Every model component takes f32 (or its own dtype) at its input and returns
//! f32 from its public `forward`/`encode`/`decode`, so callers never mix dtypes.
//!
//! The dtype of the weights being loaded is set for a scope with [`loading`] (the server wraps
//! each device's model loading in it; tests wrap theirs); [`super::weights::Weights::with_dtype`]
//! sets it for one file explicitly. Outside any scope weights load as f32, the CPU default.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use burn::tensor::{DType, Device, FloatDType};

/// A model's compute dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// 32-bit floats: the CPU default, bit-identical to the reference path.
    #[default]
    F32,
    /// IEEE half precision: the GPU default.
    F16,
    /// bfloat16 (f32's range, 8 bits of mantissa); not every device can compute in it.
    Bf16,
}

/// A dtype name that is none of `f32`, `f16`, `bf16`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid dtype {input:?}: expected `f32`, `f16` or `bf16`")]
pub struct InvalidPrecision {
    /// What was given.
    pub input: String,
}

impl FromStr for Precision {
    type Err = InvalidPrecision;

    /// Accepts `f32`, `f16`, `bf16` (also `fp32`, `fp16`, `float32`, `float16`, `bfloat16`),
    /// ignoring case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "f16" | "fp16" | "float16" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(InvalidPrecision { input: s.to_string() }),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Precision {
    /// Every precision, in order.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Bf16];

    /// The name `--dtype` takes: `f32`, `f16` or `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    /// burn's float dtype of this precision.
    pub fn float_dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::F16 => FloatDType::F16,
            Precision::Bf16 => FloatDType::BF16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }

    /// The precision of a tensor dtype (`None` for a dtype that is not one of the three).
    pub fn of_dtype(dtype: DType) -> Option<Precision> {
        match dtype {
            DType::F32 => Some(Precision::F32),
            DType::F16 => Some(Precision::F16),
            DType::BF16 => Some(Precision::Bf16),
            _ => None,
        }
    }

    /// The default for `device`: f16 on GPU devices, f32 on the CPU.
    pub fn default_for(device: &Device) -> Precision {
        if is_cpu(device) { Precision::F32 } else { Precision::F16 }
    }

    /// Whether `device` can store and compute in this precision (`Device::supports_dtype`).
    pub fn supported_on(self, device: &Device) -> bool {
        device.supports_dtype(self.float_dtype())
    }
}

/// The precision of an SDXL VAE loaded now: f32 when its config says `force_upcast` (diffusers'
/// SDXL pipelines upcast such a VAE: in f16 it overflows), else [`load_precision`].
pub fn sdxl_vae_precision(force_upcast: bool) -> Precision {
    if force_upcast { Precision::F32 } else { load_precision() }
}

/// Whether `device` is the CPU backend.
fn is_cpu(device: &Device) -> bool {
    #[cfg(feature = "cpu")]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "cpu"))]
    {
        let _ = device;
        false
    }
}

thread_local! {
    static LOADING: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with weights opened on this thread loading in `precision` (see the module docs);
/// the previous setting is restored afterwards, also when `f` panics.
pub fn loading<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            LOADING.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(LOADING.with(|c| c.replace(precision)));
    f()
}

/// The precision weights opened now on this thread load in ([`loading`]; f32 outside any scope).
pub fn load_precision() -> Precision {
    LOADING.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        assert_eq!(" FP16 ".parse::<Precision>(), Ok(Precision::F16));
        assert_eq!("bfloat16".parse::<Precision>(), Ok(Precision::Bf16));
        let err = "f8".parse::<Precision>().unwrap_err();
        assert!(err.to_string().contains("`f32`, `f16` or `bf16`"), "{err}");
    }

    #[test]
    fn float_dtypes_and_sizes() {
        assert_eq!(Precision::F32.float_dtype(), FloatDType::F32);
        assert_eq!(Precision::F16.float_dtype(), FloatDType::F16);
        assert_eq!(Precision::Bf16.float_dtype(), FloatDType::BF16);
        assert_eq!(Precision::F16.size(), 2);
        for p in Precision::ALL {
            assert_eq!(Precision::of_dtype(p.float_dtype().into()), Some(p));
        }
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn cpu_defaults_to_f32_and_scopes_nest() {
        let device = Device::flex();
        assert_eq!(Precision::default_for(&device), Precision::F32);
        assert_eq!(load_precision(), Precision::F32);
        loading(Precision::F16, || {
            assert_eq!(load_precision(), Precision::F16);
            loading(Precision::Bf16, || assert_eq!(load_precision(), Precision::Bf16));
            assert_eq!(load_precision(), Precision::F16);
        });
        assert_eq!(load_precision(), Precision::F32);
    }
}
