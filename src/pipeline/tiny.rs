//! The embedded default model: a small SD1-shaped pipeline with deterministic pseudo-random
//! weights (no download) and the real CLIP tokenizer. It draws abstract images; it exists so the
//! service runs end to end on a fresh machine. Real weights come from a diffusers folder.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::json;

use crate::model::clip::{ClipConfig, ClipTextModel};
use crate::model::config::RawConfig;
use crate::model::controlnet::{ControlNet, ControlNetConfig, ControlNetFormat};
use crate::model::hash::sha256_bytes;
use crate::model::tokenizer::{ClipTokenizer, PadMode};
use crate::model::unet::{UNet, UNetConfig};
use crate::model::vae::{Vae, VaeConfig};
use crate::model::weights::Weights;
use crate::sampling::SchedulerConfig;

use super::{Parts, Pipeline, PipelineError};

/// Name under which the embedded model is served.
pub const TINY_MODEL: &str = "tiny";
const SEED: u64 = 0x5717_1e41;

const VOCAB: &[u8] = include_bytes!("../../assets/clip-tokenizer/vocab.json");
const MERGES: &[u8] = include_bytes!("../../assets/clip-tokenizer/merges.txt");

fn raw(name: &str, value: serde_json::Value) -> RawConfig {
    RawConfig::parse(Path::new(name), &value.to_string()).expect("embedded config is valid JSON")
}

/// The embedded tokenizer (the real 49408-token CLIP BPE), written once to a cache folder.
pub fn embedded_tokenizer() -> Result<ClipTokenizer, PipelineError> {
    let dir = std::env::temp_dir().join(format!("stylealign-clip-tokenizer-{}", VOCAB.len() + MERGES.len()));
    let (vocab, merges): (PathBuf, PathBuf) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let io = |e: std::io::Error| PipelineError::Tokenizer(format!("{}: {e}", dir.display()));
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as usize).ok();
    if size(&vocab) != Some(VOCAB.len()) || size(&merges) != Some(MERGES.len()) {
        std::fs::create_dir_all(&dir).map_err(io)?;
        // Write to unique temporaries and rename, so concurrent processes never see half a file.
        let tmp = |p: &Path| p.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(tmp(&vocab), VOCAB).map_err(io)?;
        std::fs::write(tmp(&merges), MERGES).map_err(io)?;
        std::fs::rename(tmp(&vocab), &vocab).map_err(io)?;
        std::fs::rename(tmp(&merges), &merges).map_err(io)?;
    }
    ClipTokenizer::from_files(&vocab, &merges, PadMode::Eos).map_err(|e| PipelineError::Tokenizer(e.to_string()))
}

/// The recipe of the synthetic weights: each tensor's pseudo-random values (see
/// [`Weights::synthetic`]) times a gain chosen so that the demo shows what StyleAligned does.
/// With plain random weights the self-attention barely moves the residual stream, so sharing the
/// reference's keys and values changes little that one can see.
fn gain(key: &str) -> f32 {
    if key.contains("attn1.to_out") {
        // Self-attention dominates each block: what a row attends to (its own tokens, or also
        // the reference's under StyleAligned) decides its colours.
        15.0
    } else if key.contains("attn1.to_q") {
        // Sharper self-attention: tokens attend to similar tokens rather than to the mean.
        3.0
    } else if key.contains("decoder.conv_out") {
        // More saturated colours out of the random VAE decoder.
        2.5
    } else {
        1.0
    }
}

/// The UNet's weights: synthetic, by the recipe of [`gain`].
fn unet_weights(device: &Device) -> Weights {
    Weights::synthetic_with_gain("tiny/unet", SEED, gain, device)
}

fn unet_config_json() -> serde_json::Value {
    json!({
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4
    })
}

fn unet_config() -> Result<UNetConfig, PipelineError> {
    UNetConfig::from_raw(&raw("tiny/unet/config.json", unet_config_json())).map_err(PipelineError::from)
}

fn clip_config_json() -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "eos_token_id": 49407
    })
}

fn vae_config_json() -> serde_json::Value {
    json!({
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "scaling_factor": 0.18215
    })
}

/// The embedded model's scheduler ([`SchedulerConfig::default`]) as a diffusers config.
fn scheduler_config_json() -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "set_alpha_to_one": false,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
        "clip_sample": false
    })
}

/// Writes the embedded model as a diffusers folder (`unet/`, `vae/`, `text_encoder/`,
/// `scheduler/`, each config and float32 weights; the tokenizer is the embedded one): the same
/// model, loadable with [`Pipeline::load`].
pub fn write_diffusers_folder(dir: &Path, device: &Device) -> Result<(), PipelineError> {
    let io = |e: std::io::Error| PipelineError::Model(crate::model::ModelError::Io { path: dir.to_path_buf(), message: e.to_string() });
    let unet_w = unet_weights(device);
    UNet::from_weights(unet_config()?, &unet_w)?;
    let te_w = Weights::synthetic_with_gain("tiny/text_encoder", SEED + 1, gain, device);
    ClipTextModel::from_weights(ClipConfig::from_raw(&raw("tiny/text_encoder/config.json", clip_config_json()))?, &te_w)?;
    let vae_w = Weights::synthetic_with_gain("tiny/vae", SEED + 2, gain, device);
    Vae::from_weights(VaeConfig::from_raw(&raw("tiny/vae/config.json", vae_config_json()))?, &vae_w)?;
    for (part, config, weights, file) in [
        ("unet", unet_config_json(), Some(&unet_w), "diffusion_pytorch_model.safetensors"),
        ("text_encoder", clip_config_json(), Some(&te_w), "model.safetensors"),
        ("vae", vae_config_json(), Some(&vae_w), "diffusion_pytorch_model.safetensors"),
        ("scheduler", scheduler_config_json(), None, "scheduler_config.json"),
    ] {
        let d = dir.join(part);
        std::fs::create_dir_all(&d).map_err(io)?;
        match weights {
            Some(w) => {
                std::fs::write(d.join("config.json"), config.to_string()).map_err(io)?;
                std::fs::write(d.join(file), w.synthetic_safetensors().expect("synthetic weights")).map_err(io)?;
            }
            None => std::fs::write(d.join(file), config.to_string()).map_err(io)?,
        }
    }
    Ok(())
}

/// The embedded model's hash: the SHA-256 of the safetensors file its UNet weights would be saved
/// as (deterministic, like the weights).
pub fn unet_sha256(device: &Device) -> Result<String, PipelineError> {
    let weights = unet_weights(device);
    UNet::from_weights(unet_config()?, &weights)?;
    Ok(sha256_bytes(&weights.synthetic_safetensors().expect("synthetic weights")))
}

/// Builds the embedded model on `device`.
pub fn tiny_pipeline(device: &Device) -> Result<Pipeline, PipelineError> {
    let clip_cfg = ClipConfig::from_raw(&raw("tiny/text_encoder/config.json", clip_config_json()))?;
    let vae_cfg = VaeConfig::from_raw(&raw("tiny/vae/config.json", vae_config_json()))?;
    let unet = UNet::from_weights(unet_config()?, &unet_weights(device))?;
    let text_encoder = ClipTextModel::from_weights(clip_cfg, &Weights::synthetic_with_gain("tiny/text_encoder", SEED + 1, gain, device))?;
    let vae = Vae::from_weights(vae_cfg, &Weights::synthetic_with_gain("tiny/vae", SEED + 2, gain, device))?;
    let parts = Parts {
        tokenizer: embedded_tokenizer()?,
        tokenizer_2: None,
        text_encoder,
        text_encoder_2: None,
        unet,
        vae,
        scheduler: SchedulerConfig::default(),
        force_zeros_for_empty_prompt: false,
    };
    Pipeline::assemble(TINY_MODEL.to_string(), PathBuf::from("<embedded>"), parts, device)
}

/// A ControlNet for the embedded model: the down half of its UNet's architecture, a conditioning
/// embedding that takes images at the embedded VAE's scale (4 pixels per latent cell), and
/// deterministic pseudo-random weights (seeded apart from the UNet's, the zero convolutions
/// included, so its residuals are not zero). Like the embedded model, it exists so ControlNet
/// requests run end to end without a download; it does not follow its control images the way a
/// trained ControlNet does.
pub fn tiny_controlnet(device: &Device) -> Result<ControlNet, PipelineError> {
    tiny_controlnet_with(&Weights::synthetic("tiny/controlnet", SEED + 3, device))
}

/// SHA-256 of the embedded ControlNet's weights as a safetensors file (its A1111 hash).
pub fn controlnet_sha256(device: &Device) -> Result<String, PipelineError> {
    let weights = Weights::synthetic("tiny/controlnet", SEED + 3, device);
    tiny_controlnet_with(&weights)?;
    Ok(sha256_bytes(&weights.synthetic_safetensors().expect("synthetic weights")))
}

fn tiny_controlnet_with(weights: &Weights) -> Result<ControlNet, PipelineError> {
    let config = ControlNetConfig::from_raw(&raw(
        "tiny/controlnet/config.json",
        json!({
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": 4,
            "cross_attention_dim": 64,
            "norm_num_groups": 8,
            "in_channels": 4,
            "conditioning_embedding_out_channels": [8, 16, 32]
        }),
    ))?;
    Ok(ControlNet::from_weights(config, weights, Path::new("<embedded controlnet>"), ControlNetFormat::Diffusers)?)
}
