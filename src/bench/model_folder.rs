//! `stylealign bench --write-model DIR`: a diffusers folder (`unet/`, `vae/`, `text_encoder/`,
//! `scheduler/`, `model_index.json`) with Stable Diffusion 1.5's architecture and deterministic
//! random weights ([`Weights::synthetic`], float32), for serving a full-size model where none can
//! be downloaded. With `--tiny`: the tiny test UNet and VAE configs and a small text encoder over
//! the real CLIP vocabulary (the tokenizer is the server's embedded one).

use std::path::Path;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::model::clip::{ClipConfig, ClipTextModel};
use crate::model::config::RawConfig;
use crate::model::single_file::DEFAULT_SD1;
use crate::model::unet::{UNet, UNetConfig};
use crate::model::vae::{Vae, VaeConfig};
use crate::model::weights::Weights;
use crate::sampling::SchedulerConfig;

const TINY_VAE: &str = include_str!("tiny/vae_sd15.json");
const SEED: u64 = 0x5d15;

/// The four configs: unet, vae, text_encoder, scheduler.
fn configs(tiny: bool) -> anyhow::Result<[Value; 4]> {
    let all: Value = serde_json::from_str(DEFAULT_SD1)?;
    let part = |name: &str| all.get(name).cloned().with_context(|| format!("embedded SD1 defaults have no `{name}` part"));
    let scheduler = part("scheduler")?;
    if !tiny {
        return Ok([part("unet")?, part("vae")?, part("text_encoder")?, scheduler]);
    }
    let unet: Value = serde_json::from_str(super::TINY_SD15)?;
    let vae: Value = serde_json::from_str(TINY_VAE)?;
    let cross = unet.get("cross_attention_dim").cloned().unwrap_or(json!(32));
    let text_encoder = json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": 49408,
        "hidden_size": cross,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "eos_token_id": 49407
    });
    Ok([unet, vae, text_encoder, scheduler])
}

fn raw(name: &str, value: &Value) -> anyhow::Result<RawConfig> {
    Ok(RawConfig::parse(Path::new(name), &value.to_string())?)
}

/// Writes the folder (creating it; existing files of the same names are replaced).
pub fn write(dir: &Path, tiny: bool) -> anyhow::Result<()> {
    let device = crate::device::open(&crate::device::DeviceSpec::Cpu).context("the weights are built on the CPU")?;
    let [unet_cfg, vae_cfg, te_cfg, scheduler_cfg] = configs(tiny)?;
    // The configs must be ones the server reads.
    SchedulerConfig::from_raw(&raw("scheduler/scheduler_config.json", &scheduler_cfg)?)?;
    let parts: [(&str, &Value, &str); 3] = [
        ("unet", &unet_cfg, "diffusion_pytorch_model.safetensors"),
        ("vae", &vae_cfg, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", &te_cfg, "model.safetensors"),
    ];
    for (i, (part, config, file)) in parts.into_iter().enumerate() {
        let name = format!("{part}/config.json");
        // Building the component records every tensor it asks for; those are what is saved.
        let w = Weights::synthetic(part, SEED + i as u64, &device);
        match part {
            "unet" => drop(UNet::from_weights(UNetConfig::from_raw(&raw(&name, config)?)?, &w)?),
            "vae" => drop(Vae::from_weights(VaeConfig::from_raw(&raw(&name, config)?)?, &w)?),
            _ => drop(ClipTextModel::from_weights(ClipConfig::from_raw(&raw(&name, config)?)?, &w)?),
        }
        let d = dir.join(part);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        std::fs::write(d.join("config.json"), serde_json::to_string_pretty(config)?)
            .with_context(|| format!("writing {}", d.join("config.json").display()))?;
        let bytes = w.synthetic_safetensors().context("synthetic weights")?;
        std::fs::write(d.join(file), bytes).with_context(|| format!("writing {}", d.join(file).display()))?;
    }
    let d = dir.join("scheduler");
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    std::fs::write(d.join("scheduler_config.json"), serde_json::to_string_pretty(&scheduler_cfg)?)?;
    let index = json!({
        "_class_name": "StableDiffusionPipeline",
        "force_zeros_for_empty_prompt": false,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", scheduler_cfg.get("_class_name").cloned().unwrap_or(json!("DDIMScheduler"))]
    });
    std::fs::write(dir.join("model_index.json"), serde_json::to_string_pretty(&index)?)
        .with_context(|| format!("writing {}", dir.join("model_index.json").display()))?;
    Ok(())
}
