//! Single-file Stable Diffusion checkpoints in the original (LDM / SGM) layout, as A1111,
//! ComfyUI and Civitai use them: one `.safetensors` file holding the UNet
//! (`model.diffusion_model.*`, EMA copy `model_ema.*`), usually the VAE (`first_stage_model.*`)
//! and the text encoders (SD1: `cond_stage_model.transformer.*`, the transformers CLIP-L names;
//! SD2: `cond_stage_model.model.*`, OpenCLIP names with fused `in_proj` attention weights; SDXL:
//! `conditioner.embedders.0.transformer.*` and `conditioner.embedders.1.model.*`).
//!
//! Nothing is converted or copied: each component reads the file through a [`Weights`] view
//! whose layout map names the stored tensor (or the row block of a fused one, or the transpose)
//! of every diffusers key, by rule ([`unet_key`], [`vae_key`], [`open_clip_key`]); each view's
//! [`Weights::finish`] checks that the component used every tensor of its own part of the file.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use super::clip::{ClipConfig, ClipTextModel};
use super::controlnet::original_key;
use super::unet::{UNet, UNetConfig};
use super::vae::{Vae, VaeConfig};
use super::weights::{StoredAs, StoredDType, Weights, weight_file};
use super::{Family, ModelError};

/// Embedded default configs per family: `{"unet", "vae", "text_encoder", ["text_encoder_2"],
/// "scheduler", "force_zeros_for_empty_prompt"}`, the diffusers configs of SD 1.5, SD 2.1 and
/// SDXL base 1.0.
pub const DEFAULT_SD1: &str = include_str!("single_file_defaults/sd1.json");
pub const DEFAULT_SD2: &str = include_str!("single_file_defaults/sd2.json");
pub const DEFAULT_SDXL: &str = include_str!("single_file_defaults/sdxl.json");

/// The embedded default configs of a family.
pub fn default_configs(family: Family) -> &'static str {
    match family {
        Family::Sd1 => DEFAULT_SD1,
        Family::Sd2 => DEFAULT_SD2,
        Family::Sdxl => DEFAULT_SDXL,
    }
}

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const EMA_PREFIX: &str = "model_ema.";
pub const VAE_PREFIX: &str = "first_stage_model.";
const SD1_TEXT_PREFIX: &str = "cond_stage_model.transformer.";
const SD2_TEXT_PREFIX: &str = "cond_stage_model.model.";
const SDXL_TEXT_PREFIX: &str = "conditioner.embedders.0.transformer.";
const SDXL_TEXT_2_PREFIX: &str = "conditioner.embedders.1.model.";

/// How a text encoder is stored in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TextLayout {
    /// transformers CLIP names under `prefix` (`text_model.` included or, in old files, not).
    Clip { prefix: String, text_model: bool },
    /// OpenCLIP names under `prefix`.
    OpenClip { prefix: String },
}

impl TextLayout {
    pub fn prefix(&self) -> &str {
        match self {
            TextLayout::Clip { prefix, .. } | TextLayout::OpenClip { prefix } => prefix,
        }
    }
}

/// What an original-layout checkpoint holds, from its tensor names and shapes.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    /// The family the weights show (`Err`: why none fits).
    pub family: Result<Family, String>,
    /// The UNet is read from its EMA copy (`model_ema.*`, present beside the plain weights).
    pub ema: bool,
    /// Element type of the UNet's weights.
    pub dtype: StoredDType,
    pub has_vae: bool,
    /// First and (SDXL) second text encoder, where present.
    pub text: Option<TextLayout>,
    pub text_2: Option<TextLayout>,
}

/// The message for a pickle checkpoint: never read, with the command that converts it.
pub fn pickle_refusal(path: &Path) -> ModelError {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let stem = path.file_stem().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    ModelError::Io {
        path: path.to_path_buf(),
        message: format!(
            "is a pickle checkpoint, which is not read (unpickling can run code); convert it to safetensors with \
             `python -c \"import torch, safetensors.torch as st; sd = torch.load('{name}', map_location='cpu', weights_only=True); \
             sd = sd.get('state_dict', sd); st.save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, '{stem}.safetensors')\"` \
             and serve the .safetensors file"
        ),
    }
}

/// The EMA name of a UNet key: `model.diffusion_model.a.b` → `model_ema.diffusion_modelab`.
fn ema_name(stored: &str) -> String {
    format!("{EMA_PREFIX}{}", stored.strip_prefix("model.").unwrap_or(stored).replace('.', ""))
}

impl Checkpoint {
    /// Reads what the (opened) file holds.
    pub fn inspect(w: &Weights) -> Result<Self, ModelError> {
        let path = w.path().to_path_buf();
        let conv_in = format!("{UNET_PREFIX}input_blocks.0.0.weight");
        if !w.contains(&conv_in) {
            let example = w.keys().next().unwrap_or("<none>").to_string();
            return Err(ModelError::Io {
                path,
                message: format!(
                    "is not a Stable Diffusion checkpoint in the original layout: no `{conv_in}` (its first tensor is `{example}`); \
                     serve a ControlNet with --controlnet, a diffusers folder with --model"
                ),
            });
        }
        let ema = w.keys().filter(|k| k.starts_with(EMA_PREFIX)).count() > 100 && w.contains(&ema_name(&conv_in));
        let dtype = w.stored_dtype_of(&conv_in).unwrap_or(StoredDType::F32);
        let has_vae = w.contains(&format!("{VAE_PREFIX}encoder.conv_in.weight"));
        let clip_at = |prefix: &str| {
            if w.contains(&format!("{prefix}text_model.embeddings.token_embedding.weight")) {
                Some(TextLayout::Clip { prefix: prefix.into(), text_model: true })
            } else if w.contains(&format!("{prefix}embeddings.token_embedding.weight")) {
                Some(TextLayout::Clip { prefix: prefix.into(), text_model: false })
            } else {
                None
            }
        };
        let open_clip_at =
            |prefix: &str| w.contains(&format!("{prefix}token_embedding.weight")).then(|| TextLayout::OpenClip { prefix: prefix.into() });
        let (text, text_2) = match (clip_at(SDXL_TEXT_PREFIX), open_clip_at(SDXL_TEXT_2_PREFIX)) {
            (None, None) => (clip_at(SD1_TEXT_PREFIX).or_else(|| open_clip_at(SD2_TEXT_PREFIX)), None),
            (a, b) => (a, b),
        };
        let family = detect_family(w);
        Ok(Self { path, family, ema, dtype, has_vae, text, text_2 })
    }

    /// The UNet's weights: a view of `w`'s file mapping diffusers keys to the original (or EMA)
    /// names, whose unused-tensor check covers the UNet's part.
    pub fn unet(&self, config: UNetConfig, device: &Device) -> Result<UNet, ModelError> {
        let ema = self.ema;
        let cfg = config.clone();
        let w = Weights::open(&self.path, device)?
            .with_layout(Box::new(move |k| {
                let stored = format!("{UNET_PREFIX}{}", unet_key(k, &cfg));
                StoredAs::plain(if ema { ema_name(&stored) } else { stored })
            }))
            .with_scope(Box::new(move |k| if ema { k.starts_with("model_ema.diffusion_model") } else { k.starts_with(UNET_PREFIX) }));
        UNet::from_weights(config, &w)
    }

    /// The VAE baked into the file (`first_stage_model.*`).
    pub fn vae(&self, config: VaeConfig, device: &Device) -> Result<Vae, ModelError> {
        vae_in_file(&self.path, VAE_PREFIX, config, device)
    }

    /// A text encoder stored as `layout`.
    pub fn text_encoder(&self, layout: &TextLayout, config: ClipConfig, device: &Device) -> Result<ClipTextModel, ModelError> {
        let w = Weights::open(&self.path, device)?;
        let w = match layout.clone() {
            TextLayout::Clip { prefix, text_model } => {
                let scope = prefix.clone();
                w.with_layout(Box::new(move |k| {
                    let k = if text_model { k } else { k.strip_prefix("text_model.").unwrap_or(k) };
                    StoredAs::plain(format!("{prefix}{k}"))
                }))
                .with_scope(Box::new(move |k| k.starts_with(&scope) && !k.ends_with("position_ids")))
            }
            TextLayout::OpenClip { prefix } => {
                let scope = prefix.clone();
                let layers = config.num_hidden_layers;
                let projection = config.projection_dim.is_some();
                w.with_layout(Box::new(move |k| {
                    let mut s = open_clip_key(k);
                    s.key = format!("{prefix}{}", s.key);
                    s
                }))
                .with_scope(Box::new(move |k| {
                    let Some(rest) = k.strip_prefix(&scope) else { return false };
                    // SD2 uses the penultimate layer (the last resblock is not run) and no
                    // projection; `logit_scale` belongs to CLIP's image-text training.
                    let layer = rest.strip_prefix("transformer.resblocks.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
                    !(layer.is_some_and(|l| l >= layers) || (rest == "text_projection" && !projection) || rest == "logit_scale")
                }))
            }
        };
        ClipTextModel::from_weights(config, &w)
    }
}

/// A VAE from a file: original names under `prefix` (`first_stage_model.` or none), or
/// diffusers names.
fn vae_in_file(path: &Path, prefix: &str, config: VaeConfig, device: &Device) -> Result<Vae, ModelError> {
    let w = Weights::open(path, device)?;
    let diffusers = prefix.is_empty() && w.contains("encoder.down_blocks.0.resnets.0.conv1.weight");
    if diffusers {
        return Vae::from_weights(config, &w);
    }
    let cfg = config.clone();
    let p = prefix.to_string();
    let scope = prefix.to_string();
    let w = w
        .with_layout(Box::new(move |k| StoredAs::plain(format!("{p}{}", vae_key(k, &cfg)))))
        .with_scope(Box::new(move |k| k.starts_with(&scope) && !k.starts_with("model_ema")));
    Vae::from_weights(config, &w)
}

/// A VAE given separately (`--vae`): a diffusers folder, or one `.safetensors` file with the
/// original names (with or without `first_stage_model.`) or diffusers names.
pub fn load_vae(path: &Path, config: VaeConfig, device: &Device) -> Result<Vae, ModelError> {
    if path.is_dir() {
        let config = VaeConfig::from_file(&path.join("config.json")).unwrap_or(config);
        let w = Weights::open(&weight_file(path, "diffusion_pytorch_model")?, device)?;
        return Vae::from_weights(config, &w);
    }
    if super::weights::is_pickle(path) {
        return Err(pickle_refusal(path));
    }
    let w = Weights::open(path, device)?;
    let prefix = if w.keys().any(|k| k.starts_with(VAE_PREFIX)) { VAE_PREFIX } else { "" };
    drop(w);
    vae_in_file(path, prefix, config, device)
}

/// The family of a checkpoint from its UNet: the cross-attention width (768: SD1, 1024: SD2,
/// 2048 with the `label_emb` size embedding: SDXL base). Anything else is named in the error.
fn detect_family(w: &Weights) -> Result<Family, String> {
    let cross = w
        .keys()
        .filter(|k| k.starts_with(UNET_PREFIX) && k.ends_with("attn2.to_k.weight"))
        .find_map(|k| w.shape_of(k))
        .and_then(|s| s.get(1).copied());
    let sdxl = w.contains(&format!("{UNET_PREFIX}label_emb.0.0.weight"));
    let in_channels = w.shape_of(&format!("{UNET_PREFIX}input_blocks.0.0.weight")).and_then(|s| s.get(1).copied());
    let hint = "put its diffusers configs beside it as <stem>.json (see the README)";
    if in_channels != Some(4) {
        return Err(format!(
            "the UNet takes {in_channels:?} input channels (inpainting or other variants are not supported; text-to-image: 4)"
        ));
    }
    match (sdxl, cross) {
        (true, Some(2048)) => Ok(Family::Sdxl),
        (true, Some(1280)) => Err("is an SDXL refiner (cross-attention width 1280), which is not supported".into()),
        (false, Some(768)) => Ok(Family::Sd1),
        (false, Some(1024)) => Ok(Family::Sd2),
        (_, c) => Err(format!(
            "family not recognised: cross-attention width {c:?}{} (SD1: 768, SD2: 1024, SDXL: 2048 with label_emb); {hint}",
            if sdxl { " with label_emb" } else { "" }
        )),
    }
}

/// The original name (without `model.diffusion_model.`) of a diffusers UNet key, by rule:
/// down and mid blocks, time and `text_time` embeddings as [`original_key`]; up block i's layer
/// j is `output_blocks.{Σ_{b<i}(layers_b + 1) + j}` (resnet `.0`, attention `.1`), its upsampler
/// the block's last entry, after the attention if any (`.2.conv`, else `.1.conv`);
/// `conv_norm_out` / `conv_out` are `out.0` / `out.2`.
pub fn unet_key(key: &str, cfg: &UNetConfig) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let rest = |n: usize| parts[n.min(parts.len())..].join(".");
    let with = |head: String, tail: String| if tail.is_empty() { head } else { format!("{head}.{tail}") };
    let n = cfg.layers_per_block.len();
    // Up block i has layers_per_block[n - 1 - i] + 1 layers.
    let up_layers = |i: usize| cfg.layers_per_block.get(n.wrapping_sub(1 + i)).map_or(1, |l| l + 1);
    match parts.as_slice() {
        ["conv_norm_out", ..] => with("out.0".into(), rest(1)),
        ["conv_out", ..] => with("out.2".into(), rest(1)),
        ["up_blocks", _, kind, _, ..] if num(1).is_some() && num(3).is_some() => {
            let (i, j) = (num(1).unwrap_or(0), num(3).unwrap_or(0));
            let first: usize = (0..i).map(up_layers).sum();
            match *kind {
                "resnets" => with(format!("output_blocks.{}.0", first + j), resnet_key(&rest(4))),
                "attentions" => with(format!("output_blocks.{}.1", first + j), rest(4)),
                "upsamplers" => {
                    let slot = if cfg.up_cross_attn.get(i).copied().unwrap_or(false) { 2 } else { 1 };
                    with(format!("output_blocks.{}.{slot}", first + up_layers(i) - 1), rest(4))
                }
                _ => key.to_string(),
            }
        }
        _ => original_key(key, &cfg.layers_per_block, 0),
    }
}

/// The original name of a key inside a resnet (`norm1.weight` → `in_layers.0.weight`).
fn resnet_key(rest: &str) -> String {
    // `original_key` maps a down block's resnet; reuse it for the inner names.
    let mapped = original_key(&format!("down_blocks.0.resnets.0.{rest}"), &[1], 0);
    mapped.strip_prefix("input_blocks.1.0.").map(str::to_string).unwrap_or(mapped)
}

/// The original name (without `first_stage_model.`) of a diffusers AutoencoderKL key: the
/// encoder's `down_blocks.i.resnets.j` are `down.i.block.j`, the decoder's `up_blocks.i` are
/// `up.{n - 1 - i}` (the original numbers them from the lowest resolution), mid resnets
/// `mid.block_1/2`, the mid attention `mid.attn_1.{norm,q,k,v,proj_out}` (stored as 1×1
/// convolutions), `conv_norm_out` is `norm_out`, `conv_shortcut` is `nin_shortcut`.
pub fn vae_key(key: &str, cfg: &VaeConfig) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let rest = |n: usize| parts[n.min(parts.len())..].join(".");
    let with = |head: String, tail: String| if tail.is_empty() { head } else { format!("{head}.{tail}") };
    let resnet = |tail: String| if let Some(t) = tail.strip_prefix("conv_shortcut") { format!("nin_shortcut{t}") } else { tail };
    let n = cfg.block_out_channels.len();
    match parts.as_slice() {
        [side @ ("encoder" | "decoder"), "conv_norm_out", ..] => with(format!("{side}.norm_out"), rest(2)),
        ["encoder", "down_blocks", _, "resnets", _, ..] if num(2).is_some() && num(4).is_some() => {
            with(format!("encoder.down.{}.block.{}", num(2).unwrap_or(0), num(4).unwrap_or(0)), resnet(rest(5)))
        }
        ["encoder", "down_blocks", _, "downsamplers", "0", ..] if num(2).is_some() => {
            with(format!("encoder.down.{}.downsample", num(2).unwrap_or(0)), rest(5))
        }
        ["decoder", "up_blocks", _, "resnets", _, ..] if num(2).is_some() && num(4).is_some() => {
            let i = n.saturating_sub(1 + num(2).unwrap_or(0));
            with(format!("decoder.up.{i}.block.{}", num(4).unwrap_or(0)), resnet(rest(5)))
        }
        ["decoder", "up_blocks", _, "upsamplers", "0", ..] if num(2).is_some() => {
            with(format!("decoder.up.{}.upsample", n.saturating_sub(1 + num(2).unwrap_or(0))), rest(5))
        }
        [side @ ("encoder" | "decoder"), "mid_block", "resnets", _, ..] if num(3).is_some() => {
            with(format!("{side}.mid.block_{}", num(3).unwrap_or(0) + 1), resnet(rest(4)))
        }
        [side @ ("encoder" | "decoder"), "mid_block", "attentions", "0", layer, ..] => {
            let (name, tail) = match *layer {
                "group_norm" => ("norm", rest(5)),
                "to_q" => ("q", rest(5)),
                "to_k" => ("k", rest(5)),
                "to_v" => ("v", rest(5)),
                "to_out" => ("proj_out", rest(6)),
                _ => return key.to_string(),
            };
            with(format!("{side}.mid.attn_1.{name}"), tail)
        }
        _ => key.to_string(),
    }
}

/// How OpenCLIP stores a transformers CLIP text encoder key (without the checkpoint prefix):
/// `resblocks.i` for `encoder.layers.i`, `ln_1/ln_2` for the layer norms, `mlp.c_fc/c_proj`
/// for `fc1/fc2`, q/k/v as the three row blocks of `attn.in_proj_weight/bias`, the embeddings
/// `token_embedding.weight` and `positional_embedding`, `ln_final`, and `text_projection`
/// stored `[in, out]` (transposed).
pub fn open_clip_key(key: &str) -> StoredAs {
    let Some(k) = key.strip_prefix("text_model.") else {
        return match key {
            "text_projection.weight" => StoredAs { key: "text_projection".into(), part: None, transposed: true },
            _ => StoredAs::plain(key),
        };
    };
    let plain = |s: String| StoredAs::plain(s);
    match k {
        "embeddings.token_embedding.weight" => return plain("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return plain("positional_embedding".into()),
        _ => {}
    }
    if let Some(tail) = k.strip_prefix("final_layer_norm.") {
        return plain(format!("ln_final.{tail}"));
    }
    let Some(layer) = k.strip_prefix("encoder.layers.") else { return plain(k.to_string()) };
    let (i, tail) = layer.split_once('.').unwrap_or((layer, ""));
    let block = format!("transformer.resblocks.{i}");
    for (q, part) in [("self_attn.q_proj.", 0), ("self_attn.k_proj.", 1), ("self_attn.v_proj.", 2)] {
        if let Some(leaf) = tail.strip_prefix(q) {
            return StoredAs { key: format!("{block}.attn.in_proj_{leaf}"), part: Some((part, 3)), transposed: false };
        }
    }
    let mapped = [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ]
    .iter()
    .find_map(|(from, to)| tail.strip_prefix(from).map(|leaf| format!("{to}{leaf}")))
    .unwrap_or_else(|| tail.to_string());
    plain(format!("{block}.{mapped}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::RawConfig;

    fn configs(family: Family) -> serde_json::Value {
        serde_json::from_str(default_configs(family)).unwrap()
    }

    fn unet_cfg(family: Family) -> UNetConfig {
        let v = configs(family);
        UNetConfig::from_raw(&RawConfig::parse(Path::new("unet"), &v["unet"].to_string()).unwrap()).unwrap()
    }

    #[test]
    fn unet_keys_follow_the_ldm_numbering() {
        let sd1 = unet_cfg(Family::Sd1);
        let k = |s: &str| unet_key(s, &sd1);
        assert_eq!(k("conv_in.weight"), "input_blocks.0.0.weight");
        assert_eq!(k("time_embedding.linear_2.bias"), "time_embed.2.bias");
        assert_eq!(k("down_blocks.1.attentions.0.proj_in.weight"), "input_blocks.4.1.proj_in.weight");
        assert_eq!(k("up_blocks.0.resnets.0.norm1.weight"), "output_blocks.0.0.in_layers.0.weight");
        assert_eq!(k("up_blocks.0.resnets.2.conv_shortcut.bias"), "output_blocks.2.0.skip_connection.bias");
        assert_eq!(k("up_blocks.0.upsamplers.0.conv.weight"), "output_blocks.2.1.conv.weight");
        assert_eq!(
            k("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
            "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(k("up_blocks.1.upsamplers.0.conv.bias"), "output_blocks.5.2.conv.bias");
        assert_eq!(k("up_blocks.3.resnets.2.conv2.weight"), "output_blocks.11.0.out_layers.3.weight");
        assert_eq!(k("mid_block.attentions.0.norm.weight"), "middle_block.1.norm.weight");
        assert_eq!(k("conv_norm_out.weight"), "out.0.weight");
        assert_eq!(k("conv_out.bias"), "out.2.bias");
        let xl = unet_cfg(Family::Sdxl);
        let k = |s: &str| unet_key(s, &xl);
        assert_eq!(k("add_embedding.linear_1.weight"), "label_emb.0.0.weight");
        assert_eq!(
            k("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2.weight"),
            "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight"
        );
        assert_eq!(k("up_blocks.0.upsamplers.0.conv.weight"), "output_blocks.2.2.conv.weight");
        assert_eq!(k("up_blocks.1.upsamplers.0.conv.weight"), "output_blocks.5.2.conv.weight");
        assert_eq!(k("up_blocks.2.resnets.0.conv1.weight"), "output_blocks.6.0.in_layers.2.weight");
        assert_eq!(ema_name("model.diffusion_model.input_blocks.0.0.weight"), "model_ema.diffusion_modelinput_blocks00weight");
    }

    #[test]
    fn vae_and_open_clip_keys() {
        let v = configs(Family::Sd1);
        let cfg = VaeConfig::from_raw(&RawConfig::parse(Path::new("vae"), &v["vae"].to_string()).unwrap()).unwrap();
        let k = |s: &str| vae_key(s, &cfg);
        assert_eq!(k("encoder.down_blocks.1.resnets.0.conv_shortcut.weight"), "encoder.down.1.block.0.nin_shortcut.weight");
        assert_eq!(k("encoder.down_blocks.0.downsamplers.0.conv.bias"), "encoder.down.0.downsample.conv.bias");
        assert_eq!(k("decoder.up_blocks.0.resnets.2.norm1.weight"), "decoder.up.3.block.2.norm1.weight");
        assert_eq!(k("decoder.up_blocks.2.upsamplers.0.conv.weight"), "decoder.up.1.upsample.conv.weight");
        assert_eq!(k("encoder.mid_block.resnets.1.conv2.weight"), "encoder.mid.block_2.conv2.weight");
        assert_eq!(k("decoder.mid_block.attentions.0.to_out.0.bias"), "decoder.mid.attn_1.proj_out.bias");
        assert_eq!(k("decoder.mid_block.attentions.0.group_norm.weight"), "decoder.mid.attn_1.norm.weight");
        assert_eq!(k("encoder.conv_norm_out.bias"), "encoder.norm_out.bias");
        assert_eq!(k("post_quant_conv.weight"), "post_quant_conv.weight");
        let q = open_clip_key("text_model.encoder.layers.3.self_attn.k_proj.weight");
        assert_eq!((q.key.as_str(), q.part), ("transformer.resblocks.3.attn.in_proj_weight", Some((1, 3))));
        assert_eq!(open_clip_key("text_model.encoder.layers.0.mlp.fc2.bias").key, "transformer.resblocks.0.mlp.c_proj.bias");
        assert_eq!(open_clip_key("text_model.encoder.layers.0.layer_norm1.weight").key, "transformer.resblocks.0.ln_1.weight");
        assert_eq!(
            open_clip_key("text_model.encoder.layers.0.self_attn.out_proj.weight").key,
            "transformer.resblocks.0.attn.out_proj.weight"
        );
        assert_eq!(open_clip_key("text_model.embeddings.position_embedding.weight").key, "positional_embedding");
        assert_eq!(open_clip_key("text_model.final_layer_norm.bias").key, "ln_final.bias");
        assert!(open_clip_key("text_projection.weight").transposed);
    }

    #[test]
    fn embedded_defaults_parse() {
        for f in [Family::Sd1, Family::Sd2, Family::Sdxl] {
            let v = configs(f);
            let unet = unet_cfg(f);
            assert_eq!(Family::of_config(&unet), f);
            VaeConfig::from_raw(&RawConfig::parse(Path::new("vae"), &v["vae"].to_string()).unwrap()).unwrap();
            let te = ClipConfig::from_raw(&RawConfig::parse(Path::new("te"), &v["text_encoder"].to_string()).unwrap()).unwrap();
            let width = te.hidden_size
                + v.get("text_encoder_2")
                    .map_or(0, |t| ClipConfig::from_raw(&RawConfig::parse(Path::new("te2"), &t.to_string()).unwrap()).unwrap().hidden_size);
            assert_eq!(width, unet.cross_attention_dim[0], "{f:?}");
        }
    }
}
