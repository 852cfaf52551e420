//! `AutoencoderKL`: `encode` (posterior mean and log-variance) and `decode`, diffusers key names.

use std::path::Path;

use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, FloatDType, Tensor};
use serde_json::json;

use super::config::RawConfig;
use super::nn::{Attention, Conv2d, GroupNorm, join};
use super::unet::{NoHooks, ResnetBlock};
use super::weights::{Weights, weight_file};
use super::{ModelError, stop};

#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub mid_block_add_attention: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_raw(&RawConfig::read(path)?)
    }

    pub fn from_raw(c: &RawConfig) -> Result<Self, ModelError> {
        c.require("act_fn", &[json!("silu")])?;
        c.require("latents_mean", &[])?;
        c.require("latents_std", &[])?;
        let block_out_channels = c.usizes("block_out_channels")?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(c.err("block_out_channels", "must not be empty"));
        }
        for (field, want) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            let types = c.strings(field)?;
            if types.len() != n {
                return Err(c.err(field, format!("{} entries for {n} blocks", types.len())));
            }
            if let Some(bad) = types.iter().find(|t| *t != want) {
                return Err(c.err(field, format!("block type {bad} is not supported ({want})")));
            }
        }
        let norm_num_groups = c.usize_or("norm_num_groups", 32)?;
        for &ch in &block_out_channels {
            if norm_num_groups == 0 || ch % norm_num_groups != 0 {
                return Err(c.err("norm_num_groups", format!("{ch} channels are not divisible by {norm_num_groups}")));
            }
        }
        let shift_factor = if c.is_set("shift_factor") { Some(c.f64_or("shift_factor", 0.0)?) } else { None };
        Ok(Self {
            in_channels: c.usize_or("in_channels", 3)?,
            out_channels: c.usize_or("out_channels", 3)?,
            latent_channels: c.usize_or("latent_channels", 4)?,
            block_out_channels,
            layers_per_block: c.usize_or("layers_per_block", 1)?,
            norm_num_groups,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
            shift_factor,
            force_upcast: c.bool_or("force_upcast", true)?,
            mid_block_add_attention: c.bool_or("mid_block_add_attention", true)?,
            use_quant_conv: c.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: c.bool_or("use_post_quant_conv", true)?,
        })
    }

    /// Pixels per latent cell along each axis.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

#[derive(Clone, Debug)]
struct VaeMid {
    resnet0: ResnetBlock,
    attn: Option<(GroupNorm, Attention)>,
    resnet1: ResnetBlock,
}

impl VaeMid {
    fn load(w: &Weights, prefix: &str, ch: usize, cfg: &VaeConfig) -> Result<Self, ModelError> {
        let g = cfg.norm_num_groups;
        let attn = if cfg.mid_block_add_attention {
            let a = join(prefix, "attentions.0");
            Some((GroupNorm::load(w, &join(&a, "group_norm"), g, ch, 1e-6)?, Attention::load(w, &a, ch, ch, 1, ch, true)?))
        } else {
            None
        };
        Ok(Self {
            resnet0: ResnetBlock::load(w, &join(prefix, "resnets.0"), ch, ch, None, g, 1e-6)?,
            attn,
            resnet1: ResnetBlock::load(w, &join(prefix, "resnets.1"), ch, ch, None, g, 1e-6)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnet0.forward(x, None, &NoHooks);
        if let Some((norm, attn)) = &self.attn {
            let [b, c, h, w] = x.dims();
            let t = norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
            let t = attn.forward(t, None);
            x = t.swap_dims(1, 2).reshape([b, c, h, w]) + x;
        }
        self.resnet1.forward(x, None, &NoHooks)
    }
}

/// The posterior of `encode`: mean and log-variance, (B, latent_channels, H/f, W/f).
#[derive(Clone, Debug)]
pub struct Posterior {
    pub mean: Tensor<4>,
    pub logvar: Tensor<4>,
}

/// A loaded AutoencoderKL. Cloning shares the weights.
#[derive(Clone, Debug)]
pub struct Vae {
    pub config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    enc_mid: VaeMid,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: VaeMid,
    dec_blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl Vae {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::open(&weight_file(dir, "diffusion_pytorch_model")?, device)?;
        Self::from_weights(config, &w)
    }

    pub fn from_weights(config: VaeConfig, w: &Weights) -> Result<Self, ModelError> {
        let cfg = &config;
        let n = cfg.block_out_channels.len();
        let g = cfg.norm_num_groups;
        let lc = cfg.latent_channels;
        let ch = &cfg.block_out_channels;

        let enc_conv_in = Conv2d::load(w, "encoder.conv_in", cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut enc_blocks = Vec::new();
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate().take(n) {
            let in_c = out_c;
            out_c = c;
            let p = format!("encoder.down_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                resnets.push(ResnetBlock::load(w, &format!("{p}.resnets.{j}"), if j == 0 { in_c } else { out_c }, out_c, None, g, 1e-6)?);
            }
            // Downsample2D with padding 0: pad right/bottom by one, then a stride-2 conv.
            let ds = if i + 1 < n { Some(Conv2d::load(w, &format!("{p}.downsamplers.0.conv"), out_c, out_c, 3, 2, 0)?) } else { None };
            enc_blocks.push((resnets, ds));
        }
        let c_last = ch[n - 1];
        let enc_mid = VaeMid::load(w, "encoder.mid_block", c_last, cfg)?;
        let enc_norm_out = GroupNorm::load(w, "encoder.conv_norm_out", g, c_last, 1e-6)?;
        let enc_conv_out = Conv2d::load(w, "encoder.conv_out", c_last, 2 * lc, 3, 1, 1)?;
        let quant_conv = if cfg.use_quant_conv { Some(Conv2d::load(w, "quant_conv", 2 * lc, 2 * lc, 1, 1, 0)?) } else { None };
        let post_quant_conv = if cfg.use_post_quant_conv { Some(Conv2d::load(w, "post_quant_conv", lc, lc, 1, 1, 0)?) } else { None };

        let dec_conv_in = Conv2d::load(w, "decoder.conv_in", lc, c_last, 3, 1, 1)?;
        let dec_mid = VaeMid::load(w, "decoder.mid_block", c_last, cfg)?;
        let mut dec_blocks = Vec::new();
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate().take(n) {
            let prev = out_c;
            out_c = c;
            let p = format!("decoder.up_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block + 1 {
                resnets.push(ResnetBlock::load(w, &format!("{p}.resnets.{j}"), if j == 0 { prev } else { out_c }, out_c, None, g, 1e-6)?);
            }
            let us = if i + 1 < n { Some(Conv2d::load(w, &format!("{p}.upsamplers.0.conv"), out_c, out_c, 3, 1, 1)?) } else { None };
            dec_blocks.push((resnets, us));
        }
        let dec_norm_out = GroupNorm::load(w, "decoder.conv_norm_out", g, ch[0], 1e-6)?;
        let dec_conv_out = Conv2d::load(w, "decoder.conv_out", ch[0], cfg.out_channels, 3, 1, 1)?;
        w.finish()?;
        Ok(Self {
            config,
            enc_conv_in,
            enc_blocks,
            enc_mid,
            enc_norm_out,
            enc_conv_out,
            quant_conv,
            post_quant_conv,
            dec_conv_in,
            dec_mid,
            dec_blocks,
            dec_norm_out,
            dec_conv_out,
        })
    }

    /// The precision its weights are held (and its activations computed) in.
    pub fn precision(&self) -> super::precision::Precision {
        super::precision::Precision::of_dtype(self.dec_conv_out.weight.dtype()).unwrap_or_default()
    }

    /// Encodes images in [-1, 1] (B, 3, H, W) to the latent posterior (unscaled).
    pub fn encode(&self, image: Tensor<4>) -> Result<Posterior, ModelError> {
        let [_, c, h, w] = image.dims();
        let f = self.config.downscale();
        if c != self.config.in_channels || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(ModelError::Input {
                field: "image".into(),
                message: format!(
                    "shape {:?}: needs {} channels and a size that is a positive multiple of {f}",
                    image.dims(),
                    self.config.in_channels
                ),
            });
        }
        let mut x = self.enc_conv_in.forward(image);
        for (resnets, ds) in &self.enc_blocks {
            for r in resnets {
                x = r.forward(x, None, &NoHooks);
            }
            if let Some(conv) = ds {
                x = x.pad((0, 1, 0, 1), burn::tensor::ops::PadMode::Constant(0.0));
                x = conv.forward(x);
            }
        }
        x = self.enc_mid.forward(x);
        x = self.enc_conv_out.forward(self.enc_norm_out.forward_silu(x));
        if let Some(q) = &self.quant_conv {
            x = q.forward(x);
        }
        let mut parts = x.chunk(2, 1);
        // Latents are f32 outside the models.
        let logvar = parts.pop().expect("two halves").cast(FloatDType::F32).clamp(-30.0, 20.0);
        let mean = parts.pop().expect("two halves").cast(FloatDType::F32);
        Ok(Posterior { mean, logvar })
    }

    /// Decodes unscaled latents (B, latent_channels, h, w) to images (raw, about [-1, 1]).
    pub fn decode(&self, z: Tensor<4>) -> Result<Tensor<4>, ModelError> {
        let [_, c, h, w] = z.dims();
        if c != self.config.latent_channels || h == 0 || w == 0 {
            return Err(ModelError::Input {
                field: "latents".into(),
                message: format!("shape {:?}: needs {} channels", z.dims(), self.config.latent_channels),
            });
        }
        let mut x = match &self.post_quant_conv {
            Some(p) => p.forward(z),
            None => z,
        };
        // Between blocks: a stop check (see [`super::stop`]).
        x = self.dec_conv_in.forward(x);
        stop::check()?;
        x = self.dec_mid.forward(x);
        for (resnets, us) in &self.dec_blocks {
            for r in resnets {
                stop::check()?;
                x = r.forward(x, None, &NoHooks);
            }
            if let Some(conv) = us {
                stop::check()?;
                x = interpolate(x, InterpolateOptions::new(InterpolateMode::Nearest).with_scale_factor([2.0, 2.0]));
                x = conv.forward(x);
            }
        }
        stop::check()?;
        let out = self.dec_conv_out.forward(self.dec_norm_out.forward_silu(x)).cast(FloatDType::F32);
        stop::check()?;
        Ok(out)
    }
}
