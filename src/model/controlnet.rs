//! diffusers `ControlNetModel`: a copy of the UNet's down half (input conv, time and SDXL
//! `text_time` embedding, down blocks, mid block — built by the same code as [`UNet`]'s, see
//! [`DownHalf`]) plus a conditioning embedding of the control image and 1×1 "zero" convolutions
//! that turn every skip connection and the mid block's output into residuals for the UNet
//! ([`AdditionalResiduals`], passed to [`UNet::forward_with_residuals`]). It is a plain model: no
//! hooks, no StyleAligned.
//!
//! Loading ([`ControlNet::load`]): a diffusers folder (`config.json` +
//! `diffusion_pytorch_model[.fp16].safetensors`) or one `.safetensors` file in the original
//! ControlNet layout (`control_model.`-prefixed or not: `time_embed`, `input_blocks.N.M`,
//! `middle_block`, `input_hint_block`, `zero_convs`, `middle_block_out`, SDXL `label_emb`) or with
//! diffusers names. A single file's architecture is the embedded default config of its family
//! (detected from tensor names and shapes), unless a sibling `<stem>.json` holds a diffusers
//! config. Original names are derived from diffusers names by rule ([`original_key`]).
//!
//! [`UNet`]: super::unet::UNet
//! [`UNet::forward_with_residuals`]: super::unet::UNet::forward_with_residuals

use std::path::{Path, PathBuf};

use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::json;

use super::config::RawConfig;
use super::nn::Conv2d;
use super::unet::{AdditionalResiduals, DownHalf, NoHooks, TextTime, UNetConfig, skip_channels};
use super::weights::{Weights, weight_file};
use super::{Family, ModelError};

/// Embedded default configs (diffusers `config.json` content) of the full-size ControlNets of
/// each family, used for single files without a sibling config.
const DEFAULT_SD1: &str = include_str!("controlnet_defaults/sd1.json");
const DEFAULT_SD2: &str = include_str!("controlnet_defaults/sd2.json");
const DEFAULT_SDXL: &str = include_str!("controlnet_defaults/sdxl.json");

/// The key prefix of ControlNet weights inside an original-layout checkpoint.
pub const ORIGINAL_PREFIX: &str = "control_model.";

/// Architecture of a ControlNet, read from a diffusers `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlNetConfig {
    /// The down half's architecture (the up fields mirror the down ones and are unused).
    pub unet: UNetConfig,
    /// Channels of the control image (3: RGB).
    pub conditioning_channels: usize,
    /// Channels of the conditioning embedding's convolutions; each step after the first halves
    /// the image, so the control image is `2^(len - 1)` times the latent.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `controlnet_conditioning_channel_order: bgr`: the image's channels are reversed first.
    pub bgr: bool,
}

impl ControlNetConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_raw(&RawConfig::read(path)?)
    }

    pub fn from_raw(c: &RawConfig) -> Result<Self, ModelError> {
        c.require("global_pool_conditions", &[json!(false)])?;
        let unet = UNetConfig::parse(c, false)?;
        let conditioning_embedding_out_channels = if c.is_set("conditioning_embedding_out_channels") {
            c.usizes("conditioning_embedding_out_channels")?
        } else {
            vec![16, 32, 96, 256]
        };
        if conditioning_embedding_out_channels.is_empty() || conditioning_embedding_out_channels.contains(&0) {
            return Err(c.err("conditioning_embedding_out_channels", "must be a non-empty list of positive channel counts"));
        }
        let conditioning_channels = c.usize_or("conditioning_channels", 3)?;
        if conditioning_channels == 0 {
            return Err(c.err("conditioning_channels", "must be positive"));
        }
        let bgr = match c.str_or("controlnet_conditioning_channel_order", "rgb")?.as_str() {
            "rgb" => false,
            "bgr" => true,
            other => return Err(c.err("controlnet_conditioning_channel_order", format!("{other} is not supported (rgb, bgr)"))),
        };
        Ok(Self { unet, conditioning_channels, conditioning_embedding_out_channels, bgr })
    }

    /// Pixels of the control image per latent cell.
    pub fn hint_factor(&self) -> usize {
        1 << (self.conditioning_embedding_out_channels.len() - 1)
    }
}

impl Family {
    /// The family a UNet (or ControlNet) architecture belongs to: `text_time` addition embedding
    /// → SDXL; linear projections or 1024-wide cross-attention → SD2; else SD1.
    pub fn of_config(cfg: &UNetConfig) -> Family {
        if cfg.text_time.is_some() {
            Family::Sdxl
        } else if cfg.use_linear_projection || cfg.cross_attention_dim[0] == 1024 {
            Family::Sd2
        } else {
            Family::Sd1
        }
    }
}

/// How a ControlNet was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlNetFormat {
    /// A diffusers folder.
    Diffusers,
    /// One safetensors file in the original layout (`control_model.` prefix or none).
    Original,
    /// One safetensors file with diffusers names.
    DiffusersFile,
}

/// diffusers `ControlNetConditioningEmbedding`: conv_in, SiLU, pairs of (3×3, 3×3 stride 2)
/// convolutions with SiLU, conv_out.
#[derive(Clone, Debug)]
struct CondEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl CondEmbedding {
    fn load(w: &Weights, cfg: &ControlNetConfig) -> Result<Self, ModelError> {
        let e = &cfg.conditioning_embedding_out_channels;
        let p = "controlnet_cond_embedding";
        let conv_in = Conv2d::load(w, &format!("{p}.conv_in"), cfg.conditioning_channels, e[0], 3, 1, 1)?;
        let mut blocks = Vec::with_capacity(2 * (e.len() - 1));
        for i in 0..e.len() - 1 {
            blocks.push(Conv2d::load(w, &format!("{p}.blocks.{}", 2 * i), e[i], e[i], 3, 1, 1)?);
            blocks.push(Conv2d::load(w, &format!("{p}.blocks.{}", 2 * i + 1), e[i], e[i + 1], 3, 2, 1)?);
        }
        let conv_out = Conv2d::load(w, &format!("{p}.conv_out"), e[e.len() - 1], cfg.unet.block_out_channels[0], 3, 1, 1)?;
        Ok(Self { conv_in, blocks, conv_out })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = silu(self.conv_in.forward(x));
        for block in &self.blocks {
            x = silu(block.forward(x));
        }
        self.conv_out.forward(x)
    }
}

/// A loaded ControlNet. Cloning shares the weight tensors.
#[derive(Clone, Debug)]
pub struct ControlNet {
    pub config: ControlNetConfig,
    family: Family,
    source: PathBuf,
    format: ControlNetFormat,
    half: DownHalf,
    cond_embedding: CondEmbedding,
    down_zero: Vec<Conv2d>,
    mid_zero: Conv2d,
}

impl ControlNet {
    /// Loads a ControlNet from a diffusers folder or a single `.safetensors` file (see the
    /// module documentation). Pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused.
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        if path.is_dir() {
            return Self::load_dir(path, device);
        }
        let io = |message: String| ModelError::Io { path: path.to_path_buf(), message };
        let ext = super::weights::extension(path);
        match ext.as_str() {
            "safetensors" => {}
            _ if super::weights::is_pickle(path) => {
                return Err(io(format!(
                    "is a pickle checkpoint (.{ext}), which is not read (unpickling can run code); convert it to safetensors, e.g. \
                     `python -c \"from diffusers import ControlNetModel as C; C.from_single_file('{0}').save_pretrained('controlnet-folder')\"` \
                     (a diffusers folder) or save its state dict with safetensors.torch.save_file",
                    path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
                )));
            }
            _ if !path.exists() => return Err(io("does not exist".into())),
            _ => return Err(io("is neither a diffusers ControlNet folder nor a .safetensors file".into())),
        }
        Self::load_file(path, device)
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors`.
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = ControlNetConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&weight_file(dir, "diffusion_pytorch_model")?, device)?;
        Self::from_weights(config, &weights, dir, ControlNetFormat::Diffusers)
    }

    /// Loads one safetensors file, original layout or diffusers names.
    pub fn load_file(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let weights = Weights::open(path, device)?;
        let io = |message: String| ModelError::Io { path: path.to_path_buf(), message };
        let prefix = if weights.keys().any(|k| k.starts_with(ORIGINAL_PREFIX)) { ORIGINAL_PREFIX } else { "" };
        if !prefix.is_empty() {
            let outside: Vec<&str> = weights.keys().filter(|k| !k.starts_with(prefix)).collect();
            if !outside.is_empty() {
                return Err(io(format!(
                    "{} tensor(s) outside `{prefix}` (e.g. `{}`): a checkpoint holding more than a ControlNet is not read",
                    outside.len(),
                    outside[0]
                )));
            }
        }
        let format = if weights.contains(&format!("{prefix}input_hint_block.0.weight")) {
            ControlNetFormat::Original
        } else if prefix.is_empty() && weights.contains("controlnet_cond_embedding.conv_in.weight") {
            ControlNetFormat::DiffusersFile
        } else {
            return Err(io("is not a ControlNet: no `input_hint_block.0.weight` (original layout, optionally prefixed `control_model.`) \
                 and no `controlnet_cond_embedding.conv_in.weight` (diffusers names)"
                .into()));
        };
        let detected = detect_family(&weights, prefix, format);
        let sibling = path.with_extension("json");
        let (config, family) = if sibling.is_file() {
            let config = ControlNetConfig::from_file(&sibling)?;
            let family = Family::of_config(&config.unet);
            (config, family)
        } else {
            let family = detected.map_err(io)?;
            let text = match family {
                Family::Sd1 => DEFAULT_SD1,
                Family::Sd2 => DEFAULT_SD2,
                Family::Sdxl => DEFAULT_SDXL,
            };
            let name = format!("<embedded default {} ControlNet config>", family.as_str());
            (ControlNetConfig::from_raw(&RawConfig::parse(Path::new(&name), text)?)?, family)
        };
        let weights = match format {
            ControlNetFormat::Original => {
                let layers = config.unet.layers_per_block.clone();
                // conv_out is the highest `input_hint_block` index (14 in real files).
                let hint_out = weights
                    .keys()
                    .filter_map(|k| k.strip_prefix(prefix)?.strip_prefix("input_hint_block.")?.split('.').next()?.parse::<usize>().ok())
                    .max()
                    .unwrap_or(0);
                weights.with_names(Box::new(move |k| format!("{prefix}{}", original_key(k, &layers, hint_out))))
            }
            _ => weights,
        };
        let mut net = Self::from_weights(config, &weights, path, format)?;
        net.family = family;
        Ok(net)
    }

    /// Builds the ControlNet of `config` from `weights` (diffusers names); every tensor of the
    /// file must be used.
    pub fn from_weights(config: ControlNetConfig, w: &Weights, source: &Path, format: ControlNetFormat) -> Result<Self, ModelError> {
        let cfg = &config.unet;
        let mut layers = 0;
        let half = DownHalf::load(w, cfg, &mut layers, 0)?;
        let cond_embedding = CondEmbedding::load(w, &config)?;
        let down_zero = skip_channels(cfg)
            .into_iter()
            .enumerate()
            .map(|(k, c)| Conv2d::load(w, &format!("controlnet_down_blocks.{k}"), c, c, 1, 1, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let c_last = *cfg.block_out_channels.last().expect("blocks");
        let mid_zero = Conv2d::load(w, "controlnet_mid_block", c_last, c_last, 1, 1, 0)?;
        w.finish()?;
        Ok(Self { family: Family::of_config(cfg), config, source: source.to_path_buf(), format, half, cond_embedding, down_zero, mid_zero })
    }

    /// The model family (SD1, SD2, SDXL) the ControlNet was made for.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The folder or file it was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn format(&self) -> ControlNetFormat {
        self.format
    }

    /// Why this ControlNet cannot drive a UNet of `unet` (its residuals would not fit), if so.
    pub fn check_fits(&self, unet: &UNetConfig) -> Result<(), String> {
        let c = &self.config.unet;
        if Family::of_config(unet) != self.family {
            return Err(format!("the ControlNet is for {}, the model is {}", self.family.as_str(), Family::of_config(unet).as_str()));
        }
        if c.in_channels != unet.in_channels {
            return Err(format!("the ControlNet takes {} latent channels, the UNet {}", c.in_channels, unet.in_channels));
        }
        if c.block_out_channels != unet.block_out_channels || skip_channels(c) != skip_channels(unet) {
            return Err(format!(
                "the ControlNet's blocks ({:?} channels, {:?} layers) differ from the UNet's ({:?}, {:?})",
                c.block_out_channels, c.layers_per_block, unet.block_out_channels, unet.layers_per_block
            ));
        }
        if c.cross_attention_dim[0] != unet.cross_attention_dim[0] {
            return Err(format!(
                "the ControlNet's cross_attention_dim is {}, the UNet's {}",
                c.cross_attention_dim[0], unet.cross_attention_dim[0]
            ));
        }
        if c.text_time != unet.text_time {
            return Err(format!("the ControlNet's text_time embedding {:?} differs from the UNet's {:?}", c.text_time, unet.text_time));
        }
        if c.downsample_padding != unet.downsample_padding {
            return Err("the ControlNet's downsample_padding differs from the UNet's".into());
        }
        Ok(())
    }

    /// The residuals for the UNet: `sample` (B, C, h, w) at `timesteps` (B,) given
    /// `encoder_hidden_states` (B, L, D), SDXL's `text_time`, and the control image `cond`
    /// (B, conditioning_channels, h·f, w·f) with values in [0, 1] (f: [`ControlNetConfig::hint_factor`]),
    /// every residual multiplied by `conditioning_scale`.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: &Tensor<3>,
        text_time: Option<&TextTime>,
        cond: Tensor<4>,
        conditioning_scale: f32,
    ) -> Result<AdditionalResiduals, ModelError> {
        self.forward_scaled(sample, timesteps, encoder_hidden_states, text_time, cond, &[conditioning_scale])
    }

    /// [`forward`](Self::forward) with one conditioning scale per row (`scales.len()` = B), or one
    /// for all (`scales.len()` = 1).
    pub fn forward_scaled(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: &Tensor<3>,
        text_time: Option<&TextTime>,
        cond: Tensor<4>,
        scales: &[f32],
    ) -> Result<AdditionalResiduals, ModelError> {
        let cfg = &self.config.unet;
        DownHalf::check_inputs(cfg, &sample, &timesteps, encoder_hidden_states)?;
        let [b, _, h, w] = sample.dims();
        let f = self.config.hint_factor();
        let expected = [b, self.config.conditioning_channels, h * f, w * f];
        if cond.dims() != expected {
            return Err(ModelError::Input {
                field: "controlnet_cond".into(),
                message: format!("shape {:?}, expected {expected:?} (the image is {f} times the latent)", cond.dims()),
            });
        }
        if scales.len() != 1 && scales.len() != b {
            return Err(ModelError::Input {
                field: "conditioning_scale".into(),
                message: format!("{} values for a batch of {b} (one, or one per row)", scales.len()),
            });
        }
        let cond = if self.config.bgr { cond.flip([1]) } else { cond };
        let emb = self.half.embedding(cfg, timesteps, text_time, b)?;
        let x = self.half.conv_in(sample) + self.cond_embedding.forward(cond);
        let (mid, skips) = self.half.forward(x, &emb, encoder_hidden_states, &NoHooks)?;
        let scale = |t: Tensor<4>| -> Tensor<4> {
            if scales.len() == 1 {
                t * scales[0]
            } else {
                let s = Tensor::<1>::from_data(TensorData::new(scales.to_vec(), [b]), &t.device()).cast(t.dtype()).reshape([b, 1, 1, 1]);
                t * s
            }
        };
        let down = skips.into_iter().zip(&self.down_zero).map(|(s, conv)| scale(conv.forward(s))).collect();
        let mid = scale(self.mid_zero.forward(mid));
        Ok(AdditionalResiduals { down, mid })
    }
}

/// The family of a single file from its tensors: `label_emb` / `add_embedding` → SDXL, else the
/// cross-attention width (768 → SD1, 1024 → SD2). Errors say what was found.
fn detect_family(w: &Weights, prefix: &str, format: ControlNetFormat) -> Result<Family, String> {
    let sdxl = match format {
        ControlNetFormat::Original => w.contains(&format!("{prefix}label_emb.0.0.weight")),
        _ => w.contains("add_embedding.linear_1.weight"),
    };
    let cross = w.keys().find(|k| k.ends_with("attn2.to_k.weight")).and_then(|k| w.shape_of(k)).and_then(|s| s.get(1).copied());
    let linear = w.keys().find(|k| k.ends_with("proj_in.weight")).and_then(|k| w.shape_of(k)).map(|s| s.len() == 2);
    let hint = "put its diffusers config beside it as <stem>.json";
    match (sdxl, cross, linear) {
        (true, Some(2048), _) => Ok(Family::Sdxl),
        (true, c, _) => Err(format!("has an SDXL addition embedding but cross-attention width {c:?} (SDXL: 2048); {hint}")),
        (false, Some(768), Some(false)) => Ok(Family::Sd1),
        (false, Some(1024), _) => Ok(Family::Sd2),
        (false, c, l) => Err(format!(
            "family not recognised: cross-attention width {c:?}, linear projections {l:?} (SD1: 768 with conv projections, SD2: 1024, \
             SDXL: label_emb and 2048); {hint}"
        )),
    }
}

/// The original-layout name of a diffusers ControlNet key (without the `control_model.` prefix),
/// by rule: `layers_per_block` gives the `input_blocks` numbering (block i's layer j is
/// `input_blocks.{1 + Σ_{b<i}(layers_b + 1) + j}`, its downsampler the next index, as `.0.op`);
/// the conditioning embedding's convolutions are every other `input_hint_block` entry (SiLUs
/// between them): `conv_in` is entry 0, block j entry 2 (j + 1), `conv_out` the entry `hint_out`
/// (the file's highest index: 14 in real files). Keys without a rule are returned unchanged.
pub fn original_key(key: &str, layers_per_block: &[usize], hint_out: usize) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let rest = |n: usize| parts[n.min(parts.len())..].join(".");
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let with = |head: String, tail: String| if tail.is_empty() { head } else { format!("{head}.{tail}") };
    match parts.as_slice() {
        ["time_embedding", "linear_1", ..] => with("time_embed.0".into(), rest(2)),
        ["time_embedding", "linear_2", ..] => with("time_embed.2".into(), rest(2)),
        ["add_embedding", "linear_1", ..] => with("label_emb.0.0".into(), rest(2)),
        ["add_embedding", "linear_2", ..] => with("label_emb.0.2".into(), rest(2)),
        ["conv_in", ..] => with("input_blocks.0.0".into(), rest(1)),
        ["controlnet_cond_embedding", "conv_in", ..] => with("input_hint_block.0".into(), rest(2)),
        ["controlnet_cond_embedding", "conv_out", ..] => with(format!("input_hint_block.{hint_out}"), rest(2)),
        ["controlnet_cond_embedding", "blocks", _, ..] if num(2).is_some() => {
            with(format!("input_hint_block.{}", 2 * (num(2).unwrap_or(0) + 1)), rest(3))
        }
        ["controlnet_down_blocks", _, ..] if num(1).is_some() => with(format!("zero_convs.{}.0", num(1).unwrap_or(0)), rest(2)),
        ["controlnet_mid_block", ..] => with("middle_block_out.0".into(), rest(1)),
        ["down_blocks", _, kind, _, ..] if num(1).is_some() && num(3).is_some() => {
            let (i, j) = (num(1).unwrap_or(0), num(3).unwrap_or(0));
            let first = 1 + layers_per_block.iter().take(i).map(|l| l + 1).sum::<usize>();
            match *kind {
                "resnets" => with(format!("input_blocks.{}.0", first + j), resnet_key(&rest(4))),
                "attentions" => with(format!("input_blocks.{}.1", first + j), rest(4)),
                "downsamplers" => {
                    let l = layers_per_block.get(i).copied().unwrap_or(0);
                    // `downsamplers.0.conv.weight` → `input_blocks.N.0.op.weight`
                    with(format!("input_blocks.{}.0.op", first + l), rest(5))
                }
                _ => key.to_string(),
            }
        }
        ["mid_block", "resnets", _, ..] if num(2).is_some() => {
            with(format!("middle_block.{}", 2 * num(2).unwrap_or(0)), resnet_key(&rest(3)))
        }
        ["mid_block", "attentions", _, ..] if num(2).is_some() => with(format!("middle_block.{}", 2 * num(2).unwrap_or(0) + 1), rest(3)),
        _ => key.to_string(),
    }
}

/// The original name of a key inside a resnet (`norm1.weight` → `in_layers.0.weight`).
fn resnet_key(rest: &str) -> String {
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let original = match layer {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        other => other,
    };
    if tail.is_empty() { original.to_string() } else { format!("{original}.{tail}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_keys_follow_the_ldm_numbering() {
        // SD1.5: 4 blocks of 2 layers; conv_out at input_hint_block.14.
        let l = [2, 2, 2, 2];
        let k = |s: &str| original_key(s, &l, 14);
        assert_eq!(k("time_embedding.linear_1.weight"), "time_embed.0.weight");
        assert_eq!(k("time_embedding.linear_2.bias"), "time_embed.2.bias");
        assert_eq!(k("add_embedding.linear_2.weight"), "label_emb.0.2.weight");
        assert_eq!(k("conv_in.weight"), "input_blocks.0.0.weight");
        assert_eq!(k("controlnet_cond_embedding.conv_in.bias"), "input_hint_block.0.bias");
        assert_eq!(k("controlnet_cond_embedding.blocks.0.weight"), "input_hint_block.2.weight");
        assert_eq!(k("controlnet_cond_embedding.blocks.5.weight"), "input_hint_block.12.weight");
        assert_eq!(k("controlnet_cond_embedding.conv_out.weight"), "input_hint_block.14.weight");
        assert_eq!(k("controlnet_down_blocks.11.bias"), "zero_convs.11.0.bias");
        assert_eq!(k("controlnet_mid_block.weight"), "middle_block_out.0.weight");
        assert_eq!(k("down_blocks.0.resnets.0.norm1.weight"), "input_blocks.1.0.in_layers.0.weight");
        assert_eq!(k("down_blocks.0.resnets.1.conv2.bias"), "input_blocks.2.0.out_layers.3.bias");
        assert_eq!(k("down_blocks.1.resnets.0.conv_shortcut.weight"), "input_blocks.4.0.skip_connection.weight");
        assert_eq!(k("down_blocks.1.resnets.0.time_emb_proj.weight"), "input_blocks.4.0.emb_layers.1.weight");
        assert_eq!(
            k("down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.weight"),
            "input_blocks.8.1.transformer_blocks.0.attn1.to_q.weight"
        );
        assert_eq!(k("down_blocks.0.downsamplers.0.conv.weight"), "input_blocks.3.0.op.weight");
        assert_eq!(k("down_blocks.2.downsamplers.0.conv.bias"), "input_blocks.9.0.op.bias");
        assert_eq!(k("down_blocks.3.resnets.1.norm2.weight"), "input_blocks.11.0.out_layers.0.weight");
        assert_eq!(k("mid_block.resnets.0.conv1.weight"), "middle_block.0.in_layers.2.weight");
        assert_eq!(k("mid_block.attentions.0.proj_in.weight"), "middle_block.1.proj_in.weight");
        assert_eq!(k("mid_block.resnets.1.norm1.bias"), "middle_block.2.in_layers.0.bias");
        // Unequal layers per block.
        assert_eq!(original_key("down_blocks.1.resnets.0.conv1.weight", &[1, 2, 1], 4), "input_blocks.3.0.in_layers.2.weight");
        assert_eq!(original_key("down_blocks.1.downsamplers.0.conv.weight", &[1, 2, 1], 4), "input_blocks.5.0.op.weight");
        assert_eq!(original_key("controlnet_cond_embedding.conv_out.weight", &[1], 6), "input_hint_block.6.weight");
    }

    #[test]
    fn embedded_default_configs_parse_to_their_family() {
        for (text, family, heads0) in [(DEFAULT_SD1, Family::Sd1, 8), (DEFAULT_SD2, Family::Sd2, 5), (DEFAULT_SDXL, Family::Sdxl, 5)] {
            let cfg = ControlNetConfig::from_raw(&RawConfig::parse(Path::new("default"), text).unwrap()).unwrap();
            assert_eq!(Family::of_config(&cfg.unet), family);
            assert_eq!(cfg.unet.num_attention_heads[0], heads0);
            assert_eq!(cfg.hint_factor(), 8);
        }
    }
}
