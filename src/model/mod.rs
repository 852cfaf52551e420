//! Stable Diffusion components in burn: UNet, CLIP text encoders, VAE, tokenizer, configs and
//! weight loading. Nothing here knows about StyleAligned; the UNet exposes its self-attention
//! and GroupNorm layers through [`unet::UNetHooks`].

pub mod clip;
pub mod config;
pub mod controlnet;
pub mod hash;
pub mod lora;
pub mod nn;
pub mod precision;
pub mod single_file;
pub mod stop;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::PathBuf;

pub use precision::Precision;

/// Model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Sd1 => "SD1",
            Family::Sd2 => "SD2",
            Family::Sdxl => "SDXL",
        }
    }
}

/// Errors of model loading and configuration.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{file}: config field `{field}`: {message}")]
    Config { file: PathBuf, field: String, message: String },
    #[error("{file}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor { key: String, file: PathBuf, expected: Vec<usize> },
    #[error("{file}: tensor `{key}` has shape {found:?}, the config expects {expected:?}")]
    ShapeMismatch { key: String, file: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("{file}: {} tensor(s) not used by the model (config and weights disagree): {}", keys.len(), keys.join(", "))]
    ExtraTensors { file: PathBuf, keys: Vec<String> },
    #[error("invalid input `{field}`: {message}")]
    Input { field: String, message: String },
    /// A LoRA file that cannot be used with the model it is resolved against.
    #[error("LoRA {file}: {message}")]
    Lora { file: PathBuf, message: String },
    /// A stop check installed with [`stop::scoped`] fired.
    #[error("stopped")]
    Stopped,
}
