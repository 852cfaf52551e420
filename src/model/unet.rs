//! `UNet2DConditionModel` (SD1.x, SD2.x, SDXL) built from a diffusers `unet/config.json`.
//!
//! The UNet exposes its self-attention layers and its GroupNorms through [`UNetHooks`]: a patch
//! (e.g. StyleAligned) implements that trait and is passed to [`UNet::forward`]; every call says
//! where the layer sits ([`Site`]: its [`Level`], computed by the UNet from its structure). The
//! model itself holds weights only, so a patched model is the same `UNet` plus a hooks value.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::activation::{gelu, silu};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, FloatDType, Tensor};
use serde_json::json;

use super::config::RawConfig;
use super::nn::{Attention, Conv2d, GroupNorm, LayerNorm, Linear, TimestepEmbedding, join, timestep_embedding};
use super::weights::{Weights, weight_file};
use super::{ModelError, stop};

/// A UNet level: diffusers `down_blocks[k]`, `mid_block`, `up_blocks[k]`, and `conv_norm_out`
/// (`out`). Every GroupNorm and self-attention of a block belongs to that block's level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    Down(usize),
    Mid,
    Up(usize),
    Out,
}

impl Level {
    /// Parses `down.K`, `mid`, `up.K` or `out`.
    pub fn parse(s: &str) -> Option<Self> {
        // Decimal digits, no leading zero, at most 3 (a UNet has a handful of blocks).
        let index = |k: &str| {
            let digits = !k.is_empty() && k.len() <= 3 && k.bytes().all(|b| b.is_ascii_digit()) && (k == "0" || !k.starts_with('0'));
            if digits { k.parse::<usize>().ok() } else { None }
        };
        match s {
            "mid" => Some(Self::Mid),
            "out" => Some(Self::Out),
            _ => {
                if let Some(k) = s.strip_prefix("down.") {
                    index(k).map(Self::Down)
                } else if let Some(k) = s.strip_prefix("up.") {
                    index(k).map(Self::Up)
                } else {
                    None
                }
            }
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Down(k) => write!(f, "down.{k}"),
            Self::Mid => f.write_str("mid"),
            Self::Up(k) => write!(f, "up.{k}"),
            Self::Out => f.write_str("out"),
        }
    }
}

/// Where a hooked layer sits in the UNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    pub level: Level,
}

/// The UNet's interface to a patch: every GroupNorm and every self-attention (`attn1`) layer
/// goes through these two methods, told where the layer sits. Defaults compute the plain layer.
pub trait UNetHooks: Send + Sync {
    /// A GroupNorm of a resnet, of a transformer's input or `conv_norm_out` on `x` (B, C, H, W),
    /// followed by SiLU when `silu` (fused into one kernel on GPU devices).
    fn group_norm(&self, site: Site, norm: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
        let _ = site;
        norm.forward_act(x, silu)
    }

    /// Self-attention number `layer` (diffusers processor order: down blocks, up blocks, mid
    /// block) on the LayerNorm-ed hidden states `x` (B, N, C).
    fn self_attention(&self, site: Site, layer: usize, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
        let _ = (site, layer);
        attn.forward(x, None)
    }
}

/// What a block's layers call: the hooks of one block, bound to its site by the UNet (the VAE's
/// blocks get [`NoHooks`]).
pub trait BlockHooks {
    fn group_norm(&self, norm: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4>;
    fn self_attention(&self, layer: usize, attn: &Attention, x: Tensor<3>) -> Tensor<3>;
}

/// The plain, unpatched model.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;
impl UNetHooks for NoHooks {}

impl BlockHooks for NoHooks {
    fn group_norm(&self, norm: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
        norm.forward_act(x, silu)
    }

    fn self_attention(&self, _layer: usize, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
        attn.forward(x, None)
    }
}

/// A UNet's hooks bound to a level.
struct At<'a> {
    hooks: &'a dyn UNetHooks,
    site: Site,
}

impl<'a> At<'a> {
    fn new(hooks: &'a dyn UNetHooks, level: Level) -> Self {
        Self { hooks, site: Site { level } }
    }
}

impl BlockHooks for At<'_> {
    fn group_norm(&self, norm: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
        self.hooks.group_norm(self.site, norm, x, silu)
    }

    fn self_attention(&self, layer: usize, attn: &Attention, x: Tensor<3>) -> Tensor<3> {
        self.hooks.self_attention(self.site, layer, attn, x)
    }
}

/// Architecture of a UNet, every number read from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Per down block: has cross-attention.
    pub down_cross_attn: Vec<bool>,
    /// Per up block (in up order): has cross-attention.
    pub up_cross_attn: Vec<bool>,
    pub layers_per_block: Vec<usize>,
    pub num_attention_heads: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub reverse_transformer_layers_per_block: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    /// `text_time` (SDXL): (addition_time_embed_dim, projection_class_embeddings_input_dim).
    pub text_time: Option<(usize, usize)>,
    pub sample_size: usize,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_raw(&RawConfig::read(path)?)
    }

    pub fn from_raw(c: &RawConfig) -> Result<Self, ModelError> {
        Self::parse(c, true)
    }

    /// Reads the fields of a UNet config; `with_up: false` for a ControlNet config, which has
    /// down and mid blocks only (the up fields then mirror the down ones and are not used).
    pub(crate) fn parse(c: &RawConfig, with_up: bool) -> Result<Self, ModelError> {
        c.require("time_embedding_type", &[json!("positional")])?;
        c.require("class_embed_type", &[])?;
        c.require("num_class_embeds", &[])?;
        c.require("encoder_hid_dim_type", &[])?;
        c.require("encoder_hid_dim", &[])?;
        c.require("time_cond_proj_dim", &[])?;
        c.require("time_embedding_dim", &[])?;
        c.require("time_embedding_act_fn", &[])?;
        c.require("timestep_post_act", &[])?;
        c.require("attention_type", &[json!("default")])?;
        c.require("act_fn", &[json!("silu")])?;
        c.require("resnet_time_scale_shift", &[json!("default")])?;
        c.require("only_cross_attention", &[json!(false)])?;
        c.require("dual_cross_attention", &[json!(false)])?;
        c.require("center_input_sample", &[json!(false)])?;
        c.require("resnet_skip_time_act", &[json!(false)])?;
        c.require("resnet_out_scale_factor", &[json!(1.0), json!(1)])?;
        c.require("mid_block_scale_factor", &[json!(1.0), json!(1)])?;
        c.require("mid_block_type", &[json!("UNetMidBlock2DCrossAttn")])?;
        c.require("conv_in_kernel", &[json!(3)])?;
        c.require("conv_out_kernel", &[json!(3)])?;
        c.require("mid_block_only_cross_attention", &[json!(false)])?;
        c.require("cross_attention_norm", &[])?;
        c.require("class_embeddings_concat", &[json!(false)])?;
        c.require("dropout", &[json!(0.0), json!(0)])?;

        let block_out_channels = c.usizes("block_out_channels")?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(c.err("block_out_channels", "must not be empty"));
        }
        let down_types = c.strings("down_block_types")?;
        let up_types =
            if with_up { c.strings("up_block_types")? } else { down_types.iter().rev().map(|t| t.replace("Down", "Up")).collect() };
        if down_types.len() != n {
            return Err(c.err("down_block_types", format!("{} entries for {n} blocks", down_types.len())));
        }
        if up_types.len() != n {
            return Err(c.err("up_block_types", format!("{} entries for {n} blocks", up_types.len())));
        }
        let down_cross_attn = down_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(c.err("down_block_types", format!("block type {other} is not supported (CrossAttnDownBlock2D, DownBlock2D)"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let up_cross_attn = up_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(c.err("up_block_types", format!("block type {other} is not supported (CrossAttnUpBlock2D, UpBlock2D)"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let layers_per_block = c.per_block("layers_per_block", n)?.ok_or_else(|| c.err("layers_per_block", "missing"))?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (the
        // historical name `attention_head_dim` holds the number of heads).
        let num_attention_heads = match c.per_block("num_attention_heads", n)? {
            Some(h) => h,
            None => c.per_block("attention_head_dim", n)?.ok_or_else(|| c.err("attention_head_dim", "missing"))?,
        };
        let transformer_layers_per_block = c.per_block("transformer_layers_per_block", n)?.unwrap_or(vec![1; n]);
        let reverse_transformer_layers_per_block = match c.per_block("reverse_transformer_layers_per_block", n)? {
            Some(r) => r,
            None => transformer_layers_per_block.iter().rev().copied().collect(),
        };
        let cross_attention_dim = c.per_block("cross_attention_dim", n)?.ok_or_else(|| c.err("cross_attention_dim", "missing"))?;
        let norm_num_groups = c.usize_or("norm_num_groups", 32)?;
        for (i, &ch) in block_out_channels.iter().enumerate() {
            if norm_num_groups == 0 || ch % norm_num_groups != 0 {
                return Err(c.err("norm_num_groups", format!("block_out_channels[{i}] = {ch} is not divisible by {norm_num_groups}")));
            }
            let has_attn = down_cross_attn[i] || up_cross_attn[n - 1 - i] || i == n - 1;
            if has_attn && (num_attention_heads[i] == 0 || ch % num_attention_heads[i] != 0) {
                return Err(c.err(
                    "attention_head_dim",
                    format!("block {i}: {ch} channels are not divisible into {} heads", num_attention_heads[i]),
                ));
            }
        }
        let text_time = match c.opt_str("addition_embed_type")?.as_deref() {
            None => None,
            Some("text_time") => {
                let d = c.usize("addition_time_embed_dim")?;
                let p = c.usize("projection_class_embeddings_input_dim")?;
                if p <= 6 * d {
                    return Err(c.err(
                        "projection_class_embeddings_input_dim",
                        format!("{p} leaves no room for text_embeds beside 6 x {d} time features"),
                    ));
                }
                Some((d, p))
            }
            Some(other) => return Err(c.err("addition_embed_type", format!("{other} is not supported (null, text_time)"))),
        };
        Ok(Self {
            in_channels: c.usize_or("in_channels", 4)?,
            out_channels: c.usize_or("out_channels", 4)?,
            block_out_channels,
            down_cross_attn,
            up_cross_attn,
            layers_per_block,
            num_attention_heads,
            transformer_layers_per_block,
            reverse_transformer_layers_per_block,
            cross_attention_dim,
            norm_num_groups,
            norm_eps: c.f64_or("norm_eps", 1e-5)?,
            use_linear_projection: c.bool_or("use_linear_projection", false)?,
            upcast_attention: c.bool_or("upcast_attention", false)?,
            flip_sin_to_cos: c.bool_or("flip_sin_to_cos", true)?,
            freq_shift: c.f64_or("freq_shift", 0.0)?,
            downsample_padding: c.usize_or("downsample_padding", 1)?,
            text_time,
            sample_size: c.usize_or("sample_size", 64)?,
        })
    }

    /// Width of `text_embeds` for a `text_time` UNet (SDXL: 1280).
    pub fn text_embeds_dim(&self) -> Option<usize> {
        self.text_time.map(|(d, p)| p - 6 * d)
    }

    /// The latent must be divisible by this (one halving per down block but the last).
    pub fn latent_multiple(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The levels of a UNet of `blocks` down (and up) blocks, in execution order.
pub fn levels_of(blocks: usize) -> Vec<Level> {
    (0..blocks).map(Level::Down).chain([Level::Mid]).chain((0..blocks).map(Level::Up)).chain([Level::Out]).collect()
}

/// diffusers `ResnetBlock2D` (shared with the VAE, which has no time embedding).
#[derive(Clone, Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            norm1: GroupNorm::load(w, &join(prefix, "norm1"), groups, c_in, eps)?,
            conv1: Conv2d::load(w, &join(prefix, "conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj: match temb {
                Some(t) => Some(Linear::load(w, &join(prefix, "time_emb_proj"), t, c_out, true)?),
                None => None,
            },
            norm2: GroupNorm::load(w, &join(prefix, "norm2"), groups, c_out, eps)?,
            conv2: Conv2d::load(w, &join(prefix, "conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out { Some(Conv2d::load(w, &join(prefix, "conv_shortcut"), c_in, c_out, 1, 1, 0)?) } else { None },
        })
    }

    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>, hooks: &dyn BlockHooks) -> Tensor<4> {
        let mut h = hooks.group_norm(&self.norm1, x.clone(), true);
        h = self.conv1.forward(h);
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(silu(temb.clone()));
            let [b, c] = t.dims();
            h = h + t.reshape([b, c, 1, 1]);
        }
        h = hooks.group_norm(&self.norm2, h, true);
        h = self.conv2.forward(h);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// diffusers `BasicTransformerBlock` (self-attention, cross-attention, GEGLU feed-forward).
#[derive(Clone, Debug)]
pub struct TransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff_proj: Linear,
    pub ff_out: Linear,
    /// Index of `attn1` in processor order.
    pub layer: usize,
}

impl TransformerBlock {
    fn load(w: &Weights, prefix: &str, dim: usize, heads: usize, context_dim: usize, layer: usize) -> Result<Self, ModelError> {
        let head_dim = dim / heads;
        let inner_ff = dim * 4;
        Ok(Self {
            norm1: LayerNorm::load(w, &join(prefix, "norm1"), dim, 1e-5)?,
            attn1: Attention::load(w, &join(prefix, "attn1"), dim, dim, heads, head_dim, false)?,
            norm2: LayerNorm::load(w, &join(prefix, "norm2"), dim, 1e-5)?,
            attn2: Attention::load(w, &join(prefix, "attn2"), dim, context_dim, heads, head_dim, false)?,
            norm3: LayerNorm::load(w, &join(prefix, "norm3"), dim, 1e-5)?,
            ff_proj: Linear::load(w, &join(prefix, "ff.net.0.proj"), dim, inner_ff * 2, true)?,
            ff_out: Linear::load(w, &join(prefix, "ff.net.2"), inner_ff, dim, true)?,
            layer,
        })
    }

    fn forward(&self, x: Tensor<3>, context: &Tensor<3>, hooks: &dyn BlockHooks) -> Tensor<3> {
        let x = hooks.self_attention(self.layer, &self.attn1, self.norm1.forward(x.clone())) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(context.clone())) + x;
        let h = self.ff_proj.forward(self.norm3.forward(x.clone()));
        let mut parts = h.chunk(2, 2);
        let gate = parts.pop().expect("two halves");
        let hidden = parts.pop().expect("two halves");
        self.ff_out.forward(hidden * gelu(gate)) + x
    }
}

#[derive(Clone, Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel` (continuous input).
#[derive(Clone, Debug)]
pub struct Transformer2D {
    pub norm: GroupNorm,
    proj_in: Proj,
    pub blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    fn load(
        w: &Weights,
        prefix: &str,
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        cfg: &UNetConfig,
        layer_counter: &mut usize,
    ) -> Result<Self, ModelError> {
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Proj::Linear(Linear::load(w, &join(prefix, "proj_in"), channels, channels, true)?),
                Proj::Linear(Linear::load(w, &join(prefix, "proj_out"), channels, channels, true)?),
            )
        } else {
            (
                Proj::Conv(Conv2d::load(w, &join(prefix, "proj_in"), channels, channels, 1, 1, 0)?),
                Proj::Conv(Conv2d::load(w, &join(prefix, "proj_out"), channels, channels, 1, 1, 0)?),
            )
        };
        let mut blocks = Vec::with_capacity(depth);
        for i in 0..depth {
            blocks.push(TransformerBlock::load(
                w,
                &join(prefix, format!("transformer_blocks.{i}")),
                channels,
                heads,
                context_dim,
                *layer_counter,
            )?);
            *layer_counter += 1;
        }
        Ok(Self { norm: GroupNorm::load(w, &join(prefix, "norm"), cfg.norm_num_groups, channels, 1e-6)?, proj_in, blocks, proj_out })
    }

    fn forward(&self, x: Tensor<4>, context: &Tensor<3>, hooks: &dyn BlockHooks) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = hooks.group_norm(&self.norm, x, false);
        let tokens = |t: Tensor<4>| t.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => tokens(conv.forward(x)),
            Proj::Linear(lin) => lin.forward(tokens(x)),
        };
        for block in &self.blocks {
            t = block.forward(t, context, hooks);
        }
        let image = |t: Tensor<3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(image(t)),
            Proj::Linear(lin) => image(lin.forward(t)),
        };
        out + residual
    }
}

#[derive(Clone, Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
}

/// Extra conditioning of SDXL (`addition_embed_type: text_time`).
#[derive(Clone, Debug)]
pub struct TextTime {
    /// Pooled text embeddings (B, text_embeds_dim).
    pub text_embeds: Tensor<2>,
    /// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]` per row (B, 6).
    pub time_ids: Tensor<2>,
}

/// Residuals added inside the UNet (diffusers' `down_block_additional_residuals` and
/// `mid_block_additional_residual`): `down[k]` is added to skip connection k (in the order the
/// down half produces them: `conv_in`'s output, then each down resnet/attention pair, then each
/// downsampler), `mid` to the mid block's output. A ControlNet's output.
#[derive(Clone, Debug)]
pub struct AdditionalResiduals {
    pub down: Vec<Tensor<4>>,
    pub mid: Tensor<4>,
}

/// The sum of two residual sets of the same shapes (MultiControlNet).
impl std::ops::Add for AdditionalResiduals {
    type Output = AdditionalResiduals;
    fn add(self, other: AdditionalResiduals) -> AdditionalResiduals {
        AdditionalResiduals { down: self.down.into_iter().zip(other.down).map(|(a, b)| a + b).collect(), mid: self.mid + other.mid }
    }
}

/// Channels of each skip connection of the down half (the shapes of
/// [`AdditionalResiduals::down`]): `conv_in`, every down resnet, every downsampler.
pub fn skip_channels(cfg: &UNetConfig) -> Vec<usize> {
    let n = cfg.block_out_channels.len();
    let mut out = vec![cfg.block_out_channels[0]];
    for i in 0..n {
        out.extend(std::iter::repeat_n(cfg.block_out_channels[i], cfg.layers_per_block[i]));
        if i + 1 < n {
            out.push(cfg.block_out_channels[i]);
        }
    }
    out
}

/// The half of the UNet a ControlNet copies: input conv, time (and SDXL `text_time`) embedding,
/// down blocks and mid block. [`UNet`] and [`super::controlnet::ControlNet`] are both built on it,
/// so the two run the same code for these layers.
#[derive(Clone, Debug)]
pub(crate) struct DownHalf {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down: Vec<DownBlock>,
    mid: MidBlock,
}

impl DownHalf {
    /// Loads the down half. Self-attention layers are numbered from `*layer_counter` on for the
    /// down blocks (the counter advances) and from `mid_first_layer` for the mid block (diffusers'
    /// processor order puts the up blocks between them).
    pub(crate) fn load(w: &Weights, cfg: &UNetConfig, layer_counter: &mut usize, mid_first_layer: usize) -> Result<Self, ModelError> {
        let n = cfg.block_out_channels.len();
        let c0 = cfg.block_out_channels[0];
        let temb = c0 * 4;
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;

        let conv_in = Conv2d::load(w, "conv_in", cfg.in_channels, c0, 3, 1, 1)?;
        let time_embedding = TimestepEmbedding::load(w, "time_embedding", c0, temb)?;
        let add_embedding = match cfg.text_time {
            Some((_, p)) => Some(TimestepEmbedding::load(w, "add_embedding", p, temb)?),
            None => None,
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = c0;
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = cfg.block_out_channels[i];
            let prefix = format!("down_blocks.{i}");
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block[i] {
                let r_in = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock::load(w, &format!("{prefix}.resnets.{j}"), r_in, out_ch, Some(temb), groups, eps)?);
                if cfg.down_cross_attn[i] {
                    attentions.push(Transformer2D::load(
                        w,
                        &format!("{prefix}.attentions.{j}"),
                        out_ch,
                        cfg.num_attention_heads[i],
                        cfg.transformer_layers_per_block[i],
                        cfg.cross_attention_dim[i],
                        cfg,
                        layer_counter,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Conv2d::load(w, &format!("{prefix}.downsamplers.0.conv"), out_ch, out_ch, 3, 2, cfg.downsample_padding)?)
            } else {
                None
            };
            down.push(DownBlock { resnets, attentions, downsampler });
        }

        let c_last = cfg.block_out_channels[n - 1];
        let mut mid_layer = mid_first_layer;
        let mid = MidBlock {
            resnets: vec![
                ResnetBlock::load(w, "mid_block.resnets.0", c_last, c_last, Some(temb), groups, eps)?,
                ResnetBlock::load(w, "mid_block.resnets.1", c_last, c_last, Some(temb), groups, eps)?,
            ],
            attentions: vec![Transformer2D::load(
                w,
                "mid_block.attentions.0",
                c_last,
                cfg.num_attention_heads[n - 1],
                cfg.transformer_layers_per_block[n - 1],
                cfg.cross_attention_dim[n - 1],
                cfg,
                &mut mid_layer,
            )?],
        };
        Ok(Self { conv_in, time_embedding, add_embedding, down, mid })
    }

    /// Self-attention layers of the mid block.
    fn mid_self_attention_layers(cfg: &UNetConfig) -> usize {
        cfg.transformer_layers_per_block[cfg.block_out_channels.len() - 1]
    }

    /// Checks the inputs' shapes against the config (errors name the input).
    pub(crate) fn check_inputs(
        cfg: &UNetConfig,
        sample: &Tensor<4>,
        timesteps: &Tensor<1>,
        encoder_hidden_states: &Tensor<3>,
    ) -> Result<(), ModelError> {
        let [b, c, h, w] = sample.dims();
        if c != cfg.in_channels {
            return Err(input("sample", format!("has {c} channels, the model takes {}", cfg.in_channels)));
        }
        let m = cfg.latent_multiple();
        if h % m != 0 || w % m != 0 || h == 0 || w == 0 {
            return Err(input("sample", format!("latent size {h}x{w} must be a positive multiple of {m}")));
        }
        if timesteps.dims()[0] != b {
            return Err(input("timesteps", format!("{} values for a batch of {b}", timesteps.dims()[0])));
        }
        let [eb, _, ed] = encoder_hidden_states.dims();
        if eb != b || ed != cfg.cross_attention_dim[0] {
            return Err(input(
                "encoder_hidden_states",
                format!(
                    "shape {:?} does not fit batch {b} and cross_attention_dim {}",
                    encoder_hidden_states.dims(),
                    cfg.cross_attention_dim[0]
                ),
            ));
        }
        Ok(())
    }

    /// The time embedding (plus SDXL's `text_time` embedding) of a batch of `b`.
    pub(crate) fn embedding(
        &self,
        cfg: &UNetConfig,
        timesteps: Tensor<1>,
        text_time: Option<&TextTime>,
        b: usize,
    ) -> Result<Tensor<2>, ModelError> {
        let c0 = cfg.block_out_channels[0];
        let t_emb = timestep_embedding(timesteps, c0, cfg.flip_sin_to_cos, cfg.freq_shift);
        let mut emb = self.time_embedding.forward(t_emb);
        if let (Some(add), Some((d, _))) = (&self.add_embedding, cfg.text_time) {
            let tt = text_time
                .ok_or_else(|| input("text_time", "this model (addition_embed_type text_time) needs text_embeds and time_ids".into()))?;
            let td = cfg.text_embeds_dim().expect("text_time");
            if tt.text_embeds.dims() != [b, td] {
                return Err(input("text_embeds", format!("shape {:?}, expected [{b}, {td}]", tt.text_embeds.dims())));
            }
            if tt.time_ids.dims() != [b, 6] {
                return Err(input("time_ids", format!("shape {:?}, expected [{b}, 6]", tt.time_ids.dims())));
            }
            let time_embeds =
                timestep_embedding(tt.time_ids.clone().reshape([b * 6]), d, cfg.flip_sin_to_cos, cfg.freq_shift).reshape([b, 6 * d]);
            // diffusers concatenates in f32 and casts to the model dtype (the linear layer does).
            let add_in = Tensor::cat(vec![tt.text_embeds.clone().cast(time_embeds.dtype()), time_embeds], 1);
            emb = emb + add.forward(add_in);
        }
        Ok(emb)
    }

    /// `conv_in` of the sample.
    pub(crate) fn conv_in(&self, sample: Tensor<4>) -> Tensor<4> {
        self.conv_in.forward(sample)
    }

    /// The down blocks from `conv_in`'s output `x` (plus, for a ControlNet, the conditioning
    /// embedding), then the mid block. Returns the mid block's output and the skip connections
    /// (`x` first). Stop checks ([`super::stop`]) between blocks.
    pub(crate) fn forward(
        &self,
        x: Tensor<4>,
        emb: &Tensor<2>,
        ctx: &Tensor<3>,
        hooks: &dyn UNetHooks,
    ) -> Result<(Tensor<4>, Vec<Tensor<4>>), ModelError> {
        let mut x = x;
        let mut skips = vec![x.clone()];
        for (k, block) in self.down.iter().enumerate() {
            let hooks = &At::new(hooks, Level::Down(k));
            for (j, resnet) in block.resnets.iter().enumerate() {
                stop::check()?;
                x = resnet.forward(x, Some(emb), hooks);
                if let Some(attn) = block.attentions.get(j) {
                    stop::check()?;
                    x = attn.forward(x, ctx, hooks);
                }
                skips.push(x.clone());
            }
            if let Some(ds) = &block.downsampler {
                x = ds.forward(x);
                skips.push(x.clone());
            }
        }

        stop::check()?;
        let mid = &At::new(hooks, Level::Mid);
        x = self.mid.resnets[0].forward(x, Some(emb), mid);
        for (attn, resnet) in self.mid.attentions.iter().zip(&self.mid.resnets[1..]) {
            stop::check()?;
            x = attn.forward(x, ctx, mid);
            stop::check()?;
            x = resnet.forward(x, Some(emb), mid);
        }
        Ok((x, skips))
    }

    fn resnets(&self) -> usize {
        self.down.iter().map(|b| b.resnets.len()).sum::<usize>() + self.mid.resnets.len()
    }

    fn transformers(&self) -> usize {
        self.down.iter().map(|b| b.attentions.len()).sum::<usize>() + self.mid.attentions.len()
    }
}

fn input(field: &str, message: String) -> ModelError {
    ModelError::Input { field: field.into(), message }
}

/// A loaded UNet. Cloning shares the weight tensors.
#[derive(Clone, Debug)]
pub struct UNet {
    pub config: UNetConfig,
    half: DownHalf,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    self_attention_layers: usize,
    group_norms: usize,
    /// The layers a LoRA can adapt.
    lora_layers: Arc<crate::model::lora::LayerIndex>,
}

impl UNet {
    /// The precision its weights are held (and its activations computed) in.
    pub fn precision(&self) -> super::precision::Precision {
        super::precision::Precision::of_dtype(self.conv_out.weight.dtype()).unwrap_or_default()
    }
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&weight_file(dir, "diffusion_pytorch_model")?, device)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the UNet of `config` from `weights`; every tensor of the file must be used.
    pub fn from_weights(config: UNetConfig, w: &Weights) -> Result<Self, ModelError> {
        let cfg = &config;
        let n = cfg.block_out_channels.len();
        let c0 = cfg.block_out_channels[0];
        let temb = c0 * 4;
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;

        let rev_ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = cfg.num_attention_heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = cfg.layers_per_block.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = cfg.cross_attention_dim.iter().rev().copied().collect();

        // Processor order: down blocks, up blocks, mid block.
        let down_layers: usize =
            (0..n).filter(|&i| cfg.down_cross_attn[i]).map(|i| cfg.layers_per_block[i] * cfg.transformer_layers_per_block[i]).sum();
        let up_layers: usize =
            (0..n).filter(|&i| cfg.up_cross_attn[i]).map(|i| (rev_layers[i] + 1) * cfg.reverse_transformer_layers_per_block[i]).sum();
        let mut layer_counter = 0usize;
        let half = DownHalf::load(w, cfg, &mut layer_counter, down_layers + up_layers)?;
        debug_assert_eq!(layer_counter, down_layers);

        let mut up = Vec::with_capacity(n);
        let mut out_ch = rev_ch[0];
        for i in 0..n {
            let prev_out = out_ch;
            out_ch = rev_ch[i];
            let in_ch = rev_ch[(i + 1).min(n - 1)];
            let prefix = format!("up_blocks.{i}");
            let layers = rev_layers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let r_in = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock::load(w, &format!("{prefix}.resnets.{j}"), r_in + skip, out_ch, Some(temb), groups, eps)?);
                if cfg.up_cross_attn[i] {
                    attentions.push(Transformer2D::load(
                        w,
                        &format!("{prefix}.attentions.{j}"),
                        out_ch,
                        rev_heads[i],
                        cfg.reverse_transformer_layers_per_block[i],
                        rev_cross[i],
                        cfg,
                        &mut layer_counter,
                    )?);
                }
            }
            let upsampler =
                if i + 1 < n { Some(Conv2d::load(w, &format!("{prefix}.upsamplers.0.conv"), out_ch, out_ch, 3, 1, 1)?) } else { None };
            up.push(UpBlock { resnets, attentions, upsampler });
        }
        debug_assert_eq!(layer_counter, down_layers + up_layers);

        let conv_norm_out = GroupNorm::load(w, "conv_norm_out", groups, c0, eps)?;
        let conv_out = Conv2d::load(w, "conv_out", c0, cfg.out_channels, 3, 1, 1)?;
        w.finish()?;

        let self_attention_layers = layer_counter + DownHalf::mid_self_attention_layers(cfg);
        let lora_layers = Arc::new(w.layer_index());
        let mut unet = Self { config, half, up, conv_norm_out, conv_out, self_attention_layers, group_norms: 0, lora_layers };
        unet.group_norms = unet.count_group_norms();
        Ok(unet)
    }

    fn count_group_norms(&self) -> usize {
        let resnets = self.half.resnets() + self.up.iter().map(|b| b.resnets.len()).sum::<usize>();
        let transformers = self.half.transformers() + self.up.iter().map(|b| b.attentions.len()).sum::<usize>();
        2 * resnets + transformers + 1
    }

    /// The layers a LoRA can adapt, by diffusers module name.
    pub fn lora_layers(&self) -> &crate::model::lora::LayerIndex {
        &self.lora_layers
    }

    /// Number of self-attention layers (the length of a per-layer switch vector).
    pub fn self_attention_layers(&self) -> usize {
        self.self_attention_layers
    }

    /// The levels of this UNet, in execution order: `down.0..`, `mid`, `up.0..`, `out`.
    pub fn levels(&self) -> Vec<Level> {
        levels_of(self.half.down.len())
    }

    /// Number of GroupNorm layers.
    pub fn group_norms(&self) -> usize {
        self.group_norms
    }

    /// Predicts the noise (or v) for `sample` (B, C, H, W) at `timesteps` (B,) given
    /// `encoder_hidden_states` (B, L, D) and, for SDXL, `text_time`.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: &Tensor<3>,
        text_time: Option<&TextTime>,
        hooks: &dyn UNetHooks,
    ) -> Result<Tensor<4>, ModelError> {
        self.forward_with_residuals(sample, timesteps, encoder_hidden_states, text_time, hooks, None)
    }

    /// [`forward`](Self::forward) with `residuals` (a ControlNet's output) added to the skip
    /// connections and to the mid block's output, as diffusers' `down_block_additional_residuals`
    /// and `mid_block_additional_residual`. Their count and shapes must match the down half's
    /// (see [`skip_channels`]).
    pub fn forward_with_residuals(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: &Tensor<3>,
        text_time: Option<&TextTime>,
        hooks: &dyn UNetHooks,
        residuals: Option<&AdditionalResiduals>,
    ) -> Result<Tensor<4>, ModelError> {
        let cfg = &self.config;
        DownHalf::check_inputs(cfg, &sample, &timesteps, encoder_hidden_states)?;
        let [b, _, h, w] = sample.dims();
        if let Some(r) = residuals {
            check_residuals(cfg, r, b, h, w)?;
        }
        let emb = self.half.embedding(cfg, timesteps, text_time, b)?;
        let ctx = encoder_hidden_states;
        let x = self.half.conv_in(sample);
        let (mut x, mut skips) = self.half.forward(x, &emb, ctx, hooks)?;
        if let Some(r) = residuals {
            // A ControlNet's residuals are in its own dtype.
            skips = skips
                .into_iter()
                .zip(&r.down)
                .map(|(s, add)| {
                    let dtype = s.dtype();
                    s + add.clone().cast(dtype)
                })
                .collect();
            let dtype = x.dtype();
            x = x + r.mid.clone().cast(dtype);
        }

        for (k, block) in self.up.iter().enumerate() {
            let hooks = &At::new(hooks, Level::Up(k));
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("skip connection per up resnet");
                x = Tensor::cat(vec![x, skip], 1);
                stop::check()?;
                x = resnet.forward(x, Some(&emb), hooks);
                if let Some(attn) = block.attentions.get(j) {
                    stop::check()?;
                    x = attn.forward(x, ctx, hooks);
                }
            }
            if let Some(us) = &block.upsampler {
                let [_, _, sh, sw] = skips.last().expect("skip for next block").dims();
                x = interpolate(x, InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([sh, sw]));
                x = us.forward(x);
            }
        }

        stop::check()?;
        let x = hooks.group_norm(Site { level: Level::Out }, &self.conv_norm_out, x, true);
        // The sampler works in f32: the output leaves the model's dtype here.
        let out = self.conv_out.forward(x).cast(FloatDType::F32);
        // Attention tiles skipped after a stop leave garbage: never return it.
        stop::check()?;
        Ok(out)
    }
}

/// The spatial sizes of the skip connections for a latent of `h`×`w`: halved (rounding up, as
/// a stride-2 padded conv does) after each downsampler.
pub fn skip_sizes(cfg: &UNetConfig, h: usize, w: usize) -> Vec<(usize, usize)> {
    let n = cfg.block_out_channels.len();
    let (mut h, mut w) = (h, w);
    let mut out = vec![(h, w)];
    for i in 0..n {
        out.extend(std::iter::repeat_n((h, w), cfg.layers_per_block[i]));
        if i + 1 < n {
            h = (h + 2 * cfg.downsample_padding - 3) / 2 + 1;
            w = (w + 2 * cfg.downsample_padding - 3) / 2 + 1;
            out.push((h, w));
        }
    }
    out
}

fn check_residuals(cfg: &UNetConfig, r: &AdditionalResiduals, b: usize, h: usize, w: usize) -> Result<(), ModelError> {
    let channels = skip_channels(cfg);
    let sizes = skip_sizes(cfg, h, w);
    if r.down.len() != channels.len() {
        return Err(input(
            "down_block_additional_residuals",
            format!("{} tensors, the UNet has {} skip connections", r.down.len(), channels.len()),
        ));
    }
    for (k, (t, (&c, &(sh, sw)))) in r.down.iter().zip(channels.iter().zip(&sizes)).enumerate() {
        if t.dims() != [b, c, sh, sw] {
            return Err(input(
                "down_block_additional_residuals",
                format!("tensor {k} has shape {:?}, expected {:?}", t.dims(), [b, c, sh, sw]),
            ));
        }
    }
    let (mh, mw) = *sizes.last().expect("at least conv_in's skip");
    let c_last = *cfg.block_out_channels.last().expect("blocks");
    if r.mid.dims() != [b, c_last, mh, mw] {
        return Err(input("mid_block_additional_residual", format!("shape {:?}, expected {:?}", r.mid.dims(), [b, c_last, mh, mw])));
    }
    Ok(())
}
